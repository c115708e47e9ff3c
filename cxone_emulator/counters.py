"""Counters the control API reports: requests by class and status, batch sizes, peaks, faults."""

from __future__ import annotations

from collections import deque
from typing import Any

#: Classes whose requests are counted by status.
REQUEST_CLASSES: tuple[str, ...] = (
    "bulk",
    "single",
    "bulk_remove",
    "single_remove",
    "read",
    "refresh",
    "token",
    "discovery",
)
#: Classes with rate-limit and peak-rate counters.
RATE_CLASSES: tuple[str, ...] = tuple(c for c in REQUEST_CLASSES if c != "discovery")
#: The rate bucket of each class that has none of its own: removals share the writes' buckets.
BUCKET_OF: dict[str, str] = {"bulk_remove": "bulk", "single_remove": "single"}
#: Classes whose requests carry idempotency keys.
KEYED_CLASSES: tuple[str, ...] = ("bulk", "single", "bulk_remove", "single_remove")
ITEM_OUTCOMES: tuple[str, ...] = (
    "added",
    "ContactAlreadyInSegment",
    "ContactNotFound",
    "InvalidContactId",
    "DuplicateContactInBatch",
    "IndexBusy",
    "ignored_dynamic",
)
REMOVAL_OUTCOMES: tuple[str, ...] = (
    "removed",
    "ContactNotInSegment",
    "ContactNotFound",
    "InvalidContactId",
    "DuplicateContactInBatch",
    "IndexBusy",
    "ignored_dynamic",
)
#: Histogram buckets of ids per bulk request: (label, smallest, largest).
BULK_BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("1", 1, 1),
    ("2-49", 2, 49),
    ("50-99", 50, 99),
    ("100-149", 100, 149),
    ("150-199", 150, 199),
    ("200", 200, 200),
    ("201-1000", 201, 1000),
)


def _bucket_of(size: int) -> str:
    for label, low, high in BULK_BUCKETS:
        if low <= size <= high:
            return label
    # Only reachable when max_bulk_ids was raised above 1000: count it with the largest.
    return BULK_BUCKETS[-1][0]


class PeakWindow:
    """The largest number of events in any 1-second sliding window."""

    __slots__ = ("_times", "peak")

    def __init__(self) -> None:
        self._times: deque[float] = deque()
        self.peak = 0

    def record(self, now: float) -> None:
        """Count one event at monotonic time `now` (callers pass non-decreasing times)."""
        times = self._times
        times.append(now)
        horizon = now - 1.0
        while times[0] <= horizon:
            times.popleft()
        self.peak = max(self.peak, len(times))


class BulkSizes:
    """Ids per bulk request: how many requests, ids, the largest and a histogram."""

    __slots__ = ("histogram", "ids", "max", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.ids = 0
        self.max = 0
        self.histogram = dict.fromkeys((label for label, _, _ in BULK_BUCKETS), 0)

    def record(self, size: int) -> None:
        """Count one request of `size` ids."""
        self.requests += 1
        self.ids += size
        self.max = max(self.max, size)
        self.histogram[_bucket_of(size)] += 1

    def snapshot(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "requests": self.requests,
            "ids": self.ids,
            "max": self.max,
            "histogram": dict(self.histogram),
        }


class Counters:
    """Every counter of docs/emulator.md, reset by the control API."""

    def __init__(self) -> None:
        self.requests: dict[str, dict[str, int]] = {}
        self.arrivals: dict[str, PeakWindow] = {}
        self.admitted: dict[str, PeakWindow] = {}
        self.rate_limited: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.removal_items: dict[str, int] = {}
        self.faults: dict[str, int] = {}
        self.bulk_sizes = BulkSizes()
        self.bulk_remove_sizes = BulkSizes()
        self.duplicate_ids_in_request = 0
        self.idempotent_replays = 0
        self.replays_by_class: dict[str, int] = {}
        self.idempotency_conflicts: dict[str, int] = {}
        self.applied_twice = 0
        self.reset()

    def reset(self) -> None:
        """Zero everything."""
        self.requests = {cls: {} for cls in REQUEST_CLASSES}
        self.arrivals = {cls: PeakWindow() for cls in RATE_CLASSES}
        self.admitted = {cls: PeakWindow() for cls in RATE_CLASSES}
        self.rate_limited = dict.fromkeys(RATE_CLASSES, 0)
        self.items = dict.fromkeys(ITEM_OUTCOMES, 0)
        self.removal_items = dict.fromkeys(REMOVAL_OUTCOMES, 0)
        self.faults = {"error": 0, "reset": 0, "hang": 0}
        self.bulk_sizes = BulkSizes()
        self.bulk_remove_sizes = BulkSizes()
        self.duplicate_ids_in_request = 0
        self.idempotent_replays = 0
        self.replays_by_class = dict.fromkeys(KEYED_CLASSES, 0)
        self.idempotency_conflicts = {"IdempotencyKeyReused": 0, "IdempotencyKeyInProgress": 0}
        self.applied_twice = 0

    def answered(self, cls: str, status: int | str) -> None:
        """Count one answer of class `cls` (status, or `reset` / `hang` for no answer)."""
        by_status = self.requests[cls]
        key = str(status)
        by_status[key] = by_status.get(key, 0) + 1

    def arrived(self, cls: str, now: float) -> None:
        """Count an arrival for the peak rate (of the shared bucket's class too)."""
        self.arrivals[cls].record(now)
        bucket = BUCKET_OF.get(cls)
        if bucket is not None:
            self.arrivals[bucket].record(now)

    def admit(self, cls: str, now: float) -> None:
        """Count a request that was not refused with 429, for the peak admitted rate."""
        self.admitted[cls].record(now)
        bucket = BUCKET_OF.get(cls)
        if bucket is not None:
            self.admitted[bucket].record(now)

    def replayed(self, cls: str) -> None:
        """Count an idempotent replay."""
        self.idempotent_replays += 1
        self.replays_by_class[cls] += 1

    def refused(self, cls: str) -> None:
        """Count a 429."""
        self.rate_limited[cls] += 1

    def bulk_request(self, size: int, had_duplicates: bool) -> None:
        """Count a bulk write that reached its segment, by its number of ids."""
        self.bulk_sizes.record(size)
        if had_duplicates:
            self.duplicate_ids_in_request += 1

    def bulk_remove_request(self, size: int, had_duplicates: bool) -> None:
        """Count a bulk removal that reached its segment, by its number of ids."""
        self.bulk_remove_sizes.record(size)
        if had_duplicates:
            self.duplicate_ids_in_request += 1

    def snapshot(self) -> dict[str, Any]:
        """The counters as the JSON of `GET /_emulator/counters`."""
        return {
            "requests": {cls: dict(by_status) for cls, by_status in self.requests.items()},
            "bulk_ids": self.bulk_sizes.snapshot(),
            "bulk_remove_ids": self.bulk_remove_sizes.snapshot(),
            "duplicate_ids_in_request": self.duplicate_ids_in_request,
            "idempotent_replays": self.idempotent_replays,
            "idempotent_replays_by_class": dict(self.replays_by_class),
            "idempotency_conflicts": dict(self.idempotency_conflicts),
            "rate_limited": dict(self.rate_limited),
            "peak_rps": {cls: window.peak for cls, window in self.arrivals.items()},
            "peak_admitted_rps": {cls: window.peak for cls, window in self.admitted.items()},
            "items": dict(self.items),
            "removal_items": dict(self.removal_items),
            "applied_twice": self.applied_twice,
            "faults": dict(self.faults),
        }
