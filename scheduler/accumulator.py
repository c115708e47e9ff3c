"""The accumulator: ids waiting to be written, per lane, and when the sender may take them.

It holds the coalescing buffer (per (segment, intent) lane, the ids queued and their received
times), the per-contact gate (at most a few segments of one contact in flight; the others
parked), the retry timers (ids back in their lane once their backoff has passed) and the data
waiter the sender sleeps on. It knows nothing of HTTP, of assignment states or of the journal:
the ledger decides what goes in, the sender takes batches out (aiokafka's
`message_accumulator.py` beside its `sender.py`).

A queued assignment is only an entry here, its received time the only thing it carries: a
million queued assignments cost a buffer entry each, never an object each.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.buffer import CoalescingBuffer, ContactGate
from scheduler.model import INTENTS, Intent, Lane


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    """How writes are grouped (defaults from the CXone guidance)."""

    min_size: int = 50
    max_size: int = 200
    linger_s: float = 1.0
    max_inflight_per_contact: int = 3
    high_water: int = 1_000_000


#: Which ids of a lane are still waiting for their backoff when it has passed (the ledger says).
StillRetrying = Callable[[Lane, list[str]], list[str]]


class Accumulator:
    """The buffer, the contact gate, the retry timers and the sender's data waiter."""

    def __init__(self, batching: BatchingPolicy) -> None:
        self.batching = batching
        self.buffer: CoalescingBuffer[Lane] = CoalescingBuffer(
            min_size=batching.min_size, max_size=batching.max_size, linger_s=batching.linger_s
        )
        self.gate: ContactGate[Lane] = ContactGate(batching.max_inflight_per_contact)
        self._timers: set[asyncio.TimerHandle] = set()
        self._wakeup = asyncio.Event()

    def __len__(self) -> int:
        return len(self.buffer)

    # ---- what goes in --------------------------------------------------------------------

    def admit(self, contact_id: str, lane: Lane, received_at: float) -> bool:
        """Take one of the contact's slots for the pair, or park it (False) until one frees."""
        return self.gate.admit(contact_id, lane, received_at)

    def enqueue(self, lane: Lane, contact_id: str, received_at: float) -> None:
        """Queue an id in its lane (coalesced with one already queued there)."""
        if self.buffer.add(lane, contact_id, received_at):
            self._wakeup.set()

    def add_retries(self, lane: Lane, contact_ids: list[str]) -> None:
        """Queue ids whose backoff has passed, ahead of the lane's fresh ids."""
        self.buffer.add_retry(lane, contact_ids)
        self._wakeup.set()

    def force_slot(self, contact_id: str) -> None:
        """Take a slot past the limit (work recovered mid-flight is already in flight)."""
        self.gate.force(contact_id)

    def release(self, contact_id: str) -> None:
        """Free one of the contact's slots; its next parked pair takes it and is queued."""
        parked = self.gate.release(contact_id)
        if parked is not None:
            lane, received_at = parked
            self.enqueue(lane, contact_id, received_at)

    def move(self, contact_id: str, old: Lane, new: Lane, received_at: float) -> None:
        """A queued (or parked) id of `old` becomes one of `new` (a newer change of the pair)."""
        if not self.gate.repark(contact_id, old, new, received_at):
            self.buffer.discard(old, contact_id)
            self.enqueue(new, contact_id, received_at)

    def set_contact_limit(self, limit: int) -> None:
        """Change the per-contact limit; slots already taken are kept."""
        self.gate.limit = max(1, limit)

    # ---- retries -------------------------------------------------------------------------

    def requeue_later(
        self, lane: Lane, contact_ids: list[str], delay_s: float, still: StillRetrying
    ) -> None:
        """After the backoff, the ids `still` names rejoin their lane, ahead of fresh ids."""
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def requeue() -> None:
            if handle is not None:
                self._timers.discard(handle)
            waiting = still(lane, contact_ids)
            if waiting:
                self.add_retries(lane, waiting)

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

    def lanes(self) -> set[Lane]:
        """Every lane holding ids, buffered or parked."""
        return set(self.buffer.lanes()) | self.gate.parked_lanes()

    def drop(self, segments: set[str]) -> tuple[list[tuple[str, Lane]], list[tuple[str, Lane]]]:
        """Take every id of these segments out: (the parked ones, the buffered ones)."""

        def dropped(lane: Lane) -> bool:
            return lane[0] in segments

        parked = self.gate.drop_parked(dropped)
        buffered = [
            (contact_id, lane)
            for lane in self.buffer.lanes()
            if dropped(lane)
            for contact_id in self.buffer.drop_lane(lane)
        ]
        return parked, buffered

    # ---- what the sender takes -----------------------------------------------------------

    def pick(
        self,
        now: float,
        *,
        spare_capacity: bool,
        draining: bool,
        skip: Callable[[Lane], bool] | None,
    ) -> Lane | None:
        """The lane whose batch should go out now (see `CoalescingBuffer.pick`)."""
        return self.buffer.pick(now, spare_capacity=spare_capacity, draining=draining, skip=skip)

    def take(self, lane: Lane) -> list[tuple[str, float | None]]:
        """Up to a batch of the lane's ids with their times: retries first, then oldest."""
        return self.buffer.take_entries(lane)

    async def wait_for_data(self, now: float, skip: Callable[[Lane], bool] | None) -> None:
        """Sleep until something is queued or the earliest lingering lane becomes due."""
        deadline = self.buffer.next_deadline(skip)
        timeout = None if deadline is None else max(0.001, deadline - now)
        self._wakeup.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    def wake(self) -> None:
        """Wake the sender (draining, or a send ended that it may be waiting for)."""
        self._wakeup.set()
