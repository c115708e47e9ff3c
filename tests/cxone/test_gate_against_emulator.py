"""The rate gates against the real emulator process: paced storms draw no 429 (CONTRACT.md §5).

The gate's bucket (aiolimiter) runs on the event loop's clock, so the storms run on both loops
segmapd may run on: asyncio's, and uvloop's, whose clock counts whole milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import pytest
import uvloop

from daemon.cxone import HttpCXoneClient
from scheduler.ratelimit import RateGate
from scheduler.upstream import RateLimited
from tests.cxone.conftest import emulator_settings
from tests.support.emulator import EmulatorControl
from tests.support.processes import ManagedProcess

STORMS = 3
PER_STORM = 5

Outcome = tuple[list[str], dict[str, Any], int]
LoopRunner = Callable[[Coroutine[Any, Any, Outcome]], Outcome]


async def single_write_storms(url: str) -> Outcome:
    """Storms of concurrent single writes through one gate: (refused ids, counters, members)."""
    async with aiohttp.ClientSession() as http:
        emulator = EmulatorControl(url, http)
        await emulator.reset(config=True)
        # The emulator's default single-write bucket: 2/s, burst 2; the daemon's default: 2/s.
        assert (await emulator.config())["limits"]["single"] == {"rate": 2, "burst": 2}
        client = HttpCXoneClient(emulator_settings(url))
        await client.start()
        try:
            gate = RateGate("single", 2.0)
            refused: list[str] = []

            async def fallback(contact_id: str) -> None:
                await gate.acquire()
                try:
                    await client.single_add("seg_storm", contact_id, f"key-{contact_id}")
                except RateLimited:
                    refused.append(contact_id)

            for storm in range(STORMS):
                # Concurrent fallbacks after an idle spell, as when a batch's last retry fails:
                # the first ones open new connections while later ones reuse them, so arrivals
                # bunch.
                await asyncio.gather(*(fallback(f"c{storm}_{i}") for i in range(PER_STORM)))
                await asyncio.sleep(1.2)  # both buckets fill up again
        finally:
            await client.close()
        return refused, await emulator.counters(), len(await emulator.members("seg_storm"))


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_storms_of_single_writes_at_the_limit_draw_no_429(
    emulator_proc: ManagedProcess, run: LoopRunner
) -> None:
    refused, counters, members = run(single_write_storms(emulator_proc.url))
    assert refused == []
    assert counters["rate_limited"]["single"] == 0
    assert members == STORMS * PER_STORM
