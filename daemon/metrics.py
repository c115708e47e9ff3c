"""Prometheus metrics for segmapd: an `EngineObserver` that owns its own registry.

Labels only ever carry bounded values chosen by the daemon (state, outcome, endpoint class,
status code, configured source name). Contact ids, segment ids, tokens and secrets are never
labels: they would blow up the number of series and leak into every scrape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from daemon.census import JournalCensus
from daemon.notifier import DELIVERED, DROPPED, RETRY
from listeners.base import Outcome
from scheduler.model import (
    LANES,
    TERMINAL_STATES,
    Assignment,
    FailureReason,
    Intent,
    Lane,
    State,
)
from scheduler.observer import EngineObserver

logger = logging.getLogger(__name__)

BULK_IDS_BUCKETS = (1.0, 10.0, 25.0, 50.0, 100.0, 150.0, 195.0, 200.0)
"""Ids per bulk request; 195 and 200 show how close batches run to CXone's cap."""

UPSTREAM_DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds per CXone HTTP exchange."""

ACTIVE_LATENCY_BUCKETS = (
    0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
)  # fmt: skip
"""Seconds from a webhook's receipt to the assignment being confirmed active (0.5 s to 2 h)."""

NO_STATUS = "none"
"""The `code` label of an upstream exchange that got no HTTP answer (status 0)."""

NO_REASON = "none"
"""The `reason` label of a finished assignment that has no failure reason (an active one)."""

ENDPOINT_CLASSES = ("bulk", "single", "read", "refresh", "token", "discovery")
"""The `endpoint` label of CXone exchanges: every class the client calls."""

ENGINE_ENDPOINTS = ("bulk", "single", "read", "refresh")
"""The endpoint classes whose calls the engine reports an outcome for."""

UPSTREAM_OUTCOMES = ("ok", "rate_limited", "transient", "permanent", "auth", "local", "error")
"""The `outcome` label of `segmapd_upstream_outcomes_total` (scheduler/upstream.py outcome_of)."""

IN_PROGRESS_STATES = tuple(state for state in State if state not in TERMINAL_STATES)
"""The states of `segmapd_assignments`: the work an engine holds (finished work leaves it)."""

ENGINE_GAUGES: dict[str, tuple[str, str]] = {
    "buffered": ("segmapd_buffer_depth", "Contact ids waiting in the batching buffer."),
    "pending_writes": (
        "segmapd_pending_writes",
        "Assignments whose write to CXone is still pending (queued, sending or retrying).",
    ),
    "pending_validation": (
        "segmapd_pending_validations",
        "Assignments written and waiting for their membership to be confirmed.",
    ),
    "reads_waiting": (
        "segmapd_validation_reads_waiting",
        "Assignments queued for a membership read (due now or within one polling interval).",
    ),
    "read_backlog_s": (
        "segmapd_validation_read_backlog_seconds",
        "How long the most overdue queued membership read has been due: how far confirmation "
        "lags behind the read limit (not a failure).",
    ),
    "awaiting_refresh": (
        "segmapd_validation_awaiting_refresh",
        "Assignments read and still not shown after their window, waiting for their segment's "
        "refresh.",
    ),
}
"""Scrape-time gauges fed by `Metrics.bind_engine`: binding key -> (name, help)."""

LANE_GAUGES = frozenset({"buffered", "reads_waiting", "read_backlog_s", "awaiting_refresh"})
"""The engine gauges with a `lane` label (live, bulk): their callables return a value per lane."""

LaneValues = Callable[[], Mapping[Lane, float]]
"""A scrape-time callable of a lane-labelled gauge: its value per lane."""


def _safe_call(name: str, fn: Callable[[], float]) -> float:
    """Evaluate a scrape-time callback; a failing one yields NaN instead of breaking the scrape."""
    try:
        return float(fn())
    except Exception:
        logger.exception("metrics callback %s failed", name)
        return math.nan


