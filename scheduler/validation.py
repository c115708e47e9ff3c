"""Validation: a written membership becomes `active` only once CXone answers `isMember: true`.

Reads are the scarce budget: CXone takes about 2,000 written ids a second but answers only 50
membership reads, one pair each. So every decision here rests on reads that really happened,
never on wall time alone, and a long read queue is never a failure.

- **Two read queues, one per lane, each earliest due first.** A pair is first due one
  `interval_s` after its write (indexing takes seconds), and again one interval after each read
  that did not show it. A single reader takes due pairs through the `read` rate gate (whose 429
  pauses every read) and starts each read in its own task, so only reads being sent hold a
  task. Under a backlog the queue's own wait spaces the reads: a pair not yet visible goes
  behind every pair of its lane due before it, so pairs are read earliest-written first, none
  starves, and by the time most pairs are read their indexing is done — reads per assignment
  approach 1.
- **Live first, bulk never starved.** When both lanes have due reads, live goes first, but bulk
  keeps at least `ReadLanePolicy.bulk_share_min` of the reads: each live read sent while a bulk
  read was due earns bulk `share / (1 - share)` of a read in credit, and a bulk read goes as
  soon as the credit reaches one (`BulkCredit`, which shares writes the same way). Credit is
  earned only while a bulk read is due, so idle time banks none. A flood of live reads thus
  degrades to first-in-first-out within live, never below bulk's share; when live has nothing
  due, bulk gets every read.
- **A pair is read at most once per interval and never twice at once.**
- **Refresh on evidence.** A pair calls for a refresh of its segment only when a read sent at
  least `window_s` after its write (or after the segment's last refresh) still did not show
  it. CXone allows one refresh per segment per `refresh_min_interval_s`; the budget is spent
  and committed before the refresh is sent. While a refresh is scheduled (budget spent), the
  pairs that called for it are read seldom, at widening intervals (at most `PARKED_READ_MAX_S`
  apart), so that a late index is seen and their deadline holds; every other pair of the
  segment goes on being read as usual. A refresh whose answer was lost (timeout, reset,
  5xx) may have been applied: its pairs are read again first, and only if they still do not
  show is the refresh tried again — so a lost answer costs a read, not a 429.
- **Fail only on evidence.** A pair fails `not_indexed` only when a read sent at least
  `deadline_s` after the write did not show it, after at least `MIN_READS_TO_FAIL` such reads
  and a read after a successful refresh of its segment (or after refreshes kept failing).
  Every outcome is decided where a read's answer arrives, so an answer is always used.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.logthrottle import ThrottledLog
from scheduler.model import LANES, Assignment, BulkCredit, FailureReason, Intent, Lane, State
from scheduler.observer import EngineObserver
from scheduler.ratelimit import AdmissionGate
from scheduler.retry import RetryPolicy
from scheduler.store import StoreUnavailable
from scheduler.upstream import (
    LOCAL_RESOURCE_WAIT_S,
    CXoneClient,
    LocalResourceError,
    RateLimited,
    SegmentNotFound,
    UpstreamError,
    outcome_of,
    seconds_since,
)
from scheduler.validation_state import ConfirmationCache, RefreshBudget

log = logging.getLogger(__name__)

#: Reads that must have failed to show a pair before it may fail `not_indexed`.
MIN_READS_TO_FAIL = 3
#: CXone shows a refreshed segment's pending writes within 1 s; read a little after that.
REFRESH_SETTLE_S = 1.2
#: A pair waiting for a refresh whose budget is spent is read at most this far apart.
PARKED_READ_MAX_S = 240.0
#: Consecutive failed refresh attempts after which a pair past its deadline may fail anyway.
REFRESH_ATTEMPTS_BEFORE_GIVING_UP = 3


@dataclass(frozen=True, slots=True)
class ValidationPolicy:
    """Timing of validation (defaults from the CXone guidance)."""

    interval_s: float = 2.0
    window_s: float = 30.0
    cache_ttl_s: float = 60.0
    refresh_min_interval_s: float = 3600.0
    deadline_s: float = 7200.0


@dataclass(frozen=True, slots=True)
class ReadLanePolicy:
    """How the read budget is shared between the lanes when both have reads due.

    `bulk_share_min` is the least share of reads the bulk lane gets under a live flood
    (0 <= share < 1); live gets the rest, and all of it while bulk has nothing due.
    """

    bulk_share_min: float = 0.2

    def __post_init__(self) -> None:
        BulkCredit(self.bulk_share_min)  # checks the share

    @property
    def credit_per_live_read(self) -> float:
        """Bulk's credit, in reads, for each live read sent while a bulk read was due."""
        return BulkCredit(self.bulk_share_min).per_live


