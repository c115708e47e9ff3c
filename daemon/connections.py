"""How the HTTP server is built and bound: the runner, its per-connection limits, the site.

The process lifecycle (daemon/runner.py) calls `build_runner` and `start_site` and knows nothing
of how connections are bounded; this module owns that:

- **Slow clients.** aiohttp bounds neither the time a client may take to send a request head
  nor, by default, an idle keep-alive connection (3,630 s): 500 connections sending one header
  byte every 10 s were all still open after 45 s. Each connection here gets a header deadline
  (`server.header_timeout_s`) from the moment it is accepted until its first request head is
  parsed; after that aiohttp's own keep-alive timer (`server.keepalive_timeout_s`, counted from
  the end of the last response and not reset by partial data) bounds an idle connection and the
  head of every later request. Bodies are bounded where they are read (daemon/http.py).
- **Too many clients.** Above `server.max_connections` a connection is answered `503` with
  `Retry-After` and the JSON problem body once its request head arrives, then closed; a few
  more than that (`refusal_slots`) are closed at once without an answer, so a flood never holds
  more descriptors than planned.
- **File descriptors.** Accepted connections must never take the descriptors that outbound
  CXone calls, the journal and the notifier need: running out turned accepted work into dead
  letters (connects failed with EMFILE). At start the soft RLIMIT_NOFILE is raised to the hard
  limit and `max_connections` is lowered, with a warning, to what fits beside that reserve; the
  daemon refuses to start when even a handful of connections would not fit.
- **Malformed requests.** What aiohttp's own parser refuses (a header over 8,190 bytes, a bad
  request line) gets the same JSON problem body as the app's errors, at a 4xx status, logged at
  debug without a traceback: anyone can send such requests, and they must not page anyone.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadStatusLine, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from daemon.config import Config
from daemon.http import problem
from daemon.wiring import cxone_pool

log = logging.getLogger(__name__)

# Descriptors the process needs besides sockets: stdio, the event loop's selector and self-pipe,
# signal handling, the journal (database, WAL, shared memory, a backup), imported files.
BASE_FDS = 64
# aiohttp's default pool for the notifier's session.
NOTIFIER_POOL = 100
# Sockets the event loop may accept in one go before any of them reaches `connection_made`
# (TCPSite's listen backlog), where the limits below take effect.
ACCEPT_BATCH = 128
# Fewer inbound connections than this cannot serve the admin API beside a webhook sender.
MIN_CONNECTIONS = 8
# How long a connection refused for capacity may take to send the head its 503 answers.
REFUSAL_HEADER_TIMEOUT_S = 2.0
RETRY_AFTER_FULL_S = 1
# Open requests get this long at shutdown before their handlers are cancelled (the lifecycle's
# own stop timeout is the backstop around it, a second longer).
HANDLER_SHUTDOWN_TIMEOUT_S = 4.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The per-connection bounds in force (after fitting them to the descriptor limit)."""

    max_connections: int
    refusal_slots: int
    header_timeout_s: float
    keepalive_timeout_s: float


@dataclass(frozen=True, slots=True)
class DescriptorPlan:
    """How the descriptor limit is shared: the reserve for everything but inbound, and inbound."""

    limit: int
    reserved: int
    limits: ConnectionLimits | None
    """None when not even `MIN_CONNECTIONS` fit: the daemon must not start."""


