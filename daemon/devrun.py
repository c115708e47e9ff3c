"""`make run`: the CXone emulator and segmapd on loopback, wired together, for trying it out."""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

RUN_DIR = Path(".run")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _start(
    argv: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a child that prints a JSON `listening` line; return it and its URL."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    assert process.stdout is not None
    for raw in process.stdout:
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "listening":
            return process, str(event["url"])
    raise SystemExit(f"{argv[3]} exited ({process.wait()}) before it was listening")


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
    # SIGTERM (a supervisor, `timeout`) must clean up like Ctrl-C does: no orphaned children.
    signal.signal(signal.SIGTERM, _interrupt)

    python = sys.executable
    children: list[subprocess.Popen[bytes]] = []
    try:
        emulator, emulator_url = _start(
            [python, "-m", "daemon.cli", "emulator", "--port", str(args.emulator_port)]
        )
        children.append(emulator)
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
        daemon, daemon_url = _start(
            [python, "-m", "daemon.cli", "run", "--config", str(config_path)], env=env
        )
        children.append(daemon)
        segmapd = Path(python).with_name("segmapd")
        print(
            f"""
segmapd listening on {daemon_url}   (config: {config_path})
CXone emulator on    {emulator_url}   (counters: {emulator_url}/_emulator/counters)

Send a signed webhook, as a CRM would:
  {segmapd} send-example --url {daemon_url} --source crm \\
      --secret '{webhook_secret}' --contact 100000000123 VIP Spanish ChurnRisk

Watch it become active (CXone indexes writes in a few seconds):
  {segmapd} status 100000000123 --url {daemon_url} --token={admin_token}

Probes and metrics: {daemon_url}/readyz  {daemon_url}/metrics
Ctrl-C stops both.""",
            flush=True,
        )
        return daemon.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
            if child.stdout is not None:
                child.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
