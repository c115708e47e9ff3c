"""CONTRACT.md §3: the membership check, and §5's indexing delay as seen through it."""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta

from tests.emulator.helpers import (
    RFC3339,
    Api,
    fast_indexing,
    members_by_id,
    new_contact,
    new_contacts,
    poll_until,
    unlimited,
)
from tests.support.emulator import EmulatorControl


async def test_unknown_contact_is_not_a_member(api: Api, seg: str) -> None:
    contact = new_contact()
    reply = await api.membership(seg, contact)
    assert reply.status == 200, reply.text
    assert reply.json == {
        "contactId": contact,
        "segmentId": seg,
        "isMember": False,
        "addedAt": None,
    }


async def test_write_is_invisible_before_indexing_and_visible_after(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    # Median 0.5 s, p99 1 s: visible within ~50 ms of the write is a > 7-sigma event.
    await fast_indexing(emulator, median_s=0.5, p99_s=1.0)
    contact = new_contact()
    written_at = datetime.now(UTC)
    assert (await api.bulk(seg, [contact])).status == 200

    before = await api.membership(seg, contact)
    assert before.status == 200
    assert before.json["isMember"] is False
    assert before.json["addedAt"] is None
    # The write was applied synchronously even though reads do not show it yet.
    assert contact in await members_by_id(emulator, seg)

    await api.wait_member(seg, contact, timeout_s=8, interval_s=0.1)
    after = await api.membership(seg, contact)
    body = after.json
    assert body["isMember"] is True
    assert body["contactId"] == contact
    assert body["segmentId"] == seg
    assert RFC3339.match(body["addedAt"]), body["addedAt"]
    added_at = datetime.fromisoformat(body["addedAt"].replace("Z", "+00:00"))
    # addedAt is the time of the write (not of indexing); allow for whole-second rounding.
    assert written_at - timedelta(seconds=2) <= added_at <= written_at + timedelta(seconds=2)


async def test_default_indexing_delay_hides_fresh_writes(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    # Defaults: median 3 s, 2 % stall. Right after the write nothing of 20 ids is visible.
    ids = new_contacts(20)
    assert (await api.bulk(seg, ids)).status == 200
    for contact in ids[:5]:
        assert (await api.membership(seg, contact)).json["isMember"] is False
    members = await members_by_id(emulator, seg)
    assert set(members) == set(ids)
    assert not any(member["indexed"] for member in members.values())


async def test_unknown_segment_is_404_when_auto_create_is_off(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure({"auto_create_segments": False})
    reply = await api.membership(seg, new_contact())
    assert reply.status == 404, reply.text
    assert reply.error == "SegmentNotFound"
    await emulator.declare_segment(seg)
    assert (await api.membership(seg, new_contact())).status == 200


async def test_read_of_a_member_of_another_segment_is_false(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await fast_indexing(emulator)
    contact = new_contact()
    await api.bulk(seg, [contact])
    await api.wait_member(seg, contact, timeout_s=5)
    assert (await api.membership(seg + "_other", contact)).json["isMember"] is False


async def test_indexing_delay_median_is_near_the_configured_one(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    # Log-normal, median 0.4 s, p99 1.2 s (sigma ~0.47). With 150 samples the sample median's
    # standard error is ~5 %, so [0.25, 0.65] s (plus polling slack) is many sigmas wide.
    median_s, p99_s = 0.4, 1.2
    await fast_indexing(emulator, median_s=median_s, p99_s=p99_s)
    await unlimited(emulator, "bulk")
    ids = [f"idx{i:03d}" for i in range(150)]
    started = time.monotonic()
    reply = await api.bulk(seg, ids)
    assert reply.status == 200
    write_done = time.monotonic()

    visible_after: dict[str, float] = {}

    async def all_visible() -> bool:
        members = await members_by_id(emulator, seg)
        now = time.monotonic()
        for cid, member in members.items():
            if member["indexed"] and cid not in visible_after:
                visible_after[cid] = now - started
        return len(visible_after) == len(ids)

    await poll_until(all_visible, timeout_s=8, interval_s=0.03, what="all 150 writes indexed")
    delays = sorted(visible_after.values())
    measured_median = statistics.median(delays)
    slack = write_done - started + 0.1  # write round trip and polling granularity
    assert median_s * 0.6 <= measured_median <= median_s * 1.6 + slack, measured_median
    # It is a spread, not a constant: the early and late deciles differ clearly.
    p10, p90 = delays[len(delays) // 10], delays[len(delays) * 9 // 10]
    assert p90 - p10 >= 0.15, (p10, p90)
    assert p10 < measured_median < p90

    # The membership check agrees with the listing.
    for contact in ids[:3]:
        assert (await api.membership(seg, contact)).json["isMember"] is True
