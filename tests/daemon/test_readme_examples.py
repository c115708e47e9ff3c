"""The README's examples are true: every `[sources.*]` example is a configuration segmapd starts
with, and the answers it shows (`/readyz`, the metrics, a notification, a configuration error)
are what segmapd really says."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from daemon.config import load_config
from daemon.notifier import build_event
from listeners import make_adapter
from scheduler.model import Assignment, Intent, State
from tests.e2e.conftest import daemon_config
from tests.support.emulator import EmulatorControl
from tests.support.processes import ManagedProcess

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = [
    block
    for block in re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.DOTALL)
    if "[sources." in block
]
CXONE = """
[cxone]
client_id = "segmapd"
client_secret = "test-client-secret"
access_key_id = "test-key"
access_key_secret = "test-key-secret"
"""


def test_the_readme_shows_every_kind() -> None:
    kinds = set(re.findall(r'^kind = "(\w+)"', "\n".join(BLOCKS), flags=re.MULTILINE))
    assert kinds == {"standard", "hubspot", "salesforce", "json"}


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: re.findall(r"\[sources\.(\w+)\]", b)[0])
def test_a_readme_source_example_loads_and_builds_its_adapter(block: str, tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name in re.findall(r'_file = "([^"/]+)"', block):
        # A standard source's secret must be a real whsec_ key; the others take any text.
        value = "whsec_" + "A" * 32 if name == "webhook_secret" else f"test-{name}"
        (credentials / name).write_text(value + "\n")
    config_file = tmp_path / "segmapd.toml"
    config_file.write_text(block if "[cxone]" in block else CXONE + block)
    config = load_config(config_file, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.sources
    for source in config.sources.values():
        make_adapter(source)


# ---- examples of what segmapd answers, against the real thing -----------------------------------


def readme_section(title: str) -> str:
    """The README's text from the heading `title` to the next heading of any level."""
    text = README.read_text()
    start = re.search(rf"^#+ {re.escape(title)}\n", text, flags=re.MULTILINE)
    assert start, title
    end = re.search(r"^#+ ", text[start.end() :], flags=re.MULTILINE)
    return text[start.end() : start.end() + end.start()] if end else text[start.end() :]


def json_blocks(section: str) -> list[Any]:
    return [orjson.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.DOTALL)]


@pytest.fixture
def daemon_url(emulator: EmulatorControl, tmp_path: Path) -> Iterator[str]:
    """A real segmapd against the session's emulator, with the CLI's client variables set.

    `run` leaves SEGMAPD_URL, SEGMAPD_ADMIN_TOKEN and SEGMAPD_EXAMPLE_SECRET to the client
    commands: they are in its environment here, as in a shell that uses both.
    """
    config = tmp_path / "segmapd.toml"
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    overrides = {"store": {"url": f"sqlite://{tmp_path}/journal.db"}}
    config.write_text(daemon_config(emulator.url, "admin-token", secret, overrides))
    process = ManagedProcess(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
        env={
            "SEGMAPD_URL": "http://127.0.0.1:9",
            "SEGMAPD_ADMIN_TOKEN": "token-of-the-client-commands",
            "SEGMAPD_EXAMPLE_SECRET": secret,
        },
    )
    try:
        yield process.start()
    finally:
        process.stop(timeout_s=20)


async def test_the_readyz_example_is_what_a_ready_daemon_answers(
    daemon_url: str, http: aiohttp.ClientSession
) -> None:
    [example] = json_blocks(readme_section("Probes"))
    deadline = time.monotonic() + 20
    while True:
        async with http.get(f"{daemon_url}/readyz") as response:
            answer = await response.json()
        if response.status == 200:
            break
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.1)
    assert answer == example
    assert list(answer["checks"]) == list(example["checks"])  # in the order it is shown


async def test_the_metrics_table_lists_every_family_the_daemon_exports(
    daemon_url: str, http: aiohttp.ClientSession
) -> None:
    rows = re.findall(r"^\| `(segmapd_\w+)` \| (\w+) \|", readme_section("Metrics"), re.MULTILINE)
    documented = dict(rows)
    # The journal is counted a moment after start; until then its gauge has no sample.
    deadline = time.monotonic() + 20
    while True:
        async with http.get(f"{daemon_url}/metrics") as response:
            text = await response.text()
        if "\nsegmapd_journal_counted_timestamp_seconds " in text:
            break
        assert time.monotonic() < deadline, text
        await asyncio.sleep(0.1)
    exported = {
        name: kind
        for name, kind in re.findall(r"^# TYPE (\S+) (\w+)$", text, re.MULTILINE)
        if not name.endswith("_created")  # prometheus_client's creation times, not ours
    }
    assert documented == exported


def test_the_notification_example_is_the_body_segmapd_sends() -> None:
    [example] = json_blocks(readme_section("Notifications"))
    data = example["data"]
    received = datetime.fromisoformat(data["receivedAt"]).timestamp()
    updated = datetime.fromisoformat(data["updatedAt"]).timestamp()
    finished = Assignment(
        data["contactId"],
        data["segmentId"],
        state=State(data["state"]),
        attempts=data["attempts"],
        received_at=received,
        updated_at=updated,
        intent=Intent(data["intent"]),
    )
    _, body = build_event(finished)
    # No message and no reason are null, as the admin API shows them.
    assert orjson.loads(body) == example


def test_the_environment_row_of_troubleshooting_is_what_check_config_says(tmp_path: Path) -> None:
    [row] = [
        line
        for line in readme_section("Troubleshooting").splitlines()
        if "expected SEGMAPD_<SECTION>__<KEY>" in line
    ]
    symptom = re.match(r"\| `configuration error: (SEGMAPD_\w+): (.*?)` \(exit (\d)\)", row)
    assert symptom, row
    variable, message, status = symptom.groups()
    config = tmp_path / "segmapd.toml"
    config.write_text(CXONE + '\n[store]\nurl = "memory://"\n')
    base = {k: v for k, v in os.environ.items() if not k.startswith("SEGMAPD_")}

    def check_config(**variables: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", "check-config", "--config", str(config)],
            env={**base, **variables},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = check_config(**{variable: "x"})
    assert result.returncode == int(status), result.stderr
    assert f"configuration error: {variable}: {message}" in result.stderr
    # The client commands' own variables, which the row names, are left alone.
    for name in ("SEGMAPD_URL", "SEGMAPD_ADMIN_TOKEN", "SEGMAPD_EXAMPLE_SECRET", "SEGMAPD_CONFIG"):
        assert name in row
    result = check_config(
        SEGMAPD_URL="http://127.0.0.1:8080",
        SEGMAPD_ADMIN_TOKEN="t",
        SEGMAPD_EXAMPLE_SECRET="whsec_x",
        SEGMAPD_CONFIG=str(config),
    )
    assert result.returncode == 0, result.stderr