class _CallbackCollector(Collector):
    """Values read at scrape time from callables bound once the engine and gates exist."""

    def __init__(self) -> None:
        self.engine: dict[str, Callable[[], float]] = {}
        self.lanes: dict[str, LaneValues] = {}
        self.gates: dict[str, Callable[[], float]] = {}
        self.census: JournalCensus | None = None

    @staticmethod
    def _engine_families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(name, help_text, labels=["lane"] if key in LANE_GAUGES else None)
            for key, (name, help_text) in ENGINE_GAUGES.items()
        ]

    @staticmethod
    def _wait_family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "segmapd_ratelimit_wait_seconds",
            "Seconds requests spent waiting for the rate limiter, by endpoint class.",
            labels=["endpoint"],
        )

    @staticmethod
    def _journal_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        journal = GaugeMetricFamily(
            "segmapd_journal_assignments",
            "Assignments the journal holds, by state, as of the last count (journal-wide: the "
            "same on every instance sharing the journal).",
            labels=["state"],
        )
        counted = GaugeMetricFamily(
            "segmapd_journal_counted_timestamp_seconds",
            "When segmapd_journal_assignments was counted (Unix time).",
        )
        return journal, counted

    def _per_lane(self, key: str) -> dict[Lane, float]:
        """A lane-labelled gauge's values: 0 before binding, NaN if its callable fails."""
        fn = self.lanes.get(key)
        if fn is None:
            return dict.fromkeys(LANES, 0.0)
        try:
            found = fn()
            return {lane: float(found.get(lane, 0.0)) for lane in LANES}
        except Exception:
            logger.exception("metrics callback %s failed", key)
            return dict.fromkeys(LANES, math.nan)

    def describe(self) -> Iterable[Metric]:
        """The families this collector yields (so the registry can detect name clashes)."""
        return [*self._engine_families(), self._wait_family(), *self._journal_families()]

    def collect(self) -> Iterable[Metric]:
        """Evaluate every bound callable now; the journal's counts as last taken."""
        gauges = self._engine_families()
        for key, family in zip(ENGINE_GAUGES, gauges, strict=True):
            if key in LANE_GAUGES:
                for lane, value in self._per_lane(key).items():
                    family.add_metric([lane.value], value)
                continue
            fn = self.engine.get(key)
            # Before the engine is bound there is nothing buffered: report 0 rather than a gap.
            family.add_metric([], _safe_call(key, fn) if fn is not None else 0.0)
        wait = self._wait_family()
        for endpoint, fn in sorted(self.gates.items()):
            wait.add_metric([endpoint], _safe_call(f"gate {endpoint}", fn))
        journal, counted = self._journal_families()
        # Nothing until the journal has been counted once: a 0 would be a false answer.
        latest = self.census.latest if self.census is not None else None
        if latest is not None:
            for state in State:
                journal.add_metric([state.value], latest.counts[state])
            counted.add_metric([], latest.counted_at)
        return [*gauges, wait, journal, counted]


# The per-delivery counters, in the order `_HotCounts.accepted` keeps them.
_DELIVERY_FAMILIES = (
    ("segmapd_events_accepted", "Webhook events taken, by source and kind."),
    ("segmapd_assignments_accepted", "Assignments accepted from webhook events."),
    (
        "segmapd_assignments_duplicate",
        "Accepted assignments that joined work in progress or were already confirmed.",
    ),
    ("segmapd_assignments_stale", "Accepted assignments older than what segmapd already had."),
    (
        "segmapd_events_redelivered",
        "Webhook events whose redelivery key was already journaled (no new work).",
    ),
    (
        "segmapd_events_dead_lettered",
        "Webhook events that can never succeed, acknowledged and dead-lettered.",
    ),
)


