"""The daemon process: its components (built by daemon/wiring.py) started and drained in order.

Start: store -> CXone client -> HTTP handlers (not yet listening) -> notifier -> poller ->
engine -> listening. One `AsyncExitStack` records each component as it starts, so the drain
runs the same list in reverse and a start that fails half-way undoes only what had started:
stop intake (503 + Retry-After) -> answer open `?wait=` requests -> final flush of the engine ->
stop the poller -> the notifier's last chance -> stop the HTTP server (bounded) -> close the
CXone client -> flush and close the store, last, once no request can touch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from daemon.config import Config
from daemon.metrics import Metrics
from daemon.readiness import Readiness
from daemon.wiring import build_daemon
from scheduler.store import StoreUnavailable

log = logging.getLogger(__name__)

#: The drain's last commit may take this long (a hung disk must not outlive TimeoutStopSec).
STORE_FLUSH_TIMEOUT_S = 10.0
#: The drain waits this long at least for deliveries being taken (half its budget left if more).
MIN_TAKES_WAIT_S = 10.0


class CannotListen(Exception):
    """The listener could not bind its address; the message names it and says why."""


class Listener(Protocol):
    """The HTTP server as the service starts and stops it (daemon/runner.py implements it)."""

    async def prepare(self) -> None:
        """Build the server; it accepts nothing yet."""
        ...

    async def open(self) -> None:
        """Bind and accept connections; raises CannotListen."""
        ...

    async def close(self) -> None:
        """Stop accepting, finish open requests within a bound, close the rest. Idempotent."""
        ...


@dataclass
class Service:
    """Every long-lived component of one segmapd process."""

    config: Config
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    # Set when the last commit at shutdown failed (disk full, read-only): the exit is not clean.
    journal_failed: bool = False

    def __post_init__(self) -> None:
        # Built in one place (daemon/wiring.py); this class starts and drains them.
        parts = build_daemon(self.config, self.metrics)
        self.store = parts.store
        self.token_gate = parts.token_gate
        self.client = parts.client
        self.write_gate = parts.write_gate
        self.single_gate = parts.single_gate
        self.read_gate = parts.read_gate
        self.notifier = parts.notifier
        self.cache = parts.cache
        self.engine = parts.engine
        self.poller = parts.poller
        self.cluster = parts.cluster
        self.sources = parts.sources
        self.claims = parts.claims
        self.holds = parts.holds
        self.census = parts.census
        self.reconciler = parts.reconciler
        self.activity = parts.activity
        self.figures = parts.figures
        self._token_checked_at = float("-inf")
        self._token_ok = False
        self._token_error = ""
        self._token_lock = asyncio.Lock()
        # The /readyz checks; segmapd_ready shows them at every scrape without waiting on any.
        self.readiness = Readiness(self)
        self.metrics.bind_readiness(self.readiness.at_scrape)
        # What has started, in order: `drain()` undoes exactly that, in reverse.
        self._stack = contextlib.AsyncExitStack()
        self._drain_started: float | None = None
        self._drain_task: asyncio.Future[None] | None = None

    async def start(self, listener: Listener | None = None) -> None:
        """Open the journal, take back unfinished work, start every component, then listen.

        If a step fails, what had started is stopped again (in reverse) before the error
        propagates.
        """
        async with contextlib.AsyncExitStack() as stack:
            recovered = await self.store.open()
            self.cache.restore(recovered.confirmations, time.time())
            self.engine.restore(recovered.assignments, recovered.batches, recovered.queued)
            stack.push_async_callback(self._close_store)
            await self.census.start()
            stack.push_async_callback(self.census.stop)
            await self.figures.start()
            stack.push_async_callback(self.figures.stop)
            await self.client.start()
            stack.push_async_callback(self._close_client)
            # A token (and the API base) before any request is admitted by a rate gate: a
            # request that waited for its gate and then for the first token would go out with
            # every other one admitted meanwhile, at once, past CXone's limit. Not ready (CXone
            # away) is no reason not to start: requests fetch it when they can.
            await self.token_ready()
            # Stopped once the listener is closed (no scrape can start another evaluation),
            # before the client and the journal it checks are closed.
            stack.push_async_callback(self.readiness.stop)
            if listener is not None:
                await listener.prepare()
                stack.push_async_callback(self._close_listener, listener)
            # The notifier starts before the engine so that it stops after it: the engine's
            # final flush finishes assignments whose notifications deserve a last chance.
            if self.notifier is not None:
                await self.notifier.start()
                stack.push_async_callback(self._stop_notifier)
            await self.poller.start()
            stack.push_async_callback(self._stop_poller)
            if self.cluster is not None:
                # Left after the engine's final flush: the leases stay held while it drains.
                stack.push_async_callback(self._leave_cluster)
            await self.engine.start()
            stack.push_async_callback(self._stop_engine)
            stack.push_async_callback(self._settle_takes)
            if self.cluster is not None:
                # Before listening: the first shards and their work are this instance's by then.
                await self.cluster.start()
            # Stopped first in the drain: a pass running here is resumed at the next start.
            await self.reconciler.start()
            stack.push_async_callback(self.reconciler.stop)
            stack.callback(self._release_waiters)
            stack.callback(self._stop_intake)
            if listener is not None:
                await listener.open()
            self._stack = stack.pop_all()
        log.info(
            "segmapd started: %d webhook sources, store %s",
            len(self.sources),
            self.config.store.url.partition("://")[0],
        )

    async def drain(self) -> None:
        """Stop taking work, write what was accepted, stop everything; within the budget.

        Idempotent: a second call (also while the first runs) waits for the same drain.
        """
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._drain_task)

    async def stop(self) -> None:
        """The component interface's name for `drain()`."""
        await self.drain()

    async def _drain(self) -> None:
        started = self._drain_clock()
        await self._stack.aclose()
        log.info("drain complete in %.1f s", time.monotonic() - started)

    # ---- the drain's steps, in the order they run (the reverse of `start`) ----------------

    def _drain_clock(self) -> float:
        """When the drain began; the budget of every step is counted from there."""
        if self._drain_started is None:
            self._drain_started = time.monotonic()
        return self._drain_started

    def _remaining_s(self) -> float:
        return self.config.server.drain_budget_s - (time.monotonic() - self._drain_clock())

    def _stop_intake(self) -> None:
        self._drain_clock()
        self.draining = True
        log.info(
            "drain: intake stopped (503 + Retry-After); %d buffered, %d pending writes, "
            "%d awaiting validation",
            self.engine.buffered,
            self.engine.pending_writes,
            self.poller.pending,
        )

    def _release_waiters(self) -> None:
        released = self.engine.release_waiters()
        log.info("drain: answered %d open waits with their states so far", released)

    async def _settle_takes(self) -> None:
        # A large delivery taken in part must be taken whole before the engine closes: else it
        # would be answered busy with its first slices queued, and taken again when retried.
        # While draining, what is left of a take runs without yielding (`intake._take`), so
        # it costs CPU time only; the bound is for a take stalled on the journal.
        waited = max(MIN_TAKES_WAIT_S, self._remaining_s() * 0.5)
        unfinished = await self.holds.settled(waited)
        if unfinished:
            log.error(
                "drain: %d deliveries still being taken after %.1f s (a stalled journal?): "
                "the engine stops under them, and they are answered busy with part of them "
                "queued (a retry takes them again)",
                unfinished,
                waited,
            )

    async def _stop_engine(self) -> None:
        await self.engine.stop(budget_s=self.config.server.drain_budget_s * 0.7)
        log.info(
            "drain: engine stopped after %.1f s, %d writes still pending (resent at next start)",
            time.monotonic() - self._drain_clock(),
            self.engine.pending_writes,
        )

    async def _stop_poller(self) -> None:
        pending = self.poller.pending
        await self.poller.stop()
        log.info("drain: poller stopped, %d assignments left to validate at next start", pending)

    async def _stop_notifier(self) -> None:
        assert self.notifier is not None
        await self.notifier.stop(budget_s=max(1.0, self._remaining_s()) * 0.8)
        log.info(
            "drain: notifier stopped, %d notifications kept for the next start",
            self.notifier.pending,
        )

    async def _leave_cluster(self) -> None:
        assert self.cluster is not None
        await self.cluster.stop()

    async def _close_listener(self, listener: Listener) -> None:
        await listener.close()

    async def _close_client(self) -> None:
        await self.client.close()
        log.info("drain: CXone client closed")

    async def _close_store(self) -> None:
        try:
            await asyncio.wait_for(self.store.flush(), STORE_FLUSH_TIMEOUT_S)
        except (StoreUnavailable, TimeoutError) as exc:
            self.journal_failed = True
            log.error(
                "drain: the journal cannot commit (%s); stopping with it as it is",
                exc or f"no commit within {STORE_FLUSH_TIMEOUT_S:g} s",
            )
        await self.store.close()
        log.info("drain: journal closed")

    async def token_ready(self) -> tuple[bool, str]:
        """Whether a CXone token can be had; checked at most every 10 s (token calls are scarce)."""
        async with self._token_lock:
            if time.monotonic() - self._token_checked_at < 10.0:
                return self._token_ok, self._token_error
            try:
                await asyncio.wait_for(self.client.authenticate(), self.config.cxone.timeout_s)
            except Exception as exc:  # any failure means not ready; the reason is reported
                self._token_ok, self._token_error = False, f"{type(exc).__name__}: {exc}"
            else:
                self._token_ok, self._token_error = True, ""
            self._token_checked_at = time.monotonic()
            return self._token_ok, self._token_error

    def status_line(self) -> str:
        """A one-line summary for sd_notify STATUS= and logs."""
        return (
            f"buffered {self.engine.buffered}, pending writes {self.engine.pending_writes}, "
            f"validating {self.poller.pending}"
            + (f", notifications {self.notifier.pending}" if self.notifier else "")
        )