class VerificationSink(Protocol):
    """Where validation reports outcomes (the ledger)."""

    def verifying(self, assignments: Iterable[Assignment]) -> None:
        """Validation has started for these."""
        ...

    def confirm(self, assignments: Iterable[Assignment]) -> None:
        """CXone shows these as members."""
        ...

    def fail(self, assignments: Iterable[Assignment], reason: FailureReason, message: str) -> None:
        """Validation gave up on these."""
        ...


@dataclass(frozen=True, slots=True)
class LaneBacklog:
    """One lane's share of the read backlog."""

    waiting: int  # queued for a read (due now or within an interval)
    oldest_wait_s: float  # how long its longest-overdue queued read has been due
    awaiting_refresh: int  # not read until their segment's scheduled refresh
    reading: int  # reads being sent


@dataclass(frozen=True, slots=True)
class ReadBacklog:
    """How far confirmation lags: pairs waiting for a read and how long the oldest has waited.

    The figures are over both lanes; `lanes` has each lane's own.
    """

    waiting: int  # queued for a read (due now or within an interval)
    oldest_wait_s: float  # how long the longest-overdue queued read has been due
    awaiting_refresh: int  # not read until their segment's scheduled refresh
    reading: int  # reads being sent
    lanes: dict[Lane, LaneBacklog] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SegmentValidation:
    """One segment's validation as the console shows it (`MembershipPoller.by_segment`)."""

    pairs: int  # written pairs being confirmed
    refreshing: bool  # a refresh is scheduled or being sent
    waiting_for_budget: bool  # its refresh waits for the segment's hourly budget


@dataclass(frozen=True, slots=True)
class PairProgress:
    """What validation has observed of one pair so far (wall-clock times)."""

    reads: int  # answered reads that did not show the membership
    last_read_at: float | None
    next_read_at: float | None  # None while reading or waiting for a refresh
    awaiting_refresh: bool


class _Stage(enum.Enum):
    QUEUED = "queued"  # in the read queue
    READING = "reading"  # the gate let its read through; the answer is awaited
    AWAITING_REFRESH = "awaiting_refresh"  # read seldom until its segment's refresh
    IDLE = "idle"  # between stop() and start()


# Stages whose queue entry is live: due reads are sent.
_READABLE = frozenset({_Stage.QUEUED, _Stage.AWAITING_REFRESH})


@dataclass(slots=True)
class _Pair:
    assignment: Assignment
    written_at: float  # monotonic
    window_start: float  # monotonic: the write, or the segment's latest refresh after it
    stage: _Stage = _Stage.IDLE
    ticket: int = -1  # the order number of its live queue entry
    due: float = 0.0
    reads: int = 0  # answered reads that did not show it
    first_read_sent: float | None = None  # monotonic send time of the first of those
    last_read_sent: float = float("-inf")  # when the gate last let a read of it through
    read_after_refresh: bool = False  # one of those reads came after a refresh had settled
    parked_reads: int = 0  # reads while waiting for a refresh (their spacing widens)
    # Set for a pair whose last write's outcome was unknown: the failure it ends with if a
    # window of reads does not show it (no refresh is spent on it).
    unsettled: str | None = None
    # The lane whose queue and counts it is in (its assignment's, unless promoted since).
    lane: Lane = Lane.LIVE


#: A queued read: (due time, ticket, pair, its segment's watch).
_QueuedRead = tuple[float, int, _Pair, "_SegmentWatch"]


@dataclass(slots=True)
class _SegmentWatch:
    segment_id: str
    pairs: dict[str, _Pair] = field(default_factory=dict)
    refresh_task: asyncio.Task[None] | None = None  # scheduled or being sent
    refreshed_at: float | None = None  # monotonic time of the latest successful refresh answer
    refresh_failures: int = 0  # consecutive failed refresh attempts
    waiting_for_budget: bool = False  # its refresh waits for the hour's budget


class ReadsStopped(Exception):
    """The poller stopped: no spare read will be let through until it starts again."""