class _HotCounts(Collector):
    """The counts bumped on every webhook and every state transition, kept as plain ints.

    A prometheus_client child takes a lock per increment, and these run several times per
    webhook: on the intake path that cost as much as the signature check. Every update and every
    scrape (the /metrics handler) happens on the event loop's thread, so plain ints need no lock.
    """

    def __init__(self) -> None:
        self.webhooks: dict[tuple[str, str, int], int] = {}
        # Per (source, kind): the counts of `_DELIVERY_FAMILIES`, in that order.
        self.accepted: dict[tuple[str, str], list[int]] = {}
        self.skipped: dict[tuple[str, str, str], int] = {}
        # In-progress states only: finished assignments leave the engine (the journal counts them).
        self.held: dict[State, int] = dict.fromkeys(IN_PROGRESS_STATES, 0)
        self.entered: dict[State, int] = dict.fromkeys(State, 0)

    def describe(self) -> Iterable[Metric]:
        """The families this collector yields (so the registry can detect name clashes)."""
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        """The current counts as metric families."""
        webhooks = CounterMetricFamily(
            "segmapd_webhooks_received",
            "Webhook requests received, by source, source kind and HTTP status answered.",
            labels=["source", "kind", "code"],
        )
        for (source, kind, status), count in sorted(self.webhooks.items()):
            webhooks.add_metric([source, kind, str(status)], count)
        accepted = [
            CounterMetricFamily(name, help_text, labels=["source", "kind"])
            for name, help_text in _DELIVERY_FAMILIES
        ]
        for labels, counts in sorted(self.accepted.items()):
            for family, count in zip(accepted, counts, strict=True):
                family.add_metric(list(labels), count)
        skipped = CounterMetricFamily(
            "segmapd_events_skipped",
            "Webhook events deliberately not acted on (answered as success), by reason.",
            labels=["source", "kind", "reason"],
        )
        for (source, kind, reason), count in sorted(self.skipped.items()):
            skipped.add_metric([source, kind, reason], count)
        held = GaugeMetricFamily(
            "segmapd_assignments",
            "Assignments in progress in this instance, by state (finished ones leave it: see "
            "segmapd_journal_assignments).",
            labels=["state"],
        )
        entered = CounterMetricFamily(
            "segmapd_assignment_transitions",
            "Assignment state transitions, by the state entered.",
            labels=["state"],
        )
        for state in IN_PROGRESS_STATES:
            held.add_metric([state.value], self.held[state])
        for state in State:
            entered.add_metric([state.value], self.entered[state])
        return [webhooks, *accepted, skipped, held, entered]


