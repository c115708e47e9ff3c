"""Live changes first (issue 21): real daemons and the emulator, reads limited.

A live change is confirmed ahead of a bulk backlog, bulk keeps its share of reads under a live
flood, and the lane survives a SIGKILL and a hop between instances. Every assertion is on order
or state (what is still waiting when the live change is done, reads counted per lane), never on
how long something took.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp

from tests.e2e.conftest import Daemon, StartDaemon
from tests.e2e.test_cluster import start_cluster
from tests.support.emulator import EmulatorControl
from tests.support.postgres import PostgresServer

READ_RPS = 20


async def lane_metric(http: aiohttp.ClientSession, daemon: Daemon, name: str, lane: str) -> float:
    """The sum of a metric's samples of one lane (over its other labels)."""
    async with http.get(f"{daemon.url}/metrics") as response:
        text = await response.text()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + "{") and f'lane="{lane}"' in line
    )


def bulk_events(prefix: str, count: int, segments: list[str]) -> list[dict[str, Any]]:
    return [{"contactId": f"{prefix}{i}", "segmentIds": segments} for i in range(count)]


async def limit_reads(emulator: EmulatorControl, rate: float) -> None:
    await emulator.configure({"limits": {"read": {"rate": rate, "burst": rate}}})


async def until_bulk_waits(
    http: aiohttp.ClientSession, daemon: Daemon, at_least: float, timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = 0.0
    while time.monotonic() < deadline:
        waiting = await lane_metric(http, daemon, "segmapd_validation_reads_waiting", "bulk")
        if waiting >= at_least:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"only {waiting} bulk reads ever waited")


