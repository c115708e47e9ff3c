"""The segment API calls against the real emulator process: results and error classification."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from daemon.cxone import CXonePaths, HttpCXoneClient
from scheduler.upstream import (
    BulkResult,
    ItemFailure,
    PermanentError,
    RateLimited,
    SegmentNotFound,
    SingleResult,
    TransientError,
)
from tests.cxone.conftest import MakeClient, Recorder, emulator_settings
from tests.support.emulator import EmulatorControl
from tests.support.processes import ManagedProcess

FAST_INDEXING = {"indexing": {"median_s": 0.5, "p99_s": 0.8, "stall_fraction": 0.0}}


async def test_bulk_add_reports_added_and_failed_items(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.set_missing_contacts(["c_missing"])
    client = await make_client()
    first = await client.bulk_add("seg_b", ["c1", "c2"], "key-b-1")
    assert first == BulkResult(segment_id="seg_b", success_count=2, failure_count=0)

    ids = ["c1", "c_missing", "bad id!", "c3"]
    second = await client.bulk_add("seg_b", ids, "key-b-2")
    assert (second.success_count, second.failure_count, second.replayed) == (1, 3, False)
    failed = {item.contact_id: item for item in second.failed}
    assert failed["c1"].code == 409
    assert failed["c1"].error == "ContactAlreadyInSegment"
    assert (failed["c_missing"].code, failed["c_missing"].error) == (404, "ContactNotFound")
    assert (failed["bad id!"].code, failed["bad id!"].error) == (400, "InvalidContactId")
    assert all(isinstance(item, ItemFailure) for item in second.failed)

    # Same key, same body: the stored answer again, marked as replayed, nothing applied.
    replay = await client.bulk_add("seg_b", ids, "key-b-2")
    assert replay.replayed is True
    assert (replay.success_count, replay.failure_count) == (1, 3)
    assert len(await emulator.members("seg_b")) == 3


async def test_bulk_add_index_busy_items(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure({"faults": {"bulk": {"index_busy_rate": 1.0}}})
    client = await make_client()
    result = await client.bulk_add("seg_busy", ["c1", "c2"], "key-busy")
    assert result.success_count == 0
    assert {(item.code, item.error) for item in result.failed} == {(503, "IndexBusy")}


async def test_single_add_created_and_item_errors_are_results(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure({"limits": {"single": {"rate": 0, "burst": 1}}})
    await emulator.set_missing_contacts(["c_missing"])
    client = await make_client()

    created = await client.single_add("seg_s", "c1", "key-s-1")
    assert created == SingleResult(status=201)
    replay = await client.single_add("seg_s", "c1", "key-s-1")
    assert (replay.status, replay.error, replay.replayed) == (201, None, True)

    again = await client.single_add("seg_s", "c1", "key-s-2")
    assert (again.status, again.error) == (409, "ContactAlreadyInSegment")
    missing = await client.single_add("seg_s", "c_missing", "key-s-3")
    assert (missing.status, missing.error) == (404, "ContactNotFound")
    invalid = await client.single_add("seg_s", "bad id!", "key-s-4")
    assert (invalid.status, invalid.error) == (400, "InvalidContactId")

    await emulator.configure({"faults": {"single": {"index_busy_rate": 1.0}}})
    busy = await client.single_add("seg_s", "c2", "key-s-5")
    assert (busy.status, busy.error) == (503, "IndexBusy")


async def test_single_add_whole_request_errors_raise(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure({"auto_create_segments": False})
    client = await make_client()
    with pytest.raises(SegmentNotFound):
        await client.single_add("seg_unknown", "c1", "key-sn")
    await emulator.configure({"faults": {"single": {"error_rate": 1.0}}})
    await asyncio.sleep(0.6)  # single writes: 2 per second
    with pytest.raises(TransientError) as caught:
        await client.single_add("seg_unknown", "c1", "key-sn-2")
    assert caught.value.status >= 500


async def test_is_member_before_and_after_indexing(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure(FAST_INDEXING)
    client = await make_client()
    await client.bulk_add("seg_i", ["c1"], "key-i-1")
    before = await client.is_member("seg_i", "c1")
    assert (before.is_member, before.added_at) == (False, None)
    await asyncio.sleep(1.5)
    after = await client.is_member("seg_i", "c1")
    assert after.is_member is True
    assert isinstance(after.added_at, str)
    assert after.added_at
    assert (await client.is_member("seg_i", "c_other")).is_member is False


async def test_refresh_accepted_then_refused_with_retry_after(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    # Every write stalls: only a refresh makes it visible.
    await emulator.configure({"indexing": {"stall_fraction": 1.0}})
    client = await make_client()
    await client.bulk_add("seg_r", ["c1"], "key-r-1")
    assert (await client.is_member("seg_r", "c1")).is_member is False

    first = await client.refresh("seg_r")
    assert first.accepted is True
    await asyncio.sleep(1.2)
    assert (await client.is_member("seg_r", "c1")).is_member is True

    second = await client.refresh("seg_r")
    assert second.accepted is False
    assert 3000 < second.retry_after_s <= 3600


async def test_server_errors_are_transient(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure({"faults": {"bulk": {"error_rate": 1.0}, "read": {"error_rate": 1.0}}})
    client = await make_client()
    with pytest.raises(TransientError) as caught:
        await client.bulk_add("seg_e", ["c1"], "key-e-1")
    assert caught.value.status in {500, 502, 503, 504}
    assert caught.value.error in {
        "InternalError",
        "BadGateway",
        "ServiceUnavailable",
        "GatewayTimeout",
    }
    with pytest.raises(TransientError):
        await client.is_member("seg_e", "c1")


async def test_connection_reset_is_transient(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure({"faults": {"bulk": {"reset_rate": 1.0}}})
    recorder = Recorder()
    client = await make_client(on_response=recorder)
    with pytest.raises(TransientError):
        await client.bulk_add("seg_reset", ["c1"], "key-reset")
    assert recorder.statuses("bulk") == [0]


async def test_hang_past_timeout_is_transient(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure({"faults": {"read": {"hang_rate": 1.0, "hang_s": 2.0}}})
    client = await make_client(timeout_s=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TransientError) as caught:
        await client.is_member("seg_hang", "c1")
    assert caught.value.error == "Timeout"
    assert loop.time() - started < 1.5


async def test_rate_limit_is_rate_limited_with_retry_after(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure({"limits": {"bulk": {"rate": 0.5, "burst": 1}}})
    client = await make_client()
    await client.bulk_add("seg_rl", ["c1"], "key-rl-1")
    with pytest.raises(RateLimited) as caught:
        await client.bulk_add("seg_rl", ["c2"], "key-rl-2")
    assert caught.value.status == 429
    assert caught.value.retry_after_s >= 1.0
    counters = await emulator.counters()
    assert counters["requests"]["bulk"] == {"200": 1, "429": 1}


async def test_unknown_segment_is_segment_not_found(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure({"auto_create_segments": False})
    client = await make_client()
    with pytest.raises(SegmentNotFound) as caught:
        await client.bulk_add("seg_nope", ["c1"], "key-nf")
    assert (caught.value.status, caught.value.error) == (404, "SegmentNotFound")
    assert isinstance(caught.value, PermanentError)
    with pytest.raises(SegmentNotFound):
        await client.is_member("seg_nope", "c1")
    with pytest.raises(SegmentNotFound):
        await client.refresh("seg_nope")

    await emulator.declare_segment("seg_yes")
    assert (await client.bulk_add("seg_yes", ["c1"], "key-yes")).success_count == 1


async def test_idempotency_key_reused_is_permanent(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    client = await make_client()
    await client.bulk_add("seg_k", ["c1"], "key-k")
    with pytest.raises(PermanentError) as caught:
        await client.bulk_add("seg_k", ["c2"], "key-k")
    assert (caught.value.status, caught.value.error) == (409, "IdempotencyKeyReused")
    assert not isinstance(caught.value, SegmentNotFound)


async def test_idempotency_key_in_progress_is_transient(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    # The write is applied, then the answer hangs: its key stays "in progress" meanwhile.
    await emulator.configure(
        {"faults": {"bulk": {"hang_rate": 1.0, "hang_s": 3.0, "after_apply_fraction": 1.0}}}
    )
    client = await make_client(timeout_s=0.5)
    with pytest.raises(TransientError):
        await client.bulk_add("seg_p", ["c1"], "key-p")
    await emulator.configure({"faults": {"bulk": {"hang_rate": 0.0}}})
    with pytest.raises(TransientError) as caught:
        await client.bulk_add("seg_p", ["c1"], "key-p")
    assert (caught.value.status, caught.value.error) == (409, "IdempotencyKeyInProgress")


async def test_custom_paths_are_used(make_client: MakeClient, emulator: EmulatorControl) -> None:
    await emulator.configure(FAST_INDEXING)
    # Placeholders swapped: is_member(a, b) must GET /segments/b/contacts/a.
    swapped = CXonePaths(member="/api/v2/segments/{contactId}/contacts/{segmentId}")
    client = await make_client(paths=swapped)
    await client.bulk_add("seg_cp", ["c1"], "key-cp")
    await asyncio.sleep(1.5)
    assert (await client.is_member("c1", "seg_cp")).is_member is True

    elsewhere = CXonePaths(bulk="/custom/{segmentId}/members")
    other = await make_client(paths=elsewhere)  # its token: over 1 s after the first one
    with pytest.raises(PermanentError) as caught:
        await other.bulk_add("seg_cp", ["c2"], "key-cp-2")
    assert caught.value.status == 404
    assert not isinstance(caught.value, SegmentNotFound)
    counters = await emulator.counters()
    assert counters["requests"]["bulk"] == {"200": 1}


async def test_ids_needing_quotes_reach_the_emulator(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure(FAST_INDEXING)
    client = await make_client()
    await client.bulk_add("seg:q.1", ["123456789012", "contact_ab:cd.ef-1"], "key-q")
    await asyncio.sleep(1.5)
    assert (await client.is_member("seg:q.1", "contact_ab:cd.ef-1")).is_member is True
    assert (await client.is_member("seg:q.1", "123456789012")).is_member is True


async def test_lifecycle(emulator: EmulatorControl, emulator_proc: ManagedProcess) -> None:
    client = HttpCXoneClient(emulator_settings(emulator_proc.url))
    with pytest.raises(RuntimeError, match="start"):
        await client.is_member("seg", "c1")
    async with client:
        await client.start()  # idempotent
        assert (await client.is_member("seg", "c1")).is_member is False
    await client.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await client.is_member("seg", "c1")
    assert "secret" not in repr(client)


async def test_given_session_is_shared_and_left_open(
    emulator: EmulatorControl, emulator_proc: ManagedProcess, http: aiohttp.ClientSession
) -> None:
    async with HttpCXoneClient(emulator_settings(emulator_proc.url), session=http) as client:
        assert (await client.is_member("seg", "c1")).is_member is False
    assert not http.closed
