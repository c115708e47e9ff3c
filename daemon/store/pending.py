"""What a durable journal has queued for its next transaction: shared by SQLite and PostgreSQL.

Writes are queued here without blocking the event loop, coalesced per key where that is safe,
and committed together by the backend's writer; a transaction that fails is retried with what
was queued after it absorbed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from scheduler.model import Assignment
from scheduler.store import BatchRecord, ContactHistory

AssignmentRow = tuple[str, str, str, str | None, str, int, float, float, str, float]
"""contact, segment, state, reason, message, attempts, received_at, updated_at, intent,
occurred_at: an assignment as both journals' `assignments` table holds it."""

InboxRow = tuple[int, str, str, str, float, float, str | None, str]
"""shard, contact, segment, intent, occurred_at, received_at, dead-letter reason, message: a
change forwarded to the owner of its segment."""


@dataclass
class PendingWork:
    """Changes queued for the next transaction, coalesced per key where that is safe."""

    assignments: dict[tuple[str, str], AssignmentRow] = field(default_factory=dict)
    # contact id -> the segments of `assignments` recorded for it (lookups by contact).
    contacts: dict[str, set[str]] = field(default_factory=dict)
    history: dict[tuple[str, str], list[tuple[str, float]]] = field(default_factory=dict)
    batches_saved: dict[str, BatchRecord] = field(default_factory=dict)
    batches_dropped: set[str] = field(default_factory=set)
    # (source, delivery id) -> (answer, when); the first answer queued for a key is kept.
    deliveries: dict[tuple[str, str], tuple[bytes, float]] = field(default_factory=dict)
    budget: dict[str, float] = field(default_factory=dict)
    confirmations: dict[tuple[str, str], tuple[float, bool]] = field(default_factory=dict)
    stale: list[tuple[str, str, str, float, float]] = field(default_factory=list)
    # contact id -> (newest mirror time, when recorded)
    mirrors: dict[str, tuple[float, float]] = field(default_factory=dict)
    notifications_added: dict[str, tuple[bytes, float]] = field(default_factory=dict)
    notifications_done: set[str] = field(default_factory=set)
    # Changes for segments another process owns (a shared journal only): rows of its inbox,
    # and inbox rows this process has taken into its engine (deleted with what they became).
    inbox: list[InboxRow] = field(default_factory=list)
    inbox_done: dict[int, int] = field(default_factory=dict)  # inbox row id -> its shard
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def empty(self) -> bool:
        """Whether there is nothing to write (waiters alone need no transaction)."""
        return not (
            self.assignments
            or self.batches_saved
            or self.batches_dropped
            or self.deliveries
            or self.budget
            or self.confirmations
            or self.stale
            or self.mirrors
            or self.notifications_added
            or self.notifications_done
            or self.inbox
            or self.inbox_done
        )

    def absorb(self, later: PendingWork) -> None:
        """Add changes made after these (used when a failed transaction is retried)."""
        self.assignments.update(later.assignments)
        for contact_id, segments in later.contacts.items():
            self.contacts.setdefault(contact_id, set()).update(segments)
        for key, steps in later.history.items():
            self.history.setdefault(key, []).extend(steps)
        for batch_id, batch in later.batches_saved.items():
            self.batches_saved[batch_id] = batch
            self.batches_dropped.discard(batch_id)
        for batch_id in later.batches_dropped:
            self.batches_saved.pop(batch_id, None)
            self.batches_dropped.add(batch_id)
        for key, value in later.deliveries.items():
            self.deliveries.setdefault(key, value)
        self.budget.update(later.budget)
        self.confirmations.update(later.confirmations)
        self.stale.extend(later.stale)
        for contact_id, (occurred_at, at) in later.mirrors.items():
            earlier = self.mirrors.get(contact_id)
            if earlier is None or occurred_at > earlier[0]:
                self.mirrors[contact_id] = (occurred_at, at)
        for event_id, value in later.notifications_added.items():
            self.notifications_added[event_id] = value
            self.notifications_done.discard(event_id)
        for event_id in later.notifications_done:
            self.notifications_added.pop(event_id, None)
            self.notifications_done.add(event_id)
        self.inbox.extend(later.inbox)
        self.inbox_done.update(later.inbox_done)
        self.waiters.extend(later.waiters)

    def delivery_rows(self) -> list[tuple[str, str, bytes, float]]:
        """The queued deliveries as (source, delivery id, answer, received_at)."""
        return [(s, d, answer, at) for (s, d), (answer, at) in self.deliveries.items()]


# Finished assignments older than the retention horizon ($1), as both journals prune them: a
# confirmed removal, and a failure that cannot have left a membership in CXone (one never sent,
# or one CXone refused for certain). What may hold a membership stays tracked, past retention.
PRUNE_FINISHED = (
    "DELETE FROM assignments WHERE updated_at < $1 AND (state = 'removed' OR (state = 'failed' "
    "AND (attempts = 0 OR reason IS NULL OR reason NOT IN ('retries_exhausted', 'not_indexed'))))"
)


def batch_row(batch: BatchRecord, saved_at: float) -> tuple[str, str, str, str, int, float, str]:
    """A batch as both journals' `batches` table holds it (its ids as a JSON array)."""
    return (
        batch.batch_id,
        batch.segment_id,
        orjson.dumps(list(batch.contact_ids)).decode(),
        batch.idempotency_key,
        batch.attempt,
        saved_at,
        str(batch.intent),
    )


def merge_newer(rows: dict[str, Assignment], queued: dict[str, Assignment]) -> None:
    """Lay rows seen queued before a read over what the read found, unless the read's is newer.

    A row queued before the read may have been committed, and overtaken by a newer one, while
    the read waited: the read then holds the newer state, which the older copy must not undo.
    """
    for segment_id, assignment in queued.items():
        found = rows.get(segment_id)
        if found is None or assignment.updated_at >= found.updated_at:
            rows[segment_id] = assignment


Queued = tuple[dict[str, Assignment], float]
"""A contact's rows and newest mirror time not committed yet."""


def assemble_histories(
    wanted: list[str],
    committed: list[Assignment],
    committed_mirrors: dict[str, float],
    before: dict[str, Queued],
    after: Callable[[str], Queued],
) -> dict[str, ContactHistory]:
    """Each contact's history from a read and what was queued before and after it.

    `before` was taken before the read, `after(contact)` is asked after it: a row committed
    while the read ran is in one of the three, and the newest of them wins.
    """
    found = {contact_id: ContactHistory({}, 0.0) for contact_id in wanted}
    for assignment in committed:
        found[assignment.contact_id].assignments[assignment.segment_id] = assignment
    for contact_id in wanted:
        history = found[contact_id]
        early, early_mirror = before[contact_id]
        late, late_mirror = after(contact_id)
        merge_newer(history.assignments, early)
        history.assignments.update(late)
        history.mirrored_at = max(committed_mirrors.get(contact_id, 0.0), early_mirror, late_mirror)
    return found
