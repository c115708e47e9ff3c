"""Warnings about what anyone outside can cause again and again, at a bounded rate.

A CRM that sends ten thousand unknown contact ids makes ten thousand dead letters: each is worth
a warning where operators look, but not ten thousand lines a minute. A `ThrottledLog` lets one
line per key through per period and says, in the next line it lets through, how many it held
back meanwhile, so that the log stays readable and no count is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class ThrottledLog:
    """At most one line per key every `period_s`; the next one counts those held back."""

    def __init__(
        self,
        logger: logging.Logger,
        period_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._period_s = period_s
        self._clock = clock
        # key -> (when a line may go again, lines held back since the last one)
        self._state: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        """Log `message % args` at warning level, unless a line of `key` went out lately."""
        now = self._clock()
        allowed_at, held = self._state.get(key, (0.0, 0))
        if now < allowed_at:
            self._state[key] = (allowed_at, held + 1)
            return
        if len(self._state) > 1000:
            self._state.clear()  # keys come from a small fixed set; never grow without bound
        self._state[key] = (now + self._period_s, 0)
        if held:
            self._logger.warning(
                message + " (and %d more like it in the last %.0f s)",
                *args,
                held,
                self._period_s,
            )
        else:
            self._logger.warning(message, *args)
