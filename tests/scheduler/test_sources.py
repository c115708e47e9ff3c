"""Where a change came from: journaled with the pair it starts, kept by everything after.

The engine keeps no source per queued pair (a million of them are buffer entries): the rows
that start a pair carry it, and the journal keeps it through the pair's later transitions.
"""

from __future__ import annotations

import dataclasses

from scheduler.model import Assignment, FailureReason, Intent, MembershipChange, State
from tests.scheduler.conftest import MakeEngine
from tests.scheduler.test_ownership import Owned
from tests.scheduler.test_removals import FAST_BATCHES, FAST_VALIDATION, quick_indexing, settle
from tests.support.emulator import EmulatorControl
from tests.support.waits import until


async def test_a_pair_keeps_the_source_of_the_change_that_started_it(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await quick_indexing(emulator)
    harness = await make_engine(validation=FAST_VALIDATION, batching=FAST_BATCHES)
    harness.engine.submit(MembershipChange("c-src", add=("A", "B"), source="crm"))
    # A change joining the work in progress starts nothing: the pair stays the first's.
    harness.engine.submit(MembershipChange("c-src", add=("A",), source="hubspot"))
    await settle(harness, "c-src", ["A", "B"])
    # Every transition after the start named no source: the journal keeps the start's.
    journaled = await harness.states("c-src")
    assert {s: (a.state, a.source) for s, a in journaled.items()} == {
        "A": (State.ACTIVE, "crm"),
        "B": (State.ACTIVE, "crm"),
    }


async def test_a_superseding_change_starts_the_pair_again_from_its_own_source(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await quick_indexing(emulator)
    await emulator.configure({"faults": {"bulk": {"latency_ms": 800}}})
    harness = await make_engine(validation=FAST_VALIDATION, batching=FAST_BATCHES)
    # Queued work superseded before it is sent.
    harness.engine.submit(MembershipChange("c-queued", add=("Q",), source="crm"))
    harness.engine.submit(MembershipChange("c-queued", remove=("Q",), source="mappings"))
    # A request in flight: the removal waits for it, journaled as the waiting change.
    harness.engine.submit(MembershipChange("c-flight", add=("F",), source="crm"))

    async def bulk_calls() -> int:
        return len(harness.client.bulk_calls)

    await until(bulk_calls, bool, timeout_s=10, what="the add sent", interval_s=0.02)
    harness.engine.submit(MembershipChange("c-flight", remove=("F",), source="hubspot"))
    [waiting] = await harness.store.contact("c-flight")
    assert (waiting.state, waiting.intent, waiting.source) == (
        State.QUEUED,
        Intent.REMOVE,
        "hubspot",
    )
    await settle(harness, "c-queued", ["Q"])
    await settle(harness, "c-flight", ["F"])
    [queued] = await harness.store.contact("c-queued")
    [flight] = await harness.store.contact("c-flight")
    assert (queued.state, queued.source) == (State.REMOVED, "mappings")
    assert (flight.state, flight.source) == (State.REMOVED, "hubspot")


async def test_forwarded_changes_dead_letters_and_repairs_carry_their_source(
    make_engine: MakeEngine,
):
    ownership = Owned({"MINE"})
    harness = await make_engine(ownership=ownership)
    harness.engine.submit(MembershipChange("c1", add=("THEIRS",), source="crm"))
    invalid = MembershipChange("c2", add=("THEIRS", "MINE"), source="hubspot")
    harness.engine.dead_letter(invalid, FailureReason.INVALID_CONTACT_ID, "not an id")
    # A drift found in a membership the journal holds from `crm`: repaired from `crm`.
    held = Assignment(
        "c3", "THEIRS", state=State.ACTIVE, received_at=1.0, updated_at=2.0, source="crm"
    )
    assert harness.engine.repair(held)
    assert [(f.contact_id, f.source, f.repair) for f in ownership.forwarded] == [
        ("c1", "crm", False),
        ("c2", "hubspot", False),
        ("c3", "crm", True),
    ]
    [dead] = await harness.store.contact("c2")
    assert (dead.segment_id, dead.state, dead.source) == ("MINE", State.FAILED, "hubspot")
    # The owner journals a forwarded change with its source, a dead letter too.
    harness.engine.submit_forwarded(
        [
            dataclasses.replace(ownership.forwarded[0], segment_id="MINE"),
            dataclasses.replace(ownership.forwarded[1], contact_id="c4", segment_id="MINE"),
        ],
        {},
    )
    assert [a.source for a in await harness.store.contact("c1")] == ["crm"]
    [forwarded_dead] = await harness.store.contact("c4")
    assert (forwarded_dead.state, forwarded_dead.source) == (State.FAILED, "hubspot")
