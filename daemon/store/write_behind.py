"""A journal that writes behind its callers: what the SQLite and PostgreSQL journals share.

Every write is queued in memory at once (`PendingWork`, no I/O in the caller) and a writer in
the background commits everything queued in ONE transaction, so that concurrent webhooks share
a commit; `flush()` returns once what was queued before it is committed. While commits fail
(a full disk, a database away) nothing is dropped: the failed transaction's changes are kept
(`_carry`), what is queued meanwhile is merged onto them, and the writer retries; `flush()`
raises `StoreUnavailable` meanwhile. Reads merge what is queued or being committed (the
overlays) with what the journal holds, so that they see every change recorded, committed or
not.

The backends differ in how the writer runs and how reads reach the database, and provide
those: SQLite's writer is a thread (a commit's fsync must not hold the event loop) that takes
`_lock` to take its work, and its reads run on a thread of their own; PostgreSQL's writer and
reads are tasks on the event loop (asyncpg), where the lock is never contended. Each writer is
a loop over the same steps: `_take_work`, commit, then `_committed` or `_commit_failed`.
"""

from __future__ import annotations

import abc
import asyncio
import datetime
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from daemon.store.base import DriftFinding, JournalStore
from daemon.store.delivery_filter import DeliveryKey
from daemon.store.pending import AssignmentRow, PendingWork, keeping_source
from daemon.store.sql import (
    CONTACT,
    COUNTS,
    DRIFT_OF_CONTACT,
    FAILED_BY_SEGMENT,
    JOURNAL_CREATED,
    PASS_BY_ID,
    PASS_LAST_SCHEDULED,
    PASS_RUNNING,
    PASSES_NEWEST,
    TRACKED_COUNT,
    TRACKED_PAGE,
    DeadLetterKey,
    assignment_from_row,
    count_failed_query,
    failed_query,
    intent_named,
    lane_named,
    pass_from_row,
    pass_progress_row,
    pass_row,
)
from scheduler.model import Assignment, AssignmentKey, FailureReason, storable
from scheduler.reconcile import ReconcilePass
from scheduler.store import BatchRecord, ContactHistory, StoreUnavailable

log = logging.getLogger(__name__)

#: Rows past retention are deleted this often (`sql.PRUNE_FINISHED`, `sql.PRUNE_EXPIRED`).
PRUNE_INTERVAL_S = 3600.0

Queued = tuple[dict[str, Assignment], float]
"""A contact's rows and newest mirror time not committed yet."""


