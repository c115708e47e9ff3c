"""The ledger: the one owner of every pair's state, and the one writer of its transitions.

A pair (contact, segment) is in one of three places here, and in only one:

- **queued**: an entry of the accumulator's buffer (or parked at its contact gate), carrying
  its received time; the CRM's time of its change, when one was given, in `_occurred`. No
  object: a million queued pairs cost a buffer entry each.
- **live**: an `Assignment` in `_live`, from the moment its batch is taken until it ends
  (sending, retrying, written, verifying), or recovered so from the journal.
- **waiting**: a newer change of the other intent in `_successors`, behind a live pair whose
  request is in flight; it follows that request's outcome.

Every transition of a live pair goes through `transition()`, which validates the move, checks
that this process still holds the segment, queues the journal row, updates the observers,
counts the writes pending, and, when the pair ends, lets it go and answers its waiters. The
rows of a pair's start are written by the ledger too, but not through `transition()`, since
there is no move to check: new work (`queue_new`, from nothing or a terminal state), a change
confirmed from the cache (`record_confirmed`), a dead letter (`record_dead_letter`), and a
newer change superseding queued work or waiting behind a request in flight (`supersede`, the
waiting row written at once so that a crash never loses it). For those, `Changes` decides
ownership before it asks (`Ownership.owns`, which implies `holds`). Everything else asks the
ledger; nothing else writes a pair's row (River's `JobCompleter`, saq's `Queue.finish`). The
ledger calls no component back: the sender and the verifier report to it, and it reports to
nobody but the journal, the observers, the waiters and the accumulator it queues into.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from scheduler.accumulator import Accumulator
from scheduler.model import (
    WRITE_PENDING_STATES,
    Assignment,
    AssignmentKey,
    BatchKey,
    FailureReason,
    Intent,
    Lane,
    State,
)
from scheduler.observer import EngineObserver
from scheduler.ownership import Ownership
from scheduler.store import Store
from scheduler.waiters import Waiters

OPPOSITE = {Intent.ADD: Intent.REMOVE, Intent.REMOVE: Intent.ADD}


@dataclass(frozen=True, slots=True)
class Change:
    """A newer change waiting for the pair's request in flight to have its outcome."""

    intent: Intent
    occurred_at: float  # 0.0: none given (the arrival orders it)
    received_at: float
    lane: Lane = Lane.LIVE
    source: str = ""  # where it came from (`MembershipChange.source`)

    @property
    def version(self) -> float:
        """The time ordering compares: its occurredAt, or its arrival."""
        return self.occurred_at or self.received_at


@dataclass(frozen=True, slots=True)
class Current:
    """Where a pair's newest change stands: its intent and time."""

    intent: Intent
    version: float


def waiting_row(assignment: Assignment, change: Change) -> Assignment:
    """What the journal keeps for a pair whose newer change waits for a request in flight."""
    return Assignment(
        assignment.contact_id,
        assignment.segment_id,
        state=State.QUEUED,
        received_at=change.received_at,
        updated_at=change.received_at,
        intent=change.intent,
        occurred_at=change.occurred_at,
        lane=change.lane,
        source=change.source,
    )


