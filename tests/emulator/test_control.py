"""CONTRACT.md §5 test control API: config, reset, segments, members and counters."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import pytest

from tests.emulator.helpers import (
    Api,
    Reply,
    fast_indexing,
    fetch_token,
    list_segments,
    members_by_id,
    new_contact,
    new_contacts,
    poll_until,
    send,
    unlimited,
)
from tests.support.emulator import EmulatorControl


async def patch_config(http: aiohttp.ClientSession, base: str, patch: Any) -> Reply:
    """PATCH the config and return the raw answer (errors included)."""
    return await send(
        http,
        "PATCH",
        base + "/_emulator/config",
        headers={"Content-Type": "application/json"},
        data=json.dumps(patch),
    )


async def test_config_has_the_documented_defaults(emulator: EmulatorControl) -> None:
    config = await emulator.config()
    assert config["token_ttl_s"] == 3600
    assert config["auto_create_segments"] is True
    assert config["max_bulk_ids"] == 1000
    assert config["chunk_size"] == 200
    assert config["idempotency_ttl_s"] == 86400
    assert config["refresh_min_interval_s"] == 3600
    assert config["indexing"] == {"median_s": 3.0, "p99_s": 12.0, "stall_fraction": 0.02}
    assert config["limits"] == {
        "bulk": {"rate": 10, "burst": 10},
        "single": {"rate": 2, "burst": 2},
        "read": {"rate": 50, "burst": 50},
        "token": {"rate": 1, "burst": 1},
    }
    assert set(config["faults"]) >= {"bulk", "single", "read", "refresh", "token"}
    for knobs in config["faults"].values():
        assert knobs["error_rate"] == 0
        assert knobs["reset_rate"] == 0
        assert knobs["hang_rate"] == 0
        assert knobs["latency_ms"] == 0
    assert config["faults"]["bulk"]["after_apply_fraction"] == 0.5


async def test_patch_deep_merges_and_answers_the_new_config(emulator: EmulatorControl) -> None:
    new = await emulator.configure({"limits": {"bulk": {"rate": 3}}, "indexing": {"p99_s": 9.0}})
    assert new["limits"]["bulk"] == {"rate": 3, "burst": 10}
    assert new["limits"]["read"] == {"rate": 50, "burst": 50}
    assert new["indexing"] == {"median_s": 3.0, "p99_s": 9.0, "stall_fraction": 0.02}
    assert await emulator.config() == new


@pytest.mark.parametrize(
    ("patch", "name"),
    [
        ({"no_such_setting": 1}, "no_such_setting"),
        ({"indexing": {"mean_s": 1}}, "mean_s"),
        ({"limits": {"bulk": {"rate": 1, "bursty": 2}}}, "bursty"),
        ({"faults": {"read": {"drop_rate": 0.5}}}, "drop_rate"),
    ],
    ids=["top-level", "indexing", "limits", "faults"],
)
async def test_patch_with_an_unknown_key_is_400_naming_it(
    emulator: EmulatorControl, http: aiohttp.ClientSession, base: str, patch: Any, name: str
) -> None:
    before = await emulator.config()
    reply = await patch_config(http, base, patch)
    assert reply.status == 400, reply.text
    assert name in reply.text
    # Nothing of a rejected patch is applied.
    assert await emulator.config() == before


async def test_reset_forgets_state_but_keeps_config_unless_asked(
    api: Api, emulator: EmulatorControl, http: aiohttp.ClientSession, base: str, seg: str
) -> None:
    await emulator.configure({"limits": {"bulk": {"rate": 1, "burst": 1}}})
    key = f"k-{uuid.uuid4()}"
    assert (await api.bulk(seg, [new_contact()], key=key)).status == 200
    assert (await api.bulk(seg, [new_contact()])).status == 429  # bucket empty
    assert (await api.refresh(seg)).status == 202

    await emulator.reset(config=False)

    assert (await emulator.config())["limits"]["bulk"] == {"rate": 1, "burst": 1}
    assert not await list_segments(emulator)
    assert not await members_by_id(emulator, seg)
    counters = await emulator.counters()
    assert counters["bulk_ids"]["requests"] == 0
    assert counters["rate_limited"]["bulk"] == 0
    assert not any(counters["requests"][cls] for cls in counters["requests"])
    # Tokens are forgotten too.
    assert (await api.membership(seg, new_contact())).status == 401
    fresh = Api(http, base, (await fetch_token(http, base))["access_token"])
    # Rate buckets, idempotency keys and refresh history are forgotten.
    other = [new_contact()]
    reply = await fresh.bulk(seg, other, key=key)
    assert reply.status == 200, reply.text
    assert not reply.replayed
    assert (await fresh.refresh(seg)).status == 202

    await emulator.reset(config=True)
    assert (await emulator.config())["limits"]["bulk"] == {"rate": 10, "burst": 10}


async def test_segments_declare_list_and_delete(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    dynamic = seg + "_dyn"
    await emulator.declare_segment(seg, "static")
    await emulator.declare_segment(dynamic, "dynamic")
    await api.bulk(seg, new_contacts(3))
    listed = {s["segmentId"]: s for s in await list_segments(emulator)}
    assert listed[seg] == {"segmentId": seg, "kind": "static", "members": 3}
    assert listed[dynamic] == {"segmentId": dynamic, "kind": "dynamic", "members": 0}
    await emulator.delete_segment(dynamic)
    assert dynamic not in {s["segmentId"] for s in await list_segments(emulator)}


async def test_members_listing_shape(api: Api, emulator: EmulatorControl, seg: str) -> None:
    await fast_indexing(emulator)
    contact = new_contact()
    await api.bulk(seg, [contact])
    member = (await members_by_id(emulator, seg))[contact]
    assert set(member) == {
        "contactId",
        "addedAt",
        "indexed",
        "stalled",
        "applied",
        "isMember",
        "pendingWrites",
        "removal",
    }
    assert member["applied"] == 1
    assert member["stalled"] is False
    assert member["removal"] is None

    async def indexed() -> bool:
        return bool((await members_by_id(emulator, seg))[contact]["indexed"])

    await poll_until(indexed, timeout_s=5)
    assert await api.is_member(seg, contact)


async def test_counters_shape_and_values(api: Api, emulator: EmulatorControl, seg: str) -> None:
    await unlimited(emulator, "bulk", "read")
    sizes = [1, 2, 60, 200, 201]
    for size in sizes:
        ids = [f"s{size}_{i}" for i in range(size)]
        assert (await api.bulk(seg, ids)).status == 200
    dup = new_contact()
    assert (await api.bulk(seg, [dup, dup, new_contact()])).status == 200
    assert (await api.bulk(seg, ["s1_0"])).json["failureCount"] == 1  # already a member
    assert (await api.membership(seg, "s1_0")).status == 200

    counters = await emulator.counters()
    assert set(counters) >= {
        "requests",
        "bulk_ids",
        "duplicate_ids_in_request",
        "idempotent_replays",
        "idempotency_conflicts",
        "rate_limited",
        "peak_rps",
        "peak_admitted_rps",
        "items",
        "applied_twice",
        "faults",
    }
    assert set(counters["requests"]) >= {"bulk", "single", "read", "refresh", "token", "discovery"}
    assert counters["requests"]["bulk"] == {"200": 7}
    assert counters["requests"]["read"] == {"200": 1}
    assert counters["requests"]["token"] == {"200": 1}

    bulk_ids = counters["bulk_ids"]
    assert bulk_ids["requests"] == 7
    assert bulk_ids["ids"] == sum(sizes) + 3 + 1
    assert bulk_ids["max"] == 201
    assert bulk_ids["histogram"] == {
        "1": 2,
        "2-49": 2,
        "50-99": 1,
        "100-149": 0,
        "150-199": 0,
        "200": 1,
        "201-1000": 1,
    }
    assert counters["duplicate_ids_in_request"] >= 1
    assert counters["items"]["DuplicateContactInBatch"] == 2
    assert counters["items"]["added"] == sum(sizes) + 1
    assert counters["items"]["ContactAlreadyInSegment"] == 1
    assert counters["applied_twice"] == 1
    assert counters["idempotent_replays"] == 0
    assert counters["idempotency_conflicts"] == {
        "IdempotencyKeyReused": 0,
        "IdempotencyKeyInProgress": 0,
    }
    for name in ("rate_limited", "peak_rps", "peak_admitted_rps"):
        assert set(counters[name]) >= {"bulk", "single", "read", "token", "refresh"}, name
    assert counters["peak_rps"]["bulk"] >= 1
    assert counters["peak_admitted_rps"]["bulk"] <= counters["peak_rps"]["bulk"]
    assert counters["peak_rps"]["token"] == 1
    assert counters["faults"] == {"error": 0, "reset": 0, "hang": 0}


async def test_counters_count_discovery(
    emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    await send(http, "GET", base + "/.well-known/openid-configuration")
    counters = await emulator.counters()
    assert counters["requests"]["discovery"].get("200") == 1


async def test_expire_tokens(api: Api, emulator: EmulatorControl, seg: str) -> None:
    assert (await api.membership(seg, new_contact())).status == 200
    await emulator.expire_tokens()
    assert (await api.membership(seg, new_contact())).status == 401
