"""CONTRACT.md §2: single-contact writes (a JSON object body) and their stricter limit."""

from __future__ import annotations

import pytest

from tests.emulator.helpers import Api, applied, members_by_id, new_contact, unlimited
from tests.support.emulator import EmulatorControl


async def test_single_write_is_201_added(api: Api, emulator: EmulatorControl, seg: str) -> None:
    contact = new_contact()
    reply = await api.single(seg, contact)
    assert reply.status == 201, reply.text
    assert reply.json == {"contactId": contact, "segmentId": seg, "status": "added"}
    assert await applied(emulator, seg) == {contact: 1}


async def test_single_write_already_member_is_409(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    contact = new_contact()
    assert (await api.bulk(seg, [contact])).status == 200
    reply = await api.single(seg, contact)
    assert reply.status == 409, reply.text
    assert reply.error == "ContactAlreadyInSegment"


async def test_single_write_missing_contact_is_404(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    contact = new_contact()
    await emulator.set_missing_contacts([contact])
    reply = await api.single(seg, contact)
    assert reply.status == 404, reply.text
    assert reply.error == "ContactNotFound"
    assert not await members_by_id(emulator, seg)


@pytest.mark.parametrize("bad_id", ["", "bad id", "x" * 129])
async def test_single_write_invalid_id_is_400(
    api: Api, emulator: EmulatorControl, seg: str, bad_id: str
) -> None:
    reply = await api.single(seg, bad_id)
    assert reply.status == 400, reply.text
    assert reply.error == "InvalidContactId"
    assert not await members_by_id(emulator, seg)


async def test_single_write_index_busy_is_503(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure({"faults": {"single": {"index_busy_rate": 1.0}}})
    contact = new_contact()
    reply = await api.single(seg, contact)
    assert reply.status == 503, reply.text
    assert reply.error == "IndexBusy"
    assert not await members_by_id(emulator, seg)


@pytest.mark.parametrize(
    "body",
    [{"contactId": 5}, {"contact": "x"}, {}, {"contactId": None}],
    ids=["number", "wrong-key", "empty", "null"],
)
async def test_single_write_wrong_shape_is_malformed(
    api: Api, emulator: EmulatorControl, seg: str, body: dict[str, object]
) -> None:
    reply = await api.write(seg, body)
    assert reply.status == 400, reply.text
    assert reply.error == "MalformedPayload"
    assert not await members_by_id(emulator, seg)


async def test_single_write_unknown_segment_is_404(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure({"auto_create_segments": False})
    reply = await api.single(seg, new_contact())
    assert reply.status == 404
    assert reply.error == "SegmentNotFound"


async def test_single_write_has_its_own_stricter_limit(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    # Default single limit: 2 req/s, burst 2. Bulk (10/s) is a separate bucket.
    ids = [new_contact() for _ in range(4)]
    replies = [await api.single(seg, contact) for contact in ids]
    statuses = [reply.status for reply in replies]
    assert statuses[:2] == [201, 201], statuses
    assert 429 in statuses[2:], statuses
    limited = [cid for cid, reply in zip(ids, replies, strict=True) if reply.status == 429]
    for reply in replies:
        if reply.status == 429:
            assert reply.error == "TooManyRequests"
            assert reply.retry_after() >= 1
    assert not set(limited) & set(await members_by_id(emulator, seg))
    # The bulk class is untouched by the single bucket.
    assert (await api.bulk(seg, [new_contact()])).status == 200


async def test_single_limit_can_be_lifted(api: Api, emulator: EmulatorControl, seg: str) -> None:
    await unlimited(emulator, "single")
    statuses = [(await api.single(seg, new_contact())).status for _ in range(6)]
    assert statuses == [201] * 6
