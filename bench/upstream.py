"""Upstream benchmark: how close the engine's bulk writes come to CXone's rate limit.

Backlog: the emulator's bulk limit is R req/s and the engine's `write_rps` is R; 20,000
assignments over 20 segments are queued at once. Reported against the configured limit R (the
emulator enforces it, and counts the 429s of any request over it): bulk requests/s / R
(target >= 0.97), mean ids per request (>= 195), 429s (0), and
the total time / the theoretical minimum sum(ceil(n_s / 200)) / R.

Trickle: one assignment per second; received -> written p50/p99 against `linger_ms`.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time

import aiohttp

from bench._common import build_rig, control, percentile, run_on_uvloop
from scheduler.engine import BatchingPolicy
from scheduler.model import Assignment, MembershipChange, State
from scheduler.observer import EngineObserver
from tests.support.processes import emulator_process

RATE = 20.0
SEGMENTS = 20
ASSIGNMENTS = 20_000
RUNS = 3
TRICKLE = 15
LINGER_S = 1.0


class Timings(EngineObserver):
    """Receive -> written latencies and the first send time."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.done = asyncio.Event()
        self.written: list[float] = []
        self.first_send: float | None = None
        self.last_written = 0.0

    def transitioned(self, assignment: Assignment, previous: State) -> None:
        if assignment.state is State.WRITTEN:
            now = time.time()
            self.written.append(now - assignment.received_at)
            self.last_written = now
            if len(self.written) >= self.expected:
                self.done.set()

    def bulk_sent(self, segment_id: str, ids: int, attempt: int) -> None:
        if self.first_send is None:
            self.first_send = time.time()


async def _backlog(url: str, session: aiohttp.ClientSession) -> dict[str, float]:
    await control(session, url, "POST", "/_emulator/reset", {"config": True})
    await control(
        session,
        url,
        "PATCH",
        "/_emulator/config",
        {"limits": {"bulk": {"rate": RATE, "burst": RATE}}},
    )
    observer = Timings(ASSIGNMENTS)
    rig = await build_rig(url, observer, write_rps=RATE, batching=BatchingPolicy(linger_s=LINGER_S))
    engine = rig.engine
    per_segment: dict[str, int] = {}
    started = time.time()
    for i in range(ASSIGNMENTS):
        segment = f"seg-{i % SEGMENTS}"
        per_segment[segment] = per_segment.get(segment, 0) + 1
        engine.submit(MembershipChange(f"{100000000000 + i}", (segment,)))
    submitted = time.time()
    await observer.done.wait()
    elapsed = observer.last_written - started
    assert observer.first_send is not None
    sending = observer.last_written - observer.first_send
    await rig.close()
    counters = await control(session, url, "GET", "/_emulator/counters")
    requests = counters["bulk_ids"]["requests"]
    minimum = sum(math.ceil(n / 200) for n in per_segment.values()) / RATE
    return {
        "requests_per_s_ratio": requests / sending / RATE,
        "submit_s": submitted - started,
        "mean_ids": counters["bulk_ids"]["ids"] / requests,
        "rate_limited": float(counters["rate_limited"]["bulk"]),
        "time_ratio": elapsed / minimum,
        "elapsed_s": elapsed,
        "minimum_s": minimum,
    }


async def _trickle(url: str, session: aiohttp.ClientSession) -> list[float]:
    await control(session, url, "POST", "/_emulator/reset", {"config": True})
    observer = Timings(TRICKLE)
    rig = await build_rig(url, observer, write_rps=RATE, batching=BatchingPolicy(linger_s=LINGER_S))
    engine = rig.engine
    for i in range(TRICKLE):
        engine.submit(MembershipChange(f"trickle-{i}", ("seg-t",)))
        await asyncio.sleep(1.0)
    await observer.done.wait()
    await rig.close()
    return observer.written


async def _run() -> bool:
    emulator = emulator_process()
    url = emulator.start()
    try:
        async with aiohttp.ClientSession() as session:
            runs = [await _backlog(url, session) for _ in range(RUNS)]
            latencies = await _trickle(url, session)
    finally:
        emulator.stop()

    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(
        f"upstream backlog: {ASSIGNMENTS} assignments over {SEGMENTS} segments, "
        f"reference R = {RATE:g} bulk req/s (emulator limit = engine write_rps), "
        f"median of {RUNS} runs"
    )
    print(f"  bulk requests/s / R      {median('requests_per_s_ratio'):.3f}   (target >= 0.97)")
    print(f"  mean ids per request     {median('mean_ids'):.1f}   (target >= 195)")
    print(f"  429s                     {median('rate_limited'):.0f}   (target 0)")
    print(
        f"  total time / minimum     {median('time_ratio'):.3f}   "
        f"({median('elapsed_s'):.2f} s vs {median('minimum_s'):.2f} s, of which "
        f"{median('submit_s'):.2f} s queueing the {ASSIGNMENTS} assignments)"
    )
    print(f"upstream trickle: 1 assignment/s x {TRICKLE}, linger {LINGER_S * 1000:.0f} ms")
    print(
        f"  received -> written p50  {percentile(latencies, 0.5) * 1000:.0f} ms   "
        f"(target <= linger + 50 ms = {LINGER_S * 1000 + 50:.0f} ms)"
    )
    print(f"  received -> written p99  {percentile(latencies, 0.99) * 1000:.0f} ms")
    met = (
        median("requests_per_s_ratio") >= 0.97
        and median("mean_ids") >= 195
        and median("rate_limited") == 0
        and percentile(latencies, 0.5) <= LINGER_S + 0.05
    )
    if not met:
        print("  MISSED a target above")
    return met


def main() -> int:
    """Run the upstream benchmark and print its figures; 1 if a target was missed."""
    return run_on_uvloop(_run)


if __name__ == "__main__":
    raise SystemExit(main())
