"""The removal calls (CONTRACT.md §2b) against the real emulator process."""

from __future__ import annotations

import asyncio

import pytest

from daemon.config import Config
from daemon.cxone import CXonePaths
from daemon.wiring import cxone_settings
from scheduler.upstream import (
    BulkResult,
    PermanentError,
    RateLimited,
    SegmentNotFound,
    SingleResult,
    TransientError,
)
from tests.cxone.conftest import MakeClient, Recorder
from tests.support.emulator import EmulatorControl

FAST_INDEXING = {"indexing": {"median_s": 0.3, "p99_s": 0.5, "stall_fraction": 0.0}}


async def test_bulk_remove_reports_removed_and_failed_items(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.set_missing_contacts(["c_missing"])
    client = await make_client()
    await client.bulk_add("seg_r", ["c1", "c2"], "add-1")

    ids = ["c1", "c_never", "c_missing", "bad id!"]
    result = await client.bulk_remove("seg_r", ids, "remove-1")
    assert (result.segment_id, result.success_count, result.failure_count) == ("seg_r", 1, 3)
    assert result.replayed is False
    failed = {item.contact_id: (item.code, item.error) for item in result.failed}
    assert failed == {
        "c_never": (409, "ContactNotInSegment"),
        "c_missing": (404, "ContactNotFound"),
        "bad id!": (400, "InvalidContactId"),
    }
    # Same key, same body: the stored answer again, nothing removed twice.
    replay = await client.bulk_remove("seg_r", ids, "remove-1")
    assert replay.replayed is True
    assert (replay.success_count, replay.failure_count) == (1, 3)
    # A second removal of a removed member: the absence already holds.
    again = await client.bulk_remove("seg_r", ["c1"], "remove-2")
    assert [(i.contact_id, i.code, i.error) for i in again.failed] == [
        ("c1", 409, "ContactNotInSegment")
    ]
    counters = await emulator.counters()
    assert counters["requests"]["bulk_remove"] == {"200": 3}
    assert counters["bulk_remove_ids"]["requests"] == 2
    assert [m["contactId"] for m in await emulator.members("seg_r") if m["removal"] is None] == [
        "c2"
    ]


async def test_single_remove_removed_and_item_errors_are_results(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure({"limits": {"single": {"rate": 0, "burst": 1}}})
    await emulator.set_missing_contacts(["c_missing"])
    client = await make_client()
    await client.bulk_add("seg_sr", ["c1"], "add-sr")

    removed = await client.single_remove("seg_sr", "c1", "rm-1")
    assert removed == SingleResult(status=200)
    replay = await client.single_remove("seg_sr", "c1", "rm-1")
    assert (replay.status, replay.error, replay.replayed) == (200, None, True)
    # Not raised: the engine treats it as success.
    absent = await client.single_remove("seg_sr", "c1", "rm-2")
    assert (absent.status, absent.error) == (409, "ContactNotInSegment")
    never = await client.single_remove("seg_sr", "c_never", "rm-3")
    assert (never.status, never.error) == (409, "ContactNotInSegment")
    missing = await client.single_remove("seg_sr", "c_missing", "rm-4")
    assert (missing.status, missing.error) == (404, "ContactNotFound")
    invalid = await client.single_remove("seg_sr", "bad id!", "rm-5")
    assert (invalid.status, invalid.error) == (400, "InvalidContactId")
    counters = await emulator.counters()
    assert counters["requests"]["single_remove"] == {"200": 2, "409": 2, "404": 1, "400": 1}


async def test_index_busy_removals_are_item_results(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    client = await make_client()
    await client.bulk_add("seg_rb", ["c1", "c2"], "add-rb")
    await emulator.configure(
        {"faults": {"bulk": {"index_busy_rate": 1.0}, "single": {"index_busy_rate": 1.0}}}
    )
    result = await client.bulk_remove("seg_rb", ["c1", "c2"], "rm-rb")
    assert result.success_count == 0
    assert {(item.code, item.error) for item in result.failed} == {(503, "IndexBusy")}
    single = await client.single_remove("seg_rb", "c1", "rm-rb-1")
    assert (single.status, single.error) == (503, "IndexBusy")


async def test_removal_whole_request_errors_raise_classified(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure({"auto_create_segments": False})
    client = await make_client()
    with pytest.raises(SegmentNotFound):
        await client.bulk_remove("seg_unknown", ["c1"], "rm-u-1")
    with pytest.raises(SegmentNotFound):
        await client.single_remove("seg_unknown", "c1", "rm-u-2")
    await emulator.configure({"auto_create_segments": True})
    with pytest.raises(PermanentError) as too_large:
        await client.bulk_remove("seg_big", [f"c{i}" for i in range(1001)], "rm-big")
    assert (too_large.value.status, too_large.value.error) == (413, "BatchTooLarge")
    with pytest.raises(PermanentError) as empty:
        await client.bulk_remove("seg_big", [], "rm-empty")
    assert (empty.value.status, empty.value.error) == (400, "EmptyBatch")

    await emulator.configure({"faults": {"bulk": {"error_rate": 1.0}}})
    with pytest.raises(TransientError) as server:
        await client.bulk_remove("seg_big", ["c1"], "rm-5xx")
    assert server.value.status in {500, 502, 503, 504}


async def test_a_key_of_an_add_is_never_a_removals_key(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    client = await make_client()
    await client.bulk_add("seg_k", ["c1"], "shared-key")
    with pytest.raises(PermanentError) as caught:
        await client.bulk_remove("seg_k", ["c1"], "shared-key")
    assert (caught.value.status, caught.value.error) == (409, "IdempotencyKeyReused")
    # Nothing was removed.
    [member] = await emulator.members("seg_k")
    assert member["removal"] is None


async def test_removals_share_the_bulk_write_bucket(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure({"limits": {"bulk": {"rate": 0.01, "burst": 1}}})
    client = await make_client()
    assert await client.bulk_add("seg_l", ["c1"], "add-l") == BulkResult("seg_l", 1, 0)
    with pytest.raises(RateLimited) as caught:
        await client.bulk_remove("seg_l", ["c1"], "rm-l")
    assert caught.value.retry_after_s >= 1
    counters = await emulator.counters()
    assert counters["rate_limited"]["bulk_remove"] == 1
    assert counters["removal_items"]["removed"] == 0


async def test_removal_resent_once_with_a_new_token_after_401(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    recorder = Recorder()
    client = await make_client(on_response=recorder)
    await client.bulk_add("seg_t", ["c1", "c2"], "add-t")
    await emulator.expire_tokens()
    await asyncio.sleep(1.1)  # the token endpoint allows 1 request/s
    result = await client.bulk_remove("seg_t", ["c1"], "rm-t")
    assert result.success_count == 1
    assert recorder.statuses("bulk") == [200, 401, 200]
    await emulator.expire_tokens()
    await asyncio.sleep(1.1)
    single = await client.single_remove("seg_t", "c2", "rm-t-2")
    assert single.status == 200
    assert recorder.statuses("single") == [401, 200]


async def test_configured_removal_paths_are_used(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    # The removal paths are their own settings: pointing them elsewhere leaves the adds alone.
    elsewhere = CXonePaths(
        bulk_remove="/custom/{segmentId}/members",
        member_remove="/custom/{segmentId}/members/{contactId}",
    )
    client = await make_client(paths=elsewhere)
    await client.bulk_add("seg_p", ["c1"], "add-p")
    with pytest.raises(PermanentError) as bulk:
        await client.bulk_remove("seg_p", ["c1"], "rm-p")
    assert bulk.value.status == 404
    with pytest.raises(PermanentError) as single:
        await client.single_remove("seg_p", "c1", "rm-p-1")
    assert single.value.status == 404
    counters = await emulator.counters()
    assert counters["requests"]["bulk_remove"] == {}
    assert counters["requests"]["single_remove"] == {}


def test_the_daemon_passes_the_removal_paths_from_its_config() -> None:
    config = Config.model_validate(
        {
            "cxone": {
                "client_id": "id",
                "client_secret": "s",
                "grant": "client_credentials",
                "paths": {
                    "bulk_remove": "/v9/{segmentId}/removals",
                    "member_remove": "/v9/{segmentId}/removals/{contactId}",
                },
            }
        }
    )
    paths = cxone_settings(config).paths
    assert paths.bulk_remove_path("s 1") == "/v9/s%201/removals"
    assert paths.member_remove_path("s", "c:1") == "/v9/s/removals/c%3A1"
    assert paths.bulk_path("s") == "/api/v2/segments/s/contacts"
    minimal = {"cxone": {"client_id": "id", "client_secret": "s", "grant": "client_credentials"}}
    defaults = cxone_settings(Config.model_validate(minimal)).paths
    assert defaults == CXonePaths()
    assert defaults.member_remove == "/api/v2/segments/{segmentId}/contacts/{contactId}"
