"""What a durable journal has queued for its next transaction: shared by SQLite and PostgreSQL.

Writes are queued here without blocking the event loop, coalesced per key where that is safe,
and committed together by the backend's writer; a transaction that fails is retried with what
was queued after it absorbed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from daemon.store.sql import (
    ASSIGNMENTS,
    BATCHES,
    BATCHES_DONE,
    CONFIRMATIONS,
    DELIVERIES,
    DRIFT,
    MIRRORS,
    NOTIFICATIONS,
    NOTIFICATIONS_DONE,
    PASS_CLAIMS,
    PASS_PROGRESS,
    PASS_STARTS,
    REFRESH_BUDGET,
    STALE_CHANGES,
    Delete,
    Update,
    Upsert,
    batch_row,
)
from scheduler.store import BatchRecord

AssignmentRow = tuple[str, str, str, str | None, str, int, float, float, str, float, str, str]
"""contact, segment, state, reason, message, attempts, received_at, updated_at, intent,
occurred_at, lane, source: an assignment as both journals' `assignments` table holds it (a
source of '' keeps the one the journal has: see `sql.ASSIGNMENTS`)."""

InboxRow = tuple[int, str, str, str, float, float, str | None, str, str, bool, str]
"""shard, contact, segment, intent, occurred_at, received_at, dead-letter reason, message, lane,
repair, source: a change forwarded to the owner of its segment."""


def keeping_source(row: AssignmentRow, earlier: AssignmentRow | None) -> AssignmentRow:
    """`row`, with `earlier`'s source when it has none of its own.

    Rows of one pair coalesced in a transaction (or in a retried one) keep the source of the
    row that started the pair.
    """
    if row[11] or earlier is None or not earlier[11]:
        return row
    return (*row[:11], earlier[11])


@dataclass
class PendingWork:
    """Changes queued for the next transaction, coalesced per key where that is safe."""

    assignments: dict[tuple[str, str], AssignmentRow] = field(default_factory=dict)
    # contact id -> the segments of `assignments` recorded for it (lookups by contact).
    contacts: dict[str, set[str]] = field(default_factory=dict)
    # The history column's text of each pair's transitions in this transaction, "state:time;".
    history: dict[tuple[str, str], str] = field(default_factory=dict)
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
    # Reconcile passes begun, taken over (id -> runner) and progressed (id -> the newest
    # figures), and the drift found (daemon/store/sql.py's `pass_row`, `DRIFT`).
    pass_starts: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    pass_claims: dict[str, str] = field(default_factory=dict)
    pass_progress: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    drift: list[tuple[str, str, str, str, float, bool]] = field(default_factory=list)
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
            or self.pass_starts
            or self.pass_claims
            or self.pass_progress
            or self.drift
        )

    def absorb(self, later: PendingWork) -> None:
        """Add changes made after these (used when a failed transaction is retried)."""
        for key, row in later.assignments.items():
            self.assignments[key] = keeping_source(row, self.assignments.get(key))
        for contact_id, segments in later.contacts.items():
            self.contacts.setdefault(contact_id, set()).update(segments)
        for key, steps in later.history.items():
            self.history[key] = self.history.get(key, "") + steps
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
        for pass_id, row in later.pass_starts.items():
            self.pass_starts.setdefault(pass_id, row)
        self.pass_claims.update(later.pass_claims)
        self.pass_progress.update(later.pass_progress)
        self.drift.extend(later.drift)
        self.waiters.extend(later.waiters)

    def _assignment_rows(self) -> list[tuple[Any, ...]]:
        """The assignments' rows, each ending with its history column.

        That column holds this transaction's transitions of the pair, "state:time;", kept as
        text from the moment each was recorded (see `WriteBehindJournal.record`).
        """
        steps_of = self.history.get
        return [(*row, steps_of(key, "")) for key, row in self.assignments.items()]

    def writes(
        self, saved_at: float
    ) -> list[tuple[Upsert | Delete | Update, list[tuple[Any, ...]]]]:
        """What a transaction writes, statement by statement, as rows in the columns' order.

        `saved_at` is the time of the batches saved. Both journals apply the same list, each
        with its own statements for it (`daemon/store/sql.py`).
        """
        writes: list[tuple[Upsert | Delete | Update, list[tuple[Any, ...]]]] = []
        if self.assignments:
            writes.append((ASSIGNMENTS, self._assignment_rows()))
        if self.batches_saved:
            writes.append((BATCHES, [batch_row(b, saved_at) for b in self.batches_saved.values()]))
        if self.batches_dropped:
            writes.append((BATCHES_DONE, [(batch_id,) for batch_id in self.batches_dropped]))
        if self.deliveries:
            writes.append(
                (
                    DELIVERIES,
                    [(s, d, answer, at) for (s, d), (answer, at) in self.deliveries.items()],
                )
            )
        if self.budget:
            writes.append((REFRESH_BUDGET, list(self.budget.items())))
        if self.confirmations:
            writes.append(
                (CONFIRMATIONS, [(c, s, at, m) for (c, s), (at, m) in self.confirmations.items()])
            )
        if self.stale:
            writes.append((STALE_CHANGES, list(self.stale)))
        if self.mirrors:
            writes.append(
                (MIRRORS, [(c, occurred, at) for c, (occurred, at) in self.mirrors.items()])
            )
        if self.notifications_added:
            writes.append(
                (
                    NOTIFICATIONS,
                    [(e, body, at) for e, (body, at) in self.notifications_added.items()],
                )
            )
        if self.notifications_done:
            writes.append((NOTIFICATIONS_DONE, [(e,) for e in self.notifications_done]))
        if self.pass_claims:
            writes.append((PASS_CLAIMS, list(self.pass_claims.items())))
        if self.pass_progress:
            writes.append((PASS_PROGRESS, list(self.pass_progress.values())))
        if self.pass_starts:
            writes.append((PASS_STARTS, list(self.pass_starts.values())))
        if self.drift:
            writes.append((DRIFT, list(self.drift)))
        return writes
