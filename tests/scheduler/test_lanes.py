"""Live and bulk lanes (issue 21): batch order, which batch goes first, the read share."""

from __future__ import annotations

import asyncio

import pytest

from daemon.store.memory import MemoryStore
from scheduler.accumulator import Accumulator, BatchingPolicy
from scheduler.buffer import CoalescingBuffer, ContactGate
from scheduler.ledger import Ledger
from scheduler.model import Intent, Lane, MembershipChange, State
from scheduler.observer import EngineObserver
from scheduler.ownership import OwnEverything
from scheduler.validation import ReadLanePolicy, ValidationPolicy
from scheduler.waiters import Waiters
from tests.scheduler.conftest import MakeEngine
from tests.support.emulator import EmulatorControl

ADD, REMOVE = Intent.ADD, Intent.REMOVE


def buffer(max_size: int = 4, linger_s: float = 1.0) -> CoalescingBuffer[str]:
    return CoalescingBuffer(min_size=1, max_size=max_size, linger_s=linger_s)


def test_a_batch_takes_retries_then_live_then_bulk_and_bulk_fills_what_live_leaves():
    b = buffer(max_size=4)
    b.add("s", "b1", 1.0, Lane.BULK)
    b.add("s", "b2", 2.0, Lane.BULK)
    b.add("s", "b3", 3.0, Lane.BULK)
    b.add("s", "l1", 4.0, Lane.LIVE)
    b.add_retry("s", ["r1"], Lane.BULK)
    assert b.take_entries("s") == [
        ("r1", None, None),
        ("l1", 4.0, Lane.LIVE),
        ("b1", 1.0, Lane.BULK),
        ("b2", 2.0, Lane.BULK),
    ]
    assert b.take_entries("s") == [("b3", 3.0, Lane.BULK)]
    assert len(b) == 0


def test_a_due_segment_holding_live_ids_goes_before_older_bulk_work():
    b = buffer(max_size=2, linger_s=1.0)
    # Both full (due at once); the bulk-only one holds the older ids.
    b.add("bulk-only", "b1", 1.0, Lane.BULK)
    b.add("bulk-only", "b2", 2.0, Lane.BULK)
    b.add("mixed", "b3", 3.0, Lane.BULK)
    b.add("mixed", "l1", 9.0, Lane.LIVE)
    assert b.pick(10.0, spare_capacity=False) == "mixed"
    b.take("mixed")
    assert b.pick(10.0, spare_capacity=False) == "bulk-only"


def test_among_live_segments_the_oldest_live_id_goes_first_and_undue_ones_wait():
    b = buffer(max_size=10, linger_s=1.0)
    b.add("young", "l2", 9.5, Lane.LIVE)
    b.add("old", "l1", 8.0, Lane.LIVE)
    b.add("waiting", "l3", 9.9, Lane.LIVE)
    # At 10.0 "young" (9.5) has not lingered its second yet: only "old" is due.
    assert b.pick(10.0, spare_capacity=False) == "old"
    assert b.pick(10.6, spare_capacity=False) == "old"
    b.take("old")
    assert b.pick(10.6, spare_capacity=False) == "young"


def test_without_live_ids_the_oldest_due_segment_goes_first_as_before():
    b = buffer(max_size=10, linger_s=1.0)
    b.add("a", "x", 5.0, Lane.BULK)
    b.add("b", "y", 3.0, Lane.BULK)
    assert b.pick(10.0, spare_capacity=False) == "b"


def test_a_queued_id_moves_lanes_keeping_its_time():
    b = buffer()
    b.add("s", "c", 1.0, Lane.BULK)
    assert not b.add("s", "c", 2.0, Lane.LIVE)  # coalesced: the lane moves explicitly
    assert b.lane_of("s", "c") is Lane.BULK
    assert b.set_lane("s", "c", Lane.LIVE)
    assert b.lane_of("s", "c") is Lane.LIVE
    assert b.entry("s", "c") == 1.0
    assert not b.set_lane("s", "absent", Lane.LIVE)
    assert b.depth_by_lane() == {Lane.LIVE: 1, Lane.BULK: 0}


def test_the_contact_gate_keeps_a_parked_assignments_lane():
    gate: ContactGate[str] = ContactGate(1)
    assert gate.admit("c", "s1", 1.0, Lane.LIVE)
    assert not gate.admit("c", "s2", 2.0, Lane.BULK)
    assert gate.parked_lane("c", "s2") is Lane.BULK
    assert gate.release("c") == ("s2", 2.0, Lane.BULK)


