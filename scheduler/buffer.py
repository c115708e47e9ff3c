"""Coalescing: per-batch-key sets of contact ids waiting to be written, and the per-contact limit.

A batch key is whatever one batch may hold: the engine uses (segment, intent), so that a batch
never mixes adds and removals. The buffer and the gate only need batch keys to be hashable.

Each queued id is in a lane (`scheduler.model.Lane`): live ids go into their batch ahead of bulk
ids, and a batch key holding live ids goes out before others that are due, so that a live change
never waits behind a backfill; batch keys holding only bulk ids keep a guaranteed share of the
batches (`BulkCredit`, as reads do), so that live traffic never starves a backfill. Batches stay
full all the same: bulk ids fill what live ids leave. The lane is which of two dictionaries holds
the id: it costs a queued id nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from scheduler.model import BulkCredit, Lane

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _SegmentQueue:
    # Ids whose retry backoff has passed -> their lane: due at once, sent before fresh ids.
    retry: dict[str, Lane] = field(default_factory=dict)
    # Fresh ids in arrival order -> the time they were received (insertion order = age order),
    # one dictionary per lane. The time doubles as the assignment's received_at, so a queued
    # assignment needs no object.
    live: dict[str, float] = field(default_factory=dict)
    bulk: dict[str, float] = field(default_factory=dict)
    # How many retry ids are live: a live pair's retry makes its batch key a live one.
    retry_live: int = 0

    def __len__(self) -> int:
        return len(self.retry) + len(self.live) + len(self.bulk)

    def oldest(self) -> float:
        """Arrival time of the oldest fresh id (retry ids count as infinitely old)."""
        if self.retry:
            return float("-inf")
        live, bulk = self.live, self.bulk
        if live and bulk:
            return min(next(iter(live.values())), next(iter(bulk.values())))
        return next(iter((live or bulk).values()))

    def fresh(self, lane: Lane) -> dict[str, float]:
        """The fresh ids of one lane."""
        return self.live if lane is Lane.LIVE else self.bulk

    def time_of(self, contact_id: str) -> float | None:
        """A fresh id's received time, in either lane."""
        at = self.live.get(contact_id)
        return at if at is not None else self.bulk.get(contact_id)

    def holds(self, contact_id: str) -> bool:
        """Whether the id is queued here (retry, live or bulk)."""
        return contact_id in self.live or contact_id in self.bulk or contact_id in self.retry


