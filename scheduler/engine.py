"""The engine: takes mapping requests, coalesces them, writes them, and tracks every assignment."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping
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
    Intent,
    Lane,
    MembershipChange,
    State,
    storable,
)
from scheduler.observer import EngineObserver
from scheduler.ownership import ForwardedChange, Ownership, OwnEverything
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
    """What a request did: new work queued, work joined, pairs confirmed as asked, stale ones.

    A stale change is older than what is in progress or confirmed for its pair: ignored.
    """

    queued: int = 0
    joined: int = 0
    cached: int = 0
    stale: int = 0
    # The segments the change put to work or found done (a mirror's removals included), for
    # `?wait=`; the stale ones apart, since nothing will ever happen to them.
    segments: tuple[str, ...] = ()
    stale_segments: tuple[str, ...] = ()

    def __add__(self, other: SubmitResult) -> SubmitResult:
        return SubmitResult(
            self.queued + other.queued,
            self.joined + other.joined,
            self.cached + other.cached,
            self.stale + other.stale,
            self.segments + other.segments,
            self.stale_segments + other.stale_segments,
        )


@dataclass(frozen=True, slots=True)
class DeadLetterResult:
    """What `Engine.dead_letter` did with a change nobody can act on, per pair.

    `recorded`: dead letters journaled (or forwarded to their owner); `stale`: pairs the change
    was older than; `kept`: pairs whose own state (work in progress, or a state segmapd reached
    for another change) stays, so that an event nobody can act on never replaces it.
    """

    recorded: int = 0
    stale: int = 0
    kept: int = 0


@dataclass(frozen=True, slots=True)
class _Change:
    """A newer change waiting for the pair's request in flight to have its outcome."""

    intent: Intent
    occurred_at: float  # 0.0: none given (the arrival orders it)
    received_at: float

    @property
    def version(self) -> float:
        return self.occurred_at or self.received_at


@dataclass(frozen=True, slots=True)
class _Current:
    """Where a pair's newest change stands in the engine: its intent and time."""

    intent: Intent
    version: float


_OPPOSITE = {Intent.ADD: Intent.REMOVE, Intent.REMOVE: Intent.ADD}


def _waiting_row(assignment: Assignment, change: _Change) -> Assignment:
    """What the journal keeps for a pair whose newer change waits for a request in flight."""
    return Assignment(
        assignment.contact_id,
        assignment.segment_id,
        state=State.QUEUED,
        received_at=change.received_at,
        updated_at=change.received_at,
        intent=change.intent,
        occurred_at=change.occurred_at,
    )


# How often `wait()` reads the journal again for a pair another process works on.
WAIT_POLL_S = 0.25


class EngineOverloaded(Exception):
    """More assignments wait to be written than the high-water mark allows; try again later."""

    def __init__(self, pending: int, high_water: int, retry_after_s: float) -> None:
        super().__init__(f"{pending} assignments pending (high-water mark {high_water})")
        self.retry_after_s = retry_after_s


class EngineClosed(Exception):
    """The engine is draining or stopped and takes no new work."""


