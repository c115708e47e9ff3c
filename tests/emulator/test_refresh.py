"""CONTRACT.md §4: segment refresh, its once-per-interval limit, and stalled writes."""

from __future__ import annotations

import asyncio
import time

from tests.emulator.helpers import (
    Api,
    fast_indexing,
    members_by_id,
    new_contacts,
    new_segment,
    poll_until,
)
from tests.support.emulator import EmulatorControl


async def test_refresh_is_202_refreshing(api: Api, seg: str) -> None:
    reply = await api.refresh(seg)
    assert reply.status == 202, reply.text
    assert reply.json == {"segmentId": seg, "status": "refreshing"}


async def test_second_refresh_within_the_hour_is_429_with_retry_after(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    assert (await api.refresh(seg)).status == 202
    await asyncio.sleep(1.1)
    reply = await api.refresh(seg)
    assert reply.status == 429, reply.text
    assert reply.error == "TooManyRequests"
    # About an hour minus the ~1 s that passed (whole seconds, rounded up).
    assert 3590 <= reply.retry_after() <= 3599, reply.retry_after()
    # The limit is per segment.
    assert (await api.refresh(new_segment())).status == 202
    counters = await emulator.counters()
    assert counters["requests"]["refresh"].get("429") == 1
    assert counters["requests"]["refresh"].get("202") == 2


async def test_refresh_is_allowed_again_after_the_interval(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure({"refresh_min_interval_s": 1})
    assert (await api.refresh(seg)).status == 202
    early = await api.refresh(seg)
    assert early.status == 429
    assert early.retry_after() == 1
    await asyncio.sleep(1.1)
    assert (await api.refresh(seg)).status == 202


async def test_stalled_writes_appear_only_after_a_refresh(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await fast_indexing(emulator, median_s=0.05, p99_s=0.15, stall=1.0)
    ids = new_contacts(5)
    assert (await api.bulk(seg, ids)).status == 200
    # Far past the p99 of 0.15 s: still invisible, because every write stalled.
    await asyncio.sleep(1.0)
    for contact in ids:
        assert await api.is_member(seg, contact) is False
    members = await members_by_id(emulator, seg)
    assert all(m["stalled"] and not m["indexed"] for m in members.values()), members

    refreshed_at = time.monotonic()
    assert (await api.refresh(seg)).status == 202

    async def all_visible() -> bool:
        for contact in ids:
            if not await api.is_member(seg, contact):
                return False
        return True

    await poll_until(all_visible, timeout_s=4, interval_s=0.1, what="stalled writes visible")
    # The contract says "within 1 s"; allow for a loaded test machine.
    assert time.monotonic() - refreshed_at <= 2.5


async def test_refresh_only_releases_its_own_segment(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await fast_indexing(emulator, stall=1.0)
    other = new_segment()
    mine, theirs = new_contacts(2)
    assert (await api.bulk(seg, [mine])).status == 200
    assert (await api.bulk(other, [theirs])).status == 200
    assert (await api.refresh(seg)).status == 202
    await api.wait_member(seg, mine, timeout_s=4, interval_s=0.1)
    await asyncio.sleep(0.3)
    assert await api.is_member(other, theirs) is False


async def test_refresh_also_releases_slow_unstalled_writes(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    # Median 60 s: without the refresh nothing would show up during this test.
    await fast_indexing(emulator, median_s=60.0, p99_s=120.0, stall=0.0)
    ids = new_contacts(3)
    assert (await api.bulk(seg, ids)).status == 200
    assert await api.is_member(seg, ids[0]) is False
    assert (await api.refresh(seg)).status == 202

    async def all_visible() -> bool:
        return all([await api.is_member(seg, contact) for contact in ids])

    await poll_until(all_visible, timeout_s=4, interval_s=0.1, what="slow writes visible")


async def test_stall_fraction_is_respected(api: Api, emulator: EmulatorControl, seg: str) -> None:
    # 400 writes at a 25 % stall rate: expected 100 stalled, sd ~8.7; [55, 145] is > 5 sd wide.
    await fast_indexing(emulator, median_s=60.0, p99_s=120.0, stall=0.25)
    ids = [f"st{i:03d}" for i in range(400)]
    assert (await api.bulk(seg, ids)).status == 200
    members = await members_by_id(emulator, seg)
    stalled = sum(1 for member in members.values() if member["stalled"])
    assert 55 <= stalled <= 145, stalled
