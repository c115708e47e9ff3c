"""`segmapd run`: the process lifecycle -- serve, report to systemd, drain on a signal, exit.

One owner for signals: the handlers only set an event (the first signal) or force an exit (the
second); everything else happens here, in order, with budgets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

import orjson
from aiohttp import web

from daemon.config import Config
from daemon.connections import build_runner, start_site
from daemon.http import build_app
from daemon.sdnotify import SdNotifier, watchdog_loop
from daemon.service import Service
from daemon.store.sqlite import StoreFileError

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 5.0


class SignalState:
    """What the signal handlers may touch: a stop event, and a counter for forcing exit."""

    def __init__(self, stop: asyncio.Event, force_exit: Callable[[int], None] = os._exit) -> None:
        self.stop = stop
        self.received = 0
        self._force_exit = force_exit

    def handle(self, signum: int) -> None:
        """First SIGTERM/SIGINT: drain. Second: exit at once with status 1, without draining."""
        self.received += 1
        if self.received == 1:
            log.info("received %s: draining", signal.Signals(signum).name)
            self.stop.set()
        else:
            log.warning("received %s again: exiting without draining", signal.Signals(signum).name)
            self._force_exit(1)


async def serve(config: Config, *, announce: bool = True) -> int:
    """Run the daemon until a signal; returns the exit status."""
    try:
        service = Service(config)
    except (ValueError, NotImplementedError) as exc:
        log.critical("configuration error: %s", exc)
        return 2
    notifier = SdNotifier.from_environment()
    stop = asyncio.Event()
    signals = SignalState(stop)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signals.handle, signum)

    try:
        await service.start()
    except StoreFileError as exc:
        log.critical("cannot use the journal: %s", exc)
        return 2
    runner = build_runner(build_app(service), config)
    await runner.setup()
    try:
        await start_site(runner, config)
    except OSError as exc:
        log.critical("cannot listen on %s: %s", config.server.listen, exc.strerror)
        await service.drain()
        await runner.cleanup()
        return 1
    host, port = _bound_address(runner, config)
    url = f"http://{host}:{port}"
    log.info("listening on %s", url)
    if announce:
        # Tests and `make run` read this line to learn the port (server.listen may say :0).
        sys.stdout.write(orjson.dumps({"event": "listening", "url": url}).decode() + "\n")
        sys.stdout.flush()
    notifier.ready()
    background = [asyncio.create_task(_status_loop(service, notifier), name="sd-status")]
    if notifier.watchdog_interval_s:
        background.append(
            asyncio.create_task(
                watchdog_loop(notifier, lambda: service.engine.healthy), name="sd-watchdog"
            )
        )
    await stop.wait()

    notifier.stopping()
    notifier.status("draining: " + service.status_line())
    # Intake stops first (drain() marks the service draining): webhooks get 503 meanwhile.
    await service.drain()
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await runner.cleanup()
    if service.journal_failed:
        log.error("stopped, with the journal unable to commit the last changes")
        return 1
    log.info("stopped")
    return 0


def _bound_address(runner: web.AppRunner, config: Config) -> tuple[str, int]:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return str(address[0]), int(address[1])
    return config.server.host, config.server.port


async def _status_loop(service: Service, notifier: SdNotifier) -> None:
    while True:
        with contextlib.suppress(Exception):
            notifier.status(service.status_line())
        await asyncio.sleep(STATUS_INTERVAL_S)


def run(config: Config) -> int:
    """Run the daemon on uvloop (when available) until it is told to stop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))
