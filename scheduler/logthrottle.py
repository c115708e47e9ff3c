"""Warnings about what anyone outside can cause again and again, at a bounded rate.

A CRM that sends ten thousand unknown contact ids makes ten thousand dead letters: each is worth
a warning where operators look, but not ten thousand lines a minute. A `ThrottledLog` lets the
first line of a key through, then holds the others back for `period_s`, and at the end of the
period says in one line how many it held back: the log stays readable and no count is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Held:
    until: float  # the end of the quiet period (monotonic)
    count: int = 0  # lines held back since it began
    last: str = ""  # the last one held back, as it would have been logged
    timer: asyncio.TimerHandle | None = None


class ThrottledLog:
    """One line per key at once, then at most one summary line per `period_s`."""

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
        self._held: dict[str, _Held] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        """Log `message % args` at warning level, unless a line of `key` went out lately."""
        now = self._clock()
        held = self._held.get(key)
        if held is not None and now < held.until:
            held.count += 1
            held.last = message % args
            if held.timer is None:
                held.timer = self._at_period_end(key, held.until - now)
            return
        if held is not None and held.count:
            self._summarise(key)  # a period that ended without its timer (no event loop)
        if len(self._held) > 1000:
            self._held.clear()  # keys come from a small fixed set; never grow without bound
        self._held[key] = _Held(until=now + self._period_s)
        self._logger.warning(message, *args)

    def flush(self) -> None:
        """Say now what is held back (the process stops before the period ends)."""
        for key in [key for key, held in self._held.items() if held.count]:
            self._summarise(key)

    def _at_period_end(self, key: str, delay_s: float) -> asyncio.TimerHandle | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # said at the next line of the key instead
        return loop.call_later(delay_s, self._summarise, key)

    def _summarise(self, key: str) -> None:
        held = self._held.pop(key, None)
        if held is None or not held.count:
            return
        if held.timer is not None:
            held.timer.cancel()
        self._logger.warning(
            "%d more like it in %.0f s, the last: %s", held.count, self._period_s, held.last
        )
