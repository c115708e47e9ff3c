"""The journal's roles, the backend class that joins them, and what opening one returns.

A store is segmapd's journal: everything that must survive the process. Each of its users sees
only the role it needs:

- `AssignmentJournal`: every assignment's state and history, the batches in flight, stale
  changes and mirror times (`record`, `record_stale`, `record_mirror`, `save_batch`,
  `drop_batch`), and the status reads (`contact`, `histories`, `failed`, `counts`). The engine
  writes through it (`scheduler.store.Store` is its view); the intake reads `histories`, the
  API `contact` and `failed`, the census `counts`.
- `DeliveryLog`: the answer to every delivery key (`delivery`, `known_deliveries`,
  `remember_delivery`) and, across instances, claims of keys being taken (`claim_keys`,
  `unclaim_keys`). The intake.
- `RefreshBudgetStore`: when each segment may be refreshed next (`next_allowed`, `spend`,
  `try_spend`). The poller, as `scheduler.validation_state.RefreshBudget`.
- `ConfirmationStore`: the validation cache's entries (`remember_confirmation`), written
  through by `daemon.service.JournaledConfirmations`.
- `NotificationOutbox`: notifications not delivered yet (`add`, `done`, `pending`). The
  notifier, as `daemon.notifier.NotificationJournal`.
- `ReconcileJournal`: drift reconcile's passes (`start_pass`, `claim_pass`, `save_pass`,
  `running_pass`, `get_pass`, `passes`), the tracked memberships they read (`tracked_page`,
  `tracked_count`) and the drift they find (`record_drift`, `drift_of`). The reconciler, as
  `scheduler.reconcile.PassJournal`, and the API.
- `SharedJournal`: what a journal several instances share adds for the cluster
  (`daemon/cluster.py`): `leases`, the inbox of forwarded changes (`forward`, `read_inbox`,
  `consume_inbox`), `load_segments`, `claim_notifications`, `discard_pending`, and the
  ownership it is told (`holds`, `holds_shard`, `on_fenced`).

A backend (`JournalStore`) implements every role in one object, with one connection pool and
one writer, and adds what the daemon itself needs: `open` (which returns `Recovered`),
`check_writable`, `close`, the rate gates, and `as_shared`. The backends are `memory://` (for
trials: nothing survives), `sqlite://` (one process, one file) and, for several instances,
`postgresql://`; `daemon.store.from_url` picks one. Code outside this package never asks which
backend it has.

Writes (`record*`, `save_batch`/`drop_batch`, `remember_*`, `spend`, `add`/`done`) are queued
without blocking the event loop and become durable together: `flush()` returns once everything
queued before it, in every role, is durable, and a `202` is answered only after it. Reads see
what was queued, whether committed yet or not.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from daemon.store.pending import InboxRow
from daemon.store.sql import DeadLetterKey
from scheduler.model import Assignment, AssignmentKey, FailureReason, Intent
from scheduler.ownership import ForwardedChange
from scheduler.ratelimit import AdmissionGate, RateGate
from scheduler.reconcile import ReconcilePass
from scheduler.store import BatchRecord, ContactHistory


class StoreOpenError(Exception):
    """The store cannot be used at all; the message names it and says why.

    A file that is no journal, one another process holds, a database refusing the schema.
    """


class StoreUnreachable(StoreOpenError):
    """The store's server did not answer at start-up: worth starting again a little later.

    A file that is no journal stays one however often segmapd starts; a database server that
    is still starting (or briefly unreachable) answers soon: the daemon exits so that its
    supervisor starts it again, with a status distinct from a configuration error.
    """


@dataclass(frozen=True, slots=True)
class DriftFinding:
    """A drift a reconcile pass found against one pair: what segmapd held, and when."""

    segment_id: str
    intent: Intent
    pass_id: str
    found_at: float
    requeued: bool


@dataclass
class Recovered:
    """What the journal held at start-up that is not finished."""

    assignments: list[Assignment] = field(default_factory=list)
    # Queued assignments as (contact_id, segment_id, received_at, intent, occurred_at, lane):
    # the bulk of a backlog, and the engine keeps them as buffer entries, not objects.
    queued: list[tuple[str, str, float, str, float, str]] = field(default_factory=list)
    batches: list[BatchRecord] = field(default_factory=list)
    refresh_budget: dict[str, float] = field(default_factory=dict)
    # (contact_id, segment_id, confirmed_at, member)
    confirmations: list[tuple[str, str, float, bool]] = field(default_factory=list)
    notifications: list[tuple[str, bytes]] = field(default_factory=list)


def dead_letter_key(assignment: Assignment) -> DeadLetterKey:
    """Where a dead letter stands in the list (its keyset cursor): time, contact, segment."""
    return (assignment.updated_at, assignment.contact_id, assignment.segment_id)


class Durable(abc.ABC):
    """What every role that queues writes shares: they become durable together."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Return once everything queued so far is durable; StoreUnavailable while it cannot be.

        Nothing queued is dropped by a failed flush: it is committed when the store recovers.
        """


class AssignmentJournal(Durable):
    """Every assignment's newest state and history, the batches in flight, and status reads.

    The engine writes through it (`scheduler.store.Store` is its view), the intake reads the
    histories new changes are compared with, the API and the census read its status.
    """

    @abc.abstractmethod
    def record(self, assignment: Assignment) -> None:
        """Queue a snapshot of the assignment's current state and its latest transition."""

    @abc.abstractmethod
    def record_stale(
        self, contact_id: str, segment_id: str, intent: str, occurred_at: float, at: float
    ) -> None:
        """Queue a note of a change that arrived older than what the pair already had."""

    @abc.abstractmethod
    def record_mirror(self, contact_id: str, occurred_at: float) -> None:
        """Queue the time of a mirror (`set`) applied to the contact; the newest is kept."""

    @abc.abstractmethod
    async def save_batch(self, batch: BatchRecord) -> None:
        """Make the batch durable before it is sent: a resend after a crash reuses its key."""

    @abc.abstractmethod
    async def drop_batch(self, batch_id: str) -> None:
        """Forget a batch whose outcome has been recorded."""

    @abc.abstractmethod
    async def contact(self, contact_id: str) -> list[Assignment]:
        """Every retained assignment of one contact, by segment id."""

    @abc.abstractmethod
    async def histories(self, contact_ids: Sequence[str]) -> dict[str, ContactHistory]:
        """Each named contact's assignments and newest mirror time, in one read; ids once each.

        The memberships a mirror compares with (the tracked ones) are the adds among them.
        """

    @abc.abstractmethod
    async def failed(
        self,
        limit: int = 1000,
        *,
        reason: FailureReason | None = None,
        segment_id: str | None = None,
        after: DeadLetterKey | None = None,
        through: DeadLetterKey | None = None,
        source: str | None = None,
    ) -> list[Assignment]:
        """Dead letters, oldest first; only those of `reason`, `segment_id` and `source` when given.

        `source` is where the change that started the pair came from (`Assignment.source`).
        Paged by key (`dead_letter_key`): `after` starts past one, `through` stops at one.
        """

    @abc.abstractmethod
    async def count_failed(
        self,
        *,
        reason: FailureReason | None = None,
        segment_id: str | None = None,
        source: str | None = None,
    ) -> tuple[int, DeadLetterKey | None]:
        """How many dead letters the filter keeps, and the key of the newest (None: none)."""

    @abc.abstractmethod
    async def failed_by_segment(self) -> dict[str, int]:
        """Dead letters per segment id (segments without any are left out)."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """Retained assignments per state."""


class DeliveryLog(Durable):
    """The answer given to every delivery key, so that a redelivery gets it again, adding no work.

    A key is claimed while its delivery is being taken (within a process by daemon/claims.py,
    across instances by `claim_keys`), and its answer is queued with the delivery's work.
    """

    @abc.abstractmethod
    async def delivery(self, source: str, delivery_id: str) -> bytes | None:
        """The answer given to an earlier delivery with this key, if it is retained."""

    @abc.abstractmethod
    async def remember_delivery(self, source: str, delivery_id: str, answer: bytes) -> None:
        """Queue the answer to a delivery: a redelivery gets it again and adds no work."""

    async def known_deliveries(self, source: str, delivery_ids: Sequence[str]) -> set[str]:
        """Which of these keys have a retained answer: a batched delivery's events at once.

        A backend whose lookups cost a round trip each answers in one; this default asks one
        key at a time.
        """
        return {key for key in delivery_ids if await self.delivery(source, key) is not None}

    async def claim_keys(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Claim delivery keys for a delivery being taken now; returns those another one holds.

        A store one process uses needs no claim beyond the intake's own (daemon/claims.py):
        nothing else holds a key. A shared database claims them in one statement, so that the
        same delivery sent to two instances at once is taken once.
        """
        return set()

    async def unclaim_keys(self, keys: Sequence[tuple[str, str]]) -> None:
        """Withdraw claims of keys whose delivery was not taken after all (see `claim_keys`)."""
        return None  # nothing is claimed outside the process


