"""An in-memory Store: nothing survives the process. For tests and `store.url = "memory://"`."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence

from daemon.store.base import DriftFinding, JournalStore, Recovered, dead_letter_key
from daemon.store.sql import DeadLetterKey
from scheduler.model import Assignment, AssignmentKey, FailureReason, State
from scheduler.reconcile import PassState, ReconcilePass
from scheduler.store import BatchRecord, ContactHistory
from scheduler.validation_state import MemoryRefreshBudget

# Redelivery memory is bounded: a webhook sender retries within hours, not forever.
MAX_DELIVERIES = 1_000_000
MAX_STALE = 10_000


class MemoryStore(JournalStore):
    """Keeps the latest snapshot of every assignment and the in-flight batches in dictionaries."""

    def __init__(self) -> None:
        self._assignments: dict[AssignmentKey, Assignment] = {}
        self._by_contact: dict[str, dict[str, Assignment]] = {}
        self._batches: dict[str, BatchRecord] = {}
        self._deliveries: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self.stale: list[tuple[str, str, str, float, float]] = []
        # Per contact, the time of the newest mirror (`set`) applied.
        self._mirrors: dict[str, float] = {}
        self._refresh = MemoryRefreshBudget()
        self._notifications: OrderedDict[str, bytes] = OrderedDict()
        self._passes: dict[str, ReconcilePass] = {}
        self._drift: dict[str, list[DriftFinding]] = {}
        self._created_at = time.time()

    async def open(self) -> Recovered:
        """Nothing survives a process: nothing to recover."""
        return Recovered()

    def record(self, assignment: Assignment) -> None:
        """Keep a copy of the assignment as it is now (and its source, when it names none)."""
        key = assignment.key
        previous = self._assignments.get(key)
        # The store keeps the history: one step per record, a fresh start (queued) begins anew.
        step = (assignment.state, assignment.updated_at)
        if previous is None or previous.history is None or assignment.state is State.QUEUED:
            history = [step]
        elif previous.history[-1:] == [step]:
            # Recorded again without a transition (its lane or time changed): no new step.
            history = previous.history
        else:
            history = [*previous.history, step]
        # The source is written by the rows that start a pair; later ones keep it (as in
        # `sql.ASSIGNMENTS`).
        source = assignment.source or (previous.source if previous is not None else "")
        snapshot = dataclasses.replace(assignment, history=history, source=source)
        self._assignments[key] = snapshot
        self._by_contact.setdefault(assignment.contact_id, {})[assignment.segment_id] = snapshot

    def record_stale(
        self, contact_id: str, segment_id: str, intent: str, occurred_at: float, at: float
    ) -> None:
        """Keep the stale change (the most recent MAX_STALE)."""
        self.stale.append((contact_id, segment_id, intent, occurred_at, at))
        del self.stale[:-MAX_STALE]

    def record_mirror(self, contact_id: str, occurred_at: float) -> None:
        """Keep the contact's newest mirror time."""
        if occurred_at > self._mirrors.get(contact_id, 0.0):
            self._mirrors[contact_id] = occurred_at

    async def histories(self, contact_ids: Sequence[str]) -> dict[str, ContactHistory]:
        """Each contact's assignments by segment and newest mirror time."""
        return {
            contact_id: ContactHistory(
                dict(self._by_contact.get(contact_id, {})), self._mirrors.get(contact_id, 0.0)
            )
            for contact_id in dict.fromkeys(contact_ids)
        }

    async def flush(self) -> None:
        """Nothing to wait for: records are applied at once."""

    async def save_batch(self, batch: BatchRecord) -> None:
        """Remember the batch until it is dropped."""
        self._batches[batch.batch_id] = batch

    async def drop_batch(self, batch_id: str) -> None:
        """Forget the batch."""
        self._batches.pop(batch_id, None)

    async def contact(self, contact_id: str) -> list[Assignment]:
        """The contact's assignments, by segment id."""
        found = self._by_contact.get(contact_id, {})
        return [found[segment] for segment in sorted(found)]

    def _failed(
        self, reason: FailureReason | None, segment_id: str | None, source: str | None
    ) -> list[Assignment]:
        """Every dead letter the filter keeps, in the list's order (a walk: memory is for tests)."""
        failed = [
            a
            for a in self._assignments.values()
            if a.state is State.FAILED
            and (reason is None or a.reason is reason)
            and (segment_id is None or a.segment_id == segment_id)
            and (source is None or a.source == source)
        ]
        failed.sort(key=dead_letter_key)
        return failed

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
        """Failed assignments, oldest failure first; of the filter's reason, segment and source."""
        failed = [
            a
            for a in self._failed(reason, segment_id, source)
            if (after is None or dead_letter_key(a) > after)
            and (through is None or dead_letter_key(a) <= through)
        ]
        return failed[:limit]

    async def count_failed(
        self,
        *,
        reason: FailureReason | None = None,
        segment_id: str | None = None,
        source: str | None = None,
    ) -> tuple[int, DeadLetterKey | None]:
        """How many dead letters the filter keeps, and the newest one's key."""
        failed = self._failed(reason, segment_id, source)
        return len(failed), dead_letter_key(failed[-1]) if failed else None

    async def failed_by_segment(self) -> dict[str, int]:
        """Dead letters per segment."""
        return dict(
            Counter(a.segment_id for a in self._assignments.values() if a.state is State.FAILED)
        )

    async def counts(self) -> dict[str, int]:
        """Assignments per state."""
        return dict(Counter(str(a.state) for a in self._assignments.values()))

    async def delivery(self, source: str, delivery_id: str) -> bytes | None:
        """The remembered answer, if any."""
        return self._deliveries.get((source, delivery_id))

    async def remember_delivery(self, source: str, delivery_id: str, answer: bytes) -> None:
        """Remember the answer; the oldest are forgotten past MAX_DELIVERIES."""
        self._deliveries[(source, delivery_id)] = answer
        while len(self._deliveries) > MAX_DELIVERIES:
            self._deliveries.popitem(last=False)

    async def check_writable(self) -> None:
        """Memory is always writable."""

    async def close(self) -> None:
        """Nothing to release."""

    def remember_confirmation(
        self, contact_id: str, segment_id: str, at: float, member: bool = True
    ) -> None:
        """Nothing to keep: the validation cache itself is the memory."""

    def next_allowed(self, segment_id: str) -> float:
        """Wall-clock time from which a refresh is allowed."""
        return self._refresh.next_allowed(segment_id)

    def spend(self, segment_id: str, at: float, next_allowed: float) -> None:
        """Record when the next refresh is allowed."""
        self._refresh.spend(segment_id, at, next_allowed)

    async def try_spend(self, segment_id: str, now: float, next_allowed: float) -> float:
        """Spend the budget if it allows a refresh now; 0.0, or when it will allow one."""
        return await self._refresh.try_spend(segment_id, now, next_allowed)

    def add(self, event_id: str, body: bytes) -> None:
        """Keep a notification to deliver."""
        self._notifications[event_id] = body

    def done(self, event_id: str) -> None:
        """Forget a delivered notification."""
        self._notifications.pop(event_id, None)

    def pending(self) -> list[tuple[str, bytes]]:
        """Notifications not yet delivered, oldest first."""
        return list(self._notifications.items())

    # ---- drift reconcile ------------------------------------------------------------------------

    async def tracked_page(self, after: AssignmentKey, limit: int) -> list[Assignment]:
        """Tracked memberships after `after`, in key order (sorted per page: for trials)."""
        keys = sorted(
            key
            for key, a in self._assignments.items()
            if key > after and a.state in (State.ACTIVE, State.REMOVED)
        )
        return [self._assignments[key] for key in keys[:limit]]

    async def tracked_count(self) -> int:
        """How many memberships are tracked."""
        tracked = (State.ACTIVE, State.REMOVED)
        return sum(1 for a in self._assignments.values() if a.state in tracked)

    def start_pass(self, reconcile_pass: ReconcilePass) -> None:
        """Keep the pass, unless another is running."""
        if any(p.state is PassState.RUNNING for p in self._passes.values()):
            return
        self._passes[reconcile_pass.id] = dataclasses.replace(reconcile_pass)

    async def last_scheduled_pass(self) -> ReconcilePass | None:
        """The newest pass the schedule started."""
        scheduled = [p for p in self._passes.values() if p.scheduled]
        newest = max(scheduled, key=lambda p: (p.started_at, p.id), default=None)
        return dataclasses.replace(newest) if newest is not None else None

    def claim_pass(self, pass_id: str, runner: str) -> None:
        """Make `runner` the pass's runner."""
        found = self._passes.get(pass_id)
        if found is not None and found.state is PassState.RUNNING:
            found.runner = runner

    def save_pass(self, reconcile_pass: ReconcilePass) -> None:
        """Keep the pass's figures, if it is still its runner's."""
        found = self._passes.get(reconcile_pass.id)
        if (
            found is not None
            and found.runner == reconcile_pass.runner
            and found.state is PassState.RUNNING
        ):
            self._passes[reconcile_pass.id] = dataclasses.replace(reconcile_pass)

    def record_drift(
        self, held: Assignment, reconcile_pass: ReconcilePass, found_at: float, requeued: bool
    ) -> None:
        """Keep the finding and the pass's progress."""
        finding = DriftFinding(held.segment_id, held.intent, reconcile_pass.id, found_at, requeued)
        self._drift.setdefault(held.contact_id, []).append(finding)
        self.save_pass(reconcile_pass)

    async def running_pass(self) -> ReconcilePass | None:
        """The pass running, if any."""
        running = [p for p in self._passes.values() if p.state is PassState.RUNNING]
        return dataclasses.replace(running[0]) if running else None

    async def get_pass(self, pass_id: str) -> ReconcilePass | None:
        """One pass."""
        found = self._passes.get(pass_id)
        return dataclasses.replace(found) if found is not None else None

    async def passes(self, limit: int) -> list[ReconcilePass]:
        """Recent passes, newest first."""
        newest = sorted(self._passes.values(), key=lambda p: (p.started_at, p.id), reverse=True)
        return [dataclasses.replace(p) for p in newest[:limit]]

    async def drift_of(self, contact_id: str) -> list[DriftFinding]:
        """The drift found against the contact's pairs, oldest first."""
        return list(self._drift.get(contact_id, ()))

    async def journal_created_at(self) -> float | None:
        """When this store was made."""
        return self._created_at
