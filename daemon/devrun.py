"""`make run`: the CXone emulator and segmapd on loopback, wired together, for trying it out.

Both ports are checked before anything starts: a port already taken is the usual reason for
`make run` to fail, and it is said last, with the make variable that moves it. The commands
printed are the README's (`segmapd ...`), after the line that puts the virtual environment's
`segmapd` on PATH.

Stopping (Ctrl-C, SIGTERM, or the end of either child): segmapd drains first, while the emulator
still answers, then the emulator stops. Ctrl-C reaches every process of the terminal's
foreground group at once, so each child runs in its own session and hears only from this
process; and a child dies with this process if it is killed outright (Linux), so none is ever
left running.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import ctypes.util
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

RUN_DIR = Path(".run")
# segmapd drains within server.drain_budget_s (20 s by default) plus its store close.
DAEMON_STOP_TIMEOUT_S = 40.0
EMULATOR_STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
LOOPBACK = "127.0.0.1"


class StartFailed(Exception):
    """A child exited before it was listening; the message says which, and how it ended."""

    def __init__(self, name: str, code: int) -> None:
        super().__init__(f"{name} exited ({code}) before it was listening")
        self.name = name


class _Children:
    """The processes started so far, stopped newest first: segmapd before the emulator."""

    def __init__(self) -> None:
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopping = False

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Start a child that prints a JSON `listening` line; return it and its URL."""
        # Held off until the child is recorded, so that a Ctrl-C never leaves one unknown.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            process = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                env=env,
                # Not in the terminal's process group: Ctrl-C is ours to turn into an ordered
                # stop, segmapd first.
                start_new_session=True,
                preexec_fn=_child_setup(os.getpid()),  # noqa: PLW1509 - one thread here
            )
            self.processes.append((name, process))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        assert process.stdout is not None
        for raw in process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "listening":
                return process, str(event["url"])
        raise StartFailed(name, process.wait())

    def stop(self) -> None:
        """SIGTERM each child, newest first, and wait for it to exit; SIGKILL past its bound."""
        self.stopping = True
        for name, process in reversed(self.processes):
            if process.poll() is None:
                print(f"stopping {name} (pid {process.pid})", file=sys.stderr, flush=True)
                process.send_signal(signal.SIGTERM)
                timeout = DAEMON_STOP_TIMEOUT_S if name == "segmapd" else EMULATOR_STOP_TIMEOUT_S
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop in {timeout:g} s: killing it", file=sys.stderr)
                    process.kill()
                    process.wait()
                print(f"{name} stopped ({process.returncode})", file=sys.stderr, flush=True)
            if process.stdout is not None:
                process.stdout.close()

    def kill(self) -> None:
        """SIGKILL every child still running (a second Ctrl-C: the user will not wait)."""
        for _, process in self.processes:
            if process.poll() is None:
                process.kill()


def _child_setup(parent: int) -> Callable[[], None]:
    """The child's pre-exec hook: stop signals unblocked, and a SIGTERM when `parent` dies.

    The signal mask survives exec, so the block held while starting must be lifted here. A
    child in its own session outlives a parent that is SIGKILLed; on Linux the kernel is asked
    to SIGTERM it then, so that it stops (segmapd drains) instead of running on unseen.
    """
    prctl = None
    if sys.platform.startswith("linux"):
        prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl

    def hook() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the request was made
                os.kill(os.getpid(), signal.SIGTERM)

    return hook


def run_dir_in_use() -> str | None:
    """Why this checkout's `.run/` cannot be used now, if another `make run` is using it.

    Each run starts with an empty journal in `.run/`: removing it under a segmapd that still
    runs (another `make run` in this checkout, on other ports) would take that one's journal.
    """
    from daemon.store.base import StoreOpenError
    from daemon.store.sqlite import JournalLock

    lock = JournalLock(str((RUN_DIR / "journal.db").resolve()))
    try:
        lock.acquire()
    except StoreOpenError as exc:
        return (
            f"make run: {exc}\n"
            "Another `make run` in this checkout is using .run/: stop it (Ctrl-C there) first."
        )
    lock.release()
    return None


