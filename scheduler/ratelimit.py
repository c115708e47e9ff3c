"""Per-endpoint-class admission: an aiolimiter bucket plus a shared pause for 429 Retry-After."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from aiolimiter import AsyncLimiter

# The bucket holds this much time's worth of tokens: a few of the event loop's 1 ms timer ticks.
BURST_WINDOW_S = 0.004


def default_burst(rate_per_s: float) -> int:
    """Tokens a gate holds by default: at least 2, and BURST_WINDOW_S worth at high rates."""
    return max(2, math.ceil(rate_per_s * BURST_WINDOW_S))


class RateGate:
    """Admits requests of one endpoint class at `rate_per_s`, smoothly, and pauses on a 429.

    The bucket holds a few milliseconds' worth of tokens (at least 2) rather than a full second's
    worth: CXone's own bucket allows a burst of `rate`, so pacing nearly evenly leaves most of
    its burst free to absorb network jitter, which is what keeps the 429 count at zero when both
    rates are equal. At least 2 rather than 1 lets a request whose wake-up came late (a busy
    event loop) be made up by the next one. At high rates the bucket must hold more than one
    timer tick's worth: the event loop's timers fire in 1 ms steps, so a bucket of 2 could never
    admit more than about 2,000 requests/s, whatever the configured rate.
    A 429 anywhere pauses every request of the class until its Retry-After has passed, because
    the limit is per tenant, not per request.
    """

    def __init__(
        self,
        name: str,
        rate_per_s: float,
        *,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"{name}: rate must be positive, got {rate_per_s}")
        self.name = name
        self.rate_per_s = rate_per_s
        if burst is None:
            burst = default_burst(rate_per_s)
        if burst < 1:
            raise ValueError(f"{name}: burst must be at least 1, got {burst}")
        self.burst = burst
        self._limiter = AsyncLimiter(burst, burst / rate_per_s)
        self._clock = clock
        self._paused_until = 0.0
        self.waited_s = 0.0  # total time callers spent waiting here (for metrics)

    @property
    def paused_for(self) -> float:
        """Seconds left of the current 429 pause (0 when not paused)."""
        return max(0.0, self._paused_until - self._clock())

    def pause(self, seconds: float) -> None:
        """Hold every request of this class for `seconds` (a 429's Retry-After)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    async def acquire(self) -> None:
        """Wait until a request of this class may be sent."""
        started = self._clock()
        while True:
            pause = self.paused_for
            if pause > 0:
                await asyncio.sleep(pause)
            await self._limiter.acquire()
            # A 429 seen by another request while this one waited for its token must still hold
            # this one back; the token is simply lost, which errs on the side of fewer requests.
            if self.paused_for <= 0:
                break
        self.waited_s += self._clock() - started

    def has_capacity(self) -> bool:
        """Whether a request could be sent right now without waiting."""
        return self.paused_for <= 0 and self._limiter.has_capacity()
