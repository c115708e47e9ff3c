"""The rate gate (aiolimiter) against the emulator's own token bucket, on a virtual clock.

aiolimiter times its bucket by the running event loop's clock, and so does the gate: these
tests run it on an event loop whose clock is virtual: each turn of the loop takes a nanosecond,
and where the loop would sleep the clock jumps straight to its next timer. Admission times are
therefore exact to a microsecond, and no test depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import selectors
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from cxone_emulator.config import Limit
from cxone_emulator.ratelimit import TokenBucket
from scheduler.ratelimit import (
    MAX_TOLERANCE_S,
    MIN_TOLERANCE_S,
    RateGate,
    bucket_capacity,
    default_tolerance,
)

T = TypeVar("T")


# A turn of a real event loop takes some time, and aiolimiter relies on it: a timer it sets for
# the moment its bucket has room may find the level a rounding error short and set another for
# "now", which fires at once; only a clock that moves gets it out of that.
TURN_S = 1e-9


class VirtualClock:
    """The time of a `VirtualClockLoop`: TURN_S per turn, and a jump where the loop would wait."""

    def __init__(self, late_s: float) -> None:
        # Small, so that TURN_S is far above the rounding step of the clock's floats.
        self.now = 1000.0
        # Each jump overshoots the timer by this much, as a busy loop wakes up late.
        self.late_s = late_s


class VirtualSelector(selectors.DefaultSelector):
    """Polls without blocking; where the loop would block until its next timer, jumps to it."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            self.clock.now += TURN_S
        elif timeout is None:
            raise RuntimeError("nothing is ready and no timer is set: the test would hang")
        else:
            self.clock.now += max(TURN_S, timeout + self.clock.late_s)
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on a `VirtualClock`: `loop.time()`, timers and sleeps all use it."""

    def __init__(self, late_s: float = 0.0) -> None:
        self.clock = VirtualClock(late_s)
        super().__init__(VirtualSelector(self.clock))

    def time(self) -> float:
        return self.clock.now


def on_virtual_clock(scenario: Callable[[], Awaitable[T]], *, late_s: float = 0.0) -> T:
    """Run `scenario` to its end on a fresh `VirtualClockLoop`; cancel what it leaves running."""
    loop = VirtualClockLoop(late_s)

    async def main() -> T:
        return await scenario()

    try:
        return loop.run_until_complete(main())
    finally:
        leftover = asyncio.all_tasks(loop)
        for task in leftover:
            task.cancel()
        if leftover:
            loop.run_until_complete(asyncio.wait(leftover))
        loop.close()


def at_time(seconds: float) -> Any:
    """`seconds`, give or take the loop's turns: a microsecond is thousands of them."""
    return pytest.approx(seconds, abs=1e-6)


def now() -> float:
    return asyncio.get_running_loop().time()


async def admissions(gate: RateGate, storms: int, per_storm: int) -> list[float]:
    """Admission times of concurrent storms, each after an idle spell that empties buckets."""
    times: list[float] = []

    async def one() -> None:
        await gate.acquire()
        times.append(now())

    for _ in range(storms):
        await asyncio.gather(*(one() for _ in range(per_storm)))
        await asyncio.sleep(5.0)
    return times


def refused_by_emulator(arrivals: list[float], rate: float, burst: float) -> int:
    """How many of these arrivals the emulator's bucket answers with 429."""
    bucket = TokenBucket(Limit(rate=rate, burst=burst))
    # The bucket starts full at its creation, on the real monotonic clock: the first arrival
    # comes a second after that, and the rest as far after it as they came on the virtual one.
    shift = time.monotonic() + 1.0 - min(arrivals)
    return sum(1 for at in sorted(arrivals) if bucket.take(at + shift) > 0)


# The documented CXone limits (CONTRACT.md §5) and the emulator's defaults.
LIMITS = [("bulk", 10.0, 10.0), ("single", 2.0, 2.0), ("read", 50.0, 50.0)]


def test_the_virtual_clock_moves_a_turn_at_a_time_and_jumps_over_sleeps() -> None:
    async def scenario() -> tuple[float, float, float]:
        start = now()
        await asyncio.sleep(0)
        for _ in range(1000):
            await asyncio.sleep(0)
        busy = now()
        await asyncio.sleep(2.5)
        return start, busy, now()

    start, busy, slept = on_virtual_clock(scenario)
    assert busy - start == pytest.approx(1001 * TURN_S, rel=1e-3)
    assert slept - busy == pytest.approx(2.5, abs=1e-6)


