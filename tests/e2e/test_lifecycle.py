"""Process lifecycle: draining on SIGTERM, sd_notify over a real datagram socket."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.runner import HttpListener
from daemon.service import CannotListen, Service
from scheduler.store import StoreUnavailable
from tests.e2e.conftest import StartDaemon, in_process_config
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


# ---- open `?wait=` requests at shutdown ------------------------------------------------------

# Indexing that takes minutes and a validation window that never asks for a refresh during the
# test: the assignments stay `verifying`, so every `?wait=` request is still open at SIGTERM.
SLOW_INDEXING = {"indexing": {"median_s": 120.0, "p99_s": 240.0, "stall_fraction": 0.0}}
NO_REFRESH = {"window_s": 600.0, "deadline_s": 1200.0}


@pytest.mark.parametrize("wait_s", [300, 25])
async def test_sigterm_answers_open_waits_at_once_then_exits_0_and_keeps_the_work(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession, wait_s
):
    await emulator.configure(SLOW_INDEXING)
    daemon = await start_daemon(validation=NO_REFRESH)
    requests: list[list[dict[str, Any]]] = [
        [{"contactId": f"w{n}", "segmentIds": ["A", "B"]}] for n in range(3)
    ] + [[{"contactId": "w3", "segmentIds": ["A"]}, {"contactId": "w4", "segmentIds": ["B"]}]]
    contacts: dict[str, list[str]] = {e["contactId"]: e["segmentIds"] for r in requests for e in r}
    waits = [asyncio.create_task(daemon.mappings(http, r, f"?wait={wait_s:g}")) for r in requests]
    try:
        # Written and waiting for indexing: what a caller of ?wait= usually waits for.
        for contact_id in contacts:
            await daemon.wait_states(http, contact_id, {"verifying"}, timeout_s=15)
        assert not any(w.done() for w in waits)
        daemon.process.signal(signal.SIGTERM)
        # Bounded well below systemd's TimeoutStopSec=45 (and far below aiohttp's 2 x 60 s).
        answers = await asyncio.wait_for(asyncio.gather(*waits), 20)
        code = await asyncio.to_thread(daemon.process.wait, 20)
    finally:
        for w in waits:
            w.cancel()
    assert code == 0
    for request, (status, body) in zip(requests, answers, strict=True):
        assert status == 202, body
        assert body["complete"] is False
        assert [r["contactId"] for r in body["results"]] == [e["contactId"] for e in request]
        for event, result in zip(request, body["results"], strict=True):
            states = {s["segmentId"]: s["state"] for s in result["segments"]}
            assert states == {s: "verifying" for s in event["segmentIds"]}, body

    # The journal kept the work: after a restart (now allowed to refresh) it all ends active.
    text = daemon.config.read_text()
    assert "window_s = 600.0" in text
    daemon.config.write_text(text.replace("window_s = 600.0", "window_s = 1.0"))
    daemon.restart()
    for contact_id, segments in contacts.items():
        states = await daemon.wait_states(http, contact_id, {"active"}, timeout_s=30)
        assert set(states) == set(segments)


async def test_drain_and_stop_are_idempotent(emulator: EmulatorControl, tmp_path: Path):
    config = in_process_config(emulator, tmp_path, "127.0.0.1:0")
    service = Service(config)
    listener = HttpListener(service, config)
    await service.start(listener)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{listener.url}/healthz") as response:
            assert response.status == 200
        # Concurrent and repeated calls all wait for the one drain; none fails.
        await asyncio.gather(service.drain(), service.drain(), service.stop())
        await service.drain()
        await service.stop()
        await listener.close()
        assert service.draining and not service.journal_failed
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(f"{listener.url}/healthz"):
                pass
    # The journal was closed: a second process may open it.
    reopened = Service(config)
    await reopened.start()
    await reopened.stop()


async def test_a_start_that_cannot_listen_undoes_what_had_started(
    emulator: EmulatorControl, tmp_path: Path
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = in_process_config(emulator, tmp_path, f"127.0.0.1:{port}")
        service = Service(config)
        with pytest.raises(CannotListen, match=f"127.0.0.1:{port}"):
            await service.start(HttpListener(service, config))
    # Stopped in reverse: intake refused, the client closed, the journal closed.
    assert service.draining
    with pytest.raises(RuntimeError, match="closed"):
        await service.client.start()
    with pytest.raises(StoreUnavailable, match="not open"):
        await service.store.flush()
    await service.drain()  # nothing left to undo