def refusal_slots(max_connections: int) -> int:
    """Connections beyond the cap still answered 503 (the rest are closed unanswered)."""
    return max(8, max_connections // 10)


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the file-descriptor limit from %d to %d: %s", soft, hard, exc)
    return soft


def plan_descriptors(config: Config, limit: int) -> DescriptorPlan:
    """Fit `server.max_connections` beside the outbound reserve within `limit` descriptors."""
    notifier = NOTIFIER_POOL if config.notify.url else 0
    reserved = BASE_FDS + cxone_pool(config) + ACCEPT_BATCH + notifier
    server = config.server
    wanted = server.max_connections
    available = limit - reserved
    # Solve m + refusal_slots(m) <= available for the largest m not above what was asked.
    fitting = min(wanted, available - refusal_slots(wanted))
    while fitting > 0 and fitting + refusal_slots(fitting) > available:
        fitting -= 1
    if fitting < min(MIN_CONNECTIONS, wanted):
        return DescriptorPlan(limit, reserved, None)
    limits = ConnectionLimits(
        max_connections=fitting,
        refusal_slots=refusal_slots(fitting),
        header_timeout_s=server.header_timeout_s,
        keepalive_timeout_s=server.keepalive_timeout_s,
    )
    return DescriptorPlan(limit, reserved, limits)


def _describe_refusal(exc: BaseException | None) -> tuple[int, str]:
    """The status and message for a request aiohttp's parser refused; never echoes its bytes."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "?"
        # aiohttp raises the same error for the request target and for a header; the target
        # is the only one of them that starts with "/" (origin form) or names a scheme.
        start = exc.args[0] if exc.args else b""
        if isinstance(start, bytes | bytearray) and (
            start.startswith(b"/") or b"://" in start[:16]
        ):
            return 414, f"request target longer than {limit} bytes"
        return 431, f"a request header is longer than {limit} bytes"
    if isinstance(exc, BadStatusLine):
        return 400, "malformed request line"
    if isinstance(exc, HttpProcessingError):
        return 400, "malformed HTTP request (headers or framing)"
    return 400, "malformed HTTP request"


class BoundedRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, with a header deadline and a capacity check."""

    __slots__ = ("_header_timer", "_limits")

    def __init__(self, manager: BoundedServer, *, limits: ConnectionLimits, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register the connection, then refuse it or start its header deadline."""
        super().connection_made(transport)
        manager = self._manager
        assert isinstance(manager, BoundedServer)
        open_now = manager.open_connections()
        limits = self._limits
        header_timeout_s = limits.header_timeout_s
        if open_now > limits.max_connections + limits.refusal_slots:
            log.debug("connection %d over the cap: closed unanswered", open_now)
            assert isinstance(transport, asyncio.Transport)
            transport.abort()
            return
        if open_now > limits.max_connections:
            self._request_handler = self._refuse_for_capacity
            header_timeout_s = min(header_timeout_s, REFUSAL_HEADER_TIMEOUT_S)
        self._header_timer = self._loop.call_later(header_timeout_s, self._header_deadline)

    def data_received(self, data: bytes) -> None:
        """Parse as aiohttp does; the first complete request head ends the header deadline."""
        super().data_received(data)
        if self._header_timer is not None and self._request_count:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        """Drop the header deadline with the connection."""
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _header_deadline(self) -> None:
        self._header_timer = None
        if not self._request_count:
            # A client this slow cannot be told anything useful; it may not even be reading.
            log.debug(
                "no request head within %.1f s: connection closed", self._limits.header_timeout_s
            )
            self.force_close()

    async def _refuse_for_capacity(self, request: BaseRequest) -> web.StreamResponse:
        response = problem(
            503,
            f"more than {self._limits.max_connections} connections open "
            "(server.max_connections); retry later",
            retryAfter=RETRY_AFTER_FULL_S,
        )
        response.force_close()
        return response

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A JSON problem for what aiohttp refused itself; only a 5xx is logged as an error."""
        if status >= 500:
            log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
            response = problem(500, "internal error; see the segmapd log")
        else:
            status, text = _describe_refusal(exc)
            # The exception's own text quotes the request, which may carry a credential.
            log.debug("refused a malformed request from %s: %s", request.remote, text)
            response = problem(status, text)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already being sent; closing the connection")
        response.force_close()
        return response


class BoundedServer(web.Server):
    """aiohttp's connection factory, making `BoundedRequestHandler`s."""

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: Any,
        loop: asyncio.AbstractEventLoop,
        limits: ConnectionLimits,
        **handler_kwargs: Any,
    ) -> None:
        super().__init__(handler, request_factory=request_factory, loop=loop, **handler_kwargs)
        self.limits = limits
        self._handler_kwargs = handler_kwargs

    def open_connections(self) -> int:
        """Connections currently registered (including one being set up)."""
        return len(self._connections)

    def __call__(self) -> RequestHandler:
        """A protocol for one new connection (what `loop.create_server` calls)."""
        return BoundedRequestHandler(
            self, loop=self._loop, limits=self.limits, **self._handler_kwargs
        )


class BoundedAppRunner(web.AppRunner):
    """An AppRunner whose server applies `ConnectionLimits` to every connection."""

    def __init__(self, app: web.Application, plan: DescriptorPlan, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.plan = plan

    async def _make_server(self) -> web.Server:
        # The app's startup and freeze happen in the parent; only the factory is swapped.
        plain = await super()._make_server()
        limits = self.plan.limits
        if limits is None:
            return plain  # start_site refuses to bind; nothing will connect to this one
        return BoundedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            loop=asyncio.get_running_loop(),
            limits=limits,
            keepalive_timeout=limits.keepalive_timeout_s,
            access_log=None,
        )


def build_runner(app: web.Application, config: Config) -> web.AppRunner:
    """The runner serving `app`; the process owns signals, so aiohttp must not install any."""
    plan = plan_descriptors(config, raise_descriptor_limit())
    if plan.limits is not None and plan.limits.max_connections < config.server.max_connections:
        log.warning(
            "server.max_connections lowered from %d to %d: the file-descriptor limit %d keeps "
            "%d for CXone calls, the journal and the notifier (raise LimitNOFILE to serve more)",
            config.server.max_connections,
            plan.limits.max_connections,
            plan.limit,
            plan.reserved,
        )
    return BoundedAppRunner(
        app,
        plan,
        access_log=None,
        handle_signals=False,
        # aiohttp's own grace for open requests at shutdown, after which it cancels their
        # handlers: without it a handler could run on after the journal is closed.
        shutdown_timeout=HANDLER_SHUTDOWN_TIMEOUT_S,
    )


async def start_site(runner: web.AppRunner, config: Config) -> web.BaseSite:
    """Bind `server.listen` and start accepting; raises OSError when the address is unusable.

    Also raises OSError (EMFILE) when the descriptor limit leaves no room for connections.
    """
    plan = runner.plan if isinstance(runner, BoundedAppRunner) else None
    if plan is not None and plan.limits is None:
        needed = plan.reserved + MIN_CONNECTIONS + refusal_slots(MIN_CONNECTIONS)
        message = (
            f"the file-descriptor limit {plan.limit} is too low: {plan.reserved} are reserved "
            f"for CXone calls, the journal and the notifier; raise LimitNOFILE to at least "
            f"{needed}"
        )
        log.error("%s", message)
        raise OSError(errno.EMFILE, message)
    site = web.TCPSite(
        runner, config.server.host, config.server.port, reuse_address=True, backlog=ACCEPT_BATCH
    )
    await site.start()
    return site


__all__ = [
    "BoundedAppRunner",
    "ConnectionLimits",
    "DescriptorPlan",
    "build_runner",
    "plan_descriptors",
    "start_site",
]
