"""What the emulated CXone remembers: segments, members, missing contacts, idempotency keys."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

SegmentKind = Literal["static", "dynamic"]

#: The contract's id rule; ids are otherwise opaque and never parsed.
ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def is_valid_id(value: str) -> bool:
    """Whether `value` is a valid contact or segment id (1-128 chars of `[A-Za-z0-9_.:-]`)."""
    return ID_PATTERN.fullmatch(value) is not None


@dataclass(slots=True)
class Write:
    """A write of a pair that reads do not see yet and that a later write follows."""

    add: bool
    added_at: str | None
    visible_at: float


@dataclass(slots=True)
class Member:
    """One (segment, contact) pair: its latest write, and what reads see of its writes.

    The fields without a prefix describe the latest write (the write side: it decides
    `ContactAlreadyInSegment` / `ContactNotInSegment` at once). Reads see the writes in the order
    they were applied, each from its `visible_at` on: a write is never visible before an earlier
    one, so `earlier` (oldest first) and then the latest write become visible one after another,
    and `shown_*` is what reads answer before the first of them is visible.
    """

    added_at: str
    visible_at: float
    stalled: bool
    applied: int = 1
    present: bool = True
    removed_at: str | None = None
    earlier: list[Write] | None = None
    shown_member: bool = False
    shown_added_at: str | None = None

    def visible(self, now: float) -> bool:
        """Whether reads see the latest write at monotonic time `now`."""
        return now >= self.visible_at

    def read(self, now: float) -> tuple[bool, str | None]:
        """What a read answers at `now`: (is a member, `addedAt` of the visible add)."""
        if now >= self.visible_at:
            self.earlier = None
            self.shown_member = self.present
            self.shown_added_at = self.added_at if self.present else None
            return self.present, self.shown_added_at
        earlier = self.earlier
        while earlier and earlier[0].visible_at <= now:
            write = earlier.pop(0)
            self.shown_member = write.add
            self.shown_added_at = write.added_at
        return self.shown_member, self.shown_added_at

    def pending(self, now: float) -> int:
        """How many applied writes reads do not see yet at `now`."""
        self.read(now)
        if now >= self.visible_at:
            return 0
        return 1 + len(self.earlier or ())

    def follow(self, add: bool, at: str, now: float, delay_s: float) -> None:
        """Apply a new latest write (an add or a removal) indexed `delay_s` from `now`.

        A write is indexed no earlier than the write before it, so reads never go back to an
        older state after a newer one was visible; behind a stalled write it waits for a
        refresh too.
        """
        self.read(now)
        if now < self.visible_at:
            if self.earlier is None:
                self.earlier = []
            self.earlier.append(
                Write(self.present, self.added_at if self.present else None, self.visible_at)
            )
        visible_at = max(now + delay_s, self.visible_at)
        self.visible_at = visible_at
        self.stalled = math.isinf(visible_at)
        self.present = add
        if add:
            self.added_at = at
            self.applied = 1
        else:
            self.removed_at = at

    def listed(self, now: float) -> bool:
        """Whether the control API lists the pair: a member on either side, or a write pending."""
        is_member, _ = self.read(now)
        return self.present or is_member or now < self.visible_at

    def refresh(self, deadline: float) -> bool:
        """Index every pending write by `deadline`; return whether one was pending."""
        if self.visible_at <= deadline:
            return False
        self.visible_at = deadline
        for write in self.earlier or ():
            write.visible_at = min(write.visible_at, deadline)
        return True


@dataclass(slots=True)
class Segment:
    """A segment: static segments record writes and removals, dynamic ones ignore both."""

    segment_id: str
    kind: SegmentKind
    members: dict[str, Member] = field(default_factory=dict)

    def refresh(self, now: float, delay_s: float) -> int:
        """Make pending memberships visible by `now + delay_s`; return how many were pending."""
        deadline = now + delay_s
        pending = 0
        for member in self.members.values():
            if member.refresh(deadline):
                pending += 1
        return pending

    def written(self) -> int:
        """How many pairs are members on the write side (their latest write is an add)."""
        return sum(1 for member in self.members.values() if member.present)


class Directory:
    """Segments, the ids declared missing from the customer database, and refresh history."""

    def __init__(self) -> None:
        self.segments: dict[str, Segment] = {}
        self.missing: frozenset[str] = frozenset()
        self.refreshed_at: dict[str, float] = {}

    def reset(self) -> None:
        """Forget everything."""
        self.segments.clear()
        self.missing = frozenset()
        self.refreshed_at.clear()

    def find(self, segment_id: str, auto_create: bool) -> Segment | None:
        """The segment, auto-created as static when allowed, or None (404 SegmentNotFound)."""
        segment = self.segments.get(segment_id)
        if segment is None and auto_create and is_valid_id(segment_id):
            segment = self.segments[segment_id] = Segment(segment_id, "static")
        return segment

    def declare(self, segment_id: str, kind: SegmentKind) -> Segment:
        """Create a segment or change its kind (members are kept)."""
        segment = self.segments.get(segment_id)
        if segment is None:
            segment = self.segments[segment_id] = Segment(segment_id, kind)
        else:
            segment.kind = kind
        return segment

    def delete(self, segment_id: str) -> bool:
        """Forget a segment; return whether it existed."""
        return self.segments.pop(segment_id, None) is not None


@dataclass(slots=True)
class StoredAnswer:
    """The answer stored under an idempotency key."""

    status: int
    body: bytes


@dataclass(slots=True)
class IdempotencyEntry:
    """An idempotency key's scope and its answer (None while the first request is processed)."""

    scope: str
    body_hash: bytes
    created: float
    answer: StoredAnswer | None = None


class IdempotencyStore:
    """Idempotency keys with their scope (method + path, body hash), kept `ttl_s` seconds."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        # Insertion order is creation order, so expired keys are always at the front.
        self._entries: dict[str, IdempotencyEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def reset(self) -> None:
        """Forget every key."""
        self._entries.clear()

    def _expired(self, entry: IdempotencyEntry, now: float) -> bool:
        return entry.answer is not None and entry.created + self.ttl_s <= now

    def purge(self, now: float) -> None:
        """Drop expired keys."""
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if not self._expired(entry, now):
                break
            del entries[key]

    def lookup(self, key: str, now: float) -> IdempotencyEntry | None:
        """The live entry of `key`, if any."""
        entry = self._entries.get(key)
        if entry is not None and self._expired(entry, now):
            del self._entries[key]
            return None
        return entry

    def reserve(self, key: str, scope: str, body_hash: bytes, now: float) -> IdempotencyEntry:
        """Mark `key` in progress for this scope."""
        self.purge(now)
        entry = self._entries[key] = IdempotencyEntry(scope, body_hash, now)
        return entry

    def release(self, key: str, entry: IdempotencyEntry) -> None:
        """Forget a reservation that produced no answer to store (nothing was applied)."""
        if self._entries.get(key) is entry and entry.answer is None:
            del self._entries[key]

    def complete(self, key: str, entry: IdempotencyEntry, status: int, body: bytes) -> None:
        """Store the answer of a reserved key (its lifetime counts from the reservation)."""
        if self._entries.get(key) is not entry:
            # The store was reset while the request ran: keep nothing from before the reset.
            return
        entry.answer = StoredAnswer(status, body)
