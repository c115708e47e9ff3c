"""One SQLite journal, one process: a second `segmapd run` on it refuses to start."""

from __future__ import annotations

import os

import aiohttp

from tests.e2e.conftest import StartDaemon
from tests.e2e.test_cli import segmapd
from tests.support.emulator import EmulatorControl


async def test_a_second_process_on_the_same_journal_refuses_and_the_first_carries_on(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    cli_env: dict[str, str],
):
    first = await start_daemon()
    journal = first.config.read_text().split('url = "sqlite://', 1)[1].split('"', 1)[0]
    code, _, err = await segmapd("run", "--config", str(first.config), env=cli_env)
    assert code == 2
    assert f"{journal}: the journal is in use by another segmapd process" in err
    assert first.process.proc is not None
    assert f"pid {first.process.proc.pid} on {os.uname().nodename}" in err
    # The refused process changed nothing: the first takes a delivery, and writes it once.
    status, _ = await first.webhook(http, {"contactId": "810000000001", "segmentIds": ["VIP"]})
    assert status == 202
    await first.wait_states(http, "810000000001", {"active"}, 30)
    assert (await emulator.counters())["bulk_ids"]["ids"] == 1
    # Once the first has stopped, the journal is free again (the lock dies with its holder).
    first.process.kill()
    first.restart()
    status, body = await first.contact(http, "810000000001")
    assert status == 200 and body["segments"][0]["state"] == "active"
