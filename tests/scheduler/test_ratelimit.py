"""The rate gate (GCRA) against the emulator's own token bucket, on a fake clock."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import pytest

from cxone_emulator.config import Limit
from cxone_emulator.ratelimit import TokenBucket
from scheduler.ratelimit import MAX_TOLERANCE_S, MIN_TOLERANCE_S, RateGate, default_tolerance


class FakeTime:
    """A clock that moves only when someone sleeps on it."""

    def __init__(self) -> None:
        # Well after the emulator bucket's creation stamp, so that bucket starts full.
        self.now = time.monotonic() + 100.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)  # let the other callers run, as a real sleep would

    def gate(self, rate: float, **kwargs: float) -> RateGate:
        return RateGate("test", rate, clock=self.clock, sleep=self.sleep, **kwargs)


async def admissions(fake: FakeTime, gate: RateGate, storms: int, per_storm: int) -> list[float]:
    """Admission times of concurrent storms, each after an idle spell that refills buckets."""
    times: list[float] = []

    async def one() -> None:
        await gate.acquire()
        times.append(fake.now)

    for _ in range(storms):
        await asyncio.gather(*(one() for _ in range(per_storm)))
        await fake.sleep(5.0)
    return times


def refused_by_emulator(arrivals: list[float], rate: float, burst: float) -> int:
    """How many of these arrivals the emulator's bucket answers with 429."""
    bucket = TokenBucket(Limit(rate=rate, burst=burst))
    return sum(1 for at in sorted(arrivals) if bucket.take(at) > 0)


# The documented CXone limits (CONTRACT.md §5) and the emulator's defaults.
LIMITS = [("bulk", 10.0, 10.0), ("single", 2.0, 2.0), ("read", 50.0, 50.0)]


@pytest.mark.parametrize(("name", "rate", "burst"), LIMITS)
async def test_admissions_conform_to_the_emulator_bucket_despite_arrival_jitter(
    name: str, rate: float, burst: float
) -> None:
    fake = FakeTime()
    gate = fake.gate(rate)
    sent = await admissions(fake, gate, storms=4, per_storm=int(3 * rate))
    # The margin the module docstring promises: CXone's tolerance minus the gate's.
    margin = (burst - 1) / rate - gate.tolerance_s
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


async def test_a_single_write_storm_is_paced_not_burst() -> None:
    # The defect: a bucket of 2 admitted 2 at once and a third 0.5 s later, so a second request
    # that arrived a little late made the third look early to CXone's bucket of 2.
    fake = FakeTime()
    sent = await admissions(fake, fake.gate(2.0), storms=1, per_storm=5)
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
    assert gaps[0] == pytest.approx(0.5 - MAX_TOLERANCE_S)
    assert all(gap == pytest.approx(0.5) for gap in gaps[1:])


@pytest.mark.parametrize("rate", [2.0, 10.0, 50.0, 5000.0])
async def test_a_backlog_is_admitted_at_the_full_rate(rate: float) -> None:
    fake = FakeTime()
    gate = fake.gate(rate)
    sent = await admissions(fake, gate, storms=1, per_storm=200)
    # GCRA: n admissions span (n - 1) intervals, less the tolerance used once at the start.
    span = sent[-1] - sent[0]
    assert span == pytest.approx(199 / rate - gate.tolerance_s)


async def test_late_wake_ups_within_the_tolerance_do_not_lower_the_rate() -> None:
    fake = FakeTime()
    late_s = 0.003

    async def late_sleep(seconds: float) -> None:
        await fake.sleep(seconds + late_s)

    gate = RateGate("bulk", 10.0, clock=fake.clock, sleep=late_sleep)
    start = fake.now
    for _ in range(101):
        await gate.acquire()
    # 101 admissions at 10/s: 10 s of intervals less the tolerance, plus one late wake-up.
    assert fake.now - start == pytest.approx(10.0 - gate.tolerance_s + late_s)


async def test_pause_holds_every_caller_of_the_class_including_those_already_waiting() -> None:
    fake = FakeTime()
    gate = fake.gate(10.0)
    await gate.acquire()
    await gate.acquire()  # the tolerance is spent: the next caller has to wait
    start = fake.now
    waiting = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)  # it now sleeps for its turn
    gate.pause(3.0)
    await waiting
    others = [fake.now]
    for _ in range(2):
        await gate.acquire()
        others.append(fake.now)
    assert others[0] >= start + 3.0
    assert gate.paused_for == 0.0
    # After the pause the pace goes on: at most the tolerance early, no burst saved up meanwhile.
    assert others[2] - others[0] >= 0.2 - gate.tolerance_s - 1e-9


async def test_a_longer_pause_wins_and_a_shorter_one_does_not_shorten_it() -> None:
    fake = FakeTime()
    gate = fake.gate(1000.0)
    gate.pause(0.4)
    gate.pause(0.1)
    assert gate.paused_for == pytest.approx(0.4)
    assert not gate.has_capacity()
    fake.now += 0.4
    assert gate.has_capacity()


async def test_a_cancelled_caller_spends_no_admission() -> None:
    fake = FakeTime()
    gate = fake.gate(2.0)
    await gate.acquire()
    first = fake.now
    waiting = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    fake.now = first  # the cancelled sleep had moved the fake clock; a real one would not
    await gate.acquire()
    assert fake.now - first == pytest.approx(0.5 - gate.tolerance_s)


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


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        RateGate("bulk", 0)
    with pytest.raises(ValueError, match="rate"):
        RateGate("bulk", float("nan"))
    with pytest.raises(ValueError, match="tolerance"):
        RateGate("bulk", 1.0, tolerance_s=-1.0)
