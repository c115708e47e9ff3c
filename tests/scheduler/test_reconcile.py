"""Drift reconcile in the engine: validation's reads first, newer work wins, pacing.

Engines run against the emulator process with a real HTTP client (tests/scheduler/conftest.py);
the reconciler reads the same memory journal the engine writes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from scheduler.accumulator import BatchingPolicy
from scheduler.model import Intent, MembershipChange, State
from scheduler.reconcile import ReconcilePolicy, Reconciler
from scheduler.validation import ReadBacklog, ValidationPolicy
from tests.scheduler.conftest import EngineHarness, MakeEngine
from tests.support.emulator import EmulatorControl
from tests.support.waits import until

FAST_VALIDATION = ValidationPolicy(interval_s=0.05, window_s=30.0, deadline_s=600.0)
QUICK_INDEXING = {"indexing": {"median_s": 0.1, "p99_s": 0.2, "stall_fraction": 0.0}}


class PassFigures:
    """What a reconciler reports besides the journal: reads by result, drift, passes ended."""

    def __init__(self) -> None:
        self.reads: Counter[str] = Counter()
        self.drift: list[tuple[Intent, bool]] = []
        self.ended: list[str] = []

    def record_reconcile_read(self, result: str) -> None:
        self.reads[result] += 1

    def record_drift(self, intent: Intent, requeued: bool) -> None:
        self.drift.append((intent, requeued))

    def record_pass(self, state: str, running: bool, at: float) -> None:
        if not running:
            self.ended.append(state)


def reconciler(
    harness: EngineHarness,
    figures: PassFigures,
    read_rps: float,
    name: str = "test",
    leads: Callable[[], bool] = lambda: True,
) -> Reconciler:
    assert harness.poller is not None
    return Reconciler(
        journal=harness.store,
        client=harness.client,
        reads=harness.poller,
        repairs=harness.engine,
        observer=figures,
        policy=ReconcilePolicy(interval_s=0.0, read_share=1.0, read_rps=read_rps),
        runner_name=name,
        leads=leads,
    )


async def settled(harness: EngineHarness, contacts: list[str], segment: str) -> None:
    for contact in contacts:
        harness.engine.submit(MembershipChange(contact, (segment,)))

    async def states() -> set[State]:
        return {a.state for c in contacts for a in await harness.store.contact(c)}

    await until(states, lambda s: s == {State.ACTIVE}, timeout_s=30, what="all active")


async def test_a_spare_read_waits_until_validation_has_no_read_due(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await emulator.configure(QUICK_INDEXING)
    harness = await make_engine(read_rps=4.0, validation=FAST_VALIDATION)
    poller = harness.poller
    assert poller is not None
    contacts = [f"sp-{i}" for i in range(12)]
    for contact in contacts:
        harness.engine.submit(MembershipChange(contact, ("SPARE",)))
    # Every pair written and most first reads due: a backlog of seconds at 4 reads/s.

    async def backlog() -> ReadBacklog:
        return poller.backlog()

    await until(
        backlog, lambda b: b.waiting >= 8 and b.oldest_wait_s > 0, timeout_s=30, what="reads due"
    )
    await poller.spare_read()
    # Granted only once validation had sent every read that was due.
    sent = sum(harness.observer.reads_by_lane.values()) + poller.backlog().reading
    assert sent >= len(contacts), (sent, harness.observer.reads_by_lane)


async def test_a_pass_leaves_a_pair_with_newer_work_alone_and_repairs_the_rest(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await emulator.configure(QUICK_INDEXING)
    # A linger of two seconds: a change waits that long in the buffer.
    harness = await make_engine(
        validation=FAST_VALIDATION, batching=BatchingPolicy(min_size=50, linger_s=2.0)
    )
    await settled(harness, ["nw-1", "nw-2", "nw-3"], "NEWER")
    await emulator.edit_member("NEWER", "nw-1", member=False)
    await emulator.edit_member("NEWER", "nw-2", member=False)
    # A newer change for nw-1 waits in the buffer while the pass runs.
    harness.engine.submit(MembershipChange("nw-1", remove=("NEWER",)))
    figures = PassFigures()
    rec = reconciler(harness, figures, read_rps=50.0)
    started = await rec.begin()
    await rec.start()
    try:
        done = await until(
            lambda: rec.get(started.id),
            lambda p: p is not None and p.state != "running",
            timeout_s=30,
            what="the pass",
        )
    finally:
        await rec.stop()
    assert done is not None
    # nw-1 holds its newer change (queued, not a tracked membership): not read, not repaired.
    assert (done.read, done.in_step, done.drifted, done.requeued) == (2, 1, 1, 1), done
    assert figures.reads == Counter({"in_step": 1, "drift": 1})
    assert figures.drift == [(Intent.ADD, True)] and figures.ended == ["done"]
    # The newer change won: nw-1 is removed, nw-2 repaired.

    async def states() -> tuple[State, State]:
        [one] = await harness.store.contact("nw-1")
        [two] = await harness.store.contact("nw-2")
        return one.state, two.state

    await until(
        states, lambda s: s == (State.REMOVED, State.ACTIVE), timeout_s=30, what="both ended"
    )


async def test_a_repair_keeps_its_place_in_the_order_and_a_later_change_still_wins(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await emulator.configure(QUICK_INDEXING)
    harness = await make_engine(validation=FAST_VALIDATION)
    # A change with no time of its own from the CRM: its arrival orders it.
    await settled(harness, ["or-1"], "ORDER")
    [held] = await harness.store.contact("or-1")
    assert held.occurred_at == 0.0
    await emulator.edit_member("ORDER", "or-1", member=False)
    assert harness.engine.repair(held)
    # The CRM's removal made after the add, delivered after the repair: newer, so it wins.
    removal = MembershipChange("or-1", remove=("ORDER",), occurred_at=held.received_at + 0.001)
    result = harness.engine.submit(removal)
    assert (result.stale, result.queued) == (0, 1), result

    async def state() -> State:
        [pair] = await harness.store.contact("or-1")
        return pair.state

    await until(state, lambda s: s is State.REMOVED, timeout_s=30, what="removed")


async def test_a_process_that_lost_the_lead_shows_the_pass_as_the_journal_has_it(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await emulator.configure(QUICK_INDEXING)
    harness = await make_engine(validation=FAST_VALIDATION)
    await settled(harness, [f"ld-{i}" for i in range(8)], "LEAD")
    first_leads = True
    first = reconciler(harness, PassFigures(), 4.0, "first", lambda: first_leads)
    second = reconciler(harness, PassFigures(), 4.0, "second", lambda: not first_leads)
    started = await first.begin()
    await first.start()
    await second.start()
    try:
        await until(
            lambda: first.get(started.id),
            lambda p: p is not None and p.read >= 2,
            timeout_s=30,
            what="two reads by the first",
        )
        first_leads = False  # shard 0 moved: the second takes the pass over
        done = await until(
            lambda: second.get(started.id),
            lambda p: p is not None and p.state != "running",
            timeout_s=30,
            what="the second to finish",
        )
        seen = await first.get(started.id)
    finally:
        await first.stop()
        await second.stop()
    assert done is not None and seen is not None
    assert (done.state, done.read, done.runner) == ("done", 8, "second"), done
    assert (seen.state, seen.read) == ("done", 8), seen


async def test_a_scheduled_pass_is_spread_over_its_interval_within_the_share():
    policy = ReconcilePolicy(interval_s=1000.0, read_share=0.1, read_rps=50.0)
    assert policy.share_rate == 5.0
    assert policy.rate(2000, scheduled=True) == 2.0  # 2,000 pairs over 1,000 s
    assert policy.rate(1_000_000, scheduled=True) == 5.0  # never above the share
    assert policy.rate(2000, scheduled=False) == 5.0  # started by hand: the whole share
    assert policy.rate(1, scheduled=True) == 1 / 60  # a handful: not thinner than 1 a minute
