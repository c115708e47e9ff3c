"""What the console's views show that no other component keeps, kept cheaply.

- `SegmentActivity`, an `EngineObserver`: per segment, the ids in the write path right now
  (`sending` or `retrying`), its last bulk write and what became of that write's ids, and when
  segments were last refreshed. A dict update per transition; nothing is ever walked.
- `Figures`: a ring of samples taken every `SAMPLE_INTERVAL_S` (webhooks, writes and reads per
  second, 429s, rate-gate waits, the work in progress), the overview's chart; and the dead
  letters per segment, counted in the background as the journal census counts states (one
  walk of the by-segment index of failed rows, at most `DUTY` of the time), never per request.

Every view's answer is then a read of memory: of these, of the engine's buffer per batch key
and of the poller's watches per segment (walks of segments, never of assignments), so a
million pending assignments cost a refresh of the console nothing more than a hundred do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.census import (
    DUTY,
    MAX_INTERVAL_S,
    count_in_background,
    duty_interval_s,
)
from daemon.metrics import Metrics
from daemon.store.base import AssignmentJournal
from scheduler.engine import Engine
from scheduler.model import Assignment, State
from scheduler.observer import EngineObserver
from scheduler.ratelimit import AdmissionGate
from scheduler.validation import MembershipPoller

log = logging.getLogger(__name__)

#: How often a sample is taken, and how many are kept (ten minutes of them).
SAMPLE_INTERVAL_S = 2.0
SAMPLES_KEPT = 300
#: The dead letters per segment are counted again once the census's share of the time
#: (`daemon.census.DUTY`) has gone by since the last count's cost, at least this long apart and at
#: most the census's longest interval (a count of 100,000 takes about 10 ms).
TALLY_MIN_INTERVAL_S = 5.0
#: Refreshes are remembered this long (CXone allows one per segment per hour).
REFRESH_WINDOW_S = 3600.0

# The states of the write path: an id taken for a batch and not yet written or failed.
_WRITE_PATH = frozenset({State.SENDING, State.RETRYING})
# What became of an id of a bulk write, by the state it left `sending` for.
_OUTCOMES = {
    State.WRITTEN: "written",
    State.VERIFYING: "uncertain",
    State.RETRYING: "retrying",
    State.FAILED: "failed",
}


@dataclass(slots=True)
class LastWrite:
    """A segment's last bulk request, and what became of the ids of its segment since."""

    at: float
    ids: int
    attempt: int
    outcomes: dict[str, int] = field(default_factory=dict)


