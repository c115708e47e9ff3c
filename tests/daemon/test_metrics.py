from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from daemon.census import JournalCensus
from daemon.cxone import HttpCXoneClient
from daemon.metrics import Metrics
from daemon.store.memory import MemoryStore
from daemon.store.sqlite import SqliteStore
from daemon.wiring import build_scheduler
from listeners.base import Outcome
from scheduler.engine import BatchingPolicy
from scheduler.model import Assignment, FailureReason, Intent, Lane, State
from scheduler.ratelimit import RateGate
from scheduler.retry import RetryPolicy
from tests.support.ci import IN_CI
from tests.support.cxone import emulator_settings

PROMTOOL_HINT = (
    "promtool is required in CI: apt-get update && "
    "apt-get install -y --no-install-recommends prometheus"
)


def samples(metrics: Metrics) -> list[Sample]:
    body, _ = metrics.render()
    return [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = [s.value for s in samples(metrics) if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def new_assignment(metrics: Metrics, contact: str, at: float = 1000.0) -> Assignment:
    """What the engine does on submit: a queued assignment, reported with previous == queued."""
    a = Assignment(contact, "seg-1", received_at=at, updated_at=at, history=[(State.QUEUED, at)])
    metrics.transitioned(a, State.QUEUED)
    return a


def move(metrics: Metrics, a: Assignment, state: State, at: float, **kw) -> None:
    """What the ledger's `transition` (which lets a pair go when it ends) does."""
    previous = a.state
    a.transition(state, at, **kw)
    metrics.transitioned(a, previous)
    if a.terminal:
        metrics.finished(a)


def by_state(metrics: Metrics) -> dict[str, float]:
    return {s.labels["state"]: s.value for s in samples(metrics) if s.name == "segmapd_assignments"}


def test_assignments_move_through_states_and_gauges_stay_right():
    m = Metrics()
    a = new_assignment(m, "c1")
    b = new_assignment(m, "c2")
    c = new_assignment(m, "c3")
    assert by_state(m)["queued"] == 3
    for x in (a, b, c):
        move(m, x, State.SENDING, 1001.0)
    move(m, b, State.RETRYING, 1002.0)
    move(m, b, State.SENDING, 1003.0)
    move(m, b, State.SENDING, 1004.0)  # a resend is a self-transition
    move(m, a, State.WRITTEN, 1005.0)
    move(m, a, State.VERIFYING, 1006.0)
    # The work in progress only, by state.
    assert by_state(m) == {"queued": 0, "sending": 2, "retrying": 0, "written": 0, "verifying": 1}
    move(m, a, State.ACTIVE, 1010.0)
    move(m, b, State.FAILED, 1011.0, reason=FailureReason.CONTACT_NOT_FOUND)
    # Finished assignments leave the engine: the journal's count says how many there are
    # (segmapd_journal_assignments), never a series that reads 0 here.
    assert by_state(m) == {"queued": 0, "sending": 1, "retrying": 0, "written": 0, "verifying": 0}

    # A later request for the same pair is a brand-new assignment, counted once.
    again = new_assignment(m, "c2", at=2000.0)
    assert by_state(m)["queued"] == 1
    move(m, again, State.FAILED, 2001.0, reason=FailureReason.INVALID_CONTACT_ID)
    assert by_state(m)["queued"] == 0

    assert value(m, "segmapd_assignment_transitions_total", state="queued") == 4
    assert value(m, "segmapd_assignment_transitions_total", state="sending") == 5
    assert value(m, "segmapd_assignment_transitions_total", state="failed") == 2
    assert (
        value(
            m, "segmapd_assignments_finished_total", outcome="active", reason="none", intent="add"
        )
        == 1
    )
    assert (
        value(
            m,
            "segmapd_assignments_finished_total",
            outcome="failed",
            reason="contact_not_found",
            intent="add",
        )
        == 1
    )
    live = {"lane": "live"}
    assert value(m, "segmapd_assignment_active_latency_seconds_count", **live) == 1
    assert value(m, "segmapd_assignment_active_latency_seconds_sum", **live) == pytest.approx(10.0)
    assert value(m, "segmapd_assignment_active_latency_seconds_bucket", le="5.0", **live) == 0
    assert value(m, "segmapd_assignment_active_latency_seconds_bucket", le="10.0", **live) == 1
    assert value(m, "segmapd_assignment_active_latency_seconds_bucket", le="7200.0", **live) == 1
    assert value(m, "segmapd_assignment_active_latency_seconds_count", lane="bulk") == 0


def test_terminal_restart_of_the_same_object_does_not_go_negative():
    m = Metrics()
    a = new_assignment(m, "c1")
    move(m, a, State.FAILED, 1001.0, reason=FailureReason.RETRIES_EXHAUSTED)
    move(m, a, State.QUEUED, 1002.0)
    assert by_state(m) == {"queued": 1, "sending": 0, "retrying": 0, "written": 0, "verifying": 0}


def test_active_without_receipt_time_is_not_observed():
    m = Metrics()
    a = Assignment("c1", "s1", history=[(State.QUEUED, 0.0)])
    m.transitioned(a, State.QUEUED)
    for state in (State.SENDING, State.WRITTEN, State.ACTIVE):
        move(m, a, state, 1_700_000_000.0)
    assert value(m, "segmapd_assignment_active_latency_seconds_count", lane="live") == 0


def test_intake_counters():
    m = Metrics()
    m.record_webhook("crm", "standard", 202)
    m.record_webhook("crm", "standard", 202)
    m.record_webhook("crm", "standard", 401)
    m.record_webhook("hs", "hubspot", 200)
    m.record_delivery("crm", "standard", Outcome(accepted=3, duplicates=1, events=2))
    m.record_delivery("crm", "standard", Outcome(accepted=2, stale=1, events=1))
    m.record_delivery("hs", "hubspot", Outcome(events=3, redelivered=97, dead_lettered=1))
    m.record_skipped("hs", "hubspot", "other_property")
    m.record_skipped("hs", "hubspot", "other_property", 4)
    crm = {"source": "crm", "kind": "standard"}
    hs = {"source": "hs", "kind": "hubspot"}
    assert value(m, "segmapd_webhooks_received_total", **crm, code="202") == 2
    assert value(m, "segmapd_webhooks_received_total", **crm, code="401") == 1
    assert value(m, "segmapd_webhooks_received_total", **hs, code="200") == 1
    assert value(m, "segmapd_events_accepted_total", **crm) == 3
    assert value(m, "segmapd_assignments_accepted_total", **crm) == 5
    assert value(m, "segmapd_assignments_duplicate_total", **crm) == 1
    assert value(m, "segmapd_assignments_stale_total", **crm) == 1
    assert value(m, "segmapd_events_accepted_total", **hs) == 3
    assert value(m, "segmapd_events_redelivered_total", **hs) == 97
    assert value(m, "segmapd_events_dead_lettered_total", **hs) == 1
    assert value(m, "segmapd_events_skipped_total", **hs, reason="other_property") == 5


def test_bulk_and_upstream_metrics():
    m = Metrics()
    m.bulk_sent("seg-1", 200, 1)
    m.bulk_sent("seg-1", 42, 1)
    m.bulk_sent("seg-1", 1, 2)
    assert value(m, "segmapd_bulk_requests_total", attempt="first") == 2
    assert value(m, "segmapd_bulk_requests_total", attempt="resend") == 1
    assert value(m, "segmapd_bulk_request_ids_bucket", le="1.0") == 1
    assert value(m, "segmapd_bulk_request_ids_bucket", le="50.0") == 2
    assert value(m, "segmapd_bulk_request_ids_bucket", le="195.0") == 2
    assert value(m, "segmapd_bulk_request_ids_bucket", le="200.0") == 3
    assert value(m, "segmapd_bulk_request_ids_sum") == 243

    m.on_response("bulk", 200, 0.12)
    m.on_response("bulk", 429, 0.01)
    m.on_response("bulk", 429, 0.01)
    m.on_response("read", 0, 30.0)
    m.upstream_outcome("bulk", "ok", 0.12)
    m.upstream_outcome("bulk", "rate_limited", 0.01)
    m.upstream_outcome("read", "transient", 30.0)
    assert value(m, "segmapd_upstream_requests_total", endpoint="bulk", code="200") == 1
    assert value(m, "segmapd_upstream_requests_total", endpoint="bulk", code="429") == 2
    assert value(m, "segmapd_upstream_requests_total", endpoint="read", code="none") == 1
    assert value(m, "segmapd_upstream_rate_limited_total", endpoint="bulk") == 2
    assert value(m, "segmapd_upstream_request_duration_seconds_count", endpoint="bulk") == 3
    assert value(
        m, "segmapd_upstream_request_duration_seconds_sum", endpoint="read"
    ) == pytest.approx(30.0)
    assert value(m, "segmapd_upstream_outcomes_total", endpoint="bulk", outcome="ok") == 1
    assert value(m, "segmapd_upstream_outcomes_total", endpoint="bulk", outcome="rate_limited") == 1
    assert value(m, "segmapd_upstream_outcomes_total", endpoint="read", outcome="transient") == 1
    # The console's samples read these totals without a scrape: the same figures.
    assert m.upstream_requests_by_endpoint() == {"bulk": 3, "read": 1}
    assert m.rate_limited_answers() == 2
    m.record_webhook("crm", "standard", 202)
    m.record_webhook("crm", "standard", 400)
    m.record_webhook("hs", "hubspot", 200)
    assert (
        m.webhooks_answered()
        == 3
        == sum(s.value for s in samples(m) if s.name == "segmapd_webhooks_received_total")
    )


def test_validation_retry_and_notification_counters():
    m = Metrics()
    m.membership_read("seg-1", True)
    m.membership_read("seg-1", True, Lane.BULK)
    m.membership_read("seg-1", False)
    m.record_cache_hit(3)
    m.record_cache_hit()
    m.segment_refreshed("seg-1")
    m.retry_scheduled("seg-1", 17, 2.5)
    m.record_notification("delivered")
    m.record_notification("failed")
    assert value(m, "segmapd_validation_reads_total", result="member", lane="live") == 1
    assert value(m, "segmapd_validation_reads_total", result="member", lane="bulk") == 1
    assert value(m, "segmapd_validation_reads_total", result="not_member", lane="live") == 1
    assert value(m, "segmapd_validation_reads_total", result="not_member", lane="bulk") == 0
    assert value(m, "segmapd_validation_cache_hits_total") == 4
    assert value(m, "segmapd_segment_refreshes_total") == 1
    assert value(m, "segmapd_retries_scheduled_total") == 17
    assert value(m, "segmapd_notifications_total", outcome="delivered") == 1
    assert value(m, "segmapd_notifications_total", outcome="failed") == 1


def test_bound_callables_are_read_at_scrape_time():
    m = Metrics()
    assert value(m, "segmapd_buffer_depth", lane="live") == 0
    counts = {"buffered": 5, "writes": 7, "validation": 2}
    waited = {"bulk": 1.5}
    m.bind_engine(
        buffered=lambda: {Lane.LIVE: counts["buffered"], Lane.BULK: 1},
        pending_writes=lambda: counts["writes"],
        pending_validation=lambda: counts["validation"],
    )
    m.bind_gates({"bulk": lambda: waited["bulk"], "read": lambda: 0.0})
    assert value(m, "segmapd_buffer_depth", lane="live") == 5
    assert value(m, "segmapd_buffer_depth", lane="bulk") == 1
    assert value(m, "segmapd_pending_writes") == 7
    assert value(m, "segmapd_pending_validations") == 2
    assert value(m, "segmapd_ratelimit_wait_seconds_total", endpoint="bulk") == 1.5
    counts["buffered"] = 9
    waited["bulk"] = 4.0
    assert value(m, "segmapd_buffer_depth", lane="live") == 9
    assert value(m, "segmapd_ratelimit_wait_seconds_total", endpoint="bulk") == 4.0
    assert value(m, "segmapd_ratelimit_wait_seconds_total", endpoint="read") == 0.0


def test_a_failing_callable_does_not_break_the_scrape(caplog):
    m = Metrics()

    def broken() -> dict[Lane, int]:
        raise RuntimeError("engine gone")

    m.bind_engine(buffered=broken, pending_writes=lambda: 1, pending_validation=lambda: 0)
    assert math.isnan(value(m, "segmapd_buffer_depth", lane="live"))
    assert value(m, "segmapd_pending_writes") == 1
    assert "metrics callback buffered failed" in caplog.text


def test_registries_are_independent_and_exposition_is_well_formed():
    one, two = Metrics(), Metrics()
    one.record_webhook("crm", "standard", 202)
    assert (
        value(one, "segmapd_webhooks_received_total", source="crm", kind="standard", code="202")
        == 1
    )
    assert not [s for s in samples(two) if s.name == "segmapd_webhooks_received_total"]
    body, content_type = one.render()
    assert content_type.startswith("text/plain")
    families = list(text_string_to_metric_families(body.decode()))
    names = {f.name for f in families}
    assert all(n.startswith("segmapd_") for n in names)
    assert all(f.documentation for f in families)
    counters = [f for f in families if f.type == "counter"]
    assert counters
    assert all(s.name.endswith(("_total", "_created")) for f in counters for s in f.samples)


def test_no_ids_or_secrets_in_labels():
    m = Metrics()
    a = new_assignment(m, "contact-secret-id")
    move(m, a, State.SENDING, 1001.0)
    m.bulk_sent("segment-xyz", 10, 1)
    m.membership_read("segment-xyz", True)
    m.segment_refreshed("segment-xyz")
    m.retry_scheduled("segment-xyz", 1, 1.0)
    body, _ = m.render()
    assert b"contact-secret-id" not in body
    assert b"segment-xyz" not in body


def exercised() -> Metrics:
    m = Metrics()
    m.bind_engine(lambda: {Lane.LIVE: 3, Lane.BULK: 4}, lambda: 2, lambda: 1)
    m.bind_gates({"bulk": lambda: 0.5, "single": lambda: 0.0, "read": lambda: 1.25})
    m.record_webhook("crm", "standard", 202)
    m.record_delivery("crm", "standard", Outcome(accepted=2, events=1))
    m.record_skipped("crm", "hubspot", "other_property")
    a = new_assignment(m, "c1")
    for state in (State.SENDING, State.WRITTEN, State.VERIFYING, State.ACTIVE):
        move(m, a, state, 1003.0)
    m.bulk_sent("s", 2, 1)
    m.on_response("bulk", 200, 0.2)
    m.on_response("single", 0, 10.0)
    m.upstream_outcome("bulk", "ok", 0.2)
    m.membership_read("s", True)
    m.record_notification("delivered")
    census = JournalCensus(MemoryStore().counts)
    asyncio.run(census.refresh())
    m.bind_journal(census)
    return m


def test_promtool_check_metrics_is_clean():
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail(PROMTOOL_HINT)
        pytest.skip("promtool not on PATH (" + PROMTOOL_HINT + ")")
    body, _ = exercised().render()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
    )
    report = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, report
    assert report.strip() == "", report


def test_work_taken_back_from_the_journal_is_in_the_state_gauges():
    # After a restart the gauges must count what recovery took back, or the first transitions
    # of that work would drive them below zero.
    m = Metrics()
    engine = build_scheduler(
        client=HttpCXoneClient(emulator_settings("http://127.0.0.1:9")),  # never called
        store=MemoryStore(),
        write_gate=RateGate("bulk", 10.0),
        single_gate=RateGate("single", 2.0),
        batching=BatchingPolicy(),
        retry=RetryPolicy(),
        observer=m,
    ).engine
    written = Assignment("c3", "s", state=State.WRITTEN, received_at=1.0, updated_at=2.0)
    engine.restore(
        [written],
        [],
        queued=[("c1", "s", 1.0, "add", 0.0, "live"), ("c2", "s", 1.0, "add", 0.0, "live")],
    )
    assert by_state(m)["queued"] == 2
    assert by_state(m)["written"] == 1
    move(m, written, State.VERIFYING, 3.0)
    assert by_state(m)["written"] == 0 and by_state(m)["verifying"] == 1


# ---- the journal's assignments by state (daemon/census.py) --------------------------------------


def journal_by_state(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["state"]: s.value
        for s in samples(metrics)
        if s.name == "segmapd_journal_assignments"
    }


def journaled(contact: str, *steps: State) -> Assignment:
    """An assignment that went through `steps` just now (journaled once, in its last state).

    Now, not at some fixed past time: the journal prunes finished work past its retention.
    """
    now = time.time()
    a = Assignment(contact, "seg-1", received_at=now, updated_at=now)
    for step in steps:
        reason = FailureReason.CONTACT_NOT_FOUND if step is State.FAILED else None
        a.transition(step, now, reason=reason)
    return a


WRITTEN_THEN = (State.SENDING, State.WRITTEN, State.VERIFYING)


async def test_the_journal_gauge_counts_finished_work_from_a_real_journal(tmp_path: Path):
    store = SqliteStore(str(tmp_path / "journal.db"))
    await store.open()
    try:
        for i in range(7):
            store.record(journaled(f"a{i}", *WRITTEN_THEN, State.ACTIVE))
        for i in range(3):
            store.record(journaled(f"f{i}", State.SENDING, State.FAILED))
        store.record(journaled("r0", *WRITTEN_THEN, State.REMOVED))
        store.record(journaled("q0"))
        store.record(journaled("v0", *WRITTEN_THEN))
        await store.flush()
        m = Metrics()
        census = JournalCensus(store.counts, clock=lambda: 1_700_000_000.0)
        m.bind_journal(census)
        # Not counted yet: no series, rather than a 0 that would be a false answer.
        assert journal_by_state(m) == {}
        assert not [s for s in samples(m) if s.name.startswith("segmapd_journal_counted")]
        await census.refresh()
        assert journal_by_state(m) == {
            "queued": 1,
            "sending": 0,
            "retrying": 0,
            "written": 0,
            "verifying": 1,
            "active": 7,
            "removed": 1,
            "failed": 3,
        }
        assert value(m, "segmapd_journal_counted_timestamp_seconds") == 1_700_000_000.0
        assert census.latest is not None and census.latest.total == 13
    finally:
        await store.close()


async def test_the_census_counts_again_by_itself_and_keeps_its_last_count_when_it_cannot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    store = SqliteStore(str(tmp_path / "journal.db"))
    await store.open()
    # At most 0.5 s between counts: at the default duty a count slowed to 50 ms by a loaded
    # machine would put the next one 10 s away (a costly count is the next test's).
    census = JournalCensus(store.counts, min_interval_s=0.05, max_interval_s=0.5)
    m = Metrics()
    m.bind_journal(census)
    try:
        await census.start()
        store.record(journaled("a0", *WRITTEN_THEN, State.ACTIVE))
        await store.flush()
        async with asyncio.timeout(10):
            while journal_by_state(m).get("active") != 1:
                await asyncio.sleep(0.01)
        # The journal goes away (closed here): the last count stays, with its time.
        await store.close()
        async with asyncio.timeout(10):
            while "cannot count the journal's assignments" not in caplog.text:
                await asyncio.sleep(0.01)
        # (Taken once counting fails: a count may have succeeded between the wait above and
        # the close.) A further count that fails changes neither the counts nor their time.
        counted = value(m, "segmapd_journal_counted_timestamp_seconds")
        with pytest.raises(Exception):  # noqa: B017 (whatever the closed journal raises)
            await census.refresh()
        assert journal_by_state(m)["active"] == 1
        assert value(m, "segmapd_journal_counted_timestamp_seconds") == counted
    finally:
        await census.stop()
        await store.close()


async def test_a_costly_count_is_repeated_less_often(tmp_path: Path):
    store = SqliteStore(str(tmp_path / "journal.db"))
    await store.open()
    try:

        async def slow_count() -> dict[str, int]:
            await asyncio.sleep(0.05)  # a count that costs 50 ms, as a large journal's would
            return await store.counts()

        census = JournalCensus(slow_count, min_interval_s=1.0, max_interval_s=60.0, duty=0.005)
        assert census.next_interval_s() == 1.0  # before the first count: soon
        await census.refresh()
        assert census.latest is not None and census.latest.duration_s >= 0.05
        # 0.5 % of the time: 50 ms of counting per 10 s or more.
        assert census.next_interval_s() == pytest.approx(census.latest.duration_s / 0.005)
        assert 10.0 <= census.next_interval_s() <= 60.0
    finally:
        await store.close()


# ---- what the alerts and the dashboard read (deploy/) ------------------------------------------


def test_the_series_alerts_read_exist_at_zero_before_any_event():
    m = Metrics()
    for endpoint in ("bulk", "single", "read", "refresh", "token"):
        assert value(m, "segmapd_upstream_rate_limited_total", endpoint=endpoint) == 0
        assert value(m, "segmapd_upstream_request_duration_seconds_count", endpoint=endpoint) == 0
    for outcome in ("ok", "rate_limited", "transient", "permanent", "auth", "local", "error"):
        assert value(m, "segmapd_upstream_outcomes_total", endpoint="bulk", outcome=outcome) == 0
    for outcome in ("delivered", "retry", "dropped"):
        assert value(m, "segmapd_notifications_total", outcome=outcome) == 0


def test_a_declared_source_has_its_intake_series_before_its_first_webhook():
    m = Metrics()
    m.declare_source("sf", "salesforce", 200, ["missing_field"])
    sf = {"source": "sf", "kind": "salesforce"}
    assert value(m, "segmapd_webhooks_received_total", **sf, code="200") == 0
    assert value(m, "segmapd_events_accepted_total", **sf) == 0
    assert value(m, "segmapd_events_skipped_total", **sf, reason="missing_field") == 0
    m.record_webhook("sf", "salesforce", 200)
    m.record_delivery("sf", "salesforce", Outcome(accepted=1, events=1))
    m.declare_source("sf", "salesforce", 200, ["missing_field"])  # again: nothing is reset
    assert value(m, "segmapd_webhooks_received_total", **sf, code="200") == 1
    assert value(m, "segmapd_events_accepted_total", **sf) == 1


def test_readiness_and_high_water_gauges():
    m = Metrics()
    assert value(m, "segmapd_ready") == 0  # nothing bound: nothing is serving
    assert value(m, "segmapd_high_water") == 0
    verdict = {"ready": math.nan}
    m.bind_readiness(lambda: verdict["ready"])
    assert math.isnan(value(m, "segmapd_ready"))
    verdict["ready"] = 1.0
    assert value(m, "segmapd_ready") == 1
    m.set_high_water(5000)
    assert value(m, "segmapd_high_water") == 5000


def test_a_failing_readiness_callable_reads_nan(caplog):
    m = Metrics()

    def broken() -> float:
        raise RuntimeError("gone")

    m.bind_readiness(broken)
    assert math.isnan(value(m, "segmapd_ready"))
    assert "metrics callback ready failed" in caplog.text


def test_a_pass_is_counted_when_it_ends_not_when_it_stops_running_here():
    metrics = Metrics()
    metrics.record_pass("running", True, 100.0)
    assert value(metrics, "segmapd_reconcile_running") == 1
    # Left to another instance, or paused by a drain: still running, not ended.
    metrics.record_pass("running", False, 101.0)
    assert value(metrics, "segmapd_reconcile_running") == 0
    assert value(metrics, "segmapd_reconcile_passes_total", state="done") == 0
    assert not [s for s in samples(metrics) if s.labels.get("state") == "running"]
    metrics.record_pass("running", True, 102.0)
    metrics.record_pass("done", False, 103.0)
    assert value(metrics, "segmapd_reconcile_passes_total", state="done") == 1
    assert value(metrics, "segmapd_reconcile_last_done_timestamp_seconds") == 103.0
    metrics.record_drift(Intent.ADD, requeued=False)
    assert value(metrics, "segmapd_reconcile_drift_total", intent="add") == 1
    assert value(metrics, "segmapd_reconcile_requeued_total") == 0
