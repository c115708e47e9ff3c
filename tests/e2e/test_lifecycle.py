"""Process lifecycle: draining on SIGTERM, sd_notify over a real datagram socket."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import aiohttp

from tests.e2e.conftest import StartDaemon
from tests.support.emulator import EmulatorControl


async def test_sigterm_under_load_writes_everything_accepted_then_exits_0(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    # Slow writes and a long linger: at SIGTERM most work is still buffered or in flight.
    await emulator.configure({"faults": {"bulk": {"latency_ms": 300}}})
    daemon = await start_daemon(batching={"linger_ms": 30000}, limits={"write_rps": 20.0})
    accepted: list[str] = []
    for batch in range(20):
        events = [{"contactId": f"c{batch}-{i}", "segmentIds": ["L1", "L2"]} for i in range(50)]
        status, _ = await daemon.webhook(http, events)
        assert status == 202
        accepted.extend(f"c{batch}-{i}" for i in range(50))
    daemon.process.signal(signal.SIGTERM)
    # While draining the listener stays up and refuses new work with 503.
    await asyncio.sleep(0.2)
    status, problem = await daemon.webhook(http, {"contactId": "late", "segmentIds": ["L1"]})
    assert status == 503 and "shutting down" in problem["message"]
    assert await asyncio.to_thread(daemon.process.wait, 30) == 0
    for segment in ("L1", "L2"):
        members = {m["contactId"] for m in await emulator.members(segment)}
        assert set(accepted) <= members


async def test_a_second_signal_exits_at_once(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    await emulator.configure({"faults": {"bulk": {"hang_rate": 1.0, "hang_s": 30}}})
    daemon = await start_daemon(cxone={"timeout_s": 20.0})
    await daemon.webhook(http, {"contactId": "c1", "segmentIds": ["H"]})
    await asyncio.sleep(0.5)  # the write hangs in flight
    daemon.process.signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    started = time.monotonic()
    daemon.process.signal(signal.SIGINT)
    code = await asyncio.to_thread(daemon.process.wait, 10)
    assert code != 0
    assert time.monotonic() - started < 5


async def test_sd_notify_ready_status_watchdog_and_stopping(
    start_daemon: StartDaemon, tmp_path: Path
):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        daemon = await start_daemon(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        messages: list[str] = []

        async def collect(until: str, timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    messages.append(sock.recv(4096).decode())
                except BlockingIOError:
                    await asyncio.sleep(0.05)
                    continue
                if any(until in m for m in messages):
                    return
            raise AssertionError(f"no {until!r} in {messages}")

        await collect("READY=1", 10)
        await collect("WATCHDOG=1", 5)
        await collect("STATUS=", 10)
        daemon.process.signal(signal.SIGTERM)
        await collect("STOPPING=1", 10)
        assert await asyncio.to_thread(daemon.process.wait, 20) == 0
    finally:
        sock.close()
