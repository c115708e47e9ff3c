"""The accumulator: ids waiting to be written, per batch key, and when the sender may take them.

It holds the coalescing buffer (per (segment, intent) batch key, the ids queued and their
received times), the per-contact gate (at most a few segments of one contact in flight; the others
parked), the retry timers (ids back in their batch key once their backoff has passed) and the data
waiter the sender sleeps on. It knows nothing of HTTP, of assignment states or of the journal:
the ledger decides what goes in, the sender takes batches out (aiokafka's
`message_accumulator.py` beside its `sender.py`).

A queued assignment is only an entry here, its received time the only thing it carries (its lane
is which of the buffer's dictionaries holds it): a million queued assignments cost a buffer
entry each, never an object each.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.buffer import CoalescingBuffer, ContactGate
from scheduler.model import INTENTS, LANES, BatchKey, Intent, Lane


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    """How writes are grouped (defaults from the CXone guidance)."""

    min_size: int = 50
    max_size: int = 200
    linger_s: float = 1.0
    max_inflight_per_contact: int = 3
    high_water: int = 1_000_000
    #: The least share of batches that go to batch keys holding only bulk ids while others
    #: holding live ids are due too (`[limits] bulk_read_share_min`, the reads' share).
    bulk_share_min: float = 0.2


#: Which ids of a batch key still wait for their backoff when it has passed, with their lanes
#: (the ledger says).
StillRetrying = Callable[[BatchKey, list[str]], list[tuple[str, Lane]]]


class Accumulator:
    """The buffer, the contact gate, the retry timers and the sender's data waiter."""

    def __init__(self, batching: BatchingPolicy) -> None:
        self.batching = batching
        self.buffer: CoalescingBuffer[BatchKey] = CoalescingBuffer(
            min_size=batching.min_size,
            max_size=batching.max_size,
            linger_s=batching.linger_s,
            bulk_share_min=batching.bulk_share_min,
        )
        self.gate: ContactGate[BatchKey] = ContactGate(batching.max_inflight_per_contact)
        self._timers: set[asyncio.TimerHandle] = set()
        self._wakeup = asyncio.Event()

    def __len__(self) -> int:
        return len(self.buffer)

    # ---- what goes in --------------------------------------------------------------------

    def admit(
        self, contact_id: str, batch_key: BatchKey, received_at: float, lane: Lane = Lane.LIVE
    ) -> bool:
        """Take one of the contact's slots for the pair, or park it (False) until one frees.

        A live pair never waits for its contact's bulk work that is only queued: when every
        slot is taken and one is held by a bulk id still in the buffer, that id gives its slot
        up and waits first in the contact's line instead (the limit is on writes in flight,
        which a queued id is not yet).
        """
        gate = self.gate
        if gate.take_slot(contact_id):
            return True
        if lane is Lane.LIVE and self._bulk_gives_way(contact_id):
            return True
        gate.park(contact_id, batch_key, received_at, lane)
        return False

    def _bulk_gives_way(self, contact_id: str) -> bool:
        """A queued bulk id of the contact gives its slot up to a live pair; False if none."""
        found = self.buffer.queued_bulk(contact_id)
        if found is None:
            return False
        batch_key, received_at = found
        self.buffer.discard(batch_key, contact_id)
        self.gate.park(contact_id, batch_key, received_at, Lane.BULK, front=True)
        return True

    def enqueue(
        self, batch_key: BatchKey, contact_id: str, received_at: float, lane: Lane = Lane.LIVE
    ) -> None:
        """Queue an id under its batch key, in `lane` (coalesced with one already queued)."""
        if self.buffer.add(batch_key, contact_id, received_at, lane):
            self._wakeup.set()

    def add_retries(
        self, batch_key: BatchKey, contact_ids: list[str], lane: Lane = Lane.LIVE
    ) -> None:
        """Queue ids whose backoff has passed, ahead of the batch key's fresh ids."""
        self.buffer.add_retry(batch_key, contact_ids, lane)
        self._wakeup.set()

    def force_slot(self, contact_id: str) -> None:
        """Take a slot past the limit (work recovered mid-flight is already in flight)."""
        self.gate.force(contact_id)

    def release(self, contact_id: str) -> None:
        """Free one of the contact's slots; its next parked pair takes it and is queued."""
        parked = self.gate.release(contact_id)
        if parked is not None:
            batch_key, received_at, lane = parked
            self.enqueue(batch_key, contact_id, received_at, lane)

    def move(
        self,
        contact_id: str,
        old: BatchKey,
        new: BatchKey,
        received_at: float,
        lane: Lane = Lane.LIVE,
    ) -> None:
        """A queued (or parked) id of `old` becomes one of `new` (a newer change of the pair)."""
        if not self.gate.repark(contact_id, old, new, received_at, lane):
            self.buffer.discard(old, contact_id)
            self.enqueue(new, contact_id, received_at, lane)

    def set_lane(self, contact_id: str, batch_key: BatchKey, lane: Lane) -> None:
        """A queued, retry or parked id goes on in `lane` (a newer change of the pair said so).

        A parked id moved to live takes the slot of a queued bulk id of its contact, if one
        holds a slot (see `admit`).
        """
        if self.buffer.set_lane(batch_key, contact_id, lane):
            self._wakeup.set()  # a live id may make its batch key the next to go
            return
        gate = self.gate
        if not gate.set_lane(contact_id, batch_key, lane) or lane is not Lane.LIVE:
            return
        if self.buffer.queued_bulk(contact_id) is None:
            return
        received_at = gate.unpark(contact_id, batch_key)
        if received_at is not None and self._bulk_gives_way(contact_id):
            self.enqueue(batch_key, contact_id, received_at, lane)

    def lane_of(self, contact_id: str, batch_key: BatchKey) -> Lane | None:
        """The lane of a queued (or parked) id; None for a retry id or one not queued."""
        lane = self.buffer.lane_of(batch_key, contact_id)
        if lane is None and self.gate.any_parked:
            lane = self.gate.parked_lane(contact_id, batch_key)
        return lane

    def set_contact_limit(self, limit: int) -> None:
        """Change the per-contact limit; slots already taken are kept."""
        self.gate.limit = max(1, limit)

    # ---- retries -------------------------------------------------------------------------

    def requeue_later(
        self, batch_key: BatchKey, contact_ids: list[str], delay_s: float, still: StillRetrying
    ) -> None:
        """After the backoff, the ids `still` names rejoin their batch key, ahead of fresh ids."""
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def requeue() -> None:
            if handle is not None:
                self._timers.discard(handle)
            waiting = still(batch_key, contact_ids)
            for lane in LANES:
                ids = [contact_id for contact_id, of in waiting if of is lane]
                if ids:
                    self.add_retries(batch_key, ids, lane)

        handle = loop.call_later(delay_s, requeue)
        self._timers.add(handle)

    def cancel_timers(self) -> None:
        """Cancel every retry timer (their ids stay `retrying` in the journal)."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    # ---- what is queued ------------------------------------------------------------------

    def queued(self, contact_id: str, segment_id: str) -> tuple[Intent, float] | None:
        """The pair's intent and received time if it is queued or parked, else None.

        The time is 0.0 for an id queued again after a backoff (it keeps no time).
        """
        entry = self.buffer.entry
        for intent in INTENTS:
            at = entry((segment_id, intent), contact_id)
            if at is not None:
                return intent, at
        gate = self.gate
        if not gate.any_parked:
            return None
        for intent in INTENTS:
            at = gate.parked_time(contact_id, (segment_id, intent))
            if at is not None:
                return intent, at
        return None

    def batch_keys(self) -> set[BatchKey]:
        """Every batch key holding ids, buffered or parked."""
        return set(self.buffer.batch_keys()) | self.gate.parked_batch_keys()

    def drop(
        self, segments: set[str]
    ) -> tuple[list[tuple[str, BatchKey]], list[tuple[str, BatchKey]]]:
        """Take every id of these segments out: (the parked ones, the buffered ones)."""

        def dropped(batch_key: BatchKey) -> bool:
            return batch_key[0] in segments

        parked = self.gate.drop_parked(dropped)
        buffered = [
            (contact_id, batch_key)
            for batch_key in self.buffer.batch_keys()
            if dropped(batch_key)
            for contact_id in self.buffer.drop_batch_key(batch_key)
        ]
        return parked, buffered

    # ---- what the sender takes -----------------------------------------------------------

    def pick(
        self,
        now: float,
        *,
        spare_capacity: bool,
        draining: bool,
        skip: Callable[[BatchKey], bool] | None,
    ) -> BatchKey | None:
        """The batch key whose batch should go out now (see `CoalescingBuffer.pick`)."""
        return self.buffer.pick(now, spare_capacity=spare_capacity, draining=draining, skip=skip)

    def take(self, batch_key: BatchKey) -> list[tuple[str, float | None, Lane | None]]:
        """Up to a batch of the batch key's ids, with their times and lanes (see the buffer)."""
        return self.buffer.take_entries(batch_key)

    async def wait_for_data(self, now: float, skip: Callable[[BatchKey], bool] | None) -> None:
        """Sleep until something is queued or the earliest lingering batch key becomes due."""
        deadline = self.buffer.next_deadline(skip)
        timeout = None if deadline is None else max(0.001, deadline - now)
        self._wakeup.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    def wake(self) -> None:
        """Wake the sender (draining, or a send ended that it may be waiting for)."""
        self._wakeup.set()
