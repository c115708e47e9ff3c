"""Validation: a written membership becomes `active` only once CXone answers `isMember: true`.

Polling is coalesced per segment: one sweep per segment per `interval_s` covers every pending
contact of that segment, and a (segment, contact) pair is read at most once per interval and
never twice at the same time. Reads pass the `read` rate gate, whose 429 pauses every read.

Sweeps do not read themselves: they put their pairs on one read queue, which a single reader
task drains through the gate, earliest-due first. A pair is due at its sweep, but never sooner
than `_READ_SLACK` of an interval after its previous read. So when reads lag behind their
sweeps (the gate is saturated), a pair waits in the queue for the rest of its spacing instead of
missing the whole sweep, and it is still read at every sweep; and only reads that are being
sent hold a task, not the thousands that wait for the gate.

A pair still not visible after `window_s` of polling calls for a refresh of its segment, which
CXone allows once per segment per `refresh_min_interval_s`. The budget is checked before every
refresh, so many batches of one segment share one refresh; when it is spent, the refresh is
scheduled for when it is allowed and the segment is not polled meanwhile. A pair still not
visible `deadline_s` after it was written fails with `not_indexed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.model import Assignment, FailureReason, State
from scheduler.observer import EngineObserver
from scheduler.ratelimit import RateGate
from scheduler.retry import RetryPolicy
from scheduler.upstream import (
    CXoneClient,
    RateLimited,
    SegmentNotFound,
    UpstreamError,
    outcome_of,
    seconds_since,
)
from scheduler.validation_state import ConfirmationCache, RefreshBudget

log = logging.getLogger(__name__)

# A pair joins a sweep if its last read is at least this share of the interval old: sweeps and
# reads drift by scheduling noise, and a read 1.95 s ago should not wait for another sweep.
_READ_SLACK = 0.9


@dataclass(frozen=True, slots=True)
class ValidationPolicy:
    """Timing of validation (defaults from the CXone guidance)."""

    interval_s: float = 2.0
    window_s: float = 30.0
    cache_ttl_s: float = 60.0
    refresh_min_interval_s: float = 3600.0
    deadline_s: float = 7200.0


class VerificationSink(Protocol):
    """Where validation reports outcomes (the engine)."""

    def verifying(self, assignments: Iterable[Assignment]) -> None:
        """Validation has started for these."""
        ...

    def confirm(self, assignments: Iterable[Assignment]) -> None:
        """CXone shows these as members."""
        ...

    def fail(self, assignments: Iterable[Assignment], reason: FailureReason, message: str) -> None:
        """Validation gave up on these."""
        ...


@dataclass(slots=True)
class _Pair:
    assignment: Assignment
    written_at: float  # monotonic
    window_start: float  # monotonic start of the current polling window
    last_read: float = float("-inf")  # when the gate last let a read of this pair through
    reading: bool = False  # queued for a read or being read


#: A queued read: (due time, order of queueing, segment id, pair, its segment's watch).
_QueuedRead = tuple[float, int, str, "_Pair", "_SegmentWatch"]


@dataclass(slots=True)
class _SegmentWatch:
    pairs: dict[str, _Pair] = field(default_factory=dict)
    refresh_at: float | None = None  # monotonic time of a scheduled refresh
    refreshed: bool = False  # a refresh was made since the oldest pending write
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class MembershipPoller:
    """Confirms written assignments by polling CXone; refreshes segments within their budget."""

    def __init__(
        self,
        *,
        client: CXoneClient,
        read_gate: RateGate,
        sink: VerificationSink,
        cache: ConfirmationCache,
        budget: RefreshBudget,
        policy: ValidationPolicy | None = None,
        retry: RetryPolicy | None = None,
        observer: EngineObserver | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy or ValidationPolicy()
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
        self._watches: dict[str, _SegmentWatch] = {}
        self._reads: set[asyncio.Task[None]] = set()
        # Reads due, earliest first; the counter keeps a sweep's pairs in their order.
        self._queue: list[_QueuedRead] = []
        self._queue_order = itertools.count()
        self._queue_changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._running = False

    # ---- the Verifier interface the engine calls -------------------------------------------

    def confirmed(self, contact_id: str, segment_id: str) -> bool:
        """Whether the pair is known to be a member within the cache TTL."""
        return self._cache.confirmed(contact_id, segment_id)

    def watch(self, assignments: list[Assignment]) -> None:
        """Start validating written assignments."""
        if not assignments:
            return
        now = self._clock()
        wall_now = self._wall()
        # The deadline runs from the write, also for assignments recovered after a restart.
        written_at = [now - max(0.0, wall_now - _written_wall(a)) for a in assignments]
        self._sink.verifying(assignments)
        for assignment, written in zip(assignments, written_at, strict=True):
            watch = self._watches.get(assignment.segment_id)
            if watch is None:
                watch = self._watches[assignment.segment_id] = _SegmentWatch()
            watch.pairs[assignment.contact_id] = _Pair(assignment, written, now)
            watch.wake.set()
            if self._running and (watch.task is None or watch.task.done()):
                watch.task = asyncio.create_task(
                    self._run_segment(assignment.segment_id, watch),
                    name=f"validate {assignment.segment_id}",
                )

    @property
    def pending(self) -> int:
        """Assignments waiting for confirmation."""
        return sum(len(w.pairs) for w in self._watches.values())

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start polling (also for assignments handed over before start)."""
        self._running = True
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._run_reader(), name="validation reads")
        for segment_id, watch in self._watches.items():
            if watch.pairs and (watch.task is None or watch.task.done()):
                watch.task = asyncio.create_task(
                    self._run_segment(segment_id, watch), name=f"validate {segment_id}"
                )

    async def stop(self) -> None:
        """Stop polling; pending assignments stay `verifying` for a later start. Idempotent."""
        self._running = False
        tasks = [w.task for w in self._watches.values() if w.task is not None]
        tasks += list(self._reads)
        if self._reader is not None:
            tasks.append(self._reader)
            self._reader = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._queue.clear()
        for watch in self._watches.values():
            watch.task = None
            for pair in watch.pairs.values():
                pair.reading = False

    # ---- one segment -------------------------------------------------------------------------

    async def _run_segment(self, segment_id: str, watch: _SegmentWatch) -> None:
        # The first sweep comes one interval after the first write: indexing takes seconds.
        last_sweep = self._clock()
        try:
            while watch.pairs:
                wait = self._until_next(watch, last_sweep)
                if wait > 0:
                    # A new write wakes us early only to recompute the wait, never to sweep
                    # sooner than once per interval.
                    await self._sleep(watch, wait)
                    continue
                last_sweep = self._clock()
                try:
                    await self._sweep(segment_id, watch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("validation sweep of segment %s failed", segment_id)
        finally:
            if not watch.pairs and self._watches.get(segment_id) is watch:
                del self._watches[segment_id]

    def _until_next(self, watch: _SegmentWatch, last_sweep: float) -> float:
        next_sweep = last_sweep + self.policy.interval_s
        polling = any(not self._awaiting_refresh(watch, p) for p in watch.pairs.values())
        if not polling and watch.refresh_at is not None:
            # Nothing to poll until the scheduled refresh: sleep until it (or a deadline).
            oldest = min(p.written_at for p in watch.pairs.values())
            next_sweep = max(next_sweep, min(watch.refresh_at, oldest + self.policy.deadline_s))
        return next_sweep - self._clock()

    async def _sleep(self, watch: _SegmentWatch, seconds: float) -> None:
        watch.wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(watch.wake.wait(), seconds)

    def _awaiting_refresh(self, watch: _SegmentWatch, pair: _Pair) -> bool:
        return (
            watch.refresh_at is not None
            and self._clock() - pair.window_start >= self.policy.window_s
        )

    async def _sweep(self, segment_id: str, watch: _SegmentWatch) -> None:
        now = self._clock()
        policy = self.policy
        # Deadline first: these will never be polled again.
        expired = [p for p in watch.pairs.values() if now - p.written_at >= policy.deadline_s]
        if expired:
            self._give_up(segment_id, watch, expired)
        if not watch.pairs:
            return
        # A refresh is due when its scheduled time has come or, if none is scheduled, when a
        # polling window ran out (the budget decides whether it can be sent now).
        if watch.refresh_at is not None:
            refresh_due = now >= watch.refresh_at
        else:
            refresh_due = any(now - p.window_start >= policy.window_s for p in watch.pairs.values())
        if refresh_due:
            await self._refresh(segment_id, watch)
        now = self._clock()
        spacing = policy.interval_s * _READ_SLACK
        queue = self._queue
        order = self._queue_order
        queued = False
        for pair in watch.pairs.values():
            if pair.reading or self._awaiting_refresh(watch, pair):
                continue
            if now - pair.written_at < spacing:
                continue  # indexing takes seconds: a read right after the write is wasted
            # Due now, but never sooner than one spacing after this pair's previous read: a read
            # that the gate let through late in the last sweep waits for the rest of it here.
            pair.reading = True
            due = max(now, pair.last_read + spacing)
            heapq.heappush(queue, (due, next(order), segment_id, pair, watch))
            queued = True
        if queued:
            self._queue_changed.set()

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

    async def _drain_reads(self) -> None:
        """Send queued reads through the gate, earliest due first, each in its own task."""
        queue = self._queue
        changed = self._queue_changed
        while True:
            # Pairs confirmed, given up or failed while queued need no read and no token.
            while queue and not _still_watched(queue[0]):
                heapq.heappop(queue)[3].reading = False
            if not queue:
                changed.clear()
                await changed.wait()
                continue
            wait = queue[0][0] - self._clock()
            if wait > 0:
                # An earlier-due read queued meanwhile wakes us to look again.
                changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), wait)
                continue
            await self._read_gate.acquire()
            if not queue:
                continue  # a failed segment emptied the queue meanwhile; the token is lost
            _, _, segment_id, pair, watch = heapq.heappop(queue)
            if not _still_watched((0.0, 0, segment_id, pair, watch)):
                pair.reading = False  # dropped while we waited for the gate; the token is lost
                continue
            pair.last_read = self._clock()
            task = asyncio.create_task(
                self._read(segment_id, pair.assignment.contact_id, pair, watch)
            )
            self._reads.add(task)
            task.add_done_callback(self._reads.discard)

    async def _read(
        self, segment_id: str, contact_id: str, pair: _Pair, watch: _SegmentWatch
    ) -> None:
        """One membership read the gate let through; the pair is `reading` until it ends."""
        requeued = False
        started = time.monotonic()
        try:
            try:
                result = await self._client.is_member(segment_id, contact_id)
            except RateLimited as exc:
                self._observer.upstream_outcome("read", "rate_limited", seconds_since(started))
                self._read_gate.pause(exc.retry_after_s)
                # Nothing was read: queue it again, to go with every other read after the pause.
                if self._running and watch.pairs.get(contact_id) is pair:
                    due = max(self._clock(), pair.last_read + self.policy.interval_s * _READ_SLACK)
                    heapq.heappush(
                        self._queue, (due, next(self._queue_order), segment_id, pair, watch)
                    )
                    self._queue_changed.set()
                    requeued = True
                return
            except SegmentNotFound as exc:
                self._observer.upstream_outcome("read", "permanent", seconds_since(started))
                self._fail_segment(segment_id, watch, FailureReason.SEGMENT_NOT_FOUND, str(exc))
                return
            except UpstreamError as exc:
                # 5xx, timeouts: the next sweep reads this pair again.
                self._observer.upstream_outcome("read", outcome_of(exc), seconds_since(started))
                log.info("membership read %s/%s failed: %s", segment_id, contact_id, exc)
                return
            self._observer.upstream_outcome("read", "ok", seconds_since(started))
            self._observer.membership_read(segment_id, result.is_member)
            if result.is_member and watch.pairs.get(contact_id) is pair:
                del watch.pairs[contact_id]
                self._cache.remember(contact_id, segment_id)
                self._sink.confirm([pair.assignment])
                if not watch.pairs:
                    watch.wake.set()
        finally:
            if not requeued:
                pair.reading = False

    async def _refresh(self, segment_id: str, watch: _SegmentWatch) -> None:
        wall_now = self._wall()
        allowed = self._budget.next_allowed(segment_id)
        if allowed > wall_now:
            watch.refresh_at = self._clock() + (allowed - wall_now)
            log.info(
                "segment %s: refresh budget spent; next refresh in %.0f s, polling paused",
                segment_id,
                allowed - wall_now,
            )
            return
        # Spend the budget before sending: a crash mid-request must not lead to a second refresh.
        self._budget.spend(segment_id, wall_now, wall_now + self.policy.refresh_min_interval_s)
        started = time.monotonic()
        try:
            result = await self._client.refresh(segment_id)
        except SegmentNotFound as exc:
            self._observer.upstream_outcome("refresh", "permanent", seconds_since(started))
            self._fail_segment(segment_id, watch, FailureReason.SEGMENT_NOT_FOUND, str(exc))
            return
        except UpstreamError as exc:
            # Unknown whether it was applied. Try again after a backoff: if it was, CXone says 429
            # with the time left, which is then recorded; the budget is never guessed past.
            self._observer.upstream_outcome("refresh", outcome_of(exc), seconds_since(started))
            delay = self._retry.delay(1, self._rng, exc.retry_after_s)
            self._budget.spend(segment_id, wall_now, wall_now + delay)
            watch.refresh_at = self._clock() + delay
            log.warning(
                "refresh of segment %s failed (%s); again in %.1f s", segment_id, exc, delay
            )
            return
        if not result.accepted:
            self._observer.upstream_outcome("refresh", "rate_limited", seconds_since(started))
            self._budget.spend(segment_id, wall_now, wall_now + result.retry_after_s)
            watch.refresh_at = self._clock() + result.retry_after_s
            log.warning(
                "segment %s: refresh refused for %.0f s more; scheduled",
                segment_id,
                result.retry_after_s,
            )
            return
        self._observer.upstream_outcome("refresh", "ok", seconds_since(started))
        # CXone's hour starts when it processed the refresh, somewhere before its answer reached
        # us: count ours from the answer, so the next refresh can never arrive early.
        answered = self._wall()
        self._budget.spend(segment_id, answered, answered + self.policy.refresh_min_interval_s)
        self._observer.segment_refreshed(segment_id)
        log.info("segment %s refreshed for %d pending memberships", segment_id, len(watch.pairs))
        watch.refresh_at = None
        watch.refreshed = True
        now = self._clock()
        # Visible within a second: every pair is read again from this sweep on, each still one
        # spacing after its previous read.
        for pair in watch.pairs.values():
            pair.window_start = now

    def _give_up(self, segment_id: str, watch: _SegmentWatch, pairs: list[_Pair]) -> None:
        for pair in pairs:
            watch.pairs.pop(pair.assignment.contact_id, None)
        cause = (
            "even after a segment refresh; the segment is probably dynamic (dynamic segments "
            "accept direct writes and ignore them) or the membership was removed"
            if watch.refreshed
            else "and no refresh was possible in that time"
        )
        message = (
            f"CXone did not show the membership {self.policy.deadline_s:.0f} s after the write, "
            f"{cause}"
        )
        log.warning("segment %s: %d memberships not indexed: %s", segment_id, len(pairs), message)
        self._sink.fail([p.assignment for p in pairs], FailureReason.NOT_INDEXED, message)

    def _fail_segment(
        self, segment_id: str, watch: _SegmentWatch, reason: FailureReason, message: str
    ) -> None:
        pairs = list(watch.pairs.values())
        watch.pairs.clear()
        watch.wake.set()
        self._sink.fail([p.assignment for p in pairs], reason, message)


def _still_watched(entry: _QueuedRead) -> bool:
    """Whether a queued read's pair is still waiting for confirmation."""
    pair, watch = entry[3], entry[4]
    return watch.pairs.get(pair.assignment.contact_id) is pair


def _written_wall(assignment: Assignment) -> float:
    for state, at in reversed(assignment.history or ()):
        if state is State.WRITTEN:
            return at
    return assignment.updated_at
