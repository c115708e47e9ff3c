"""Validation against the emulator process: polling, refresh budget, activation, cache."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections import defaultdict

from scheduler.engine import BatchingPolicy
from scheduler.model import FailureReason, MembershipChange, State
from scheduler.upstream import LocalResourceError, MembershipResult, RefreshResult
from scheduler.validation import ValidationPolicy
from tests.scheduler.conftest import EngineHarness, MakeEngine
from tests.support.emulator import EmulatorControl

FAST_BATCHES = BatchingPolicy(linger_s=0.1)


def fast_policy(**overrides: float) -> ValidationPolicy:
    values = {
        "interval_s": 0.4,
        "window_s": 2.0,
        "cache_ttl_s": 60.0,
        "refresh_min_interval_s": 3.0,
        "deadline_s": 20.0,
    }
    values.update(overrides)
    return ValidationPolicy(**values)


async def indexing(emulator: EmulatorControl, median: float, p99: float, stall: float) -> None:
    await emulator.configure(
        {"indexing": {"median_s": median, "p99_s": p99, "stall_fraction": stall}}
    )


async def wait_states(
    harness: EngineHarness, pairs: list[tuple[str, str]], timeout_s: float
) -> dict[tuple[str, str], State]:
    by_contact: dict[str, list[str]] = defaultdict(list)
    for contact, segment in pairs:
        by_contact[contact].append(segment)
    results = await asyncio.gather(
        *(harness.engine.wait(c, s, timeout_s) for c, s in by_contact.items())
    )
    return {(a.contact_id, a.segment_id): a.state for group in results for a in group}


def assert_reads_spaced(harness: EngineHarness, interval_s: float) -> None:
    """A (segment, contact) pair is never read twice within one polling interval."""
    last: dict[tuple[str, str], float] = {}
    for segment, contact, at in harness.client.reads:
        previous = last.get((segment, contact))
        if previous is not None:
            assert at - previous >= interval_s * 0.85, f"{segment}/{contact} read twice"
        last[(segment, contact)] = at


async def test_written_memberships_become_active_once_indexed(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await indexing(emulator, 0.6, 1.5, 0.0)
    await emulator.configure({"limits": {"read": {"rate": 500, "burst": 500}}})
    policy = fast_policy(window_s=5.0)
    harness = await make_engine(validation=policy, batching=FAST_BATCHES, read_rps=500)
    pairs = []
    for i in range(300):
        segments = (f"seg-{i % 3}", f"seg-{(i + 1) % 3}")
        harness.engine.submit(MembershipChange(f"c{i}", segments))
        pairs += [(f"c{i}", s) for s in segments]
    states = await wait_states(harness, pairs, 30)
    assert set(states.values()) == {State.ACTIVE}
    for contact, segment in pairs[:20]:
        [member] = [m for m in await emulator.members(segment) if m["contactId"] == contact]
        assert member["indexed"]
    # Each pair was read about once per interval until it showed, never twice at once.
    assert_reads_spaced(harness, policy.interval_s)
    reads = len(harness.client.reads)
    # p99 1.5 s at 0.4 s intervals: at most 1 + ceil(1.5 / 0.4) = 5 reads for nearly every pair.
    assert reads <= len(pairs) * 5
    counters = await emulator.counters()
    assert counters["rate_limited"]["read"] == 0
    assert counters["requests"]["refresh"] == {}


async def test_a_pair_read_late_by_the_gate_is_still_read_at_every_sweep(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    # Nothing is indexed until a refresh, and the window outlasts the test: pure polling.
    await indexing(emulator, 0.2, 0.4, 1.0)
    await emulator.configure({"limits": {"read": {"rate": 0, "burst": 1}}})
    policy = fast_policy(interval_s=0.4, window_s=60.0)
    # 60 reads per sweep at 200/s take 0.3 s: most pairs are read well after their sweep.
    harness = await make_engine(validation=policy, batching=FAST_BATCHES, read_rps=200)
    contacts = [f"late-{i}" for i in range(60)]
    for contact in contacts:
        harness.engine.submit(MembershipChange(contact, ("slow-gate",)))
    await asyncio.sleep(4.0)
    assert_reads_spaced(harness, policy.interval_s)
    per_pair: dict[str, list[float]] = defaultdict(list)
    for _, contact, at in harness.client.reads:
        per_pair[contact].append(at)
    assert set(per_pair) == set(contacts)
    for contact, times in per_pair.items():
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        # Read again one interval after each read, however late that read was: a pair that sat
        # out a sweep would show a gap of two intervals at least. (A loaded machine delays a
        # read now and then by a fraction of one; on average the gaps stay at the interval.)
        assert max(gaps) < policy.interval_s * 2, f"{contact} missed a sweep: {gaps}"
        assert statistics.mean(gaps) < policy.interval_s * 1.25, f"{contact} read late: {gaps}"


async def test_a_confirmed_pair_asked_again_costs_no_call(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await indexing(emulator, 0.2, 0.4, 0.0)
    harness = await make_engine(validation=fast_policy(cache_ttl_s=1.5), batching=FAST_BATCHES)
    harness.engine.submit(MembershipChange("c1", ("seg",)))
    [first] = await harness.engine.wait("c1", ["seg"], 10)
    assert first.state is State.ACTIVE
    before = await emulator.counters()

    again = harness.engine.submit(MembershipChange("c1", ("seg",)))
    assert (again.queued, again.cached) == (0, 1)
    [cached] = await harness.engine.wait("c1", ["seg"], 1)
    assert cached.state is State.ACTIVE
    after = await emulator.counters()
    assert after["requests"] == before["requests"]

    # Past the TTL the pair is written (and confirmed) again.
    await asyncio.sleep(1.6)
    assert harness.engine.submit(MembershipChange("c1", ("seg",))).queued == 1
    [renewed] = await harness.engine.wait("c1", ["seg"], 10)
    assert renewed.state is State.ACTIVE
    assert (await emulator.counters())["items"]["ContactAlreadyInSegment"] == 1


async def test_stalled_writes_are_released_by_one_refresh_per_budget(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await indexing(emulator, 0.2, 0.4, 1.0)  # every write stalls until a refresh
    await emulator.configure({"refresh_min_interval_s": 3})
    policy = fast_policy(window_s=1.0, refresh_min_interval_s=3.0)
    harness = await make_engine(validation=policy, batching=FAST_BATCHES)
    pairs = []
    # Several batches of one segment, spread out: their windows end at different times, and
    # the later ones need a second refresh after the first has spent the budget.
    for wave in range(4):
        for i in range(25):
            contact = f"w{wave}-{i}"
            harness.engine.submit(MembershipChange(contact, ("stalled",)))
            pairs.append((contact, "stalled"))
        await asyncio.sleep(0.7)
    states = await wait_states(harness, pairs, 30)
    assert set(states.values()) == {State.ACTIVE}
    counters = await emulator.counters()
    assert counters["requests"]["refresh"].get("429", 0) == 0
    accepted = counters["requests"]["refresh"]["202"]
    assert accepted >= 1
    assert accepted == len(harness.client.refreshes)
    assert_reads_spaced(harness, policy.interval_s)


async def test_a_spent_budget_schedules_the_refresh_and_pauses_polling(
    make_engine: MakeEngine, emulator: EmulatorControl, http
):
    await indexing(emulator, 0.2, 0.4, 1.0)
    await emulator.configure({"refresh_min_interval_s": 4})
    # The window outlasts the second that a refresh takes to show the write.
    policy = fast_policy(window_s=1.5, refresh_min_interval_s=4.0)
    harness = await make_engine(validation=policy, batching=FAST_BATCHES)
    # This instance refreshed the segment a moment ago (as a restart would remember it).
    await harness.client.refresh("seg")
    ours = harness.client.refresh_log
    assert [accepted for *_, accepted in ours] == [True]
    harness.client.refreshes.clear()
    allowed_from = time.time() + 4.0
    harness.budget.spend("seg", time.time(), allowed_from)

    started = time.monotonic()
    harness.engine.submit(MembershipChange("c1", ("seg",)))
    [result] = await harness.engine.wait("c1", ["seg"], 20)
    assert result.state is State.ACTIVE
    assert time.monotonic() - started >= 3.0  # it had to wait for the budget
    # The engine's one refresh was sent once the budget allowed it, and accepted.
    assert len(ours) == 2 and ours[1][1] >= allowed_from and ours[1][3] is True, (
        ours,
        allowed_from,
    )
    counters = await emulator.counters()
    assert counters["requests"]["refresh"] == {"202": 2}, (counters, ours, allowed_from)
    # While the refresh was pending, the pair was not polled: reads only in the first window and
    # after the refresh.
    reads = harness.client.reads
    first_window_end = reads[0][2] + policy.window_s
    waiting = [r for r in reads if first_window_end + 0.5 < r[2] < started + 3.0]
    assert waiting == []


async def test_a_budget_spent_elsewhere_costs_one_429_then_waits_for_retry_after(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await indexing(emulator, 0.2, 0.4, 1.0)
    await emulator.configure({"refresh_min_interval_s": 3})
    harness = await make_engine(
        validation=fast_policy(window_s=1.5, refresh_min_interval_s=3.0), batching=FAST_BATCHES
    )
    await harness.client.client.refresh("seg")  # another tool refreshed it, unknown to us
    harness.engine.submit(MembershipChange("c1", ("seg",)))
    [result] = await harness.engine.wait("c1", ["seg"], 20)
    assert result.state is State.ACTIVE
    counters = await emulator.counters()
    assert counters["requests"]["refresh"] == {"202": 2, "429": 1}


async def test_dynamic_segments_end_not_indexed_with_a_clear_reason(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await indexing(emulator, 0.2, 0.4, 0.0)
    await emulator.declare_segment("dyn", "dynamic")
    await emulator.configure({"refresh_min_interval_s": 1})
    policy = fast_policy(window_s=0.8, refresh_min_interval_s=1.0, deadline_s=3.0)
    harness = await make_engine(validation=policy, batching=FAST_BATCHES)
    harness.engine.submit(MembershipChange("c1", ("dyn", "static")))
    results = {a.segment_id: a for a in await harness.engine.wait("c1", ["dyn", "static"], 20)}
    assert results["static"].state is State.ACTIVE
    dyn = results["dyn"]
    assert (dyn.state, dyn.reason) == (State.FAILED, FailureReason.NOT_INDEXED)
    assert "dynamic" in dyn.message
    assert [a.segment_id for a in await harness.store.failed()] == ["dyn"]


async def test_read_429s_and_5xx_are_ridden_out(make_engine: MakeEngine, emulator: EmulatorControl):
    await indexing(emulator, 0.3, 0.8, 0.0)
    await emulator.configure(
        {
            "limits": {"read": {"rate": 20, "burst": 20}},
            "faults": {"read": {"error_rate": 0.3}},
        }
    )
    policy = fast_policy(interval_s=0.3, window_s=10.0)
    harness = await make_engine(validation=policy, batching=FAST_BATCHES, read_rps=200)
    pairs = [(f"c{i}", "seg") for i in range(60)]
    for contact, segment in pairs:
        harness.engine.submit(MembershipChange(contact, (segment,)))
    states = await wait_states(harness, pairs, 60)
    assert set(states.values()) == {State.ACTIVE}
    counters = await emulator.counters()
    assert counters["faults"]["error"] > 0
    limited = counters["rate_limited"]["read"]
    assert limited > 0
    # A 429 pauses every read, so they stay a small share of the reads that got through.
    answered = sum(v for k, v in counters["requests"]["read"].items() if k != "429")
    assert limited < answered / 2
    assert_reads_spaced(harness, policy.interval_s)


# ---- reads are the scarce budget: decisions rest on reads that happened ----------------------


def reads_per_pair(harness: EngineHarness) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for segment, contact, _ in harness.client.reads:
        counts[(contact, segment)] += 1
    return counts


async def test_a_read_limited_backlog_fails_nothing_and_reads_each_pair_about_once(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    # 300 pairs at 20 reads/s take 15 s to read once: far past the 3 s deadline. None was
    # read in time, so none may fail, and each is read about once (indexed by then).
    await indexing(emulator, 0.2, 0.4, 0.0)
    await emulator.configure({"limits": {"read": {"rate": 20, "burst": 20}}})
    policy = fast_policy(window_s=2.0, deadline_s=3.0)
    harness = await make_engine(validation=policy, batching=FAST_BATCHES, read_rps=20)
    pairs = [(f"backlog-{i}", f"seg-{i % 3}") for i in range(300)]
    for contact, segment in pairs:
        harness.engine.submit(MembershipChange(contact, (segment,)))
    states = await wait_states(harness, pairs, 40)
    assert set(states.values()) == {State.ACTIVE}
    assert await harness.store.failed() == []
    assert len(harness.client.reads) <= len(pairs) * 1.2
    counters = await emulator.counters()
    assert counters["rate_limited"]["read"] == 0
    assert counters["requests"]["refresh"] == {}  # a long read queue calls for no refresh


async def test_read_faults_never_fail_a_pair_that_was_not_read(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await indexing(emulator, 0.2, 0.4, 0.0)
    await emulator.configure({"faults": {"read": {"error_rate": 0.6, "reset_rate": 0.2}}})
    policy = fast_policy(interval_s=0.3, window_s=60.0, deadline_s=1.0)
    harness = await make_engine(validation=policy, batching=FAST_BATCHES, read_rps=200)
    pairs = [(f"faulty-{i}", "seg") for i in range(40)]
    for contact, segment in pairs:
        harness.engine.submit(MembershipChange(contact, (segment,)))
    states = await wait_states(harness, pairs, 40)
    assert set(states.values()) == {State.ACTIVE}
    counters = await emulator.counters()
    assert counters["faults"]["error"] + counters["faults"]["reset"] > 40


async def test_an_answer_arriving_after_the_deadline_is_used(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    # Each read takes 1.5 s to answer; the deadline passes while the first one is out.
    await indexing(emulator, 0.1, 0.2, 0.0)
    await emulator.configure({"faults": {"read": {"latency_ms": 1500}}})
    policy = fast_policy(interval_s=0.4, window_s=60.0, deadline_s=1.0)
    harness = await make_engine(validation=policy, batching=FAST_BATCHES)
    harness.engine.submit(MembershipChange("late-answer", ("seg",)))
    [result] = await harness.engine.wait("late-answer", ["seg"], 15)
    assert result.state is State.ACTIVE


async def test_pairs_first_read_after_their_window_are_not_held_for_the_hourly_refresh(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    # The segment's refresh budget is spent for an hour, reads are slow enough that most
    # windows run out before the pair's first read, and some reads fail. Indexed pairs must
    # still be read and confirmed; only a pair read and missing may wait for a refresh.
    await indexing(emulator, 0.1, 0.2, 0.0)
    await emulator.configure(
        {"limits": {"read": {"rate": 10, "burst": 10}}, "faults": {"read": {"error_rate": 0.3}}}
    )
    policy = fast_policy(window_s=1.0, refresh_min_interval_s=3600.0)
    harness = await make_engine(validation=policy, batching=FAST_BATCHES, read_rps=10)
    harness.budget.spend("held", time.time(), time.time() + 3600)
    pairs = [(f"held-{i}", "held") for i in range(60)]
    for contact, segment in pairs:
        harness.engine.submit(MembershipChange(contact, (segment,)))
    states = await wait_states(harness, pairs, 30)
    assert set(states.values()) == {State.ACTIVE}
    counters = await emulator.counters()
    assert counters["faults"]["error"] > 0
    assert counters["requests"]["refresh"] == {}


async def test_a_refresh_whose_answer_was_lost_is_not_sent_again_blindly(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    # The refresh is applied, but its answer comes after the client's 2 s timeout. Sending it
    # again would only earn a 429: the pairs are read again first, and they show.
    await indexing(emulator, 0.1, 0.2, 1.0)
    await emulator.configure(
        {"refresh_min_interval_s": 600, "faults": {"refresh": {"latency_ms": 2500}}}
    )
    policy = fast_policy(window_s=2.0, refresh_min_interval_s=600.0)
    harness = await make_engine(validation=policy, batching=FAST_BATCHES)
    pairs = [(f"lost-{i}", "lost-answer") for i in range(10)]
    for contact, segment in pairs:
        harness.engine.submit(MembershipChange(contact, (segment,)))
    states = await wait_states(harness, pairs, 20)
    assert set(states.values()) == {State.ACTIVE}
    counters = await emulator.counters()
    assert counters["requests"]["refresh"] == {"202": 1}


async def test_not_indexed_reports_what_was_observed(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await indexing(emulator, 0.2, 0.4, 0.0)
    await emulator.declare_segment("dyn-observed", "dynamic")
    await emulator.configure({"refresh_min_interval_s": 1})
    policy = fast_policy(window_s=0.8, refresh_min_interval_s=1.0, deadline_s=2.0)
    harness = await make_engine(validation=policy, batching=FAST_BATCHES)
    harness.engine.submit(MembershipChange("c-observed", ("dyn-observed",)))
    [failed] = await harness.engine.wait("c-observed", ["dyn-observed"], 20)
    assert (failed.state, failed.reason) == (State.FAILED, FailureReason.NOT_INDEXED)
    reads = reads_per_pair(harness)[("c-observed", "dyn-observed")]
    assert reads >= 3
    assert f"in {reads} reads" in failed.message
    assert "after a refresh" in failed.message
    assert "possible causes" in failed.message and "dynamic" in failed.message
    # The last read that decided it came after the deadline.
    written = min(at for s, c, at in harness.client.reads if c == "c-observed")
    last = max(at for s, c, at in harness.client.reads if c == "c-observed")
    assert last - written >= policy.deadline_s - policy.interval_s


async def test_an_unexpected_error_in_a_read_leaves_the_pair_read_again(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    await indexing(emulator, 0.1, 0.2, 0.0)
    harness = await make_engine(validation=fast_policy(), batching=FAST_BATCHES)
    real_is_member = harness.client.is_member
    failures: list[str] = []

    async def broken_once(segment_id: str, contact_id: str) -> MembershipResult:
        if not failures:
            failures.append(contact_id)
            raise RuntimeError("a bug in a client")
        return await real_is_member(segment_id, contact_id)

    harness.client.is_member = broken_once  # type: ignore[method-assign]
    harness.engine.submit(MembershipChange("bug-once", ("seg",)))
    [result] = await harness.engine.wait("bug-once", ["seg"], 10)
    assert failures == ["bug-once"]
    assert result.state is State.ACTIVE


async def test_a_refresh_that_could_not_leave_the_process_fails_nothing(
    make_engine: MakeEngine, emulator: EmulatorControl
):
    # No file descriptor for the refresh, three times: nothing reached CXone, so nothing may
    # count as a failed refresh, and the pair must not fail past its deadline for it.
    await indexing(emulator, 0.1, 0.2, 1.0)
    await emulator.configure({"refresh_min_interval_s": 600})
    policy = fast_policy(window_s=0.8, refresh_min_interval_s=600.0, deadline_s=1.5)
    harness = await make_engine(validation=policy, batching=FAST_BATCHES)
    real_refresh = harness.client.refresh
    refused: list[str] = []

    async def no_descriptor(segment_id: str) -> RefreshResult:
        if len(refused) < 3:
            refused.append(segment_id)
            raise LocalResourceError("no file descriptor left", error="OutOfFileDescriptors")
        return await real_refresh(segment_id)

    harness.client.refresh = no_descriptor  # type: ignore[method-assign]
    harness.engine.submit(MembershipChange("fd-refresh", ("fd-refresh-seg",)))
    [result] = await harness.engine.wait("fd-refresh", ["fd-refresh-seg"], 20)
    assert len(refused) == 3
    assert result.state is State.ACTIVE
    assert (await emulator.counters())["requests"]["refresh"] == {"202": 1}
