"""When a write becomes visible to reads: log-normal indexing delay, stalls, refresh."""

from __future__ import annotations

import math
import random

from cxone_emulator.config import Indexing

#: z-score of the 99th percentile of the standard normal distribution.
Z_99 = 2.326


class IndexingModel:
    """Draws indexing delays: log-normal by median and p99; a fraction stalls until a refresh."""

    def __init__(self, settings: Indexing, rng: random.Random) -> None:
        self._rng = rng
        self.mu = 0.0
        self.sigma = 0.0
        self.stall_fraction = 0.0
        self.configure(settings)

    def configure(self, settings: Indexing) -> None:
        """Use new settings for later draws."""
        self.mu = math.log(settings.median_s)
        self.sigma = math.log(settings.p99_s / settings.median_s) / Z_99
        self.stall_fraction = settings.stall_fraction

    def draw(self) -> float:
        """Seconds until a new write is visible, or `math.inf` when it stalls."""
        if self.stall_fraction > 0 and self._rng.random() < self.stall_fraction:
            return math.inf
        if self.sigma <= 0:
            return math.exp(self.mu)
        return self._rng.lognormvariate(self.mu, self.sigma)

    def after_refresh(self) -> float:
        """Seconds until a pending write is visible once its segment was refreshed (< 1 s)."""
        return self._rng.uniform(0.0, 0.9)
