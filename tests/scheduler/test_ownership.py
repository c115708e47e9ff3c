"""Segments owned elsewhere, handed over and taken over: the engine's side of a cluster."""

from __future__ import annotations

import asyncio
import time

from scheduler.engine import BatchingPolicy
from scheduler.model import Assignment, Intent, MembershipChange, State
from scheduler.ownership import ForwardedChange
from tests.scheduler.conftest import MakeEngine
from tests.support.emulator import EmulatorControl


class Owned:
    """An ownership policy as the cluster sets it: segments owned, handed over, forwarded."""

    def __init__(self, owned: set[str]) -> None:
        self.owned = set(owned)
        self.releasing: set[str] = set()
        self.forwarded: list[ForwardedChange] = []

    def owns(self, segment_id: str) -> bool:
        return segment_id in self.owned and segment_id not in self.releasing

    def holds(self, segment_id: str) -> bool:
        return segment_id in self.owned

    def forward(self, change: ForwardedChange) -> None:
        self.forwarded.append(change)


async def test_changes_for_segments_owned_elsewhere_are_forwarded_not_batched(
    make_engine: MakeEngine,
):
    ownership = Owned({"MINE"})
    harness = await make_engine(ownership=ownership)
    result = harness.engine.submit(
        MembershipChange("c1", add=("MINE", "THEIRS"), remove=("GONE",), occurred_at=100.0)
    )
    assert result.queued == 3
    assert [(f.segment_id, f.intent) for f in ownership.forwarded] == [
        ("THEIRS", Intent.ADD),
        ("GONE", Intent.REMOVE),
    ]
    assert all(f.occurred_at == 100.0 for f in ownership.forwarded)
    assert harness.engine.pending_writes == 1  # only its own segment's work is held here
    # A change older than what the journal holds is stale here already: nothing is forwarded.
    newer = Assignment("c2", "THEIRS", received_at=1.0, updated_at=1.0, occurred_at=200.0)
    stale = harness.engine.submit(
        MembershipChange("c2", add=("THEIRS",), occurred_at=150.0), {"THEIRS": newer}
    )
    assert stale.stale == 1 and len(ownership.forwarded) == 2


async def test_a_handover_ends_requests_in_flight_and_lets_everything_else_go(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    # Writes of one segment hang for a while: its batch is in flight when the handover starts.
    # One bulk request a second: the ids that follow the first batch wait in the buffer.
    ownership = Owned({"OUT", "KEEP"})
    harness = await make_engine(
        write_rps=1.0,
        batching=BatchingPolicy(
            min_size=1, max_size=200, linger_s=0.05, max_inflight_per_contact=1
        ),
        ownership=ownership,
    )
    engine = harness.engine
    await emulator.configure({"faults": {"bulk": {"latency_ms": 600}}})
    engine.submit(MembershipChange("f1", add=("OUT",)))
    await asyncio.sleep(0.2)  # its batch is out
    # With one slot per contact, f1's second segment is parked behind the one in flight, and
    # fresh ids of the segment being handed over wait in its buffer.
    engine.submit(MembershipChange("f1", add=("KEEP",)))
    for i in range(5):
        engine.submit(MembershipChange(f"b{i}", add=("OUT",)))
    await asyncio.sleep(0.1)
    ownership.releasing.add("OUT")
    started = time.monotonic()
    let_go = await engine.release_segments({"OUT"}, budget_s=5.0)
    assert time.monotonic() - started > 0.1  # it waited for the answer to the batch in flight
    ownership.owned.discard("OUT")
    ownership.releasing.discard("OUT")
    assert let_go >= 5
    # The batch in flight was recorded as written here; the buffered ids stay queued in the
    # journal, for the next owner.
    states = {a.contact_id: a.state for a in await harness.store.failed()}
    assert states == {}
    assert (await harness.states("f1"))["OUT"].state is State.WRITTEN
    for i in range(5):
        assert (await harness.states(f"b{i}"))["OUT"].state is State.QUEUED
    assert "OUT" not in engine.segments()
    # f1's slot came free with the handover: its other segment goes out.
    deadline = time.monotonic() + 10
    while (await harness.states("f1"))["KEEP"].state is not State.WRITTEN:
        assert time.monotonic() < deadline, await harness.states("f1")
        await asyncio.sleep(0.05)
    assert engine.pending_writes == 0
    # Nothing of the handed-over segment is recorded from here on (its new owner's states win).
    engine.confirm([Assignment("f1", "OUT", state=State.VERIFYING)])
    assert (await harness.states("f1"))["OUT"].state is State.WRITTEN


async def test_segments_taken_over_are_resumed_from_the_journal_at_runtime(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    ownership = Owned(set())
    harness = await make_engine(ownership=ownership)
    engine = harness.engine
    now = time.time()
    # What the previous owner left: queued work, and a change forwarded to this instance.
    queued = [(f"t{i}", "TAKEN", now, "add", 0.0, "live") for i in range(30)]
    ownership.owned.add("TAKEN")
    engine.adopt([], [], queued)
    engine.submit_forwarded([ForwardedChange("t99", "TAKEN", Intent.ADD, 0.0, now)], {})
    deadline = time.monotonic() + 10
    while engine.pending_writes:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert len(await emulator.members("TAKEN")) == 31
    # A forwarded change older than what the owner holds is stale there.
    done = Assignment("t5", "TAKEN", state=State.ACTIVE, updated_at=now, occurred_at=now + 10)
    result = engine.submit_forwarded(
        [ForwardedChange("t5", "TAKEN", Intent.REMOVE, now + 5, now + 6)],
        {"t5": ({"TAKEN": done}, 0.0)},
    )
    assert result.stale == 1
