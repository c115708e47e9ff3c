"""The files in systemd/ stay valid: the units verify, their exposure stays <= 2.0, the template
differs from the single unit only where it names the instance, and the example config and
environment load with the real config loader."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemon.config import ClusterConfig, load_config
from daemon.runner import HTTP_STOP_TIMEOUT_S
from daemon.service import STORE_FLUSH_TIMEOUT_S
from daemon.store.sqlite import CLOSE_FLUSH_TIMEOUT_S
from listeners import StandardSource, make_adapter
from tests.support.ci import IN_CI

REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO_ROOT / "systemd"
UNIT = SYSTEMD_DIR / "segmapd.service"
TEMPLATE = SYSTEMD_DIR / "segmapd@.service"
EXAMPLE_CONFIG = SYSTEMD_DIR / "segmapd.toml.example"
EXAMPLE_ENV = SYSTEMD_DIR / "segmapd.env.example"
MAX_EXPOSURE = 2.0


def unit_sections(unit: Path) -> dict[str, dict[str, list[str]]]:
    """Every section of a unit file; a key given several times keeps every value, in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    settings: dict[str, list[str]] = {}
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            settings = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_settings(unit: Path = UNIT) -> dict[str, list[str]]:
    """A unit's `[Service]` settings; a key given several times keeps every value."""
    return unit_sections(unit)["Service"]


def seconds(value: str) -> float:
    """A systemd time span of the simple forms used in the unit: `45`, `45s`, `1min 30s`."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"not a time span: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def credential_names(unit: Path = UNIT) -> list[str]:
    """The names of the credentials a unit loads (LoadCredential=NAME:PATH), in order."""
    return [value.partition(":")[0] for value in unit_settings(unit).get("LoadCredential", [])]


def instance_of(unit: Path, instance: str = "a") -> str:
    """The unit name systemd loads: `segmapd@a.service` for the template, else the file's name."""
    return unit.name.replace("@.", f"@{instance}.")


def write_credentials(directory: Path, names: list[str]) -> dict[str, str]:
    """Files standing in for the LoadCredential= copies; the environment that points at them."""
    directory.mkdir()
    for name in names:
        (directory / name).write_text(f"test-{name}\n")
    return {"CREDENTIALS_DIRECTORY": str(directory)}


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


@pytest.fixture(params=[UNIT, TEMPLATE], ids=lambda unit: unit.name)
def unit(request: pytest.FixtureRequest) -> Path:
    """Each unit file in systemd/: the single instance and the template."""
    path: Path = request.param
    return path