class RefreshBudgetStore(abc.ABC):
    """When each segment may be refreshed next, durably: `scheduler.validation_state.RefreshBudget`.

    CXone allows one refresh per segment per hour; a refresh sent twice (a crash between
    sending and recording it) is answered 429 and costs the segment its hour.
    """

    @abc.abstractmethod
    def next_allowed(self, segment_id: str) -> float:
        """Wall-clock time from which the segment may be refreshed again (0: now)."""

    @abc.abstractmethod
    def spend(self, segment_id: str, at: float, next_allowed: float) -> None:
        """Queue a refresh taken at `at`; the next is allowed from `next_allowed`."""

    @abc.abstractmethod
    async def try_spend(self, segment_id: str, now: float, next_allowed: float) -> float:
        """Take the segment's refresh if allowed at `now`, durably, before it is sent.

        Returns 0.0 when taken (a crash from here on cannot lead to a second one), else the
        wall-clock time from which a refresh is allowed. Check and take are one call so that a
        shared store makes them one atomic step.
        """


class ConfirmationStore(abc.ABC):
    """The validation cache's entries, kept so that a restart does not read them all again."""

    @abc.abstractmethod
    def remember_confirmation(
        self, contact_id: str, segment_id: str, at: float, member: bool = True
    ) -> None:
        """Queue a validation-cache entry: what was confirmed (member or not), and when."""


