"""sd_notify against a real unix datagram socket, path-bound and abstract."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.sdnotify import SdNotifier, watchdog_loop


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in tmp_path standing in for systemd; yields (socket, address)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def pending(sock: socket.socket) -> list[str]:
    """Every datagram already queued, without waiting."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return messages


def test_messages_reach_a_path_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = SdNotifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled

    assert notifier.ready()
    assert receive(sock) == "READY=1"
    assert notifier.status("replaying journal\n12 pending")
    assert receive(sock) == "STATUS=replaying journal 12 pending"
    assert notifier.stopping("draining")
    assert receive(sock) == "STOPPING=1\nSTATUS=draining"
    assert notifier.watchdog()
    assert receive(sock) == "WATCHDOG=1"
    assert notifier.notify(READY=1, status="up")
    assert receive(sock) == "READY=1\nSTATUS=up"
    assert notifier.extend_timeout(1.5)
    assert receive(sock) == "EXTEND_TIMEOUT_USEC=1500000"
    notifier.close()
    notifier.close()  # idempotent


def test_messages_reach_an_abstract_socket() -> None:
    name = f"segmapd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        notifier = SdNotifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert receive(sock) == "READY=1"
        notifier.close()


def test_no_socket_means_no_op() -> None:
    notifier = SdNotifier.from_environment({})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert not notifier.watchdog()
    assert not notifier.notify(READY=1)


def test_unsupported_socket_kind_is_disabled(caplog: pytest.LogCaptureFixture) -> None:
    notifier = SdNotifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "not a unix socket path" in caplog.text


def test_missing_socket_does_not_raise_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SdNotifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.DEBUG, logger="daemon.sdnotify"):
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "gone.sock" in warnings[0].getMessage()


def test_recovers_when_the_socket_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.sdnotify")
    path = tmp_path / "late.sock"
    notifier = SdNotifier.from_environment({"NOTIFY_SOCKET": str(path)})
    assert not notifier.ready()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2.0)
        assert notifier.watchdog()
        assert receive(sock) == "WATCHDOG=1"
    notifier.close()
    assert "works again" in caplog.text


def test_full_queue_does_not_block(receiver: tuple[socket.socket, str]) -> None:
    _, path = receiver
    notifier = SdNotifier.from_environment({"NOTIFY_SOCKET": path})
    # Nobody reads: the receive queue fills, and sends fail fast instead of blocking.
    results = [notifier.status("x" * 1024) for _ in range(10_000)]
    assert results[0]
    assert not all(results)
    notifier.close()


def test_invalid_fields_are_programming_errors(receiver: tuple[socket.socket, str]) -> None:
    notifier = SdNotifier.from_environment({"NOTIFY_SOCKET": receiver[1]})
    with pytest.raises(ValueError, match="field name"):
        notifier.notify(**{"BAD KEY": 1})
    with pytest.raises(ValueError, match="newline"):
        notifier.notify(STATUS="two\nlines")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(extra: dict[str, str], expected: float | None) -> None:
    notifier = SdNotifier.from_environment({"NOTIFY_SOCKET": "/run/nowhere", **extra})
    assert notifier.watchdog_interval_s == expected


def test_no_watchdog_interval_without_a_socket() -> None:
    notifier = SdNotifier.from_environment({"WATCHDOG_USEC": "30000000"})
    assert notifier.watchdog_interval_s is None


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for `predicate()` without blocking the loop (the code under test runs on it)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.002)


async def test_watchdog_loop_pings_only_while_healthy(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    # WATCHDOG_USEC of 20 ms: a ping every 10 ms.
    notifier = SdNotifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    assert notifier.watchdog_interval_s == 0.01
    state = {"healthy": True, "checks": 0}

    def healthy() -> bool:
        state["checks"] += 1
        return bool(state["healthy"])

    received: list[str] = []

    def three_pings() -> bool:
        received.extend(pending(sock))
        return len(received) >= 3

    task = asyncio.create_task(watchdog_loop(notifier, healthy))
    try:
        await until(three_pings)
        assert set(received) == {"WATCHDOG=1"}

        # Counting health checks instead of sleeping keeps this exact on a slow machine: once a
        # check has said "unhealthy", no ping may follow until one says "healthy" again.
        state["healthy"] = False
        checks = state["checks"]
        await until(lambda: state["checks"] > checks)
        pending(sock)  # a ping from the last healthy iteration may still be queued
        await until(lambda: state["checks"] > checks + 3)
        assert pending(sock) == []

        state["healthy"] = True
        await until(lambda: bool(pending(sock)))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        notifier.close()


async def test_watchdog_loop_treats_a_raising_check_as_unhealthy(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = receiver
    notifier = SdNotifier.from_environment({"NOTIFY_SOCKET": path})
    calls = 0

    def broken() -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("engine gone")

    task = asyncio.create_task(watchdog_loop(notifier, broken, interval_s=0.01))
    try:
        await until(lambda: calls >= 3)
        assert pending(sock) == []
        assert "engine gone" in caplog.text
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        notifier.close()


async def test_watchdog_loop_returns_without_a_watchdog(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    with_socket = SdNotifier.from_environment({"NOTIFY_SOCKET": path})
    await asyncio.wait_for(watchdog_loop(with_socket, lambda: True), timeout=1)
    without_socket = SdNotifier.from_environment({"WATCHDOG_USEC": "20000"})
    await asyncio.wait_for(watchdog_loop(without_socket, lambda: True), timeout=1)
    assert pending(sock) == []