class WriteBehindJournal(JournalStore):
    """The queue, the overlays and the writer's steps of a durable journal (module docstring).

    A subclass runs the writer (calling `_take_work`, then `_committed` or `_commit_failed`),
    and says how to wake it (`_nudge`), whether it runs (`_writer_problem`), how to run a read
    (`_select`, `_read_histories`) and how to reach the event loop from the writer
    (`_on_loop`).
    """

    def __init__(self, *, shown: str, retention_s: float, clock: Callable[[], float]) -> None:
        self.shown = shown  # how logs and errors name the journal (never with a password)
        self.retention_s = retention_s
        self._clock = clock
        # Guards the queue and the overlays: a writer thread takes its work under it.
        self._lock = threading.Lock()
        self._pending = PendingWork()
        # The transaction the writer is committing (or failed to, and will retry): its changes
        # are in neither `_pending` nor the journal yet.
        self._in_flight: PendingWork | None = None
        # A failed transaction's changes (the same object as `_in_flight` while it waits for its
        # retry), committed first with what was queued since.
        self._carry = PendingWork()
        self.last_error = ""
        self.commits = 0
        self._last_prune = 0.0
        # Kept in memory as well as queued: the poller and the notifier read them synchronously.
        self._refresh: dict[str, float] = {}
        self._notifications: OrderedDict[str, bytes] = OrderedDict()
        # Deliveries remembered but not committed yet (their answers).
        self._unconfirmed: dict[DeliveryKey, bytes] = {}

    # ---- what a backend provides -------------------------------------------------------------

    @abc.abstractmethod
    def _nudge(self) -> None:
        """Wake the writer: the caller holds `_lock` and has queued a change (or a waiter)."""

    @abc.abstractmethod
    def _writer_problem(self) -> str | None:
        """Why nothing queued can be committed now (not open, the writer died), or None.

        Asked with `_lock` held.
        """

    @abc.abstractmethod
    async def _select(self, statement: str, *arguments: Any) -> Sequence[Any]:
        """The rows of a read written with `$N` placeholders (daemon/store/sql.py)."""

    @abc.abstractmethod
    async def _read_histories(self, contact_ids: list[str]) -> tuple[Iterable[Any], Iterable[Any]]:
        """The committed assignment rows and (contact, mirror time) rows of these contacts."""

    @abc.abstractmethod
    def _on_loop(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the event loop (the writer may be a thread of its own)."""

    def _describe(self, exc: BaseException) -> str:
        """A commit's failure as one line, for logs and `last_error`."""
        return str(exc)

    def _flush_error(self, message: str, exc: BaseException) -> StoreUnavailable:
        """What the flushes waiting for a failed commit raise."""
        return StoreUnavailable(message)

    def _deliveries_committed(self, keys: list[DeliveryKey]) -> None:
        """On the loop: these deliveries' answers are committed (no longer only in memory)."""
        for key in keys:
            self._unconfirmed.pop(key, None)

    async def _forwarded(self, contact_id: str) -> Iterable[Any]:
        """The contact's changes queued for another instance's engine (a shared journal's).

        Rows of (segment, intent, occurred_at, received_at, lane), oldest first.
        """
        return ()

    # ---- drift reconcile ------------------------------------------------------------------------

    def start_pass(self, reconcile_pass: ReconcilePass) -> None:
        """Queue a new pass (not written if another is running: `reconcile_one_running`)."""
        with self._lock:
            self._pending.pass_starts[reconcile_pass.id] = pass_row(reconcile_pass)
            self._nudge()

    def claim_pass(self, pass_id: str, runner: str) -> None:
        """Queue taking the pass over for `runner`."""
        with self._lock:
            self._pending.pass_claims[pass_id] = runner
            self._nudge()

    def save_pass(self, reconcile_pass: ReconcilePass) -> None:
        """Queue the pass's newest figures (the last queued before a commit is the one kept)."""
        with self._lock:
            self._pending.pass_progress[reconcile_pass.id] = pass_progress_row(reconcile_pass)
            self._nudge()

    def record_drift(
        self, held: Assignment, reconcile_pass: ReconcilePass, found_at: float, requeued: bool
    ) -> None:
        """Queue a drift found against the pair, and the pass's progress, in one transaction."""
        row = (held.contact_id, held.segment_id, str(held.intent), reconcile_pass.id)
        with self._lock:
            self._pending.drift.append((*row, found_at, requeued))
            self._pending.pass_progress[reconcile_pass.id] = pass_progress_row(reconcile_pass)
            self._nudge()

    async def tracked_page(self, after: AssignmentKey, limit: int) -> list[Assignment]:
        """Tracked memberships after `after`, in key order (committed)."""
        rows = await self._select(TRACKED_PAGE, after[0], after[1], limit)
        return [assignment_from_row(row) for row in rows]

    async def tracked_count(self) -> int:
        """How many memberships are tracked (committed)."""
        [(count,)] = await self._select(TRACKED_COUNT)
        return int(count)

    async def running_pass(self) -> ReconcilePass | None:
        """The pass running, if any."""
        rows = await self._select(PASS_RUNNING)
        return pass_from_row(rows[0]) if rows else None

    async def get_pass(self, pass_id: str) -> ReconcilePass | None:
        """One pass."""
        rows = await self._select(PASS_BY_ID, pass_id)
        return pass_from_row(rows[0]) if rows else None

    async def passes(self, limit: int) -> list[ReconcilePass]:
        """Recent passes, newest first."""
        return [pass_from_row(row) for row in await self._select(PASSES_NEWEST, limit)]

    async def last_scheduled_pass(self) -> ReconcilePass | None:
        """The newest pass the schedule started."""
        rows = await self._select(PASS_LAST_SCHEDULED)
        return pass_from_row(rows[0]) if rows else None

    async def drift_of(self, contact_id: str) -> list[DriftFinding]:
        """The drift found against the contact's pairs, oldest first."""
        return [
            DriftFinding(str(s), intent_named(i), str(p), float(at), bool(requeued))
            for s, i, p, at, requeued in await self._select(DRIFT_OF_CONTACT, contact_id)
        ]

    async def journal_created_at(self) -> float | None:
        """When the journal was created (`journal_info`)."""
        rows = await self._select(JOURNAL_CREATED)
        if not rows:
            return None
        try:
            return datetime.datetime.fromisoformat(str(rows[0][0])).timestamp()
        except ValueError:
            return None

    # ---- writes: queued at once, committed with the next transaction ---------------------------

    def record(self, assignment: Assignment) -> None:
        """Queue the assignment's current state and its latest transition."""
        # Once per transition of every assignment: lookups instead of `setdefault`s that build
        # a set and a list each time, and the message made storable only when there is one.
        contact_id, segment_id = assignment.contact_id, assignment.segment_id
        state = str(assignment.state)
        reason = assignment.reason
        message = assignment.message
        updated_at = assignment.updated_at
        row: AssignmentRow = (
            contact_id,
            segment_id,
            state,
            str(reason) if reason is not None else None,
            storable(message) if message else "",
            assignment.attempts,
            assignment.received_at,
            updated_at,
            str(assignment.intent),
            assignment.occurred_at,
            str(assignment.lane),
            assignment.source,
        )
        key = (contact_id, segment_id)
        with self._lock:
            pending = self._pending
            if not row[11]:
                # A later transition: the source of a start queued before it stays.
                row = keeping_source(row, pending.assignments.get(key))
            pending.assignments[key] = row
            segments = pending.contacts.get(contact_id)
            if segments is None:
                pending.contacts[contact_id] = {segment_id}
            else:
                segments.add(segment_id)
            # The history column's text, "state:time;" per transition: a string, which the
            # garbage collector never scans (a list per pending pair it scanned at every full
            # collection, and a large delivery queues a hundred thousand of them).
            step = f"{state}:{updated_at!r};"
            steps = pending.history.get(key)
            if steps is None:
                pending.history[key] = step
            elif not steps.endswith(step):
                # (Recorded again without a transition, its lane or time changed: no new step;
                # across commits, reading the history drops such repeats.)
                pending.history[key] = steps + step
            self._nudge()

    def record_stale(
        self, contact_id: str, segment_id: str, intent: str, occurred_at: float, at: float
    ) -> None:
        """Queue a change that arrived older than the one in progress (it costs no call)."""
        with self._lock:
            self._pending.stale.append((contact_id, segment_id, intent, occurred_at, at))
            self._nudge()

    def record_mirror(self, contact_id: str, occurred_at: float) -> None:
        """Queue the time of a mirror applied to the contact (the newest is kept)."""
        with self._lock:
            earlier = self._pending.mirrors.get(contact_id)
            if earlier is None or occurred_at > earlier[0]:
                self._pending.mirrors[contact_id] = (occurred_at, self._clock())
            self._nudge()

    async def save_batch(self, batch: BatchRecord) -> None:
        """Commit the batch (with its key and contacts) before it is sent."""
        with self._lock:
            self._pending.batches_saved[batch.batch_id] = batch
            self._pending.batches_dropped.discard(batch.batch_id)
        await self.flush()

    async def drop_batch(self, batch_id: str) -> None:
        """Forget the batch (its outcome is recorded); committed with the next transaction."""
        with self._lock:
            if self._pending.batches_saved.pop(batch_id, None) is None:
                self._pending.batches_dropped.add(batch_id)
            self._nudge()

    async def remember_delivery(self, source: str, delivery_id: str, answer: bytes) -> None:
        """Queue the delivery's answer; committed with the webhook's flush.

        The first answer queued for a key is the one kept, in memory as in the journal.
        """
        key = (source, delivery_id)
        self._unconfirmed.setdefault(key, answer)
        with self._lock:
            self._pending.deliveries.setdefault(key, (answer, self._clock()))
            self._nudge()

    def remember_confirmation(
        self, contact_id: str, segment_id: str, at: float, member: bool = True
    ) -> None:
        """Queue a validation-cache entry: what was confirmed (member or not), and when."""
        with self._lock:
            self._pending.confirmations[(contact_id, segment_id)] = (at, member)
            self._nudge()

    def next_allowed(self, segment_id: str) -> float:
        """When the segment may be refreshed next, as this process knows it."""
        return self._refresh.get(segment_id, 0.0)

    def spend(self, segment_id: str, at: float, next_allowed: float) -> None:
        """Record when the next refresh is allowed; committed with the next transaction."""
        self._refresh[segment_id] = next_allowed
        with self._lock:
            self._pending.budget[segment_id] = next_allowed
            self._nudge()

    def add(self, event_id: str, body: bytes) -> None:
        """Queue an event to deliver."""
        self._notifications[event_id] = body
        with self._lock:
            self._pending.notifications_added[event_id] = (body, self._clock())
            self._pending.notifications_done.discard(event_id)
            self._nudge()

    def done(self, event_id: str) -> None:
        """The event was delivered (or dropped for good)."""
        self._notifications.pop(event_id, None)
        with self._lock:
            if self._pending.notifications_added.pop(event_id, None) is None:
                self._pending.notifications_done.add(event_id)
            self._nudge()

    def pending(self) -> list[tuple[str, bytes]]:
        """Events not yet delivered, oldest first."""
        return list(self._notifications.items())

    async def flush(self) -> None:
        """Wait until everything queued so far is committed; StoreUnavailable while it cannot be."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            problem = self._writer_problem()
            if problem is not None:
                raise StoreUnavailable(problem)
            self._pending.waiters.append(future)
            self._nudge()
        await future

    async def check_writable(self) -> None:
        """Raise StoreUnavailable while commits fail, or none lands within 5 s."""
        if self.last_error:
            raise StoreUnavailable(self.last_error)
        try:
            await asyncio.wait_for(self.flush(), 5.0)
        except TimeoutError:
            raise StoreUnavailable(f"journal {self.shown}: no commit within 5 s") from None

    # ---- reads: what the journal holds, with what is queued laid over it -----------------------

    def _uncommitted(self, contact_id: str) -> dict[str, Assignment]:
        """The contact's recorded changes not committed yet, by segment (newest wins)."""
        found: dict[str, Assignment] = {}
        with self._lock:
            for work in (self._in_flight, self._pending):
                if work is None:
                    continue
                for segment in work.contacts.get(contact_id, ()):
                    row = work.assignments[(contact_id, segment)]
                    found[segment] = assignment_from_row((*row[:8], "", *row[8:]))
        return found

    def _uncommitted_mirror(self, contact_id: str) -> float:
        newest = 0.0
        with self._lock:
            for work in (self._in_flight, self._pending):
                if work is not None and contact_id in work.mirrors:
                    newest = max(newest, work.mirrors[contact_id][0])
        return newest

    def _queued(self, contact_id: str) -> Queued:
        return self._uncommitted(contact_id), self._uncommitted_mirror(contact_id)

    async def contact(self, contact_id: str) -> list[Assignment]:
        """The contact's assignments as recorded, committed or not.

        A mirror (`set`) compares with these: a change recorded a moment ago by a concurrent
        request must be seen though its transaction has not committed yet.
        """
        # Taken before the read too: a change committed while the read runs may be missing from
        # the read's snapshot and gone from the queue after it.
        before = self._uncommitted(contact_id)
        # Read first: one taken into its owner's engine meanwhile is in the assignments read
        # after it (what it became).
        forwarded = await self._forwarded(contact_id)
        rows = await self._select(CONTACT, contact_id)
        committed = {row[1]: assignment_from_row(row) for row in rows}
        merged = dict(committed)
        merge_newer(merged, before)
        merged.update(self._uncommitted(contact_id))
        for segment_id, assignment in merged.items():
            # A later transition's row names no source: the journal's stays, as at commit.
            if not assignment.source and segment_id in committed:
                assignment.source = committed[segment_id].source
        # Changes forwarded to their segment's owner and not taken yet: queued, as they are.
        for segment_id, intent, occurred_at, received_at, lane in forwarded:
            known = merged.get(segment_id)
            version = occurred_at or received_at
            if known is None or version > known.version:
                merged[segment_id] = Assignment(
                    contact_id,
                    segment_id,
                    received_at=received_at,
                    updated_at=received_at,
                    intent=intent_named(intent),
                    occurred_at=occurred_at,
                    lane=lane_named(lane),
                )
        return [merged[segment] for segment in sorted(merged)]

    async def histories(self, contact_ids: Sequence[str]) -> dict[str, ContactHistory]:
        """Each contact's assignments and newest mirror time, committed or not, in one read.

        The intake of a batch (a HubSpot delivery holds 100 contacts) asks once for all of
        them, rather than once per contact and per table.
        """
        wanted = list(dict.fromkeys(contact_ids))
        before = {contact_id: self._queued(contact_id) for contact_id in wanted}
        rows, mirrors = await self._read_histories(wanted)
        return assemble_histories(
            wanted,
            [assignment_from_row(row) for row in rows],
            {str(c): float(at) for c, at in mirrors},
            before,
            self._queued,
        )

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
        """Dead letters, oldest first; of the reason, segment and source given (`failed_query`)."""
        sql, parameters = failed_query(limit, reason, segment_id, after, through, source=source)
        return [assignment_from_row(row) for row in await self._select(sql, *parameters)]

    async def count_failed(
        self,
        *,
        reason: FailureReason | None = None,
        segment_id: str | None = None,
        source: str | None = None,
    ) -> tuple[int, DeadLetterKey | None]:
        """How many dead letters the filter keeps, and the newest one's key (committed rows)."""
        sql, parameters = count_failed_query(reason, segment_id, source)
        ((count, updated_at, contact_id, segment),) = await self._select(sql, *parameters)
        if not count:
            return 0, None
        return int(count), (float(updated_at), str(contact_id), str(segment))

    async def failed_by_segment(self) -> dict[str, int]:
        """Dead letters per segment (committed rows), from the by-segment index alone."""
        return {
            str(segment): int(count) for segment, count in await self._select(FAILED_BY_SEGMENT)
        }

    async def counts(self) -> dict[str, int]:
        """Retained assignments per state."""
        return {str(state): int(count) for state, count in await self._select(COUNTS)}

    # ---- the writer's steps ----------------------------------------------------------------

    def _has_work(self) -> bool:
        """Whether there is anything to commit or a flush to answer (`_lock` held)."""
        pending = self._pending
        return not (pending.empty() and not pending.waiters and self._carry.empty())

    def _take_work(self) -> PendingWork:
        """Everything queued, for one transaction (`_lock` held): a failed one's changes first.

        Swapped and laid out as `_in_flight` in one step, so that a read never finds the
        changes in neither place.
        """
        work, self._pending = self._pending, PendingWork()
        if not self._carry.empty():
            # Later changes are merged onto the failed transaction's.
            self._carry.absorb(work)
            work, self._carry = self._carry, PendingWork()
        self._in_flight = work
        return work

    def _committed(self, work: PendingWork) -> None:
        """After a commit: its flushes return, its deliveries are no longer only in memory."""
        with self._lock:
            self._in_flight = None
        if self.last_error:
            log.warning("journal %s: commits work again", self.shown)
            self.last_error = ""
        waiters, keys = work.waiters, list(work.deliveries)
        if waiters or keys:
            self._on_loop(lambda: self._settle(waiters, keys, None))

    def _commit_failed(self, work: PendingWork, exc: BaseException) -> None:
        """After a failed commit: its flushes fail; its changes are kept for the retry."""
        message = f"journal {self.shown}: commit failed: {self._describe(exc)}"
        if message != self.last_error:
            log.error("%s; keeping %d changes queued and retrying", message, len(work.assignments))
        self.last_error = message
        self._fail_waiters(work, self._flush_error(message, exc))
        with self._lock:
            self._carry = work

    def _fail_waiters(self, work: PendingWork, error: StoreUnavailable) -> None:
        waiters, work.waiters = work.waiters, []
        if waiters:
            self._on_loop(lambda: self._settle(waiters, [], error))

    def _settle(
        self,
        waiters: list[asyncio.Future[None]],
        committed: list[DeliveryKey],
        error: StoreUnavailable | None,
    ) -> None:
        """On the loop: forget answers now committed, then answer the flushes."""
        if committed:
            self._deliveries_committed(committed)
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _prune_due(self) -> bool:
        """Whether an hour has gone by since the last prune (then this one is under way)."""
        now = self._clock()
        if now - self._last_prune < PRUNE_INTERVAL_S:
            return False
        self._last_prune = now
        return True


def merge_newer(rows: dict[str, Assignment], queued: dict[str, Assignment]) -> None:
    """Lay rows seen queued before a read over what the read found, unless the read's is newer.

    A row queued before the read may have been committed, and overtaken by a newer one, while
    the read waited: the read then holds the newer state, which the older copy must not undo.
    """
    for segment_id, assignment in queued.items():
        found = rows.get(segment_id)
        if found is None or assignment.updated_at >= found.updated_at:
            rows[segment_id] = assignment


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
