"""How many assignments the journal holds in each state: counted now and then, read for free.

The engine knows only the work in progress of this process; finished assignments (`active`,
`removed`, `failed`) leave it and live on in the journal until retention prunes them, and on a
shared PostgreSQL journal every instance holds only its own shards' work. The journal alone
answers "how many are in each state": one `GROUP BY state` on its `(state, updated_at)` index
(`AssignmentJournal.counts`), reading every retained row's index entry (about 70 ms per million on
SQLite, 130 ms on PostgreSQL). So it is not run per `/metrics` scrape or per page view: this
component counts in the background and keeps the last answer, which readers take for free.

It counts again once `duty` of the time has gone by since the last count's cost (0.5 %: a
count that took 100 ms waits 20 s), within [`min_interval_s`, `max_interval_s`]: a small
journal is recounted every few seconds, a large one less often, and the database never spends
more than that share of one connection on it. Every instance sharing a journal counts it for
itself: the numbers are journal-wide, the same on each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from scheduler.model import State

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 2.0
MAX_INTERVAL_S = 300.0
DUTY = 0.005

_STATES = {state.value: state for state in State}


def duty_interval_s(
    cost_s: float, min_interval_s: float, max_interval_s: float, duty: float
) -> float:
    """Seconds until the next count: the last one's cost over `duty`, within the bounds."""
    return min(max_interval_s, max(min_interval_s, cost_s / duty))


async def count_in_background(
    count: Callable[[], Awaitable[object]], interval_s: Callable[[], float], what: str
) -> None:
    """Run `count` until cancelled, `interval_s()` apart.

    A count that fails (the journal away) keeps its owner's last answer; it is logged once,
    and once more when counting works again.
    """
    failing = False
    while True:
        try:
            await count()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not failing:
                log.warning("cannot count %s: %s", what, exc)
            failing = True
        else:
            if failing:
                log.info("counting %s again", what)
            failing = False
        await asyncio.sleep(interval_s())


@dataclass(frozen=True)
class StateCounts:
    """Every state's number of assignments in the journal, as of `counted_at` (Unix time)."""

    counts: Mapping[State, int]
    counted_at: float
    duration_s: float

    @property
    def total(self) -> int:
        """Every assignment the journal holds."""
        return sum(self.counts.values())


class JournalCensus:
    """Counts the journal's assignments by state in the background; `latest` is the last count.

    `count` is the journal's `counts()`: retained assignments per state name. A count that fails
    (the database away) keeps the previous one, whose `counted_at` then shows its age.
    """

    def __init__(
        self,
        count: Callable[[], Awaitable[Mapping[str, int]]],
        *,
        min_interval_s: float = MIN_INTERVAL_S,
        max_interval_s: float = MAX_INTERVAL_S,
        duty: float = DUTY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < duty <= 1 or not 0 < min_interval_s <= max_interval_s:
            raise ValueError("need 0 < duty <= 1 and 0 < min_interval_s <= max_interval_s")
        self._count = count
        self._min_interval_s = min_interval_s
        self._max_interval_s = max_interval_s
        self._duty = duty
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.latest: StateCounts | None = None

    def __repr__(self) -> str:
        return f"JournalCensus(latest={self.latest!r})"

    async def refresh(self) -> StateCounts:
        """Count now, keep the answer as `latest`, and return it; raises what the journal raises."""
        started = time.monotonic()
        named = await self._count()
        duration_s = time.monotonic() - started
        counts = dict.fromkeys(State, 0)
        for name, number in named.items():
            state = _STATES.get(name)
            if state is not None:
                counts[state] += int(number)
        self.latest = StateCounts(MappingProxyType(counts), self._clock(), duration_s)
        return self.latest

    def next_interval_s(self) -> float:
        """Seconds until the next count: the last one's cost over `duty`, within the bounds."""
        cost_s = self.latest.duration_s if self.latest is not None else 0.0
        return duty_interval_s(cost_s, self._min_interval_s, self._max_interval_s, self._duty)

    async def start(self) -> None:
        """Count in the background from now on (the first count at once). Idempotent."""
        if self._task is None:
            self._task = asyncio.create_task(
                count_in_background(
                    self.refresh, self.next_interval_s, "the journal's assignments by state"
                ),
                name="journal-census",
            )

    async def stop(self) -> None:
        """Stop counting (a count under way is abandoned); `latest` stays. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
