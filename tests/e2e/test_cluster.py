"""Several real daemons on one PostgreSQL journal, with the emulator: one cluster, one budget.

Short leases (5 s) keep takeovers quick; every process is a real `segmapd run`.
"""

from __future__ import annotations

import asyncio
import base64
import random
import secrets
import signal
import time
from typing import Any

import aiohttp
import asyncpg
import orjson

from daemon.notifier import rfc3339
from tests.e2e.conftest import Daemon, StartDaemon
from tests.support.emulator import EmulatorControl
from tests.support.postgres import PostgresServer
from tests.support.waits import until

LEASE_S = 5.0


async def start_cluster(
    start_daemon: StartDaemon,
    postgres: PostgresServer,
    url: str,
    count: int,
    **overrides: dict[str, Any],
) -> list[Daemon]:
    """`count` daemons on one database, answering one webhook secret and one admin token."""
    token = secrets.token_urlsafe(16)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    sections: dict[str, dict[str, Any]] = {
        "store": {"url": url, "password": postgres.password},
        "cluster": {"lease_s": LEASE_S},
        "server": {"admin_tokens": [token]},
        "sources.crm": {"kind": "standard", "secret": secret},
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    daemons = list(await asyncio.gather(*(start_daemon(**sections) for _ in range(count))))
    for daemon in daemons:
        daemon.secret, daemon.admin_token = secret, token
    await settled(daemons)
    return daemons


async def metric(http: aiohttp.ClientSession, daemon: Daemon, name: str) -> float:
    """One unlabelled sample of the daemon's /metrics."""
    async with http.get(f"{daemon.url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def held_by_state(http: aiohttp.ClientSession, daemon: Daemon) -> dict[str, float]:
    """The instance's in-progress gauges (`segmapd_assignments`) that are not zero."""
    async with http.get(f"{daemon.url}/metrics") as response:
        text = await response.text()
    found = {}
    for line in text.splitlines():
        if line.startswith('segmapd_assignments{state="'):
            labels, value = line.rsplit(" ", 1)
            if float(value) != 0:
                found[labels.split('"')[1]] = float(value)
    return found


async def settled(daemons: list[Daemon], timeout_s: float = 20.0) -> None:
    """Wait until the live daemons hold all 64 shards between them, none more than its share."""
    share = -(-64 // len(daemons))
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            owned = [await metric(http, d, "segmapd_cluster_shards_owned") for d in daemons]
            if sum(owned) == 64 and max(owned) <= share:
                return
            assert time.monotonic() < deadline, f"shards never settled: {owned}"
            await asyncio.sleep(0.2)


async def metric_total(http: aiohttp.ClientSession, daemon: Daemon, name: str) -> float:
    """The sum of a labelled metric's samples in the daemon's /metrics."""
    async with http.get(f"{daemon.url}/metrics") as response:
        text = await response.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def events(prefix: str, start: int, stop: int, segments: list[str]) -> list[dict[str, Any]]:
    return [{"contactId": f"{prefix}{i}", "segmentIds": segments} for i in range(start, stop)]


async def test_three_instances_share_the_work_one_owner_batches_each_segment(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    daemons = await start_cluster(start_daemon, postgres, postgres_url, 3)
    segments = ["CL1", "CL2", "CL3", "CL4"]
    # Each instance receives a third of the contacts, for every segment.
    answers = await asyncio.gather(
        *(
            d.webhook(http, events("cl", 30 * n, 30 * (n + 1), segments))
            for n, d in enumerate(daemons)
        )
    )
    assert [status for status, _ in answers] == [202, 202, 202]
    for i in (0, 45, 89):
        await daemons[i % 3].wait_states(http, f"cl{i}", {"active"}, 30)
    for segment in segments:
        assert {m["contactId"] for m in await emulator.members(segment)} == {
            f"cl{i}" for i in range(90)
        }
    counters = await emulator.counters()
    # One owner per segment coalesced what three instances took: about one batch a segment,
    # where three instances each writing their own share would have sent three.
    assert counters["bulk_ids"]["requests"] < 3 * len(segments), counters["bulk_ids"]
    assert counters["bulk_ids"]["ids"] == 90 * len(segments)
    forwarded = [await metric(http, d, "segmapd_cluster_forwarded_total") for d in daemons]
    assert sum(forwarded) > 0
    # The same status from every instance.
    await daemons[0].wait_states(http, "cl42", {"active"}, 30)
    views = [(await d.contact(http, "cl42"))[1]["segments"] for d in daemons]
    assert all(view == views[0] for view in views), views
    assert {s["state"] for s in views[0]} == {"active"}

    # One delivery sent to two instances at once is one unit of work: one 202, one 200.
    body = events("dup", 0, 20, ["CL1"])
    first, second = await asyncio.gather(
        daemons[0].webhook(http, body, msg_id="msg_cluster_dup"),
        daemons[1].webhook(http, body, msg_id="msg_cluster_dup"),
    )
    assert sorted([first[0], second[0]]) == [200, 202]
    assert first[1] == second[1] and first[1]["accepted"] == 20

    # `?wait=` is answered by whichever instance holds the request.
    waits = await asyncio.gather(
        *(
            http.post(
                f"{d.url}/v1/mappings?wait=20",
                data=orjson.dumps([{"contactId": f"w{n}", "segmentIds": segments}]),
                headers={**d.admin, "Content-Type": "application/json"},
            )
            for n, d in enumerate(daemons)
        )
    )
    for response in waits:
        answer = await response.json()
        assert response.status == 200, answer
        assert answer["complete"] is True
        assert {s["state"] for s in answer["results"][0]["segments"]} == {"active"}
        response.release()


async def test_sigkill_of_instances_under_load_loses_and_doubles_nothing(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    daemons = await start_cluster(start_daemon, postgres, postgres_url, 3)
    segments = ["KL1", "KL2"]
    acknowledged: list[str] = []
    rng = random.Random(7)
    stop = asyncio.Event()

    async def load() -> None:
        sent = 0
        while not stop.is_set():
            daemon = daemons[sent % 3]
            body = events("kl", sent * 3, sent * 3 + 3, segments)
            sent += 1
            try:
                status, _ = await daemon.webhook(http, body)
            except aiohttp.ClientError:
                continue  # that instance is down: the sender tries another
            if status == 202:
                acknowledged.extend(e["contactId"] for e in body)
            else:
                assert status == 503, status
            # Each pair costs a membership read, and the reads are shared at 50/s.
            await asyncio.sleep(0.1)

    loader = asyncio.create_task(load())
    try:
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            victim = daemons[rng.randrange(3)]
            victim.process.signal(signal.SIGKILL)
            await asyncio.to_thread(victim.process.wait, 10)
            await asyncio.sleep(rng.uniform(0.0, 1.0))
            await asyncio.to_thread(victim.restart)
    finally:
        stop.set()
        await loader
    assert len(acknowledged) > 100
    assert [d.process.proc.poll() for d in daemons if d.process.proc] == [None] * 3
    for contact_id in acknowledged[:: max(1, len(acknowledged) // 20)] + acknowledged[-1:]:
        await daemons[0].wait_states(http, contact_id, {"active"}, 60)
    for segment in segments:
        members = {m["contactId"] for m in await emulator.members(segment)}
        assert set(acknowledged) <= members
    counters = await emulator.counters()
    assert counters["idempotency_conflicts"].get("IdempotencyKeyReused", 0) == 0
    assert counters["applied_twice"] == 0
    assert sum(counters["rate_limited"].values()) == 0


async def test_a_paused_owner_is_fenced_never_writes_after_it_wakes_and_rejoins(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    # Writes are applied but answered slowly: the paused owner has requests in flight.
    await emulator.configure({"faults": {"bulk": {"latency_ms": 300}}})
    daemons = await start_cluster(start_daemon, postgres, postgres_url, 2)
    paused, other = daemons
    assert paused.process.proc is not None
    pid = paused.process.proc.pid
    segments = [f"PZ{n}" for n in range(6)]
    status, _ = await paused.webhook(http, events("pz", 0, 100, segments))
    assert status == 202
    paused.process.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        # Declared dead after its lease: its shards taken and their work redone by the other.
        async with aiohttp.ClientSession() as probe:
            while await metric(probe, other, "segmapd_cluster_shards_owned") < 64:
                assert time.monotonic() - stopped < 30, "the shards were never taken over"
                await asyncio.sleep(0.2)
        for i in (0, 50, 99):
            await other.wait_states(http, f"pz{i}", {"active"}, 30)
        before = await emulator.counters()
        # Paused well past its lease (at least three of them) before it wakes.
        await asyncio.sleep(max(0.0, 3 * LEASE_S - (time.monotonic() - stopped)))
    finally:
        paused.process.signal(signal.SIGCONT)
    # It wakes, fences itself (its heartbeats are a lease old, and it was declared dead)
    # without exiting, and joins again as a new member: the two share the shards again.
    deadline = time.monotonic() + 30
    while await metric_total(http, paused, "segmapd_cluster_fences_total") < 1:
        assert time.monotonic() < deadline, "the woken instance never fenced itself"
        await asyncio.sleep(0.2)
    await settled([paused, other], timeout_s=30)
    assert paused.process.proc.poll() is None and paused.process.proc.pid == pid
    while True:
        async with http.get(f"{paused.url}/readyz") as response:
            if response.status == 200:
                break
            assert time.monotonic() < deadline, await response.text()
        await asyncio.sleep(0.2)
    # Nothing it held when it was paused was sent again: every write was done by the other.
    after = await emulator.counters()
    assert after["bulk_ids"]["requests"] == before["bulk_ids"]["requests"]
    assert after["idempotency_conflicts"].get("IdempotencyKeyReused", 0) == 0
    assert after["applied_twice"] == 0
    assert sum(after["rate_limited"].values()) == 0
    for segment in segments:
        assert len(await emulator.members(segment)) == 100
    for daemon in daemons:
        status, view = await daemon.contact(http, "pz7")
        assert {s["state"] for s in view["segments"]} == {"active"}


async def test_a_fenced_instance_refuses_work_until_it_has_joined_again(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    [daemon] = await start_cluster(start_daemon, postgres, postgres_url, 1)
    assert daemon.process.proc is not None
    pid = daemon.process.proc.pid
    status, _ = await daemon.webhook(http, events("fz", 0, 10, ["FZ1"]))
    assert status == 202
    # The members' table is locked by another session: heartbeats (and joining again) wait for
    # it, as for a database that does not answer, while commits still go through. After nearly
    # a lease without a heartbeat the instance fences itself.
    blocker = await asyncpg.connect(postgres_url, password=postgres.password)
    lock = blocker.transaction()
    await lock.start()
    try:
        await blocker.execute("LOCK TABLE segmapd_instances IN EXCLUSIVE MODE")
        deadline = time.monotonic() + 30
        while await metric(http, daemon, "segmapd_cluster_fenced") != 1:
            assert time.monotonic() < deadline, "the instance never fenced itself"
            await asyncio.sleep(0.2)
        assert await metric(http, daemon, "segmapd_cluster_shards_owned") == 0
        body = orjson.dumps(events("fz", 10, 11, ["FZ1"]))
        async with http.post(
            f"{daemon.url}/v1/webhooks/crm", data=body, headers=daemon.signed_headers(body)
        ) as response:
            assert response.status == 503
            assert float(response.headers["Retry-After"]) > 0
            assert "fenced" in await response.text()
        async with http.post(
            f"{daemon.url}/v1/mappings",
            data=body,
            headers={**daemon.admin, "Content-Type": "application/json"},
        ) as response:
            assert response.status == 503 and "Retry-After" in response.headers
        async with http.get(f"{daemon.url}/readyz") as response:
            assert response.status == 503
            assert (await response.json())["checks"]["cluster"].startswith("fenced: ")
    finally:
        await lock.rollback()
        await blocker.close()
    # The table answers again: it joins again by itself, and takes work.
    while True:
        async with http.get(f"{daemon.url}/readyz") as response:
            if response.status == 200:
                break
            assert time.monotonic() < deadline, await response.text()
        await asyncio.sleep(0.2)
    status, _ = await daemon.webhook(http, events("fz", 10, 11, ["FZ1"]))
    assert status == 202
    for i in range(11):
        await daemon.wait_states(http, f"fz{i}", {"active"}, 30)
    assert daemon.process.proc.poll() is None and daemon.process.proc.pid == pid
    assert await metric_total(http, daemon, "segmapd_cluster_fences_total") == 1


async def test_a_delivery_whose_commit_a_fence_dropped_is_taken_anew_when_sent_again(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    [daemon] = await start_cluster(start_daemon, postgres, postgres_url, 1)
    # Commits wait for a lock on the assignments, heartbeats for one on the members: the
    # delivery's commit is under way when the instance fences itself.
    blocker = await asyncpg.connect(postgres_url, password=postgres.password)
    killer = await asyncpg.connect(postgres_url, password=postgres.password)
    lock = blocker.transaction()
    await lock.start()
    contact = [{"contactId": "LOST1", "segmentIds": ["FZ9"]}]
    try:
        await blocker.execute("LOCK TABLE assignments IN EXCLUSIVE MODE")
        await blocker.execute("LOCK TABLE segmapd_instances IN EXCLUSIVE MODE")
        first = asyncio.create_task(daemon.webhook(http, contact, msg_id="msg_fence_lost"))
        deadline = time.monotonic() + 30
        while await metric(http, daemon, "segmapd_cluster_fenced") != 1:
            assert time.monotonic() < deadline, "the instance never fenced itself"
            await asyncio.sleep(0.2)
        # The commit under way fails (its session is ended): nothing of the delivery landed.
        await killer.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND pid <> $1",
            blocker.get_server_pid(),
        )
        status, _ = await first
        assert status == 503
    finally:
        await lock.rollback()
        await blocker.close()
        await killer.close()
    while True:
        async with http.get(f"{daemon.url}/readyz") as response:
            if response.status == 200:
                break
            assert time.monotonic() < deadline + 30, await response.text()
        await asyncio.sleep(0.2)
    # The sender retries the same delivery: it is taken now (202), not answered from memory
    # as if it had been journaled (200), and its work is done.
    status, answer = await daemon.webhook(http, contact, msg_id="msg_fence_lost")
    assert status == 202 and answer.get("accepted") == 1, (status, answer)
    await daemon.wait_states(http, "LOST1", {"active"}, 30)


async def test_a_rolling_restart_answers_only_2xx_or_503_with_retry_after(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    daemons = await start_cluster(start_daemon, postgres, postgres_url, 3)
    segments = ["RR1", "RR2"]
    restarting: set[int] = set()
    answers: list[tuple[int, str | None]] = []
    acknowledged: list[str] = []
    stop = asyncio.Event()

    async def load() -> None:
        sent = 0
        while not stop.is_set():
            sent += 1
            # The load balancer sends only to instances it has not taken out for a restart.
            n = next(n for n in ((sent + k) % 3 for k in range(3)) if n not in restarting)
            body = events("rr", sent * 3, sent * 3 + 3, segments)
            try:
                async with http.post(
                    f"{daemons[n].url}/v1/webhooks/crm",
                    data=orjson.dumps(body),
                    headers=daemons[n].signed_headers(orjson.dumps(body)),
                ) as response:
                    answers.append((response.status, response.headers.get("Retry-After")))
                    if response.status == 202:
                        acknowledged.extend(e["contactId"] for e in body)
            except aiohttp.ClientError:
                pass  # taken out while the request was open: a balancer retries elsewhere
            await asyncio.sleep(0.1)

    loader = asyncio.create_task(load())
    try:
        for n, daemon in enumerate(daemons):
            await asyncio.sleep(0.5)
            restarting.add(n)
            daemon.process.signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemon.process.wait, 30) == 0
            await asyncio.to_thread(daemon.restart)  # returns once it listens: it is ready
            restarting.discard(n)
    finally:
        stop.set()
        await loader
    await settled(daemons)
    refused = [(status, retry) for status, retry in answers if status >= 300]
    assert all(status == 503 and retry for status, retry in refused), refused
    assert len(acknowledged) > 60
    for contact_id in (acknowledged[0], acknowledged[len(acknowledged) // 2], acknowledged[-1]):
        await daemons[0].wait_states(http, contact_id, {"active"}, 30)
    for segment in segments:
        assert set(acknowledged) <= {m["contactId"] for m in await emulator.members(segment)}


async def test_the_database_restarted_under_three_instances_loses_nothing(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    daemons = await start_cluster(start_daemon, postgres, postgres_url, 3)
    segments = ["DB1", "DB2"]
    acknowledged: list[str] = []
    for n, daemon in enumerate(daemons):
        status, _ = await daemon.webhook(http, events("db", 20 * n, 20 * (n + 1), segments))
        assert status == 202
        acknowledged += [f"db{i}" for i in range(20 * n, 20 * (n + 1))]
    await asyncio.to_thread(postgres.restart)
    # Each instance answers 503 + Retry-After until it commits again, then takes work.
    for n, daemon in enumerate(daemons):
        deadline = time.monotonic() + 30
        while True:
            body = events("after", 10 * n, 10 * (n + 1), segments)
            status, _ = await daemon.webhook(http, body)
            if status == 202:
                acknowledged += [e["contactId"] for e in body]
                break
            assert status == 503 and time.monotonic() < deadline
            await asyncio.sleep(0.3)
    for contact_id in acknowledged[::7] + acknowledged[-1:]:
        await daemons[1].wait_states(http, contact_id, {"active"}, 40)
    for segment in segments:
        assert set(acknowledged) <= {m["contactId"] for m in await emulator.members(segment)}
    counters = await emulator.counters()
    assert counters["idempotency_conflicts"].get("IdempotencyKeyReused", 0) == 0
    assert counters["applied_twice"] == 0


async def test_a_database_outage_of_two_leases_fences_instances_that_rejoin_without_exiting(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    # Writes are answered slowly: batches are in flight when the database goes away.
    await emulator.configure({"faults": {"bulk": {"latency_ms": 300}}})
    daemons = await start_cluster(start_daemon, postgres, postgres_url, 3)
    pids = [d.process.proc.pid for d in daemons if d.process.proc]
    segments = ["OU1", "OU2", "OU3"]
    answers: list[tuple[int, str | None]] = []
    acknowledged: list[str] = []
    stop = asyncio.Event()
    patient = aiohttp.ClientTimeout(total=60)

    async def load() -> None:
        sent = 0
        while not stop.is_set():
            daemon = daemons[sent % 3]
            body = events("ou", sent * 3, sent * 3 + 3, segments)
            sent += 1
            payload = orjson.dumps(body)
            try:
                async with http.post(
                    f"{daemon.url}/v1/webhooks/crm",
                    data=payload,
                    headers=daemon.signed_headers(payload),
                    timeout=patient,
                ) as response:
                    answers.append((response.status, response.headers.get("Retry-After")))
                    if response.status == 202:
                        acknowledged.extend(e["contactId"] for e in body)
            except aiohttp.ClientError:
                answers.append((0, None))  # nobody answered: the instance is gone
            await asyncio.sleep(0.1)

    async def ready(daemon: Daemon) -> bool:
        assert daemon.process.proc is not None
        assert daemon.process.proc.poll() is None, f"exited {daemon.process.proc.returncode}"
        async with http.get(f"{daemon.url}/readyz") as response:
            return response.status == 200

    loader = asyncio.create_task(load())
    try:
        while len(acknowledged) < 30:  # work taken, some of it in flight
            assert not loader.done(), loader
            await asyncio.sleep(0.1)
        # Down for two leases: every instance is silent long enough to be declared dead.
        await asyncio.to_thread(postgres.stop)
        try:
            await asyncio.sleep(2 * LEASE_S)
        finally:
            await asyncio.to_thread(postgres.start)
        # Each instance fences itself, waits for the database and joins again, by itself.
        deadline = time.monotonic() + 60
        for daemon in daemons:
            while not await ready(daemon):
                assert time.monotonic() < deadline, "an instance never became ready again"
                await asyncio.sleep(0.2)
        taken_after = len(acknowledged)
        while len(acknowledged) < taken_after + 30:  # and takes work again
            assert not loader.done(), loader
            assert time.monotonic() < deadline, "no work was taken after the outage"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await loader
    # No instance exited: the same processes run, and they share the shards again.
    assert [d.process.proc.poll() for d in daemons if d.process.proc] == [None] * 3
    assert [d.process.proc.pid for d in daemons if d.process.proc] == pids
    await settled(daemons, timeout_s=60)
    fences = [await metric_total(http, d, "segmapd_cluster_fences_total") for d in daemons]
    assert all(count >= 1 for count in fences), fences
    assert [await metric(http, d, "segmapd_cluster_fenced") for d in daemons] == [0.0] * 3
    # Refusals were 503 with Retry-After, nothing else.
    refused = [(status, retry) for status, retry in answers if status != 202]
    assert refused, "no webhook met the outage"
    assert all(status == 503 and retry for status, retry in refused), refused
    # Every acknowledged assignment ends active, in the daemons' status and in CXone.
    for n, contact_id in enumerate(acknowledged):
        await daemons[n % 3].wait_states(http, contact_id, {"active"}, 60)
    for segment in segments:
        assert set(acknowledged) <= {m["contactId"] for m in await emulator.members(segment)}
    # Nothing was applied twice: batches in flight were resent under their keys and replayed.
    counters = await emulator.counters()
    assert counters["idempotency_conflicts"].get("IdempotencyKeyReused", 0) == 0
    assert counters["applied_twice"] == 0
    assert sum(counters["rate_limited"].values()) == 0
    # What each instance let go of when it fenced left its in-progress gauges: with every
    # assignment done, none holds anything (none below zero, none left over).
    for daemon in daemons:
        assert await held_by_state(http, daemon) == {}, daemon.url


async def test_a_large_deliverys_mirror_removes_what_it_added_on_segments_owned_elsewhere(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    """A delivery taken in slices (more than 500 assignments) adds a contact to segments,
    most of them owned by the other instance (forwarded to it), and its last event clears the
    contact: every one of those adds is removed again, as separate deliveries would have it."""
    # Reads raised on both sides: the 3,000 filler pairs are read back in seconds.
    await emulator.configure({"limits": {"read": {"rate": 1000, "burst": 1000}}})
    daemons = await start_cluster(
        start_daemon, postgres, postgres_url, 2, limits={"read_rps": 1000.0}
    )
    # 16 segments over two instances: the other owns some of them (all on one: 2 in 65,536).
    segments = [f"LM{n}" for n in range(16)]
    # 998 events of 3 segments between them: at most 1,000 events make a delivery.
    filler = events("lmfill", 0, 998, ["LMF1", "LMF2", "LMF3"])
    body = [{"contactId": "lmx", "add": segments}, *filler, {"contactId": "lmx", "set": []}]
    status, answer = await daemons[0].webhook(http, body)
    assert status == 202, answer
    assert await metric(http, daemons[0], "segmapd_cluster_forwarded_total") > 0
    states = await daemons[0].wait_states(http, "lmx", {"removed", "active", "failed"}, 30)
    assert {segment: s["intent"] for segment, s in states.items()} == dict.fromkeys(
        segments, "remove"
    ), states
    for segment in segments:
        assert "lmx" not in {m["contactId"] for m in await emulator.members(segment)}


async def test_changes_forwarded_to_a_segments_owner_keep_their_source(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    """A webhook and an admin API change taken by one instance for segments the other owns
    are journaled by the owner with their sources, and a replay of one source's dead letters,
    forwarded again, keeps it."""
    daemons = await start_cluster(start_daemon, postgres, postgres_url, 2)
    segments = [f"FS{n}" for n in range(16)]  # the other instance owns some of them
    await emulator.set_missing_contacts(["fs-hook", "fs-api"])
    status, answer = await daemons[0].webhook(http, {"contactId": "fs-hook", "add": segments})
    assert status == 202, answer
    status, answer = await daemons[0].mappings(http, {"contactId": "fs-api", "add": segments})
    assert status == 202, answer
    assert await metric(http, daemons[0], "segmapd_cluster_forwarded_total") > 0
    for contact in ("fs-hook", "fs-api"):
        await daemons[0].wait_states(http, contact, {"failed"}, 30)

    async def by_source(daemon: Daemon, source: str) -> list[dict[str, Any]]:
        status, listed = await daemon.dead_letters(http, f"?source={source}")
        assert status == 200
        letters: list[dict[str, Any]] = listed["deadLetters"]
        return letters

    for daemon in daemons:
        hook = await by_source(daemon, "crm")
        assert sorted(d["segmentId"] for d in hook) == sorted(segments)
        assert {d["contactId"] for d in hook} == {"fs-hook"}
        assert {d["contactId"] for d in await by_source(daemon, "mappings")} == {"fs-api"}
    # Replayed from the other instance: each goes (forwarded, for some) to its owner as the
    # webhook's, and fails again as the webhook's.
    replayed_at = time.time()
    status, answer = await daemons[1].replay_dead_letters(http, {"source": "crm"})
    assert status == 202, answer
    assert answer["replayed"] == len(segments)

    async def failed_again() -> list[Any]:
        hook = await by_source(daemons[0], "crm")
        return [d for d in hook if d["receivedAt"] >= rfc3339(replayed_at - 0.001)]

    await until(
        failed_again,
        lambda again: len(again) == len(segments),
        timeout_s=30,
        what="each replayed dead letter failed again",
        interval_s=0.1,
    )
    assert {d["contactId"] for d in await by_source(daemons[0], "mappings")} == {"fs-api"}
