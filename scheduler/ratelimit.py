"""Per-endpoint-class admission: a GCRA pacer plus a shared pause for 429 Retry-After.

CXone (and the emulator, `cxone_emulator/ratelimit.py`) limits each endpoint class with a token
bucket of `rate` tokens per second holding at most `burst`. Such a bucket is exactly GCRA with
emission interval `T = 1 / rate` and tolerance `(burst - 1) * T`: a request is admitted if it
arrives no earlier than its theoretical arrival time (TAT) minus the tolerance, and then moves
the TAT on by `T`.

The gate is GCRA at the same rate with a much smaller tolerance. That difference is the margin
for what happens between our admission and CXone's count: requests admitted in order can
arrive bunched (one waits for a new TCP connection or a token refresh while the next goes out
on a pooled one, or the event loop is late to write it). Arrivals still conform to CXone's
bucket as long as the spread of those delays stays below CXone's tolerance minus ours: with the
documented limits, 0.4 s for single writes (2/s, burst 2), 0.8 s for bulk writes (10/s, burst
10) and 0.96 s for reads (50/s, burst 50).

The gate used to be an aiolimiter bucket of 2 tokens: for single writes that was CXone's whole
burst of 2, so it kept no margin at all and each storm of fallbacks drew a 429 (2 sent at once,
the next 0.5 s later; any delay of the second made the third arrive early). It also ran on the
event loop's clock only, so it could not be driven by a test clock. GCRA is a few lines and
states the relation to the upstream bucket directly.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

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

    Pacing (GCRA, see the module docstring) leaves most of CXone's burst unused, which absorbs
    the network's jitter: that is what keeps the 429 count at zero when both rates are equal.
    Callers are admitted one at a time in the order they asked (a fair lock), so none starves.
    A 429 anywhere pauses every request of the class until its Retry-After has passed, because
    the limit is per tenant, not per request; a caller waiting for its turn when the pause
    begins waits for the pause too, and no admission is spent meanwhile.
    """

    def __init__(
        self,
        name: str,
        rate_per_s: float,
        *,
        tolerance_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self.rate_per_s = rate_per_s
        self.tolerance_s, self._interval = gcra_parameters(name, rate_per_s, tolerance_s)
        self._clock = clock
        self._sleep = sleep
        # The theoretical arrival time of the next request; in the past means "admit now".
        self._next_at = -math.inf
        self._paused_until = 0.0
        self._turn = asyncio.Lock()
        self.waited_s = 0.0  # total time callers spent waiting here (for metrics)

    @property
    def paused_for(self) -> float:
        """Seconds left of the current 429 pause (0 when not paused)."""
        return max(0.0, self._paused_until - self._clock())

    def pause(self, seconds: float) -> None:
        """Hold every request of this class for `seconds` (a 429's Retry-After)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def _wait_s(self, now: float) -> float:
        return max(self._paused_until - now, self._next_at - self.tolerance_s - now)

    async def acquire(self) -> None:
        """Wait until a request of this class may be sent."""
        started = self._clock()
        async with self._turn:
            while True:
                now = self._clock()
                wait = self._wait_s(now)
                if wait <= 0:
                    break
                await self._sleep(wait)
            self._next_at = max(self._next_at, now) + self._interval
        self.waited_s += self._clock() - started

    def has_capacity(self) -> bool:
        """Whether a request could be sent right now without waiting."""
        return not self._turn.locked() and self._wait_s(self._clock()) <= 0
