"""Assignments by state in /metrics, from real daemons: what is in progress, what the journal holds.

`segmapd_assignments` is each instance's work in progress (a sum over instances is the
cluster's); `segmapd_journal_assignments` is what the journal holds, finished work included,
counted from the journal (the same on every instance sharing it).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Daemon, StartDaemon
from tests.e2e.test_cluster import start_cluster
from tests.support.emulator import EmulatorControl
from tests.support.postgres import PostgresServer
from tests.support.waits import until

IN_PROGRESS = {"queued", "sending", "retrying", "written", "verifying"}
EVERY_STATE = {*IN_PROGRESS, "active", "removed", "failed"}


async def by_state(http: aiohttp.ClientSession, daemon: Daemon, name: str) -> dict[str, float]:
    """The daemon's `name{state=...}` samples, by state, as /metrics shows them now."""
    async with http.get(f"{daemon.url}/metrics") as response:
        text = await response.text()
    return {
        sample.labels["state"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def events(contacts: list[str], segments: list[str]) -> list[dict[str, Any]]:
    return [{"contactId": contact, "segmentIds": segments} for contact in contacts]


async def test_finished_work_is_counted_from_the_journal_and_in_progress_work_in_the_engine(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    good = [f"gauge-ok-{i}" for i in range(8)]
    missing = [f"gauge-missing-{i}" for i in range(4)]
    await emulator.set_missing_contacts(missing)
    daemon = await start_daemon()
    status, _ = await daemon.webhook(http, events(good + missing, ["G1", "G2"]))
    assert status == 202
    for contact in good + missing:
        await daemon.wait_states(http, contact, {"active", "failed"}, 30)

    def finished(journal: dict[str, float]) -> bool:
        return journal.get("active") == 16 and journal.get("failed") == 8

    journal = await until(
        lambda: by_state(http, daemon, "segmapd_journal_assignments"),
        finished,
        timeout_s=30,
        what="the journal census",
    )
    assert set(journal) == EVERY_STATE
    assert sum(journal.values()) == 24
    # Nothing is in progress any more; finished states are not series of the engine's gauge.
    assert await by_state(http, daemon, "segmapd_assignments") == dict.fromkeys(IN_PROGRESS, 0)

    # A new process on the same journal finished nothing itself, and says the same.
    daemon.process.stop(timeout_s=20)
    daemon.restart()
    journal = await until(
        lambda: by_state(http, daemon, "segmapd_journal_assignments"),
        finished,
        timeout_s=30,
        what="the journal census",
    )
    assert sum(journal.values()) == 24


async def test_several_instances_each_report_their_work_and_the_whole_journal(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    # Written memberships stay unconfirmed (CXone indexes them in minutes, and no refresh is
    # asked for within the test): they are in progress, `verifying`, in their owners.
    await emulator.configure({"indexing": {"median_s": 600, "p99_s": 900, "stall_fraction": 0}})
    missing = ["pg-missing-0", "pg-missing-1"]
    await emulator.set_missing_contacts(missing)
    daemons = await start_cluster(
        start_daemon,
        postgres,
        postgres_url,
        2,
        validation={"window_s": 300.0, "deadline_s": 900.0},
    )
    segments = ["PG1", "PG2", "PG3"]
    contacts = [f"pg-{i}" for i in range(20)]
    # Each instance takes half the contacts, for every segment: the owners are spread.
    answers = await asyncio.gather(
        daemons[0].webhook(http, events(contacts[:10] + missing[:1], segments)),
        daemons[1].webhook(http, events(contacts[10:] + missing[1:], segments)),
    )
    assert [status for status, _ in answers] == [202, 202]
    for contact in contacts:
        await daemons[0].wait_states(http, contact, {"verifying"}, 30)
    for contact in missing:
        await daemons[1].wait_states(http, contact, {"failed"}, 30)

    async def every_view() -> list[tuple[dict[str, float], dict[str, float]]]:
        return [
            (
                await by_state(http, d, "segmapd_assignments"),
                await by_state(http, d, "segmapd_journal_assignments"),
            )
            for d in daemons
        ]

    def settled(views: list[tuple[dict[str, float], dict[str, float]]]) -> bool:
        return all(
            journal.get("verifying") == 60 and journal.get("failed") == 6 for _, journal in views
        )

    views = await until(every_view, settled, timeout_s=30, what="every instance's view")
    engines = [engine for engine, _ in views]
    # Each instance holds the work of its own segments: summed, they are all of it ...
    assert all(set(engine) == IN_PROGRESS for engine in engines)
    assert sum(engine["verifying"] for engine in engines) == 60
    assert sum(engine[state] for engine in engines for state in IN_PROGRESS - {"verifying"}) == 0
    # ... while each reports the whole journal, the same numbers (aggregate them with max).
    journals = [journal for _, journal in views]
    assert journals[0] == journals[1]
    assert sum(journals[0].values()) == 66
