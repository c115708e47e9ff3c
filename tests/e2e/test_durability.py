"""Nothing lost: the SQLite journal under SIGKILL and on a full disk."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.e2e.conftest import Daemon, StartDaemon
from tests.support.disks import ext4_image, fill, small_tmpfs
from tests.support.emulator import EmulatorControl
from tests.support.waits import until

SEGMENTS = [f"crash-{i}" for i in range(10)]


async def send_until_answered(
    daemon: Daemon,
    http: aiohttp.ClientSession,
    event: dict[str, Any],
    msg_id: str,
    deadline: float,
) -> int:
    """Deliver one webhook as a CRM does: the same webhook-id until an answer, or give up."""
    body = orjson.dumps(event)
    while time.monotonic() < deadline:
        try:
            async with http.post(
                f"{daemon.url}/v1/webhooks/crm",
                data=body,
                headers=daemon.signed_headers(body, msg_id=msg_id),
                timeout=aiohttp.ClientTimeout(total=5),
            ) as response:
                await response.read()
                if response.status < 500:
                    return response.status
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    return 0


@pytest.mark.timeout(600)
async def test_crash_loop_loses_no_accepted_webhook_and_writes_nothing_twice(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    tmp_path: Path,
):
    await emulator.configure(
        {"limits": {"bulk": {"rate": 40, "burst": 40}, "read": {"rate": 2000, "burst": 2000}}}
    )
    daemon = await start_daemon(
        store={"url": f"sqlite://{tmp_path}/journal.db"},
        limits={"write_rps": 40.0, "read_rps": 2000.0},
        batching={"linger_ms": 200},
        # Under this load validation lags; the deadline must not turn lag into failures.
        validation={"deadline_s": 900.0, "window_s": 30.0},
    )
    rng = random.Random(20)
    total = int(os.environ.get("CRASH_LOOP_WEBHOOKS", "20000"))
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    answered: dict[int, int] = {}
    deadline = time.monotonic() + 300

    def event_of(i: int) -> dict[str, Any]:
        # Every tenth webhook names two segments, the others one: 22,000 assignments in all.
        first = i % len(SEGMENTS)
        segments = [SEGMENTS[first]]
        if i % 10 == 0:
            segments.append(SEGMENTS[(first + 3) % len(SEGMENTS)])
        return {"contactId": f"{400000000000 + i}", "segmentIds": segments}

    async def sender() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            answered[i] = await send_until_answered(
                daemon, http, event_of(i), f"msg_crash_{i}", deadline
            )

    kills_under_load = 0
    # Six kills at random points of the run, by progress rather than by clock: however fast
    # the machine sends, every kill lands while webhooks are still going out.
    kill_points = sorted(rng.uniform(0.05, 0.9) * total for _ in range(6))

    async def killer() -> None:
        nonlocal kills_under_load
        for point in kill_points:
            while total - queue.qsize() < point:
                await asyncio.sleep(0.01)
            if queue.empty():
                return  # every webhook sent: a kill now would not be under load
            daemon.process.kill()  # SIGKILL: no drain, no flush
            kills_under_load += 1
            await asyncio.to_thread(daemon.restart)

    await asyncio.gather(killer(), *(sender() for _ in range(40)))
    assert kills_under_load >= 5, f"only {kills_under_load} kills while webhooks were sent"
    accepted = [i for i, status in answered.items() if status in (200, 202)]
    assert len(accepted) > total * 0.9, f"only {len(accepted)} of {total} were answered"

    # Every accepted webhook ends active, in the API and in CXone.
    members: dict[str, set[str]] = {}
    end = time.monotonic() + 240
    while True:
        members = {
            s: {m["contactId"] for m in await emulator.members(s) if m["indexed"]} for s in SEGMENTS
        }
        missing = [
            i
            for i in accepted
            if any(f"{400000000000 + i}" not in members[s] for s in event_of(i)["segmentIds"])
        ]
        if not missing or time.monotonic() > end:
            break
        await asyncio.sleep(1.0)
    assert not missing, f"{len(missing)} accepted webhooks not in CXone, e.g. {missing[:5]}"

    semaphore = asyncio.Semaphore(32)

    async def state_of(i: int) -> tuple[int, set[str]]:
        async with semaphore:
            for _ in range(200):
                status, body = await daemon.contact(http, f"{400000000000 + i}")
                states = {s["state"] for s in body.get("segments", [])} if status == 200 else set()
                if states == {"active"} and len(body["segments"]) == len(event_of(i)["segmentIds"]):
                    return i, states
                await asyncio.sleep(0.25)
            return i, states

    results = await asyncio.gather(*(state_of(i) for i in accepted))
    not_active = [i for i, states in results if states != {"active"}]
    assert not not_active, f"{len(not_active)} not active in the API, e.g. {not_active[:5]}"

    counters = await emulator.counters()
    assert counters["idempotency_conflicts"]["IdempotencyKeyReused"] == 0
    assert counters["applied_twice"] == 0
    assert counters["duplicate_ids_in_request"] == 0
    assert counters["bulk_ids"]["max"] <= 200


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs for the journal."""
    with small_tmpfs(tmp_path / "disk", "4m") as mount:
        yield mount


