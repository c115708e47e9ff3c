"""`make run`: the printed commands work as printed, ending `active` in `segmapd status`."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import sys
import time
from pathlib import Path


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


async def test_make_run_prints_commands_that_end_active(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMAPD_")}
    devrun = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon.devrun",
        "--emulator-port",
        str(free_port()),
        "--daemon-port",
        str(free_port()),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    assert devrun.stdout is not None
    try:
        text = ""
        deadline = time.monotonic() + 30
        while "Ctrl-C" not in text and time.monotonic() < deadline:
            line = await asyncio.wait_for(devrun.stdout.readline(), 30)
            if not line:
                break
            text += line.decode()
        # The two commands, joined across their backslash-continued lines.
        joined = text.replace("\\\n", " ")
        send = re.search(r"^\s*(\S*segmapd send-example .*)$", joined, re.MULTILINE)
        status = re.search(r"^\s*(\S*segmapd status .*)$", joined, re.MULTILINE)
        assert send and status, text
        code, out = await run(send.group(1), tmp_path, env)
        assert code == 0 and "HTTP 202" in out, out
        end = time.monotonic() + 30
        while True:
            code, out = await run(status.group(1), tmp_path, env)
            if code == 0 and out.count("active") == 3:
                break
            assert time.monotonic() < end, out
            await asyncio.sleep(0.5)
        assert all(segment in out for segment in ("VIP", "Spanish", "ChurnRisk"))
    finally:
        if devrun.returncode is None:
            devrun.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(devrun.wait(), 30)
            except TimeoutError:
                devrun.kill()
                await devrun.wait()
