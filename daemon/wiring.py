"""The composition root: every component of segmapd, built and connected in one place.

`build_scheduler` wires the scheduler's components (accumulator, ledger, validation, changes,
sender, waiters and the engine's face over them) from plain parts; the daemon, the benchmarks
and the tests all build their engines with it. `build_daemon` builds a whole process from the
config: journal, rate gates, CXone client, notifier, observers, the scheduler, the cluster and
the webhook sources. Each component gets what it needs in its constructor, in dependency order:
nothing is attached after construction, and no two components call each other back.
"""

from __future__ import annotations

import os
import random
import secrets
import socket
import time
from dataclasses import dataclass

from daemon.census import JournalCensus
from daemon.claims import Claims
from daemon.cluster import Cluster, ShardOwnership
from daemon.config import Config
from daemon.console.figures import Figures, SegmentActivity
from daemon.contact_holds import ContactHolds
from daemon.cxone import CXonePaths, CXoneSettings, HttpCXoneClient
from daemon.cxone.client import pool_size
from daemon.metrics import Metrics
from daemon.notifier import Notifier
from daemon.secrets import Secret
from daemon.store import ConfirmationStore, JournalStore, NotificationOutbox, from_url
from listeners import SourceAdapter, make_adapter
from listeners.base import Outcome
from scheduler.accumulator import Accumulator, BatchingPolicy
from scheduler.changes import Changes
from scheduler.engine import Engine
from scheduler.ledger import Ledger
from scheduler.model import Assignment
from scheduler.observer import CompositeObserver, EngineObserver
from scheduler.ownership import Ownership, OwnEverything
from scheduler.ratelimit import AdmissionGate
from scheduler.reconcile import Reconciler
from scheduler.retry import RetryPolicy
from scheduler.sender import Gate, Sender
from scheduler.store import Store
from scheduler.upstream import CXoneClient
from scheduler.validation import MembershipPoller, ReadLanePolicy, ValidationPolicy
from scheduler.validation_state import (
    ConfirmationCache,
    MemoryConfirmationCache,
    MemoryRefreshBudget,
    RefreshBudget,
)
from scheduler.waiters import Waiters


@dataclass(frozen=True)
class Scheduler:
    """The scheduler's components as wired: the engine's face, the ledger and validation."""

    engine: Engine
    ledger: Ledger
    poller: MembershipPoller | None


def build_scheduler(
    *,
    client: CXoneClient,
    store: Store,
    write_gate: Gate,
    single_gate: Gate,
    batching: BatchingPolicy,
    retry: RetryPolicy,
    observer: EngineObserver,
    validation: ValidationPolicy | None = None,
    read_lanes: ReadLanePolicy | None = None,
    read_gate: AdmissionGate | None = None,
    cache: ConfirmationCache | None = None,
    budget: RefreshBudget | None = None,
    ownership: Ownership | None = None,
    rng: random.Random | None = None,
    validation_rng: random.Random | None = None,
    refresh_timeout_s: float = 10.0,
) -> Scheduler:
    """The engine and its components, from plain parts.

    Without a `validation` policy there is no verifier: an assignment's journey ends at
    `written`. With one, `read_gate` is required; `cache` and `budget` default to in-memory
    ones. `ownership` defaults to owning every segment (one process).
    """
    if ownership is None:
        ownership = OwnEverything()
    accumulator = Accumulator(batching)
    waiters = Waiters()
    ledger = Ledger(
        store=store,
        accumulator=accumulator,
        waiters=waiters,
        observer=observer,
        ownership=ownership,
    )
    poller: MembershipPoller | None = None
    if validation is not None:
        if read_gate is None:
            raise ValueError("validation needs a read gate")
        poller = MembershipPoller(
            client=client,
            read_gate=read_gate,
            sink=ledger,
            # Explicit None checks: an empty cache is falsy (it has a length).
            cache=cache if cache is not None else MemoryConfirmationCache(validation.cache_ttl_s),
            budget=budget if budget is not None else MemoryRefreshBudget(),
            policy=validation,
            lanes=read_lanes,
            retry=retry,
            observer=observer,
            rng=validation_rng,
            refresh_timeout_s=refresh_timeout_s,
        )
    changes = Changes(
        ledger=ledger,
        ownership=ownership,
        batching=batching,
        write_rate_per_s=write_gate.rate_per_s,
        confirmations=poller,
    )
    sender = Sender(
        client=client,
        store=store,
        ledger=ledger,
        accumulator=accumulator,
        waiters=waiters,
        write_gate=write_gate,
        single_gate=single_gate,
        retry=retry,
        rng=rng if rng is not None else random.Random(),
        observer=observer,
        verifier=poller,
    )
    engine = Engine(
        store=store,
        ledger=ledger,
        changes=changes,
        accumulator=accumulator,
        sender=sender,
        waiters=waiters,
        observer=observer,
        verifier=poller,
    )
    return Scheduler(engine, ledger, poller)