async def test_a_full_disk_refuses_work_and_recovers(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    small_disk: Path,
):
    daemon = await start_daemon(store={"url": f"sqlite://{small_disk}/journal.db"})
    status, _ = await daemon.webhook(http, {"contactId": "before", "segmentIds": ["D1", "D2"]})
    assert status == 202

    filler = fill(small_disk)
    refused = None
    for i in range(200):
        events = [{"contactId": f"full-{i}-{j}", "segmentIds": ["D1"]} for j in range(50)]
        status, answer = await daemon.webhook(http, events)
        if status == 503:
            refused = answer
            break
        assert status == 202
    assert refused is not None and "journal" in refused["message"]
    # A redelivery of an uncommitted delivery is not acknowledged either.
    status, _ = await daemon.webhook(
        http, {"contactId": "again", "segmentIds": ["D1"]}, msg_id="msg_during_full"
    )
    assert status == 503
    status, _ = await daemon.webhook(
        http, {"contactId": "again", "segmentIds": ["D1"]}, msg_id="msg_during_full"
    )
    assert status == 503
    async with http.get(f"{daemon.url}/readyz") as response:
        assert response.status == 503
        assert "store" in (await response.json())["checks"]
    async with http.post(f"{daemon.url}/v1/webhooks/crm", data=b"{}") as response:
        assert response.status == 401  # unsigned: refused on its own terms, not a 500

    filler.unlink()

    async def readiness() -> int:
        async with http.get(f"{daemon.url}/readyz") as response:
            return response.status

    await until(readiness, lambda status: status == 200, timeout_s=10, what="ready again")
    status, _ = await daemon.webhook(http, {"contactId": "after", "segmentIds": ["D1"]})
    assert status == 202

    # Once space is back, the redelivery is answered as the first delivery was.
    status, _ = await daemon.webhook(
        http, {"contactId": "again", "segmentIds": ["D1"]}, msg_id="msg_during_full"
    )
    assert status == 200
    for contact in ("before", "after", "again"):
        await daemon.wait_states(http, contact, {"active"}, 30)


async def hanging(emulator: EmulatorControl, requests: int) -> None:
    """Wait until the emulator holds `requests` bulk writes hanging (applied, not answered)."""

    async def hangs() -> int:
        return int((await emulator.counters())["faults"]["hang"])

    await until(hangs, lambda n: n >= requests, timeout_s=10, what=f"{requests} hanging writes")


async def kill_with_writes_in_flight_then_restart(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    store: dict[str, Any],
    prefix: str,
) -> None:
    """SIGKILL a daemon whose bulk writes were applied but not answered, restart it, and check
    that the recovered batches were resent under their keys: replayed, never applied twice."""
    # Every bulk write is applied, then hangs: the daemon dies not knowing it landed.
    await emulator.configure(
        {"faults": {"bulk": {"hang_rate": 1.0, "hang_s": 2.0, "after_apply_fraction": 1.0}}}
    )
    daemon = await start_daemon(store=store, cxone={"timeout_s": 10.0})
    segments = [f"{prefix.upper()}1", f"{prefix.upper()}2"]
    events = [{"contactId": f"{prefix}{i}", "segmentIds": segments} for i in range(100)]
    status, _ = await daemon.webhook(http, events)
    assert status == 202
    await hanging(emulator, 2)  # both segments' batches sent, applied and hanging
    daemon.process.signal(signal.SIGKILL)
    await asyncio.to_thread(daemon.process.wait, 10)
    await emulator.configure({"faults": {"bulk": {"hang_rate": 0.0}}})
    await asyncio.sleep(2.5)  # the hung requests finish on the emulator's side
    await asyncio.to_thread(daemon.restart)
    for i in (0, 50, 99):
        await daemon.wait_states(http, f"{prefix}{i}", {"active"}, 30)
    counters = await emulator.counters()
    assert counters["idempotent_replays"] >= 2  # the recovered batches were resent, replayed
    assert counters["idempotency_conflicts"]["IdempotencyKeyReused"] == 0
    assert counters["applied_twice"] == 0
    for segment in segments:
        assert len(await emulator.members(segment)) == 100


async def test_sigkill_with_writes_in_flight_replays_instead_of_writing_twice(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    tmp_path: Path,
):
    store = {"url": f"sqlite://{tmp_path}/journal.db"}
    await kill_with_writes_in_flight_then_restart(start_daemon, emulator, http, store, "k")