class CoalescingBuffer(Generic[K]):
    """Per batch key, insertion-ordered sets of contact ids; decides which batch goes next.

    A segment is due when it holds a full batch, when its oldest id has waited `linger_s`, or
    when it holds retry ids whose backoff has passed. When the writer has spare capacity, a
    segment holding at least `min_size` ids is due as well: sending it costs nothing then, and
    waiting would only add latency. Among due segments one holding live ids goes first (the one
    whose oldest live id is oldest), except that segments holding only bulk ids get at least
    `bulk_share_min` of the batches while both kinds are due; among those, the one with the
    oldest id (retry ids count as the oldest), so a hot segment cannot starve the others. A
    batch takes retry ids first, then live ids, then bulk ids.
    """

    def __init__(
        self, *, min_size: int, max_size: int, linger_s: float, bulk_share_min: float = 0.2
    ) -> None:
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size ({min_size}) <= max_size ({max_size})")
        self.min_size = min_size
        self.max_size = max_size
        self.linger_s = linger_s
        self._segments: dict[K, _SegmentQueue] = {}
        self._size = 0
        self._bulk_credit = BulkCredit(bulk_share_min)
        # The last pick made while both kinds of segment were due: (segment, its lane). Taking
        # that segment's batch settles bulk's credit.
        self._contested: tuple[K, Lane] | None = None
        # Per contact, how many of its fresh ids wait in the bulk lane: `queued_bulk` scans the
        # segments only for a contact that has one (a live contact changing 100 segments asked
        # for each pair past its in-flight limit, and scanned every segment each time).
        self._bulk_ids: dict[str, int] = {}

    def __len__(self) -> int:
        return self._size

    def _bulk_added(self, contact_id: str) -> None:
        self._bulk_ids[contact_id] = self._bulk_ids.get(contact_id, 0) + 1

    def _bulk_gone(self, contact_id: str) -> None:
        left = self._bulk_ids[contact_id] - 1
        if left:
            self._bulk_ids[contact_id] = left
        else:
            del self._bulk_ids[contact_id]

    def __contains__(self, key: tuple[str, K]) -> bool:
        contact_id, segment_id = key
        queue = self._segments.get(segment_id)
        return queue is not None and queue.holds(contact_id)

    def entry(self, segment_id: K, contact_id: str) -> float | None:
        """A queued id's received time (0.0 for a retry id), or None if it is not queued.

        One lookup for whether an id is queued and when it was received (the hot path asks both).
        """
        queue = self._segments.get(segment_id)
        if queue is None:
            return None
        at = queue.time_of(contact_id)
        if at is not None:
            return at
        return 0.0 if contact_id in queue.retry else None

    def queued_bulk(self, contact_id: str) -> tuple[K, float] | None:
        """A fresh bulk id of the contact still queued (in no batch yet): its batch key and time.

        A scan of the batch keys, only for a contact with a bulk id queued somewhere.
        """
        if contact_id not in self._bulk_ids:
            return None
        for segment_id, queue in self._segments.items():
            at = queue.bulk.get(contact_id)
            if at is not None:
                return segment_id, at
        return None

    def lane_of(self, segment_id: K, contact_id: str) -> Lane | None:
        """The lane of a fresh queued id (None for a retry id or one not queued)."""
        queue = self._segments.get(segment_id)
        if queue is None:
            return None
        if contact_id in queue.live:
            return Lane.LIVE
        return Lane.BULK if contact_id in queue.bulk else None

    def set_lane(self, segment_id: K, contact_id: str, lane: Lane) -> bool:
        """Move a queued id to `lane`, keeping its time; False if it is not there.

        A fresh id joins the back of its new lane: it belongs there from now on.
        """
        queue = self._segments.get(segment_id)
        if queue is None:
            return False
        was = queue.retry.get(contact_id)
        if was is not None:  # a retry id: it keeps its place, ahead of fresh ids
            if was is not lane:
                queue.retry[contact_id] = lane
                queue.retry_live += 1 if lane is Lane.LIVE else -1
            return True
        source = queue.bulk if lane is Lane.LIVE else queue.live
        at = source.pop(contact_id, None)
        if at is None:
            return contact_id in queue.fresh(lane)
        queue.fresh(lane)[contact_id] = at
        if lane is Lane.LIVE:
            self._bulk_gone(contact_id)
        else:
            self._bulk_added(contact_id)
        return True

    def discard(self, segment_id: K, contact_id: str) -> tuple[bool, float | None]:
        """Take a queued id out again: (whether it was queued, its time; None for a retry id)."""
        queue = self._segments.get(segment_id)
        if queue is None:
            return False, None
        if contact_id in queue.retry:
            queue.retry_live -= queue.retry.pop(contact_id) is Lane.LIVE
            at = None
        elif contact_id in queue.live:
            at = queue.live.pop(contact_id)
        elif contact_id in queue.bulk:
            at = queue.bulk.pop(contact_id)
            self._bulk_gone(contact_id)
        else:
            return False, None
        self._size -= 1
        if not queue:
            del self._segments[segment_id]
        return True, at

    def _queue(self, segment_id: K) -> _SegmentQueue:
        # get() first: setdefault() would build a queue (two dicts) on every add.
        queue = self._segments.get(segment_id)
        if queue is None:
            queue = self._segments[segment_id] = _SegmentQueue()
        return queue

    def add(self, segment_id: K, contact_id: str, now: float, lane: Lane = Lane.LIVE) -> bool:
        """Queue a fresh id in `lane`; False if it is already queued for that segment."""
        queue = self._queue(segment_id)
        if queue.holds(contact_id):
            return False
        if lane is Lane.LIVE:
            queue.live[contact_id] = now
        else:
            queue.bulk[contact_id] = now
            self._bulk_added(contact_id)
        self._size += 1
        return True

    def add_retry(self, segment_id: K, contact_ids: list[str], lane: Lane = Lane.LIVE) -> None:
        """Queue ids whose backoff has passed, to go out with the segment's next batch."""
        queue = self._queue(segment_id)
        for contact_id in contact_ids:
            if queue.holds(contact_id):
                continue
            queue.retry[contact_id] = lane
            queue.retry_live += lane is Lane.LIVE
            self._size += 1

    def pick(
        self,
        now: float,
        *,
        spare_capacity: bool,
        draining: bool = False,
        skip: Callable[[K], bool] | None = None,
    ) -> K | None:
        """The segment whose batch should go out now, or None if none is due.

        While draining (shutdown) every non-empty segment is due: nothing may be left behind.
        Batch keys for which `skip` is true are never due (their segment is being handed over).
        """
        live: K | None = None  # the due segment holding live ids whose oldest live id is oldest
        live_age = float("inf")
        bulk: K | None = None  # the due bulk-only segment holding the oldest id
        bulk_age = float("inf")
        for segment_id, queue in self._segments.items():
            if skip is not None and skip(segment_id):
                continue
            size = len(queue)
            oldest = queue.oldest()
            due = (
                draining
                or size >= self.max_size
                or oldest + self.linger_s <= now
                or (spare_capacity and size >= self.min_size)
            )
            if not due:
                continue
            if queue.live or queue.retry_live:
                # A live pair's retry is due at once: as old as can be.
                age = oldest if queue.retry_live else next(iter(queue.live.values()))
                if live is None or age < live_age:
                    live, live_age = segment_id, age
            elif bulk is None or oldest < bulk_age:
                bulk, bulk_age = segment_id, oldest
        if live is None or bulk is None:
            self._contested = None
            return live if live is not None else bulk
        lane = Lane.BULK if self._bulk_credit.bulk_turn() else Lane.LIVE
        chosen = bulk if lane is Lane.BULK else live
        self._contested = (chosen, lane)
        return chosen

    def _settle(self, segment_id: K) -> None:
        """A batch of the segment is taken: bulk's credit moves if it was a contested pick."""
        contested, self._contested = self._contested, None
        if contested is not None and contested[0] == segment_id:
            self._bulk_credit.taken(contested[1], bulk_waited=True)

    def next_deadline(self, skip: Callable[[K], bool] | None = None) -> float | None:
        """Monotonic time at which the earliest lingering segment becomes due, if any."""
        oldest = [
            queue.oldest()
            for segment_id, queue in self._segments.items()
            if skip is None or not skip(segment_id)
        ]
        return min(oldest) + self.linger_s if oldest else None

    def depth_by_lane(self) -> dict[Lane, int]:
        """Ids queued per lane (retry ids in theirs); for metrics, not the hot path."""
        live = bulk = 0
        for queue in self._segments.values():
            live += len(queue.live)
            bulk += len(queue.bulk)
            if queue.retry:
                retry_live = sum(lane is Lane.LIVE for lane in queue.retry.values())
                live += retry_live
                bulk += len(queue.retry) - retry_live
        return {Lane.LIVE: live, Lane.BULK: bulk}

    def batch_keys(self) -> list[K]:
        """Every batch key holding ids."""
        return list(self._segments)

    def depth_by_key(self) -> dict[K, int]:
        """Ids queued per batch key (read only; a walk of the keys, never of the ids)."""
        return {key: len(queue) for key, queue in self._segments.items()}

    def drop_batch_key(self, segment_id: K) -> list[str]:
        """Remove every id of the batch key (retry and fresh); returns them."""
        queue = self._segments.pop(segment_id, None)
        if queue is None:
            return []
        self._size -= len(queue)
        for contact_id in queue.bulk:
            self._bulk_gone(contact_id)
        return [*queue.retry, *queue.live, *queue.bulk]

    def take(self, segment_id: K) -> list[str]:
        """Remove and return up to `max_size` ids of the segment: retries, live, then bulk."""
        return [contact_id for contact_id, _, _ in self.take_entries(segment_id)]

    def take_entries(self, segment_id: K) -> list[tuple[str, float | None, Lane | None]]:
        """Like `take`, with each fresh id's time and lane (None and None for retry ids)."""
        queue = self._segments.get(segment_id)
        if queue is None:
            return []
        self._settle(segment_id)
        batch: list[tuple[str, float | None, Lane | None]] = []
        while queue.retry and len(batch) < self.max_size:
            contact_id = next(iter(queue.retry))
            queue.retry_live -= queue.retry.pop(contact_id) is Lane.LIVE
            batch.append((contact_id, None, None))
        for lane, fresh in ((Lane.LIVE, queue.live), (Lane.BULK, queue.bulk)):
            while fresh and len(batch) < self.max_size:
                contact_id = next(iter(fresh))
                batch.append((contact_id, fresh.pop(contact_id), lane))
                if lane is Lane.BULK:
                    self._bulk_gone(contact_id)
        self._size -= len(batch)
        if not queue:
            del self._segments[segment_id]
        return batch


