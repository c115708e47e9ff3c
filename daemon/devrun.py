"""`make run`: the emulator (and the daemon, once it exists) on loopback, for trying segmapd out."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

DEFAULT_CREDENTIALS = {
    "client id": "segmapd",
    "client secret": "segmapd-secret",
    "access key id": "emulator-key",
    "access key secret": "emulator-secret=",
}


def _start_emulator(port: int) -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "emulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    for raw in process.stdout:
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "listening":
            return process, str(event["url"])
    raise SystemExit(f"the emulator exited ({process.wait()}) before it was listening")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Start the emulator on loopback, say how to reach it, and run until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--emulator-port", type=int, default=8081)
    parser.add_argument("--daemon-port", type=int, default=8080)
    args = parser.parse_args(argv)

    # SIGTERM (a supervisor, `timeout`) must clean up like Ctrl-C does: no orphaned children.
    signal.signal(signal.SIGTERM, _interrupt)
    emulator, url = _start_emulator(args.emulator_port)
    creds = "\n".join(f"    {name:<18} {value}" for name, value in DEFAULT_CREDENTIALS.items())
    print(
        f"""
CXone emulator listening on {url}
  OpenID discovery:  {url}/.well-known/openid-configuration
  counters:          {url}/_emulator/counters
  credentials (password grant):
{creds}

Try it:
  TOKEN=$(curl -s -u segmapd:segmapd-secret -d grant_type=password \\
      --data-urlencode username=emulator-key --data-urlencode 'password=emulator-secret=' \\
      {url}/auth/token | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s -H "Authorization: Bearer $TOKEN" -H 'Accept: application/json' \\
      -H 'Content-Type: application/json' -d '["100000000123", "100000000124"]' \\
      {url}/api/v2/segments/VIP/contacts

Ctrl-C stops everything.""",
        flush=True,
    )
    try:
        return emulator.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if emulator.poll() is None:
            emulator.send_signal(signal.SIGTERM)
            emulator.wait(timeout=10)
        if emulator.stdout is not None:
            emulator.stdout.close()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
