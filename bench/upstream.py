"""Upstream benchmark: how close the engine's bulk writes come to CXone's rate limit.

Backlog: the emulator's bulk limit is R req/s and the engine's `write_rps` is R; 20,000
assignments over 20 segments are queued at once. Reported against the configured limit R (the
emulator enforces it, and counts the 429s of any request over it): bulk requests/s / R
(target >= 0.97), mean ids per request (>= 195), 429s (0), and
the total time / the theoretical minimum sum(ceil(n_s / 200)) / R.

The same backlog as removals (20,000 members of 20 segments, added first and not measured,
then removed) and mixed (10,000 new adds and 10,000 removals of earlier members, interleaved):
bulk adds and bulk removals share CXone's write bucket, so the same targets hold. Requests and
ids per request are counted as the engine sends them, adds and removals alike.

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
KINDS = {"add": "adds", "remove": "removals", "mixed": "adds and removals mixed"}


class Timings(EngineObserver):
    """Receive -> written latencies, the first send time, and what each bulk request held."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.done = asyncio.Event()
        self.written: list[float] = []
        self.first_send: float | None = None
        self.last_written = 0.0
        self.requests = 0
        self.ids = 0

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
        self.requests += 1
        self.ids += ids


def _change(kind: str, i: int) -> MembershipChange:
    """The i-th change of a backlog: an add, a removal, or (mixed) every other one of each."""
    segment = f"seg-{i % SEGMENTS}"
    contact = f"{100000000000 + i}"
    if kind == "add" or (kind == "mixed" and i % 2 == 0):
        return MembershipChange(f"{200000000000 + i}" if kind == "mixed" else contact, (segment,))
    return MembershipChange(contact, remove=(segment,))


async def _members_first(url: str) -> None:
    """Make the removal backlog's contacts members (not measured)."""
    observer = Timings(ASSIGNMENTS)
    rig = await build_rig(url, observer, write_rps=RATE, batching=BatchingPolicy(linger_s=0.2))
    for i in range(ASSIGNMENTS):
        rig.engine.submit(MembershipChange(f"{100000000000 + i}", (f"seg-{i % SEGMENTS}",)))
    await observer.done.wait()
    await rig.close()


async def _backlog(url: str, session: aiohttp.ClientSession, kind: str) -> dict[str, float]:
    await control(session, url, "POST", "/_emulator/reset", {"config": True})
    await control(
        session,
        url,
        "PATCH",
        "/_emulator/config",
        {"limits": {"bulk": {"rate": RATE, "burst": RATE}}},
    )
    if kind != "add":
        await _members_first(url)
    before = await control(session, url, "GET", "/_emulator/counters")
    observer = Timings(ASSIGNMENTS)
    rig = await build_rig(url, observer, write_rps=RATE, batching=BatchingPolicy(linger_s=LINGER_S))
    engine = rig.engine
    per_lane: dict[tuple[str, bool], int] = {}
    started = time.time()
    for i in range(ASSIGNMENTS):
        change = _change(kind, i)
        lane = ((change.add or change.remove)[0], bool(change.remove))
        per_lane[lane] = per_lane.get(lane, 0) + 1
        engine.submit(change)
    submitted = time.time()
    await observer.done.wait()
    elapsed = observer.last_written - started
    assert observer.first_send is not None
    sending = observer.last_written - observer.first_send
    await rig.close()
    counters = await control(session, url, "GET", "/_emulator/counters")
    limited = counters["rate_limited"]["bulk"] - before["rate_limited"]["bulk"]
    requests = observer.requests
    minimum = sum(math.ceil(n / 200) for n in per_lane.values()) / RATE
    return {
        "requests_per_s_ratio": requests / sending / RATE,
        "submit_s": submitted - started,
        "mean_ids": observer.ids / requests,
        "rate_limited": float(limited),
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
            by_kind = {
                kind: [await _backlog(url, session, kind) for _ in range(RUNS)] for kind in KINDS
            }
            latencies = await _trickle(url, session)
    finally:
        emulator.stop()

    met = True
    for kind, runs in by_kind.items():

        def median(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        print(
            f"upstream backlog ({KINDS[kind]}): {ASSIGNMENTS} assignments over {SEGMENTS} "
            f"segments, reference R = {RATE:g} bulk req/s (emulator limit = engine write_rps), "
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
        met &= (
            median("requests_per_s_ratio") >= 0.97
            and median("mean_ids") >= 195
            and median("rate_limited") == 0
        )
    print(f"upstream trickle: 1 assignment/s x {TRICKLE}, linger {LINGER_S * 1000:.0f} ms")
    print(
        f"  received -> written p50  {percentile(latencies, 0.5) * 1000:.0f} ms   "
        f"(target <= linger + 50 ms = {LINGER_S * 1000 + 50:.0f} ms)"
    )
    print(f"  received -> written p99  {percentile(latencies, 0.99) * 1000:.0f} ms")
    met &= percentile(latencies, 0.5) <= LINGER_S + 0.05
    if not met:
        print("  MISSED a target above")
    return met


def main() -> int:
    """Run the upstream benchmark and print its figures; 1 if a target was missed."""
    return run_on_uvloop(_run)


if __name__ == "__main__":
    raise SystemExit(main())
