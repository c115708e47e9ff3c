"""Start the project's real processes (emulator, daemon) on loopback for tests and benchmarks."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


class ManagedProcess:
    """A child process that announces its URL with a JSON `listening` line on stdout."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 20.0) -> str:
        """Start the process and wait for its `listening` line; return the URL it serves."""
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=None,
        )
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
