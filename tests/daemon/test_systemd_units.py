"""The files in systemd/ stay valid: the unit verifies, its exposure stays <= 2.0, and the example
config and environment load with the real config loader."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.runner import HTTP_STOP_TIMEOUT_S
from daemon.service import STORE_FLUSH_TIMEOUT_S
from daemon.store.sqlite import CLOSE_FLUSH_TIMEOUT_S
from listeners import StandardSource, make_adapter
from tests.support.ci import IN_CI

REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO_ROOT / "systemd"
UNIT = SYSTEMD_DIR / "segmapd.service"
EXAMPLE_CONFIG = SYSTEMD_DIR / "segmapd.toml.example"
EXAMPLE_ENV = SYSTEMD_DIR / "segmapd.env.example"
MAX_EXPOSURE = 2.0


def unit_settings() -> dict[str, list[str]]:
    """The unit's `[Service]` settings; a key given several times keeps every value."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def seconds(value: str) -> float:
    """A systemd time span of the simple forms used in the unit: `45`, `45s`, `1min 30s`."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"not a time span: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def credential_names() -> list[str]:
    return [value.partition(":")[0] for value in unit_settings().get("LoadCredential", [])]


@pytest.fixture
def systemd_analyze() -> str:
    """Path of systemd-analyze; skipped if absent, except in CI where the check must run."""
    found = shutil.which("systemd-analyze")
    if found is None:
        message = "systemd-analyze is not installed (apt-get install systemd)"
        if IN_CI:
            pytest.fail(f"{message}: CI must check the unit file")
        pytest.skip(message)
    return found


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here.

    `systemd-analyze verify` fails when the binary is missing, and /usr/bin/segmapd is only
    there on an installed host; the venv's console script (or the interpreter) stands in.
    """
    script = Path(sys.executable).with_name("segmapd")
    binary = script if os.access(script, os.X_OK) else Path(sys.executable)
    text, count = re.subn(
        r"^ExecStart=\S+", f"ExecStart={binary}", UNIT.read_text(), flags=re.MULTILINE
    )
    assert count == 1, "expected exactly one ExecStart= line"
    copy = tmp_path / UNIT.name  # same name: verify derives the unit name from the file name
    copy.write_text(text)
    return copy


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # No pager, no colours, no bus: the offline checks must behave the same in any container.
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "SYSTEMD_LOG_LEVEL": "notice"}
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_unit_verifies_cleanly(systemd_analyze: str, runnable_unit: Path) -> None:
    result = run([systemd_analyze, "verify", str(runnable_unit)], runnable_unit.parent)
    output = result.stdout + result.stderr
    # verify exits 0 on unknown keys or bad values and only warns: any line about our unit
    # (by name or by path) is a failure too.
    complaints = [line for line in output.splitlines() if "segmapd" in line]
    assert result.returncode == 0, output
    assert complaints == [], output