async def test_a_live_change_is_active_while_a_bulk_backlog_still_waits_for_its_reads(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    await limit_reads(emulator, READ_RPS)
    daemon = await start_daemon(limits={"read_rps": READ_RPS})
    for start in (0, 600):
        status, body = await daemon.mappings(
            http, bulk_events("bf", 1200, ["BACKFILL"])[start : start + 600], "?lane=bulk"
        )
        assert status == 202, body
    await until_bulk_waits(http, daemon, 600)

    status, body = await daemon.mappings(
        http, {"contactId": "live-1", "segmentIds": ["VIP"]}, "?wait=60"
    )
    assert status == 200, body
    assert body["results"][0]["segments"][0]["state"] == "active"
    assert body["results"][0]["segments"][0]["lane"] == "live"
    # At the read limit the backlog needs a minute: most of it is still unconfirmed.
    waiting = await lane_metric(http, daemon, "segmapd_validation_reads_waiting", "bulk")
    assert waiting >= 600, waiting
    status, contact = await daemon.contact(http, "bf1199")
    assert status == 200
    [segment] = contact["segments"]
    assert segment["lane"] == "bulk" and segment["state"] != "active", segment
    lanes = contact["validation"]["lanes"]
    assert lanes["bulk"]["readsWaiting"] >= 600 and lanes["live"]["readsWaiting"] == 0, lanes


async def test_bulk_is_confirmed_at_its_share_of_reads_under_a_live_flood(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    await limit_reads(emulator, READ_RPS)
    share = 0.25
    daemon = await start_daemon(limits={"read_rps": READ_RPS, "bulk_read_share_min": share})
    status, body = await daemon.mappings(
        http, bulk_events("fl-bulk-", 400, ["FLOODBULK"]), "?lane=bulk"
    )
    assert status == 202, body
    await until_bulk_waits(http, daemon, 300)

    stop = asyncio.Event()

    async def flood() -> None:
        # Far more live changes than the read limit confirms: live always has reads due.
        n = 0
        while not stop.is_set():
            events = [{"contactId": f"fl-live-{n + i}", "segmentIds": ["FLOOD"]} for i in range(20)]
            n += 20
            status, body = await daemon.mappings(http, events)
            assert status == 202, body
            await asyncio.sleep(0.25)

    task = asyncio.create_task(flood())
    try:
        # Let the live reads queue up, then count a stretch of reads.
        deadline = time.monotonic() + 30
        while await lane_metric(http, daemon, "segmapd_validation_reads_waiting", "live") < 40:
            assert time.monotonic() < deadline, "the live flood never queued reads"
            await asyncio.sleep(0.1)
        name = "segmapd_validation_reads_total"
        live_before = await lane_metric(http, daemon, name, "live")
        bulk_before = await lane_metric(http, daemon, name, "bulk")
        confirmed_before = await lane_metric(
            http, daemon, "segmapd_assignment_active_latency_seconds_count", "bulk"
        )
        deadline = time.monotonic() + 60  # fails instead of hanging if reads stop
        while await lane_metric(http, daemon, name, "live") - live_before < 100:
            assert time.monotonic() < deadline, "live reads stopped"
            await asyncio.sleep(0.2)
        live = await lane_metric(http, daemon, name, "live") - live_before
        bulk = await lane_metric(http, daemon, name, "bulk") - bulk_before
        confirmed = (
            await lane_metric(
                http, daemon, "segmapd_assignment_active_latency_seconds_count", "bulk"
            )
            - confirmed_before
        )
        assert await lane_metric(http, daemon, "segmapd_validation_reads_waiting", "live") > 0
    finally:
        stop.set()
        await task  # the flood's own assertions (every live change taken) count too
    # Bulk never starves below its share (slack for the reads in flight at either end), and
    # live still gets most reads.
    assert bulk >= share * (live + bulk) * 0.7, (live, bulk)
    assert live >= (1 - share) * (live + bulk) * 0.7, (live, bulk)
    assert confirmed > 0


async def test_the_lane_survives_a_sigkill_and_bulk_work_is_read_as_bulk_after_it(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    # Reads refused: the pairs are written and wait for reads when the daemon is killed.
    await emulator.configure({"limits": {"read": {"rate": 0, "burst": 1}}})
    daemon = await start_daemon(limits={"read_rps": READ_RPS})
    status, body = await daemon.mappings(http, bulk_events("kl", 100, ["KILLED"]), "?lane=bulk")
    assert status == 202, body
    await until_bulk_waits(http, daemon, 1)
    daemon.process.signal(signal.SIGKILL)
    await asyncio.to_thread(daemon.process.wait, 10)
    await limit_reads(emulator, 1000)
    await asyncio.to_thread(daemon.restart)

    status, contact = await daemon.contact(http, "kl99")
    assert status == 200
    assert contact["segments"][0]["lane"] == "bulk", contact
    for i in range(100):
        done = await daemon.wait_states(http, f"kl{i}", {"active"}, 60)
        assert done["KILLED"]["lane"] == "bulk"
    name = "segmapd_validation_reads_total"
    assert await lane_metric(http, daemon, name, "bulk") >= 100
    assert await lane_metric(http, daemon, name, "live") == 0


async def test_several_instances_on_postgresql_keep_each_changes_lane(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    daemons = await start_cluster(start_daemon, postgres, postgres_url, 2)
    segments = ["PGL1", "PGL2", "PGL3", "PGL4", "PGL5", "PGL6"]
    # Each instance takes changes for every segment: some are forwarded to the other's inbox.
    first, second = daemons
    status, body = await first.mappings(http, bulk_events("pgb", 40, segments), "?lane=bulk")
    assert status == 202, body
    status, body = await second.mappings(http, bulk_events("pgl", 40, segments))
    assert status == 202, body
    # Every contact: the totals below count all 240 pairs, so none may still be verifying.
    for prefix, lane in (("pgb", "bulk"), ("pgl", "live")):
        for i in range(40):
            for daemon in daemons:
                done = await daemon.wait_states(http, f"{prefix}{i}", {"active"}, 60)
                assert {s["lane"] for s in done.values()} == {lane}, done
    name = "segmapd_assignment_active_latency_seconds_count"
    bulk = [await lane_metric(http, d, name, "bulk") for d in daemons]
    live = [await lane_metric(http, d, name, "live") for d in daemons]
    # Both instances confirmed work of both lanes: the forwarded changes kept theirs.
    assert all(b > 0 for b in bulk) and all(v > 0 for v in live), (bulk, live)
    assert sum(bulk) == sum(live) == 40 * len(segments)


async def test_a_lane_other_than_live_or_bulk_is_refused_naming_it(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start_daemon()
    event = {"contactId": "100000000001", "segmentIds": ["VIP"]}
    for query in ("?lane=fast", "?lane=", "?lane=bulk&lane=live", "?lane=BULK"):
        status, problem = await daemon.mappings(http, event, query)
        assert (status, problem["field"]) == (400, "lane"), (query, problem)
    status, _ = await daemon.mappings(http, event, "?lane=live")
    assert status == 202
    status, problem = await daemon.replay_dead_letters(http, {"lane": "fast"})
    assert status == 400
    assert problem["field"] == "lane"


async def test_replaying_every_dead_letter_is_bulk_and_named_contacts_are_live(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    contacts = ["500000000101", "500000000102", "500000000103"]
    await emulator.set_missing_contacts(contacts)
    daemon = await start_daemon()
    status, _ = await daemon.webhook(http, [{"contactId": c, "add": ["VIP"]} for c in contacts])
    assert status == 202
    for contact in contacts:
        await daemon.wait_states(http, contact, {"failed"}, 30)
    # Still missing: each replay fails again, which shows the lane it ran in.
    replays: list[tuple[dict[str, Any], dict[str, str]]] = [
        ({"contactIds": [contacts[0]]}, {contacts[0]: "live"}),
        ({"contactIds": [contacts[1]], "lane": "bulk"}, {contacts[1]: "bulk"}),
        ({}, dict.fromkeys(contacts, "bulk")),
        ({"lane": "live"}, dict.fromkeys(contacts, "live")),
    ]
    for body, lanes in replays:
        status, answer = await daemon.replay_dead_letters(http, body)
        assert status == 202, answer
        for contact, lane in lanes.items():
            _, seen = await daemon.contact(http, contact)
            assert seen["segments"][0]["lane"] == lane, (body, seen)
            await daemon.wait_states(http, contact, {"failed"}, 30)


async def until_segment_leaves(
    http: aiohttp.ClientSession, daemon: Daemon, contact_id: str, segment_id: str, state: str
) -> dict[str, Any]:
    """Poll the contact until `segment_id` is past `state`; every segment's row then."""
    deadline = time.monotonic() + 60.0
    last: Any = None
    while time.monotonic() < deadline:
        status, last = await daemon.contact(http, contact_id)
        if status == 200:
            rows = {s["segmentId"]: s for s in last["segments"]}
            if segment_id in rows and rows[segment_id]["state"] != state:
                return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"{contact_id}/{segment_id} never left {state}: {last}")


async def test_a_live_change_of_a_backfilled_contact_is_written_before_its_own_bulk_work(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    # One write a second: the backfill (3 x 2,000 pairs, 30 batches) is written segment after
    # segment, and the contact's own bulk pairs are the last of each segment's backlog.
    daemon = await start_daemon(limits={"write_rps": 1})
    segments = ["BFA", "BFB", "BFC"]
    for start in (0, 1000):
        events = bulk_events("gf", 2000, segments)[start : start + 1000]
        status, body = await daemon.mappings(http, events, "?lane=bulk")
        assert status == 202, body
    status, body = await daemon.mappings(http, {"contactId": "gf1999", "segmentIds": ["VIP"]})
    assert status == 202, body
    # Its three slots are held by queued bulk pairs: one gives its slot up, and the live pair is
    # written while all three still wait behind the backlog of their segments.
    rows = await until_segment_leaves(http, daemon, "gf1999", "VIP", "queued")
    assert rows["VIP"]["lane"] == "live", rows
    assert {rows[s]["state"] for s in segments} == {"queued"}, rows
    assert {rows[s]["lane"] for s in segments} == {"bulk"}, rows


async def test_a_live_change_joining_a_change_that_waits_for_a_request_survives_a_sigkill(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    # Slow bulk writes: the ADD is still in flight while the two removals arrive and when the
    # daemon is killed.
    await emulator.configure({"faults": {"bulk": {"latency_ms": 30_000}}})
    daemon = await start_daemon(cxone={"timeout_s": 60})
    contact = "wl1"
    status, body = await daemon.mappings(
        http, {"contactId": contact, "add": ["WAITS"]}, "?lane=bulk"
    )
    assert status == 202, body
    await until_segment_leaves(http, daemon, contact, "WAITS", "queued")
    # A bulk removal waits for the ADD's outcome; a live one joins it (someone waits for it).
    for query in ("?lane=bulk", ""):
        status, body = await daemon.mappings(
            http, {"contactId": contact, "remove": ["WAITS"]}, query
        )
        assert status == 202, body
    daemon.process.signal(signal.SIGKILL)
    await asyncio.to_thread(daemon.process.wait, 10)
    await emulator.configure({"faults": {"bulk": {"latency_ms": 0}}})
    await asyncio.to_thread(daemon.restart)
    done = await daemon.wait_states(http, contact, {"removed"}, 60)
    assert (done["WAITS"]["intent"], done["WAITS"]["lane"]) == ("remove", "live"), done


async def test_a_backfill_is_written_while_live_changes_keep_segments_due(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    # Two writes a second, and live changes over 10 segments, every one due again as soon as
    # it was written: more live batches are due than the writes allowed. Bulk still gets its
    # share of write requests.
    daemon = await start_daemon(limits={"write_rps": 2, "bulk_read_share_min": 0.2})
    stop = asyncio.Event()

    async def flood() -> None:
        n = 0
        while not stop.is_set():
            events = [{"contactId": f"wl-{n}", "segmentIds": [f"WSLIVE{i}"]} for i in range(10)]
            n += 1
            status, body = await daemon.mappings(http, events)
            assert status == 202, body
            await asyncio.sleep(0.1)

    task = asyncio.create_task(flood())
    try:
        # The live segments have lingered and are being written: now the backfill comes.
        await until_segment_leaves(http, daemon, "wl-0", "WSLIVE0", "queued")
        status, body = await daemon.mappings(
            http, bulk_events("ws", 1000, ["WSBULK"]), "?lane=bulk"
        )
        assert status == 202, body
        rows = await until_segment_leaves(http, daemon, "ws0", "WSBULK", "queued")
        assert not task.done(), "the live flood stopped before the bulk write"
    finally:
        stop.set()
        await task  # the flood's own assertions (every live change taken) count too
    assert rows["WSBULK"]["lane"] == "bulk", rows
