"""`make run`: the printed commands work as printed, and stopping it stops everything, in order.

The printed commands and a port conflict are checked through `make run` itself (the repository's
Makefile, in a scratch directory whose `.venv` is this test run's virtual environment); the
stopping tests start `daemon.devrun`, what the make target runs, directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
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
REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
VENV = Path(sys.prefix)


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
    """The test's environment, without SEGMAPD_ settings and without the venv on PATH."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != VENV / "bin"]
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("SEGMAPD_")},
        "PATH": os.pathsep.join(path),
    }


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A directory `make run` can run in as in a checkout: its `.venv` is this test's venv.

    `make -o` (below) keeps make from reinstalling it; `.run/` is written here, never in the
    repository.
    """
    assert (VENV / "bin" / "activate").is_file(), "the tests run in the project's .venv"
    (tmp_path / ".venv").symlink_to(VENV, target_is_directory=True)
    return tmp_path


def make_run_argv(*variables: str) -> list[str]:
    """`make run` with the repository's Makefile, taking the venv as installed."""
    makefile = REPO_ROOT / "Makefile"
    return ["make", "-f", str(makefile), "-o", ".venv/.installed-stamp", "run", *variables]


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


async def in_shell(setup: str, command: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """`command` pasted into a POSIX shell after `setup`, as a user in another terminal would."""
    return await run(shlex.join(["sh", "-c", f"{setup} && {command}"]), cwd, env)


async def test_make_run_prints_the_readmes_commands_and_they_end_active(
    checkout: Path, env: dict[str, str], make_run: list[ProcessTree]
):
    argv = make_run_argv(f"EMULATOR_PORT={free_port()}", f"DAEMON_PORT={free_port()}")
    _, text = start(make_run, argv, checkout, env)
    # The line that puts segmapd on PATH, as the README's Quick start says it.
    activate = re.search(r"^  (\. \S+activate)$", text, re.MULTILINE)
    assert activate, text
    assert activate.group(1) == ". .venv/bin/activate"
    quick_start = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert activate.group(1) in quick_start
    # The two commands, joined across their backslash-continued lines: `segmapd`, as the
    # README writes it, not a path into .venv.
    joined = text.replace("\\\n", " ")
    send = re.search(r"^  (segmapd send-example .*)$", joined, re.MULTILINE)
    status = re.search(r"^  (segmapd status .*)$", joined, re.MULTILINE)
    assert send and status, text
    # Not on PATH before the setup line (the env fixture keeps the venv off PATH).
    code, out = await run(shlex.join(["sh", "-c", "command -v segmapd"]), checkout, env)
    assert code != 0, out
    code, out = await in_shell(activate.group(1), send.group(1), checkout, env)
    assert code == 0 and "HTTP 202" in out, out
    # The emulator stalls 2% of writes until a refresh, which segmapd asks for once the
    # validation window (30 s) has passed: allow for that, not only for the usual seconds.
    end = time.monotonic() + 60
    while True:
        code, out = await in_shell(activate.group(1), status.group(1), checkout, env)
        if code == 0 and out.count("active") == 3:
            break
        assert time.monotonic() < end, out
        await asyncio.sleep(0.5)
    assert all(segment in out for segment in ("VIP", "Spanish", "ChurnRisk"))


def test_a_second_make_run_in_the_same_checkout_leaves_the_first_ones_journal_alone(
    checkout: Path, env: dict[str, str], make_run: list[ProcessTree]
):
    first = make_run_argv(f"EMULATOR_PORT={free_port()}", f"DAEMON_PORT={free_port()}")
    start(make_run, first, checkout, env)
    journal = checkout / ".run" / "journal.db"
    assert journal.is_file()
    inode = journal.stat().st_ino
    second = subprocess.run(
        make_run_argv(f"EMULATOR_PORT={free_port()}", f"DAEMON_PORT={free_port()}"),
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode != 0
    assert "Another `make run` in this checkout is using .run/" in second.stderr, second.stderr
    assert journal.stat().st_ino == inode  # the first one's journal, untouched


@pytest.mark.parametrize(
    "taken", [["DAEMON_PORT"], ["EMULATOR_PORT"], ["EMULATOR_PORT", "DAEMON_PORT"]]
)
def test_a_port_in_use_is_the_last_thing_said_with_the_variable_that_moves_it(
    checkout: Path, env: dict[str, str], taken: list[str]
):
    ports = {"EMULATOR_PORT": free_port(), "DAEMON_PORT": free_port()}
    with contextlib.ExitStack() as holders:
        for variable in taken:  # another program listening there
            holder = holders.enter_context(socket.socket())
            holder.bind(("127.0.0.1", ports[variable]))
            holder.listen()
        result = subprocess.run(
            make_run_argv(*(f"{k}={v}" for k, v in ports.items())),
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode != 0
    # Make closes with its own line about the failed recipe ("make: *** ...", or
    # "make[1]: *** ..." under `make test`); what segmapd says comes before.
    said = [
        line
        for line in result.stderr.splitlines()
        if not re.match(r"make(\[\d+\])?: \*\*\* ", line)
    ]
    assert said, result.stderr
    cause, suggestion = said[0], said[-1]
    for variable in taken:
        assert str(ports[variable]) in cause, result.stderr
    assert "in use" in cause, result.stderr
    assert re.fullmatch(r"  make run( [A-Z_]+=\d+)+", suggestion), result.stderr
    moved = dict(item.split("=") for item in suggestion.split()[2:])
    assert set(moved) == set(taken), suggestion
    # Nothing was started, and the journal of a `make run` that holds the ports is untouched.
    assert not (checkout / ".run").exists()
    assert "before it was listening" not in result.stderr, result.stderr
    assert "drain" not in result.stderr, result.stderr


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
    activate = re.search(r"^  (\. \S+activate)$", text, re.MULTILINE)
    send = re.search(r"^  (segmapd send-example .*)$", joined, re.MULTILINE)
    token = re.search(r"--token=(\S+)", joined)
    daemon_url = re.search(r"segmapd listening on (\S+)", joined)
    emulator_url = re.search(r"CXone emulator on\s+(\S+)", joined)
    assert activate and send and token and daemon_url and emulator_url, text
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
        code, out = await in_shell(activate.group(1), send.group(1), tmp_path, env)
        assert code == 0, out
        await reach(CONTACT, {"verifying"})
        await emulator.configure({"faults": {"bulk": {"latency_ms": 2500}}})
        other = send.group(1).replace(CONTACT, "100000000456")
        code, out = await in_shell(activate.group(1), other, tmp_path, env)
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