@pytest.mark.parametrize(("name", "rate", "burst"), LIMITS)
def test_admissions_conform_to_the_emulator_bucket_despite_arrival_jitter(
    name: str, rate: float, burst: float
) -> None:
    gate = RateGate(name, rate)
    sent = on_virtual_clock(lambda: admissions(gate, storms=4, per_storm=int(3 * rate)))
    assert len(sent) == 4 * int(3 * rate)
    # The margin the module docstring promises: CXone's tolerance minus the gate's, which its
    # bucket's capacity sets.
    margin = (burst - 1) / rate - (gate.capacity - 1) / rate
    assert margin == pytest.approx((burst - 1) / rate - gate.tolerance_s)
    assert margin >= 0.4
    # Arrivals delayed by anything within the margin: the worst case alternates the extremes
    # (one request late, the next on time), and random delays cover the rest.
    rng = random.Random(11)
    jitter = margin * 0.999
    uniform = [at + rng.uniform(0.0, jitter) for at in sent]
    assert refused_by_emulator(sent, rate, burst) == 0
    assert refused_by_emulator(uniform, rate, burst) == 0
    for late in (0, 1):
        alternating = [at + (jitter if i % 2 == late else 0.0) for i, at in enumerate(sent)]
        assert refused_by_emulator(alternating, rate, burst) == 0


def test_a_single_write_storm_is_paced_not_burst() -> None:
    # The defect: a bucket of 2 admitted 2 at once and a third 0.5 s later, so a second request
    # that arrived a little late made the third look early to CXone's bucket of 2.
    gate = RateGate("single", 2.0)
    assert gate.capacity == pytest.approx(1.2)
    sent = on_virtual_clock(lambda: admissions(gate, storms=1, per_storm=5))
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
    assert gaps[0] == at_time(0.5 - MAX_TOLERANCE_S)
    assert all(gap == at_time(0.5) for gap in gaps[1:])


@pytest.mark.parametrize("rate", [2.0, 10.0, 50.0, 5000.0])
def test_a_backlog_is_admitted_at_the_full_rate(rate: float) -> None:
    gate = RateGate("bulk", rate)
    sent = on_virtual_clock(lambda: admissions(gate, storms=1, per_storm=200))
    # n admissions span (n - 1) intervals, less the tolerance used once at the start.
    span = sent[-1] - sent[0]
    assert span == at_time(199 / rate - gate.tolerance_s)


def test_late_wake_ups_within_the_tolerance_do_not_lower_the_rate() -> None:
    late_s = 0.003
    gate = RateGate("bulk", 10.0)

    async def scenario() -> float:
        start = now()
        for _ in range(101):
            await gate.acquire()
        return now() - start

    elapsed = on_virtual_clock(scenario, late_s=late_s)
    # 101 admissions at 10/s: 10 s of intervals less the tolerance, plus one late wake-up.
    assert elapsed == at_time(10.0 - gate.tolerance_s + late_s)


def test_pause_holds_every_caller_of_the_class_including_those_already_waiting() -> None:
    gate = RateGate("bulk", 10.0)

    async def scenario() -> tuple[float, list[float]]:
        await gate.acquire()
        await gate.acquire()  # the tolerance is spent: the next callers have to wait
        start = now()
        admitted: list[float] = []

        async def caller() -> None:
            await gate.acquire()
            admitted.append(now())

        waiting = [asyncio.create_task(caller()) for _ in range(3)]
        await asyncio.sleep(0)  # the first waits for room in the bucket, the others their turn
        assert not gate.has_capacity()
        gate.pause(3.0)
        await asyncio.gather(*waiting)
        assert gate.paused_for == 0.0
        return start, admitted

    start, admitted = on_virtual_clock(scenario)
    # Nobody before the pause ends; then the bucket's capacity (2) at once, as after any idle
    # spell, and the pace after it: no burst saved up during the pause, no admission spent in it.
    assert admitted == [at_time(start + 3.0), at_time(start + 3.0), at_time(start + 3.1)]


def test_a_caller_waiting_when_a_pause_begins_spends_no_admission_during_it() -> None:
    # 10/s with a bucket of 2: after two admissions at t0 the next is due at t0 + 0.1 s. A pause
    # until t0 + 0.15 s begins while it waits: it is admitted when the pause ends, and the one
    # after it 0.05 s later, as if the pause had taken nothing from the bucket. Had the waiting
    # caller's admission been counted during the pause and thrown away, both would come 0.05 s
    # later.
    gate = RateGate("bulk", 10.0)

    async def scenario() -> list[float]:
        await gate.acquire()
        await gate.acquire()
        start = now()
        waiting = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        gate.pause(0.15)
        await waiting
        after = [now() - start]
        await gate.acquire()
        after.append(now() - start)
        return after

    after = on_virtual_clock(scenario)
    assert after == [at_time(0.15), at_time(0.2)]


