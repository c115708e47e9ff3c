"""`make run`: the printed commands work as printed, and stopping it stops everything, in order."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.emulator import EmulatorControl
from tests.support.processes import ProcessId, ProcessTree

CONTACT = "100000000123"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def run(command: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *shlex.split(command),
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


def devrun_argv() -> list[str]:
    return [
        sys.executable,
        "-m",
        "daemon.devrun",
        "--emulator-port",
        str(free_port()),
        "--daemon-port",
        str(free_port()),
    ]


# A background job of a non-interactive shell starts with SIGINT ignored; exec keeps that.
IGNORING_SIGINT = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.executable, sys.argv[1:])",
]


@pytest.fixture
def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SEGMAPD_")}


@pytest.fixture
def make_run(tmp_path: Path, env: dict[str, str]) -> Iterator[list[ProcessTree]]:
    """Trees started by the test; each is stopped, with every descendant, whatever happens."""
    trees: list[ProcessTree] = []
    yield trees
    for tree in trees:
        tree.stop()
        assert not tree.survivors(), f"left running: {tree.survivors()}"


def start(trees: list[ProcessTree], argv: list[str], cwd: Path, env: dict[str, str], **kw: Any):
    tree = ProcessTree(argv, cwd=cwd, env=env, **kw)
    trees.append(tree)
    tree.start()
    return tree, tree.read_until("Ctrl-C", 30)


def children_by_name(tree: ProcessTree) -> dict[str, ProcessId]:
    """The emulator and segmapd processes `make run` started, by the command they run."""
    found = {}
    for process in tree.track():
        argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        if b"emulator" in argv:
            found["emulator"] = process
        elif b"run" in argv:
            found["segmapd"] = process
    assert set(found) == {"emulator", "segmapd"}, tree.known
    return found


async def test_make_run_prints_commands_that_end_active(
    tmp_path: Path, env: dict[str, str], make_run: list[ProcessTree]
):
    _, text = start(make_run, devrun_argv(), tmp_path, env)
    # The two commands, joined across their backslash-continued lines.
    joined = text.replace("\\\n", " ")
    send = re.search(r"^\s*(\S*segmapd send-example .*)$", joined, re.MULTILINE)
    status = re.search(r"^\s*(\S*segmapd status .*)$", joined, re.MULTILINE)
    assert send and status, text
    code, out = await run(send.group(1), tmp_path, env)
    assert code == 0 and "HTTP 202" in out, out
    # The emulator stalls 2% of writes until a refresh, which segmapd asks for once the
    # validation window (30 s) has passed: allow for that, not only for the usual seconds.
    end = time.monotonic() + 60
    while True:
        code, out = await run(status.group(1), tmp_path, env)
        if code == 0 and out.count("active") == 3:
            break
        assert time.monotonic() < end, out
        await asyncio.sleep(0.5)
    assert all(segment in out for segment in ("VIP", "Spanish", "ChurnRisk"))


async def test_sigint_stops_every_child_even_when_sigint_was_ignored_at_start(
    tmp_path: Path, env: dict[str, str], make_run: list[ProcessTree]
):
    tree, _ = start(make_run, IGNORING_SIGINT + devrun_argv(), tmp_path, env)
    children = children_by_name(tree)
    assert tree.proc is not None
    tree.proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(tree.wait, 30) == 0
    assert not [name for name, p in children.items() if p.alive()]


async def test_ctrl_c_drains_segmapd_before_the_emulator_stops(
    tmp_path: Path, env: dict[str, str], make_run: list[ProcessTree]
):
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        tree, text = start(make_run, devrun_argv(), tmp_path, env, stderr=log)
    joined = text.replace("\\\n", " ")
    send = re.search(r"^\s*(\S*segmapd send-example .*)$", joined, re.MULTILINE)
    token = re.search(r"--token=(\S+)", joined)
    daemon_url = re.search(r"segmapd listening on (\S+)", joined)
    emulator_url = re.search(r"CXone emulator on\s+(\S+)", joined)
    assert send and token and daemon_url and emulator_url, text
    children = children_by_name(tree)
    admin = {"Authorization": f"Bearer {token.group(1)}"}

    async with aiohttp.ClientSession() as http:

        async def states(contact_id: str) -> set[str]:
            url = f"{daemon_url.group(1)}/v1/contacts/{contact_id}"
            async with http.get(url, headers=admin) as response:
                body = await response.json()
            return {s["state"] for s in body.get("segments", [])}

        async def reach(contact_id: str, want: set[str]) -> None:
            deadline = time.monotonic() + 20
            while not (found := await states(contact_id)) or not found <= want:
                assert time.monotonic() < deadline, found
                await asyncio.sleep(0.1)

        emulator = EmulatorControl(emulator_url.group(1), http)
        # At Ctrl-C the poller is reading (indexing takes minutes) and a write is in flight.
        await emulator.configure({"indexing": {"median_s": 120, "p99_s": 240}})
        code, out = await run(send.group(1), tmp_path, env)
        assert code == 0, out
        await reach(CONTACT, {"verifying"})
        await emulator.configure({"faults": {"bulk": {"latency_ms": 2500}}})
        code, out = await run(send.group(1).replace(CONTACT, "100000000456"), tmp_path, env)
        assert code == 0, out
        await reach("100000000456", {"sending"})

    # What the terminal does on Ctrl-C: SIGINT to every process of the foreground group.
    assert tree.proc is not None
    os.killpg(tree.proc.pid, signal.SIGINT)
    order: list[str] = []
    deadline = time.monotonic() + 60
    while len(order) < 2 and time.monotonic() < deadline:
        order += [n for n, p in children.items() if n not in order and not p.alive()]
        await asyncio.sleep(0.02)
    assert await asyncio.to_thread(tree.wait, 30) == 0
    assert order == ["segmapd", "emulator"]
    daemon_log = log_path.read_text()
    assert "drain complete" in daemon_log, daemon_log
    failed_reads = [line for line in daemon_log.splitlines() if "membership read" in line]
    assert not failed_reads, failed_reads


async def test_children_stop_when_make_run_itself_is_killed(
    tmp_path: Path, env: dict[str, str], make_run: list[ProcessTree]
):
    tree, _ = start(make_run, devrun_argv(), tmp_path, env)
    children = children_by_name(tree)
    assert tree.proc is not None
    tree.proc.kill()  # no chance to clean up: the kernel must tell the children
    deadline = time.monotonic() + 30
    while any(p.alive() for p in children.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not [name for name, p in children.items() if p.alive()]


async def test_everything_stops_when_the_parent_of_make_run_is_killed(
    tmp_path: Path, env: dict[str, str], make_run: list[ProcessTree]
):
    # `make run` is a child of make; SIGKILL make (here a shell that forks, as make does) and
    # devrun must still stop both children, in order, and exit.
    shell = ["sh", "-c", shlex.join(devrun_argv()) + "; true"]
    tree, _ = start(make_run, shell, tmp_path, env)
    everything = tree.track()
    assert len(everything) >= 3  # devrun, the emulator and segmapd
    assert tree.proc is not None
    tree.proc.kill()
    deadline = time.monotonic() + 40
    while any(p.alive() for p in everything) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not [p for p in everything if p.alive()]