def _stop_with_parent() -> None:
    """On Linux, have the kernel send this process SIGTERM when its parent (make) dies.

    Killing `make` alone would otherwise leave this process, and with it both children, running
    unseen; SIGTERM makes it stop them in order, as Ctrl-C does.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _until_one_exits(processes: dict[str, subprocess.Popen[bytes]]) -> int:
    """Wait until either child exits; its status (an emulator that stopped is a failure)."""
    while True:
        for name, process in processes.items():
            code = process.poll()
            if code is not None:
                print(f"{name} exited ({code}); stopping", file=sys.stderr, flush=True)
                return code if name == "segmapd" else (code or 1)
        time.sleep(0.2)


def _install_signal_handlers(children: _Children) -> None:
    """Ctrl-C and SIGTERM stop in order; a second one kills the children at once.

    Installed explicitly, whatever was inherited: a background job starts with SIGINT ignored,
    and this process would then never stop for it. Handled signals are reset to their default
    in a child at exec, so the children start with SIGINT and SIGTERM at their defaults too.
    """

    def handle(signum: int, frame: FrameType | None) -> None:
        if not children.stopping:
            children.stopping = True
            raise KeyboardInterrupt
        print(f"{signal.Signals(signum).name} again: killing the children", file=sys.stderr)
        children.kill()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)


@dataclass(frozen=True)
class Port:
    """A port `make run` binds on loopback: the child that binds it, and the make variable."""

    child: str
    owner: str
    number: int
    variable: str


def bind_error(port: int) -> OSError | None:
    """Why `LOOPBACK:port` cannot be bound now, or None if it can.

    Bound as the servers bind it (SO_REUSEADDR, which asyncio sets on POSIX): a port held only
    by connections in TIME_WAIT is free for them, and so it is here.
    """
    if port == 0:
        return None  # any free port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError as exc:
            return exc
    return None


def _free_port_near(port: int, avoid: set[int]) -> int:
    """A port to suggest instead of `port`: `port + 10000` when it is free, else any free one."""
    near = port + 10000
    if near <= 65535 and near not in avoid and bind_error(near) is None:
        return near
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((LOOPBACK, 0))
            found = int(probe.getsockname()[1])
        if found not in avoid:
            return found


def ports_in_use(ports: Sequence[Port]) -> str | None:
    """What to tell the user when some of `ports` are taken (None if all are free).

    Says which ports, held by what, how to find the holder, and the `make run` line that moves
    the taken ones to free ports, ready to paste.
    """
    taken = [(port, error) for port in ports if (error := bind_error(port.number)) is not None]
    if not taken:
        return None
    chosen = {port.number for port in ports}
    moves = []
    for port, _ in taken:
        instead = _free_port_near(port.number, chosen)
        chosen.add(instead)
        moves.append(f"{port.variable}={instead}")
    what = " and ".join(f"{port.number} ({port.owner})" for port, _ in taken)
    reason = taken[0][1].strerror or str(taken[0][1])
    sport = " or ".join(f"sport = :{port.number}" for port, _ in taken)
    return (
        f"make run: port{'s' if len(taken) > 1 else ''} {what} on {LOOPBACK}: {reason}.\n"
        f"Another process listens there (another `make run`?): `ss -ltnp '{sport}'` shows "
        "which.\n"
        "Stop it, or choose free ports:\n"
        f"  make run {' '.join(moves)}"
    )


def path_setup(python: Path, cwd: Path) -> tuple[str | None, str]:
    """The line that puts `segmapd` on PATH (None if it is already there) and the command name.

    In a virtual environment (`make run` makes `.venv`) that is its `activate` script, shown
    relative to `cwd` when it lies below it, as the README's Quick start says it:
    `. .venv/bin/activate`. Elsewhere, the script's full path, unless PATH already finds it.
    """
    script = python.with_name("segmapd")
    activate = python.with_name("activate")
    if activate.is_file():
        try:
            shown = str(activate.relative_to(cwd))
        except ValueError:
            shown = str(activate)
        return f". {shlex.quote(shown)}", "segmapd"
    found = shutil.which("segmapd")
    if found is not None and Path(found).resolve() == script.resolve():
        return None, "segmapd"
    return None, shlex.quote(str(script))


def _config(
    emulator_url: str, port: int, webhook_secret: str, admin_token: str, journal: Path
) -> str:
    return f"""# Written by `make run`: segmapd against the local CXone emulator.