class NotificationOutbox(abc.ABC):
    """Outbound notifications not delivered yet: `daemon.notifier.NotificationJournal`."""

    @abc.abstractmethod
    def add(self, event_id: str, body: bytes) -> None:
        """Queue an outbound notification to deliver."""

    @abc.abstractmethod
    def done(self, event_id: str) -> None:
        """The notification was delivered (or dropped for good)."""

    @abc.abstractmethod
    def pending(self) -> list[tuple[str, bytes]]:
        """Notifications not yet delivered, oldest first."""


class ReconcileJournal(Durable):
    """Drift reconcile's passes, the memberships they read, and the drift they find.

    `scheduler.reconcile.PassJournal` is the reconciler's view of it. A pass is started by any
    process and run by one; at most one runs (the journal refuses a second, across processes).
    """

    @abc.abstractmethod
    async def tracked_page(self, after: AssignmentKey, limit: int) -> list[Assignment]:
        """Up to `limit` tracked memberships (`active` adds, `removed` removals) after `after`.

        In (contact, segment) order, committed ones only.
        """

    @abc.abstractmethod
    async def tracked_count(self) -> int:
        """How many memberships are tracked."""

    @abc.abstractmethod
    def start_pass(self, reconcile_pass: ReconcilePass) -> None:
        """Queue a new pass; not written if another is running when it commits."""

    @abc.abstractmethod
    def claim_pass(self, pass_id: str, runner: str) -> None:
        """Queue taking the pass over: only `runner`'s progress is saved from then on."""

    @abc.abstractmethod
    def save_pass(self, reconcile_pass: ReconcilePass) -> None:
        """Queue the pass's state, figures and cursor; saved only while it is its runner's."""

    @abc.abstractmethod
    def record_drift(
        self, held: Assignment, reconcile_pass: ReconcilePass, found_at: float, requeued: bool
    ) -> None:
        """Queue a drift found against the pair `held`, with the pass's progress, together."""

    @abc.abstractmethod
    async def running_pass(self) -> ReconcilePass | None:
        """The pass running, if any (committed)."""

    @abc.abstractmethod
    async def get_pass(self, pass_id: str) -> ReconcilePass | None:
        """One pass (committed)."""

    @abc.abstractmethod
    async def passes(self, limit: int) -> list[ReconcilePass]:
        """Recent passes, newest first (committed)."""

    @abc.abstractmethod
    async def last_scheduled_pass(self) -> ReconcilePass | None:
        """The newest pass the schedule started (never pruned: the schedule's anchor)."""

    @abc.abstractmethod
    async def drift_of(self, contact_id: str) -> list[DriftFinding]:
        """The drift found against the contact's pairs, oldest first."""

    @abc.abstractmethod
    async def journal_created_at(self) -> float | None:
        """When the journal was created, if it keeps that."""