class Metrics(EngineObserver):
    """Every segmapd metric, in a registry of its own; also the engine's metrics observer.

    `source` labels must be configured source names (a bounded set), never raw request input.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        self.finished_total = Counter(
            "segmapd_assignments_finished_total",
            "Assignments that reached a terminal state, by outcome, failure reason and intent.",
            ["outcome", "reason", "intent"],
            registry=r,
        )
        self.stale_total = Counter(
            "segmapd_stale_changes_total",
            "Changes older than what segmapd already works towards or confirmed: ignored, no call.",
            ["intent"],
            registry=r,
        )
        self.superseded_total = Counter(
            "segmapd_superseded_total",
            "Work in progress replaced by a newer change of the other intent, by the new intent.",
            ["intent"],
            registry=r,
        )
        self.active_latency = Histogram(
            "segmapd_assignment_active_latency_seconds",
            "Seconds from receipt of an assignment to its confirmation as active, by lane.",
            ["lane"],
            buckets=ACTIVE_LATENCY_BUCKETS,
            registry=r,
        )
        # Intake and lifecycle counts change several times per webhook: plain ints, see below.
        self._hot = _HotCounts()
        r.register(self._hot)
        self.finished_total.labels(outcome=State.ACTIVE.value, reason=NO_REASON, intent="add")
        self.finished_total.labels(outcome=State.REMOVED.value, reason=NO_REASON, intent="remove")
        for lane in LANES:
            self.active_latency.labels(lane=lane.value)
        for intent in Intent:
            self.stale_total.labels(intent=intent.value)
            self.superseded_total.labels(intent=intent.value)
            for reason in FailureReason:
                self.finished_total.labels(
                    outcome=State.FAILED.value, reason=reason.value, intent=intent.value
                )

        # Writes.
        self.bulk_ids = Histogram(
            "segmapd_bulk_request_ids",
            "Contact ids per bulk request.",
            buckets=BULK_IDS_BUCKETS,
            registry=r,
        )
        self.bulk_requests = Counter(
            "segmapd_bulk_requests_total",
            "Bulk requests about to be sent, by attempt kind (first or resend).",
            ["attempt"],
            registry=r,
        )
        for kind in ("first", "resend"):
            self.bulk_requests.labels(attempt=kind)
        self.retries = Counter(
            "segmapd_retries_scheduled_total",
            "Contact ids scheduled for a retry after a backoff.",
            registry=r,
        )

        # Upstream (CXone).
        self.upstream_requests = Counter(
            "segmapd_upstream_requests_total",
            "CXone HTTP exchanges, by endpoint class and status code (none: no answer).",
            ["endpoint", "code"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "segmapd_upstream_request_duration_seconds",
            "Seconds per CXone HTTP exchange, by endpoint class.",
            ["endpoint"],
            buckets=UPSTREAM_DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_outcomes = Counter(
            "segmapd_upstream_outcomes_total",
            "CXone calls by endpoint class and outcome "
            "(ok, rate_limited, transient, permanent, auth).",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.rate_limited = Counter(
            "segmapd_upstream_rate_limited_total",
            "CXone answers with status 429, by endpoint class.",
            ["endpoint"],
            registry=r,
        )
        # Every series an alert or the dashboard reads exists from the first scrape: a rule
        # over a series that appears only with the first event cannot see that event as a rise.
        for endpoint in ENDPOINT_CLASSES:
            self.rate_limited.labels(endpoint=endpoint)
            self.upstream_duration.labels(endpoint=endpoint)
        for endpoint in ENGINE_ENDPOINTS:
            for outcome in UPSTREAM_OUTCOMES:
                self.upstream_outcomes.labels(endpoint=endpoint, outcome=outcome)

        # Validation and notifications.
        self.validation_reads = Counter(
            "segmapd_validation_reads_total",
            "Membership reads answered, by result (member or not_member) and lane (live, bulk).",
            ["result", "lane"],
            registry=r,
        )
        for result in ("member", "not_member"):
            for lane in LANES:
                self.validation_reads.labels(result=result, lane=lane.value)
        self.cache_hits = Counter(
            "segmapd_validation_cache_hits_total",
            "Assignments confirmed from the validation cache without a read.",
            registry=r,
        )
        self.segment_refreshes = Counter(
            "segmapd_segment_refreshes_total",
            "Segment refreshes accepted by CXone.",
            registry=r,
        )
        self.notifications = Counter(
            "segmapd_notifications_total",
            "Outbound notification attempts, by outcome (delivered, retry or dropped).",
            ["outcome"],
            registry=r,
        )
        for outcome in (DELIVERED, RETRY, DROPPED):
            self.notifications.labels(outcome=outcome)

        # Readiness and capacity, for alerts.
        self.ready = Gauge(
            "segmapd_ready",
            "1 while /readyz would answer ready, 0 while not (NaN until first known); the "
            "journal and token checks as last answered, at most one scrape old.",
            registry=r,
        )
        self.high_water = Gauge(
            "segmapd_high_water",
            "The configured server.high_water: pending writes at which intake is refused.",
            registry=r,
        )

        # Several instances on one PostgreSQL journal (daemon/cluster.py).
        self.shards_owned = Gauge(
            "segmapd_cluster_shards_owned",
            "Shards (of 64) whose segments this instance batches, writes and validates.",
            registry=r,
        )
        self.cluster_instances = Gauge(
            "segmapd_cluster_instances",
            "Live instances sharing the journal, as this instance last saw them.",
            registry=r,
        )
        self.lease_changes = Counter(
            "segmapd_cluster_lease_changes_total",
            "Shard leases taken, released (handed over or left) and lost (declared dead).",
            ["change"],
            registry=r,
        )
        for change in ("taken", "released", "lost"):
            self.lease_changes.labels(change=change)
        self.cluster_fenced = Gauge(
            "segmapd_cluster_fenced",
            "1 while this instance is fenced (declared dead, or cut off from the database for "
            "nearly a lease): it owns nothing and refuses work until it has joined again.",
            registry=r,
        )
        self.cluster_fences = Counter(
            "segmapd_cluster_fences_total",
            "Times this instance fenced itself: the others declared it dead (`declared_dead`), "
            "or its heartbeats failed for nearly a lease (`cut_off`).",
            ["cause"],
            registry=r,
        )
        for cause in ("declared_dead", "cut_off"):
            self.cluster_fences.labels(cause=cause)
        self.forwarded = Counter(
            "segmapd_cluster_forwarded_total",
            "Assignment changes forwarded to the instance owning their segment.",
            registry=r,
        )
        self.inbox_taken = Counter(
            "segmapd_cluster_inbox_taken_total",
            "Forwarded assignment changes taken into this instance's engine.",
            registry=r,
        )

        # Drift reconcile (scheduler/reconcile.py).
        self.reconcile_reads = Counter(
            "segmapd_reconcile_reads_total",
            "Membership reads made by reconcile passes, by result: in_step (CXone holds what "
            "segmapd says), drift, skipped (newer work in progress) or error (nothing learned).",
            ["result"],
            registry=r,
        )
        for result in ("in_step", "drift", "skipped", "error"):
            self.reconcile_reads.labels(result=result)
        self.reconcile_drift = Counter(
            "segmapd_reconcile_drift_total",
            "Tracked memberships CXone no longer held as segmapd made them, by the intent "
            "segmapd holds (add: the contact left the segment; remove: it came back).",
            ["intent"],
            registry=r,
        )
        for intent in Intent:
            self.reconcile_drift.labels(intent=intent.value)
        self.reconcile_requeued = Counter(
            "segmapd_reconcile_requeued_total",
            "Drifted memberships queued again, in the bulk lane, to be written as segmapd holds.",
            registry=r,
        )
        self.reconcile_passes = Counter(
            "segmapd_reconcile_passes_total",
            "Reconcile passes this instance ended, by state (done or failed).",
            ["state"],
            registry=r,
        )
        for state in ("done", "failed"):
            self.reconcile_passes.labels(state=state)
        self.reconcile_running = Gauge(
            "segmapd_reconcile_running",
            "1 while this instance runs a reconcile pass.",
            registry=r,
        )
        self.reconcile_last_done = Gauge(
            "segmapd_reconcile_last_done_timestamp_seconds",
            "When the newest reconcile pass this instance ran ended done (0: none yet).",
            registry=r,
        )

        self._callbacks = _CallbackCollector()
        r.register(self._callbacks)

    # --- bindings ---------------------------------------------------------------------------

    def bind_engine(
        self,
        buffered: LaneValues,
        pending_writes: Callable[[], int],
        pending_validation: Callable[[], int],
        *,
        reads_waiting: LaneValues | None = None,
        read_backlog_s: LaneValues | None = None,
        awaiting_refresh: LaneValues | None = None,
    ) -> None:
        """Read buffer depth, pending counts and the read backlog from these at every scrape.

        The buffer depth and the read backlog are per lane (`LANE_GAUGES`).
        """
        self._callbacks.engine = {
            "pending_writes": pending_writes,
            "pending_validation": pending_validation,
        }
        lanes: dict[str, LaneValues | None] = {
            "buffered": buffered,
            "reads_waiting": reads_waiting,
            "read_backlog_s": read_backlog_s,
            "awaiting_refresh": awaiting_refresh,
        }
        self._callbacks.lanes = {key: fn for key, fn in lanes.items() if fn is not None}

    def bind_readiness(self, ready: Callable[[], float]) -> None:
        """Read `segmapd_ready` from `ready` at every scrape (it must not wait on anything)."""
        self.ready.set_function(lambda: _safe_call("ready", ready))

    def set_high_water(self, high_water: int) -> None:
        """Export the configured high-water mark, so alerts can compare pending writes with it."""
        self.high_water.set(high_water)

    def bind_journal(self, census: JournalCensus) -> None:
        """Export the journal's assignments by state as `census` last counted them."""
        self._callbacks.census = census

    def bind_gates(self, waited: Mapping[str, Callable[[], float]]) -> None:
        """Export each endpoint class's total limiter wait (`RateGate.waited_s`) at scrape."""
        self._callbacks.gates = dict(waited)

    def bind_cluster(
        self,
        *,
        owned: Callable[[], int],
        instances: Callable[[], int],
        fenced: Callable[[], bool],
    ) -> None:
        """Read the shards owned, the live instances and the fence from these at every scrape."""
        self.shards_owned.set_function(owned)
        self.cluster_instances.set_function(instances)
        self.cluster_fenced.set_function(lambda: float(fenced()))

    def record_fenced(self, cause: str) -> None:
        """Count a fence of this instance (`declared_dead` or `cut_off`)."""
        self.cluster_fences.labels(cause=cause).inc()

    def record_lease_change(self, change: str, shards: int) -> None:
        """`shards` leases were taken, released or lost."""
        if shards:
            self.lease_changes.labels(change=change).inc(shards)

    def record_forwarded(self) -> None:
        """One change went to its segment's owner through the journal."""
        self.forwarded.inc()

    def record_inbox_taken(self, changes: int) -> None:
        """Forwarded changes were taken into this instance's engine."""
        self.inbox_taken.inc(changes)

    def record_reconcile_read(self, result: str) -> None:
        """A reconcile pass read one membership (`in_step`, `drift`, `skipped` or `error`)."""
        self.reconcile_reads.labels(result=result).inc()

    def record_drift(self, intent: Intent, requeued: bool) -> None:
        """A reconcile pass found a drifted membership (and queued it again, unless a dry run)."""
        self.reconcile_drift.labels(intent=intent.value).inc()
        if requeued:
            self.reconcile_requeued.inc()

    def record_pass(self, state: str, running: bool, at: float) -> None:
        """A pass started on this instance (`running`), stopped running here, or ended.

        Only an end (`done`, `failed`) is counted: a pass left to another instance, or paused
        by a drain, is still running (elsewhere, or after the restart).
        """
        self.reconcile_running.set(1.0 if running else 0.0)
        if not running and state in ("done", "failed"):
            self.reconcile_passes.labels(state=state).inc()
            if state == "done":
                self.reconcile_last_done.set(at)

    def declare_source(
        self, source: str, kind: str, success_status: int, skip_reasons: Iterable[str]
    ) -> None:
        """Start a configured source's intake series at zero, before its first webhook.

        `success_status` is the status of the kind's success answer; `skip_reasons` the
        reasons its events may be skipped for.
        """
        hot = self._hot
        hot.webhooks.setdefault((source, kind, success_status), 0)
        hot.accepted.setdefault((source, kind), [0] * len(_DELIVERY_FAMILIES))
        for reason in skip_reasons:
            hot.skipped.setdefault((source, kind, reason), 0)

    # --- readers (the console's samples) ----------------------------------------------------

    def webhooks_answered(self) -> int:
        """Webhook requests answered so far, every source and status together."""
        return sum(self._hot.webhooks.values())

    def upstream_requests_by_endpoint(self) -> dict[str, float]:
        """CXone HTTP exchanges so far per endpoint class (every status together)."""
        return _summed(self.upstream_requests, "segmapd_upstream_requests_total", "endpoint")

    def rate_limited_answers(self) -> float:
        """CXone's 429 answers so far, every endpoint class together."""
        return sum(_summed(self.rate_limited, "segmapd_upstream_rate_limited_total").values())

    # --- recorders called by the daemon -----------------------------------------------------

    def record_webhook(self, source: str, kind: str, status: int) -> None:
        """A webhook request for configured `source` of `kind` was answered with `status`."""
        # Configured sources times the few statuses segmapd answers: a bounded set of series.
        key = (source, kind, status)
        webhooks = self._hot.webhooks
        webhooks[key] = webhooks.get(key, 0) + 1

    def record_delivery(self, source: str, kind: str, outcome: Outcome) -> None:
        """A delivery from `source` was taken: count its events and assignments."""
        counts = self._hot.accepted.get((source, kind))
        if counts is None:
            counts = self._hot.accepted[(source, kind)] = [0] * len(_DELIVERY_FAMILIES)
        counts[0] += outcome.events
        counts[1] += outcome.accepted
        counts[2] += outcome.duplicates
        counts[3] += outcome.stale
        counts[4] += outcome.redelivered
        counts[5] += outcome.dead_lettered

    def record_skipped(self, source: str, kind: str, reason: str, events: int = 1) -> None:
        """`events` events from `source` were skipped for `reason` (one of the kind's set)."""
        key = (source, kind, reason)
        self._hot.skipped[key] = self._hot.skipped.get(key, 0) + events

    def record_cache_hit(self, n: int = 1) -> None:
        """`n` assignments were confirmed from the validation cache."""
        self.cache_hits.inc(max(n, 0))

    def record_notification(self, outcome: str) -> None:
        """An outbound notification ended with `outcome` (a small fixed set of words)."""
        self.notifications.labels(outcome=outcome).inc()

    def on_response(self, endpoint: str, status: int, elapsed_s: float) -> None:
        """The CXone client's response hook: one HTTP exchange ended (status 0: no answer)."""
        code = str(status) if status else NO_STATUS
        self.upstream_requests.labels(endpoint=endpoint, code=code).inc()
        self.upstream_duration.labels(endpoint=endpoint).observe(max(elapsed_s, 0.0))
        if status == 429:
            self.rate_limited.labels(endpoint=endpoint).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for `/metrics`."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # --- EngineObserver ---------------------------------------------------------------------

    def transitioned(self, assignment: Assignment, previous: State) -> None:
        """Move one assignment between the in-progress gauges and count the transition."""
        # A new assignment is reported as queued -> queued (no other transition is): nothing to
        # take away then. Finished states are not held: an assignment entering one leaves the
        # gauges, and one leaving one (a replayed dead letter) joins them.
        new = previous is State.QUEUED and assignment.state is State.QUEUED
        held = self._hot.held
        state = assignment.state
        if not new and previous not in TERMINAL_STATES:
            held[previous] -= 1
        if state not in TERMINAL_STATES:
            held[state] += 1
        self._hot.entered[state] += 1

    def restored(self, counts: Mapping[State, int]) -> None:
        """Assignments taken back from the journal join the in-progress gauges (not counters)."""
        for state, count in counts.items():
            if state not in TERMINAL_STATES:
                self._hot.held[state] += count

    def let_go(self, counts: Mapping[State, int]) -> None:
        """Assignments handed over (or dropped by a fence) leave the in-progress gauges."""
        for state, count in counts.items():
            if state not in TERMINAL_STATES:
                self._hot.held[state] -= count

    def bulk_sent(self, segment_id: str, ids: int, attempt: int) -> None:
        """Count a bulk request and its size; attempt 1 is the first send."""
        self.bulk_ids.observe(ids)
        self.bulk_requests.labels(attempt="first" if attempt <= 1 else "resend").inc()

    def upstream_outcome(self, endpoint: str, outcome: str, elapsed_s: float) -> None:
        """Count the outcome of one CXone call (durations come from `on_response`)."""
        self.upstream_outcomes.labels(endpoint=endpoint, outcome=outcome).inc()

    def membership_read(self, segment_id: str, is_member: bool, lane: Lane = Lane.LIVE) -> None:
        """Count a membership read by its answer and the lane of its pair."""
        result = "member" if is_member else "not_member"
        self.validation_reads.labels(result=result, lane=lane.value).inc()

    def segment_refreshed(self, segment_id: str) -> None:
        """Count an accepted segment refresh."""
        self.segment_refreshes.inc()

    def finished(self, assignment: Assignment) -> None:
        """Count a terminal assignment; for an active one, observe its receipt-to-active time."""
        reason = assignment.reason.value if assignment.reason is not None else NO_REASON
        self.finished_total.labels(
            outcome=assignment.state.value, reason=reason, intent=assignment.intent.value
        ).inc()
        # received_at 0 means unknown (e.g. a replayed record); its "latency" would be decades.
        if assignment.state is State.ACTIVE and assignment.received_at > 0:
            latency = assignment.updated_at - assignment.received_at
            if latency >= 0:
                self.active_latency.labels(lane=assignment.lane.value).observe(latency)

    def retry_scheduled(self, segment_id: str, ids: int, delay_s: float) -> None:
        """Count ids scheduled for retry."""
        self.retries.inc(max(ids, 0))

    def stale_change(self, contact_id: str, segment_id: str, intent: Intent) -> None:
        """Count a stale change."""
        self.stale_total.labels(intent=intent.value).inc()

    def superseded(self, assignment: Assignment, by: Intent) -> None:
        """Count work in progress replaced by a newer change."""
        self.superseded_total.labels(intent=by.value).inc()


def _summed(metric: Counter, sample_name: str, label: str | None = None) -> dict[str, float]:
    """One counter's samples summed per value of `label` (all under "" without one).

    Reads that counter alone: the console samples it every few seconds, and collecting the
    whole registry would also run every collector (the census and the engine's counts).
    """
    found: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == sample_name:
                key = sample.labels.get(label, "") if label is not None else ""
                found[key] = found.get(key, 0.0) + float(sample.value)
    return found
