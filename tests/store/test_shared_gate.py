"""The shared rate gate: several instances (one pool each) on one PostgreSQL database."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from daemon.store.shared_gate import GATES_DDL, LATE_MARGIN_S, SharedRateGate
from tests.support.postgres import PostgresServer

GateFactory = Callable[..., Awaitable[SharedRateGate]]


@pytest.fixture
async def database(postgres: PostgresServer, postgres_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A fresh database with the gates table, and a pool the test uses to look at it."""
    pool = await asyncpg.create_pool(
        postgres_url, password=postgres.password, min_size=1, max_size=2
    )
    await pool.execute(GATES_DDL.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
    yield pool
    await pool.close()


@pytest.fixture
async def gate(
    database: asyncpg.Pool, postgres: PostgresServer, postgres_url: str
) -> AsyncIterator[GateFactory]:
    """Gates as separate instances make them: each with a pool of its own; all closed after."""
    made: list[tuple[SharedRateGate, asyncpg.Pool]] = []

    async def make(
        name: str,
        rate_per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> SharedRateGate:
        pool = await asyncpg.create_pool(
            postgres_url, password=postgres.password, min_size=1, max_size=2
        )
        shared = SharedRateGate(name, rate_per_s, lambda: pool, clock=clock, sleep=sleep)
        made.append((shared, pool))
        return shared

    yield make
    for shared, pool in made:
        await shared.close()
        await pool.close()


async def row(database: asyncpg.Pool, name: str) -> asyncpg.Record | None:
    return await database.fetchrow(
        "SELECT tat, paused_until FROM segmapd_gates WHERE name = $1", name
    )


def bucket_conforms(admitted: list[float], rate: float, burst: float) -> bool:
    """Whether `admitted` fits a token bucket of `rate` per second holding at most `burst`."""
    tokens, last = burst, None
    for at in sorted(admitted):
        if last is not None:
            tokens = min(burst, tokens + (at - last) * rate)
        last = at
        tokens -= 1
        if tokens < -1e-9:
            return False
    return True


async def test_instances_share_one_budget(gate: GateFactory):
    rate, duration = 20.0, 1.5
    gates = [await gate("bulk", rate) for _ in range(3)]
    admitted: list[float] = []
    started = time.monotonic()

    async def run(shared: SharedRateGate) -> None:
        while True:
            await shared.acquire()
            at = time.monotonic()
            if at - started >= duration:
                return
            admitted.append(at)

    await asyncio.gather(*(run(shared) for shared in gates))
    # Three instances each taking 20/s would overdraw a 20/s bucket within about half a second.
    assert bucket_conforms(admitted, rate, burst=rate)
    # ...and together they still use the budget (loose: a noisy 2-core machine).
    assert len(admitted) >= 0.8 * rate * duration
    assert all(shared.late_reservations == 0 for shared in gates)


async def test_a_pause_in_one_instance_holds_the_others(gate: GateFactory, database: asyncpg.Pool):
    pausing, other = await gate("single", 50.0), await gate("single", 50.0)
    await other.acquire()  # the row exists, the first slot is taken
    pause_s = 0.6
    paused_at = time.monotonic()
    pausing.pause(pause_s)
    assert pausing.paused_for > 0
    assert not pausing.has_capacity()
    for _ in range(200):  # the shared row has the pause once the background write lands
        record = await row(database, "single")
        if record is not None and record["paused_until"] > 0:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the pause never reached the shared row")
    await other.acquire()
    # Clocks: the pause is mapped through the database's clock; allow a few milliseconds.
    assert time.monotonic() - paused_at >= pause_s - 0.05
    assert other.paused_for == 0


async def test_a_pause_holds_its_own_instance(gate: GateFactory):
    shared = await gate("read", 50.0)
    paused_at = time.monotonic()
    shared.pause(0.3)
    await shared.acquire()
    assert time.monotonic() - paused_at >= 0.3
    assert shared.waited_s >= 0.3


async def test_a_slept_past_reservation_is_void(gate: GateFactory, database: asyncpg.Pool):
    offset = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 1:  # the process "stops" during its first wait for a slot
            offset[0] += 1.0
        await asyncio.sleep(seconds)

    assert LATE_MARGIN_S < 1.0  # the jump below makes the slot late
    rate = 2.0  # interval 0.5 s, tolerance 0.1 s: the second slot is 0.4 s away
    shared = await gate("bulk", rate, clock=lambda: time.monotonic() + offset[0], sleep=sleep)
    await shared.acquire()
    first = await row(database, "bulk")
    assert first is not None
    assert slept == []  # a fresh class admits at once
    await shared.acquire()
    assert shared.late_reservations == 1
    assert len(slept) == 2  # the void slot, then the one it was admitted in
    after = await row(database, "bulk")
    assert after is not None
    # Three reservations in all: the first, the void one, the one admitted.
    assert after["tat"] - first["tat"] == pytest.approx(2 / rate)


async def test_nothing_is_admitted_without_the_database(
    gate: GateFactory, postgres: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
):
    closed = await asyncpg.create_pool(postgres_url, password=postgres.password, min_size=1)
    await closed.close()
    current: list[asyncpg.Pool | None] = [None]
    shared = SharedRateGate("bulk", 10.0, lambda: current[0])
    opened: asyncpg.Pool | None = None
    caplog.set_level(logging.INFO, logger="daemon.store.shared_gate")
    waiting = asyncio.create_task(shared.acquire())
    try:
        await asyncio.sleep(0.3)  # the store not open yet
        assert not waiting.done()
        current[0] = closed
        await asyncio.sleep(0.3)  # a pool that is closed
        assert not waiting.done()
        opened = await asyncpg.create_pool(postgres_url, password=postgres.password, min_size=1)
        current[0] = opened
        await asyncio.wait_for(waiting, 10)
        assert shared.waited_s >= 0.6
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # once per outage
        assert "cannot reach the database" in warnings[0].getMessage()
        assert all(postgres.password not in r.getMessage() for r in caplog.records)
        assert any("answers again" in r.getMessage() for r in caplog.records)
    finally:
        if not waiting.done():
            waiting.cancel()
        await shared.close()
        if opened is not None:
            await opened.close()


async def test_classes_have_budgets_of_their_own(gate: GateFactory, database: asyncpg.Pool):
    rate = 0.2  # one slot every 5 s: a second request of a class would wait 4.9 s
    bulk, read = await gate("bulk", rate), await gate("read", rate)
    await bulk.acquire()
    await asyncio.wait_for(read.acquire(), 3)
    bulk.pause(30)
    for _ in range(200):
        record = await row(database, "bulk")
        if record is not None and record["paused_until"] > 0:
            break
        await asyncio.sleep(0.01)
    single = await gate("single", 50.0)  # another class, in another instance
    await asyncio.wait_for(single.acquire(), 3)  # not held by the bulk pause
    read_row = await row(database, "read")
    assert read_row is not None
    assert read_row["paused_until"] == 0


async def test_capacity_is_estimated_locally(gate: GateFactory):
    shared = await gate("single", 2.0)
    assert shared.has_capacity()
    await shared.acquire()
    assert not shared.has_capacity()  # the next slot is 0.4 s away
    assert shared.paused_for == 0
    await shared.close()
    await shared.close()  # idempotent
