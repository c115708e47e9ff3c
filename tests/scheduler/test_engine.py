"""The engine against the emulator process: coalescing, outcomes, retries, limits, faults."""

from __future__ import annotations

import asyncio
import os
import random
import resource

import pytest

from scheduler.engine import BatchingPolicy, EngineClosed, EngineOverloaded
from scheduler.model import Assignment, FailureReason, MembershipChange, State
from scheduler.retry import RetryPolicy
from tests.scheduler.conftest import EngineHarness, MakeEngine
from tests.support.emulator import EmulatorControl


async def wait_all(harness: EngineHarness, pairs: list[tuple[str, str]], timeout_s: float) -> None:
    """Wait until every pair has ended (written or failed, with no verifier)."""
    by_contact: dict[str, list[str]] = {}
    for contact, segment in pairs:
        by_contact.setdefault(contact, []).append(segment)
    await asyncio.wait_for(
        asyncio.gather(
            *(harness.engine.wait(c, segs, timeout_s) for c, segs in by_contact.items())
        ),
        timeout_s + 5,
    )


async def final_states(
    harness: EngineHarness, pairs: list[tuple[str, str]]
) -> dict[tuple[str, str], Assignment]:
    states = {}
    for contact in {c for c, _ in pairs}:
        for a in await harness.store.contact(contact):
            states[(contact, a.segment_id)] = a
    missing = [p for p in pairs if p not in states]
    assert not missing, f"no record of {missing[:5]}"
    return {p: states[p] for p in pairs}