class MembershipPoller:
    """Confirms written assignments by reading CXone; refreshes segments within their budget."""

    def __init__(
        self,
        *,
        client: CXoneClient,
        read_gate: AdmissionGate,
        sink: VerificationSink,
        cache: ConfirmationCache,
        budget: RefreshBudget,
        policy: ValidationPolicy | None = None,
        lanes: ReadLanePolicy | None = None,
        retry: RetryPolicy | None = None,
        observer: EngineObserver | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        refresh_timeout_s: float = 10.0,
    ) -> None:
        self.policy = policy or ValidationPolicy()
        self.lanes = lanes or ReadLanePolicy()
        self._client = client
        self._read_gate = read_gate
        self._sink = sink
        self._cache = cache
        self._budget = budget
        self._retry = retry or RetryPolicy()
        self._observer = observer or EngineObserver()
        self._rng = rng or random.Random()
        self._clock = clock
        self._wall = wall_clock
        # CXone starts a segment's hour when it processes the refresh, at the latest when our
        # request times out: the spend made before sending reaches that far.
        self._refresh_timeout_s = refresh_timeout_s
        self._watches: dict[str, _SegmentWatch] = {}
        self._reads: set[asyncio.Task[None]] = set()
        # One heap per lane (see the module docstring).
        self._queues: dict[Lane, list[_QueuedRead]] = {lane: [] for lane in LANES}
        # Bulk's credit, in reads, against live reads sent while bulk waited.
        self._bulk_credit = BulkCredit(self.lanes.bulk_share_min)
        self._tickets = itertools.count()
        self._queue_changed = asyncio.Event()
        # Reads waiting for a gate slot validation does not need (`spare_read`), oldest first.
        self._spare_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._reader: asyncio.Task[None] | None = None
        self._running = False
        self._generation = 0  # start() and stop() each begin a new one
        self._counts = {(stage, lane): 0 for stage in _Stage for lane in LANES}
        # CXone's answer that a segment does not exist comes from the CRM's data: warned about,
        # at a bounded rate.
        self._dead_letters = ThrottledLog(log)

    # ---- the Verifier interface the engine calls -------------------------------------------

    def known(self, contact_id: str, segment_id: str) -> bool | None:
        """The membership confirmed within the cache TTL (member or not), or None."""
        return self._cache.known(contact_id, segment_id)

    def forget(self, contact_id: str, segment_id: str) -> None:
        """Stop confirming the pair (a newer change replaces it) and drop its cached value."""
        self._cache.forget(contact_id, segment_id)
        watch = self._watches.get(segment_id)
        pair = watch.pairs.get(contact_id) if watch is not None else None
        if watch is not None and pair is not None:
            self._forget(watch, pair)

    def promote(self, contact_id: str, segment_id: str) -> None:
        """The pair moved to the live lane (a live change joined it): its queued read too.

        Its assignment already says live; a read queued in the bulk heap is queued again, at
        the same time, in the live one (the old entry goes stale).
        """
        watch = self._watches.get(segment_id)
        pair = watch.pairs.get(contact_id) if watch is not None else None
        if watch is None or pair is None:
            return
        lane = pair.assignment.lane
        if pair.lane is lane:
            return
        stage = pair.stage
        self._counts[(stage, pair.lane)] -= 1
        self._counts[(stage, lane)] += 1
        pair.lane = lane
        if stage is _Stage.QUEUED:
            self._enqueue(pair, watch, pair.due)
        elif stage is _Stage.AWAITING_REFRESH:
            pair.ticket = next(self._tickets)
            heapq.heappush(self._queues[lane], (pair.due, pair.ticket, pair, watch))
            self._queue_changed.set()

    def release_segments(self, segments: set[str]) -> None:
        """Stop validating these segments and drop what is cached of them (handed over).

        Reads in flight for them still end, but their outcomes are no longer recorded (the
        engine holds nothing of them); the new owner validates them from the journal.
        """
        self._cache.forget_segments(segments)
        for segment_id in segments:
            watch = self._watches.get(segment_id)
            if watch is None:
                continue
            for pair in list(watch.pairs.values()):
                self._forget(watch, pair)
            task = watch.refresh_task
            if task is not None:
                task.cancel()
            self._watches.pop(segment_id, None)

    def watch(self, assignments: list[Assignment]) -> None:
        """Start validating written assignments."""
        if not assignments:
            return
        self._sink.verifying(assignments)
        self._watch(assignments, None)

    def settle(self, assignments: list[Assignment], message: str) -> None:
        """Read pairs whose last write's outcome is unknown until CXone shows them, or not.

        They are read like written pairs, at widening intervals within their window (most
        such writes did not land, and reads are the scarce budget), then, still not shown, they
        call for a refresh of their segment as any pair does, so that a write indexed late or
        stalled is seen. Shown, they are confirmed; not shown by a read after that refresh (in
        at least `MIN_READS_TO_FAIL` reads), or by reads past the deadline, they fail
        `retries_exhausted` with `message`.
        """
        if assignments:
            self._watch(assignments, message)

    def _watch(self, assignments: list[Assignment], unsettled: str | None) -> None:
        now = self._clock()
        wall_now = self._wall()
        for assignment in assignments:
            # The deadline runs from the write, also for assignments recovered after a restart.
            written = now - max(0.0, wall_now - _written_wall(assignment))
            watch = self._watches.get(assignment.segment_id)
            if watch is None:
                watch = self._watches[assignment.segment_id] = _SegmentWatch(assignment.segment_id)
            replaced = watch.pairs.get(assignment.contact_id)
            window_start = written
            if watch.refreshed_at is not None:
                window_start = max(written, watch.refreshed_at)
            pair = _Pair(
                assignment, written, window_start, unsettled=unsettled, lane=assignment.lane
            )
            if replaced is not None:
                # Written again: the old pair's queue entry and any read in flight go stale,
                # and the new one keeps the old one's spacing from its last read.
                self._counts[(replaced.stage, replaced.lane)] -= 1
                replaced.stage, replaced.ticket = _Stage.IDLE, -1
                pair.last_read_sent = replaced.last_read_sent
            watch.pairs[assignment.contact_id] = pair
            self._counts[(_Stage.IDLE, pair.lane)] += 1
            if self._running:
                self._enqueue(pair, watch, written + self.policy.interval_s)

    @property
    def pending(self) -> int:
        """Assignments waiting for confirmation."""
        return sum(len(w.pairs) for w in self._watches.values())

    def backlog(self) -> ReadBacklog:
        """The read backlog now: how many pairs wait for a read, and for how long, per lane."""
        now = self._clock()
        lanes = {}
        for lane in LANES:
            top = self._top(lane)
            counts = self._counts
            lanes[lane] = LaneBacklog(
                waiting=counts[(_Stage.QUEUED, lane)],
                oldest_wait_s=max(0.0, now - top[0]) if top is not None else 0.0,
                awaiting_refresh=counts[(_Stage.AWAITING_REFRESH, lane)],
                reading=counts[(_Stage.READING, lane)],
            )
        return ReadBacklog(
            waiting=sum(b.waiting for b in lanes.values()),
            oldest_wait_s=max(b.oldest_wait_s for b in lanes.values()),
            awaiting_refresh=sum(b.awaiting_refresh for b in lanes.values()),
            reading=sum(b.reading for b in lanes.values()),
            lanes=lanes,
        )

    def by_segment(self) -> dict[str, SegmentValidation]:
        """Each watched segment's pairs and refresh (read only; a walk of segments, not pairs)."""
        return {
            segment_id: SegmentValidation(
                pairs=len(watch.pairs),
                refreshing=watch.refresh_task is not None and not watch.refresh_task.done(),
                waiting_for_budget=watch.waiting_for_budget,
            )
            for segment_id, watch in self._watches.items()
        }

    def progress(self, contact_id: str, segment_id: str) -> PairProgress | None:
        """What has been observed of a pair under validation; None if it is not watched."""
        watch = self._watches.get(segment_id)
        pair = watch.pairs.get(contact_id) if watch is not None else None
        if pair is None:
            return None
        to_wall = self._wall() - self._clock()
        last = pair.last_read_sent + to_wall if pair.last_read_sent > float("-inf") else None
        return PairProgress(
            reads=pair.reads,
            last_read_at=last,
            next_read_at=pair.due + to_wall if pair.stage in _READABLE else None,
            awaiting_refresh=pair.stage is _Stage.AWAITING_REFRESH,
        )

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start reading (also for assignments handed over before start)."""
        self._running = True
        self._generation += 1
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._run_reader(), name="validation reads")
        for watch in self._watches.values():
            for pair in watch.pairs.values():
                if pair.stage is _Stage.IDLE:
                    due = max(pair.written_at, pair.last_read_sent) + self.policy.interval_s
                    self._enqueue(pair, watch, due)

    async def stop(self) -> None:
        """Stop reading; pending assignments stay `verifying` for a later start. Idempotent."""
        self._running = False
        self._generation += 1
        generation = self._generation
        tasks = [w.refresh_task for w in self._watches.values() if w.refresh_task is not None]
        tasks += list(self._reads)
        if self._reader is not None:
            tasks.append(self._reader)
            self._reader = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._dead_letters.flush()
        while self._spare_waiters:
            waiter = self._spare_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ReadsStopped("validation reads stopped"))
        if self._running or generation != self._generation:
            return  # started (or stopped) again meanwhile: that call owns the queue now
        for queue in self._queues.values():
            queue.clear()
        self._bulk_credit.reset()
        for watch in self._watches.values():
            watch.refresh_task = None
            for pair in watch.pairs.values():
                self._set_stage(pair, _Stage.IDLE)

    # ---- the read queue ----------------------------------------------------------------------

    def _set_stage(self, pair: _Pair, stage: _Stage) -> None:
        self._counts[(pair.stage, pair.lane)] -= 1
        self._counts[(stage, pair.lane)] += 1
        pair.stage = stage

    def _enqueue(self, pair: _Pair, watch: _SegmentWatch, due: float) -> None:
        # Never sooner than one interval after its previous read.
        due = max(due, pair.last_read_sent + self.policy.interval_s)
        pair.ticket = next(self._tickets)
        pair.due = due
        self._set_stage(pair, _Stage.QUEUED)
        heapq.heappush(self._queues[pair.lane], (due, pair.ticket, pair, watch))
        self._queue_changed.set()

    def _forget(self, watch: _SegmentWatch, pair: _Pair) -> None:
        """Stop watching a pair (confirmed or failed); its queue entry, if any, goes stale."""
        if watch.pairs.get(pair.assignment.contact_id) is pair:
            del watch.pairs[pair.assignment.contact_id]
        self._counts[(pair.stage, pair.lane)] -= 1
        pair.stage = _Stage.IDLE
        pair.ticket = -1
        if not watch.pairs:
            task = watch.refresh_task
            if task is not None and task is not asyncio.current_task():
                task.cancel()  # nothing left for a scheduled refresh to release
            watch.refresh_task = None
            if self._watches.get(watch.segment_id) is watch:
                del self._watches[watch.segment_id]

    def _top(self, lane: Lane) -> _QueuedRead | None:
        queue = self._queues[lane]
        while queue:
            entry = queue[0]
            pair = entry[2]
            # A pair waiting for its segment's refresh is read now and then too (`_park`).
            if pair.ticket == entry[1] and pair.stage in _READABLE:
                return entry
            heapq.heappop(queue)  # confirmed, failed or queued again meanwhile
        return None

    async def _run_reader(self) -> None:
        """Keep the read queue drained: one failed iteration must not stop every read."""
        while True:
            try:
                await self._drain_reads()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("validation reads failed; going on")
                await asyncio.sleep(0.1)

    def _next_read(self, now: float) -> tuple[Lane | None, float | None]:
        """The lane whose read goes next if one is due at `now`; else when the next is due.

        Live first; bulk when its credit reached one read, or when live has nothing due.
        """
        live, bulk = self._top(Lane.LIVE), self._top(Lane.BULK)
        live_due = live is not None and live[0] <= now
        bulk_due = bulk is not None and bulk[0] <= now
        if live_due and not (bulk_due and self._bulk_credit.bulk_turn()):
            return Lane.LIVE, None
        if bulk_due:
            return Lane.BULK, None
        dues = [top[0] for top in (live, bulk) if top is not None]
        return None, min(dues) if dues else None

    def _sent(self, lane: Lane, now: float) -> None:
        """Settle bulk's credit for a read of `lane` sent at `now`."""
        bulk = self._top(Lane.BULK) if lane is Lane.LIVE else None
        self._bulk_credit.taken(lane, bulk_waited=bulk is not None and bulk[0] <= now)

    # ---- reads validation does not need ------------------------------------------------------

    async def spare_read(self) -> None:
        """Wait for a slot of the read gate that no validation read is due for.

        For reads of lower rank than every confirmation (drift reconcile): each is let through
        the gate only while validation has nothing due here and the gate has room now (on a
        budget several instances share, its last known state says the others leave room), so
        it never delays a confirmation. Raises `ReadsStopped` if the poller stops meanwhile.
        """
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._spare_waiters.append(waiter)
        self._queue_changed.set()
        try:
            await waiter
        finally:
            if waiter in self._spare_waiters:
                self._spare_waiters.remove(waiter)

    def pause_reads(self, seconds: float) -> None:
        """CXone answered a read 429: the whole read class waits `seconds`."""
        self._read_gate.pause(seconds)

    def _spare_waiting(self) -> bool:
        waiters = self._spare_waiters
        while waiters and waiters[0].done():
            waiters.popleft()
        return bool(waiters)

    async def _lend_slot(self) -> None:
        """Nothing due for validation: take a gate slot for a spare read, unless one fell due."""
        await self._read_gate.acquire()
        lane, _ = self._next_read(self._clock())
        if lane is not None:
            self._send_next(lane)  # validation's after all: it came due while the gate waited
        elif self._spare_waiting():
            self._spare_waiters.popleft().set_result(None)

    async def _drain_reads(self) -> None:
        """Send due reads through the gate, each in its own task (see the module docstring)."""
        changed = self._queue_changed
        while True:
            lane, due = self._next_read(self._clock())
            if lane is None and self._spare_waiting() and (due is None or due > self._clock()):
                if self._read_gate.has_capacity():
                    await self._lend_slot()
                    continue
                # The gate is busy (other instances' reads on a shared budget, or a 429 pause):
                # a spare read goes only when reads leave room, so look again a slot later.
                changed.clear()
                wait_s = 1.0 / max(self._read_gate.rate_per_s, 0.001)
                if due is not None:
                    wait_s = min(wait_s, max(due - self._clock(), 0.0))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), wait_s)
                continue
            if lane is None:
                changed.clear()
                if due is None:
                    await changed.wait()
                else:
                    # An earlier-due read queued meanwhile wakes us to look again.
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(changed.wait(), due - self._clock())
                continue
            await self._read_gate.acquire()
            # The due reads may have changed while we waited for the gate; when none is due
            # any more, the token is lost (which only slows reads).
            now = self._clock()
            lane, _ = self._next_read(now)
            if lane is None:
                if self._spare_waiting():
                    self._spare_waiters.popleft().set_result(None)  # the slot is not lost
                continue
            self._send_next(lane)

    def _send_next(self, lane: Lane) -> None:
        """Send the lane's next due read (a gate slot was just taken for it)."""
        self._sent(lane, self._clock())
        _, _, pair, watch = heapq.heappop(self._queues[lane])
        self._set_stage(pair, _Stage.READING)
        pair.last_read_sent = self._clock()
        task = asyncio.create_task(self._read(pair, watch))
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    # ---- one read ----------------------------------------------------------------------------

    async def _read(self, pair: _Pair, watch: _SegmentWatch) -> None:
        """One membership read the gate let through; decides what the answer means."""
        segment_id = watch.segment_id
        contact_id = pair.assignment.contact_id
        sent = pair.last_read_sent
        started = time.monotonic()
        try:
            result = await self._client.is_member(segment_id, contact_id)
        except RateLimited as exc:
            self._observer.upstream_outcome("read", "rate_limited", seconds_since(started))
            self._read_gate.pause(exc.retry_after_s)
            # Nothing was read: again, with every other read, after the pause.
            self._again(pair, watch, self._clock())
            return
        except SegmentNotFound as exc:
            self._observer.upstream_outcome("read", "permanent", seconds_since(started))
            self._fail_segment(watch, FailureReason.SEGMENT_NOT_FOUND, str(exc))
            return
        except UpstreamError as exc:
            # 5xx, timeouts, resets, no descriptor: nothing was learned; read again later.
            outcome = outcome_of(exc)
            self._observer.upstream_outcome("read", outcome, seconds_since(started))
            # A refused read (403: a missing scope, 401) repeats until someone fixes it: say so
            # where operators look, not at info level.
            level = logging.WARNING if outcome in ("permanent", "auth") else logging.INFO
            log.log(level, "membership read %s/%s failed: %s", segment_id, contact_id, exc)
            self._again(pair, watch, self._clock() + self.policy.interval_s)
            return
        except asyncio.CancelledError:
            if pair.stage is _Stage.READING:
                self._set_stage(pair, _Stage.IDLE)  # cancelled by stop(): start() reads again
            raise
        except Exception:
            # A bug in a client must not leave the pair verifying forever with no read queued.
            log.exception("membership read %s/%s failed unexpectedly", segment_id, contact_id)
            self._again(pair, watch, self._clock() + self.policy.interval_s)
            return
        self._observer.upstream_outcome("read", "ok", seconds_since(started))
        self._observer.membership_read(segment_id, result.is_member, pair.lane)
        if watch.pairs.get(contact_id) is not pair:
            return  # replaced or failed with its segment while the read was out
        # An add is confirmed by the membership showing, a removal by its absence.
        if result.is_member is (pair.assignment.intent is Intent.ADD):
            self._forget(watch, pair)
            self._cache.remember(contact_id, segment_id, result.is_member)
            self._sink.confirm([pair.assignment])
            return
        self._not_shown(pair, watch, sent)

    def _again(self, pair: _Pair, watch: _SegmentWatch, due: float) -> None:
        """Queue the pair for another read (unless it went, or reading stopped, meanwhile)."""
        if watch.pairs.get(pair.assignment.contact_id) is not pair:
            return
        if not self._running:
            self._set_stage(pair, _Stage.IDLE)
            return
        self._enqueue(pair, watch, due)

    def _not_shown(self, pair: _Pair, watch: _SegmentWatch, sent: float) -> None:
        """A read sent at `sent` answered `isMember: false`."""
        policy = self.policy
        pair.reads += 1
        if pair.first_read_sent is None:
            pair.first_read_sent = sent
        if watch.refreshed_at is not None and sent >= watch.refreshed_at + REFRESH_SETTLE_S:
            pair.read_after_refresh = pair.read_after_refresh or (
                watch.refreshed_at > pair.written_at
            )
        past_deadline = sent - pair.written_at >= policy.deadline_s
        if pair.unsettled is not None:
            # Not written after all, once a read after a refresh (which indexes every write
            # made before it) did not show it, or at the deadline as any pair.
            if (pair.read_after_refresh and pair.reads >= MIN_READS_TO_FAIL) or (
                past_deadline and self._may_fail(pair, watch)
            ):
                self._give_up_unsettled(watch, pair, sent)
                return
            if sent - pair.window_start < policy.window_s:
                # Widening within its window: most such writes did not land, and reads are
                # the scarce budget. Past the window it calls for a refresh as any pair.
                self._again(pair, watch, sent + max(policy.interval_s, sent - pair.written_at))
                return
        elif past_deadline and self._may_fail(pair, watch):
            self._give_up(watch, pair, sent)
            return
        if sent - pair.window_start >= policy.window_s:
            # Read after it had a whole window to show, and still missing: needs a refresh.
            self._park(pair, watch, sent)
            self._request_refresh(watch)
            return
        self._again(pair, watch, sent + policy.interval_s)

    def _park(self, pair: _Pair, watch: _SegmentWatch, sent: float) -> None:
        """Let the pair wait for its segment's refresh, read now and then meanwhile.

        A refresh comes within seconds when the segment's budget allows one, and releases the
        pair for a read at once. When the budget is spent, the next refresh may be an hour
        away: the pair is still read, at widening intervals capped at `PARKED_READ_MAX_S`, so
        that a late index is seen and the deadline holds whatever that refresh's time.
        """
        pair.parked_reads += 1
        gap = min(PARKED_READ_MAX_S, self.policy.interval_s * 2.0 ** (pair.parked_reads + 1))
        pair.ticket = next(self._tickets)
        pair.due = sent + gap
        self._set_stage(pair, _Stage.AWAITING_REFRESH)
        heapq.heappush(self._queues[pair.lane], (pair.due, pair.ticket, pair, watch))
        self._queue_changed.set()

    def _may_fail(self, pair: _Pair, watch: _SegmentWatch) -> bool:
        if pair.reads < MIN_READS_TO_FAIL:
            return False
        if pair.read_after_refresh:
            return True
        if watch.refresh_failures >= REFRESH_ATTEMPTS_BEFORE_GIVING_UP:
            return True
        # No refresh shown to it: fail only if none can come in time, which is never the case
        # while one is on its way out (it waits for no budget, only to be sent).
        task = watch.refresh_task
        sending = task is not None and not task.done() and not watch.waiting_for_budget
        return not sending and (
            watch.waiting_for_budget or self.policy.refresh_min_interval_s > self.policy.deadline_s
        )

    # ---- refreshes ---------------------------------------------------------------------------

    def _request_refresh(self, watch: _SegmentWatch) -> None:
        if not self._running:
            return
        if watch.refresh_task is None or watch.refresh_task.done():
            watch.refresh_task = asyncio.create_task(
                self._refresh_when_allowed(watch), name=f"refresh {watch.segment_id}"
            )

    async def _refresh_when_allowed(self, watch: _SegmentWatch) -> None:
        """Refresh the segment as soon as its budget allows, then release its waiting pairs."""
        segment_id = watch.segment_id
        try:
            while watch.pairs:
                wall_now = self._wall()
                reach = wall_now + self.policy.refresh_min_interval_s + self._refresh_timeout_s
                try:
                    allowed = await self._budget.try_spend(segment_id, wall_now, reach)
                except StoreUnavailable as exc:
                    log.warning(
                        "segment %s: refresh postponed, journal unavailable (%s)", segment_id, exc
                    )
                    await asyncio.sleep(self._retry.delay(1, self._rng))
                    continue
                if allowed > wall_now:
                    log.info(
                        "segment %s: refresh budget spent; next refresh in %.0f s, "
                        "%d memberships wait for it",
                        segment_id,
                        allowed - wall_now,
                        sum(p.stage is _Stage.AWAITING_REFRESH for p in watch.pairs.values()),
                    )
                    watch.waiting_for_budget = True
                    try:
                        await asyncio.sleep(allowed - wall_now)
                    finally:
                        watch.waiting_for_budget = False
                    continue
                if await self._send_refresh(watch):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("refresh of segment %s failed unexpectedly", segment_id)
            self._release_awaiting(watch, self._clock() + self.policy.interval_s)

    async def _send_refresh(self, watch: _SegmentWatch) -> bool:
        """Send one refresh (its budget already spent) and act on its answer.

        False when nothing was sent (no file descriptor): the caller tries again.
        """
        segment_id = watch.segment_id
        started = time.monotonic()
        try:
            result = await self._client.refresh(segment_id)
        except LocalResourceError as exc:
            # Nothing was sent: no failure to count and no budget to guess; try again shortly.
            self._observer.upstream_outcome("refresh", "local", seconds_since(started))
            log.warning(
                "refresh of segment %s not sent (%s); again in %.0f s",
                segment_id,
                exc,
                LOCAL_RESOURCE_WAIT_S,
            )
            self._budget.spend(segment_id, self._wall(), 0.0)  # give back what try_spend took
            await asyncio.sleep(LOCAL_RESOURCE_WAIT_S)
            return False
        except SegmentNotFound as exc:
            self._observer.upstream_outcome("refresh", "permanent", seconds_since(started))
            self._fail_segment(watch, FailureReason.SEGMENT_NOT_FOUND, str(exc))
            return True
        except UpstreamError as exc:
            # It may have been applied, even after our timeout (a lost answer). Its pairs are
            # read for a whole window again first: if it was applied they show, and a second
            # refresh would only earn a 429. If they still do not show, they call for a refresh
            # again, allowed by then (after a backoff).
            self._observer.upstream_outcome("refresh", outcome_of(exc), seconds_since(started))
            watch.refresh_failures += 1
            delay = self._retry.delay(watch.refresh_failures, self._rng, exc.retry_after_s)
            self._budget.spend(segment_id, self._wall(), self._wall() + delay)
            log.warning(
                "refresh of segment %s failed (%s); reading its memberships again, "
                "refresh allowed again in %.1f s",
                segment_id,
                exc,
                delay,
            )
            self._release_awaiting(watch, self._clock() + REFRESH_SETTLE_S, new_window=True)
            return True
        if not result.accepted:
            # Refreshed within the hour -- by another tool, or by a refresh of ours whose answer
            # was lost. CXone says when we may; meanwhile, one more read each shows whether that
            # refresh covered these pairs, and those it did not wait for the allowed time.
            self._observer.upstream_outcome("refresh", "rate_limited", seconds_since(started))
            wall_now = self._wall()
            self._budget.spend(segment_id, wall_now, wall_now + result.retry_after_s)
            log.warning(
                "segment %s: refresh refused for %.0f s more; reading once more, then waiting",
                segment_id,
                result.retry_after_s,
            )
            self._release_awaiting(watch, self._clock())
            return True
        self._observer.upstream_outcome("refresh", "ok", seconds_since(started))
        # CXone's hour starts when it processed the refresh, somewhere before its answer reached
        # us: count ours from the answer, so the next refresh can never arrive early.
        answered = self._wall()
        self._budget.spend(segment_id, answered, answered + self.policy.refresh_min_interval_s)
        self._observer.segment_refreshed(segment_id)
        now = self._clock()
        watch.refreshed_at = now
        watch.refresh_failures = 0
        for pair in watch.pairs.values():
            pair.window_start = max(pair.window_start, now)
        log.info("segment %s refreshed for %d pending memberships", segment_id, len(watch.pairs))
        self._release_awaiting(watch, now + REFRESH_SETTLE_S)
        return True
        return

    def _release_awaiting(
        self, watch: _SegmentWatch, due: float, *, new_window: bool = False
    ) -> None:
        """Queue the pairs waiting for a refresh for a read; optionally with a fresh window."""
        for pair in list(watch.pairs.values()):
            if pair.stage is _Stage.AWAITING_REFRESH:
                if new_window:
                    pair.window_start = self._clock()
                pair.parked_reads = 0
                self._enqueue(pair, watch, due)

    # ---- giving up ---------------------------------------------------------------------------

    def _give_up(self, watch: _SegmentWatch, pair: _Pair, sent: float) -> None:
        age = sent - pair.written_at
        first = (pair.first_read_sent or sent) - pair.written_at
        if pair.read_after_refresh:
            refreshed = "including after a refresh of the segment"
        else:
            refreshed = (
                f"with no successful refresh of the segment ({watch.refresh_failures} failed)"
            )
        if pair.assignment.intent is Intent.ADD:
            seen, other = "the membership", "the membership was removed in CXone meanwhile"
        else:
            seen, other = "the removal", "the contact was added back in CXone meanwhile"
        message = (
            f"CXone did not show {seen} in {pair.reads} reads from {first:.0f} s to "
            f"{age:.0f} s after the write, {refreshed}; possible causes: a dynamic segment "
            f"(it accepts direct writes and ignores them), or {other}"
        )
        self._fail_pair(watch, pair, FailureReason.NOT_INDEXED, message)

    def _give_up_unsettled(self, watch: _SegmentWatch, pair: _Pair, sent: float) -> None:
        assert pair.unsettled is not None
        seen = "the membership" if pair.assignment.intent is Intent.ADD else "the removal"
        first = (pair.first_read_sent or sent) - pair.written_at
        refreshed = (
            "including after a refresh of the segment"
            if pair.read_after_refresh
            else "with no refresh of the segment possible in time"
        )
        message = (
            f"{pair.unsettled}; the outcome was unknown, and CXone did not show {seen} in "
            f"{pair.reads} reads from {first:.0f} s to {sent - pair.written_at:.0f} s after it, "
            f"{refreshed}"
        )
        self._fail_pair(watch, pair, FailureReason.RETRIES_EXHAUSTED, message)

    def _fail_pair(
        self, watch: _SegmentWatch, pair: _Pair, reason: FailureReason, message: str
    ) -> None:
        log.warning(
            "segment %s: %s of %s failed (%s): %s",
            watch.segment_id,
            pair.assignment.intent,
            pair.assignment.contact_id,
            reason,
            message,
        )
        self._forget(watch, pair)
        self._sink.fail([pair.assignment], reason, message)

    def _fail_segment(self, watch: _SegmentWatch, reason: FailureReason, message: str) -> None:
        pairs = list(watch.pairs.values())
        self._dead_letters.warning(
            str(reason),
            "segment %s: %d pairs dead-lettered (%s): %s",
            watch.segment_id,
            len(pairs),
            reason,
            message,
        )
        for pair in pairs:
            self._forget(watch, pair)
        self._sink.fail([p.assignment for p in pairs], reason, message)


def _written_wall(assignment: Assignment) -> float:
    for state, at in reversed(assignment.history or ()):
        if state is State.WRITTEN:
            return at
    return assignment.updated_at
