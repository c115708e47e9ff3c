"""The daemon's components, built from the config and started and stopped in order.

Start: store -> CXone client -> poller -> engine -> notifier. Stop (drain) runs in reverse with
budgets: the engine flushes its buffer and waits for in-flight writes, then the poller stops,
then the notifier gets a last chance to deliver, then the store closes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

from daemon.config import Config, StoreConfig
from daemon.cxone import CXonePaths, CXoneSettings, HttpCXoneClient
from daemon.metrics import Metrics
from daemon.notifier import Notifier
from daemon.secrets import Secret
from daemon.store.memory import MemoryStore
from daemon.store.sqlite import SqliteStore
from listeners import make_verifier
from scheduler.engine import BatchingPolicy, Engine
from scheduler.model import Assignment
from scheduler.observer import CompositeObserver, EngineObserver
from scheduler.ratelimit import RateGate
from scheduler.retry import RetryPolicy
from scheduler.store import StoreUnavailable
from scheduler.validation import MembershipPoller, ValidationPolicy
from scheduler.validation_state import (
    MemoryConfirmationCache,
    MemoryRefreshBudget,
    RefreshBudget,
)

log = logging.getLogger(__name__)


class _NotifyOnFinish(EngineObserver):
    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier

    def finished(self, assignment: Assignment) -> None:
        self._notifier.enqueue(assignment)


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
        paths=CXonePaths(bulk=cx.paths.bulk, member=cx.paths.member, refresh=cx.paths.refresh),
    )


def open_store(config: StoreConfig) -> MemoryStore | SqliteStore:
    """The store named by `store.url`: `sqlite:///abs/path`, `sqlite://rel/path`, `memory://`."""
    scheme, _, rest = config.url.partition("://")
    if scheme == "memory":
        return MemoryStore()
    if scheme == "sqlite":
        if not rest:
            raise ValueError("store.url: sqlite:// needs a file path")
        return SqliteStore(
            rest,
            synchronous=config.synchronous,
            retention_s=config.retention_days * 86_400,
        )
    raise NotImplementedError(
        f"store.url {scheme}:// is not available in this version; use sqlite:// or memory://"
    )


class JournaledConfirmations(MemoryConfirmationCache):
    """The validation cache, written through to the journal so it survives a restart."""

    def __init__(self, ttl_s: float, store: SqliteStore) -> None:
        super().__init__(ttl_s)
        self._store = store

    def remember(self, contact_id: str, segment_id: str) -> None:
        """Cache now and journal it."""
        super().remember(contact_id, segment_id)
        self._store.remember_confirmation(contact_id, segment_id, time.time())


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
        self.store = open_store(config.store)
        self.client = HttpCXoneClient(cxone_settings(config), on_response=self.metrics.on_response)
        self.write_gate = RateGate("bulk", config.limits.write_rps)
        self.single_gate = RateGate("single", config.limits.single_write_rps)
        self.read_gate = RateGate("read", config.limits.read_rps)
        self.notifier: Notifier | None = None
        observers: list[EngineObserver] = [self.metrics]
        if config.notify.url:
            self.notifier = Notifier(
                config.notify.url,
                config.notify.secret.get_secret_value(),
                timeout_s=config.notify.timeout_s,
                on_outcome=self.metrics.record_notification,
                journal=self.store if isinstance(self.store, SqliteStore) else None,
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
        self.cache: MemoryConfirmationCache
        budget: RefreshBudget
        if isinstance(self.store, SqliteStore):
            self.cache = JournaledConfirmations(validation.cache_ttl_s, self.store)
            budget = self.store
        else:
            self.cache = MemoryConfirmationCache(validation.cache_ttl_s)
            budget = MemoryRefreshBudget()
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
        )
        self.engine.set_verifier(self.poller)
        self.verifiers = {name: make_verifier(source) for name, source in config.sources.items()}
        self.metrics.bind_engine(
            buffered=lambda: self.engine.buffered,
            pending_writes=lambda: self.engine.pending_writes,
            pending_validation=lambda: self.poller.pending,
        )
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

    async def start(self) -> None:
        """Open the journal, take back unfinished work, start every component."""
        if isinstance(self.store, SqliteStore):
            recovered = await self.store.open()
            self.cache.restore(recovered.confirmations, time.time())
            self.engine.restore(recovered.assignments, recovered.batches, recovered.queued)
        await self.client.start()
        await self.poller.start()
        await self.engine.start()
        if self.notifier is not None:
            await self.notifier.start()
        log.info(
            "segmapd started: %d webhook sources, store %s",
            len(self.verifiers),
            self.config.store.url.partition("://")[0],
        )

    async def drain(self) -> None:
        """Stop taking work, write what was accepted, stop everything; within the budget."""
        self.draining = True
        budget = self.config.server.drain_budget_s
        started = time.monotonic()
        log.info(
            "draining: %d buffered, %d pending writes, %d awaiting validation",
            self.engine.buffered,
            self.engine.pending_writes,
            self.poller.pending,
        )
        await self.engine.stop(budget_s=budget * 0.7)
        log.info(
            "drain: engine stopped after %.1f s, %d writes still pending",
            time.monotonic() - started,
            self.engine.pending_writes,
        )
        await self.poller.stop()
        if self.notifier is not None:
            remaining = max(1.0, budget - (time.monotonic() - started))
            await self.notifier.stop(budget_s=remaining * 0.8)
        await self.client.close()
        try:
            await self.store.flush()
        except StoreUnavailable as exc:
            self.journal_failed = True
            log.error("drain: the journal cannot commit (%s); stopping with it as it is", exc)
        await self.store.close()
        log.info("drain complete in %.1f s", time.monotonic() - started)

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
