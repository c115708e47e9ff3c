"""Waiting for a condition instead of sleeping for a fixed time.

A fixed sleep is either too short on a loaded machine (the test flakes) or too long on an idle
one (the suite is slow); a test waits for what it needs to have happened, within a bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
) -> T:
    """Call `probe` until `done` holds for its answer; that answer, or AssertionError naming
    `what` and the last answer once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = await probe()
        if done(answer):
            return answer
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s (last: {answer!r})")
        await asyncio.sleep(interval_s)
