"""CONTRACT.md §5: token-bucket rate limits per endpoint class, 429 + Retry-After, peaks."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.emulator.helpers import (
    Api,
    Reply,
    members_by_id,
    new_contact,
    new_segment,
    password_form,
    token_request,
)
from tests.support.emulator import EmulatorControl


def check_429(reply: Reply) -> None:
    """A rate-limit answer as the contract describes it."""
    assert reply.status == 429, reply.text
    assert reply.error == "TooManyRequests"
    assert reply.retry_after() >= 1


async def test_bulk_burst_then_429_and_nothing_applied(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure({"limits": {"bulk": {"rate": 1, "burst": 3}}})
    batches = [[new_contact(), new_contact()] for _ in range(6)]
    replies = await asyncio.gather(*(api.bulk(seg, batch) for batch in batches))
    admitted = [b for b, r in zip(batches, replies, strict=True) if r.status == 200]
    limited = [b for b, r in zip(batches, replies, strict=True) if r.status == 429]
    assert len(admitted) + len(limited) == 6, [r.status for r in replies]
    assert 3 <= len(admitted) <= 4, [r.status for r in replies]  # 4 only on a very slow machine
    for reply in replies:
        if reply.status == 429:
            check_429(reply)
            assert reply.retry_after() == 1  # 1 token per second
    members = await members_by_id(emulator, seg)
    assert set(members) == {cid for batch in admitted for cid in batch}

    counters = await emulator.counters()
    assert counters["rate_limited"]["bulk"] == len(limited)
    assert counters["requests"]["bulk"].get("429") == len(limited)
    assert counters["requests"]["bulk"].get("200") == len(admitted)
    assert counters["peak_rps"]["bulk"] >= 6
    assert counters["peak_admitted_rps"]["bulk"] == len(admitted)


async def test_default_bulk_limit_is_10_per_second(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    replies = await asyncio.gather(*(api.bulk(seg, [new_contact()]) for _ in range(14)))
    statuses = [reply.status for reply in replies]
    assert 10 <= statuses.count(200) <= 11, statuses
    assert statuses.count(429) == 14 - statuses.count(200), statuses


async def test_admitted_again_after_retry_after(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure({"limits": {"bulk": {"rate": 1, "burst": 1}}})
    assert (await api.bulk(seg, [new_contact()])).status == 200
    limited = await api.bulk(seg, [new_contact()])
    check_429(limited)
    await asyncio.sleep(limited.retry_after() + 0.1)
    assert (await api.bulk(seg, [new_contact()])).status == 200


async def test_limit_is_checked_after_body_shape_and_before_segment(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure(
        {"limits": {"bulk": {"rate": 1, "burst": 1}}, "auto_create_segments": False}
    )
    await emulator.declare_segment(seg)
    assert (await api.bulk(seg, [new_contact()])).status == 200
    # Bucket empty: a malformed body still gets its 400 (checked first, costs no token) ...
    assert (await api.bulk(seg, [])).error == "EmptyBatch"
    # ... and an unknown segment gets 429, not 404.
    check_429(await api.bulk(new_segment(), [new_contact()]))


async def test_read_limit(api: Api, emulator: EmulatorControl, seg: str) -> None:
    await emulator.configure({"limits": {"read": {"rate": 1, "burst": 5}}})
    replies = await asyncio.gather(*(api.membership(seg, new_contact()) for _ in range(8)))
    statuses = [reply.status for reply in replies]
    assert 5 <= statuses.count(200) <= 6, statuses
    for reply in replies:
        if reply.status != 200:
            check_429(reply)
    counters = await emulator.counters()
    assert counters["rate_limited"]["read"] == statuses.count(429)
    assert counters["peak_rps"]["read"] >= 8
    assert counters["peak_admitted_rps"]["read"] == statuses.count(200)


async def test_default_read_limit_is_50_per_second(api: Api, seg: str) -> None:
    replies = await asyncio.gather(*(api.membership(seg, new_contact()) for _ in range(60)))
    statuses = [reply.status for reply in replies]
    assert 50 <= statuses.count(200) <= 55, statuses
    assert statuses.count(429) >= 5


async def test_classes_have_separate_buckets(api: Api, emulator: EmulatorControl, seg: str) -> None:
    await emulator.configure({"limits": {"bulk": {"rate": 1, "burst": 1}}})
    assert (await api.bulk(seg, [new_contact()])).status == 200
    check_429(await api.bulk(seg, [new_contact()]))
    # Reads and single writes are not held back by the empty bulk bucket.
    assert (await api.membership(seg, new_contact())).status == 200
    assert (await api.single(seg, new_contact())).status == 201


async def test_token_endpoint_limit(
    emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    first = await token_request(http, base, password_form())
    assert first.status == 200
    second = await token_request(http, base, password_form())
    check_429(second)
    assert "access_token" not in second.json
    counters = await emulator.counters()
    assert counters["rate_limited"]["token"] == 1
    assert counters["requests"]["token"].get("429") == 1


async def test_rate_zero_lifts_the_limit(api: Api, emulator: EmulatorControl, seg: str) -> None:
    await emulator.configure({"limits": {"bulk": {"rate": 0, "burst": 1}}})
    replies = await asyncio.gather(*(api.bulk(seg, [new_contact()]) for _ in range(20)))
    assert [reply.status for reply in replies] == [200] * 20
    assert (await emulator.counters())["peak_admitted_rps"]["bulk"] >= 20