class JournalStore(
    AssignmentJournal,
    DeliveryLog,
    RefreshBudgetStore,
    ConfirmationStore,
    NotificationOutbox,
    ReconcileJournal,
):
    """A backend: every role in one object, and what the daemon needs to open and close it."""

    def as_shared(self) -> SharedJournal | None:
        """The journal as one several instances share (then segments are leased), or None.

        A file or memory journal is one process's (a second process on a file is refused).
        """
        return None

    def rate_gate(
        self, name: str, rate_per_s: float, *, tolerance_s: float | None = None
    ) -> AdmissionGate:
        """The admission gate of an endpoint class: this process's own, unless shared."""
        return RateGate(name, rate_per_s, tolerance_s=tolerance_s)

    @abc.abstractmethod
    async def open(self) -> Recovered:
        """Open (creating or migrating the schema if needed) and return what is unfinished.

        Raises StoreOpenError when the store cannot be used.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Commit what is queued if possible, then release every resource; idempotent."""

    @abc.abstractmethod
    async def check_writable(self) -> None:
        """Raise StoreUnavailable if a commit cannot succeed now (the readiness probe)."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What one renewal of an instance's leases found."""

    owned: frozenset[int]
    live_instances: int


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    """A member of the cluster as the database holds it (times: Unix seconds)."""

    id: int
    name: str
    started_at: float
    heartbeat_at: float
    heartbeat_age_s: float  # on the database's clock, as leases are judged


@dataclass(frozen=True, slots=True)
class ShardStatus:
    """A shard's lease: its owner (None: free), its epoch, and how long the lease has left."""

    shard: int
    owner: int | None
    epoch: int
    lease_left_s: float | None  # None: no lease (never taken, or released)


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """Every member and every shard lease, read in one snapshot (the console's Cluster view)."""

    instances: list[InstanceStatus]
    shards: list[ShardStatus]


class Leases(abc.ABC):
    """An instance's membership of the cluster and its shard leases (daemon/cluster.py)."""

    name: str
    instance_id: int | None

    @abc.abstractmethod
    async def join(self) -> int:
        """Become a member; every commit of the journal checks the membership from now on.

        Called again after a fence: the previous membership ends, a new one begins.
        """

    @abc.abstractmethod
    async def heartbeat(self) -> Heartbeat | None:
        """Renew the membership and the leases; None if this instance was declared dead."""

    @abc.abstractmethod
    async def take(self, wanted: int) -> dict[int, int]:
        """Declare silent members dead, then take up to `wanted` free shards: {shard: epoch}."""

    @abc.abstractmethod
    async def release(self, shards: Sequence[int]) -> None:
        """Give shards up: their work is committed, another member may take them."""

    @abc.abstractmethod
    async def leave(self) -> None:
        """Release every shard and end the membership."""

    @abc.abstractmethod
    async def members(self) -> list[tuple[int, str, int]]:
        """Live members as (id, name, shards owned)."""

    @abc.abstractmethod
    async def listen(self, on_shard: Callable[[int], None]) -> bool:
        """Call `on_shard` when work is forwarded to a shard; False if not possible now."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop listening."""


class SharedJournal(AssignmentJournal):
    """A journal several instances share: what the cluster needs beyond `AssignmentJournal`.

    The cluster tells it what this instance holds: `holds(segment)` and `holds_shard(shard)`
    are asked as each commit begins, and rows of segments (and consumed inbox rows of shards)
    no longer held are left out of it, since a shard may be handed over between a row's
    queueing and its commit; `on_fenced` is called when a commit finds this instance declared
    dead.
    """

    holds: Callable[[str], bool] | None
    holds_shard: Callable[[int], bool]
    on_fenced: Callable[[], None] | None

    @abc.abstractmethod
    def leases(self, lease_s: float, name: str) -> Leases:
        """The instance's membership on the journal."""

    @abc.abstractmethod
    def forward(self, change: ForwardedChange) -> None:
        """Queue a change for its segment's owner, committed with what is queued with it."""

    @abc.abstractmethod
    def consume_inbox(self, rows: Sequence[tuple[int, int]]) -> None:
        """Queue the deletion of forwarded changes, (id, shard), taken into this engine."""

    @abc.abstractmethod
    async def read_inbox(self, shards: Sequence[int], limit: int) -> list[tuple[int, InboxRow]]:
        """Committed forwarded changes of these shards, oldest first."""

    @abc.abstractmethod
    async def load_segments(self, selected: Callable[[str], bool]) -> Recovered:
        """The unfinished work and validation cache of the segments `selected` picks."""

    @abc.abstractmethod
    async def claim_notifications(self, limit: int) -> list[tuple[str, bytes]]:
        """Notifications no live instance is delivering, claimed for this one."""

    @abc.abstractmethod
    async def cluster_status(self) -> ClusterStatus:
        """Every member and shard lease, in one snapshot: 64 shards and a few members."""

    @abc.abstractmethod
    def discard_pending(self) -> int:
        """Drop what is not committed yet, failing its waiters (this instance was fenced)."""
