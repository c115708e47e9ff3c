"""The retry policy of the CXone contract: exponential backoff with jitter, Retry-After honoured."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try again after a failed attempt, and how often at most.

    Defaults are the contract's: 2 s, x1.5 per attempt, capped at 30 s, plus 0-1000 ms of uniform
    jitter, at most 5 attempts in all.
    """

    initial_s: float = 2.0
    multiplier: float = 1.5
    max_s: float = 30.0
    jitter_ms: float = 1000.0
    attempts: int = 5

    def delay(self, failed_attempts: int, rng: random.Random, retry_after_s: float = 0.0) -> float:
        """Seconds to wait before the next attempt, after `failed_attempts` (>= 1) have failed.

        The jitter spreads retries of many batches that failed together (no thundering herd); a
        server's Retry-After wins when it asks for longer than the backoff.
        """
        if failed_attempts < 1:
            raise ValueError("failed_attempts starts at 1")
        base = min(self.initial_s * self.multiplier ** (failed_attempts - 1), self.max_s)
        backoff = base + rng.uniform(0.0, self.jitter_ms / 1000.0)
        return max(backoff, retry_after_s)

    def exhausted(self, attempts_made: int) -> bool:
        """Whether no bulk attempt is left after `attempts_made` attempts."""
        return attempts_made >= self.attempts