# ---- a whole process, from the config ------------------------------------------------------


class NotifyOnFinish(EngineObserver):
    """Hands every assignment that ended to the outbound notifier."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier

    def finished(self, assignment: Assignment) -> None:
        """Queue its notification."""
        self._notifier.enqueue(assignment)


class JournaledConfirmations(MemoryConfirmationCache):
    """The validation cache, written through to the journal so it survives a restart."""

    def __init__(self, ttl_s: float, store: ConfirmationStore) -> None:
        super().__init__(ttl_s)
        self._store = store

    def remember(self, contact_id: str, segment_id: str, member: bool = True) -> None:
        """Cache now and journal it."""
        super().remember(contact_id, segment_id, member)
        self._store.remember_confirmation(contact_id, segment_id, time.time(), member)


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


@dataclass(frozen=True)
class Daemon:
    """Every long-lived component of one segmapd process, as `build_daemon` wired them."""

    store: JournalStore
    token_gate: AdmissionGate
    client: HttpCXoneClient
    write_gate: AdmissionGate
    single_gate: AdmissionGate
    read_gate: AdmissionGate
    notifier: Notifier | None
    cache: JournaledConfirmations
    engine: Engine
    poller: MembershipPoller
    cluster: Cluster | None
    sources: dict[str, SourceAdapter]
    claims: Claims
    holds: ContactHolds
    census: JournalCensus
    reconciler: Reconciler
    activity: SegmentActivity
    figures: Figures


def build_daemon(config: Config, metrics: Metrics) -> Daemon:
    """Every component of a process, from its config; raises ValueError for a bad source."""
    store = from_url(config.store)
    # CXone's token bucket holds one token: no burst to absorb arrival jitter, so token
    # requests are spaced a quarter wider than its rate (they are rare: one an hour).
    token_gate = store.rate_gate("token", config.limits.token_rps * 0.8, tolerance_s=0.0)
    client = HttpCXoneClient(
        cxone_settings(config),
        on_response=metrics.on_response,
        max_connections=cxone_pool(config),
        token_gate=token_gate,
    )
    # One budget per endpoint class: this process's, or every instance's on a shared journal.
    write_gate = store.rate_gate("bulk", config.limits.write_rps)
    single_gate = store.rate_gate("single", config.limits.single_write_rps)
    read_gate = store.rate_gate("read", config.limits.read_rps)
    notifier: Notifier | None = None
    shared = store.as_shared()
    ownership = ShardOwnership(shared, metrics) if shared is not None else None
    # What the console shows per segment (daemon/console/figures.py).
    activity = SegmentActivity(ownership.holds if ownership is not None else None)
    observers: list[EngineObserver] = [metrics, activity]
    if config.notify.url:
        outbox: NotificationOutbox = store
        notifier = Notifier(
            config.notify.url,
            config.notify.secret.get_secret_value(),
            timeout_s=config.notify.timeout_s,
            on_outcome=metrics.record_notification,
            journal=outbox,
        )
        observers.append(NotifyOnFinish(notifier))
    observer = CompositeObserver(observers)
    validation = config.validation.policy()
    cache = JournaledConfirmations(validation.cache_ttl_s, store)
    scheduler = build_scheduler(
        client=client,
        store=store,
        write_gate=write_gate,
        single_gate=single_gate,
        read_gate=read_gate,
        batching=config.batching.policy(
            config.server.high_water, config.limits.bulk_read_share_min
        ),
        retry=config.retry.policy(),
        validation=validation,
        read_lanes=config.limits.policy(),
        observer=observer,
        cache=cache,
        budget=store,
        ownership=ownership,
        refresh_timeout_s=config.cxone.timeout_s,
    )
    engine, poller = scheduler.engine, scheduler.poller
    assert poller is not None  # validation is always on in a daemon
    # Contacts whose changes are being taken (see daemon/contact_holds.py): intake and the
    # cluster's inbox both take changes.
    holds = ContactHolds()
    cluster: Cluster | None = None
    if shared is not None and ownership is not None:
        cluster = Cluster(
            store=shared,
            ownership=ownership,
            engine=engine,
            cache=cache,
            metrics=metrics,
            lease_s=config.cluster.lease_s,
            contact_limit=config.batching.max_inflight_per_contact,
            handover_budget_s=config.cxone.timeout_s + 5.0,
            name=config.cluster.name,
            notifier=notifier,
            holds=holds,
        )
    sources: dict[str, SourceAdapter] = {}
    for name, source in config.sources.items():
        try:
            sources[name] = make_adapter(source)
        except ValueError as exc:
            raise ValueError(f"sources.{name}: {exc}") from None
        adapter = sources[name]
        # Every intake series exists from the first scrape (an empty delivery's answer says which
        # status the kind answers success with).
        metrics.declare_source(
            name, adapter.kind, adapter.accepted(Outcome()).status, adapter.skip_reasons
        )
    metrics.bind_engine(
        buffered=engine.buffered_by_lane,
        pending_writes=lambda: engine.pending_writes,
        pending_validation=lambda: poller.pending,
        reads_waiting=lambda: {k: v.waiting for k, v in poller.backlog().lanes.items()},
        read_backlog_s=lambda: {k: v.oldest_wait_s for k, v in poller.backlog().lanes.items()},
        awaiting_refresh=lambda: {k: v.awaiting_refresh for k, v in poller.backlog().lanes.items()},
    )
    # Drift reconcile: one pass at a time, run by the process that leads.
    reconciler = Reconciler(
        journal=store,
        client=client,
        reads=poller,
        repairs=engine,
        observer=metrics,
        policy=config.reconcile.policy(config.limits.read_rps),
        # Unique per process (names and pids repeat across hosts and containers): only the
        # runner saves a pass's progress, so two processes must never share a runner name.
        runner_name=(
            f"{config.cluster.name or socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        ),
        leads=cluster.leads if cluster is not None else lambda: True,
    )
    # Alerts compare segmapd_pending_writes with the mark at which intake is refused.
    metrics.set_high_water(config.server.high_water)
    # The journal's assignments by state, counted in the background (daemon/census.py).
    census = JournalCensus(store.counts)
    metrics.bind_journal(census)
    metrics.bind_gates(
        {
            "bulk": lambda: write_gate.waited_s,
            "single": lambda: single_gate.waited_s,
            "read": lambda: read_gate.waited_s,
        }
    )
    figures = Figures(
        metrics=metrics,
        engine=engine,
        poller=poller,
        gates={"bulk": write_gate, "single": single_gate, "read": read_gate},
        journal=store,
    )
    return Daemon(
        store=store,
        token_gate=token_gate,
        client=client,
        write_gate=write_gate,
        single_gate=single_gate,
        read_gate=read_gate,
        notifier=notifier,
        cache=cache,
        engine=engine,
        poller=poller,
        cluster=cluster,
        sources=sources,
        # Redelivery keys being taken right now (see daemon/intake.py).
        claims=Claims(),
        holds=holds,
        census=census,
        reconciler=reconciler,
        activity=activity,
        figures=figures,
    )
