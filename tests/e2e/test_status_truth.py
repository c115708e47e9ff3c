"""Corners where segmapd's status or CXone's state could end up wrong, through the real daemon.

Each test drives a real segmapd process, its SQLite journal and the emulator process, and
checks what segmapd reports against what CXone (the emulator) holds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.e2e.conftest import Daemon, StartDaemon, daemon_config
from tests.e2e.test_cli import admin_args, segmapd
from tests.e2e.test_crm_sources import (
    contact_fields,
    hubspot_event,
    post_hubspot,
    post_salesforce,
    salesforce_message,
    start,
)
from tests.support.emulator import EmulatorControl
from tests.support.processes import ManagedProcess
from tests.support.waits import until


async def pair_states(http: aiohttp.ClientSession, daemon: Daemon, contact: str) -> dict[str, Any]:
    status, body = await daemon.contact(http, contact)
    assert status == 200, body
    return {s["segmentId"]: s for s in body["segments"]}


async def member(emulator: EmulatorControl, segment_id: str, contact: str) -> bool:
    return any(m["contactId"] == contact for m in await emulator.members(segment_id))


# ---- an invalid value never takes a membership's place ------------------------------------


async def test_a_hubspot_bad_value_never_replaces_nor_orphans_a_membership_segmapd_made(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    contact = 500
    now_ms = int(time.time() * 1000)
    status, _ = await post_hubspot(http, daemon, [hubspot_event(contact, "VIP", now_ms - 60_000)])
    assert status == 200
    await daemon.wait_states(http, str(contact), {"active"}, 30)

    # Ten minutes older than what VIP has: stale, whatever else it carries.
    older = hubspot_event(contact, "VIP;bad value", now_ms - 600_000)
    status, answer = await post_hubspot(http, daemon, [older])
    assert status == 200
    # Both pairs: VIP's, and the bad value's, older than the mirror that VIP came with.
    assert answer["stale"] == 2, answer
    # Newer: VIP is confirmed as it was, and only the bad value is dead-lettered.
    status, _ = await post_hubspot(
        http, daemon, [hubspot_event(contact, "VIP;bad value", now_ms - 30_000)]
    )
    assert status == 200
    states = await pair_states(http, daemon, str(contact))
    assert states["VIP"]["state"] == "active", states
    assert states["bad value"]["state"] == "failed"
    assert await member(emulator, "VIP", str(contact))

    # The contact is deleted in HubSpot: the membership segmapd made goes.
    deletion = {**hubspot_event(contact, None, now_ms), "subscriptionType": "contact.deletion"}
    del deletion["propertyName"], deletion["propertyValue"]
    status, answer = await post_hubspot(http, daemon, [deletion])
    assert status == 200
    assert answer["accepted"] >= 1, answer
    views = await daemon.wait_states(http, str(contact), {"removed", "failed"}, 30)
    assert views["VIP"]["state"] == "removed"
    assert not await member(emulator, "VIP", str(contact))

    # A replay never sends what was invalid when it arrived.
    bulk_before = (await emulator.counters())["bulk_ids"]["ids"]
    status, answer = await daemon.replay_dead_letters(http, {})
    assert (status, answer) == (202, {"replayed": 0, "skipped": 1})
    await asyncio.sleep(1.0)  # a replayed add would be written within a linger
    assert (await emulator.counters())["bulk_ids"]["ids"] == bulk_before
    assert (await pair_states(http, daemon, str(contact)))["VIP"]["state"] == "removed"
    # The CLI says what it skipped, and why.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMAPD_")}
    code, out, _ = await segmapd("dlq", "replay", *admin_args(daemon), env=env)
    assert code == 0 and "skipped 1" in out and "invalid when they arrived" in out, out


async def test_a_salesforce_bad_picklist_value_then_an_empty_picklist_removes_the_membership(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    contact = "003000000000501"
    status, _ = await post_salesforce(
        http, daemon, salesforce_message([("04l000000000001", contact_fields(contact, "VIP"))])
    )
    assert status == 200
    await daemon.wait_states(http, contact, {"active"}, 30)
    status, _ = await post_salesforce(
        http,
        daemon,
        salesforce_message([("04l000000000002", contact_fields(contact, "VIP;Bad Value"))]),
    )
    assert status == 200
    states = await pair_states(http, daemon, contact)
    assert states["VIP"]["state"] == "active"
    status, _ = await post_salesforce(
        http, daemon, salesforce_message([("04l000000000003", contact_fields(contact, None))])
    )
    assert status == 200
    views = await daemon.wait_states(http, contact, {"removed", "failed"}, 30)
    assert views["VIP"]["state"] == "removed"
    assert not await member(emulator, "VIP", contact)


# ---- the events of one delivery apply in their order -----------------------------------------


async def test_the_events_of_one_delivery_apply_in_their_order(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start_daemon()
    later_ms = int(time.time() * 1000) + 60_000
    cases = {
        "OX6": [{"contactId": "OX6", "add": ["B"]}, {"contactId": "OX6", "set": ["A"]}],
        "OX7": [
            {"contactId": "OX7", "add": ["B"]},
            {"contactId": "OX7", "set": ["A"], "occurredAt": later_ms},
        ],
    }
    for contact, events in cases.items():
        status, answer = await daemon.mappings(http, events, "?wait=30")
        assert status == 200 and answer["complete"], answer
        states = await pair_states(http, daemon, contact)
        assert {s: (v["intent"], v["state"]) for s, v in states.items()} == {
            "A": ("add", "active"),
            "B": ("remove", "removed"),
        }, contact
        assert not await member(emulator, "B", contact)
    # The same through a signed webhook of a standard source.
    status, _ = await daemon.webhook(
        http, [{"contactId": "OX8", "add": ["B"]}, {"contactId": "OX8", "set": ["A"]}]
    )
    assert status == 202
    views = await daemon.wait_states(http, "OX8", {"active", "removed"}, 30)
    assert {s: v["state"] for s, v in views.items()} == {"A": "active", "B": "removed"}


# ---- a wait that can never complete says so --------------------------------------------------


async def test_a_wait_on_a_stale_change_reports_it_and_completes(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start_daemon()
    now_ms = int(time.time() * 1000)
    status, answer = await daemon.mappings(
        http, {"contactId": "ST1", "add": ["VIP"], "occurredAt": now_ms}, "?wait=30"
    )
    assert status == 200 and answer["complete"]
    status, answer = await daemon.mappings(
        http,
        {"contactId": "ST1", "remove": ["VIP"], "occurredAt": now_ms - 10_000},
        "?wait=30",
    )
    assert status == 200, answer
    assert answer["complete"] is True
    assert answer["stale"] == 1
    assert answer["results"] == [{"contactId": "ST1", "segments": [], "stale": ["VIP"]}]


async def test_wait_takes_ascii_decimal_seconds_only(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start_daemon()
    for text in ("1_0", "\u0661\u0660", "inf", "nan", "1e1", "-1", " 1"):
        async with http.post(
            f"{daemon.url}/v1/mappings",
            params={"wait": text},
            json={"contactId": "W1", "add": ["VIP"]},
            headers=daemon.admin,
        ) as response:
            body = await response.json()
            assert response.status == 400, (text, body)
            assert body["field"] == "wait"
    status, answer = await daemon.mappings(http, {"contactId": "W1", "add": ["VIP"]}, "?wait=0.5")
    assert status in (200, 202), answer


# ---- an uncertain write is settled by a read -------------------------------------------------


async def test_a_last_write_applied_then_answered_5xx_ends_active_not_failed(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    # Every bulk write fails before it is applied; every single write is applied, then answers
    # a 5xx: the last attempt's outcome is unknown, and only a read can tell.
    await emulator.configure(
        {
            "faults": {
                "bulk": {"error_rate": 1.0, "after_apply_fraction": 0.0},
                "single": {"error_rate": 1.0, "after_apply_fraction": 1.0},
            }
        }
    )
    daemon = await start_daemon(retry={"attempts": 2, "initial_s": 0.1, "max_s": 0.2})
    status, answer = await daemon.mappings(http, {"contactId": "UN1", "add": ["VIP"]}, "?wait=60")
    assert status == 200 and answer["complete"], answer
    [result] = answer["results"]
    assert [(s["segmentId"], s["state"]) for s in result["segments"]] == [("VIP", "active")]
    assert await member(emulator, "VIP", "UN1")


async def test_a_last_write_that_did_not_land_fails_after_reads_did_not_show_it(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    await emulator.configure(
        {
            "faults": {
                "bulk": {"error_rate": 1.0, "after_apply_fraction": 0.0},
                "single": {"error_rate": 1.0, "after_apply_fraction": 0.0},
            }
        }
    )
    daemon = await start_daemon(retry={"attempts": 2, "initial_s": 0.1, "max_s": 0.2})
    status, answer = await daemon.mappings(http, {"contactId": "UN2", "add": ["VIP"]}, "?wait=60")
    assert status == 200 and answer["complete"], answer
    [result] = answer["results"]
    [segment] = result["segments"]
    assert (segment["state"], segment["reason"]) == ("failed", "retries_exhausted")
    assert "reads" in segment["message"], segment
    assert not await member(emulator, "VIP", "UN2")
    reads = (await emulator.counters())["requests"]["read"]
    assert sum(reads.values()) >= 3


@pytest.mark.parametrize(
    "indexing",
    [
        {"median_s": 5.0, "p99_s": 5.5, "stall_fraction": 0.0},  # later than the window
        {"stall_fraction": 1.0},  # shown only once its segment is refreshed
    ],
    ids=["late", "stalled"],
)
async def test_a_last_write_applied_then_answered_5xx_and_indexed_late_ends_active(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    indexing: dict[str, float],
):
    daemon = await start_daemon(retry={"attempts": 2, "initial_s": 0.1, "max_s": 0.2})
    await emulator.configure(
        {
            "faults": {
                "bulk": {"error_rate": 1.0, "after_apply_fraction": 0.0},
                "single": {"error_rate": 1.0, "after_apply_fraction": 1.0},
            },
            "indexing": indexing,
        }
    )
    status, answer = await daemon.mappings(http, {"contactId": "UN3", "add": ["LATE"]}, "?wait=60")
    assert status == 200 and answer["complete"], answer
    [segment] = answer["results"][0]["segments"]
    assert segment["state"] == "active", segment
    assert await member(emulator, "LATE", "UN3")


async def test_a_bulk_write_applied_then_5xx_and_a_busy_single_write_end_active(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    # Every bulk attempt is applied, then answered 5xx; the last resort is refused as busy: it
    # did not apply, but an earlier attempt did, which only a read can tell.
    daemon = await start_daemon(retry={"attempts": 2, "initial_s": 0.1, "max_s": 0.2})
    await emulator.configure(
        {
            "faults": {
                "bulk": {"error_rate": 1.0, "after_apply_fraction": 1.0},
                "single": {"index_busy_rate": 1.0},
            }
        }
    )
    status, answer = await daemon.mappings(http, {"contactId": "IB1", "add": ["VIP"]}, "?wait=30")
    assert status == 200 and answer["complete"], answer
    [segment] = answer["results"][0]["segments"]
    assert segment["state"] == "active", segment
    assert await member(emulator, "VIP", "IB1")


# ---- admin writes commit before they answer -------------------------------------------------


async def test_a_dead_letter_replay_survives_a_sigkill_right_after_its_answer(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    contacts = [f"RP{i:05d}" for i in range(3000)]
    await emulator.set_missing_contacts(contacts)
    daemon = await start_daemon(batching={"linger_ms": 50})
    for start_at in range(0, len(contacts), 500):
        chunk = contacts[start_at : start_at + 500]
        status, _ = await daemon.mappings(http, [{"contactId": c, "add": ["VIP"]} for c in chunk])
        assert status == 202

    async def all_dead() -> bool:
        status, listed = await daemon.dead_letters(http, "?limit=100000")
        assert status == 200
        return len(listed["deadLetters"]) == len(contacts)

    await until(all_dead, bool, timeout_s=60, what="3000 dead letters")
    # CXone knows the contacts now, but the writes must wait: a replay is only queued work.
    await emulator.set_missing_contacts([])
    await emulator.configure({"faults": {"bulk": {"error_rate": 1.0, "after_apply_fraction": 0}}})
    status, answer = await daemon.replay_dead_letters(http, {})
    daemon.process.signal(signal.SIGKILL)
    assert (status, answer) == (202, {"replayed": len(contacts), "skipped": 0})
    daemon.process.wait(10)
    await emulator.configure({"faults": {"bulk": {"error_rate": 0.0}}})
    daemon.restart()
    status, listed = await daemon.dead_letters(http, "?limit=100000")
    assert status == 200
    assert listed["deadLetters"] == []
    await daemon.wait_states(http, contacts[-1], {"verifying", "active"}, 60)


# ---- validation's deadline holds while a pair waits for a refresh budget --------------------


async def test_a_pair_waiting_for_a_spent_refresh_budget_fails_at_its_deadline(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    # A dynamic segment accepts writes and ignores them. Its hourly refresh is spent on the
    # first window; the pair then waits for the next one, an hour away, but its deadline holds.
    await emulator.configure({"refresh_min_interval_s": 3600})
    await emulator.declare_segment("DYN", "dynamic")
    daemon = await start_daemon(
        validation={
            "interval_s": 0.3,
            "window_s": 1.0,
            "refresh_min_interval_s": 3600.0,
            "deadline_s": 6.0,
        }
    )
    status, _ = await daemon.mappings(http, {"contactId": "PK1", "add": ["DYN"]})
    assert status == 202
    views = await daemon.wait_states(http, "PK1", {"failed"}, 60)
    assert views["DYN"]["reason"] == "not_indexed"
    assert "after a refresh" in views["DYN"]["message"]
    assert (await emulator.counters())["requests"]["refresh"] == {"202": 1}


async def test_a_late_index_is_seen_while_the_pair_waits_for_a_spent_refresh_budget(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    await emulator.configure({"refresh_min_interval_s": 3600})
    daemon = await start_daemon(
        validation={
            "interval_s": 0.3,
            "window_s": 1.0,
            "refresh_min_interval_s": 3600.0,
            "deadline_s": 600.0,
        }
    )
    # A first pair spends the segment's refresh for the hour (it shows only after a refresh).
    await emulator.configure({"indexing": {"median_s": 30, "p99_s": 40, "stall_fraction": 0}})
    status, answer = await daemon.mappings(http, {"contactId": "LT0", "add": ["LATE"]}, "?wait=30")
    assert answer["complete"], answer
    assert (await emulator.counters())["requests"]["refresh"] == {"202": 1}
    # The next one is indexed late, after its window: it is still read, and seen.
    await emulator.configure({"indexing": {"median_s": 4, "p99_s": 4.5, "stall_fraction": 0}})
    status, answer = await daemon.mappings(http, {"contactId": "LT1", "add": ["LATE"]}, "?wait=40")
    assert status == 200 and answer["complete"], answer
    assert answer["results"][0]["segments"][0]["state"] == "active"


# ---- dead letters from CXone's answers are warned about, at a bounded rate ------------------


async def test_dead_letters_from_cxones_answers_are_warnings_at_a_bounded_rate(
    emulator: EmulatorControl, http: aiohttp.ClientSession, tmp_path: Path
):
    # 600 assignments CXone answers ContactNotFound for, in four batches, and a segment that
    # does not exist: each is worth a warning where operators look, not 600 lines.
    contacts = [f"WL{i:04d}" for i in range(300)]
    await emulator.set_missing_contacts(contacts)
    await emulator.configure({"auto_create_segments": False})
    for segment_id in ("WA", "WB"):
        await emulator.declare_segment(segment_id)
    token, secret = "t0ken-" + "x" * 16, "whsec_" + "A" * 32
    config = tmp_path / "segmapd.toml"
    overrides: dict[str, dict[str, Any]] = {
        "store": {"url": f"sqlite://{tmp_path}/journal.db"},
        # Full batches only, and the rest after the linger: 300 ids per segment make exactly
        # two requests each (200 and 100), however the delivery's slices fall.
        "batching": {"min_size": 200, "linger_ms": 1000},
    }
    config.write_text(daemon_config(emulator.url, token, secret, overrides))
    log = tmp_path / "segmapd.log"
    process = ManagedProcess(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)], log=log
    )
    url = process.start()
    try:
        headers = {"Authorization": f"Bearer {token}"}
        events = [{"contactId": c, "add": ["WA", "WB"]} for c in contacts]
        events.append({"contactId": "WL-present", "add": ["GONE"]})
        async with http.post(f"{url}/v1/mappings", json=events, headers=headers) as response:
            assert response.status == 202

        async def all_dead() -> bool:
            async with http.get(
                f"{url}/v1/dead-letters", params={"limit": "1000"}, headers=headers
            ) as response:
                return len((await response.json())["deadLetters"]) == 601

        await until(all_dead, bool, timeout_s=60, what="601 dead letters")
    finally:
        assert process.stop(timeout_s=20) == 0
    lines = [orjson.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    warned = [
        line["msg"]
        for line in lines
        if line["level"] == "warning" and "dead-lettered" in line["msg"]
    ]
    not_found = [msg for msg in warned if "contact_not_found" in msg]
    gone = [msg for msg in warned if "segment_not_found" in msg]
    # The first, then a summary of those held back (said at the stop at the latest).
    assert len(not_found) == 2, warned
    assert "WA" in not_found[0] or "WB" in not_found[0]
    assert not_found[1].startswith("3 more like it"), not_found
    assert len(gone) == 1 and "GONE" in gone[0], warned


async def test_a_large_deliverys_events_apply_in_order_across_the_slices_it_is_taken_in(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    # A large delivery is taken in slices of a few milliseconds (the event loop serves others
    # between them): a contact's add in one slice and its mirror in a later one (1,100
    # assignments on) still apply in their order.
    await emulator.configure({"limits": {"read": {"rate": 2000, "burst": 2000}}})
    daemon = await start_daemon(limits={"read_rps": 1000.0})
    filler = [
        {"contactId": f"FL{i:03d}", "add": [f"F{k:02d}" for k in range(100)]} for i in range(40)
    ]
    events = [
        *filler[:19],
        {"contactId": "OX9", "add": ["B"]},
        *filler[19:30],
        {"contactId": "OX9", "set": ["A"]},  # a slice or more later
        *filler[30:],
    ]
    status, answer = await daemon.mappings(http, events)
    assert status == 202, answer
    views = await daemon.wait_states(http, "OX9", {"active", "removed"}, 60)
    assert {s: (v["intent"], v["state"]) for s, v in views.items()} == {
        "A": ("add", "active"),
        "B": ("remove", "removed"),
    }
    assert not await member(emulator, "B", "OX9")


def large_delivery(prefix: str, first: Any, last: Any, segments: int = 100) -> list[Any]:
    """A delivery of 1,000 events, 998 of them adding `segments` segments (taken in slices of a
    few milliseconds: hundreds of them for 100)."""
    filler = [
        {"contactId": f"{prefix}{i:03d}", "add": [f"{prefix}{k:02d}" for k in range(segments)]}
        for i in range(998)
    ]
    return [first, *filler, last]


async def test_a_change_taken_while_a_large_delivery_is_taken_is_ordered_with_it(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    # Another request for a contact of a large delivery, sent while the delivery is taken in
    # slices, waits for it (or goes first): the newest change of each pair wins either way.
    await emulator.configure(
        {
            "limits": {
                "read": {"rate": 2000, "burst": 2000},
                "bulk": {"rate": 200, "burst": 200},
            }
        }
    )
    daemon = await start_daemon(limits={"read_rps": 1000.0, "write_rps": 150.0})
    now_ms = int(time.time() * 1000)
    # HX was in HS, then removed, the removal confirmed: "not a member" is cached.
    await daemon.mappings(http, [{"contactId": "HX", "add": ["HS"], "occurredAt": now_ms - 60_000}])
    await daemon.wait_states(http, "HX", {"active"}, 30)
    await daemon.mappings(
        http, [{"contactId": "HX", "remove": ["HS"], "occurredAt": now_ms - 50_000}]
    )
    await daemon.wait_states(http, "HX", {"removed"}, 30)
    big = large_delivery(
        "HF",
        {"contactId": "HX", "add": ["HS2"], "occurredAt": now_ms - 40_000},
        # Older than the removal below, which is sent while this delivery is taken.
        {"contactId": "HX", "add": ["HS"], "occurredAt": now_ms - 30_000},
    )
    # In the bulk lane: the filler's 100,000 reads must not delay the reads of HX's pairs.
    taking = asyncio.create_task(daemon.mappings(http, big, "?lane=bulk"))
    await asyncio.sleep(0.5)  # the large body is being parsed or taken
    status, answer = await daemon.mappings(
        http, [{"contactId": "HX", "remove": ["HS"], "occurredAt": now_ms - 20_000}]
    )
    assert status == 202, answer
    status, answer = await taking
    assert status == 202, answer
    views = await daemon.wait_states(http, "HX", {"active", "removed"}, 60)
    assert (views["HS"]["intent"], views["HS"]["state"]) == ("remove", "removed"), views["HS"]
    assert not await member(emulator, "HS", "HX")


@pytest.mark.parametrize("drain_budget_s", [30.0, 0.5])
async def test_a_drain_begun_while_a_large_delivery_is_taken_takes_it_whole_or_not_at_all(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    drain_budget_s: float,
):
    # SIGTERM while a delivery is taken in slices: it is answered 202 with all of it queued,
    # never busy with part of it queued (a retry would take it twice). Whatever the drain's
    # budget: a take outlasting it (0.5 s here, or a loaded machine) is still taken whole.
    await emulator.configure({"limits": {"bulk": {"rate": 200, "burst": 200}}})
    daemon = await start_daemon(
        server={"drain_budget_s": drain_budget_s}, limits={"write_rps": 150.0}
    )
    big = large_delivery(
        "DT", {"contactId": "DTFIRST", "add": ["DTS"]}, {"contactId": "DTLAST", "add": ["DTS"]}
    )
    taking = asyncio.create_task(daemon.mappings(http, big))
    # The take is under way once its first contact shows (queued work shows before its commit).
    await until(
        lambda: daemon.contact(http, "DTFIRST"),
        lambda answer: answer[0] == 200,
        timeout_s=30,
        what="the large delivery's first contact to show",
        interval_s=0.005,
    )
    daemon.process.signal(signal.SIGTERM)
    status, answer = await taking
    assert await asyncio.to_thread(daemon.process.wait, 90) == 0
    await asyncio.to_thread(daemon.restart)
    first = await daemon.contact(http, "DTFIRST")
    last = await daemon.contact(http, "DTLAST")
    assert status == 202, answer
    assert first[0] == 200 and last[0] == 200, (first, last)
