"""Where each dead letter came from: a real daemon, its webhook source and its admin API.

A pair's source is journaled with the change that started it (the webhook source's name, or
`mappings` for `POST /v1/mappings` in either lane), kept through its later transitions and by a
replay, and the dead letters are listed, counted and replayed by it.
"""

from __future__ import annotations

import base64
from typing import Any

import aiohttp

from tests.e2e.conftest import StartDaemon
from tests.support.emulator import EmulatorControl
from tests.support.postgres import PostgresServer
from tests.support.waits import until

WEBHOOK, LIVE, BULK = "810000000101", "810000000102", "810000000103"


def listed(answer: Any) -> list[tuple[str, str | None]]:
    return sorted((d["contactId"], d["source"]) for d in answer["deadLetters"])


async def test_dead_letters_are_listed_counted_and_replayed_by_their_source(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start_daemon()
    await emulator.set_missing_contacts([WEBHOOK, LIVE, BULK])
    status, _ = await daemon.webhook(http, {"contactId": WEBHOOK, "segmentIds": ["SRC"]})
    assert status == 202
    status, answer = await daemon.mappings(http, {"contactId": LIVE, "segmentIds": ["SRC"]})
    assert status in (200, 202), answer
    # `segmapd import` sends this: the admin API too, whatever its lane.
    status, answer = await daemon.mappings(
        http, {"contactId": BULK, "segmentIds": ["SRC"]}, "?lane=bulk"
    )
    assert status in (200, 202), answer
    for contact in (WEBHOOK, LIVE, BULK):
        await daemon.wait_states(http, contact, {"failed"}, timeout_s=30)

    # Each dead letter names its source, though every state after the first named none.
    status, everything = await daemon.dead_letters(http, "?count=true")
    assert status == 200 and everything["matching"] == 3
    assert listed(everything) == [(WEBHOOK, "crm"), (LIVE, "mappings"), (BULK, "mappings")]
    status, answer = await daemon.dead_letters(http, "?source=crm&count=true")
    assert status == 200 and listed(answer) == [(WEBHOOK, "crm")] and answer["matching"] == 1
    status, answer = await daemon.dead_letters(
        http, "?source=mappings&segment=SRC&reason=contact_not_found&count=true"
    )
    assert status == 200 and answer["matching"] == 2
    assert listed(answer) == [(LIVE, "mappings"), (BULK, "mappings")]
    status, answer = await daemon.dead_letters(http, "?source=crm&reason=not_indexed&count=true")
    assert status == 200 and (answer["deadLetters"], answer["matching"]) == ([], 0)
    # Paged by cursor within a source.
    status, first = await daemon.dead_letters(http, "?source=mappings&limit=1")
    assert status == 200 and first["next"] is not None
    status, rest = await daemon.dead_letters(http, f"?source=mappings&after={first['next']}")
    assert status == 200
    assert listed(first) + listed(rest) == [(LIVE, "mappings"), (BULK, "mappings")]

    # Checked like `segment`, naming the parameter.
    for query in ("?source=", "?source=crm&source=crm", "?source=" + "s" * 1025):
        status, problem = await daemon.dead_letters(http, query)
        assert (status, problem["field"]) == (400, "source"), (query, problem)

    # The admin API's dead letters replayed by filter, exactly those counted: the webhook's
    # stays dead.
    await emulator.set_missing_contacts([WEBHOOK])
    _, counted = await daemon.dead_letters(http, "?source=mappings&count=true")
    status, answer = await daemon.replay_dead_letters(
        http, {"source": "mappings", "through": counted["newest"]}
    )
    assert status == 202, answer
    assert answer == {"replayed": 2, "skipped": 0}
    for contact in (LIVE, BULK):
        await daemon.wait_states(http, contact, {"active"}, timeout_s=30)
    _, now = await daemon.dead_letters(http, "?count=true")
    assert listed(now) == [(WEBHOOK, "crm")]

    # A replay keeps the dead letter's source: failing again, it is still the webhook's.
    failed_at = now["deadLetters"][0]["updatedAt"]
    status, answer = await daemon.replay_dead_letters(http, {"source": "crm"})
    assert status == 202, answer
    assert answer == {"replayed": 1, "skipped": 0}

    async def crm_letters() -> Any:
        return (await daemon.dead_letters(http, "?source=crm"))[1]["deadLetters"]

    again = await until(
        crm_letters,
        lambda letters: bool(letters) and letters[0]["updatedAt"] != failed_at,
        timeout_s=30,
        what="the replayed dead letter failing again",
    )
    assert [(d["contactId"], d["source"], d["attempts"]) for d in again] == [(WEBHOOK, "crm", 1)]
    status, body = await daemon.replay_dead_letters(http, {"source": ""})
    assert (status, body["field"]) == (400, "source")


async def test_ids_no_journal_can_hold_are_answered_as_unknown_not_as_an_outage(
    start_daemon: StartDaemon,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    # PostgreSQL's text type takes no NUL: asked for one, a query fails (a 503 that retrying
    # never mends). Such an id names nothing: a 400 for a filter or a cursor, a 404 for a contact.
    daemon = await start_daemon(store={"url": postgres_url, "password": postgres.password})
    nul_cursor = base64.urlsafe_b64encode(b'[1.0,"a\\u0000b","s"]').decode().rstrip("=")
    for query, field in (
        ("?segment=a%00b", "segment"),
        ("?source=a%00b", "source"),
        (f"?after={nul_cursor}", "after"),
    ):
        status, answer = await daemon.dead_letters(http, query)
        assert (status, answer.get("field")) == (400, field), answer
    status, _ = await daemon.contact(http, "a%00b")
    assert status == 404
    status, answer = await daemon.replay_dead_letters(
        http, {"deadLetters": [{"contactId": "a\x00b", "segmentId": "s"}]}
    )
    assert status == 400, answer
    status, answer = await daemon.replay_dead_letters(http, {"contactIds": ["a\x00b"]})
    assert status == 202, answer
    assert answer == {"replayed": 0, "skipped": 0}


async def test_a_replay_of_a_counted_set_leaves_what_failed_after_the_count(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start_daemon()
    first, second, later = "810000000201", "810000000202", "810000000203"
    await emulator.set_missing_contacts([first, second, later])
    status, answer = await daemon.mappings(
        http, [{"contactId": c, "segmentIds": ["NEVERMORE"]} for c in (first, second)]
    )
    assert status in (200, 202), answer
    for contact in (first, second):
        await daemon.wait_states(http, contact, {"failed"}, timeout_s=30)
    status, counted = await daemon.dead_letters(http, "?segment=NEVERMORE&count=true")
    assert status == 200 and counted["matching"] == 2, counted
    # Fails after the count: not in the set the operator confirmed.
    status, answer = await daemon.mappings(http, {"contactId": later, "segmentIds": ["NEVERMORE"]})
    assert status in (200, 202), answer
    await daemon.wait_states(http, later, {"failed"}, timeout_s=30)
    await emulator.set_missing_contacts([])
    status, answer = await daemon.replay_dead_letters(
        http, {"segment": "NEVERMORE", "through": counted["newest"]}
    )
    assert status == 202, answer
    assert answer == {"replayed": 2, "skipped": 0}
    for contact in (first, second):
        await daemon.wait_states(http, contact, {"active"}, timeout_s=30)
    status, contact = await daemon.contact(http, later)
    assert contact["segments"][0]["state"] == "failed", contact
