"""What validation remembers between polls: confirmed pairs (a TTL cache) and refresh budgets.

Both are small interfaces so a durable store (SQLite) or a shared one (Redis) can stand in for
the in-memory versions here.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol


class ConfirmationCache(Protocol):
    """What CXone confirmed of each pair (member or not), remembered for a TTL."""

    def known(self, contact_id: str, segment_id: str) -> bool | None:
        """The membership confirmed within the TTL (True: member, False: not), else None."""
        ...

    def remember(self, contact_id: str, segment_id: str, member: bool = True) -> None:
        """Record a confirmation made now: a membership shown, or a removal shown."""
        ...

    def forget(self, contact_id: str, segment_id: str) -> None:
        """Drop what is known of the pair (its membership is being changed)."""
        ...

    def forget_segments(self, segments: set[str]) -> None:
        """Drop what is known of every pair of these segments (another process owns them)."""
        ...


class RefreshBudget(Protocol):
    """When each segment may be refreshed next (CXone allows one refresh per segment per hour)."""

    def next_allowed(self, segment_id: str) -> float:
        """Wall-clock time from which a refresh of the segment is allowed (0 if never spent)."""
        ...

    def spend(self, segment_id: str, at: float, next_allowed: float) -> None:
        """Record that the next refresh is allowed from `next_allowed` (made durable lazily)."""
        ...

    async def try_spend(self, segment_id: str, now: float, next_allowed: float) -> float:
        """Spend the budget if it allows a refresh at `now`, durably, before returning.

        Returns 0.0 when spent (the caller may send the refresh: a crash from here on cannot
        lead to a second one), else the wall-clock time from which a refresh is allowed.
        Check and spend are one call so that a shared store can make them one atomic step.
        """
        ...


class MemoryConfirmationCache:
    """An in-process TTL cache; entries expire in insertion order, so pruning is cheap.

    It keeps the confirmed value, not only the fact of a confirmation: a re-add right after a
    confirmed removal must find "not a member", never an older "member".
    """

    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, bool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def known(self, contact_id: str, segment_id: str) -> bool | None:
        """The membership confirmed less than `ttl_s` ago, or None."""
        # No pruning here (it runs on every `remember`): a lookup per assignment is the hot
        # path, and the age is checked below anyway.
        entry = self._entries.get((contact_id, segment_id))
        # Entries restored later may be older than ones behind them (pruning stops at the first
        # young one): the age is checked here too.
        if entry is None or entry[0] <= self._clock() - self.ttl_s:
            return None
        return entry[1]

    def remember(self, contact_id: str, segment_id: str, member: bool = True) -> None:
        """Record a confirmation made now (moves the pair to the young end)."""
        key = (contact_id, segment_id)
        self._entries.pop(key, None)
        self._entries[key] = (self._clock(), member)
        self._prune()

    def forget(self, contact_id: str, segment_id: str) -> None:
        """Drop what is known of the pair (a newer change of the other intent is under way)."""
        self._entries.pop((contact_id, segment_id), None)

    def forget_segments(self, segments: set[str]) -> None:
        """Drop every pair of these segments: another process confirms them from now on."""
        for key in [k for k in self._entries if k[1] in segments]:
            del self._entries[key]

    def clear(self) -> None:
        """Drop every pair (this process lost every segment: their new owners confirm them)."""
        self._entries.clear()

    def restore(self, entries: list[tuple[str, str, float, bool]], wall_now: float) -> None:
        """Take back confirmations made before a restart (wall-clock times), oldest first."""
        now = self._clock()
        for contact_id, segment_id, at, member in sorted(entries, key=lambda e: e[2]):
            self._entries[(contact_id, segment_id)] = (now - max(0.0, wall_now - at), member)
        self._prune()

    def _prune(self) -> None:
        horizon = self._clock() - self.ttl_s
        while self._entries:
            key, (at, _) = next(iter(self._entries.items()))
            if at > horizon:
                break
            del self._entries[key]


class MemoryRefreshBudget:
    """Refresh budgets in a dictionary of wall-clock times."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}

    def next_allowed(self, segment_id: str) -> float:
        """Wall-clock time from which a refresh is allowed."""
        return self._next.get(segment_id, 0.0)

    def spend(self, segment_id: str, at: float, next_allowed: float) -> None:
        """Record when the next refresh is allowed."""
        self._next[segment_id] = next_allowed

    async def try_spend(self, segment_id: str, now: float, next_allowed: float) -> float:
        """Spend the budget if it allows a refresh now; 0.0, or when it will allow one."""
        allowed = self._next.get(segment_id, 0.0)
        if allowed > now:
            return allowed
        self._next[segment_id] = next_allowed
        return 0.0
