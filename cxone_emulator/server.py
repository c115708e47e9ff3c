"""Run the emulator as a process: bind, announce the URL on stdout, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from cxone_emulator.app import create_app
from cxone_emulator.config import ConfigError, EmulatorConfig, load_config

logger = logging.getLogger(__name__)

#: How long in-flight requests (a hang fault, say) may run on after a stop signal.
SHUTDOWN_TIMEOUT_S = 1.0
EXIT_OK = 0
EXIT_BIND_FAILED = 1
EXIT_BAD_CONFIG = 2


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # optional: not installed on Windows
    except ImportError:  # pragma: no cover
        return None
    return uvloop.new_event_loop


def _public_url(host: str, bound: tuple[str, int] | tuple[str, int, int, int]) -> str:
    address = bound[0]
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - recognising a wildcard, not binding one
        # A wildcard bind is reachable on loopback; the wildcard itself is not an address.
        address = "127.0.0.1"
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{bound[1]}"


class _StopSignals:
    """The process's one signal owner: the first SIGTERM/SIGINT stops, a second forces exit."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()

    def handle(self, signum: int) -> None:
        """Handle a stop signal (tests call this directly)."""
        if self.stop.is_set():
            logger.warning("second %s: exiting at once", signal.Signals(signum).name)
            os._exit(128 + signum)
        logger.info("%s: stopping", signal.Signals(signum).name)
        self.stop.set()


async def _serve(host: str, port: int, config: EmulatorConfig, rng: random.Random) -> int:
    app = create_app(config, rng)
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as error:
            print(f"segmapd emulator: cannot listen on {host}:{port}: {error}", file=sys.stderr)
            return EXIT_BIND_FAILED
        url = _public_url(host, runner.addresses[0])
        signals = _StopSignals()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, signals.handle, signum)
        sys.stdout.write(json.dumps({"event": "listening", "url": url}) + "\n")
        sys.stdout.flush()
        logger.info("emulator listening on %s", url)
        await signals.stop.wait()
    finally:
        await runner.cleanup()
    logger.info("emulator stopped")
    return EXIT_OK


def serve(host: str, port: int, config_path: str | None, seed: int | None) -> int:
    """Serve the emulator on `host:port` until SIGTERM/SIGINT; return the exit status."""
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        config = load_config(config_path)
    except ConfigError as error:
        print(f"segmapd emulator: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    rng = random.Random(seed)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve(host, port, config, rng))