class Verifier(Protocol):
    """Confirms written memberships and removals (the validation poller)."""

    def watch(self, assignments: list[Assignment]) -> None:
        """Start confirming these written assignments; report back through the engine."""
        ...

    def known(self, contact_id: str, segment_id: str) -> bool | None:
        """The membership confirmed within the validation cache TTL (member or not), or None."""
        ...

    def settle(self, assignments: list[Assignment], message: str) -> None:
        """Read these pairs, whose last write's outcome is unknown, until CXone shows them.

        Shown: confirmed as written ones are. Not shown within a window of reads: they fail
        `retries_exhausted` with `message`.
        """
        ...

    def forget(self, contact_id: str, segment_id: str) -> None:
        """Stop confirming the pair and drop what is cached of it (a newer change is coming)."""
        ...

    def release_segments(self, segments: set[str]) -> None:
        """Stop confirming anything of these segments and drop their cache (handed over)."""
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
        ownership: Ownership | None = None,
    ) -> None:
        self.batching = batching or BatchingPolicy()
        self._ownership: Ownership = ownership or OwnEverything()
        # Segments being handed over: nothing new is batched for them (see `release_segments`).
        self._releasing: set[str] = set()
        # Sends in flight per segment, so that a handover can wait for its segments' outcomes.
        self._sending: dict[str, set[asyncio.Task[None]]] = {}
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
        self._buffer: CoalescingBuffer[Lane] = CoalescingBuffer(
            min_size=self.batching.min_size,
            max_size=self.batching.max_size,
            linger_s=self.batching.linger_s,
        )
        self._gate: ContactGate[Lane] = ContactGate(self.batching.max_inflight_per_contact)
        # The CRM's time of a queued change, where it gave one (a queued change is a buffer
        # entry, whose time is its arrival; most changes carry no other).
        self._occurred: dict[AssignmentKey, float] = {}
        # Newer changes waiting for the request in flight for their pair to have an outcome.
        self._successors: dict[AssignmentKey, _Change] = {}
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

    def set_ownership(self, ownership: Ownership) -> None:
        """Share the segments with other processes through `ownership` (before start)."""
        self._ownership = ownership

    def set_verifier(self, verifier: Verifier) -> None:
        """Attach the component that confirms written memberships (before start)."""
        self._verifier = verifier

    def restore(
        self,
        assignments: Iterable[Assignment],
        batches: Iterable[BatchRecord],
        queued: Iterable[tuple[str, str, float, str, float]] = (),
    ) -> None:
        """Take back unfinished work from the journal; call before `start()`.

        In-flight batches are resent as they were (same ids, same intent, same idempotency
        key), so CXone replays a write that had landed instead of applying it twice. Queued and
        retrying assignments go back to their lane of the buffer; written and verifying ones
        back to the verifier. `queued` lists queued assignments as (contact_id, segment_id,
        received_at, intent, occurred_at) tuples.
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
            lane = (assignment.segment_id, assignment.intent)
            batch = batch_of.get(key)
            if batch is not None and batch.intent is assignment.intent:
                self._live[key] = assignment
                self._gate.force(assignment.contact_id)
                resend[batch.batch_id] = batch
            elif assignment.state is State.QUEUED:
                # Queued work lives in the buffer only (see `submit`).
                if assignment.occurred_at:
                    self._occurred[key] = assignment.occurred_at
                if self._gate.admit(assignment.contact_id, lane, assignment.received_at):
                    self._buffer.add(lane, assignment.contact_id, assignment.received_at)
            else:
                self._live[key] = assignment
                if self._gate.admit(assignment.contact_id, lane):
                    self._buffer.add_retry(lane, [assignment.contact_id])
        # The backlog: usually nearly all of it, so kept to a dictionary lookup and two inserts.
        admit = self._gate.admit
        add = self._buffer.add
        intents = {intent.value: intent for intent in Intent}
        before = self._pending_writes
        for contact_id, segment_id, received_at, intent_name, occurred_at in queued:
            self._pending_writes += 1
            intent = intents[intent_name]
            lane = (segment_id, intent)
            if occurred_at:
                self._occurred[(contact_id, segment_id)] = occurred_at
            batch = batch_of.get((contact_id, segment_id)) if batch_of else None
            if batch is not None and batch.intent is intent:
                self._live[(contact_id, segment_id)] = Assignment(
                    contact_id,
                    segment_id,
                    received_at=received_at,
                    updated_at=received_at,
                    intent=intent,
                    occurred_at=occurred_at,
                )
                self._gate.force(contact_id)
                resend[batch.batch_id] = batch
            elif batch is not None:
                # The journal holds a newer change that waited for this batch's outcome: the
                # batch is resent (under its key) and the change follows it, as it would have.
                key = (contact_id, segment_id)
                self._occurred.pop(key, None)
                self._live[key] = Assignment(
                    contact_id,
                    segment_id,
                    state=State.SENDING,
                    attempts=batch.attempt,
                    received_at=received_at,
                    updated_at=received_at,
                    intent=batch.intent,
                )
                self._successors[key] = _Change(intent, occurred_at, received_at)
                self._gate.force(contact_id)
                resend[batch.batch_id] = batch
            elif admit(contact_id, lane, received_at):
                add(lane, contact_id, received_at)
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
        self._resume_recovered()

    def adopt(
        self,
        assignments: Iterable[Assignment],
        batches: Iterable[BatchRecord],
        queued: Iterable[tuple[str, str, float, str, float]] = (),
    ) -> None:
        """Take over a running engine's segments from the journal (another process owned them).

        Exactly as a restart recovers them (`restore`): saved batches resent under their keys,
        queued and retrying work back to the buffer, written work back to the verifier.
        """
        self.restore(assignments, batches, queued)
        if self._flusher is not None:
            self._resume_recovered()
            self._wakeup.set()

    def _resume_recovered(self) -> None:
        for batch in self._recovered_batches:
            self.spawn(
                partial(self._sender.send, batch, token_held=False),
                f"resend {batch.segment_id}",
                segment_id=batch.segment_id,
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

    def submit(
        self,
        change: MembershipChange,
        history: Mapping[str, Assignment] | None = None,
        mirrored_at: float = 0.0,
        *,
        admitted: bool = False,
    ) -> SubmitResult:
        """Take a change: queue new work, join or supersede work in progress, skip stale ones.

        Per (contact, segment) the newest change wins, by `occurred_at` (the arrival time when
        it has none), then by arrival. `history` is the contact's journaled assignments by
        segment: the intake passes it for a mirror (`set`) and for changes that carry their own
        time, which may be older than what was confirmed before. `mirrored_at` is the time of
        the newest mirror applied to the contact (the store's `mirrored_at`): that mirror said
        the contact is in no segment it did not list, so for every segment a change older than
        it is stale, whether or not segmapd has seen the segment before. `admitted` says the
        caller has checked the high-water mark for the whole delivery this change belongs to
        (`admission_wait`), so that a delivery is taken whole or refused whole.
        """
        if not self._accepting:
            raise EngineClosed("the engine is not accepting work")
        wait_s = None if admitted else self.admission_wait(1)
        if wait_s is not None:
            raise EngineOverloaded(self._pending_writes, self.batching.high_water, wait_s)
        now = self._wall()
        contact_id = change.contact_id
        past = history or {}
        wanted: dict[str, Intent] = {}
        if change.mirror is not None:
            listed = dict.fromkeys(change.mirror)
            for segment_id in self.tracked(contact_id, past):
                if segment_id not in listed:
                    wanted[segment_id] = Intent.REMOVE
            for segment_id in listed:
                wanted[segment_id] = Intent.ADD
        else:
            for segment_id in change.add:
                wanted.setdefault(segment_id, Intent.ADD)
            for segment_id in change.remove:
                wanted.setdefault(segment_id, Intent.REMOVE)
        occurred = change.occurred_at or 0.0
        result = SubmitResult()
        for segment_id, intent in wanted.items():
            result += self._change_pair(
                contact_id, segment_id, intent, occurred, now, past.get(segment_id), mirrored_at
            )
        if change.mirror is not None and (occurred or now) > mirrored_at:
            self._store.record_mirror(contact_id, occurred or now)
        if result.stale:
            stale = set(result.stale_segments)
            return dataclasses.replace(result, segments=tuple(s for s in wanted if s not in stale))
        return dataclasses.replace(result, segments=tuple(wanted))

    def has_work(self, contact_id: str, segment_id: str) -> bool:
        """Whether a change to the pair is in progress (queued, parked, live or waiting)."""
        return self._current((contact_id, segment_id)) is not None

    def dead_letter(
        self,
        change: MembershipChange,
        reason: FailureReason,
        message: str,
        history: Mapping[str, Assignment] | None = None,
        mirrored_at: float = 0.0,
    ) -> DeadLetterResult:
        """Record the change's pairs as failed without sending anything.

        For an event that can never succeed (its contact id fails the id rule, a segment value
        is no CXone id) that a source acknowledges anyway, so that its CRM stops retrying it:
        the dead letter keeps what was asked, and why it was not done. Adds and a mirror's list
        become failed adds, removals failed removals. Nothing is ever sent for them, and a
        replay skips them: they were invalid when they arrived (`Assignment.dead_on_arrival`).

        Ordering holds as for any change: one older than what the pair had (`history`, the
        contact's journaled assignments by segment, or the mirror at `mirrored_at`) is stale.
        And a dead letter never replaces a pair's own state: work in progress, or a state
        reached for a change segmapd acted on, stays (an `active` membership stays tracked, so
        that a later removal or clear still removes it). Only a pair with nothing yet, or with
        an earlier dead letter, takes it.
        """
        now = self._wall()
        version = change.occurred_at or now
        wanted: dict[str, Intent] = {}
        for segment_id in (*change.add, *(change.mirror or ())):
            wanted.setdefault(storable(segment_id), Intent.ADD)
        for segment_id in change.remove:
            wanted.setdefault(storable(segment_id), Intent.REMOVE)
        contact_id = storable(change.contact_id)
        past_of = history or {}
        recorded = stale = kept = 0
        for segment_id, intent in wanted.items():
            key = (contact_id, segment_id)
            current = self._current(key)
            past = past_of.get(segment_id)
            if self._stale(key, intent, version, now, current, past, mirrored_at):
                stale += 1
                continue
            if current is not None or (past is not None and not past.dead_on_arrival):
                kept += 1
                continue
            if not self._ownership.owns(segment_id):
                # Its owner compares it again with what it holds.
                self._ownership.forward(
                    ForwardedChange(
                        contact_id,
                        segment_id,
                        intent,
                        version,
                        now,
                        reason=reason,
                        message=storable(message),
                    )
                )
                recorded += 1
                continue
            assignment = Assignment(
                contact_id,
                segment_id,
                state=State.FAILED,
                reason=reason,
                message=storable(message),
                received_at=now,
                updated_at=now,
                intent=intent,
                occurred_at=version,
            )
            self._store.record(assignment)
            # Born failed: reported as entering `failed` from nowhere (a terminal previous state
            # is what observers take as "nothing held to move from").
            self._observer.transitioned(assignment, State.FAILED)
            self._observer.finished(assignment)
            recorded += 1
        return DeadLetterResult(recorded, stale, kept)

    def tracked(self, contact_id: str, history: Mapping[str, Assignment]) -> list[str]:
        """Segments the contact may be in because of segmapd: what a mirror compares with.

        A membership segmapd made stays tracked until CXone confirms it removed: a pair whose
        newest change is an add (in progress, or done), and one whose add or removal failed
        where CXone may hold the membership all the same (`Assignment.may_hold_membership`).
        Not tracked: a confirmed removal, a removal in progress, an add CXone refused (the
        contact or segment unknown to it) and a dead letter of an event nobody could act on.
        `history` holds the journaled pairs.
        """
        found = []
        for segment_id, past in history.items():
            current = self._current((contact_id, segment_id))
            if current is not None:
                if current.intent is Intent.ADD:
                    found.append(segment_id)
            elif past.may_hold_membership:
                found.append(segment_id)
        return found

    def _change_pair(  # noqa: PLR0917 (one pair's whole change, called from one place)
        self,
        contact_id: str,
        segment_id: str,
        intent: Intent,
        occurred_at: float,
        now: float,
        past: Assignment | None,
        mirrored_at: float = 0.0,
    ) -> SubmitResult:
        key = (contact_id, segment_id)
        version = occurred_at or now
        current = self._current(key)
        if self._stale(key, intent, version, now, current, past, mirrored_at):
            return SubmitResult(stale=1, stale_segments=(segment_id,))
        if not self._ownership.owns(segment_id):
            # Its owner coalesces it with the segment's other work and compares it again with
            # what it holds (newer than the journal this process read).
            self._ownership.forward(
                ForwardedChange(contact_id, segment_id, intent, occurred_at, now)
            )
            return SubmitResult(queued=1)
        if current is not None:
            if current.intent is intent:
                self._renew(key, intent, occurred_at, now)
                return SubmitResult(joined=1)
            self._supersede(key, intent, occurred_at, now)
            return SubmitResult(queued=1)
        known = self._verifier.known(contact_id, segment_id) if self._verifier else None
        if known is not None and known is (intent is Intent.ADD):
            # Confirmed as asked within the cache TTL: no call. Journaled with this change's
            # time, so that an older change arriving later is found stale.
            done = State.ACTIVE if intent is Intent.ADD else State.REMOVED
            self._store.record(
                Assignment(
                    contact_id,
                    segment_id,
                    state=done,
                    received_at=now,
                    updated_at=now,
                    intent=intent,
                    occurred_at=occurred_at,
                )
            )
            return SubmitResult(cached=1)
        self._queue_new(contact_id, segment_id, intent, occurred_at, now)
        return SubmitResult(queued=1)

    def _stale(  # noqa: PLR0917 (the pair's whole standing, from its two callers)
        self,
        key: AssignmentKey,
        intent: Intent,
        version: float,
        now: float,
        current: _Current | None,
        past: Assignment | None,
        mirrored_at: float,
    ) -> bool:
        """Whether a change at `version` is older than what the pair has; journaled if so.

        What the pair has: its change in progress (`current`), else its journaled state
        (`past`), and in any case the contact's newest mirror (`mirrored_at`), which said the
        contact is in no segment it did not list.
        """
        newest = current.version if current is not None else (past.version if past else None)
        if mirrored_at and (newest is None or mirrored_at > newest):
            newest = mirrored_at
        if newest is None or version >= newest:
            return False
        self._store.record_stale(key[0], key[1], str(intent), version, now)
        self._observer.stale_change(key[0], key[1], intent)
        return True

    def _queue_new(
        self, contact_id: str, segment_id: str, intent: Intent, occurred_at: float, now: float
    ) -> None:
        # A queued assignment is only an entry in the buffer (or a parked one in the contact
        # gate) carrying its received time; its object is made when it is sent. A million
        # queued assignments then cost a buffer entry each, not an object each.
        assignment = Assignment(
            contact_id=contact_id,
            segment_id=segment_id,
            received_at=now,
            updated_at=now,
            intent=intent,
            occurred_at=occurred_at,
        )
        self._pending_writes += 1
        if occurred_at:
            self._occurred[assignment.key] = occurred_at
        self._store.record(assignment)
        self._observer.transitioned(assignment, State.QUEUED)
        lane = (segment_id, intent)
        if self._gate.admit(contact_id, lane, now):
            self._enqueue(lane, contact_id, now)

    def _current(self, key: AssignmentKey) -> _Current | None:
        """The newest change in progress for the pair: queued, parked, live or waiting."""
        successor = self._successors.get(key)
        if successor is not None:
            return _Current(successor.intent, successor.version)
        live = self._live.get(key)
        if live is not None:
            return _Current(live.intent, live.version)
        contact_id, segment_id = key
        for intent in Intent:
            lane = (segment_id, intent)
            if (contact_id, lane) in self._buffer or self._gate.is_parked(contact_id, lane):
                at = self._buffer.time_of(lane, contact_id) or self._gate.parked_time(
                    contact_id, lane
                )
                return _Current(intent, self._occurred.get(key) or at or 0.0)
        return None

    def _renew(self, key: AssignmentKey, intent: Intent, occurred_at: float, now: float) -> None:
        """A newer change of the same intent joins the work in progress and dates it.

        Its time (its occurredAt, else its arrival) becomes the pair's, so that a change older
        than it, arriving later, is found stale.
        """
        version = occurred_at or now
        successor = self._successors.get(key)
        if successor is not None:
            if version > successor.version:
                self._successors[key] = _Change(intent, version, successor.received_at)
            return
        live = self._live.get(key)
        if live is not None:
            if version > live.version:
                live.occurred_at = version
            return
        at = self._occurred.get(key)
        if at is None or version > at:
            self._occurred[key] = version

    def _supersede(
        self, key: AssignmentKey, intent: Intent, occurred_at: float, now: float
    ) -> None:
        """A newer change of the other intent replaces the work in progress for the pair.

        Queued (or parked) work is never sent: it moves to the other lane. Written or verifying
        work leaves validation and its opposite is queued. A request in flight (sending, or
        retrying: its outcome is unknown) finishes first, so that CXone applies the two in
        order; the newer change follows its outcome.
        """
        contact_id, segment_id = key
        change = _Change(intent, occurred_at, now)
        successor = self._successors.get(key)
        live = self._live.get(key)
        if successor is not None:
            if live is not None and live.intent is intent:
                del self._successors[key]  # back to what is in flight: nothing more to send
                live.occurred_at = max(live.occurred_at, occurred_at)
                self._store.record(live)
            else:
                self._successors[key] = change
                if live is not None:
                    self._store.record(_waiting_row(live, change))
            return
        if live is not None:
            # Live and write-pending: in a batch (being saved, sent or resent) or waiting to
            # retry one. That request's outcome comes first; restarting now would send both.
            if live.state in WRITE_PENDING_STATES:
                self._successors[key] = change
                self._store.record(_waiting_row(live, change))
                return
            # Written or verifying: its confirmation no longer matters.
            if self._verifier is not None:
                self._verifier.forget(contact_id, segment_id)
            self._observer.superseded(live, intent)
            self._restart(live, change, hold_slot=False)
            return
        old_lane = (segment_id, _OPPOSITE[intent])
        new_lane = (segment_id, intent)
        self._occurred.pop(key, None)
        replaced = Assignment(
            contact_id, segment_id, received_at=now, updated_at=now, intent=intent,
            occurred_at=occurred_at,
        )  # fmt: skip
        self._observer.superseded(replaced, intent)
        if self._gate.repark(contact_id, old_lane, new_lane, now):
            pass  # waits for a slot, as the other intent did
        else:
            self._buffer.discard(old_lane, contact_id)
            self._enqueue(new_lane, contact_id, now)
        if occurred_at:
            self._occurred[key] = occurred_at
        self._store.record(replaced)

    def _restart(self, assignment: Assignment, change: _Change, *, hold_slot: bool) -> None:
        """The pair starts over as `change`, queued in its lane (its old work is over)."""
        key = assignment.key
        self._live.pop(key, None)
        assignment.intent = change.intent
        assignment.occurred_at = change.occurred_at
        assignment.received_at = change.received_at
        assignment.attempts = 0
        self._move(assignment, State.QUEUED)
        if change.occurred_at:
            self._occurred[key] = change.occurred_at
        else:
            self._occurred.pop(key, None)
        lane = (assignment.segment_id, change.intent)
        if hold_slot or self._gate.admit(assignment.contact_id, lane, change.received_at):
            self._enqueue(lane, assignment.contact_id, change.received_at)

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

    def _enqueue(self, lane: Lane, contact_id: str, received_at: float) -> None:
        if self._buffer.add(lane, contact_id, received_at):
            self._wakeup.set()

    def _pending(self, contact_id: str, segment_id: str) -> bool:
        """Whether the pair is in progress: live, buffered, parked or waiting as a successor."""
        return self._current((contact_id, segment_id)) is not None

    # ---- queries and waiting ---------------------------------------------------------------

    async def wait(
        self, contact_id: str, segment_ids: Iterable[str], timeout_s: float
    ) -> list[Assignment]:
        """Wait up to `timeout_s` for the assignments to end; returns their latest states.

        An assignment ends when it is active or failed (or written, when no verifier is set).
        After `release_waiters()` it returns at once, with the states reached so far.
        """
        keys = [(contact_id, s) for s in dict.fromkeys(segment_ids)]
        deadline = self._clock() + timeout_s
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
        while True:
            stored = {a.segment_id: a for a in await self._store.contact(contact_id)}
            result: list[Assignment] = []
            elsewhere = False  # a pair whose work goes on in another process
            for _, segment_id in keys:
                current = (
                    ended.get(segment_id)
                    or self._live.get((contact_id, segment_id))
                    or stored.get(segment_id)
                )
                if current is not None:
                    result.append(current)
                    # Not ended, and no outcome will be handed over here (its work goes on in
                    # another process, or moved here meanwhile): only the journal tells.
                    if segment_id not in ended and not self._pending(contact_id, segment_id):
                        elsewhere = elsewhere or not self._ended(current)
            left = deadline - self._clock()
            if not elsewhere or left <= 0 or self._waiters_released:
                return result
            # Its owner's commits are what this process can see of it: read them again.
            await asyncio.sleep(min(WAIT_POLL_S, left))

    def _ended(self, assignment: Assignment) -> bool:
        return assignment.terminal or (self._verifier is None and assignment.state is State.WRITTEN)

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

    # ---- handing segments over (several processes on one journal) -------------------------

    @property
    def accepting(self) -> bool:
        """Whether the engine takes new work (started, not draining)."""
        return self._accepting

    def set_contact_limit(self, limit: int) -> None:
        """Change the per-contact in-flight limit (its share when several processes split it).

        Slots already taken are kept; the new limit applies to the next admissions.
        """
        self._gate.limit = max(1, limit)

    def segments(self) -> set[str]:
        """Every segment the engine holds anything of: buffered, parked, in flight, validating."""
        found = {segment_id for _, segment_id in self._live}
        found |= {lane[0] for lane in self._buffer.lanes()}
        found |= {lane[0] for lane in self._gate.parked_lanes()}
        found |= set(self._sending)
        return found

    def _handed_over(self, lane: Lane) -> bool:
        return lane[0] in self._releasing

    async def release_segments(self, segments: set[str], budget_s: float) -> int:
        """Stop working on `segments`: requests in flight end, the rest stays journaled.

        Called while this process still holds them (`Ownership.holds`) but no longer owns them
        for new work (`owns` is false: new changes are forwarded). Nothing new is batched for
        them; requests in flight get their outcomes (within `budget_s`), recorded here; then
        every trace of them leaves memory: buffered and parked ids, live assignments, changes
        waiting for an outcome, validation. The journal keeps each of them as it stands (queued,
        retrying, written, ...), and their next owner recovers them from it. Returns how many
        assignments were let go.
        """
        if not segments:
            return 0
        self._releasing |= segments
        try:
            tasks = [t for s in segments for t in self._sending.get(s, ()) if not t.done()]
            if tasks:
                await asyncio.wait(tasks, timeout=budget_s)
            for task in tasks:
                if not task.done():
                    # Past the budget: its outcome is the next owner's to learn (the batch is
                    # journaled and resent under its key, which CXone replays).
                    task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            return self._drop_segments(segments)
        finally:
            self._releasing -= segments

    def _drop_segments(self, segments: set[str]) -> int:
        def dropped(lane: Lane) -> bool:
            return lane[0] in segments

        let_go = 0
        slots: list[str] = []
        parked_live: set[AssignmentKey] = set()  # recovered retrying pairs waiting for a slot
        for contact_id, lane in self._gate.drop_parked(dropped):
            key = (contact_id, lane[0])
            if key in self._live:
                parked_live.add(key)  # counted with the live ones; it holds no slot
                continue
            self._pending_writes -= 1
            self._occurred.pop(key, None)
            let_go += 1
        for lane in self._buffer.lanes():
            if not dropped(lane):
                continue
            for contact_id in self._buffer.drop_lane(lane):
                key = (contact_id, lane[0])
                self._occurred.pop(key, None)
                if key not in self._live:  # a live one (a retry id) is counted below
                    slots.append(contact_id)
                    self._pending_writes -= 1
                    let_go += 1
        for key in [k for k in self._live if k[1] in segments]:
            assignment = self._live.pop(key)
            let_go += 1
            if assignment.state in WRITE_PENDING_STATES:
                # Each write-pending live pair holds one slot (a change waiting for it shares it),
                # unless it was parked waiting for one.
                self._pending_writes -= 1
                if key not in parked_live:
                    slots.append(assignment.contact_id)
        for key in [k for k in self._successors if k[1] in segments]:
            del self._successors[key]
        for key in [k for k in self._occurred if k[1] in segments]:
            del self._occurred[key]
        for key in [k for k in self._waiters if k[1] in segments]:
            for future in self._waiters.pop(key):
                if not future.done():
                    future.cancel()  # `wait()` goes on reading the journal for it
        if self._verifier is not None:
            self._verifier.release_segments(segments)
        for contact_id in slots:
            self._release_contact(contact_id)
        return let_go

    def submit_forwarded(
        self,
        changes: Iterable[ForwardedChange],
        histories: Mapping[str, tuple[Mapping[str, Assignment], float]],
    ) -> SubmitResult:
        """Take changes another process journaled for segments owned here.

        `histories` maps each contact to (its journaled assignments by segment, its newest
        mirror time), read after the changes were. Each change is compared again with what is
        in progress here and in the journal, as if it had arrived here at its received time.
        Changes for segments no longer owned are forwarded again.
        """
        result = SubmitResult()
        for change in changes:
            past, mirrored_at = histories.get(change.contact_id, ({}, 0.0))
            if change.reason is not None:
                self.dead_letter(
                    MembershipChange(
                        change.contact_id,
                        add=(change.segment_id,) if change.intent is Intent.ADD else (),
                        remove=(change.segment_id,) if change.intent is Intent.REMOVE else (),
                        occurred_at=change.occurred_at or None,
                    ),
                    change.reason,
                    change.message,
                    past,
                    mirrored_at,
                )
                continue
            result += self._change_pair(
                change.contact_id,
                change.segment_id,
                change.intent,
                change.occurred_at,
                change.received_at,
                past.get(change.segment_id),
                mirrored_at,
            )
        return result

    def abandon(self) -> int:
        """Let go of every segment at once, recording nothing: this process lost them all.

        For a process the others declared dead (several processes on one journal): the new
        owners recover its segments from the journal, so nothing more may be sent or recorded
        from here. The caller first makes `Ownership.holds` false for every segment. Every
        request in flight is cancelled (its batch stays journaled and is resent under its key,
        which CXone replays), every retry timer too, and every trace of every segment leaves
        memory at once, as `release_segments` lets go of its segments, without waiting for any
        outcome. The engine keeps running, ready for segments adopted later. Returns how many
        assignments were let go.
        """
        for task in self._tasks:
            task.cancel()  # each ends at its next step, where `holds` keeps it from recording
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        return self._drop_segments(self.segments())

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
        skip = self._handed_over if self._releasing else None
        lane = self._buffer.pick(
            now,
            spare_capacity=self._write_gate.has_capacity(),
            draining=self._draining,
            skip=skip,
        )
        if lane is None:
            deadline = self._buffer.next_deadline(skip)
            timeout = None if deadline is None else max(0.001, deadline - now)
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            return
        await self._write_gate.acquire()
        # Choose again now that a request may go: under backlog the wait for the token is where
        # batches fill up, so the batch sent is the fullest the limit allows.
        skip = self._handed_over if self._releasing else None
        lane = (
            self._buffer.pick(self._wall(), spare_capacity=True, draining=self._draining, skip=skip)
            or lane
        )
        if lane[0] in self._releasing:
            return  # handed over while this send waited for its token: the token goes unused
        entries = self._buffer.take_entries(lane)
        if not entries:
            return
        segment_id, intent = lane
        contact_ids = []
        for contact_id, received_at in entries:
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
                )
            contact_ids.append(contact_id)
        batch = self._sender.new_batch(lane, contact_ids)
        self.spawn(
            lambda: self._sender.send(batch, token_held=True),
            f"send {segment_id}",
            segment_id=segment_id,
        )

    # ---- the ledger (called by the sender) -------------------------------------------------

    def spawn(
        self,
        coro_factory: Callable[[], Coroutine[Any, Any, None]],
        name: str,
        *,
        segment_id: str | None = None,
    ) -> None:
        """Run a background task that is kept referenced and whose failure is logged.

        `segment_id`: the task sends that segment's work (a handover waits for it).
        """
        task = asyncio.create_task(coro_factory(), name=name)
        self._tasks.add(task)
        if segment_id is not None:
            self._sending.setdefault(segment_id, set()).add(task)
            task.add_done_callback(partial(self._send_done, segment_id))
        task.add_done_callback(self._task_done)

    def _send_done(self, segment_id: str, task: asyncio.Task[None]) -> None:
        tasks = self._sending.get(segment_id)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._sending[segment_id]

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._draining:
            self._wakeup.set()  # the flusher may be waiting for the last send to end
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def attempts(self, lane: Lane, contact_id: str) -> int:
        """Attempts made so far for the live assignment (0 if none)."""
        assignment = self._live.get((contact_id, lane[0]))
        return assignment.attempts if assignment is not None else 0

    def mark_sending(self, lane: Lane, contact_ids: list[str], *, new_attempt: bool = True) -> None:
        """The ids are about to be sent."""
        for assignment in self._assignments(lane, contact_ids):
            if new_attempt:
                assignment.attempts += 1
            self._move(assignment, State.SENDING)

    def mark_retrying(self, lane: Lane, contact_ids: list[str]) -> None:
        """The ids wait for a backoff."""
        for assignment in self._assignments(lane, contact_ids):
            self._move(assignment, State.RETRYING)

    def mark_written(self, lane: Lane, contact_ids: list[str]) -> None:
        """CXone holds these writes: memberships added or removed (maybe not yet indexed)."""
        written = self._leave_write_path(lane, contact_ids, State.WRITTEN)
        if self._verifier is not None:
            self._verifier.watch(written)
        else:
            for assignment in written:
                self._finish(assignment)

    def mark_uncertain(self, lane: Lane, contact_ids: list[str], message: str) -> None:
        """The last attempt's outcome is unknown (5xx, timeout, reset): reads settle it.

        CXone may have applied the write before failing to answer. The pairs leave the write
        path as `verifying` (with `message` saying why) and go to validation, which confirms
        them if CXone shows the change, and otherwise fails them `retries_exhausted` with
        `message` once a window of reads did not (`Verifier.settle`). Without a verifier they
        fail at once, as nothing could settle them.
        """
        if self._verifier is None:
            self.mark_failed(lane, contact_ids, FailureReason.RETRIES_EXHAUSTED, message)
            return
        unsettled = self._leave_write_path(
            lane, contact_ids, State.VERIFYING, message=f"settling by reads: {message}"
        )
        self._verifier.settle(unsettled, message)

    def _leave_write_path(
        self, lane: Lane, contact_ids: list[str], state: State, *, message: str = ""
    ) -> list[Assignment]:
        """Move the pairs whose write has an outcome to `state`; those that go on to validation.

        A pair whose newer change of the other intent waited for this outcome starts over as
        that change instead, in the same slot; the others free their contact's slot.
        """
        leaving = []
        for assignment in self._assignments(lane, contact_ids):
            self._move(assignment, state, message=message)
            successor = self._successors.pop(assignment.key, None)
            if successor is not None:
                # A newer change of the other intent came meanwhile: that one follows now,
                # in the same slot, instead of confirming this one.
                self._observer.superseded(assignment, successor.intent)
                self._restart(assignment, successor, hold_slot=True)
                continue
            self._release_contact(assignment.contact_id)
            leaving.append(assignment)
        return leaving

    def mark_failed(
        self, lane: Lane, contact_ids: list[str], reason: FailureReason, message: str
    ) -> None:
        """These assignments end failed (dead letters), unless a newer change follows them."""
        for assignment in self._assignments(lane, contact_ids):
            successor = self._successors.pop(assignment.key, None)
            if successor is not None:
                self._observer.superseded(assignment, successor.intent)
                self._restart(assignment, successor, hold_slot=True)
                continue
            self._move(assignment, State.FAILED, reason=reason, message=message)
            self._release_contact(assignment.contact_id)
            self._finish(assignment)

    def requeue_later(self, lane: Lane, contact_ids: list[str], delay_s: float) -> None:
        """After the backoff the ids rejoin their lane of the buffer, ahead of fresh ids."""
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def requeue() -> None:
            if handle is not None:
                self._timers.discard(handle)
            # Still pending in this lane (retrying, or never sent when the journal could not
            # save the batch), not started over as the other intent meanwhile.
            still = [a.contact_id for a in self._assignments(lane, contact_ids)]
            if still:
                self._buffer.add_retry(lane, still)
                self._wakeup.set()

        handle = loop.call_later(delay_s, requeue)
        self._timers.add(handle)

    # ---- called by the verifier ------------------------------------------------------------

    def confirm(self, assignments: Iterable[Assignment]) -> None:
        """The verifier saw these writes indexed: adds are active, removals removed."""
        for assignment in assignments:
            done = State.ACTIVE if assignment.intent is Intent.ADD else State.REMOVED
            self._move(assignment, done)
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

    def _assignments(self, lane: Lane, contact_ids: list[str]) -> list[Assignment]:
        # Only assignments of the lane's intent whose write is pending: an answer replayed for
        # a batch recovered after a crash may name ids that have moved on since.
        segment_id, intent = lane
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

    def _move(
        self,
        assignment: Assignment,
        state: State,
        *,
        reason: FailureReason | None = None,
        message: str = "",
    ) -> None:
        if not self._ownership.holds(assignment.segment_id):
            # Handed over (or taken over): its new owner has the journal's record of it, and
            # a state recorded from here would overwrite that owner's.
            return
        previous = assignment.state
        was_pending = previous in WRITE_PENDING_STATES
        assignment.transition(state, self._wall(), reason=reason, message=message)
        is_pending = state in WRITE_PENDING_STATES
        self._pending_writes += int(is_pending) - int(was_pending)
        successor = self._successors.get(assignment.key)
        # While a newer change waits for this request's outcome, the journal holds that change:
        # after a crash it is queued (the old batch is resent first), never lost.
        self._store.record(assignment if successor is None else _waiting_row(assignment, successor))
        self._observer.transitioned(assignment, previous)

    def _release_contact(self, contact_id: str) -> None:
        parked = self._gate.release(contact_id)
        if parked is not None:
            lane, received_at = parked
            self._enqueue(lane, contact_id, received_at)

    def _finish(self, assignment: Assignment) -> None:
        """The engine is done with the assignment: drop it from memory, release its waiters."""
        self._live.pop(assignment.key, None)
        if assignment.terminal:
            self._observer.finished(assignment)
        for future in self._waiters.pop(assignment.key, []):
            if not future.done():
                future.set_result(assignment)
