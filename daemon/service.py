"""The daemon's components, built from the config and started and stopped in order.

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
import random
import time
from dataclasses import dataclass, field
from typing import Protocol

from daemon.census import JournalCensus
from daemon.claims import Claims
from daemon.cluster import Cluster
from daemon.config import Config
from daemon.cxone import CXonePaths, CXoneSettings, HttpCXoneClient
from daemon.cxone.client import pool_size
from daemon.metrics import Metrics
from daemon.notifier import Notifier
from daemon.secrets import Secret
from daemon.store import ConfirmationStore, NotificationOutbox, from_url
from listeners import SourceAdapter, make_adapter
from scheduler.engine import BatchingPolicy, Engine
from scheduler.model import Assignment
from scheduler.observer import CompositeObserver, EngineObserver
from scheduler.retry import RetryPolicy
from scheduler.store import StoreUnavailable
from scheduler.validation import MembershipPoller, ValidationPolicy
from scheduler.validation_state import (
    MemoryConfirmationCache,
    RefreshBudget,
)

log = logging.getLogger(__name__)

#: The drain's last commit may take this long (a hung disk must not outlive TimeoutStopSec).
STORE_FLUSH_TIMEOUT_S = 10.0


class _NotifyOnFinish(EngineObserver):
    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier

    def finished(self, assignment: Assignment) -> None:
        self._notifier.enqueue(assignment)


def cxone_pool(config: Config) -> int:
    """The CXone client's connection pool for the configured limits (see `pool_size`)."""
    limits = config.limits
    rate = limits.write_rps + limits.single_write_rps + limits.read_rps
    return pool_size(rate, config.cxone.timeout_s)


def cxone_settings(config: Config) -> CXoneSettings:
    """The client settings for `[cxone]`."""
    cx = config.cxone
    return CXoneSettings(
        issuer=cx.issuer,
        api_base=cx.api_base,
        token_url=cx.token_url,
        grant=cx.grant,
        client_id=cx.client_id,
        client_secret=Secret(cx.client_secret.get_secret_value()),
        access_key_id=cx.access_key_id,
        access_key_secret=Secret(cx.access_key_secret.get_secret_value()),
        scopes=tuple(cx.scopes),
        timeout_s=cx.timeout_s,
        paths=CXonePaths(
            bulk=cx.paths.bulk,
            member=cx.paths.member,
            refresh=cx.paths.refresh,
            bulk_remove=cx.paths.bulk_remove,
            member_remove=cx.paths.member_remove,
        ),
    )


