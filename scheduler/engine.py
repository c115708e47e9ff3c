"""The engine: the one face of the scheduler, over the components that do its work.

- `Changes` (scheduler/changes.py) decides what a CRM's change does to each pair: newest wins,
  stale, join, supersede, mirror, dead letters, forwarded changes, admission.
- `Ledger` (scheduler/ledger.py) owns every pair's state and writes every transition.
- `Accumulator` (scheduler/accumulator.py) holds the ids waiting to be written, per batch key, the
  per-contact gate and the retry timers.
- `Sender` (scheduler/sender.py) takes batches and writes them, outcomes to the ledger.
- `Waiters` (scheduler/waiters.py) are the callers waiting for pairs to end.
- `scheduler/recovery.py` takes the journal's unfinished work back, at start or at a takeover.

The engine is built from them by the composition root (daemon/wiring.py); it keeps the public
methods the daemon and the tests use, and orchestrates what spans several components (the
lifecycle, `wait()`, handing segments over). It holds no pair state of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from scheduler.accumulator import Accumulator, BatchingPolicy
from scheduler.changes import (
    Changes,
    DeadLetterResult,
    EngineOverloaded,
    SubmitResult,
)
from scheduler.ledger import Ledger
from scheduler.model import (
    Assignment,
    AssignmentKey,
    FailureReason,
    Lane,
    MembershipChange,
    State,
)
from scheduler.observer import EngineObserver
from scheduler.ownership import ForwardedChange
from scheduler.recovery import QueuedRow, RecoveredWork, take_back
from scheduler.sender import Sender
from scheduler.store import BatchRecord, Store, StoreUnavailable
from scheduler.waiters import Waiters

__all__ = [
    "WAIT_POLL_S",
    "BatchingPolicy",
    "DeadLetterResult",
    "Engine",
    "EngineClosed",
    "EngineOverloaded",
    "SubmitResult",
    "Verifier",
]

log = logging.getLogger(__name__)

# How often `wait()` reads the journal again for a pair another process works on.
WAIT_POLL_S = 0.25


class EngineClosed(Exception):
    """The engine is draining or stopped and takes no new work."""


class Verifier(Protocol):
    """Confirms written memberships and removals (the validation poller)."""

    def watch(self, assignments: list[Assignment]) -> None:
        """Start confirming these written assignments; outcomes go to the ledger."""
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
    """The scheduler's face: takes changes, waits, starts, stops and hands segments over.

    Without a verifier an assignment's journey ends at `written`; with one, `written` hands it to
    the verifier, which reports `active` (or `removed`) or `failed` to the ledger.
    """

    def __init__(
        self,
        *,
        store: Store,
        ledger: Ledger,
        changes: Changes,
        accumulator: Accumulator,
        sender: Sender,
        waiters: Waiters,
        observer: EngineObserver,
        verifier: Verifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._changes = changes
        self._accumulator = accumulator
        self._sender = sender
        self._waiters = waiters
        self._observer = observer
        self._verifier = verifier
        self._clock = clock
        self.batching = changes.batching
        self._accepting = False
        # Work taken back before start: set going when the engine starts.
        self._recovered: list[RecoveredWork] = []

    # ---- lifecycle -----------------------------------------------------------------------

    def restore(
        self,
        assignments: Iterable[Assignment],
        batches: Iterable[BatchRecord],
        queued: Iterable[QueuedRow] = (),
    ) -> None:
        """Take back unfinished work from the journal (see scheduler/recovery.py).

        Before `start()` the work is set going when the engine starts; on a running engine (a
        takeover) at once. `queued` lists queued assignments as (contact_id, segment_id,
        received_at, intent, occurred_at) tuples.
        """
        work = take_back(self._ledger, self._accumulator, assignments, batches, queued)
        self._observer.restored(work.by_state)
        log.info(
            "restored %d assignments: %d pending writes (%d in %d in-flight batches), "
            "%d to validate",
            sum(work.by_state.values()),
            self._ledger.pending_writes,
            work.resent_ids,
            len(work.batches),
            len(work.written),
        )
        if self._sender.running:
            self._resume(work)
            self._accumulator.wake()
        else:
            self._recovered.append(work)

    def adopt(
        self,
        assignments: Iterable[Assignment],
        batches: Iterable[BatchRecord],
        queued: Iterable[QueuedRow] = (),
    ) -> None:
        """Take over segments another process owned, from the journal, exactly as `restore`."""
        self.restore(assignments, batches, queued)

    def _resume(self, work: RecoveredWork) -> None:
        self._sender.resend(work.batches)
        if not work.written:
            return
        if self._verifier is not None:
            self._verifier.watch(work.written)
        else:
            for assignment in work.written:
                self._ledger.finish(assignment)

    async def start(self) -> None:
        """Start the sender; the engine takes requests from now on."""
        if self._sender.running:
            return
        self._accepting = True
        self._sender.start()
        recovered, self._recovered = self._recovered, []
        for work in recovered:
            self._resume(work)

    async def stop(self, budget_s: float = 10.0) -> None:
        """Refuse new work, send what is buffered, wait for in-flight sends, then cancel the rest.

        Idempotent. Assignments still waiting for a backoff keep their `retrying` state in the
        store, which is where a durable store's recovery picks them up.
        """
        if not self._accepting and not self._sender.running:
            return
        self._accepting = False
        await self._sender.stop(budget_s)
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
            self._ledger.pending_writes,
            len(self._accumulator),
        )

    # ---- state -------------------------------------------------------------------------------

    @property
    def pending_writes(self) -> int:
        """Assignments queued, sending or waiting to retry."""
        return self._ledger.pending_writes

    @property
    def buffered(self) -> int:
        """Ids waiting in the coalescing buffer."""
        return len(self._accumulator)

    def buffered_by_lane(self) -> dict[Lane, int]:
        """Ids waiting in the coalescing buffer, per lane (a walk of its segments: metrics)."""
        return self._accumulator.buffer.depth_by_lane()

    def buffered_by_segment(self) -> dict[str, int]:
        """Ids waiting in the coalescing buffer, per segment (adds and removals together).

        Read only, for the console's Segments view: a walk of the batch keys, never of the ids.
        Pairs parked at their contact's in-flight limit are not in it (`parked` counts them).
        """
        found: dict[str, int] = {}
        for (segment_id, _), depth in self._accumulator.buffer.depth_by_key().items():
            found[segment_id] = found.get(segment_id, 0) + depth
        return found

    @property
    def parked(self) -> int:
        """Pairs waiting for a free slot of their contact's in-flight limit (all segments)."""
        return self._accumulator.gate.parked

    @property
    def overloaded(self) -> bool:
        """Whether new work would be refused for the high-water mark."""
        return self._changes.overloaded

    @property
    def healthy(self) -> bool:
        """False once the sender's flush loop has died."""
        return self._sender.failure is None

    @property
    def accepting(self) -> bool:
        """Whether the engine takes new work (started, not draining, its writer alive)."""
        return self._accepting and self._sender.failure is None

    # ---- changes -------------------------------------------------------------------------

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
        if not self.accepting:
            raise EngineClosed("the engine is not accepting work")
        return self._changes.submit(change, history, mirrored_at, admitted=admitted)

    def dead_letter(
        self,
        change: MembershipChange,
        reason: FailureReason,
        message: str,
        history: Mapping[str, Assignment] | None = None,
        mirrored_at: float = 0.0,
    ) -> DeadLetterResult:
        """Record the change's pairs as failed without sending anything (`Changes.dead_letter`)."""
        return self._changes.dead_letter(change, reason, message, history, mirrored_at)

    def tracked(self, contact_id: str, history: Mapping[str, Assignment]) -> list[str]:
        """Segments the contact may be in because of segmapd (`Changes.tracked`)."""
        return self._changes.tracked(contact_id, history)

    def submit_forwarded(
        self,
        changes: Iterable[ForwardedChange],
        histories: Mapping[str, tuple[Mapping[str, Assignment], float]],
    ) -> SubmitResult:
        """Take changes another process journaled for segments owned here."""
        return self._changes.submit_forwarded(changes, histories)

    def admission_wait(self, assignments: int) -> float | None:
        """None if `assignments` more fit below the high-water mark; else seconds to wait."""
        return self._changes.admission_wait(assignments)

    # ---- drift reconcile (scheduler/reconcile.py's `Repairs`) -----------------------------------

    def busy(self, key: AssignmentKey) -> bool:
        """Whether a change to the pair is in progress here."""
        return self._ledger.has_work(key)

    def repair(self, held: Assignment) -> bool:
        """Queue a drifted pair again, in the bulk lane, as `held` (`Changes.repair`)."""
        if not self.accepting:
            return False
        return self._changes.repair(held)

    def confirm(self, assignments: Iterable[Assignment]) -> None:
        """CXone shows these writes (what the verifier reports to the ledger)."""
        self._ledger.confirm(assignments)

    # ---- waiting -------------------------------------------------------------------------

    async def wait(
        self, contact_id: str, segment_ids: Iterable[str], timeout_s: float
    ) -> list[Assignment]:
        """Wait up to `timeout_s` for the assignments to end; returns their latest states.

        An assignment ends when it is active, removed or failed (or written, when no verifier is
        set). After `release_waiters()` it returns at once, with the states reached so far.
        """
        ledger, waiters = self._ledger, self._waiters
        keys = [(contact_id, s) for s in dict.fromkeys(segment_ids)]
        deadline = self._clock() + timeout_s
        waiting: list[tuple[AssignmentKey, asyncio.Future[Assignment]]] = []
        for key in keys:
            if ledger.has_work(key) and not waiters.released:
                waiting.append((key, waiters.add(key)))
        if waiting:
            await asyncio.wait([f for _, f in waiting], timeout=timeout_s)
            for key, future in waiting:
                if not future.done():
                    future.cancel()
                    waiters.discard(key, future)
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
            for key in keys:
                segment_id = key[1]
                current = ended.get(segment_id) or ledger.live(key) or stored.get(segment_id)
                if current is not None:
                    result.append(current)
                    # Not ended, and no outcome will be handed over here (its work goes on in
                    # another process, or moved here meanwhile): only the journal tells.
                    if segment_id not in ended and not ledger.has_work(key):
                        elsewhere = elsewhere or not self._ended(current)
            left = deadline - self._clock()
            if not elsewhere or left <= 0 or waiters.released:
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
        return self._waiters.release_all()

    # ---- handing segments over (several processes on one journal) -------------------------

    def set_contact_limit(self, limit: int) -> None:
        """Change the per-contact in-flight limit (its share when several processes split it).

        Slots already taken are kept; the new limit applies to the next admissions.
        """
        self._accumulator.set_contact_limit(limit)

    def segments(self) -> set[str]:
        """Every segment the engine holds anything of: buffered, parked, in flight, validating."""
        return self._ledger.segments() | self._sender.segments()

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
        await self._sender.drain(segments, budget_s)
        return self._drop(segments)

    def _drop(self, segments: set[str]) -> int:
        let_go = self._ledger.drop(segments)
        if self._verifier is not None:
            self._verifier.release_segments(segments)
        return let_go

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
        self._sender.abandon()
        return self._drop(self.segments())
