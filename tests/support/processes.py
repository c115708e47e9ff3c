"""Start the project's real processes (emulator, daemon) on loopback for tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[2]


class ManagedProcess:
    """A child process that announces its URL with a JSON `listening` line on stdout."""

    def __init__(
        self, argv: list[str], *, env: dict[str, str] | None = None, log: Path | None = None
    ) -> None:
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        # Where its stderr (segmapd's JSON log) goes; the test's own stderr when None.
        self.log = log

    def start(self, timeout_s: float = 20.0) -> str:
        """Start the process and wait for its `listening` line; return the URL it serves."""
        log = open(self.log, "ab") if self.log is not None else None  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        finally:
            if log is not None:
                log.close()  # the child has its own descriptor
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        buffered = b""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.argv!r} exited with {self.proc.returncode} before listening"
                )
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if not ready:
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                try:
                    event: dict[str, Any] = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "listening":
                    self.url = str(event["url"])
                    return self.url
        self.kill()
        raise RuntimeError(f"{self.argv!r} did not report listening within {timeout_s} s")

    def signal(self, signum: int) -> None:
        """Send a signal to the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit and return its exit status."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL the process (a crash) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the process, wait for it, SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def emulator_process(config_path: str | None = None, seed: int | None = 1234) -> ManagedProcess:
    """An emulator process on a free loopback port (not started yet)."""
    argv = [sys.executable, "-m", "daemon.cli", "emulator", "--host", "127.0.0.1", "--port", "0"]
    if config_path is not None:
        argv += ["--config", config_path]
    if seed is not None:
        argv += ["--seed", str(seed)]
    return ManagedProcess(argv)


# ---- process trees (`make run` and its children) --------------------------------------------


@dataclass(frozen=True)
class ProcessId:
    """A process by pid and start time, so that a reused pid is never taken for it."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        """The process now running as `pid`, if any."""
        stat = _stat(pid)
        return None if stat is None else cls(pid, stat[2])

    def alive(self) -> bool:
        """Whether it still runs (a zombie waiting to be reaped has stopped)."""
        stat = _stat(self.pid)
        return stat is not None and stat[2] == self.started and stat[0] not in "ZX"

    def signal(self, signum: int) -> None:
        """Send a signal, unless it has already gone."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) from /proc/<pid>/stat; None once the pid is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may contain anything: split after the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid: int) -> list[ProcessId]:
    """Every running descendant of `pid`, children first (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] not in "ZX":
                parents.setdefault(stat[1], []).append(int(entry.name))
    found: list[ProcessId] = []
    queue = list(parents.get(pid, []))
    while queue:
        child = queue.pop(0)
        process = ProcessId.of(child)
        if process is not None:
            found.append(process)
        queue.extend(parents.get(child, []))
    return found


class ProcessTree:
    """A command in its own session and every process it starts; `stop()` ends them all.

    Its children may sit in sessions of their own (`make run` puts them there), so they are
    found by parentage, remembered by pid and start time, and stopped by pid: a signal to the
    command alone, or to its process group, could leave them running.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        cwd: Path,
        env: dict[str, str],
        stderr: IO[bytes] | None = None,
    ) -> None:
        self.argv = argv
        self.cwd = cwd
        self.env = env
        self.stderr = stderr
        self.proc: subprocess.Popen[bytes] | None = None
        self.known: dict[int, ProcessId] = {}
        self._buffered = b""

    def start(self) -> None:
        """Start the command in a new session (a signal to its group reaches no test runner)."""
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            start_new_session=True,
        )

    def track(self) -> list[ProcessId]:
        """Remember the descendants running now (to stop them later); return them."""
        assert self.proc is not None
        found = descendants(self.proc.pid)
        for process in found:
            self.known.setdefault(process.pid, process)
        return found

    def read_until(self, marker: str, timeout_s: float) -> str:
        """Stdout up to and including the line holding `marker`; fails past the timeout."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        wanted = marker.encode()
        while wanted not in self._buffered or b"\n" not in self._buffered.split(wanted, 1)[1]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} within {timeout_s} s: {self._buffered!r}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.2))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"stdout closed before {marker!r}: {self._buffered!r}")
                self._buffered += chunk
        end = self._buffered.index(b"\n", self._buffered.index(wanted)) + 1
        text, self._buffered = self._buffered[:end], self._buffered[end:]
        # What the command printed came after it started its children: remember them now, so
        # they are stopped (and checked) even if the command itself exits first.
        self.track()
        return text.decode()

    def wait(self, timeout_s: float) -> int | None:
        """The command's exit status, or None if it still runs after `timeout_s`."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def survivors(self) -> list[ProcessId]:
        """Tracked descendants still running."""
        return [p for p in self.known.values() if p.alive()]

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the command, then every descendant left; SIGKILL whatever outlasts a bound.

        Works whatever the signal dispositions the processes inherited (a background job
        ignores SIGINT): it relies on neither SIGINT nor the process group.
        """
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.track()
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(timeout_s) is None:
                self.track()
                self.proc.kill()
                self.proc.wait()
        left = self.survivors()
        for process in left:
            process.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = self.survivors()
        for process in left:
            process.signal(signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