class SegmentActivity(EngineObserver):
    """Per segment: ids in the write path, the last bulk write and its outcome, refreshes.

    `holds` says whether this instance still holds a segment (on a shared journal): when work
    is let go (handed over, or dropped by a fence) the counts of segments no longer held are
    dropped with it. Ids recovered mid-flight at start-up are reported by state only
    (`restored`), so they are not counted in flight until their next transition.
    """

    def __init__(
        self,
        holds: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._holds = holds
        self._clock = clock
        self.in_flight: dict[str, int] = {}
        self.last_write: dict[str, LastWrite] = {}
        self.last_refresh: dict[str, float] = {}
        self._refreshes: deque[float] = deque()

    def transitioned(self, assignment: Assignment, previous: State) -> None:
        """Move the id between the write path's counts; note what its write came to."""
        state = assignment.state
        if state is previous:
            return
        segment_id = assignment.segment_id
        counts = self.in_flight
        if previous in _WRITE_PATH:
            left = counts.get(segment_id, 0) - 1
            if left > 0:
                counts[segment_id] = left
            else:
                counts.pop(segment_id, None)
        if state in _WRITE_PATH:
            counts[segment_id] = counts.get(segment_id, 0) + 1
        if previous is State.SENDING:
            outcome = _OUTCOMES.get(state)
            last = self.last_write.get(segment_id)
            if outcome is not None and last is not None:
                last.outcomes[outcome] = last.outcomes.get(outcome, 0) + 1

    def bulk_sent(self, segment_id: str, ids: int, attempt: int) -> None:
        """A bulk request of the segment is about to go: it is the segment's last write."""
        self.last_write[segment_id] = LastWrite(self._clock(), ids, attempt)

    def segment_refreshed(self, segment_id: str) -> None:
        """Note the refresh, for the segment and for the hour's count."""
        now = self._clock()
        self.last_refresh[segment_id] = now
        self._refreshes.append(now)
        self._forget_old_refreshes(now)

    def let_go(self, counts: Mapping[State, int]) -> None:
        """Work was let go: drop the write-path counts of segments this instance left."""
        holds = self._holds
        if holds is None:
            return
        for segment_id in [s for s in self.in_flight if not holds(s)]:
            del self.in_flight[segment_id]

    def refreshes_last_hour(self) -> int:
        """Segment refreshes CXone accepted in the last hour."""
        self._forget_old_refreshes(self._clock())
        return len(self._refreshes)

    def _forget_old_refreshes(self, now: float) -> None:
        refreshes = self._refreshes
        while refreshes and refreshes[0] < now - REFRESH_WINDOW_S:
            refreshes.popleft()


@dataclass(frozen=True, slots=True)
class Sample:
    """The daemon's figures over one sampling interval (rates per second) and at its end."""

    at: float
    webhooks_per_s: float
    writes_per_s: float
    single_writes_per_s: float
    reads_per_s: float
    rate_limited: int
    waited_s: float
    pending_writes: int
    verifying: int
    reads_waiting: int

    def view(self) -> dict[str, Any]:
        """The sample as the overview API shows it."""
        return {
            "at": round(self.at, 3),
            "webhooksPerS": round(self.webhooks_per_s, 2),
            "writesPerS": round(self.writes_per_s, 2),
            "singleWritesPerS": round(self.single_writes_per_s, 2),
            "readsPerS": round(self.reads_per_s, 2),
            "rateLimited": self.rate_limited,
            "waitedS": round(self.waited_s, 3),
            "pendingWrites": self.pending_writes,
            "verifying": self.verifying,
            "readsWaiting": self.reads_waiting,
        }


@dataclass(frozen=True, slots=True)
class _Totals:
    """Counters as read at one instant (what consecutive samples subtract)."""

    monotonic: float
    webhooks: float
    requests: Mapping[str, float]  # CXone HTTP exchanges per endpoint class
    rate_limited: float
    waited_s: float


@dataclass(frozen=True, slots=True)
class SegmentTally:
    """Dead letters per segment as last counted (Unix time), and what the count cost."""

    counts: Mapping[str, int]
    counted_at: float
    duration_s: float


class Figures:
    """The overview's ring of samples and the dead letters per segment, kept in the background.

    `start()` begins sampling (and counting); `stop()` ends it, idempotently. The samples are
    taken from the daemon's own metrics registry (what a scrape would read) and components.
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        engine: Engine,
        poller: MembershipPoller,
        gates: Mapping[str, AdmissionGate],
        journal: AssignmentJournal,
        sample_interval_s: float = SAMPLE_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.engine = engine
        self.poller = poller
        self.gates = dict(gates)
        self.journal = journal
        self.sample_interval_s = sample_interval_s
        self._clock = clock
        self.samples: deque[Sample] = deque(maxlen=SAMPLES_KEPT)
        self.tally: SegmentTally | None = None
        self._last: _Totals | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def __repr__(self) -> str:
        return f"Figures({len(self.samples)} samples)"

    async def start(self) -> None:
        """Sample and count in the background from now on. Idempotent."""
        if self._tasks:
            return
        self._last = self._totals()
        self._tasks = [
            asyncio.create_task(self._sample_loop(), name="console-samples"),
            asyncio.create_task(
                count_in_background(
                    self.count_dead_letters,
                    self._tally_interval_s,
                    "the dead letters per segment (console)",
                ),
                name="console-dead-letter-tally",
            ),
        ]

    async def stop(self) -> None:
        """Stop sampling and counting; what was kept stays. Idempotent."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---- samples ----------------------------------------------------------------------------

    def _totals(self) -> _Totals:
        return _Totals(
            monotonic=time.monotonic(),
            webhooks=self.metrics.webhooks_answered(),
            requests=self.metrics.upstream_requests_by_endpoint(),
            rate_limited=self.metrics.rate_limited_answers(),
            waited_s=sum(gate.waited_s for gate in self.gates.values()),
        )

    def sample(self) -> Sample:
        """Take a sample now: the rates since the previous one, the work in progress now."""
        now = self._totals()
        last = self._last if self._last is not None else now
        self._last = now
        elapsed = max(now.monotonic - last.monotonic, 1e-6)

        def rate(new: float, old: float) -> float:
            return max(0.0, new - old) / elapsed

        def requests(endpoint: str) -> float:
            return rate(now.requests.get(endpoint, 0.0), last.requests.get(endpoint, 0.0))

        backlog = self.poller.backlog()
        taken = Sample(
            at=self._clock(),
            webhooks_per_s=rate(now.webhooks, last.webhooks),
            writes_per_s=requests("bulk"),
            single_writes_per_s=requests("single"),
            reads_per_s=requests("read"),
            rate_limited=round(max(0.0, now.rate_limited - last.rate_limited)),
            waited_s=max(0.0, now.waited_s - last.waited_s),
            pending_writes=self.engine.pending_writes,
            verifying=self.poller.pending,
            reads_waiting=backlog.waiting,
        )
        self.samples.append(taken)
        return taken

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sample_interval_s)
            try:
                self.sample()
            except Exception:  # a figure that cannot be read must not end the sampling
                log.exception("console: taking a sample failed")

    # ---- dead letters per segment -----------------------------------------------------------

    async def count_dead_letters(self) -> SegmentTally:
        """Count the dead letters per segment now (raises what the journal raises)."""
        started = time.monotonic()
        counts = await self.journal.failed_by_segment()
        self.tally = SegmentTally(counts, self._clock(), time.monotonic() - started)
        return self.tally

    def _tally_interval_s(self) -> float:
        cost = self.tally.duration_s if self.tally is not None else 0.0
        return duty_interval_s(cost, TALLY_MIN_INTERVAL_S, MAX_INTERVAL_S, DUTY)