def test_a_pause_that_begins_while_a_caller_sits_one_out_holds_it_longer() -> None:
    gate = RateGate("read", 50.0)

    async def scenario() -> float:
        start = now()
        gate.pause(1.0)
        waiting = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0.5)
        gate.pause(2.0)  # another 429, with a longer Retry-After
        await waiting
        return now() - start

    assert on_virtual_clock(scenario) == at_time(2.5)


def test_a_longer_pause_wins_and_a_shorter_one_does_not_shorten_it() -> None:
    gate = RateGate("bulk", 1000.0)

    async def scenario() -> None:
        gate.pause(0.4)
        gate.pause(0.1)
        assert gate.paused_for == at_time(0.4)
        assert not gate.has_capacity()
        await asyncio.sleep(0.4)
        assert gate.has_capacity()

    on_virtual_clock(scenario)


def test_a_cancelled_caller_spends_no_admission() -> None:
    gate = RateGate("single", 2.0)

    async def scenario() -> float:
        await gate.acquire()
        first = now()
        waiting = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await gate.acquire()
        return now() - first

    assert on_virtual_clock(scenario) == at_time(0.5 - gate.tolerance_s)


def test_callers_are_admitted_in_the_order_they_asked() -> None:
    gate = RateGate("bulk", 10.0)

    async def scenario() -> list[int]:
        admitted: list[int] = []

        async def caller(index: int) -> None:
            await gate.acquire()
            admitted.append(index)

        early = [asyncio.create_task(caller(i)) for i in range(10)]
        await asyncio.sleep(0.35)  # the first few are through, the rest wait
        late = [asyncio.create_task(caller(i)) for i in range(10, 15)]
        await asyncio.gather(*early, *late)
        return admitted

    assert on_virtual_clock(scenario) == list(range(15))


def test_waited_s_adds_up_every_callers_wait() -> None:
    gate = RateGate("single", 2.0)

    async def scenario() -> None:
        await gate.acquire()
        assert gate.waited_s == 0.0
        # Three callers at once: admitted 0.4 s, 0.9 s and 1.4 s later.
        await asyncio.gather(*(gate.acquire() for _ in range(3)))
        assert gate.waited_s == at_time(0.4 + 0.9 + 1.4)
        await asyncio.sleep(5.0)
        gate.pause(1.0)
        await gate.acquire()
        assert gate.waited_s == at_time(0.4 + 0.9 + 1.4 + 1.0)

    on_virtual_clock(scenario)


def test_has_capacity_is_whether_acquire_would_return_at_once() -> None:
    gate = RateGate("bulk", 10.0)

    async def scenario() -> None:
        assert gate.has_capacity()
        await gate.acquire()
        assert gate.has_capacity()  # the tolerance: one more at once
        await gate.acquire()
        assert not gate.has_capacity()
        await asyncio.sleep(0.1)
        assert gate.has_capacity()
        holder = asyncio.create_task(gate.acquire())
        waiting = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert not gate.has_capacity()  # a caller is waiting its turn: a new one would queue
        await asyncio.gather(holder, waiting)

    on_virtual_clock(scenario)


async def test_real_clock_pause_cannot_be_skipped() -> None:
    gate = RateGate("bulk", 1000.0)
    gate.pause(0.3)
    started = time.monotonic()
    await asyncio.gather(*(gate.acquire() for _ in range(3)))
    # Lower bounds only: the pause cannot be skipped, however slow the machine.
    assert time.monotonic() - started >= 0.29
    assert gate.paused_for == 0.0


def test_default_tolerance_is_one_interval_within_bounds() -> None:
    assert default_tolerance(2.0) == MAX_TOLERANCE_S
    assert default_tolerance(10.0) == pytest.approx(0.1)
    assert default_tolerance(50.0) == pytest.approx(0.02)
    assert default_tolerance(5000.0) == MIN_TOLERANCE_S


def test_the_bucket_holds_one_request_plus_the_tolerance() -> None:
    assert RateGate("single", 2.0).capacity == pytest.approx(1.2)
    assert RateGate("bulk", 10.0).capacity == pytest.approx(2.0)
    assert RateGate("read", 50.0).capacity == pytest.approx(2.0)
    assert RateGate("bulk", 5000.0).capacity == pytest.approx(21.0)
    assert RateGate("token", 0.8, tolerance_s=0.0).capacity == 1.0
    assert bucket_capacity(4.0, 0.25) == 2.0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        RateGate("bulk", 0)
    with pytest.raises(ValueError, match="rate"):
        RateGate("bulk", float("nan"))
    with pytest.raises(ValueError, match="tolerance"):
        RateGate("bulk", 1.0, tolerance_s=-1.0)