async def test_a_released_parked_bulk_pair_is_queued_in_the_bulk_lane():
    accumulator = Accumulator(BatchingPolicy(max_inflight_per_contact=1))
    key = ("s2", ADD)
    assert accumulator.admit("c", ("s1", ADD), 1.0, Lane.LIVE)
    assert not accumulator.admit("c", key, 2.0, Lane.BULK)
    assert accumulator.lane_of("c", key) is Lane.BULK
    accumulator.set_lane("c", key, Lane.LIVE)  # a live change joined it while parked
    assert accumulator.lane_of("c", key) is Lane.LIVE
    accumulator.set_lane("c", key, Lane.BULK)
    accumulator.release("c")
    assert accumulator.buffer.lane_of(key, "c") is Lane.BULK


def test_the_read_share_must_be_below_one():
    with pytest.raises(ValueError, match="bulk_share_min"):
        ReadLanePolicy(bulk_share_min=1.0)
    with pytest.raises(ValueError, match="bulk_share_min"):
        ReadLanePolicy(bulk_share_min=-0.1)
    assert ReadLanePolicy(0.2).credit_per_live_read == pytest.approx(0.25)


async def test_a_live_change_joining_queued_bulk_work_moves_it_to_the_live_lane(
    make_engine: MakeEngine,
):
    # A long linger keeps the pair queued while the live change arrives.
    harness = await make_engine(batching=BatchingPolicy(linger_s=30.0, min_size=200))
    engine = harness.engine
    engine.submit(MembershipChange("c1", ("VIP",), lane=Lane.BULK))
    [queued] = await harness.store.contact("c1")
    assert (queued.state, queued.lane) == (State.QUEUED, Lane.BULK)
    result = engine.submit(MembershipChange("c1", ("VIP",)))
    assert result.joined == 1
    [joined] = await harness.store.contact("c1")
    assert (joined.state, joined.lane) == (State.QUEUED, Lane.LIVE)
    # A bulk change never moves live work back.
    engine.submit(MembershipChange("c1", ("VIP",), lane=Lane.BULK))
    [kept] = await harness.store.contact("c1")
    assert kept.lane is Lane.LIVE


async def test_bulk_keeps_its_read_share_under_a_live_flood_and_live_goes_first(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    # Nothing is indexed (no refresh within the window): every pair is read again at every
    # interval, so both lanes always have far more reads due than the read rate sends.
    await emulator.configure(
        {
            "indexing": {"median_s": 0.2, "p99_s": 0.4, "stall_fraction": 1.0},
            "limits": {"read": {"rate": 1000, "burst": 1000}},
        }
    )
    share = 0.2
    harness = await make_engine(
        validation=ValidationPolicy(
            interval_s=0.5, window_s=600.0, refresh_min_interval_s=3600.0, deadline_s=600.0
        ),
        batching=BatchingPolicy(linger_s=0.05),
        read_rps=60.0,
        read_lanes=ReadLanePolicy(bulk_share_min=share),
        write_rps=50.0,
    )
    engine = harness.engine
    for i in range(150):
        engine.submit(MembershipChange(f"bulk-{i}", ("share-bulk",), lane=Lane.BULK))
        engine.submit(MembershipChange(f"live-{i}", ("share-live",)))
    poller = harness.poller
    assert poller is not None
    # Wait until both lanes are written and waiting for reads, then count a stretch of reads.
    for _ in range(400):
        lanes = poller.backlog().lanes
        if lanes[Lane.LIVE].waiting >= 100 and lanes[Lane.BULK].waiting >= 100:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"lanes never both waited: {poller.backlog()}")
    start = len(harness.client.reads)
    for _ in range(1200):  # a deadline: a regression fails here instead of hanging
        if len(harness.client.reads) >= start + 240:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"only {len(harness.client.reads) - start} reads of 240 were sent")
    window = harness.client.reads[start : start + 240]
    bulk = sum(segment == "share-bulk" for segment, _, _ in window)
    live = len(window) - bulk
    # Live goes first, but bulk gets its share (slack for reads in flight at either end).
    assert bulk >= share * len(window) * 0.8, (bulk, live)
    assert live >= (1 - share) * len(window) * 0.8, (bulk, live)
    assert harness.observer.reads_by_lane[Lane.BULK] > 0