def test_unit_exposure_is_at_most_2(systemd_analyze: str, tmp_path: Path) -> None:
    result = run([systemd_analyze, "security", "--offline=true", str(UNIT)], tmp_path)
    output = result.stdout + result.stderr
    if "--offline" in output and "unrecognized" in output:
        pytest.fail(f"this systemd-analyze has no --offline (needs systemd >= 250):\n{output}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no overall exposure level in:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{output}"


def test_unit_essentials() -> None:
    settings = unit_settings()
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert int(settings["WatchdogSec"][0]) > 0
    assert settings["StateDirectory"] == ["segmapd"]
    assert settings["ExecStart"][0].endswith(" run --config /etc/segmapd/segmapd.toml")
    assert {"client_secret", "access_key_secret", "webhook_secret"} <= set(credential_names())


@pytest.fixture
def credentials(tmp_path: Path) -> dict[str, str]:
    """An environment whose $CREDENTIALS_DIRECTORY holds every credential the unit loads."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    for name in credential_names():
        (directory / name).write_text(f"test-{name}\n")
    return {"CREDENTIALS_DIRECTORY": str(directory)}


def test_example_config_loads_with_the_units_credentials(credentials: dict[str, str]) -> None:
    config = load_config(EXAMPLE_CONFIG, environ=credentials)
    assert config.cxone.client_secret.get_secret_value() == "test-client_secret"
    assert config.cxone.access_key_secret.get_secret_value() == "test-access_key_secret"
    crm = config.sources["crm"]
    assert isinstance(crm, StandardSource)
    assert crm.secret.get_secret_value() == "test-webhook_secret"
    assert [t.get_secret_value() for t in config.server.admin_tokens] == ["test-admin_tokens"]
    assert config.store.url == "sqlite:///var/lib/segmapd/journal.db"
    assert config.server.listen == "127.0.0.1:8080"


def test_example_config_reads_secrets_only_from_credentials() -> None:
    # Every *_file name in the example must be a credential the unit actually loads.
    names = set(re.findall(r'^\w+_file\s*=\s*"([^"]+)"', EXAMPLE_CONFIG.read_text(), re.M))
    assert names, "the example should read its secrets through *_file keys"
    assert names <= set(credential_names())


def test_example_config_sets_every_section() -> None:
    # A new config section should be documented in the example (defaults alone hide it).
    from daemon.config import Config

    text = EXAMPLE_CONFIG.read_text()
    for section in Config.model_fields:
        header = "[sources." if section == "sources" else f"[{section}]"
        assert header in text, f"{EXAMPLE_CONFIG.name} does not document [{section}]"


def test_example_environment_overrides_are_valid(credentials: dict[str, str]) -> None:
    overrides: dict[str, str] = {}
    for raw in EXAMPLE_ENV.read_text().splitlines():
        line = raw.removeprefix("#")
        if re.match(r"^SEGMAPD_\w+=", line):
            key, _, value = line.partition("=")
            overrides[key] = value
    assert overrides, "the example environment should show some overrides"
    load_config(EXAMPLE_CONFIG, environ={**credentials, **overrides})


def test_stop_timeout_exceeds_the_drain_budget(credentials: dict[str, str]) -> None:
    drain_budget_s = load_config(EXAMPLE_CONFIG, environ=credentials).server.drain_budget_s
    timeout_stop_s = seconds(unit_settings()["TimeoutStopSec"][0])
    # After the budgeted phases: stopping the HTTP server, the last commit and closing the
    # journal are each bounded; the unit must outlast all of them, with a little slack.
    worst_s = drain_budget_s + HTTP_STOP_TIMEOUT_S + STORE_FLUSH_TIMEOUT_S + CLOSE_FLUSH_TIMEOUT_S
    assert timeout_stop_s >= worst_s + 2, (
        f"TimeoutStopSec={timeout_stop_s:g} is below the worst-case drain of {worst_s:g} s"
    )


def test_every_source_kind_in_the_example_validates_once_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE_CONFIG.read_text()
    tables = re.findall(r"^#\[sources\.(\w+)\]$", text, flags=re.MULTILINE)
    assert set(tables) == {"hubspot", "salesforce", "zendesk"}
    uncommented = re.sub(r"^#(?!#)(\[sources\.|[a-z_]+ = )", r"\1", text, flags=re.MULTILINE)
    config_file = tmp_path / "segmapd.toml"
    config_file.write_text(uncommented)
    directory = tmp_path / "credentials"
    directory.mkdir()
    for name in [*credential_names(), "hubspot_client_secret", "zendesk_secret"]:
        (directory / name).write_text(f"test-{name}\n")
    config = load_config(config_file, environ={"CREDENTIALS_DIRECTORY": str(directory)})
    kinds = {name: source.kind for name, source in config.sources.items()}
    assert kinds == {
        "crm": "standard",
        "hubspot": "hubspot",
        "salesforce": "salesforce",
        "zendesk": "json",
    }
    for source in config.sources.values():
        if source.kind != "standard":  # the test secret is no whsec_ key
            make_adapter(source)
