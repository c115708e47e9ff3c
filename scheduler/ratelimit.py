"""Per-endpoint-class admission: an aiolimiter bucket sized for a margin, plus a 429 pause.

CXone (and the emulator, `cxone_emulator/ratelimit.py`) limits each endpoint class with a token
bucket of `rate` tokens per second holding at most `burst`. Such a bucket is exactly GCRA with
emission interval `T = 1 / rate` and tolerance `(burst - 1) * T`: a request is admitted if it
comes at most that tolerance earlier than even pacing since the earlier requests would allow.

The gate is an aiolimiter `AsyncLimiter(capacity, capacity / rate)`: a leaky bucket that
drains at `rate` and admits a request while it holds at most `capacity - 1`. That is the same
rule at the same rate with a tolerance of `(capacity - 1) * T`, so the gate's bucket is sized
from a much smaller tolerance than CXone's: `capacity = 1 + tolerance * rate` (capacities need
not be whole): 1.2 for single writes (2/s, tolerance 0.1 s), 2 for bulk writes (10/s) and reads
(50/s), one interval each. That difference is the margin for what happens between our
admission and CXone's count: requests admitted in order can arrive bunched (one waits for a
new TCP connection or a token refresh while the next goes out on a pooled one, or the event
loop is late to write it). Arrivals still conform to CXone's bucket as long as the spread of
those delays stays below CXone's tolerance minus ours: with the documented limits, 0.4 s for
single writes (2/s, burst 2), 0.8 s for bulk writes (10/s, burst 10) and 0.96 s for reads
(50/s, burst 50).

An earlier gate was an aiolimiter bucket of 2 requests: for single writes that was CXone's
whole burst of 2, so it kept no margin at all and each storm of fallbacks drew a 429 (2 sent
at once, the next 0.5 s later; any delay of the second made the third arrive early). The
bucket's size was the fault, not the library: sized as above it keeps the margin.

aiolimiter reads the running event loop's clock (`loop.time()`), so the gate measures its
pauses and waits on that clock too; tests drive it with an event loop whose clock is virtual.
uvloop's clock counts whole milliseconds: admissions are timed to a millisecond, far inside the
margin, and aiolimiter's timer, rounded to the millisecond, can fire just before the bucket has
room and re-arm itself until the clock ticks, a few hundred microseconds of CPU per admission
that had to wait (about 2% of a core at 50 requests/s).
`daemon/store/shared_gate.py`, whose bucket lives in PostgreSQL for several processes, applies
the same rule itself with `gcra_parameters`.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

from aiolimiter import AsyncLimiter

# The gate may admit a request this much earlier than even pacing would, so that a wake-up that
# came late (a busy event loop, the 1 ms timer tick) is made up by the next request instead of
# being lost from the rate. At least a few timer ticks: at high rates, where one interval is
# shorter than a tick, a smaller tolerance would cap the rate at about one request per tick.
MIN_TOLERANCE_S = 0.004
# At most this much: whatever the gate uses of CXone's tolerance is missing from the margin for
# arrival jitter. Single writes (2/s) have a CXone tolerance of only 0.5 s.
MAX_TOLERANCE_S = 0.1


def default_tolerance(rate_per_s: float) -> float:
    """The gate's tolerance: one emission interval, within [MIN_TOLERANCE_S, MAX_TOLERANCE_S]."""
    return min(MAX_TOLERANCE_S, max(MIN_TOLERANCE_S, 1.0 / rate_per_s))


def gcra_parameters(name: str, rate_per_s: float, tolerance_s: float | None) -> tuple[float, float]:
    """(tolerance, emission interval) of a gate, checked: a clear error names a bad limit."""
    if not rate_per_s > 0 or math.isinf(rate_per_s):
        raise ValueError(f"{name}: rate must be positive and finite, got {rate_per_s}")
    if tolerance_s is None:
        tolerance_s = default_tolerance(rate_per_s)
    if not 0 <= tolerance_s < math.inf:
        raise ValueError(f"{name}: tolerance must be 0 or more seconds, got {tolerance_s}")
    return tolerance_s, 1.0 / rate_per_s


def bucket_capacity(rate_per_s: float, tolerance_s: float) -> float:
    """Capacity of a leaky bucket draining at `rate_per_s` that admits at most `tolerance_s` early.

    One for the request being admitted, plus what drains in the tolerance.
    """
    return 1.0 + tolerance_s * rate_per_s