@pytest.fixture
def runnable_unit(unit: Path, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here; for the template, the
    path of an instance of it (`segmapd@a.service`), which systemd loads from the template.

    `systemd-analyze verify` fails when the binary is missing, and /usr/bin/segmapd is only
    there on an installed host; the venv's console script (or the interpreter) stands in.
    """
    script = Path(sys.executable).with_name("segmapd")
    binary = script if os.access(script, os.X_OK) else Path(sys.executable)
    text, count = re.subn(
        r"^ExecStart=\S+", f"ExecStart={binary}", unit.read_text(), flags=re.MULTILINE
    )
    assert count == 1, "expected exactly one ExecStart= line"
    copy = tmp_path / unit.name  # same name: verify derives the unit name from the file name
    copy.write_text(text)
    return tmp_path / instance_of(unit)


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


def test_unit_exposure_is_at_most_2(systemd_analyze: str, unit: Path, tmp_path: Path) -> None:
    # Given the template itself, systemd-analyze rates an instance of it (segmapd@i.service).
    result = run([systemd_analyze, "security", "--offline=true", str(unit)], tmp_path)
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


def test_restart_policy(unit: Path) -> None:
    settings = unit_settings(unit)
    # Exit 1 (the database down at start, a journal that failed at stop) is restarted;
    # exit 2 (a configuration or journal error) is not: a restart would not cure it.
    assert settings["Restart"] == ["on-failure"]
    assert settings["RestartPreventExitStatus"] == ["2"]


# Settings of the template that name its instance, and so differ from segmapd.service's.
INSTANCE_SETTINGS = {
    "Unit": {"Description"},
    "Service": {"ExecStart", "Environment", "EnvironmentFile", "StateDirectory"},
    "Install": set(),
}
# What only the template loads: it is meant for PostgreSQL, whose password is a credential.
TEMPLATE_ONLY_CREDENTIALS = ["store_password"]


def test_template_is_the_unit_apart_from_the_instance() -> None:
    single, template = unit_sections(UNIT), unit_sections(TEMPLATE)
    assert set(template) == set(single) == set(INSTANCE_SETTINGS)
    for section, differing in INSTANCE_SETTINGS.items():
        ignored = {*differing, "LoadCredential"}
        # Every hardening, lifecycle and limit setting is the same, read from segmapd.service:
        # one changed there and not here (or the reverse) fails this test.
        same = {key: values for key, values in template[section].items() if key not in ignored}
        expected = {key: values for key, values in single[section].items() if key not in ignored}
        assert same == expected, f"[{section}] of {TEMPLATE.name} drifted from {UNIT.name}"
    single_credentials = single["Service"]["LoadCredential"]
    template_credentials = template["Service"]["LoadCredential"]
    shared = [
        c for c in template_credentials if c.partition(":")[0] not in TEMPLATE_ONLY_CREDENTIALS
    ]
    assert shared == single_credentials
    assert credential_names(TEMPLATE) == [*credential_names(UNIT), *TEMPLATE_ONLY_CREDENTIALS]


def template_environment(host: str, instance: str) -> dict[str, str]:
    """The template's Environment= assignments as systemd passes them to one instance."""
    specifiers = {"%H": host, "%i": instance, "%%": "%"}
    environment: dict[str, str] = {}
    for line in unit_settings(TEMPLATE).get("Environment", []):
        # One line may hold several assignments, quoted as a shell would (systemd.exec(5)).
        for assignment in shlex.split(line):
            resolved = re.sub(r"%.", lambda m: specifiers[m.group(0)], assignment)
            key, _, value = resolved.partition("=")
            environment[key] = value
    return environment


def test_template_names_its_instance() -> None:
    single, template = unit_settings(UNIT), unit_settings(TEMPLATE)
    binary, _, arguments = template["ExecStart"][0].partition(" ")
    assert binary == single["ExecStart"][0].partition(" ")[0]
    assert arguments == "run --config /etc/segmapd/%i.toml"
    assert template["EnvironmentFile"] == ["-/etc/segmapd/%i.env"]
    # Per instance, so that one given SQLite anyway cannot write another's journal.
    assert template["StateDirectory"] == ["segmapd/%i"]
    assert "%i" in unit_sections(TEMPLATE)["Unit"]["Description"][0]
    assert template_environment("db-1", "a")["SEGMAPD_CLUSTER__NAME"] == "db-1-a"


def test_template_instances_load_the_example_on_postgresql(tmp_path: Path) -> None:
    # The README's setup: the example config, store.url on PostgreSQL, the password from the
    # credential only the template loads, and the name the template gives each instance.
    names = set()
    for instance in ("a", "b"):
        environ = {
            **write_credentials(tmp_path / instance, credential_names(TEMPLATE)),
            **template_environment("db-1", instance),
            "SEGMAPD_STORE__URL": "postgresql://segmapd@db.example:5432/segmapd",
            "SEGMAPD_STORE__PASSWORD_FILE": "store_password",
        }
        config = load_config(EXAMPLE_CONFIG, environ=environ)
        assert config.store.password.get_secret_value() == "test-store_password"
        names.add(config.cluster.name)
    assert names == {"db-1-a", "db-1-b"}


@pytest.fixture
def credentials(tmp_path: Path) -> dict[str, str]:
    """An environment whose $CREDENTIALS_DIRECTORY holds every credential the unit loads."""
    return write_credentials(tmp_path / "credentials", credential_names())


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


def test_every_commented_table_in_the_example_validates_once_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE_CONFIG.read_text()
    tables = re.findall(r"^#\[([\w.]+)\]$", text, flags=re.MULTILINE)
    assert set(tables) == {"sources.hubspot", "sources.salesforce", "sources.zendesk", "cluster"}
    uncommented = re.sub(r"^#(?!#)(\[[\w.]+\]$|[a-z_]+ = )", r"\1", text, flags=re.MULTILINE)
    config_file = tmp_path / "segmapd.toml"
    config_file.write_text(uncommented)
    names = [*credential_names(), "hubspot_client_secret", "zendesk_secret"]
    config = load_config(config_file, environ=write_credentials(tmp_path / "credentials", names))
    # The example shows the defaults of [cluster]: uncommenting it changes nothing.
    assert config.cluster == ClusterConfig()
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


# ---- Documentation= names pages that exist where the package is installed ---------------------

DOC_DIR = "share/doc/segmapd"
README = REPO_ROOT / "README.md"


def documentation(unit_text: str) -> list[str]:
    """The paths of a unit's `Documentation=file://...` URIs, in order."""
    uris = [
        uri
        for line in unit_text.splitlines()
        if line.startswith("Documentation=")
        for uri in line.partition("=")[2].split()
    ]
    assert uris, "the unit names no documentation"
    assert all(uri.startswith("file:///") for uri in uris), uris
    return [uri.removeprefix("file://") for uri in uris]


def install_prefix(unit_text: str) -> Path:
    """The installation prefix of the unit's segmapd: /usr for /usr/bin/segmapd."""
    [exec_start] = [line for line in unit_text.splitlines() if line.startswith("ExecStart=")]
    return Path(exec_start.removeprefix("ExecStart=").split()[0]).parent.parent


def shipped_documents() -> dict[str, Path]:
    """What the wheel installs under <prefix>/share/doc/segmapd, by path below the prefix."""
    build = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    shared = build["targets"]["wheel"]["shared-data"]
    return {target: REPO_ROOT / source for source, target in shared.items()}


def test_the_units_documentation_is_installed_with_segmapd(unit: Path) -> None:
    text = unit.read_text()
    prefix = install_prefix(text)
    shipped = shipped_documents()
    for path in documentation(text):
        below = Path(path).relative_to(prefix).as_posix()  # ValueError: not under the prefix
        assert below.startswith(DOC_DIR + "/"), path
        assert below in shipped, f"{path}: the package does not install {below}"
        assert shipped[below].is_file(), f"{shipped[below]} is not in the repository"
        # This test's own installation (`make install`): the page is really there.
        installed = Path(sys.prefix) / below
        assert installed.is_file(), f"{installed} is missing: run `make install` again"


@pytest.mark.parametrize(
    ("heading", "unit"),
    [("## Running under systemd", UNIT), ("#### Running several instances", TEMPLATE)],
    ids=["unit", "template"],
)
def test_the_readmes_unit_edit_points_at_the_virtualenvs_segmapd_and_documents(
    tmp_path: Path, heading: str, unit: Path
) -> None:
    section = README.read_text().split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    [edit] = [line for line in section.splitlines() if line.startswith("sed -i ")][:1]
    argv = shlex.split(edit)
    assert argv[-1] == f"/etc/systemd/system/{unit.name}"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text())
    subprocess.run([*argv[:-1], str(copy)], check=True, timeout=30)
    edited = copy.read_text()
    # The virtualenv of the README's Install section.
    assert install_prefix(edited) == Path("/opt/segmapd")
    assert unit_sections(copy)["Service"]["ExecStart"][0].startswith("/opt/segmapd/bin/segmapd ")
    paths = documentation(edited)
    assert paths == [
        f"/opt/segmapd/{below}"
        for below in (
            Path(p).relative_to("/usr").as_posix() for p in documentation(unit.read_text())
        )
    ]
    assert "/usr/" not in "\n".join(
        line for line in edited.splitlines() if line.startswith(("ExecStart=", "Documentation="))
    )


def test_no_file_names_a_design_document_the_repository_does_not_ship() -> None:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    for name in listed:
        path = REPO_ROOT / name
        if path.suffix in {".py", ".md", ".service", ".toml", ".example", ".conf"} and (
            path.is_file() and path != Path(__file__)
        ):
            assert "DESIGN.md" not in path.read_text(errors="replace"), name