async def test_requests_become_written_memberships_in_full_deduplicated_batches(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    harness = await make_engine(write_rps=20)
    pairs = []
    for i in range(1000):
        contact = f"{100000000000 + i}"
        segments = [f"seg-{i % 5}", f"seg-{(i + 1) % 5}"]
        harness.engine.submit(MembershipChange(contact, tuple(segments)))
        pairs += [(contact, s) for s in segments]
    # The same request again while in progress joins it instead of adding work.
    again = harness.engine.submit(MembershipChange("100000000000", ("seg-0", "seg-1")))
    assert again.joined == 2 and again.queued == 0
    await wait_all(harness, pairs, 60)

    states = await final_states(harness, pairs)
    assert {a.state for a in states.values()} == {State.WRITTEN}
    counters = await emulator.counters()
    assert counters["bulk_ids"]["max"] <= 200
    assert counters["duplicate_ids_in_request"] == 0
    assert counters["bulk_ids"]["ids"] == 2000  # every assignment sent exactly once
    # 2000 ids over 5 segments: 400 per segment, so two full batches each.
    assert counters["bulk_ids"]["requests"] == 10
    for s in range(5):
        members = await emulator.members(f"seg-{s}")
        assert len(members) == 400
        assert all(m["applied"] == 1 for m in members)


async def test_a_trickle_goes_out_after_the_linger_without_waiting_for_min_size(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    harness = await make_engine()
    harness.engine.submit(MembershipChange("c-1", ("seg-a",)))
    [result] = await harness.engine.wait("c-1", ["seg-a"], 10)
    assert result.state is State.WRITTEN
    assert harness.observer.bulk_sizes == [1]


async def test_permanent_item_errors_fail_at_once_with_their_reason(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await emulator.set_missing_contacts(["ghost"])
    await emulator.declare_segment("dyn", "dynamic")
    await emulator.configure({"auto_create_segments": False})
    await emulator.declare_segment("real", "static")
    harness = await make_engine()
    harness.engine.submit(MembershipChange("ghost", ("real",)))
    harness.engine.submit(MembershipChange("bad id!", ("real",)))
    harness.engine.submit(MembershipChange("ok-1", ("real", "dyn", "nowhere")))
    pairs = [
        ("ghost", "real"),
        ("bad id!", "real"),
        ("ok-1", "real"),
        ("ok-1", "dyn"),
        ("ok-1", "nowhere"),
    ]
    await wait_all(harness, pairs, 20)
    states = await final_states(harness, pairs)

    ghost = states[("ghost", "real")]
    assert (ghost.state, ghost.reason, ghost.attempts) == (
        State.FAILED,
        FailureReason.CONTACT_NOT_FOUND,
        1,
    )
    bad = states[("bad id!", "real")]
    assert (bad.state, bad.reason, bad.attempts) == (
        State.FAILED,
        FailureReason.INVALID_CONTACT_ID,
        1,
    )
    nowhere = states[("ok-1", "nowhere")]
    assert (nowhere.state, nowhere.reason) == (State.FAILED, FailureReason.SEGMENT_NOT_FOUND)
    assert states[("ok-1", "real")].state is State.WRITTEN
    # A dynamic segment takes the write and ignores it: only validation can tell.
    assert states[("ok-1", "dyn")].state is State.WRITTEN
    assert await emulator.members("dyn") == []
    # Nothing was retried and no single-contact fallback was used.
    assert harness.observer.retries == []
    assert (await emulator.counters())["requests"]["single"] == {}
    failed = await harness.store.failed()
    assert {(a.contact_id, a.segment_id) for a in failed} == {
        ("ghost", "real"),
        ("bad id!", "real"),
        ("ok-1", "nowhere"),
    }


async def test_item_retries_follow_the_policy_then_fall_back_to_one_single_write(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await emulator.configure({"faults": {"bulk": {"index_busy_rate": 1.0}}})
    retry = RetryPolicy(initial_s=0.3, multiplier=1.5, max_s=1.0, jitter_ms=200, attempts=3)
    harness = await make_engine(retry=retry, seed=7)
    harness.engine.submit(MembershipChange("c-1", ("seg",)))
    [result] = await harness.engine.wait("c-1", ["seg"], 20)

    # Three bulk attempts, each failing with IndexBusy; the two backoffs are exactly the policy's
    # delays for the same random source.
    expected_rng = random.Random(7)
    expected = [retry.delay(n, expected_rng) for n in (1, 2)]
    assert [d for _, _, d in harness.observer.retries] == pytest.approx(expected)
    assert harness.observer.bulk_sizes == [1, 1, 1]
    # Then one single-contact write, which the emulator's single endpoint accepts.
    assert result.state is State.WRITTEN
    assert result.attempts == 4
    counters = await emulator.counters()
    assert counters["requests"]["single"] == {"201": 1}


async def test_fallback_failure_dead_letters_with_retries_exhausted(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await emulator.configure(
        {"faults": {"bulk": {"index_busy_rate": 1.0}, "single": {"index_busy_rate": 1.0}}}
    )
    retry = RetryPolicy(initial_s=0.1, multiplier=1.0, max_s=0.1, jitter_ms=0, attempts=2)
    harness = await make_engine(retry=retry)
    harness.engine.submit(MembershipChange("c-1", ("seg",)))
    [result] = await harness.engine.wait("c-1", ["seg"], 20)
    assert result.state is State.FAILED
    assert result.reason is FailureReason.RETRIES_EXHAUSTED
    assert "IndexBusy" in result.message


async def test_no_more_than_three_segments_of_a_contact_in_flight(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    # Slow writes keep assignments in flight long enough to overlap.
    await emulator.configure({"faults": {"bulk": {"latency_ms": 150}}})
    harness = await make_engine(write_rps=100, batching=BatchingPolicy(linger_s=0.01))
    segments = tuple(f"seg-{i}" for i in range(10))
    harness.engine.submit(MembershipChange("busy", segments))
    results = await harness.engine.wait("busy", segments, 30)
    assert [r.state for r in results] == [State.WRITTEN] * 10
    assert harness.observer.max_inflight_per_contact == 3


async def test_high_water_mark_refuses_new_work_with_a_retry_hint(make_engine: MakeEngine):
    harness = await make_engine(batching=BatchingPolicy(linger_s=5.0, high_water=10))
    for i in range(10):
        harness.engine.submit(MembershipChange(f"c{i}", ("seg",)))
    assert harness.engine.overloaded
    with pytest.raises(EngineOverloaded) as refused:
        harness.engine.submit(MembershipChange("one-more", ("seg",)))
    assert refused.value.retry_after_s >= 1.0


async def test_stop_flushes_the_buffer_and_then_refuses_work(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    harness = await make_engine(batching=BatchingPolicy(linger_s=60.0))
    for i in range(5):
        harness.engine.submit(MembershipChange(f"c{i}", ("seg",)))
    await harness.engine.stop(budget_s=5.0)
    assert len(await emulator.members("seg")) == 5
    with pytest.raises(EngineClosed):
        harness.engine.submit(MembershipChange("late", ("seg",)))


async def test_stop_also_writes_what_finishing_sends_release(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    # Four segments of one contact: three go in flight, the fourth waits for one of them to end
    # (at most 3 per contact) and only then reaches the buffer. The drain must still write it.
    # Slow answers: the three writes are all sent before the first one ends.
    await emulator.configure({"faults": {"bulk": {"latency_ms": 300}}})
    harness = await make_engine(batching=BatchingPolicy(linger_s=60.0))
    segments = ("p1", "p2", "p3", "p4")
    harness.engine.submit(MembershipChange("c-four", segments))
    await harness.engine.stop(budget_s=10.0)
    for segment in segments:
        assert [m["contactId"] for m in await emulator.members(segment)] == ["c-four"], segment


@pytest.mark.timeout(240)
async def test_every_assignment_converges_under_faults_without_double_writes(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await emulator.configure(
        {
            "limits": {"bulk": {"rate": 8, "burst": 8}, "single": {"rate": 50, "burst": 50}},
            "faults": {
                "bulk": {
                    "error_rate": 0.2,
                    "reset_rate": 0.05,
                    "hang_rate": 0.05,
                    "hang_s": 1.5,
                    "index_busy_rate": 0.1,
                    "after_apply_fraction": 0.5,
                }
            },
        }
    )
    # The engine's limit is above the emulator's: a 429 storm it must ride out. More attempts
    # than the contract's five keep the single-write fallback (which would legitimately write an
    # already-applied id again) out of this test, so any double write is the engine's fault.
    retry = RetryPolicy(initial_s=0.2, multiplier=1.5, max_s=1.0, jitter_ms=200, attempts=12)
    harness = await make_engine(
        write_rps=30,
        retry=retry,
        batching=BatchingPolicy(min_size=10, max_size=25, linger_s=0.2),
        timeout_s=0.75,
        seed=3,
    )
    pairs = []
    for i in range(1500):
        contact = f"contact_{i:05d}"
        segments = (f"seg-{i % 7}", f"seg-{(i * 3 + 1) % 7}")
        harness.engine.submit(MembershipChange(contact, segments))
        pairs += [(contact, s) for s in dict.fromkeys(segments)]
        if i == 750:
            await asyncio.sleep(0.5)
            await emulator.expire_tokens()  # token expiry mid-run
    await wait_all(harness, pairs, 180)

    states = await final_states(harness, pairs)
    assert {a.state for a in states.values()} == {State.WRITTEN}
    counters = await emulator.counters()
    assert counters["bulk_ids"]["max"] <= 25
    assert counters["duplicate_ids_in_request"] == 0
    assert counters["idempotency_conflicts"]["IdempotencyKeyReused"] == 0
    # Failures after the write was applied were resent under the same key and replayed:
    assert counters["idempotent_replays"] > 0
    # ...so no membership was ever written twice, and every pair is a member.
    assert counters["applied_twice"] == 0
    # The storm happened, and a 429 held back the whole class rather than one request: far fewer
    # 429s than admitted requests although the engine's own limit is several times CXone's.
    assert 0 < counters["rate_limited"]["bulk"] < counters["requests"]["bulk"]["200"] / 2
    assert counters["faults"]["hang"] > 0
    harness.client.assert_keys_consistent()
    assert counters["faults"]["error"] > 0 and counters["faults"]["reset"] > 0
    members = set()
    for s in range(7):
        members |= {(m["contactId"], f"seg-{s}") for m in await emulator.members(f"seg-{s}")}
    assert set(pairs) <= members
    # The token expired mid-run and was replaced.
    assert "401" in counters["requests"]["bulk"]


async def test_running_out_of_file_descriptors_spends_no_attempt(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    # A real EMFILE: the process may open no new descriptor, so every connection to CXone beyond
    # the pooled one fails in the kernel (slow answers make the writes need several at once).
    # With one attempt allowed, counting such a failure would dead-letter the work.
    await emulator.configure({"faults": {"bulk": {"latency_ms": 300}}})
    harness = await make_engine(
        retry=RetryPolicy(initial_s=0.1, multiplier=1.0, max_s=0.1, jitter_ms=0, attempts=1),
        batching=BatchingPolicy(linger_s=0.05),
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    loop = asyncio.get_running_loop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use, hard))
    restore = loop.call_later(2.5, resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
    segments = [f"fd-seg-{i}" for i in range(4)]
    try:
        harness.engine.submit(MembershipChange("fd-short", tuple(segments)))
        await asyncio.sleep(1.5)
        waiting = await harness.engine.wait("fd-short", segments, 0)
        assert all(a.state is not State.FAILED for a in waiting)
    finally:
        restore.cancel()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    done = await harness.engine.wait("fd-short", segments, 15)
    assert [(a.state, a.attempts) for a in done] == [(State.WRITTEN, 1)] * len(segments)
    assert ("bulk", "local") in harness.observer.outcomes