class ContactGate(Generic[K]):
    """At most `limit` segment assignments of one contact in flight; the rest wait their turn.

    CXone's guidance is to keep no more than three segment writes of one contact in flight, to
    avoid cross-segment index locking. "In flight" spans buffer, send and retry: until the write
    is known to hold or has failed. A contact's parked assignments are let through live ones
    first, then bulk ones, each in arrival order.

    A contact changing 100 segments at once parks 97 of them, and a large delivery parks tens of
    thousands: what is kept per parked assignment makes no object the garbage collector must
    scan (no tuple holding an enum member, which it could never untrack). Batch keys are kept
    once each (`_canonical`), times in a per-contact dict in arrival order, bulk keys in a set.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the per-contact in-flight limit must be at least 1")
        self.limit = limit
        self._inflight: dict[str, int] = {}
        # Per contact, its parked batch keys in arrival order -> their received times.
        self._waiting: dict[str, dict[K, float]] = {}
        # Per contact, those of its parked keys that wait in the bulk lane.
        self._bulk: dict[str, set[K]] = {}
        # One tuple per batch key, shared by every parked assignment of it.
        self._canonical: dict[K, K] = {}
        self._parked = 0

    def _key(self, key: K) -> K:
        return self._canonical.setdefault(key, key)

    def _set_bulk(self, contact_id: str, key: K, lane: Lane) -> None:
        bulk = self._bulk.get(contact_id)
        if lane is Lane.BULK:
            if bulk is None:
                bulk = self._bulk[contact_id] = set()
            bulk.add(key)
        elif bulk is not None:
            bulk.discard(key)
            if not bulk:
                del self._bulk[contact_id]

    def _lane(self, contact_id: str, key: K) -> Lane:
        bulk = self._bulk.get(contact_id)
        return Lane.BULK if bulk is not None and key in bulk else Lane.LIVE

    def admit(
        self, contact_id: str, segment_id: K, received_at: float = 0.0, lane: Lane = Lane.LIVE
    ) -> bool:
        """Take a slot for the assignment, or park it (with its time and lane): False."""
        if self.take_slot(contact_id):
            return True
        self.park(contact_id, segment_id, received_at, lane)
        return False

    def take_slot(self, contact_id: str) -> bool:
        """Take one of the contact's slots if one is free."""
        count = self._inflight.get(contact_id, 0)
        if count < self.limit:
            self._inflight[contact_id] = count + 1
            return True
        return False

    def park(
        self, contact_id: str, segment_id: K, received_at: float, lane: Lane, *, front: bool = False
    ) -> None:
        """Let the assignment wait for a slot: live ones ahead of bulk ones, each in arrival order.

        `front` puts a bulk one first among the bulk ones: it held a slot, gave it to a live
        pair, and was next in line before it did.
        """
        key = self._key(segment_id)
        waiting = self._waiting.get(contact_id)
        if waiting is None:
            waiting = self._waiting[contact_id] = {}
        if key in waiting:
            del waiting[key]
        else:
            self._parked += 1
        if front:
            # First in the dict: first among the bulk ones (`release` takes live ones first).
            self._waiting[contact_id] = {key: received_at, **waiting}
        else:
            waiting[key] = received_at
        self._set_bulk(contact_id, key, lane)

    def unpark(self, contact_id: str, segment_id: K) -> float | None:
        """Take a parked assignment out of line (it takes a slot another gave up); its time."""
        waiting = self._waiting.get(contact_id)
        if waiting is None or segment_id not in waiting:
            return None
        at = waiting.pop(segment_id)
        self._parked -= 1
        if not waiting:
            del self._waiting[contact_id]
        self._set_bulk(contact_id, segment_id, Lane.LIVE)  # out of the bulk set, if in it
        return at

    def is_parked(self, contact_id: str, segment_id: K) -> bool:
        """Whether the assignment waits for a slot."""
        waiting = self._waiting.get(contact_id)
        return waiting is not None and segment_id in waiting

    def parked_time(self, contact_id: str, segment_id: K) -> float | None:
        """When a parked assignment was received, if it is parked."""
        waiting = self._waiting.get(contact_id)
        return waiting.get(segment_id) if waiting is not None else None

    def repark(
        self, contact_id: str, old: K, new: K, received_at: float, lane: Lane = Lane.LIVE
    ) -> bool:
        """Let a parked assignment wait on as `new` (a newer change), in its place in line."""
        waiting = self._waiting.get(contact_id)
        if waiting is None or old not in waiting:
            return False
        new = self._key(new)
        # In its place: the contact's line rebuilt with `new` where `old` stood.
        self._waiting[contact_id] = {
            (new if key == old else key): (received_at if key == old else at)
            for key, at in waiting.items()
            if key == old or key != new
        }
        self._set_bulk(contact_id, old, Lane.LIVE)  # out of the bulk set, if in it
        self._set_bulk(contact_id, new, lane)
        self._parked -= len(waiting) - len(self._waiting[contact_id])
        return True

    def set_lane(self, contact_id: str, segment_id: K, lane: Lane) -> bool:
        """Let a parked assignment wait on in `lane`; False if it is not parked."""
        if not self.is_parked(contact_id, segment_id):
            return False
        self._set_bulk(contact_id, self._key(segment_id), lane)
        return True

    def parked_lane(self, contact_id: str, segment_id: K) -> Lane | None:
        """The lane of a parked assignment, if it is parked."""
        if not self.is_parked(contact_id, segment_id):
            return None
        return self._lane(contact_id, segment_id)

    def force(self, contact_id: str) -> None:
        """Take a slot even past the limit (work recovered mid-flight is already in flight)."""
        self._inflight[contact_id] = self._inflight.get(contact_id, 0) + 1

    def release(self, contact_id: str) -> tuple[K, float, Lane] | None:
        """Free a slot; the contact's next parked (segment, time, lane), which takes it.

        Live parked assignments go first, then bulk ones, each in arrival order.
        """
        waiting = self._waiting.get(contact_id)
        if waiting:
            bulk = self._bulk.get(contact_id)
            key = next(iter(waiting))
            if bulk is not None and key in bulk and len(bulk) < len(waiting):
                key = next(k for k in waiting if k not in bulk)
            lane = self._lane(contact_id, key)
            at = self.unpark(contact_id, key)
            assert at is not None
            return key, at, lane
        count = self._inflight.get(contact_id, 0) - 1
        if count > 0:
            self._inflight[contact_id] = count
        else:
            self._inflight.pop(contact_id, None)
        return None

    def drop_parked(self, dropped: Callable[[K], bool]) -> list[tuple[str, K]]:
        """Remove the parked assignments `dropped` selects; returns (contact, batch key)."""
        removed: list[tuple[str, K]] = []
        for contact_id in list(self._waiting):
            gone = [key for key in self._waiting[contact_id] if dropped(key)]
            for key in gone:
                self.unpark(contact_id, key)
            removed += [(contact_id, key) for key in gone]
        return removed

    def parked_batch_keys(self) -> set[K]:
        """The batch keys of every parked assignment."""
        return {key for waiting in self._waiting.values() for key in waiting}

    def inflight(self, contact_id: str) -> int:
        """Slots the contact holds."""
        return self._inflight.get(contact_id, 0)

    @property
    def any_parked(self) -> bool:
        """Whether any assignment waits for a slot (a constant-time check)."""
        return bool(self._waiting)

    @property
    def parked(self) -> int:
        """Assignments waiting for a slot."""
        return self._parked
