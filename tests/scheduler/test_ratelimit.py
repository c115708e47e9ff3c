import asyncio
import time

import pytest

from scheduler.ratelimit import RateGate


async def test_pause_holds_every_caller_of_the_class():
    gate = RateGate("bulk", 1000.0)
    gate.pause(0.3)
    started = time.monotonic()
    await asyncio.gather(*(gate.acquire() for _ in range(3)))
    # Lower bounds only: the pause cannot be skipped, however slow the machine.
    assert time.monotonic() - started >= 0.29
    assert gate.paused_for == 0.0


async def test_a_longer_pause_wins_and_a_shorter_one_does_not_shorten_it():
    gate = RateGate("bulk", 1000.0)
    gate.pause(0.4)
    gate.pause(0.1)
    assert gate.paused_for > 0.3
    assert not gate.has_capacity()


async def test_pace_never_exceeds_the_rate_beyond_the_burst():
    gate = RateGate("bulk", 50.0, burst=2)
    started = time.monotonic()
    for _ in range(12):
        await gate.acquire()
    # 2 at once, then 10 more at 50/s: at least 0.2 s.
    assert time.monotonic() - started >= 0.19


async def test_a_high_rate_is_not_capped_by_the_timer_tick():
    # Timers fire in 1 ms steps: a bucket of 2 tokens admitted at most ~2,000/s, so half a
    # second at 5,000/s gave about 1,000. The default bucket now holds 4 ms of tokens (20).
    gate = RateGate("read", 5000.0)
    assert gate.burst == 20
    admitted = 0

    async def take() -> None:
        nonlocal admitted
        while True:
            await gate.acquire()
            admitted += 1

    task = asyncio.create_task(take())
    await asyncio.sleep(0.5)
    task.cancel()
    # Nominally 2,500; the bound leaves room for a slow machine, not for the old cap.
    assert admitted > 1600


def test_low_rates_keep_a_burst_of_two():
    assert RateGate("bulk", 10.0).burst == 2
    assert RateGate("read", 50.0).burst == 2
    assert RateGate("read", 1000.0).burst == 4


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="rate"):
        RateGate("bulk", 0)
    with pytest.raises(ValueError, match="burst"):
        RateGate("bulk", 1.0, burst=0)