async def test_without_live_reads_due_bulk_gets_every_read(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await emulator.configure(
        {
            "indexing": {"median_s": 0.2, "p99_s": 0.4, "stall_fraction": 0.0},
            "limits": {"read": {"rate": 1000, "burst": 1000}},
        }
    )
    harness = await make_engine(
        validation=ValidationPolicy(interval_s=0.5, window_s=60.0, deadline_s=600.0),
        batching=BatchingPolicy(linger_s=0.05),
        read_rps=100.0,
        read_lanes=ReadLanePolicy(bulk_share_min=0.0),
    )
    contacts = [f"alone-{i}" for i in range(60)]
    for contact in contacts:
        harness.engine.submit(MembershipChange(contact, ("only-bulk",), lane=Lane.BULK))
    for contact in contacts:
        [done] = await harness.engine.wait(contact, ("only-bulk",), 30)
        assert (done.state, done.lane) == (State.ACTIVE, Lane.BULK)


# ---- a live pair never waits for its contact's queued bulk work (review of issue 21, 1) ----


def backfilled(contacts: int, segments: tuple[str, ...] = ("A", "B", "C")) -> Accumulator:
    """An accumulator holding a bulk backfill: every contact in every segment (limit 3)."""
    accumulator = Accumulator(BatchingPolicy(max_size=200, min_size=1, linger_s=0.0))
    t = 1000.0
    for segment in segments:
        for index in range(contacts):
            t += 0.001
            contact_id = f"c{index}"
            if accumulator.admit(contact_id, (segment, ADD), t, Lane.BULK):
                accumulator.enqueue((segment, ADD), contact_id, t, Lane.BULK)
    return accumulator


def test_a_live_change_of_a_backfilled_contact_goes_before_the_backfill_is_written():
    accumulator = backfilled(1000)
    last = "c999"
    assert accumulator.gate.inflight(last) == 3
    assert accumulator.admit(last, ("VIP", ADD), 5000.0, Lane.LIVE)
    accumulator.enqueue(("VIP", ADD), last, 5000.0, Lane.LIVE)
    # One of its bulk pairs gave its slot up and waits, first in line, still queued for the
    # ledger (its time and lane kept); the slots held stay at the limit.
    assert accumulator.gate.inflight(last) == 3
    assert accumulator.gate.parked == 1
    [(segment, intent)] = accumulator.gate.parked_batch_keys()
    assert accumulator.lane_of(last, (segment, intent)) is Lane.BULK
    queued = accumulator.queued(last, segment)
    assert queued is not None and queued[0] is ADD
    assert queued[1] == pytest.approx(1000.0 + 0.001 * (("A", "B", "C").index(segment) + 1) * 1000)
    # The live pair's batch goes first, before any of the 3,000 bulk ids is written.
    key = accumulator.pick(6000.0, spare_capacity=False, draining=False, skip=None)
    assert key == ("VIP", ADD)
    assert [contact_id for contact_id, _, _ in accumulator.take(key)] == [last]
    # Once it is written its slot goes to the bulk pair that gave it up, in the bulk lane.
    accumulator.release(last)
    assert accumulator.gate.parked == 0
    assert accumulator.buffer.lane_of((segment, intent), last) is Lane.BULK


def test_bulk_work_already_in_a_batch_keeps_its_slot_and_the_live_pair_waits():
    accumulator = Accumulator(BatchingPolicy(max_size=200, min_size=1, linger_s=0.0))
    for segment in ("A", "B", "C"):
        assert accumulator.admit("c", (segment, ADD), 1.0, Lane.BULK)
        accumulator.enqueue((segment, ADD), "c", 1.0, Lane.BULK)
        accumulator.take((segment, ADD))  # in a batch: in flight, its slot held
    assert not accumulator.admit("c", ("VIP", ADD), 2.0, Lane.LIVE)
    assert accumulator.gate.parked == 1
    accumulator.release("c")
    assert accumulator.buffer.lane_of(("VIP", ADD), "c") is Lane.LIVE


def test_parked_pairs_of_a_contact_are_released_live_first():
    gate: ContactGate[str] = ContactGate(1)
    assert gate.admit("c", "s0", 0.0, Lane.BULK)
    assert not gate.admit("c", "b1", 1.0, Lane.BULK)
    assert not gate.admit("c", "b2", 2.0, Lane.BULK)
    assert not gate.admit("c", "l1", 3.0, Lane.LIVE)
    assert not gate.admit("c", "l2", 4.0, Lane.LIVE)
    gate.set_lane("c", "b2", Lane.LIVE)  # a live change joined it while parked
    released = [gate.release("c") for _ in range(4)]
    # Live first, each lane in arrival order: b2 arrived before l1 and is live now.
    assert [entry[0] for entry in released if entry is not None] == ["b2", "l1", "l2", "b1"]


def test_a_parked_bulk_pair_moved_to_live_takes_the_slot_of_queued_bulk_work():
    accumulator = Accumulator(BatchingPolicy(max_size=200, min_size=1, linger_s=0.0))
    for segment in ("A", "B", "C", "D"):
        if accumulator.admit("c", (segment, ADD), 1.0, Lane.BULK):
            accumulator.enqueue((segment, ADD), "c", 1.0, Lane.BULK)
    assert accumulator.gate.is_parked("c", ("D", ADD))
    accumulator.set_lane("c", ("D", ADD), Lane.LIVE)
    assert accumulator.buffer.lane_of(("D", ADD), "c") is Lane.LIVE
    assert accumulator.gate.parked == 1
    assert accumulator.gate.inflight("c") == 3


async def test_a_live_change_of_a_contact_with_queued_bulk_work_is_queued_not_parked(
    make_engine: MakeEngine,
):
    harness = await make_engine(batching=BatchingPolicy(linger_s=30.0, min_size=200))
    engine = harness.engine
    engine.submit(MembershipChange("c1", ("A", "B", "C", "D"), lane=Lane.BULK))
    engine.submit(MembershipChange("c1", ("VIP",)))
    accumulator = engine._accumulator  # what is queued and what is parked
    assert accumulator.buffer.lane_of(("VIP", ADD), "c1") is Lane.LIVE
    assert accumulator.gate.parked == 2
    rows = {row.segment_id: row for row in await harness.store.contact("c1")}
    assert {segment: (row.state, row.lane) for segment, row in rows.items()} == {
        "A": (State.QUEUED, Lane.BULK), "B": (State.QUEUED, Lane.BULK),
        "C": (State.QUEUED, Lane.BULK), "D": (State.QUEUED, Lane.BULK),
        "VIP": (State.QUEUED, Lane.LIVE),
    }  # fmt: skip


# ---- changes waiting behind a request in flight (review of issue 21, 3 and 4) ----------------


def ledger_with_store() -> tuple[Ledger, Accumulator, MemoryStore]:
    """A ledger over a real accumulator and memory journal; the test plays the sender."""
    store = MemoryStore()
    accumulator = Accumulator(BatchingPolicy())
    ledger = Ledger(
        store=store, accumulator=accumulator, waiters=Waiters(), observer=EngineObserver(),
        ownership=OwnEverything(), wall_clock=lambda: 1000.0,
    )  # fmt: skip
    return ledger, accumulator, store


def send(ledger: Ledger, accumulator: Accumulator, batch_key: tuple[str, Intent]) -> None:
    """What the sender does with a batch: take it, then mark it sending (in flight)."""
    ids = ledger.take_for_batch(batch_key, accumulator.take(batch_key))
    ledger.sending(batch_key, ids)


async def test_a_live_change_joining_a_change_waiting_behind_a_request_is_journaled_live():
    ledger, accumulator, store = ledger_with_store()
    ledger.queue_new("c", "S", ADD, 0.0, 1.0, Lane.BULK)
    send(ledger, accumulator, ("S", ADD))
    ledger.supersede(("c", "S"), REMOVE, 0.0, 2.0, Lane.BULK)  # waits for the ADD's outcome
    ledger.renew(("c", "S"), 0.0, 3.0, Lane.LIVE)
    # The journal holds the waiting change: after a crash it is what recovery queues.
    [row] = await store.contact("c")
    assert (row.state, row.intent, row.lane) == (State.QUEUED, REMOVE, Lane.LIVE)
    assert row.occurred_at == 3.0


async def test_a_bulk_change_back_to_a_live_request_in_flight_leaves_it_live():
    ledger, accumulator, store = ledger_with_store()
    ledger.queue_new("c", "S", ADD, 0.0, 1.0, Lane.LIVE)
    send(ledger, accumulator, ("S", ADD))
    # An import removes the pair (it waits for the ADD), then adds it again: nothing more is
    # sent, and the live ADD in flight (a ?wait= caller may wait for it) stays live.
    ledger.supersede(("c", "S"), REMOVE, 0.0, 2.0, Lane.BULK)
    ledger.supersede(("c", "S"), ADD, 0.0, 3.0, Lane.BULK)
    live = ledger.live(("c", "S"))
    assert live is not None and (live.state, live.lane) == (State.SENDING, Lane.LIVE)
    [row] = await store.contact("c")
    assert (row.state, row.intent, row.lane) == (State.SENDING, ADD, Lane.LIVE)
    # A live change back to a bulk request in flight moves it to live.
    ledger.queue_new("d", "S", ADD, 0.0, 1.0, Lane.BULK)
    send(ledger, accumulator, ("S", ADD))
    ledger.supersede(("d", "S"), REMOVE, 0.0, 2.0, Lane.BULK)
    ledger.supersede(("d", "S"), ADD, 0.0, 3.0, Lane.LIVE)
    moved = ledger.live(("d", "S"))
    assert moved is not None and moved.lane is Lane.LIVE


# ---- bulk keeps its share of writes under live traffic (review of issue 21, 2) ---------------


def flood(share: float, batches: int) -> dict[str, int]:
    """Live ids over 20 segments, each due every pick, against a bulk backlog (2,500 batches)."""
    b: CoalescingBuffer[str] = CoalescingBuffer(
        min_size=1, max_size=20, linger_s=1.0, bulk_share_min=share
    )
    for segment in range(5):
        for index in range(10_000):
            b.add(f"bulk-{segment}", f"b{index}", 0.0, Lane.BULK)
    sent = {"live": 0, "bulk": 0}
    now = 100.0
    for batch in range(batches):
        now += 0.1
        for segment in range(20):
            b.add(f"live-{segment}", f"l{batch}", now - 2.0, Lane.LIVE)  # lingered: due
        key = b.pick(now, spare_capacity=False)
        assert key is not None
        b.take(key)
        sent[key.split("-")[0]] += 1
    return sent


@pytest.mark.parametrize("share", [0.0, 0.1, 0.2, 0.5])
def test_bulk_only_segments_get_their_share_of_batches_under_a_live_flood(share: float):
    sent = flood(share, 1000)
    assert sent["bulk"] == pytest.approx(share * 1000, abs=1), sent


def test_without_live_segments_due_bulk_gets_every_batch_and_banks_no_credit():
    b = buffer(max_size=2, linger_s=1.0)
    for index in range(10):
        b.add("bulk", f"b{index}", 0.0, Lane.BULK)
    for _ in range(5):
        assert b.pick(10.0, spare_capacity=False) == "bulk"
        b.take("bulk")
    # Live alone afterwards: it goes, whatever bulk did before.
    b.add("live", "l1", 9.0, Lane.LIVE)
    b.add("bulk", "b99", 9.0, Lane.BULK)
    assert b.pick(10.0, spare_capacity=False) == "live"


def test_among_bulk_only_segments_retries_go_first_as_before_lanes():
    b = buffer(max_size=4, linger_s=1.0)
    b.add("old-bulk", "b1", 1.0, Lane.BULK)
    b.add_retry("retrying-bulk", ["r1"], Lane.BULK)
    assert b.pick(10.0, spare_capacity=False) == "retrying-bulk"


# ---- lanes of retry and parked ids, history steps (review of issue 21, 5) -------------------


def test_a_live_pairs_retry_counts_as_live_and_goes_before_fresh_live_ids():
    b = buffer(max_size=10, linger_s=0.5)
    b.add("fresh-live", "a", 10.0, Lane.LIVE)
    b.add_retry("retry-live", ["r"], Lane.LIVE)
    b.add_retry("retry-bulk", ["q"], Lane.BULK)
    assert b.pick(20.0, spare_capacity=False) == "retry-live"
    b.take("retry-live")
    assert b.pick(20.0, spare_capacity=False) == "fresh-live"


def test_a_retry_id_moved_to_live_makes_its_batch_key_live_and_is_counted_so():
    b = buffer(max_size=10, linger_s=0.5)
    b.add("fresh-live", "a", 10.0, Lane.LIVE)
    b.add_retry("retrying", ["r"], Lane.BULK)
    assert b.depth_by_lane() == {Lane.LIVE: 1, Lane.BULK: 1}
    assert b.set_lane("retrying", "r", Lane.LIVE)
    assert b.depth_by_lane() == {Lane.LIVE: 2, Lane.BULK: 0}
    assert b.pick(20.0, spare_capacity=False) == "retrying"


async def test_a_live_change_joining_a_retrying_bulk_pair_moves_its_queued_retry_to_live():
    ledger, accumulator, store = ledger_with_store()
    ledger.queue_new("c", "S", ADD, 0.0, 1.0, Lane.BULK)
    send(ledger, accumulator, ("S", ADD))
    ledger.retrying(("S", ADD), ["c"])
    accumulator.add_retries(("S", ADD), ["c"], Lane.BULK)  # its backoff has passed
    ledger.renew(("c", "S"), 0.0, 3.0, Lane.LIVE)
    assert accumulator.buffer.depth_by_lane() == {Lane.LIVE: 1, Lane.BULK: 0}
    # Re-journaled in the live lane, without a second copy of its last history step.
    [row] = await store.contact("c")
    assert row.lane is Lane.LIVE
    assert row.history is not None and len(row.history) == len(set(row.history)), row.history