class JournaledConfirmations(MemoryConfirmationCache):
    """The validation cache, written through to the journal so it survives a restart."""

    def __init__(self, ttl_s: float, store: ConfirmationStore) -> None:
        super().__init__(ttl_s)
        self._store = store

    def remember(self, contact_id: str, segment_id: str, member: bool = True) -> None:
        """Cache now and journal it."""
        super().remember(contact_id, segment_id, member)
        self._store.remember_confirmation(contact_id, segment_id, time.time(), member)


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
        config = self.config
        self.store = from_url(config.store)
        # CXone's token bucket holds one token: no burst to absorb arrival jitter, so token
        # requests are spaced a quarter wider than its rate (they are rare: one an hour).
        self.token_gate = self.store.rate_gate(
            "token", config.limits.token_rps * 0.8, tolerance_s=0.0
        )
        self.client = HttpCXoneClient(
            cxone_settings(config),
            on_response=self.metrics.on_response,
            max_connections=cxone_pool(config),
            token_gate=self.token_gate,
        )
        # One budget per endpoint class: this process's, or every instance's on a shared journal.
        self.write_gate = self.store.rate_gate("bulk", config.limits.write_rps)
        self.single_gate = self.store.rate_gate("single", config.limits.single_write_rps)
        self.read_gate = self.store.rate_gate("read", config.limits.read_rps)
        self.notifier: Notifier | None = None
        observers: list[EngineObserver] = [self.metrics]
        if config.notify.url:
            outbox: NotificationOutbox = self.store
            self.notifier = Notifier(
                config.notify.url,
                config.notify.secret.get_secret_value(),
                timeout_s=config.notify.timeout_s,
                on_outcome=self.metrics.record_notification,
                journal=outbox,
            )
            observers.append(_NotifyOnFinish(self.notifier))
        observer = CompositeObserver(observers)
        retry = RetryPolicy(
            initial_s=config.retry.initial_s,
            multiplier=config.retry.multiplier,
            max_s=config.retry.max_s,
            jitter_ms=config.retry.jitter_ms,
            attempts=config.retry.attempts,
        )
        self.engine = Engine(
            client=self.client,
            store=self.store,
            write_gate=self.write_gate,
            single_gate=self.single_gate,
            batching=BatchingPolicy(
                min_size=config.batching.min_size,
                max_size=config.batching.max_size,
                linger_s=config.batching.linger_ms / 1000.0,
                max_inflight_per_contact=config.batching.max_inflight_per_contact,
                high_water=config.server.high_water,
            ),
            retry=retry,
            observer=observer,
            rng=random.Random(),
        )
        validation = config.validation
        self.cache = JournaledConfirmations(validation.cache_ttl_s, self.store)
        budget: RefreshBudget = self.store
        self.poller = MembershipPoller(
            client=self.client,
            read_gate=self.read_gate,
            sink=self.engine,
            cache=self.cache,
            budget=budget,
            policy=ValidationPolicy(
                interval_s=validation.interval_s,
                window_s=validation.window_s,
                cache_ttl_s=validation.cache_ttl_s,
                refresh_min_interval_s=validation.refresh_min_interval_s,
                deadline_s=validation.deadline_s,
            ),
            retry=retry,
            observer=observer,
            refresh_timeout_s=config.cxone.timeout_s,
        )
        self.engine.set_verifier(self.poller)
        self.cluster: Cluster | None = None
        shared = self.store.as_shared()
        if shared is not None:
            self.cluster = Cluster(
                store=shared,
                engine=self.engine,
                cache=self.cache,
                metrics=self.metrics,
                lease_s=config.cluster.lease_s,
                contact_limit=config.batching.max_inflight_per_contact,
                handover_budget_s=config.cxone.timeout_s + 5.0,
                name=config.cluster.name,
                notifier=self.notifier,
            )
            self.engine.set_ownership(self.cluster)
        self.sources: dict[str, SourceAdapter] = {}
        for name, source in config.sources.items():
            try:
                self.sources[name] = make_adapter(source)
            except ValueError as exc:
                raise ValueError(f"sources.{name}: {exc}") from None
        # Redelivery keys being taken right now (see daemon/intake.py).
        self.claims = Claims()
        self.metrics.bind_engine(
            buffered=lambda: self.engine.buffered,
            pending_writes=lambda: self.engine.pending_writes,
            pending_validation=lambda: self.poller.pending,
            reads_waiting=lambda: self.poller.backlog().waiting,
            read_backlog_s=lambda: self.poller.backlog().oldest_wait_s,
            awaiting_refresh=lambda: self.poller.backlog().awaiting_refresh,
        )
        # The journal's assignments by state, counted in the background (daemon/census.py).
        self.census = JournalCensus(self.store.counts)
        self.metrics.bind_journal(self.census)
        self.metrics.bind_gates(
            {
                "bulk": lambda: self.write_gate.waited_s,
                "single": lambda: self.single_gate.waited_s,
                "read": lambda: self.read_gate.waited_s,
            }
        )
        self._token_checked_at = float("-inf")
        self._token_ok = False
        self._token_error = ""
        self._token_lock = asyncio.Lock()
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
            await self.client.start()
            stack.push_async_callback(self._close_client)
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
            if self.cluster is not None:
                # Before listening: the first shards and their work are this instance's by then.
                await self.cluster.start()
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
