"""A read-limited validation backlog, end to end: nothing fails for waiting, and status says so."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.e2e.conftest import StartDaemon
from tests.e2e.test_cli import admin_args, segmapd
from tests.support.emulator import EmulatorControl

READ_RPS = 10.0
PAIRS = 80  # 8 s of reads at 10/s: four times the 2 s deadline


def gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_a_read_backlog_past_the_deadline_fails_nothing_and_is_shown_while_it_waits(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    cli_env: dict[str, str],
):
    await emulator.configure({"limits": {"read": {"rate": READ_RPS, "burst": READ_RPS}}})
    daemon = await start_daemon(
        limits={"read_rps": READ_RPS},
        validation={"interval_s": 0.3, "window_s": 3.0, "deadline_s": 2.0},
    )
    events = [{"contactId": f"{400000000000 + i}", "segmentIds": ["BACKLOG"]} for i in range(PAIRS)]
    status, answer = await daemon.mappings(http, events)
    assert status == 202, answer

    # While the backlog drains, the last contact is honestly "verifying", with the backlog shown.
    last = f"{400000000000 + PAIRS - 1}"
    deadline = time.monotonic() + 10
    body = None
    while time.monotonic() < deadline:
        status, body = await daemon.contact(http, last)
        if status == 200 and body["segments"][0]["state"] == "verifying":
            break
        await asyncio.sleep(0.05)
    assert body is not None and body["segments"][0]["state"] == "verifying", body
    backlog = body["validation"]
    assert backlog["readsWaiting"] > 0
    assert backlog["estimatedDrainS"] == round(backlog["readsWaiting"] / READ_RPS, 1)
    assert body["segments"][0]["validation"]["reads"] == 0
    code, out, _ = await segmapd("status", last, *admin_args(daemon), env=cli_env)
    assert code == 0
    assert "memberships wait for a read" in out and "waiting is not a failure" in out
    async with http.get(f"{daemon.url}/metrics") as r:
        metrics = await r.text()
    assert gauge(metrics, 'segmapd_validation_reads_waiting{lane="live"}') > 0
    assert gauge(metrics, 'segmapd_validation_read_backlog_seconds{lane="live"}') >= 0

    # Every pair waited past the deadline for its first read, and none failed.
    for i in range(PAIRS):
        await daemon.wait_states(http, f"{400000000000 + i}", {"active", "failed"}, 30)
    _, listed = await daemon.dead_letters(http)
    assert listed["deadLetters"] == []
    status, body = await daemon.contact(http, last)
    assert "validation" not in body and "validation" not in body["segments"][0]
    counters = await emulator.counters()
    assert counters["rate_limited"]["read"] == 0
    assert sum(counters["requests"]["read"].values()) <= PAIRS * 1.2
