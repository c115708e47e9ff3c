"""An engine that lost every segment at once (its process was fenced): `Engine.abandon()`."""

from __future__ import annotations

import asyncio
import time

from scheduler.engine import BatchingPolicy
from scheduler.model import MembershipChange, State
from tests.scheduler.conftest import MakeEngine
from tests.scheduler.test_ownership import Owned
from tests.support.emulator import EmulatorControl


async def test_abandon_cancels_requests_in_flight_and_lets_everything_go_recording_nothing(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    # One bulk request a second, and the first one hangs (for longer than the test waits: only a
    # cancellation ends it): a batch is in flight, fresh ids wait in the buffer, and a
    # contact's second segment is parked behind its first.
    ownership = Owned({"AB1", "AB2"})
    harness = await make_engine(
        timeout_s=60.0,
        write_rps=1.0,
        batching=BatchingPolicy(
            min_size=1, max_size=200, linger_s=0.05, max_inflight_per_contact=1
        ),
        ownership=ownership,
    )
    engine = harness.engine
    await emulator.configure({"faults": {"bulk": {"hang_rate": 1.0, "hang_s": 60.0}}})
    engine.submit(MembershipChange("f1", add=("AB1",)))
    deadline = time.monotonic() + 10
    while not harness.client.bulk_calls:
        assert time.monotonic() < deadline, "the first batch never went out"
        await asyncio.sleep(0.02)
    engine.submit(MembershipChange("f1", add=("AB2",)))
    for i in range(5):
        engine.submit(MembershipChange(f"b{i}", add=("AB1",)))
    assert (await harness.states("f1"))["AB1"].state is State.SENDING

    # Fenced: nothing is held any more, and the engine lets go of everything at once.
    ownership.owned.clear()
    assert engine.abandon() == 7
    assert engine.pending_writes == 0 and engine.buffered == 0
    while engine.segments():  # the request in flight is cancelled: it ends at once
        assert time.monotonic() < deadline, f"a request still runs for {engine.segments()}"
        await asyncio.sleep(0.02)

    # Past the next write slots: nothing more was sent or recorded. The
    # journal keeps each pair as it stood, for the new owners (the batch in flight is resent
    # by them under its key).
    await asyncio.sleep(2.5)
    assert len(harness.client.bulk_calls) == 1
    assert (await harness.states("f1"))["AB1"].state is State.SENDING
    assert (await harness.states("f1"))["AB2"].state is State.QUEUED
    for i in range(5):
        assert (await harness.states(f"b{i}"))["AB1"].state is State.QUEUED
    assert harness.observer.max_inflight_per_contact <= 1

    # The engine goes on: segments owned again take new work, within the contact's limit.
    await emulator.configure({"faults": {"bulk": {"hang_rate": 0.0}}})
    ownership.owned.add("AB2")
    engine.submit(MembershipChange("f2", add=("AB2",)))
    deadline = time.monotonic() + 10
    while (await harness.states("f2"))["AB2"].state is not State.WRITTEN:
        assert time.monotonic() < deadline, await harness.states("f2")
        await asyncio.sleep(0.05)
    assert engine.pending_writes == 0