[server]
listen = "127.0.0.1:{port}"
admin_tokens = ["{admin_token}"]

[cxone]
issuer = "{emulator_url}"
grant = "password"
client_id = "segmapd"
client_secret = "segmapd-secret"
access_key_id = "emulator-key"
access_key_secret = "emulator-secret="

[store]
url = "sqlite://{journal}"

[sources.crm]
kind = "standard"
secret = "{webhook_secret}"
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Start emulator and daemon on loopback, say how to use them, run until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--emulator-port", type=int, default=8081)
    parser.add_argument("--daemon-port", type=int, default=8080)
    args = parser.parse_args(argv)
    children = _Children()
    _install_signal_handlers(children)
    _stop_with_parent()

    ports = [
        Port("emulator", "the CXone emulator", args.emulator_port, "EMULATOR_PORT"),
        Port("segmapd", "segmapd", args.daemon_port, "DAEMON_PORT"),
    ]
    # Before anything starts (and before the last run's journal is removed): nothing to stop,
    # and the reason is the last thing printed.
    problem = ports_in_use(ports) or run_dir_in_use()
    if problem is not None:
        print(problem, file=sys.stderr, flush=True)
        return 1
    python = sys.executable
    try:
        emulator, emulator_url = children.start(
            "emulator", [python, "-m", "daemon.cli", "emulator", "--port", str(args.emulator_port)]
        )
        RUN_DIR.mkdir(exist_ok=True)
        # The emulator forgets everything between runs, so the journal starts empty too.
        for leftover in RUN_DIR.glob("journal.db*"):
            leftover.unlink()
        # Fresh secrets per run: the config file is the only place they live.
        webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        # Printed as --token=VALUE: a URL-safe token may start with "-", which argparse
        # would take for an option if it stood alone.
        admin_token = secrets.token_urlsafe(18)
        config_path = RUN_DIR / "segmapd.toml"
        # Created 0600 from the start: it holds the secrets.
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(
                _config(
                    emulator_url,
                    args.daemon_port,
                    webhook_secret,
                    admin_token,
                    (RUN_DIR / "journal.db").resolve(),
                )
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMAPD_")}
        daemon, daemon_url = children.start(
            "segmapd", [python, "-m", "daemon.cli", "run", "--config", str(config_path)], env=env
        )
        activate, segmapd = path_setup(Path(python), Path.cwd())
        setup = ""
        if activate is not None:
            where = "" if activate.startswith(". /") else ", from this directory"
            setup = f"""
In another terminal{where}, put segmapd on your PATH:
  {activate}
"""
        print(
            f"""
segmapd listening on {daemon_url}   (config: {config_path})
CXone emulator on    {emulator_url}   (counters: {emulator_url}/_emulator/counters)
{setup}
Send a signed webhook, as a CRM would:
  {segmapd} send-example --url {daemon_url} --source crm \\
      --secret '{webhook_secret}' --contact 100000000123 VIP Spanish ChurnRisk

Watch it become active (CXone indexes writes in a few seconds):
  {segmapd} status 100000000123 --url {daemon_url} --token={admin_token}

Probes and metrics: {daemon_url}/readyz  {daemon_url}/metrics
Ctrl-C stops both.""",
            flush=True,
        )
        return _until_one_exits({"segmapd": daemon, "emulator": emulator})
    except KeyboardInterrupt:
        return 0
    except StartFailed as failed:
        children.stop()
        # Said after the children's own lines (the drain of a segmapd that could not start):
        # a port taken since the check above is named; otherwise their last log line says why.
        print(
            ports_in_use([port for port in ports if port.child == failed.name])
            or f"make run: {failed}; its last log line above says why",
            file=sys.stderr,
            flush=True,
        )
        return 1
    finally:
        children.stop()


if __name__ == "__main__":
    sys.exit(main())
