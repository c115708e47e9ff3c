"""Removals, mirrors and ordering through the real daemon, its SQLite journal and the emulator."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from daemon.cxone import HttpCXoneClient
from daemon.store.sqlite import SqliteStore
from scheduler.model import Assignment, Intent, State
from scheduler.store import BatchRecord
from scheduler.upstream import RateLimited
from tests.e2e.conftest import StartDaemon
from tests.e2e.test_cli import admin_args, segmapd
from tests.support.cxone import emulator_settings
from tests.support.emulator import EmulatorControl


def states(body: Any) -> dict[str, tuple[str, str]]:
    return {s["segmentId"]: (s["intent"], s["state"]) for s in body["segments"]}


async def test_add_remove_and_add_again_through_webhooks_end_as_the_last_one_said(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start_daemon()
    contact = "500000000001"
    status, _ = await daemon.webhook(http, {"contactId": contact, "add": ["VIP", "Gold"]})
    assert status == 202
    await daemon.wait_states(http, contact, {"active"}, 30)
    status, answer = await daemon.webhook(
        http, {"contactId": contact, "add": ["Spanish"], "remove": ["Gold"]}
    )
    assert (status, answer) == (202, {"accepted": 2, "duplicates": 0, "stale": 0})
    await daemon.wait_states(http, contact, {"active", "removed"}, 30)
    _, body = await daemon.contact(http, contact)
    assert states(body) == {
        "Gold": ("remove", "removed"),
        "Spanish": ("add", "active"),
        "VIP": ("add", "active"),
    }
    await daemon.webhook(http, {"contactId": contact, "segmentIds": ["Gold"]})
    await daemon.wait_states(http, contact, {"active"}, 30)
    counters = await emulator.counters()
    assert counters["rate_limited"]["bulk"] == counters["rate_limited"]["bulk_remove"] == 0
    assert counters["applied_twice"] == 0


async def test_out_of_order_deliveries_end_as_the_newest_change_said(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start_daemon()
    now_ms = int(time.time() * 1000)
    kept, gone = "500000000002", "500000000003"
    # A newer add, then an older removal arriving late: the membership stays.
    await daemon.webhook(http, {"contactId": kept, "add": ["VIP"], "occurredAt": now_ms - 1000})
    await daemon.wait_states(http, kept, {"active"}, 30)
    status, answer = await daemon.webhook(
        http, {"contactId": kept, "remove": ["VIP"], "occurredAt": now_ms - 5000}
    )
    assert (status, answer) == (202, {"accepted": 1, "duplicates": 0, "stale": 1})
    _, body = await daemon.contact(http, kept)
    assert states(body) == {"VIP": ("add", "active")}
    # The reverse: an older add, then a newer removal: it goes.
    await daemon.webhook(http, {"contactId": gone, "add": ["VIP"], "occurredAt": now_ms - 5000})
    await daemon.wait_states(http, gone, {"active"}, 30)
    await daemon.webhook(http, {"contactId": gone, "remove": ["VIP"], "occurredAt": now_ms - 1000})
    await daemon.wait_states(http, gone, {"removed"}, 30)


async def test_set_mirrors_only_what_segmapd_tracks_and_wait_covers_its_removals(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start_daemon()
    contact = "500000000004"
    status, answer = await daemon.mappings(
        http, {"contactId": contact, "add": ["VIP", "Spanish"]}, "?wait=30"
    )
    assert status == 200 and answer["complete"], answer
    status, answer = await daemon.mappings(
        http, {"contactId": contact, "set": ["VIP", "Gold"]}, "?wait=30"
    )
    assert status == 200 and answer["complete"], answer
    [result] = answer["results"]
    assert {s["segmentId"]: s["state"] for s in result["segments"]} == {
        "Spanish": "removed",
        "VIP": "active",
        "Gold": "active",
    }
    status, answer = await daemon.mappings(http, {"contactId": contact, "set": []}, "?wait=30")
    assert status == 200 and answer["complete"], answer
    _, body = await daemon.contact(http, contact)
    assert {s for s, (_, state) in states(body).items() if state == "removed"} == {
        "VIP",
        "Gold",
        "Spanish",
    }


async def test_a_dead_lettered_removal_is_replayed_as_a_removal(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    await emulator.set_missing_contacts(["500000000005"])
    daemon = await start_daemon()
    contact = "500000000005"
    await daemon.webhook(http, {"contactId": contact, "remove": ["VIP"]})
    failed = await daemon.wait_states(http, contact, {"failed"}, 30)
    assert failed["VIP"]["intent"] == "remove"
    _, listed = await daemon.dead_letters(http)
    [letter] = listed["deadLetters"]
    assert (letter["intent"], letter["reason"]) == ("remove", "contact_not_found")
    await emulator.set_missing_contacts([])
    status, _ = await daemon.replay_dead_letters(http, {"contactIds": [contact]})
    assert status == 202
    done = await daemon.wait_states(http, contact, {"removed"}, 30)
    assert done["VIP"]["intent"] == "remove"


async def test_sigkill_during_a_removal_batch_replays_it_under_the_same_key(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start_daemon()
    contacts = [f"50000001{i:04d}" for i in range(40)]
    await daemon.webhook(http, [{"contactId": c, "add": ["KILL"]} for c in contacts])
    for contact in contacts:
        await daemon.wait_states(http, contact, {"active"}, 30)
    # Removals answer slowly: the daemon dies with the batch sent but unanswered.
    await emulator.configure({"faults": {"bulk": {"latency_ms": 1500}}})
    await daemon.webhook(http, [{"contactId": c, "remove": ["KILL"]} for c in contacts])
    deadline = time.monotonic() + 10
    while (await emulator.counters())["peak_admitted_rps"]["bulk_remove"] < 1:
        assert time.monotonic() < deadline, "the removal batch was never sent"
        await asyncio.sleep(0.02)
    daemon.process.kill()  # the batch is at CXone, its answer not back yet
    await emulator.configure({"faults": {"bulk": {"latency_ms": 0}}})
    daemon.restart()
    for contact in contacts:
        await daemon.wait_states(http, contact, {"removed"}, 30)
    counters = await emulator.counters()
    assert counters["idempotency_conflicts"]["IdempotencyKeyReused"] == 0
    assert counters["applied_twice"] == 0
    # The restarted daemon resent the saved batch under its key: CXone replayed its answer.
    assert counters["idempotent_replays"] >= 1


async def test_a_csv_import_removes_segments_written_with_a_minus(
    start_daemon: StartDaemon, http: aiohttp.ClientSession, tmp_path: Any
):

    daemon = await start_daemon()
    contacts = [f"50000002{i:04d}" for i in range(30)]
    first = tmp_path / "add.csv"
    first.write_text("contactId,segments\n" + "".join(f"{c},IMPA,IMPB\n" for c in contacts))
    code, out, _ = await segmapd("import", str(first), *admin_args(daemon))
    assert code == 0, out
    for contact in contacts:
        await daemon.wait_states(http, contact, {"active"}, 30)
    second = tmp_path / "remove.csv"
    second.write_text("contactId,segments\n" + "".join(f"{c},-IMPB,IMPC\n" for c in contacts))
    code, out, _ = await segmapd("import", str(second), *admin_args(daemon))
    assert code == 0, out
    for contact in contacts:
        done = await daemon.wait_states(http, contact, {"active", "removed"}, 30)
        assert {s: (v["intent"], v["state"]) for s, v in done.items()} == {
            "IMPA": ("add", "active"),
            "IMPB": ("remove", "removed"),
            "IMPC": ("add", "active"),
        }


async def test_removals_in_every_state_are_recovered_from_the_journal(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession, tmp_path: Any
):

    daemon = await start_daemon()
    states_to_leave = [State.QUEUED, State.RETRYING, State.SENDING, State.WRITTEN, State.VERIFYING]
    contacts = {state: f"5000000300{n:02d}" for n, state in enumerate(states_to_leave)}
    await daemon.webhook(http, [{"contactId": c, "add": ["REC"]} for c in contacts.values()])
    for contact in contacts.values():
        await daemon.wait_states(http, contact, {"active"}, 30)
    assert daemon.process.stop() == 0
    # The journal as a process that died mid-removal left it: one removal in each state, and
    # the in-flight one's batch saved with its key.
    store = SqliteStore(str(tmp_path / "journal-0.db"))
    await store.open()
    now = time.time()
    for state, contact in contacts.items():
        store.record(
            Assignment(
                contact,
                "REC",
                state=state,
                attempts=0 if state is State.QUEUED else 1,
                received_at=now,
                updated_at=now,
                intent=Intent.REMOVE,
            )
        )
    await store.save_batch(
        BatchRecord("b-rec", "REC", (contacts[State.SENDING],), "REC:recovered", 1, Intent.REMOVE)
    )
    await store.close()
    # Written and verifying mean CXone took the removal before the process died: as it did.
    async with HttpCXoneClient(emulator_settings(emulator.url)) as client:
        for state in (State.WRITTEN, State.VERIFYING):
            for _ in range(5):  # the token endpoint allows 1/s: the daemon just took one
                try:
                    await client.bulk_remove("REC", [contacts[state]], f"REC:before-{state}")
                    break
                except RateLimited as exc:
                    await asyncio.sleep(exc.retry_after_s)
            else:
                raise AssertionError("CXone kept refusing the test's own removal")
    daemon.restart()
    for contact in contacts.values():
        done = await daemon.wait_states(http, contact, {"removed"}, 30)
        assert done["REC"]["intent"] == "remove"
    counters = await emulator.counters()
    assert counters["idempotency_conflicts"]["IdempotencyKeyReused"] == 0
