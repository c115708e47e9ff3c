"""`segmapd run`: the process lifecycle -- serve, report to systemd, drain on a signal, exit.

One owner for signals: the handlers only set an event (the first signal) or force an exit (the
second); everything else happens here and in `Service.drain()`, in order, with budgets.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable

import orjson
from aiohttp import web

from daemon.config import Config
from daemon.connections import HANDLER_SHUTDOWN_TIMEOUT_S, build_runner, start_site
from daemon.console.routes import add_routes as add_console_routes
from daemon.http import build_app
from daemon.sdnotify import SdNotifier, watchdog_loop
from daemon.service import CannotListen, Service
from daemon.store.base import StoreOpenError, StoreUnreachable

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 5.0
# How long open requests get to finish once the drain stops the HTTP server. By then open
# `?wait=` requests have been answered and intake refused for the whole drain, so what is left
# is a request being read or written: seconds at most. aiohttp's own default would be 60 s to
# finish plus 60 s to cancel, past systemd's TimeoutStopSec.
HTTP_STOP_TIMEOUT_S = HANDLER_SHUTDOWN_TIMEOUT_S + 1.0


class HttpListener:
    """The admin and webhook HTTP server, as a component the service starts and stops."""

    def __init__(
        self, service: Service, config: Config, *, stop_timeout_s: float = HTTP_STOP_TIMEOUT_S
    ) -> None:
        self._service = service
        self._config = config
        self._stop_timeout_s = stop_timeout_s
        self._runner: web.AppRunner | None = None
        self._closed = False
        self.url = ""

    async def prepare(self) -> None:
        """Build the app and its runner; nothing is accepted until `open()`."""
        app = build_app(self._service)
        # The operator console at /ui/ and the admin JSON only it needs: routes of its own.
        add_console_routes(app)
        self._runner = build_runner(app, self._config)
        await self._runner.setup()

    async def open(self) -> None:
        """Bind `server.listen`; raises CannotListen when the address is unusable."""
        assert self._runner is not None, "prepare() first"
        try:
            await start_site(self._runner, self._config)
        except OSError as exc:
            raise CannotListen(
                f"cannot listen on {self._config.server.listen}: {exc.strerror}"
            ) from exc
        host, port = _bound_address(self._runner, self._config)
        self.url = f"http://{host}:{port}"

    async def close(self) -> None:
        """Stop accepting; give open requests `stop_timeout_s`, then close them. Idempotent."""
        if self._closed or self._runner is None:
            return
        self._closed = True
        server = self._runner.server
        open_connections = len(server.connections) if server is not None else 0
        try:
            await asyncio.wait_for(self._runner.cleanup(), self._stop_timeout_s)
        except TimeoutError:
            still = len(server.connections) if server is not None else 0
            log.warning(
                "drain: HTTP server stopped with %d requests unfinished after %.1f s",
                still,
                self._stop_timeout_s,
            )
            if server is not None:
                for connection in server.connections:
                    connection.force_close()
        else:
            log.info("drain: HTTP server stopped, %d connections closed", open_connections)


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

    listener = HttpListener(service, config)
    try:
        await service.start(listener)
    except StoreUnreachable as exc:
        # Exit 1, not 2: the supervisor starts segmapd again, by when the server may answer.
        log.critical("cannot reach the journal: %s", exc)
        return 1
    except StoreOpenError as exc:
        log.critical("cannot use the journal: %s", exc)
        return 2
    except CannotListen as exc:
        log.critical("%s", exc)
        return 1
    # What exists now lives as long as the process: the modules, their classes and schemas, and
    # the work recovered from the journal. The garbage collector's full collections need never
    # scan it again (they scanned it all, every time: tens of milliseconds each under load).
    # Anything of it that becomes garbage is still freed as usual; only cycles among it would
    # not be, and none of it forms garbage cycles.
    gc.collect()
    gc.freeze()
    # Full collections a hundredth as often (after 1,000 collections of the middle generation,
    # not 10): each walks every entry of the dicts that hold pending work (with six 100,000-
    # assignment bodies taken, bench.large_bodies saw three a run at 100, of 30-90 ms each with
    # every request waiting; one at 1,000), and segmapd's pending work is freed by reference
    # counting, not by them. Under a heavy load one still runs about once a minute, so cycles
    # that outlive the young generations (a few aiohttp and asyncio objects) are not kept long.
    threshold0, threshold1, _ = gc.get_threshold()
    gc.set_threshold(threshold0, threshold1, 1000)
    # The event loop waits at most about this long for the GIL while a worker thread holds it
    # (the journal's writer binding a large transaction's rows, a large body parsed off the
    # loop): 1 ms, not CPython's 5. bench.large_bodies' /healthz p99 56 -> 50 ms; bench.ingest
    # unchanged.
    sys.setswitchinterval(0.001)
    log.info("listening on %s", listener.url)
    if announce:
        # Tests and `make run` read this line to learn the port (server.listen may say :0).
        sys.stdout.write(orjson.dumps({"event": "listening", "url": listener.url}).decode() + "\n")
        sys.stdout.flush()
    notifier.ready()
    background = [asyncio.create_task(_status_loop(service, notifier), name="sd-status")]
    if notifier.watchdog_interval_s:
        background.append(
            asyncio.create_task(
                watchdog_loop(notifier, lambda: service.engine.healthy), name="sd-watchdog"
            )
        )
    try:
        await stop.wait()
        notifier.stopping()
        notifier.status("draining: " + service.status_line())
        await service.drain()
    finally:
        # Status and watchdog go on during the drain: systemd sees it progress, not hang.
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
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
