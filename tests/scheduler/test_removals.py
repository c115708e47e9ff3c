"""Removals, mirror changes and ordering, against the emulator process: the engine in process."""

from __future__ import annotations

import asyncio
import time

from daemon.store.memory import MemoryStore
from scheduler.engine import BatchingPolicy
from scheduler.model import Assignment, Intent, MembershipChange, State
from scheduler.validation import ValidationPolicy
from tests.scheduler.conftest import EngineHarness, MakeEngine
from tests.support.emulator import EmulatorControl

FAST_BATCHES = BatchingPolicy(linger_s=0.1)
FAST_VALIDATION = ValidationPolicy(
    interval_s=0.3, window_s=3.0, cache_ttl_s=60.0, refresh_min_interval_s=3.0, deadline_s=20.0
)


async def quick_indexing(emulator: EmulatorControl) -> None:
    await emulator.configure({"indexing": {"median_s": 0.2, "p99_s": 0.4, "stall_fraction": 0.0}})


async def settle(
    harness: EngineHarness, contact: str, segments: list[str]
) -> dict[str, Assignment]:
    """Wait until every named pair has ended; its final assignments by segment."""
    ended = await harness.engine.wait(contact, segments, 30)
    return {a.segment_id: a for a in ended}


async def history(harness: EngineHarness, contact: str) -> dict[str, Assignment]:
    return {a.segment_id: a for a in await harness.store.contact(contact)}


async def mirrored_at(store: MemoryStore, contact: str) -> float:
    """The contact's newest mirror time, as the intake reads it (with the histories)."""
    return (await store.histories([contact]))[contact].mirrored_at


async def member(harness: EngineHarness, segment: str, contact: str) -> bool:
    """Whether CXone's read shows the membership now."""
    return (await harness.client.client.is_member(segment, contact)).is_member