class Ledger:
    """Pair state: queued, live and waiting pairs, and every transition between them."""

    def __init__(
        self,
        *,
        store: Store,
        accumulator: Accumulator,
        waiters: Waiters,
        observer: EngineObserver,
        ownership: Ownership,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._accumulator = accumulator
        self._waiters = waiters
        self._observer = observer
        self._ownership = ownership
        self._wall = wall_clock
        self._live: dict[AssignmentKey, Assignment] = {}
        # The CRM's time of a queued change, where it gave one (a queued change is a buffer
        # entry, whose time is its arrival; most changes carry no other).
        self._occurred: dict[AssignmentKey, float] = {}
        # Newer changes waiting for the request in flight for their pair to have an outcome.
        self._successors: dict[AssignmentKey, Change] = {}
        #: Assignments queued, sending or waiting to retry (what the high-water mark counts).
        self.pending_writes = 0

    # ---- queries -------------------------------------------------------------------------

    def current(self, key: AssignmentKey) -> Current | None:
        """The newest change in progress for the pair: waiting, live, queued or parked."""
        successor = self._successors.get(key)
        if successor is not None:
            return Current(successor.intent, successor.version)
        live = self._live.get(key)
        if live is not None:
            return Current(live.intent, live.version)
        queued = self._accumulator.queued(*key)
        if queued is not None:
            intent, at = queued
            return Current(intent, self._occurred.get(key) or at)
        return None

    def has_work(self, key: AssignmentKey) -> bool:
        """Whether a change to the pair is in progress (queued, parked, live or waiting)."""
        return self.current(key) is not None

    def live(self, key: AssignmentKey) -> Assignment | None:
        """The pair's live assignment (past queued, not ended), if any."""
        return self._live.get(key)

    def validating(self, key: AssignmentKey) -> bool:
        """Whether the pair is live and its write done (written or verifying)."""
        live = self._live.get(key)
        return (
            live is not None
            and live.state not in WRITE_PENDING_STATES
            and key not in self._successors
        )

    def attempts(self, batch_key: BatchKey, contact_id: str) -> int:
        """Attempts made so far for the live assignment (0 if none)."""
        assignment = self._live.get((contact_id, batch_key[0]))
        return assignment.attempts if assignment is not None else 0

    def pending_for(self, batch_key: BatchKey, contact_ids: Iterable[str]) -> list[Assignment]:
        """The live assignments of the batch key's intent whose write is still pending.

        An answer replayed for a batch recovered after a crash may name ids that have moved on
        since: only those still waiting for it count.
        """
        segment_id, intent = batch_key
        found = []
        for contact_id in contact_ids:
            assignment = self._live.get((contact_id, segment_id))
            if (
                assignment is not None
                and assignment.intent is intent
                and assignment.state in WRITE_PENDING_STATES
            ):
                found.append(assignment)
        return found

    def note_outcome_unknown(self, batch_key: BatchKey, contact_ids: list[str]) -> None:
        """A request for these ids ended without an answer saying whether it applied."""
        for assignment in self.pending_for(batch_key, contact_ids):
            assignment.outcome_unknown = True

    def outcome_unknown(self, batch_key: BatchKey, contact_id: str) -> bool:
        """Whether an attempt for the pair's change ended without saying if it applied."""
        assignment = self._live.get((contact_id, batch_key[0]))
        return assignment is not None and assignment.outcome_unknown

    def still_retrying(self, batch_key: BatchKey, contact_ids: list[str]) -> list[tuple[str, Lane]]:
        """The ids still waiting for a batch after their backoff (not started over meanwhile)."""
        return [(a.contact_id, a.lane) for a in self.pending_for(batch_key, contact_ids)]

    def segments(self) -> set[str]:
        """Every segment the ledger holds a pair of: live, waiting, queued or parked."""
        found = {segment_id for _, segment_id in self._live}
        found |= {segment_id for segment_id, _ in self._accumulator.batch_keys()}
        return found

    # ---- the one transition --------------------------------------------------------------

    def transition(
        self,
        assignment: Assignment,
        state: State,
        *,
        reason: FailureReason | None = None,
        message: str = "",
    ) -> None:
        """Move a live pair to `state`: checked, journaled, observed; let go if it ended."""
        if not self._ownership.holds(assignment.segment_id):
            # Handed over (or taken over): its new owner has the journal's record of it, and
            # a state recorded from here would overwrite that owner's.
            if state in _ENDING:
                self._let_go(assignment)
            return
        previous = assignment.state
        was_pending = previous in WRITE_PENDING_STATES
        assignment.transition(state, self._wall(), reason=reason, message=message)
        self.pending_writes += int(state in WRITE_PENDING_STATES) - int(was_pending)
        successor = self._successors.get(assignment.key)
        # While a newer change waits for this request's outcome, the journal holds that change:
        # after a crash it is queued (the old batch is resent first), never lost.
        self._store.record(assignment if successor is None else waiting_row(assignment, successor))
        self._observer.transitioned(assignment, previous)
        if state in _ENDING:
            self.finish(assignment)

    def finish(self, assignment: Assignment) -> None:
        """The pair's journey here is over: let it go; observers hear of it if it ended."""
        if assignment.terminal:
            self._observer.finished(assignment)
        self._let_go(assignment)

    def _let_go(self, assignment: Assignment) -> None:
        self._live.pop(assignment.key, None)
        self._waiters.resolve(assignment)

    # ---- new changes (from `Changes`) ----------------------------------------------------

    def queue_new(  # noqa: PLR0917 (one pair's change)
        self,
        contact_id: str,
        segment_id: str,
        intent: Intent,
        occurred_at: float,
        now: float,
        lane: Lane = Lane.LIVE,
        source: str = "",
    ) -> None:
        """A change with nothing in progress for its pair: queued for its batch (or parked).

        Its row carries the change's `source`; the buffer entry does not (see `Assignment`).
        """
        assignment = _started(
            contact_id, segment_id, State.QUEUED, intent, occurred_at, now, lane, source
        )
        self.pending_writes += 1
        if occurred_at:
            self._occurred[assignment.key] = occurred_at
        self._store.record(assignment)
        self._observer.transitioned(assignment, State.QUEUED)
        batch_key = (segment_id, intent)
        if self._accumulator.admit(contact_id, batch_key, now, lane):
            self._accumulator.enqueue(batch_key, contact_id, now, lane)

    def record_confirmed(  # noqa: PLR0917 (one pair's change)
        self,
        contact_id: str,
        segment_id: str,
        intent: Intent,
        occurred_at: float,
        now: float,
        lane: Lane = Lane.LIVE,
        source: str = "",
    ) -> None:
        """A change CXone confirmed as asked within the cache TTL: journaled done, no call.

        Journaled with this change's time, so that an older change arriving later is stale.
        """
        state = State.ACTIVE if intent is Intent.ADD else State.REMOVED
        self._store.record(
            _started(contact_id, segment_id, state, intent, occurred_at, now, lane, source)
        )

    def record_dead_letter(self, assignment: Assignment) -> None:
        """A pair of an event nobody can act on, born failed: journaled, never sent."""
        self._store.record(assignment)
        # Reported as entering `failed` from nowhere (a terminal previous state is what
        # observers take as "nothing held to move from").
        self._observer.transitioned(assignment, State.FAILED)
        self._observer.finished(assignment)

    def record_stale(
        self, contact_id: str, segment_id: str, intent: Intent, version: float, now: float
    ) -> None:
        """A change older than what the pair has: noted in the journal, never acted on."""
        self._store.record_stale(contact_id, segment_id, str(intent), version, now)
        self._observer.stale_change(contact_id, segment_id, intent)

    def record_mirror(self, contact_id: str, occurred_at: float) -> None:
        """A mirror (`set`) applied to the contact at `occurred_at`."""
        self._store.record_mirror(contact_id, occurred_at)

    def renew(
        self, key: AssignmentKey, occurred_at: float, now: float, lane: Lane = Lane.LIVE
    ) -> bool:
        """A newer change of the same intent joins the work in progress and dates it.

        Its time (its occurredAt, else its arrival) becomes the pair's, so that a change older
        than it, arriving later, is found stale. A live change moves bulk work to the live lane
        (journaled); a bulk change never moves live work back, since a caller of the live change
        may be waiting for it. True when a pair being validated moved (its read is to be
        moved too).
        """
        version = occurred_at or now
        promote = lane is Lane.LIVE
        successor = self._successors.get(key)
        if successor is not None:
            if version > successor.version or (promote and successor.lane is Lane.BULK):
                successor = self._successors[key] = Change(
                    successor.intent,
                    version if version > successor.version else successor.occurred_at,
                    successor.received_at,
                    Lane.LIVE if promote else successor.lane,
                    successor.source,
                )
                # The journal holds the waiting change (see `transition`): journaled again, so
                # that its lane and time survive a crash before the request's outcome.
                waiting_for = self._live.get(key)
                if waiting_for is not None:
                    self._store.record(waiting_row(waiting_for, successor))
            return False
        live = self._live.get(key)
        if live is not None:
            if version > live.version:
                live.occurred_at = version
            if promote and live.lane is Lane.BULK:
                live.lane = Lane.LIVE
                self._store.record(live)
                if live.state is State.RETRYING:
                    # Its id may be back in the buffer (or parked) after its backoff.
                    self._accumulator.set_lane(key[0], (key[1], live.intent), Lane.LIVE)
                return live.state not in WRITE_PENDING_STATES
            return False
        at = self._occurred.get(key)
        if at is None or version > at:
            self._occurred[key] = at = version
        if promote:
            self._promote_queued(key, at)
        return False

    def _promote_queued(self, key: AssignmentKey, occurred_at: float) -> None:
        """A queued (or parked) bulk pair goes on in the live lane, journaled so."""
        accumulator = self._accumulator
        queued = accumulator.queued(*key)
        if queued is None:
            return
        intent, received_at = queued
        batch_key = (key[1], intent)
        if accumulator.lane_of(key[0], batch_key) is not Lane.BULK:
            return
        accumulator.set_lane(key[0], batch_key, Lane.LIVE)
        self._store.record(
            Assignment(
                key[0], key[1], received_at=received_at, updated_at=self._wall(),
                intent=intent, occurred_at=occurred_at, lane=Lane.LIVE,
            )
        )  # fmt: skip

    def supersede(  # noqa: PLR0917 (one pair's change)
        self,
        key: AssignmentKey,
        intent: Intent,
        occurred_at: float,
        now: float,
        lane: Lane = Lane.LIVE,
        source: str = "",
    ) -> None:
        """A newer change of the other intent replaces the work in progress for the pair.

        The pair goes on in the newer change's lane, except that a bulk change going back to
        the intent of a request in flight leaves that request's lane as it was: the request is
        not started over, and a caller may wait for it in the live lane.

        Queued (or parked) work is never sent: it moves to the other batch key. Written or verifying
        work leaves validation (the caller stops its validation first) and its opposite is
        queued. A request in flight (sending, or retrying: its outcome is unknown) finishes
        first, so that CXone applies the two in order; the newer change follows its outcome.
        Every row written here starts the pair anew, and carries the newer change's `source`.
        """
        contact_id, segment_id = key
        change = Change(intent, occurred_at, now, lane, source)
        successor = self._successors.get(key)
        live = self._live.get(key)
        if successor is not None:
            if live is not None and live.intent is intent:
                del self._successors[key]  # back to what is in flight: nothing more to send
                live.occurred_at = max(live.occurred_at, occurred_at)
                if lane is Lane.LIVE:  # a bulk change never moves live work back
                    live.lane = lane
                # The pair works towards this change now (with the request's), from its source.
                live.source = source
                self._store.record(live)
            else:
                self._successors[key] = change
                if live is not None:
                    self._store.record(waiting_row(live, change))
            return
        if live is not None:
            # Live and write-pending: in a batch (being saved, sent or resent) or waiting to
            # retry one. That request's outcome comes first; restarting now would send both.
            if live.state in WRITE_PENDING_STATES:
                self._successors[key] = change
                self._store.record(waiting_row(live, change))
                return
            # Written or verifying: its confirmation no longer matters.
            self._observer.superseded(live, intent)
            self._restart(live, change, hold_slot=False)
            return
        self._occurred.pop(key, None)
        replaced = _started(
            contact_id, segment_id, State.QUEUED, intent, occurred_at, now, lane, source
        )
        self._observer.superseded(replaced, intent)
        # It waits for a slot if the other intent did, else takes its place in the buffer.
        self._accumulator.move(
            contact_id, (segment_id, OPPOSITE[intent]), (segment_id, intent), now, lane
        )
        if occurred_at:
            self._occurred[key] = occurred_at
        self._store.record(replaced)

    def _restart(self, assignment: Assignment, change: Change, *, hold_slot: bool) -> None:
        """The pair starts over as `change`, queued under its batch key (its old work is over)."""
        key = assignment.key
        self._live.pop(key, None)
        assignment.intent = change.intent
        assignment.occurred_at = change.occurred_at
        assignment.received_at = change.received_at
        assignment.lane = change.lane
        assignment.source = change.source
        assignment.attempts = 0
        assignment.outcome_unknown = False
        self.transition(assignment, State.QUEUED)
        if change.occurred_at:
            self._occurred[key] = change.occurred_at
        else:
            self._occurred.pop(key, None)
        batch_key = (assignment.segment_id, change.intent)
        accumulator = self._accumulator
        contact_id, lane = assignment.contact_id, change.lane
        if hold_slot or accumulator.admit(contact_id, batch_key, change.received_at, lane):
            accumulator.enqueue(batch_key, contact_id, change.received_at, lane)

    # ---- the sender's side ---------------------------------------------------------------

    def take_for_batch(
        self, batch_key: BatchKey, entries: list[tuple[str, float | None, Lane | None]]
    ) -> list[str]:
        """The buffer entries the sender took for a batch become live assignments; their ids.

        A retry id is live already; a fresh one gets its object now, with its received time
        and lane.
        """
        segment_id, intent = batch_key
        contact_ids = []
        for contact_id, received_at, lane in entries:
            key = (contact_id, segment_id)
            if key not in self._live:
                at = received_at if received_at is not None else self._wall()
                self._live[key] = Assignment(
                    contact_id=contact_id,
                    segment_id=segment_id,
                    received_at=at,
                    updated_at=at,
                    intent=intent,
                    occurred_at=self._occurred.pop(key, 0.0),
                    lane=lane or Lane.LIVE,
                )
            contact_ids.append(contact_id)
        return contact_ids

    def sending(
        self, batch_key: BatchKey, contact_ids: list[str], *, new_attempt: bool = True
    ) -> None:
        """The ids are about to be sent; `new_attempt` counts one more attempt for each."""
        for assignment in self.pending_for(batch_key, contact_ids):
            if new_attempt:
                assignment.attempts += 1
            self.transition(assignment, State.SENDING)

    def retrying(self, batch_key: BatchKey, contact_ids: list[str]) -> None:
        """The ids wait for a backoff before their next attempt."""
        for assignment in self.pending_for(batch_key, contact_ids):
            self.transition(assignment, State.RETRYING)

    def written(self, batch_key: BatchKey, contact_ids: list[str]) -> list[Assignment]:
        """CXone holds these writes (maybe not yet indexed); returns those to confirm now."""
        return self._leave_write_path(batch_key, contact_ids, State.WRITTEN)

    def uncertain(
        self, batch_key: BatchKey, contact_ids: list[str], message: str
    ) -> list[Assignment]:
        """The last attempt's outcome is unknown (5xx, timeout, reset); returns those to settle.

        CXone may have applied the write before failing to answer: the pairs leave the write
        path as `verifying`, their message saying why, for reads to settle them.
        """
        return self._leave_write_path(
            batch_key, contact_ids, State.VERIFYING, message=f"settling by reads: {message}"
        )

    def _leave_write_path(
        self, batch_key: BatchKey, contact_ids: list[str], state: State, *, message: str = ""
    ) -> list[Assignment]:
        """Move the pairs whose write has an outcome to `state`; those that go on to validation.

        A pair whose newer change of the other intent waited for this outcome starts over as
        that change instead, in the same slot; the others free their contact's slot.
        """
        leaving = []
        for assignment in self.pending_for(batch_key, contact_ids):
            self.transition(assignment, state, message=message)
            if not self._follow(assignment):
                self._accumulator.release(assignment.contact_id)
                leaving.append(assignment)
        return leaving

    def _follow(self, assignment: Assignment) -> bool:
        """Start the newer change that waited for this outcome, if one did, in the same slot.

        A newer change of the other intent came while the request was out: it follows now,
        instead of this outcome being confirmed (or dead-lettered).
        """
        successor = self._successors.pop(assignment.key, None)
        if successor is None:
            return False
        self._observer.superseded(assignment, successor.intent)
        self._restart(assignment, successor, hold_slot=True)
        return True

    def failed(
        self, batch_key: BatchKey, contact_ids: list[str], reason: FailureReason, message: str
    ) -> None:
        """These assignments end failed (dead letters), unless a newer change follows them."""
        for assignment in self.pending_for(batch_key, contact_ids):
            if not self._follow(assignment):
                self._accumulator.release(assignment.contact_id)
                self.transition(assignment, State.FAILED, reason=reason, message=message)

    # ---- the verifier's side (`scheduler.validation.VerificationSink`) -------------------

    def verifying(self, assignments: Iterable[Assignment]) -> None:
        """The verifier started checking these."""
        for assignment in assignments:
            if assignment.state is State.WRITTEN:
                self.transition(assignment, State.VERIFYING)

    def confirm(self, assignments: Iterable[Assignment]) -> None:
        """The verifier saw these writes indexed: adds are active, removals removed."""
        for assignment in assignments:
            done = State.ACTIVE if assignment.intent is Intent.ADD else State.REMOVED
            self.transition(assignment, done)

    def fail(self, assignments: Iterable[Assignment], reason: FailureReason, message: str) -> None:
        """The verifier gave up on these."""
        for assignment in assignments:
            self.transition(assignment, State.FAILED, reason=reason, message=message)

    # ---- taking work back from the journal (`scheduler.recovery`) ------------------------

    def hold_live(self, assignment: Assignment) -> None:
        """A recovered pair past queued: live from here on."""
        self._live[assignment.key] = assignment

    def hold_waiting(self, key: AssignmentKey, change: Change) -> None:
        """A recovered change that waited for its pair's batch: it follows the batch again."""
        self._occurred.pop(key, None)
        self._successors[key] = change

    def hold_time(self, key: AssignmentKey, occurred_at: float) -> None:
        """The CRM's time of a recovered queued change."""
        self._occurred[key] = occurred_at

    # ---- letting segments go -------------------------------------------------------------

    def drop(self, segments: set[str]) -> int:
        """Let every pair of these segments go from memory, recording nothing; how many.

        Their journal rows stay as they are (queued, retrying, written, ...) for their next
        owner. Contact slots they held are freed, and waiters of their pairs go on reading the
        journal.
        """
        states: Counter[State] = Counter()
        slots: list[str] = []
        parked, buffered = self._accumulator.drop(segments)
        parked_live: set[AssignmentKey] = set()  # recovered retrying pairs waiting for a slot
        for contact_id, batch_key in parked:
            key = (contact_id, batch_key[0])
            if key in self._live:
                parked_live.add(key)  # counted with the live ones; it holds no slot
                continue
            self.pending_writes -= 1
            self._occurred.pop(key, None)
            states[State.QUEUED] += 1
        for contact_id, batch_key in buffered:
            key = (contact_id, batch_key[0])
            self._occurred.pop(key, None)
            if key not in self._live:  # a live one (a retry id) is counted below
                slots.append(contact_id)
                self.pending_writes -= 1
                states[State.QUEUED] += 1
        for key in [k for k in self._live if k[1] in segments]:
            assignment = self._live.pop(key)
            states[assignment.state] += 1
            if assignment.state in WRITE_PENDING_STATES:
                # Each write-pending live pair holds one slot (a change waiting for it shares it),
                # unless it was parked waiting for one.
                self.pending_writes -= 1
                if key not in parked_live:
                    slots.append(assignment.contact_id)
        for key in [k for k in self._successors if k[1] in segments]:
            del self._successors[key]
        for key in [k for k in self._occurred if k[1] in segments]:
            del self._occurred[key]
        self._waiters.cancel(self._waiters.keys_of(segments))
        for contact_id in slots:
            self._accumulator.release(contact_id)
        if states:
            self._observer.let_go(states)
        return sum(states.values())


# States in which a live pair's journey here ends: terminal ones. (`written` ends it too when
# nothing confirms writes: the sender then calls `finish` itself.)
_ENDING = frozenset({State.ACTIVE, State.REMOVED, State.FAILED})


def _started(  # noqa: PLR0917 (one pair's start, every field of it)
    contact_id: str,
    segment_id: str,
    state: State,
    intent: Intent,
    occurred_at: float,
    now: float,
    lane: Lane,
    source: str,
) -> Assignment:
    """The row of a pair starting at `now` in `state` (the ledger's starts share its shape)."""
    return Assignment(
        contact_id,
        segment_id,
        state=state,
        received_at=now,
        updated_at=now,
        intent=intent,
        occurred_at=occurred_at,
        lane=lane,
        source=source,
    )