class AdmissionGate(Protocol):
    """What the engine, the poller and the metrics use of a gate.

    `RateGate`, or a gate whose budget several processes share (daemon/store/shared_gate.py).
    """

    name: str
    rate_per_s: float
    waited_s: float

    @property
    def paused_for(self) -> float:
        """Seconds left of the current 429 pause (0 when not paused)."""
        ...

    def pause(self, seconds: float) -> None:
        """Hold every request of this class for `seconds` (a 429's Retry-After)."""
        ...

    async def acquire(self) -> None:
        """Wait until a request of this class may be sent."""
        ...

    def has_capacity(self) -> bool:
        """Whether a request could be sent right now without waiting."""
        ...


class RateGate:
    """Admits requests of one endpoint class at `rate_per_s`, nearly evenly, and pauses on a 429.

    An aiolimiter bucket of `capacity` (see the module docstring) leaves most of CXone's burst
    unused, which absorbs the network's jitter: that is what keeps the 429 count at zero when
    both rates are equal. Callers are admitted one at a time in the order they asked (a fair
    lock), so none starves, and the bucket never has more than one waiter. A 429 anywhere pauses
    every request of the class until its Retry-After has passed, because the limit is per
    tenant, not per request; a caller waiting for its turn when the pause begins waits for the
    pause too, and no admission is spent meanwhile.

    Every method is called on the event loop the gate serves: its clock is that loop's.
    """

    def __init__(self, name: str, rate_per_s: float, *, tolerance_s: float | None = None) -> None:
        self.name = name
        self.rate_per_s = rate_per_s
        self.tolerance_s, _ = gcra_parameters(name, rate_per_s, tolerance_s)
        self.capacity = bucket_capacity(rate_per_s, self.tolerance_s)
        self._bucket = AsyncLimiter(self.capacity, self.capacity / rate_per_s)
        self._paused_until = -math.inf
        self._turn = asyncio.Lock()
        # The turn holder's wait for room in the bucket, while it waits: a pause cancels it.
        self._taking: asyncio.Task[None] | None = None
        self.waited_s = 0.0  # total time callers spent waiting here (for metrics)

    def __repr__(self) -> str:
        return f"RateGate({self.name!r}, {self.rate_per_s}/s, capacity {self.capacity:g})"

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    @property
    def paused_for(self) -> float:
        """Seconds left of the current 429 pause (0 when not paused)."""
        return max(0.0, self._paused_until - self._now())

    def pause(self, seconds: float) -> None:
        """Hold every request of this class for `seconds` (a 429's Retry-After)."""
        self._paused_until = max(self._paused_until, self._now() + seconds)
        if self.paused_for > 0 and self._taking is not None:
            # The bucket would count the waiting caller's admission now, during the pause: the
            # caller waits for the pause instead, and asks the bucket again after it.
            self._taking.cancel()

    async def _sit_out_pause(self) -> None:
        left = self.paused_for
        while left > 0:
            await asyncio.sleep(left)
            left = self.paused_for  # a longer pause may have begun meanwhile

    async def _take(self) -> bool:
        """Take room in the bucket, waiting for it: False when a pause began meanwhile."""
        if self._bucket.has_capacity():
            await self._bucket.acquire()  # room now: returns without suspending
            return True
        # Waiting in a task of its own, which `pause` can cancel before it takes anything.
        self._taking = asyncio.get_running_loop().create_task(self._bucket.acquire())
        try:
            await self._taking
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._taking.cancelled() and current is not None and not current.cancelling():
                return False  # cancelled by `pause`, not this caller's cancellation
            raise
        finally:
            self._taking = None
        return True

    async def acquire(self) -> None:
        """Wait until a request of this class may be sent."""
        started = self._now()
        async with self._turn:
            await self._sit_out_pause()
            while not await self._take():
                await self._sit_out_pause()
            # A pause that began between the bucket's admission and this caller running again
            # holds it too: its room was taken before the pause, so it is simply used later.
            await self._sit_out_pause()
        self.waited_s += self._now() - started

    def has_capacity(self) -> bool:
        """Whether a request could be sent right now without waiting."""
        return not self._turn.locked() and self.paused_for <= 0 and self._bucket.has_capacity()
