"""Which webhook deliveries the journal may already hold, answered from memory.

Every webhook must be checked against the journal's deliveries (a redelivery gets the first
answer and no new work), but almost every delivery is new. Asking SQLite each time costs a
thread hop per webhook; a Bloom filter of the retained delivery keys answers "certainly new" in
memory for all but about 1 % of new deliveries, and only a "maybe" goes to SQLite. The filter
never says "no" for a key the journal holds, so redeliveries are still always found.

The filter is built from the journal on the read thread (at start and whenever it has taken in
more keys than it was sized for); until a build is in place every lookup goes to SQLite. Keys
remembered while a build runs are added to the new filter when it is swapped in.
"""

from __future__ import annotations

from collections.abc import Iterable

from rbloom import Bloom

DeliveryKey = tuple[str, str]  # (source, webhook-id)

FALSE_POSITIVE_RATE = 0.01
# Never sized for fewer keys than this: 1,000,000 keys at 1 % take 1.2 MB.
MIN_CAPACITY = 1_000_000


class DeliveryFilter:
    """A Bloom filter of delivery keys with a rebuild protocol; used on the event loop only."""

    __slots__ = ("_added", "_capacity", "_current", "_during_build")

    def __init__(self) -> None:
        self._current: Bloom | None = None
        self._capacity = 0
        self._added = 0
        self._during_build: list[DeliveryKey] | None = None

    def __repr__(self) -> str:
        return (
            f"DeliveryFilter(ready={self._current is not None}, keys={self._added}, "
            f"capacity={self._capacity}, building={self._during_build is not None})"
        )

    @property
    def capacity(self) -> int:
        """How many keys the filter in place was sized for (0 before the first build)."""
        return self._capacity

    @property
    def builds_running(self) -> bool:
        """Whether a build is under way."""
        return self._during_build is not None

    @property
    def ready(self) -> bool:
        """Whether a build is in place (before that, every key may be in the journal)."""
        return self._current is not None

    def may_contain(self, key: DeliveryKey) -> bool:
        """False only if the journal certainly holds no delivery with this key."""
        return self._current is None or key in self._current

    def add(self, key: DeliveryKey) -> None:
        """Note a delivery about to be journaled."""
        if self._current is not None:
            self._current.add(key)
            self._added += 1
        if self._during_build is not None:
            self._during_build.append(key)

    def needs_build(self) -> bool:
        """Whether a build should start: none yet, or more keys than the filter was sized for."""
        if self._during_build is not None:
            return False
        return self._current is None or self._added > self._capacity

    def begin_build(self, unconfirmed: Iterable[DeliveryKey]) -> None:
        """Start collecting the keys the build will miss: those not yet committed, and new ones.

        Call it before the build's snapshot of the journal is taken; every key committed before
        the snapshot is in it, every other one is collected here.
        """
        self._during_build = list(unconfirmed)

    def abandon_build(self) -> None:
        """Give up a build that failed; the current filter (if any) stays."""
        self._during_build = None

    def finish_build(self, built: Bloom, capacity: int, journaled: int) -> None:
        """Swap in a filter built from `journaled` keys of the journal's snapshot."""
        collected = self._during_build or []
        built.update(collected)
        self._current = built
        self._capacity = capacity
        self._added = journaled + len(collected)
        self._during_build = None


def capacity_for(journaled: int, minimum: int = MIN_CAPACITY) -> int:
    """The size of a new filter: room to double before the next build."""
    return max(minimum, 2 * journaled)


def new_bloom(capacity: int) -> Bloom:
    """An empty filter for `capacity` keys at the target false-positive rate."""
    return Bloom(capacity, FALSE_POSITIVE_RATE)
