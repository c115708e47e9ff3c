"""CONTRACT.md §2: bulk membership writes, per-item errors, whole-request errors, masking."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.emulator.helpers import (
    Api,
    applied,
    fast_indexing,
    list_segments,
    members_by_id,
    new_contact,
    new_contacts,
)
from tests.support.emulator import EmulatorControl


def failures(body: dict[str, Any]) -> dict[str, list[tuple[int, str]]]:
    """`failedContacts` as contact id -> [(code, error), ...]."""
    result: dict[str, list[tuple[int, str]]] = {}
    for item in body["failedContacts"]:
        assert isinstance(item.get("message"), str), item
        result.setdefault(item["contactId"], []).append((item["code"], item["error"]))
    return result


async def test_bulk_write_adds_all_and_answers_counts(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    ids = new_contacts(3)
    reply = await api.bulk(seg, ids)
    assert reply.status == 200, reply.text
    assert reply.json == {
        "segmentId": seg,
        "successCount": 3,
        "failureCount": 0,
        "failedContacts": [],
    }
    assert await applied(emulator, seg) == dict.fromkeys(ids, 1)


async def test_numeric_and_uuid_style_ids_both_work(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await fast_indexing(emulator)
    ids = ["100000000123", new_contact(), "9223372036854775807"]
    reply = await api.bulk(seg, ids)
    assert reply.status == 200, reply.text
    assert reply.json["successCount"] == 3
    for contact in ids:
        await api.wait_member(seg, contact, timeout_s=5)
        check = await api.membership(seg, contact)
        # Opaque strings: the numeric-looking id comes back as the same string.
        assert check.json["contactId"] == contact
        assert isinstance(check.json["contactId"], str)


async def test_already_member_is_409_per_item(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    old, new = new_contact(), new_contact()
    assert (await api.bulk(seg, [old])).status == 200
    reply = await api.bulk(seg, [old, new])
    assert reply.status == 200
    body = reply.json
    assert body["successCount"] == 1
    assert body["failureCount"] == 1
    assert failures(body) == {old: [(409, "ContactAlreadyInSegment")]}
    assert (await applied(emulator, seg))[new] == 1


async def test_duplicate_in_batch_adds_no_occurrence(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    dup, other = new_contact(), new_contact()
    reply = await api.bulk(seg, [dup, other, dup])
    assert reply.status == 200, reply.text
    body = reply.json
    assert body["successCount"] == 1
    assert body["failureCount"] == 2
    assert failures(body) == {
        dup: [(400, "DuplicateContactInBatch"), (400, "DuplicateContactInBatch")]
    }
    members = await members_by_id(emulator, seg)
    assert dup not in members
    assert other in members


async def test_contact_not_found_is_404_per_item(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    missing, present = new_contact(), new_contact()
    await emulator.set_missing_contacts([missing])
    reply = await api.bulk(seg, [missing, present])
    assert reply.status == 200
    body = reply.json
    assert (body["successCount"], body["failureCount"]) == (1, 1)
    assert failures(body) == {missing: [(404, "ContactNotFound")]}
    assert set(await members_by_id(emulator, seg)) == {present}


async def test_missing_contacts_set_is_replaced(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    first, second = new_contact(), new_contact()
    await emulator.set_missing_contacts([first])
    await emulator.set_missing_contacts([second])
    body = (await api.bulk(seg, [first, second])).json
    assert failures(body) == {second: [(404, "ContactNotFound")]}


@pytest.mark.parametrize(
    "bad_id",
    ["", "x" * 129, "has space", "slash/id", "ünïcode", "semi;colon", "tab\tid"],
    ids=["empty", "129-chars", "space", "slash", "non-ascii", "semicolon", "tab"],
)
async def test_invalid_contact_id_is_400_per_item(
    api: Api, emulator: EmulatorControl, seg: str, bad_id: str
) -> None:
    good = new_contact()
    reply = await api.bulk(seg, [bad_id, good])
    assert reply.status == 200, reply.text
    body = reply.json
    assert (body["successCount"], body["failureCount"]) == (1, 1)
    assert failures(body) == {bad_id: [(400, "InvalidContactId")]}
    assert set(await members_by_id(emulator, seg)) == {good}


async def test_id_rule_boundaries_are_valid(api: Api, emulator: EmulatorControl, seg: str) -> None:
    ids = ["x" * 128, "a", "A-Z_a.z:0-9", "0"]
    reply = await api.bulk(seg, ids)
    assert reply.status == 200
    assert reply.json["successCount"] == 4, reply.text
    assert set(await members_by_id(emulator, seg)) == set(ids)


async def test_index_busy_is_503_per_item_and_not_added(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure({"faults": {"bulk": {"index_busy_rate": 1.0}}})
    ids = new_contacts(3)
    reply = await api.bulk(seg, ids)
    assert reply.status == 200, reply.text
    body = reply.json
    assert (body["successCount"], body["failureCount"]) == (0, 3)
    assert failures(body) == {cid: [(503, "IndexBusy")] for cid in ids}
    assert not await members_by_id(emulator, seg)
    # Transient: once the index is no longer busy the same ids go in.
    await emulator.configure({"faults": {"bulk": {"index_busy_rate": 0}}})
    retry = await api.bulk(seg, ids)
    assert retry.json["successCount"] == 3
    assert set(await members_by_id(emulator, seg)) == set(ids)


async def test_mixed_batch_counts_add_up(api: Api, emulator: EmulatorControl, seg: str) -> None:
    member, missing, dup, fresh = new_contacts(4)
    await emulator.set_missing_contacts([missing])
    assert (await api.bulk(seg, [member])).status == 200
    sent = [member, missing, dup, "bad id", fresh, dup]
    body = (await api.bulk(seg, sent)).json
    assert body["segmentId"] == seg
    assert body["successCount"] + body["failureCount"] == len(sent)
    assert body["successCount"] == 1
    assert failures(body) == {
        member: [(409, "ContactAlreadyInSegment")],
        missing: [(404, "ContactNotFound")],
        dup: [(400, "DuplicateContactInBatch"), (400, "DuplicateContactInBatch")],
        "bad id": [(400, "InvalidContactId")],
    }
    assert set(await members_by_id(emulator, seg)) == {member, fresh}


@pytest.mark.parametrize(
    "raw",
    [b"not json", b'{"contactIds": ["a"]}', b'"a"', b"42", b"null", b'["ok", 5]', b"[[]]"],
    ids=["not-json", "wrong-object", "string", "number", "null", "non-string-item", "nested"],
)
async def test_malformed_payload_is_400(
    api: Api, emulator: EmulatorControl, seg: str, raw: bytes
) -> None:
    reply = await api.call("POST", f"/api/v2/segments/{seg}/contacts", raw=raw)
    assert reply.status == 400, reply.text
    assert reply.error == "MalformedPayload"
    assert isinstance(reply.json.get("message"), str)
    assert not await members_by_id(emulator, seg)


async def test_empty_batch_is_400(api: Api, seg: str) -> None:
    reply = await api.bulk(seg, [])
    assert reply.status == 400
    assert reply.error == "EmptyBatch"


async def test_batch_too_large_is_413_and_nothing_applied(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    ids = [f"c{i}" for i in range(1001)]
    reply = await api.bulk(seg, ids)
    assert reply.status == 413, reply.text
    assert reply.error == "BatchTooLarge"
    assert not await members_by_id(emulator, seg)


async def test_thousand_ids_are_accepted(api: Api, emulator: EmulatorControl, seg: str) -> None:
    ids = [f"c{i}" for i in range(1000)]
    reply = await api.bulk(seg, ids)
    assert reply.status == 200, reply.text
    assert reply.json["successCount"] == 1000
    assert len(await members_by_id(emulator, seg)) == 1000


async def test_more_than_200_ids_mask_later_chunk_failures(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    ids = [f"m{i:04d}" for i in range(450)]
    missing = ids[0:3] + ids[210:215] + ids[420:422]  # chunks 1, 2 and 3
    await emulator.set_missing_contacts(missing)
    body = (await api.bulk(seg, ids)).json
    assert body["failureCount"] == len(missing)
    assert body["successCount"] == len(ids) - len(missing)
    # Only the first chunk's failures are listed.
    assert failures(body) == {cid: [(404, "ContactNotFound")] for cid in ids[0:3]}
    members = await members_by_id(emulator, seg)
    assert len(members) == len(ids) - len(missing)
    assert not set(missing) & set(members)


async def test_200_ids_list_every_failure(api: Api, emulator: EmulatorControl, seg: str) -> None:
    ids = [f"f{i:03d}" for i in range(200)]
    missing = [ids[0], ids[199]]
    await emulator.set_missing_contacts(missing)
    body = (await api.bulk(seg, ids)).json
    assert body["failureCount"] == 2
    assert set(failures(body)) == set(missing)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", None],
    ids=["text", "form", "missing"],
)
async def test_wrong_or_missing_content_type_is_415(
    api: Api, emulator: EmulatorControl, seg: str, content_type: str | None
) -> None:
    contact = new_contact()
    reply = await api.call(
        "POST",
        f"/api/v2/segments/{seg}/contacts",
        raw=json.dumps([contact]).encode(),
        content_type=content_type,
    )
    assert reply.status == 415, reply.text
    assert reply.error == "UnsupportedMediaType"
    assert contact not in await members_by_id(emulator, seg)


async def test_content_type_with_charset_is_json(api: Api, seg: str) -> None:
    reply = await api.call(
        "POST",
        f"/api/v2/segments/{seg}/contacts",
        raw=json.dumps([new_contact()]).encode(),
        content_type="application/json; charset=utf-8",
    )
    assert reply.status == 200, reply.text


async def test_unknown_segment_is_404_when_auto_create_is_off(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure({"auto_create_segments": False})
    contact = new_contact()
    reply = await api.bulk(seg, [contact])
    assert reply.status == 404, reply.text
    assert reply.error == "SegmentNotFound"
    assert not await members_by_id(emulator, seg)
    # A declared segment is written normally.
    await emulator.declare_segment(seg)
    assert (await api.bulk(seg, [contact])).status == 200
    # A forgotten one is unknown again.
    await emulator.delete_segment(seg)
    assert (await api.bulk(seg, [new_contact()])).status == 404


async def test_auto_created_segment_is_listed(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    assert (await api.bulk(seg, new_contacts(2))).status == 200
    listed = {s["segmentId"]: s for s in await list_segments(emulator)}
    assert listed[seg]["members"] == 2
    assert listed[seg]["kind"] == "static"


async def test_dynamic_segment_accepts_but_ignores_writes(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await fast_indexing(emulator)
    await emulator.declare_segment(seg, "dynamic")
    ids = new_contacts(3)
    reply = await api.bulk(seg, ids)
    assert reply.status == 200, reply.text
    assert reply.json["successCount"] == 3
    assert reply.json["failureCount"] == 0
    single = await api.single(seg, new_contact())
    assert single.status in (200, 201), single.text
    # Well past indexing (median 50 ms) and even after a refresh, nobody is a member.
    assert (await api.refresh(seg)).status == 202
    await asyncio.sleep(1.2)
    for contact in ids:
        check = await api.membership(seg, contact)
        assert check.status == 200
        assert check.json["isMember"] is False
        assert check.json["addedAt"] is None
    assert not await members_by_id(emulator, seg)
    counters = await emulator.counters()
    assert counters["items"]["ignored_dynamic"] >= 3


async def test_order_of_checks_auth_before_everything(api: Api, seg: str) -> None:
    reply = await api.call(
        "POST",
        f"/api/v2/segments/{seg}/contacts",
        raw=b"junk",
        content_type="text/plain",
        accept="text/html",
        token=None,
    )
    assert reply.status == 401


async def test_order_of_checks_accept_before_content_type(api: Api, seg: str) -> None:
    reply = await api.call(
        "POST",
        f"/api/v2/segments/{seg}/contacts",
        raw=b"junk",
        content_type="text/plain",
        accept="text/html",
    )
    assert reply.status == 406


async def test_order_of_checks_content_type_before_body(api: Api, seg: str) -> None:
    reply = await api.call(
        "POST", f"/api/v2/segments/{seg}/contacts", raw=b"junk", content_type="text/plain"
    )
    assert reply.status == 415


async def test_order_of_checks_body_before_segment(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure({"auto_create_segments": False})
    assert (await api.bulk(seg, [])).error == "EmptyBatch"
    assert (await api.call("POST", f"/api/v2/segments/{seg}/contacts", raw=b"{")).status == 400
    assert (await api.bulk(seg, [new_contact()])).error == "SegmentNotFound"
