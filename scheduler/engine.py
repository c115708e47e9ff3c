"""The engine: takes mapping requests, coalesces them, writes them, and tracks every assignment."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from scheduler.buffer import CoalescingBuffer, ContactGate
from scheduler.flusher import BatchSender, Gate
from scheduler.model import (
    WRITE_PENDING_STATES,
    Assignment,
    AssignmentKey,
    FailureReason,
    MembershipChange,
    State,
)
from scheduler.observer import EngineObserver
from scheduler.retry import RetryPolicy
from scheduler.store import BatchRecord, Store, StoreUnavailable
from scheduler.upstream import CXoneClient

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    """How writes are grouped (defaults from the CXone guidance)."""

    min_size: int = 50
    max_size: int = 200
    linger_s: float = 1.0
    max_inflight_per_contact: int = 3
    high_water: int = 1_000_000


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """What a request added: new assignments, ones already in progress, ones already active."""

    queued: int = 0
    joined: int = 0
    cached: int = 0


class EngineOverloaded(Exception):
    """More assignments wait to be written than the high-water mark allows; try again later."""

    def __init__(self, pending: int, high_water: int, retry_after_s: float) -> None:
        super().__init__(f"{pending} assignments pending (high-water mark {high_water})")
        self.retry_after_s = retry_after_s


class EngineClosed(Exception):
    """The engine is draining or stopped and takes no new work."""


class Verifier(Protocol):
    """Confirms written memberships (the validation poller)."""

    def watch(self, assignments: list[Assignment]) -> None:
        """Start confirming these written assignments; report back through the engine."""
        ...

    def confirmed(self, contact_id: str, segment_id: str) -> bool:
        """Whether the pair is known active within the validation cache TTL."""
        ...


class Engine:
    """Assignment state, coalescing buffer, per-contact limit and flusher, as one component.

    Without a verifier an assignment's journey ends at `written`; with one, `written` hands it to
    the verifier, which moves it on to `active` or `failed` through `confirm()` / `fail()`.
    """

    def __init__(
        self,
        *,
        client: CXoneClient,
        store: Store,
        write_gate: Gate,
        single_gate: Gate,
        batching: BatchingPolicy | None = None,
        retry: RetryPolicy | None = None,
        observer: EngineObserver | None = None,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.batching = batching or BatchingPolicy()
        self.retry = retry or RetryPolicy()
        self._store = store
        self._write_gate = write_gate
        self._observer = observer or EngineObserver()
        self._rng = rng or random.Random()
        self._wall = wall_clock
        self._clock = clock
        self._verifier: Verifier | None = None
        self._live: dict[AssignmentKey, Assignment] = {}
        self._pending_writes = 0
        self._buffer = CoalescingBuffer(
            min_size=self.batching.min_size,
            max_size=self.batching.max_size,
            linger_s=self.batching.linger_s,
        )
        self._gate = ContactGate(self.batching.max_inflight_per_contact)
        self._waiters: dict[AssignmentKey, list[asyncio.Future[Assignment]]] = {}
        # Set by `release_waiters()`: a draining process answers waits at once, with states so far.
        self._waiters_released = False
        self._sender = BatchSender(
            client=client,
            store=store,
            ledger=self,
            write_gate=write_gate,
            single_gate=single_gate,
            retry=self.retry,
            rng=self._rng,
            observer=self._observer,
            sleep=asyncio.sleep,
        )
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._accepting = False
        self._draining = False
        self._failure: BaseException | None = None
        self._recovered_batches: list[BatchRecord] = []
        self._recovered_written: list[Assignment] = []

    # ---- lifecycle -----------------------------------------------------------------------

    def set_verifier(self, verifier: Verifier) -> None:
        """Attach the component that confirms written memberships (before start)."""
        self._verifier = verifier

    def restore(
        self,
        assignments: Iterable[Assignment],
        batches: Iterable[BatchRecord],
        queued: Iterable[tuple[str, str, float]] = (),
    ) -> None:
        """Take back unfinished work from the journal; call before `start()`.

        In-flight batches are resent as they were (same ids, same idempotency key), so CXone
        replays a write that had landed instead of applying it twice. Queued and retrying
        assignments go back to the buffer; written and verifying ones back to the verifier.
        `queued` lists queued assignments as (contact_id, segment_id, received_at) tuples.
        """
        batch_of: dict[AssignmentKey, BatchRecord] = {}
        for record in batches:
            for contact_id in record.contact_ids:
                batch_of[(contact_id, record.segment_id)] = record
        resend: dict[str, BatchRecord] = {}
        by_state: Counter[State] = Counter()
        for assignment in assignments:
            key = assignment.key
            by_state[assignment.state] += 1
            if assignment.state not in WRITE_PENDING_STATES:
                self._live[key] = assignment
                self._recovered_written.append(assignment)
                continue
            self._pending_writes += 1
            batch = batch_of.get(key)
            if batch is not None:
                self._live[key] = assignment
                self._gate.force(assignment.contact_id)
                resend[batch.batch_id] = batch
            elif assignment.state is State.QUEUED:
                # Queued work lives in the buffer only (see `submit`).
                if self._gate.admit(
                    assignment.contact_id, assignment.segment_id, assignment.received_at
                ):
                    self._buffer.add(
                        assignment.segment_id, assignment.contact_id, assignment.received_at
                    )
            else:
                self._live[key] = assignment
                if self._gate.admit(assignment.contact_id, assignment.segment_id):
                    self._buffer.add_retry(assignment.segment_id, [assignment.contact_id])
        # The backlog: usually nearly all of it, so kept to a dictionary lookup and two inserts.
        admit = self._gate.admit
        add = self._buffer.add
        before = self._pending_writes
        for contact_id, segment_id, received_at in queued:
            self._pending_writes += 1
            batch = batch_of.get((contact_id, segment_id)) if batch_of else None
            if batch is not None:
                self._live[(contact_id, segment_id)] = Assignment(
                    contact_id, segment_id, received_at=received_at, updated_at=received_at
                )
                self._gate.force(contact_id)
                resend[batch.batch_id] = batch
            elif admit(contact_id, segment_id, received_at):
                add(segment_id, contact_id, received_at)
        by_state[State.QUEUED] += self._pending_writes - before
        restored = sum(by_state.values())
        self._observer.restored(by_state)
        self._recovered_batches.extend(resend.values())
        log.info(
            "restored %d assignments: %d pending writes (%d in %d in-flight batches), "
            "%d to validate",
            restored,
            self._pending_writes,
            sum(len(b.contact_ids) for b in resend.values()),
            len(resend),
            len(self._recovered_written),
        )

    async def start(self) -> None:
        """Start the flusher; the engine takes requests from now on."""
        if self._flusher is not None:
            return
        self._accepting = True
        self._flusher = asyncio.create_task(self._flush_loop(), name="segmap-flusher")
        self._flusher.add_done_callback(self._on_flusher_done)
        for batch in self._recovered_batches:
            self.spawn(
                partial(self._sender.send, batch, token_held=False),
                f"resend {batch.segment_id}",
            )
        self._recovered_batches.clear()
        if self._recovered_written:
            if self._verifier is not None:
                self._verifier.watch(self._recovered_written)
            else:
                for assignment in self._recovered_written:
                    self._finish(assignment)
            self._recovered_written = []

    async def stop(self, budget_s: float = 10.0) -> None:
        """Refuse new work, send what is buffered, wait for in-flight sends, then cancel the rest.

        Idempotent. Assignments still waiting for a backoff keep their `retrying` state in the
        store, which is where a durable store's recovery picks them up.
        """
        if not self._accepting and self._flusher is None:
            return
        self._accepting = False
        self._draining = True
        self._wakeup.set()
        deadline = self._clock() + budget_s
        if self._flusher is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(
                    asyncio.shield(self._flusher), max(0.0, deadline - self._clock())
                )
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - self._clock()))
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        leftovers = [t for t in [self._flusher, *self._tasks] if t is not None and not t.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.gather(*leftovers, return_exceptions=True)
            log.warning("engine stop: cancelled %d tasks past the budget", len(leftovers))
        self._flusher = None
        try:
            await self._store.flush()
        except StoreUnavailable as exc:
            # Nothing is lost: the journal keeps what it committed, and the batches it holds
            # are replayed under their keys at the next start.
            log.error(
                "engine stop: the journal cannot commit (%s); changes since its last commit "
                "are redone from it at the next start",
                exc,
            )
        log.info(
            "engine stopped: %d assignments still pending, %d buffered",
            self._pending_writes,
            len(self._buffer),
        )

    def _on_flusher_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # The loop catches per-iteration errors; reaching here means it is dead. Fail every waiter
        # loudly instead of letting callers hang on a engine that no longer moves.
        self._failure = task.exception()
        log.critical("flusher died: %r", self._failure)
        self._accepting = False
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(RuntimeError(f"engine failed: {self._failure!r}"))
        self._waiters.clear()

    # ---- intake --------------------------------------------------------------------------

    @property
    def pending_writes(self) -> int:
        """Assignments queued, sending or waiting to retry."""
        return self._pending_writes

    @property
    def buffered(self) -> int:
        """Ids waiting in the coalescing buffer."""
        return len(self._buffer)

    @property
    def overloaded(self) -> bool:
        """Whether new work would be refused for the high-water mark."""
        return self._pending_writes >= self.batching.high_water

    @property
    def healthy(self) -> bool:
        """False once the flusher has died."""
        return self._failure is None

    def submit(self, request: MembershipChange) -> SubmitResult:
        """Take a request: queue new assignments, join ones in progress, skip confirmed ones."""
        if not self._accepting:
            raise EngineClosed("the engine is not accepting work")
        wait_s = self.admission_wait(1)
        if wait_s is not None:
            raise EngineOverloaded(self._pending_writes, self.batching.high_water, wait_s)
        queued = joined = cached = 0
        now = self._wall()
        contact_id = request.contact_id
        for segment_id in dict.fromkeys(request.add):
            if self._pending(contact_id, segment_id):
                joined += 1
                continue
            if self._verifier is not None and self._verifier.confirmed(contact_id, segment_id):
                cached += 1
                continue
            # A queued assignment is only an entry in the buffer (or a parked one in the
            # contact gate) carrying its received time; its object is made when it is sent.
            # A million queued assignments then cost a buffer entry each, not an object each.
            assignment = Assignment(
                contact_id=contact_id, segment_id=segment_id, received_at=now, updated_at=now
            )
            self._pending_writes += 1
            self._store.record(assignment)
            self._observer.transitioned(assignment, State.QUEUED)
            queued += 1
            if self._gate.admit(contact_id, segment_id, now):
                self._enqueue(segment_id, contact_id, now)
        return SubmitResult(queued=queued, joined=joined, cached=cached)

    def admission_wait(self, assignments: int) -> float | None:
        """None if `assignments` more fit below the high-water mark; else seconds to wait.

        The wait is how long the writer, at its configured rate of full batches, needs to take
        the queue back below the mark (at least one second).
        """
        excess = self._pending_writes + assignments - self.batching.high_water
        if excess <= 0:
            return None
        per_second = self._write_gate.rate_per_s * self.batching.max_size
        return max(1.0, excess / per_second)

    def _enqueue(self, segment_id: str, contact_id: str, received_at: float) -> None:
        if self._buffer.add(segment_id, contact_id, received_at):
            self._wakeup.set()

    def _pending(self, contact_id: str, segment_id: str) -> bool:
        """Whether the pair is in progress: live, buffered or parked."""
        return (
            (contact_id, segment_id) in self._live
            or (contact_id, segment_id) in self._buffer
            or self._gate.is_parked(contact_id, segment_id)
        )

    # ---- queries and waiting ---------------------------------------------------------------

    async def wait(
        self, contact_id: str, segment_ids: Iterable[str], timeout_s: float
    ) -> list[Assignment]:
        """Wait up to `timeout_s` for the assignments to end; returns their latest states.

        An assignment ends when it is active or failed (or written, when no verifier is set).
        After `release_waiters()` it returns at once, with the states reached so far.
        """
        keys = [(contact_id, s) for s in dict.fromkeys(segment_ids)]
        waiting: list[tuple[AssignmentKey, asyncio.Future[Assignment]]] = []
        loop = asyncio.get_running_loop()
        for key in keys:
            if self._pending(*key) and not self._waiters_released:
                future: asyncio.Future[Assignment] = loop.create_future()
                self._waiters.setdefault(key, []).append(future)
                waiting.append((key, future))
        if waiting:
            await asyncio.wait([f for _, f in waiting], timeout=timeout_s)
            for key, future in waiting:
                if future.done():
                    continue
                future.cancel()
                listeners = self._waiters.get(key)
                if listeners is not None and future in listeners:
                    listeners.remove(future)
                    if not listeners:
                        del self._waiters[key]
        # Newest first: an outcome just delivered, then live state, then the store (which may
        # be a commit behind the engine).
        ended = {
            key[1]: future.result()
            for key, future in waiting
            if future.done() and not future.cancelled()
        }
        stored = {a.segment_id: a for a in await self._store.contact(contact_id)}
        result: list[Assignment] = []
        for _, segment_id in keys:
            current = (
                ended.get(segment_id)
                or self._live.get((contact_id, segment_id))
                or stored.get(segment_id)
            )
            if current is not None:
                result.append(current)
        return result

    def release_waiters(self) -> int:
        """End every `wait()` now, and any later one at once; returns how many were waiting.

        For the drain: a caller waiting minutes for indexing must get its answer (the states so
        far) before the process stops, not hold the HTTP server open past the stop timeout.
        Idempotent.
        """
        self._waiters_released = True
        released = 0
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    # Cancelled, not resolved: `wait()` then reports the live or stored state.
                    future.cancel()
                    released += 1
        self._waiters.clear()
        return released

    # ---- the flusher ---------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            # While draining, sends still running may put work back in the buffer (a contact's
            # parked segment released, ids failed for a retry): stop only once none is left.
            if self._draining and not self._buffer and not self._tasks:
                return
            try:
                await self._flush_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # One bad iteration must not stop the writer; log it and go on.
                log.exception("flusher iteration failed")
                await asyncio.sleep(0.1)

    async def _flush_once(self) -> None:
        # The buffer keeps received (wall-clock) times, so linger is measured on that clock.
        now = self._wall()
        segment_id = self._buffer.pick(
            now, spare_capacity=self._write_gate.has_capacity(), draining=self._draining
        )
        if segment_id is None:
            deadline = self._buffer.next_deadline()
            timeout = None if deadline is None else max(0.001, deadline - now)
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            return
        await self._write_gate.acquire()
        # Choose again now that a request may go: under backlog the wait for the token is where
        # batches fill up, so the batch sent is the fullest the limit allows.
        segment_id = (
            self._buffer.pick(self._wall(), spare_capacity=True, draining=self._draining)
            or segment_id
        )
        entries = self._buffer.take_entries(segment_id)
        if not entries:
            return
        contact_ids = []
        for contact_id, received_at in entries:
            key = (contact_id, segment_id)
            if key not in self._live:
                at = received_at if received_at is not None else self._wall()
                self._live[key] = Assignment(
                    contact_id=contact_id, segment_id=segment_id, received_at=at, updated_at=at
                )
            contact_ids.append(contact_id)
        batch = self._sender.new_batch(segment_id, contact_ids)
        self.spawn(lambda: self._sender.send(batch, token_held=True), f"send {segment_id}")

    # ---- the ledger (called by the sender) -------------------------------------------------

    def spawn(self, coro_factory: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Run a background task that is kept referenced and whose failure is logged."""
        task = asyncio.create_task(coro_factory(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._draining:
            self._wakeup.set()  # the flusher may be waiting for the last send to end
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def attempts(self, segment_id: str, contact_id: str) -> int:
        """Attempts made so far for the live assignment (0 if none)."""
        assignment = self._live.get((contact_id, segment_id))
        return assignment.attempts if assignment is not None else 0

    def mark_sending(
        self, segment_id: str, contact_ids: list[str], *, new_attempt: bool = True
    ) -> None:
        """The ids are about to be sent."""
        for assignment in self._assignments(segment_id, contact_ids):
            if new_attempt:
                assignment.attempts += 1
            self._move(assignment, State.SENDING)

    def mark_retrying(self, segment_id: str, contact_ids: list[str]) -> None:
        """The ids wait for a backoff."""
        for assignment in self._assignments(segment_id, contact_ids):
            self._move(assignment, State.RETRYING)

    def mark_written(self, segment_id: str, contact_ids: list[str]) -> None:
        """CXone holds these memberships (maybe not yet indexed)."""
        written = []
        for assignment in self._assignments(segment_id, contact_ids):
            self._move(assignment, State.WRITTEN)
            self._release_contact(assignment.contact_id)
            written.append(assignment)
        if self._verifier is not None:
            self._verifier.watch(written)
        else:
            for assignment in written:
                self._finish(assignment)

    def mark_failed(
        self, segment_id: str, contact_ids: list[str], reason: FailureReason, message: str
    ) -> None:
        """These assignments end failed (dead letters)."""
        for assignment in self._assignments(segment_id, contact_ids):
            was_pending = assignment.state in WRITE_PENDING_STATES
            self._move(assignment, State.FAILED, reason=reason, message=message)
            if was_pending:
                self._release_contact(assignment.contact_id)
            self._finish(assignment)

    def requeue_later(self, segment_id: str, contact_ids: list[str], delay_s: float) -> None:
        """After the backoff the ids rejoin their segment's buffer, ahead of fresh ids."""
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def requeue() -> None:
            if handle is not None:
                self._timers.discard(handle)
            still = [c for c in contact_ids if (c, segment_id) in self._live]
            if still:
                self._buffer.add_retry(segment_id, still)
                self._wakeup.set()

        handle = loop.call_later(delay_s, requeue)
        self._timers.add(handle)

    # ---- called by the verifier ------------------------------------------------------------

    def confirm(self, assignments: Iterable[Assignment]) -> None:
        """The verifier saw these memberships indexed: they are active."""
        for assignment in assignments:
            self._move(assignment, State.ACTIVE)
            self._finish(assignment)

    def verifying(self, assignments: Iterable[Assignment]) -> None:
        """The verifier started checking these."""
        for assignment in assignments:
            if assignment.state is State.WRITTEN:
                self._move(assignment, State.VERIFYING)

    def fail(self, assignments: Iterable[Assignment], reason: FailureReason, message: str) -> None:
        """The verifier gave up on these."""
        for assignment in assignments:
            self._move(assignment, State.FAILED, reason=reason, message=message)
            self._finish(assignment)

    # ---- internals ---------------------------------------------------------------------------

    def _assignments(self, segment_id: str, contact_ids: list[str]) -> list[Assignment]:
        # Only assignments whose write is pending: an answer replayed for a batch recovered
        # after a crash may name ids that have moved on since.
        found = []
        for contact_id in contact_ids:
            assignment = self._live.get((contact_id, segment_id))
            if assignment is not None and assignment.state in WRITE_PENDING_STATES:
                found.append(assignment)
        return found

    def _move(
        self,
        assignment: Assignment,
        state: State,
        *,
        reason: FailureReason | None = None,
        message: str = "",
    ) -> None:
        previous = assignment.state
        was_pending = previous in WRITE_PENDING_STATES
        assignment.transition(state, self._wall(), reason=reason, message=message)
        is_pending = state in WRITE_PENDING_STATES
        self._pending_writes += int(is_pending) - int(was_pending)
        self._store.record(assignment)
        self._observer.transitioned(assignment, previous)

    def _release_contact(self, contact_id: str) -> None:
        parked = self._gate.release(contact_id)
        if parked is not None:
            segment_id, received_at = parked
            self._enqueue(segment_id, contact_id, received_at)

    def _finish(self, assignment: Assignment) -> None:
        """The engine is done with the assignment: drop it from memory, release its waiters."""
        self._live.pop(assignment.key, None)
        if assignment.terminal:
            self._observer.finished(assignment)
        for future in self._waiters.pop(assignment.key, []):
            if not future.done():
                future.set_result(assignment)