async def test_add_then_remove_then_add_again_ends_as_the_last_change_said(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await quick_indexing(emulator)
    harness = await make_engine(validation=FAST_VALIDATION, batching=FAST_BATCHES)
    engine = harness.engine
    engine.submit(MembershipChange("c-arc", add=("arc",)))
    assert (await settle(harness, "c-arc", ["arc"]))["arc"].state is State.ACTIVE
    result = engine.submit(MembershipChange("c-arc", remove=("arc",)))
    assert result.queued == 1
    removed = (await settle(harness, "c-arc", ["arc"]))["arc"]
    assert (removed.state, removed.intent) == (State.REMOVED, Intent.REMOVE)
    engine.submit(MembershipChange("c-arc", add=("arc",)))
    again = (await settle(harness, "c-arc", ["arc"]))["arc"]
    assert (again.state, again.intent) == (State.ACTIVE, Intent.ADD)
    counters = await emulator.counters()
    assert counters["rate_limited"]["bulk"] == 0
    assert len(harness.client.bulk_calls) == 2
    assert len(harness.client.remove_calls) == 1


async def test_removing_a_pair_that_was_never_a_member_ends_removed_without_retries(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await quick_indexing(emulator)
    harness = await make_engine(validation=FAST_VALIDATION, batching=FAST_BATCHES)
    harness.engine.submit(MembershipChange("c-never", remove=("never-seg",)))
    done = (await settle(harness, "c-never", ["never-seg"]))["never-seg"]
    assert (done.state, done.attempts) == (State.REMOVED, 1)
    assert harness.observer.retries == []


async def test_an_add_and_its_removal_in_one_linger_window_send_no_add(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await quick_indexing(emulator)
    harness = await make_engine(validation=FAST_VALIDATION, batching=BatchingPolicy(linger_s=0.5))
    harness.engine.submit(MembershipChange("c-flip", add=("flip",)))
    harness.engine.submit(MembershipChange("c-flip", remove=("flip",)))
    done = (await settle(harness, "c-flip", ["flip"]))["flip"]
    assert (done.state, done.intent) == (State.REMOVED, Intent.REMOVE)
    assert harness.client.bulk_calls == []  # the queued add was never sent


async def test_an_older_removal_after_a_newer_add_is_stale_and_keeps_the_membership(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await quick_indexing(emulator)
    harness = await make_engine(validation=FAST_VALIDATION, batching=FAST_BATCHES)
    now = time.time()
    harness.engine.submit(MembershipChange("c-order", add=("order",), occurred_at=now - 10))
    assert (await settle(harness, "c-order", ["order"]))["order"].state is State.ACTIVE
    late = harness.engine.submit(
        MembershipChange("c-order", remove=("order",), occurred_at=now - 20),
        await history(harness, "c-order"),
    )
    assert (late.stale, late.queued) == (1, 0)
    assert harness.client.remove_calls == []
    [kept] = await harness.engine.wait("c-order", ["order"], 1)
    assert (kept.state, kept.intent) == (State.ACTIVE, Intent.ADD)


async def test_a_newer_removal_after_an_older_add_removes_it(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await quick_indexing(emulator)
    harness = await make_engine(validation=FAST_VALIDATION, batching=FAST_BATCHES)
    now = time.time()
    harness.engine.submit(MembershipChange("c-newer", remove=("newer",), occurred_at=now - 5))
    # The add that arrives second happened first: stale while the removal is still queued.
    second = harness.engine.submit(MembershipChange("c-newer", add=("newer",), occurred_at=now - 9))
    assert second.stale == 1
    done = (await settle(harness, "c-newer", ["newer"]))["newer"]
    assert (done.state, done.intent) == (State.REMOVED, Intent.REMOVE)
    assert harness.client.bulk_calls == []


async def test_a_removal_supersedes_an_add_whose_validation_is_running(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    # Indexing takes minutes: the add is written and stays verifying until the removal comes.
    await emulator.configure({"indexing": {"median_s": 600, "p99_s": 900, "stall_fraction": 0.0}})
    harness = await make_engine(validation=FAST_VALIDATION, batching=FAST_BATCHES)
    harness.engine.submit(MembershipChange("c-verify", add=("verify",)))
    deadline = time.monotonic() + 10
    while harness.poller is not None and harness.poller.pending == 0:
        assert time.monotonic() < deadline, "the add was never written"
        await asyncio.sleep(0.05)
    await quick_indexing(emulator)  # the removal is indexed quickly, in order after the add
    harness.engine.submit(MembershipChange("c-verify", remove=("verify",)))
    done = (await settle(harness, "c-verify", ["verify"]))["verify"]
    assert (done.state, done.intent) == (State.REMOVED, Intent.REMOVE)
    assert len(harness.client.remove_calls) == 1


async def test_a_removal_waits_for_the_add_being_sent_then_follows_it(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await quick_indexing(emulator)
    await emulator.configure({"faults": {"bulk": {"latency_ms": 800}}})
    harness = await make_engine(validation=FAST_VALIDATION, batching=FAST_BATCHES)
    harness.engine.submit(MembershipChange("c-inflight", add=("inflight",)))
    deadline = time.monotonic() + 10
    while not harness.client.bulk_calls:
        assert time.monotonic() < deadline, "the add was never sent"
        await asyncio.sleep(0.02)
    harness.engine.submit(MembershipChange("c-inflight", remove=("inflight",)))
    done = (await settle(harness, "c-inflight", ["inflight"]))["inflight"]
    assert (done.state, done.intent) == (State.REMOVED, Intent.REMOVE)
    # CXone saw the add, then the removal: the pair ends as the newest change asked.
    assert len(harness.client.bulk_calls) == 1 and len(harness.client.remove_calls) == 1
    assert not await member(harness, "inflight", "c-inflight")


async def test_a_re_add_right_after_a_confirmed_removal_is_not_answered_from_the_cache(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await quick_indexing(emulator)
    harness = await make_engine(validation=FAST_VALIDATION, batching=FAST_BATCHES)
    engine = harness.engine
    engine.submit(MembershipChange("c-cache", add=("cache",)))
    await settle(harness, "c-cache", ["cache"])
    engine.submit(MembershipChange("c-cache", remove=("cache",)))
    await settle(harness, "c-cache", ["cache"])
    again = engine.submit(MembershipChange("c-cache", add=("cache",)))
    assert (again.queued, again.cached) == (1, 0)
    done = (await settle(harness, "c-cache", ["cache"]))["cache"]
    assert done.state is State.ACTIVE
    # And a removal repeated within the TTL costs nothing: the cache remembers "not a member".
    engine.submit(MembershipChange("c-cache", remove=("cache",)))
    await settle(harness, "c-cache", ["cache"])
    repeat = engine.submit(MembershipChange("c-cache", remove=("cache",)))
    assert (repeat.queued, repeat.cached) == (0, 1)


async def test_set_removes_only_tracked_segments_and_leaves_other_memberships_alone(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await quick_indexing(emulator)
    harness = await make_engine(validation=FAST_VALIDATION, batching=FAST_BATCHES)
    engine = harness.engine
    # A membership made outside segmapd, straight through the API.
    await harness.client.client.bulk_add("outside", ["c-set"], "outside-key-1")
    engine.submit(MembershipChange("c-set", add=("vip", "spanish")))
    await settle(harness, "c-set", ["vip", "spanish"])
    result = engine.submit(
        MembershipChange("c-set", mirror=("vip", "gold")), await history(harness, "c-set")
    )
    assert result.queued == 2  # gold added, spanish removed; vip already so
    done = await settle(harness, "c-set", ["vip", "spanish", "gold"])
    assert {s: (a.state, a.intent) for s, a in done.items()} == {
        "vip": (State.ACTIVE, Intent.ADD),
        "spanish": (State.REMOVED, Intent.REMOVE),
        "gold": (State.ACTIVE, Intent.ADD),
    }
    assert all(segment != "outside" for segment, *_ in harness.client.remove_calls)
    # set: [] removes every tracked segment, and still not the outside one.
    engine.submit(MembershipChange("c-set", mirror=()), await history(harness, "c-set"))
    done = await settle(harness, "c-set", ["vip", "gold"])
    assert {a.state for a in done.values()} == {State.REMOVED}
    assert all(segment != "outside" for segment, *_ in harness.client.remove_calls)


async def test_a_late_older_mirror_adds_no_segment_the_newer_mirror_left_out(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await quick_indexing(emulator)
    harness = await make_engine(validation=FAST_VALIDATION, batching=FAST_BATCHES)
    engine, store = harness.engine, harness.store
    now = time.time()
    # The CRM changed the list twice, VIP;Gold then VIP; the second arrives first.
    newer = MembershipChange("c-late", mirror=("vip",), occurred_at=now - 5)
    engine.submit(newer, await history(harness, "c-late"), await mirrored_at(store, "c-late"))
    await settle(harness, "c-late", ["vip"])
    older = MembershipChange("c-late", mirror=("vip", "gold"), occurred_at=now - 10)
    late = engine.submit(
        older, await history(harness, "c-late"), await mirrored_at(store, "c-late")
    )
    assert (late.stale, late.queued) == (2, 0)
    # An explicit add older than the last mirror is stale too; a newer one is taken.
    add = MembershipChange("c-late", add=("gold",), occurred_at=now - 7)
    stale = engine.submit(add, await history(harness, "c-late"), await mirrored_at(store, "c-late"))
    assert stale.stale == 1
    add = MembershipChange("c-late", add=("gold",), occurred_at=now - 1)
    fresh = engine.submit(add, await history(harness, "c-late"), await mirrored_at(store, "c-late"))
    assert fresh.queued == 1
    done = await settle(harness, "c-late", ["vip", "gold"])
    assert {s: a.state for s, a in done.items()} == {"vip": State.ACTIVE, "gold": State.ACTIVE}
    # Gold was written once: for the newer add, never for the late mirror.
    gold = [key for segment, ids, key in harness.client.bulk_calls if segment == "gold"]
    assert len(gold) == 1


async def test_a_repeated_change_without_a_time_dates_the_pair_by_its_arrival(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await quick_indexing(emulator)
    harness = await make_engine(validation=FAST_VALIDATION, batching=BatchingPolicy(linger_s=5))
    engine = harness.engine
    engine.submit(MembershipChange("c-dated", add=("dated",)))
    await asyncio.sleep(0.2)
    between = time.time()
    await asyncio.sleep(0.2)
    assert engine.submit(MembershipChange("c-dated", add=("dated",))).joined == 1
    # Happened after the first add but before the second: the second is the newest.
    late = engine.submit(MembershipChange("c-dated", remove=("dated",), occurred_at=between))
    assert late.stale == 1
