"""Token buckets per endpoint class, answering how long a refused request should wait."""

from __future__ import annotations

import math
import time

from cxone_emulator.config import LIMITED_CLASSES, Limit, Limits


class TokenBucket:
    """A token bucket: `rate` tokens per second, at most `burst`; `rate <= 0` never refuses."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, limit: Limit) -> None:
        self.rate = limit.rate
        self.burst = limit.burst
        self._tokens = limit.burst
        self._stamp = time.monotonic()

    def take(self, now: float) -> float:
        """Take one token; return 0 when admitted, else the seconds until one is available."""
        if self.rate <= 0:
            return 0.0
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self.rate


def retry_after(wait_s: float) -> int:
    """`Retry-After` in whole seconds: rounded up, at least 1 (0 would invite a tight loop)."""
    return max(1, math.ceil(wait_s - 1e-9))


class RateLimiter:
    """The token buckets of every limited class, rebuilt (full) when the limits change."""

    def __init__(self, limits: Limits) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self.configure(limits)

    def configure(self, limits: Limits) -> None:
        """Start fresh, full buckets for `limits`."""
        self._buckets = {cls: TokenBucket(getattr(limits, cls)) for cls in LIMITED_CLASSES}

    def take(self, cls: str, now: float) -> float:
        """Take a token of class `cls`: 0 when admitted, else the seconds to wait."""
        return self._buckets[cls].take(now)
