"""Pieces the engine benchmarks share: emulator control, an engine wired to it, percentiles."""

from __future__ import annotations

import asyncio
import math
import random
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from daemon.cxone import HttpCXoneClient
from daemon.store.memory import MemoryStore
from daemon.wiring import build_scheduler
from scheduler.engine import BatchingPolicy, Engine
from scheduler.observer import EngineObserver
from scheduler.ratelimit import RateGate
from scheduler.retry import RetryPolicy
from scheduler.validation import MembershipPoller, ValidationPolicy
from tests.support.cxone import emulator_settings


def run_on_uvloop(run: Callable[[], Coroutine[Any, Any, bool]]) -> int:
    """Run a benchmark's coroutine on uvloop, as the daemon runs; 0 if it met its targets."""
    if sys.platform != "win32":
        import uvloop

        uvloop.install()
    return 0 if asyncio.run(run()) else 1


async def control(
    session: aiohttp.ClientSession, url: str, method: str, path: str, body: Any = None
) -> Any:
    """Call the emulator's control API and return its JSON answer."""
    async with session.request(method, url + path, json=body) as response:
        response.raise_for_status()
        return await response.json()


@dataclass
class Rig:
    """An engine (and optionally its poller) against the emulator."""

    engine: Engine
    client: HttpCXoneClient
    poller: MembershipPoller | None

    async def close(self) -> None:
        """Stop everything the rig started."""
        await self.engine.stop()
        if self.poller is not None:
            await self.poller.stop()
        await self.client.close()


async def build_rig(
    url: str,
    observer: EngineObserver,
    *,
    write_rps: float,
    read_rps: float = 50.0,
    batching: BatchingPolicy | None = None,
    validation: ValidationPolicy | None = None,
) -> Rig:
    """Start a client, an engine and (with `validation`) a poller; authenticate up front."""
    client = HttpCXoneClient(emulator_settings(url))
    await client.start()
    await client.authenticate()  # token and discovery before any clock starts
    scheduler = build_scheduler(
        client=client,
        store=MemoryStore(),
        write_gate=RateGate("bulk", write_rps),
        single_gate=RateGate("single", 2.0),
        read_gate=RateGate("read", read_rps),
        batching=batching or BatchingPolicy(),
        retry=RetryPolicy(),
        observer=observer,
        validation=validation,
        rng=random.Random(1),
        validation_rng=random.Random(2),
    )
    engine, poller = scheduler.engine, scheduler.poller
    if poller is not None:
        await poller.start()
    await engine.start()
    return Rig(engine, client, poller)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of the values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
