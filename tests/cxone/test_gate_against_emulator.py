"""The rate gates against the real emulator process: paced storms draw no 429 (CONTRACT.md §5)."""

from __future__ import annotations

import asyncio

from scheduler.ratelimit import RateGate
from scheduler.upstream import RateLimited
from tests.cxone.conftest import MakeClient
from tests.support.emulator import EmulatorControl

STORMS = 3
PER_STORM = 5


async def test_storms_of_single_writes_at_the_limit_draw_no_429(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    # The emulator's default single-write bucket: 2/s, burst 2; the daemon's default rate: 2/s.
    assert (await emulator.config())["limits"]["single"] == {"rate": 2, "burst": 2}
    client = await make_client()
    gate = RateGate("single", 2.0)
    refused: list[str] = []

    async def fallback(contact_id: str) -> None:
        await gate.acquire()
        try:
            await client.single_add("seg_storm", contact_id, f"key-{contact_id}")
        except RateLimited:
            refused.append(contact_id)

    for storm in range(STORMS):
        # Concurrent fallbacks after an idle spell, as when a batch's last retry fails: the
        # first ones open new connections while later ones reuse them, so arrivals bunch.
        await asyncio.gather(*(fallback(f"c{storm}_{i}") for i in range(PER_STORM)))
        await asyncio.sleep(1.2)  # both buckets fill up again

    counters = await emulator.counters()
    assert refused == []
    assert counters["rate_limited"]["single"] == 0
    assert len(await emulator.members("seg_storm")) == STORMS * PER_STORM