async def test_a_drain_that_runs_out_of_time_keeps_in_flight_batches_for_the_next_start(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    tmp_path: Path,
):
    # Writes are applied, then hang past the drain budget: SIGTERM must not forget them.
    await emulator.configure(
        {"faults": {"bulk": {"hang_rate": 1.0, "hang_s": 4.0, "after_apply_fraction": 1.0}}}
    )
    daemon = await start_daemon(
        store={"url": f"sqlite://{tmp_path}/journal.db"},
        server={"drain_budget_s": 1.0},
        cxone={"timeout_s": 10.0},
    )
    events = [{"contactId": f"d{i}", "segmentIds": ["DR"]} for i in range(50)]
    status, _ = await daemon.webhook(http, events)
    assert status == 202
    await hanging(emulator, 1)  # the batch is sent, applied and hanging
    daemon.process.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.process.wait, 20) == 0
    await emulator.configure({"faults": {"bulk": {"hang_rate": 0.0}}})
    await asyncio.sleep(3.5)  # the hung request completes on the emulator's side
    await asyncio.to_thread(daemon.restart)
    await daemon.wait_states(http, "d0", {"active"}, 30)
    await daemon.wait_states(http, "d49", {"active"}, 30)
    counters = await emulator.counters()
    assert counters["idempotent_replays"] >= 1  # resent under its key, replayed
    assert counters["applied_twice"] == 0


async def test_a_journal_gone_read_only_refuses_work_and_keeps_what_it_accepted(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    tmp_path: Path,
):
    # Writes stay slow so that accepted work is still unfinished when the disk goes read-only.
    await emulator.configure({"limits": {"bulk": {"rate": 1, "burst": 1}}})
    with ext4_image(tmp_path / "ro") as disk:
        daemon = await start_daemon(
            store={"url": f"sqlite://{disk.mount}/journal.db"},
            limits={"write_rps": 1.0},
            batching={"linger_ms": 50},
        )
        accepted = [f"ro-{i}" for i in range(30)]
        for contact in accepted:
            status, _ = await daemon.webhook(http, {"contactId": contact, "segmentIds": ["R1"]})
            assert status == 202

        disk.make_read_only()
        assert disk.is_read_only()
        status, answer = await daemon.webhook(http, {"contactId": "late", "segmentIds": ["R1"]})
        assert status == 503 and "journal" in answer["message"]
        late = orjson.dumps({"contactId": "late", "segmentIds": ["R1"]})
        async with http.post(
            f"{daemon.url}/v1/webhooks/crm", data=late, headers=daemon.signed_headers(late)
        ) as response:
            assert response.status == 503
            assert int(response.headers["Retry-After"]) > 0
        async with http.get(f"{daemon.url}/readyz") as response:
            assert response.status == 503
            assert "store" in (await response.json())["checks"]

        # The operator stops segmapd (which says the journal failed it), repairs the file
        # system and starts segmapd again.
        assert daemon.process.stop(timeout_s=30) == 1
        disk.repair()
        await emulator.configure({"limits": {"bulk": {"rate": 10, "burst": 10}}})
        daemon.restart()
        for contact in accepted:
            await daemon.wait_states(http, contact, {"active"}, 60)
        members = {m["contactId"] for m in await emulator.members("R1")}
        assert set(accepted) <= members
        assert daemon.process.stop(timeout_s=30) == 0  # before the file system goes away


async def test_the_validation_cache_and_refresh_budget_survive_a_restart(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
):
    # Every write stalls until its segment is refreshed, and a segment may be refreshed once an
    # hour (CXone's rule, and the daemon's setting): a daemon that forgot its budget over a
    # restart would refresh again and meet a 429.
    await emulator.configure({"indexing": {"stall_fraction": 1.0}})
    daemon = await start_daemon(
        validation={
            "interval_s": 0.2,
            "window_s": 1.0,
            "cache_ttl_s": 600.0,
            "refresh_min_interval_s": 3600.0,
            "deadline_s": 60.0,
        }
    )
    status, answer = await daemon.webhook(http, {"contactId": "kept-1", "segmentIds": ["KEPT"]})
    assert (status, answer) == (202, {"accepted": 1, "duplicates": 0, "stale": 0})
    await daemon.wait_states(http, "kept-1", {"active"}, 20)  # active through one refresh
    before = await emulator.counters()
    assert sum(before["requests"]["refresh"].values()) == 1

    daemon.process.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.process.wait, 20) == 0
    await asyncio.to_thread(daemon.restart)

    # The confirmation was kept: asking again is answered from the cache, with no write.
    status, answer = await daemon.webhook(http, {"contactId": "kept-1", "segmentIds": ["KEPT"]})
    assert (status, answer) == (202, {"accepted": 1, "duplicates": 1, "stale": 0})
    # The budget was kept: a new write to the segment stalls past the window, unrefreshed.
    status, _ = await daemon.webhook(http, {"contactId": "kept-2", "segmentIds": ["KEPT"]})
    assert status == 202
    await daemon.wait_states(http, "kept-2", {"verifying"}, 10)
    await asyncio.sleep(2.5)  # past window_s, many polls: when a refresh would have gone out
    after = await emulator.counters()
    assert sum(after["requests"]["refresh"].values()) == 1
    assert sum(after["requests"]["bulk"].values()) == sum(before["requests"]["bulk"].values()) + 1
    members = {m["contactId"]: m for m in await emulator.members("KEPT")}
    assert set(members) == {"kept-1", "kept-2"}
    assert members["kept-2"]["stalled"] and not members["kept-2"]["indexed"]
    _, view = await daemon.contact(http, "kept-2")
    assert [s["state"] for s in view["segments"]] == ["verifying"]
