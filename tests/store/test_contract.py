"""One contract, every Store implementation: what the engine and the API rely on."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from daemon.config import StoreConfig
from daemon.store import JournalStore, Recovered, from_url
from daemon.store.base import dead_letter_key
from daemon.store.postgres import PostgresStore
from daemon.store.sqlite import SqliteStore
from scheduler.model import Assignment, FailureReason, Intent, Lane, State
from scheduler.reconcile import PassState, ReconcilePass
from scheduler.store import BatchRecord
from tests.support.postgres import PostgresServer


async def store_config(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> StoreConfig:
    """A `[store]` config for a new, empty store of the backend (PostgreSQL: a new database)."""
    if backend == "memory":
        return StoreConfig(url="memory://")
    if backend == "sqlite":
        return StoreConfig(url=f"sqlite://{tmp_path}/journal.db")
    # Asked for only here: the other backends run where PostgreSQL is not installed.
    server: PostgresServer = request.getfixturevalue("postgres")
    return StoreConfig(url=await server.create_database(), password=SecretStr(server.password))


async def recover(store: JournalStore) -> Recovered:
    """Open the store and take back everything unfinished, as the daemon does.

    One process's journal hands it all back at open; a shared one hands each shard's work to
    the instance taking the shard, and undelivered notifications to the member claiming them.
    """
    recovered = await store.open()
    shared = store.as_shared()
    if shared is None:
        return recovered
    await shared.leases(5.0, "contract").join()
    everything = await shared.load_segments(lambda segment: True)
    everything.notifications = await shared.claim_notifications(1000)
    everything.refresh_budget = recovered.refresh_budget
    return everything


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JournalStore]:
    """Every backend, opened through the interface and `from_url` as the daemon opens it."""
    opened = from_url(await store_config(request.param, request, tmp_path))
    assert await opened.open() == Recovered()
    yield opened
    await opened.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def durable(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], JournalStore]:
    """The durable backends: a factory of stores on one journal, to close and open again."""
    config = await store_config(request.param, request, tmp_path)
    return lambda: from_url(config)


# Recent times: a durable store prunes finished assignments older than its retention.
NOW = time.time()


async def mirrored_at(store: JournalStore, contact: str) -> float:
    """The contact's newest mirror time, as the intake reads it: with its history."""
    return (await store.histories([contact]))[contact].mirrored_at


def new(contact: str, segment: str, at: float = 1000.0) -> Assignment:
    at = NOW + at
    return Assignment(contact, segment, received_at=at, updated_at=at, history=[(State.QUEUED, at)])


async def test_latest_state_and_history_are_kept(store):
    a = new("c1", "s1")
    store.record(a)
    for t, state in enumerate([State.SENDING, State.RETRYING, State.SENDING, State.WRITTEN], 1):
        if state is State.SENDING:
            a.attempts += 1
        a.transition(state, NOW + 1000.0 + t)
        store.record(a)
        if t == 2:
            await store.flush()  # history spans several transactions
    a.transition(State.FAILED, NOW + 1010.0, reason=FailureReason.NOT_INDEXED, message="dynamic?")
    store.record(a)
    await store.flush()
    [saved] = await store.contact("c1")
    assert (saved.state, saved.reason, saved.message, saved.attempts) == (
        State.FAILED,
        FailureReason.NOT_INDEXED,
        "dynamic?",
        2,
    )
    assert [s for s, _ in saved.history] == [
        "queued",
        "sending",
        "retrying",
        "sending",
        "written",
        "failed",
    ]
    assert saved.history[-1][1] == NOW + 1010.0
    assert await store.contact("nobody") == []


async def test_each_assignment_keeps_its_lane(store):
    bulk = new("c1", "s1")
    bulk.lane = Lane.BULK
    store.record(bulk)
    store.record(new("c1", "s2"))
    await store.flush()
    lanes = {a.segment_id: a.lane for a in await store.contact("c1")}
    assert lanes == {"s1": Lane.BULK, "s2": Lane.LIVE}
    bulk.transition(State.SENDING, NOW + 1001.0)
    store.record(bulk)  # not yet committed: reads see it all the same
    history = (await store.histories(["c1"]))["c1"].assignments
    assert (history["s1"].state, history["s1"].lane) == (State.SENDING, Lane.BULK)
    await store.flush()
    [saved, _] = await store.contact("c1")
    assert (saved.state, saved.lane) == (State.SENDING, Lane.BULK)


async def test_the_lane_of_unfinished_work_survives_a_restart(
    durable: Callable[[], JournalStore],
):
    first = durable()
    await first.open()
    queued_bulk, queued_live, written_bulk = new("q1", "s"), new("q2", "s"), new("w1", "s")
    queued_bulk.lane = written_bulk.lane = Lane.BULK
    written_bulk.transition(State.SENDING, NOW + 1001.0)
    written_bulk.transition(State.WRITTEN, NOW + 1002.0)
    for a in (queued_bulk, queued_live, written_bulk):
        first.record(a)
    await first.flush()
    await first.close()
    second = durable()
    recovered = await recover(second)
    try:
        assert sorted((c, lane) for c, _, _, _, _, lane in recovered.queued) == [
            ("q1", "bulk"),
            ("q2", "live"),
        ]
        [written] = recovered.assignments
        assert (written.contact_id, written.state, written.lane) == (
            "w1",
            State.WRITTEN,
            Lane.BULK,
        )
    finally:
        await second.close()


async def test_failed_are_listed_oldest_first_and_counted(store):
    for i, at in enumerate([30.0, 10.0, 20.0]):
        record_failed(store, f"c{i}", "s", at, FailureReason.CONTACT_NOT_FOUND)
    store.record(new("ok", "s"))
    await store.flush()
    assert [a.contact_id for a in await store.failed()] == ["c1", "c2", "c0"]
    assert [a.contact_id for a in await store.failed(limit=1)] == ["c1"]
    assert await store.counts() == {"failed": 3, "queued": 1}


async def test_failed_are_filtered_by_reason_and_segment_oldest_first(store):
    cases = [
        ("c0", "s1", 50.0, FailureReason.CONTACT_NOT_FOUND),
        ("c1", "s2", 10.0, FailureReason.CONTACT_NOT_FOUND),
        ("c2", "s1", 40.0, FailureReason.NOT_INDEXED),
        ("c3", "s1", 20.0, FailureReason.CONTACT_NOT_FOUND),
        ("c4", "s2", 30.0, FailureReason.NOT_INDEXED),
    ]
    for contact, segment, at, reason in cases:
        record_failed(store, contact, segment, at, reason)
    store.record(new("c5", "s1"))  # not failed: never listed
    await store.flush()

    async def ids(**filters: object) -> list[str]:
        return [a.contact_id for a in await store.failed(**filters)]

    assert await ids(reason=FailureReason.CONTACT_NOT_FOUND) == ["c1", "c3", "c0"]
    assert await ids(segment_id="s1") == ["c3", "c2", "c0"]
    assert await ids(reason=FailureReason.CONTACT_NOT_FOUND, segment_id="s1") == ["c3", "c0"]
    assert await ids(reason=FailureReason.NOT_INDEXED, segment_id="s2", limit=1) == ["c4"]
    assert await ids(reason=FailureReason.RETRIES_EXHAUSTED) == []
    assert await ids(segment_id="nowhere") == []
    assert await ids() == ["c1", "c3", "c4", "c2", "c0"]


async def test_dead_letters_are_paged_by_key_counted_and_tallied_per_segment(store):
    # Ties on the failure time are ordered by contact, then segment: a page boundary between
    # two rows of one instant loses and repeats nothing.
    cases = [
        ("c0", "s1", 10.0, FailureReason.CONTACT_NOT_FOUND),
        ("c1", "s1", 10.0, FailureReason.NOT_INDEXED),
        ("c1", "s2", 10.0, FailureReason.CONTACT_NOT_FOUND),
        ("c2", "s2", 20.0, FailureReason.CONTACT_NOT_FOUND),
        ("c3", "s1", 30.0, FailureReason.CONTACT_NOT_FOUND),
        ("c4", "s2", 40.0, FailureReason.NOT_INDEXED),
    ]
    for contact, segment, at, reason in cases:
        record_failed(store, contact, segment, at, reason)
    store.record(new("c9", "s1"))
    await store.flush()

    async def walk(page: int, **filters: object) -> list[tuple[str, str]]:
        seen: list[tuple[str, str]] = []
        after = None
        while True:
            rows = await store.failed(page, after=after, **filters)
            seen += [(a.contact_id, a.segment_id) for a in rows]
            if len(rows) < page:
                return seen
            after = dead_letter_key(rows[-1])

    everything = [(c, s) for c, s, _, _ in cases]
    for page in (1, 2, 4, 100):
        assert await walk(page) == everything
    by_reason = {"reason": FailureReason.CONTACT_NOT_FOUND}
    assert await walk(1, **by_reason) == [("c0", "s1"), ("c1", "s2"), ("c2", "s2"), ("c3", "s1")]
    assert await walk(1, segment_id="s1") == [("c0", "s1"), ("c1", "s1"), ("c3", "s1")]
    assert await walk(1, segment_id="s2", **by_reason) == [("c1", "s2"), ("c2", "s2")]

    matching, newest = await store.count_failed(**by_reason)
    assert matching == 4
    assert newest is not None and newest[1:] == ("c3", "s1")
    assert await store.count_failed(segment_id="s2") == (3, (NOW + 41.0, "c4", "s2"))
    assert await store.count_failed(segment_id="nowhere") == (0, None)
    assert (await store.count_failed())[0] == 6
    # `through` stops at the newest row a caller counted: later failures are left out.
    through = (await store.count_failed(segment_id="s1"))[1]
    record_failed(store, "c8", "s1", 90.0, FailureReason.CONTACT_NOT_FOUND)
    await store.flush()
    kept = await store.failed(100, segment_id="s1", through=through)
    assert [a.contact_id for a in kept] == ["c0", "c1", "c3"]
    assert await store.failed_by_segment() == {"s1": 4, "s2": 3}


def record_failed(
    store: JournalStore, contact: str, segment: str, at: float, reason: FailureReason
) -> None:
    """Record a pair started at `at` and failed a second later (a dead letter of `reason`)."""
    a = new(contact, segment, at)
    store.record(a)
    a.transition(State.FAILED, NOW + at + 1, reason=reason)
    store.record(a)


def started(contact: str, segment: str, source: str, at: float = 1000.0) -> Assignment:
    """The row a pair's start records: it names the change's source."""
    return dataclasses.replace(new(contact, segment, at), source=source)


def carried_on(start: Assignment) -> Assignment:
    """The engine's object for the pair's later transitions: it names no source."""
    return dataclasses.replace(start, source="", history=list(start.history or ()))


def fail(store: JournalStore, a: Assignment, at: float, reason: FailureReason) -> None:
    a.attempts += 1
    a.transition(State.SENDING, NOW + at - 0.5)
    store.record(a)
    a.transition(State.FAILED, NOW + at, reason=reason)
    store.record(a)


async def test_the_source_of_a_pairs_start_survives_its_later_transitions_and_a_replay(store):
    not_found, exhausted = FailureReason.CONTACT_NOT_FOUND, FailureReason.RETRIES_EXHAUSTED
    # Started and failed in one transaction: the later rows, queued over the start's, keep it.
    first = started("c1", "s1", "crm")
    store.record(first)
    fail(store, carried_on(first), 1010.0, not_found)
    # Started, then failed in later transactions.
    second = started("c2", "s1", "hubspot")
    store.record(second)
    await store.flush()
    fail(store, carried_on(second), 1020.0, exhausted)
    third = started("c3", "s2", "mappings")
    store.record(third)
    await store.flush()
    fail(store, carried_on(third), 1030.0, not_found)
    # A row written before sources were recorded names none.
    old = new("c4", "s1")
    store.record(old)
    fail(store, old, 1040.0, not_found)
    await store.flush()

    async def listed(**filters: object) -> list[tuple[str, str]]:
        return [(a.contact_id, a.source) for a in await store.failed(**filters)]

    assert await listed() == [("c1", "crm"), ("c2", "hubspot"), ("c3", "mappings"), ("c4", "")]
    assert await listed(source="crm") == [("c1", "crm")]
    assert await listed(source="crm", segment_id="s1", reason=not_found) == [("c1", "crm")]
    assert await listed(source="crm", segment_id="s2") == []
    assert await listed(source="hubspot", reason=not_found) == []
    assert await listed(source="mappings", segment_id="s2") == [("c3", "mappings")]
    assert await listed(source="nowhere") == []
    assert await store.count_failed(source="hubspot") == (1, (NOW + 1020.0, "c2", "s1"))
    assert await store.count_failed(source="crm", reason=exhausted) == (0, None)
    [c2] = await store.contact("c2")
    assert c2.source == "hubspot"

    # A replay is a new start from the dead letter's own source; it fails again, still its.
    [letter] = await store.failed(source="hubspot")
    replayed = started("c2", "s1", letter.source, 2000.0)
    store.record(replayed)
    fail(store, carried_on(replayed), 2010.0, not_found)
    await store.flush()
    assert await listed(source="hubspot", reason=not_found) == [("c2", "hubspot")]
    # A start naming no source keeps the pair's; one naming another replaces it.
    store.record(new("c2", "s1", 3000.0))
    store.record(started("c3", "s2", "crm", 3000.0))
    await store.flush()
    assert [a.source for a in await store.contact("c2")] == ["hubspot"]
    assert [a.source for a in await store.contact("c3")] == ["crm"]
    # Paged by key within a source, as without one.
    page = await store.failed(1, source="crm")
    assert [a.contact_id for a in page] == ["c1"]
    assert await store.failed(1, source="crm", after=dead_letter_key(page[0])) == []


async def test_a_restart_begins_a_new_history(store):
    a = new("c", "s")
    store.record(a)
    a.transition(State.FAILED, NOW + 1001.0, reason=FailureReason.RETRIES_EXHAUSTED)
    store.record(a)
    await store.flush()
    again = new("c", "s", 2000.0)
    store.record(again)
    await store.flush()
    [saved] = await store.contact("c")
    assert saved.state is State.QUEUED and saved.reason is None
    assert [s for s, _ in saved.history] == ["queued"]


async def test_deliveries_are_remembered(store):
    assert await store.delivery("crm", "msg_1") is None
    await store.remember_delivery("crm", "msg_1", b'{"accepted":1}')
    assert await store.delivery("crm", "msg_1") == b'{"accepted":1}'  # before the commit too
    await store.flush()
    assert await store.delivery("crm", "msg_1") == b'{"accepted":1}'
    assert await store.delivery("other", "msg_1") is None


async def test_the_newest_mirror_time_of_a_contact_is_kept(store):
    assert await mirrored_at(store, "c1") == 0.0
    store.record_mirror("c1", NOW - 10)
    assert await mirrored_at(store, "c1") == NOW - 10  # before the commit too
    store.record_mirror("c1", NOW - 20)  # an older one never lowers it
    await store.flush()
    store.record_mirror("c1", NOW - 30)
    await store.flush()
    assert await mirrored_at(store, "c1") == NOW - 10
    store.record_mirror("c1", NOW - 5)
    assert await mirrored_at(store, "c1") == NOW - 5
    assert await mirrored_at(store, "c2") == 0.0


async def test_histories_of_many_contacts_come_in_one_answer(store):
    store.record(new("h1", "vip"))
    store.record(new("h2", "gold"))
    store.record_mirror("h2", NOW - 3)
    await store.flush()
    store.record(new("h1", "gold", at=1001.0))  # not committed yet: still part of the answer
    found = await store.histories(["h1", "h2", "h3", "h1"])
    assert set(found) == {"h1", "h2", "h3"}
    assert sorted(found["h1"].assignments) == ["gold", "vip"]
    assert list(found["h2"].assignments) == ["gold"] and found["h2"].mirrored_at == NOW - 3
    assert found["h3"].assignments == {} and found["h3"].mirrored_at == 0.0
    many = await store.histories([f"none-{i}" for i in range(1200)])  # beyond one IN list
    assert len(many) == 1200


async def test_the_outbox_refresh_budget_and_confirmations_survive_a_restart(
    durable: Callable[[], JournalStore],
):
    first = durable()
    await first.open()
    first.add("n-1", b"body")
    await first.try_spend("vip", NOW, NOW + 3600)
    first.remember_confirmation("c1", "vip", NOW, member=True)
    await first.flush()
    await first.close()
    second = durable()
    recovered = await recover(second)
    try:
        assert recovered.notifications == [("n-1", b"body")]
        assert recovered.refresh_budget == {"vip": NOW + 3600}
        assert recovered.confirmations == [("c1", "vip", NOW, True)]
    finally:
        await second.close()


async def test_mirror_times_survive_a_restart(durable: Callable[[], JournalStore]):
    first = durable()
    await first.open()
    first.record_mirror("c1", NOW - 10)
    await first.flush()
    await first.close()
    second = durable()
    await second.open()
    try:
        assert await mirrored_at(second, "c1") == NOW - 10
    finally:
        await second.close()


async def test_a_batch_of_delivery_keys_is_looked_up_at_once(store):
    await store.remember_delivery("crm", "k-1", b"1")
    await store.flush()
    await store.remember_delivery("crm", "k-2", b"1")  # queued, not committed yet
    known = await store.known_deliveries("crm", ["k-1", "k-2", "k-3", "k-1"])
    assert known == {"k-1", "k-2"}
    assert await store.known_deliveries("other", ["k-1"]) == set()


async def test_claims_of_delivery_keys_are_answered_or_withdrawn(store):
    # One process's store: nothing but this process claims, so nothing is held elsewhere. On
    # the single-process stores claim_keys is always empty by design: there this checks that
    # claims and withdrawals leave no answer behind; claims held by another connection are
    # tested against PostgreSQL in tests/store/test_postgres.py.
    keys = [("crm", "d-1"), ("crm", "d-2")]
    assert await store.claim_keys(keys) == set()
    await store.remember_delivery("crm", "d-1", b"first")  # the answer replaces the claim
    await store.unclaim_keys([("crm", "d-2")])  # d-2 was not taken after all
    await store.flush()
    assert await store.delivery("crm", "d-1") == b"first"
    assert await store.delivery("crm", "d-2") is None  # a claim is no answer
    assert await store.known_deliveries("crm", ["d-1", "d-2"]) == {"d-1"}
    assert await store.claim_keys([("crm", "d-2")]) == set()  # free to take again


async def test_a_refresh_is_spent_once_until_it_is_allowed_again(store):
    assert store.next_allowed("vip") == 0.0
    assert await store.try_spend("vip", NOW, NOW + 3600) == 0.0
    assert await store.try_spend("vip", NOW + 10, NOW + 3610) == NOW + 3600
    assert store.next_allowed("vip") == NOW + 3600
    assert await store.try_spend("vip", NOW + 3600, NOW + 7200) == 0.0
    store.spend("gold", NOW, NOW + 60)
    assert store.next_allowed("gold") == NOW + 60


async def test_notifications_wait_in_the_outbox_until_done(store):
    store.add("n-1", b'{"type":"mapping.active"}')
    store.add("n-2", b'{"type":"mapping.removed"}')
    store.done("n-1")
    await store.flush()
    assert store.pending() == [("n-2", b'{"type":"mapping.removed"}')]


async def test_batches_and_writability(store):
    batch = BatchRecord("b1", "s", ("c1", "c2"), "s:key", 1)
    await store.save_batch(batch)
    await store.drop_batch("b1")
    await store.flush()
    await store.check_writable()


async def test_concurrent_flushes_share_commits(durable: Callable[[], JournalStore]):
    journal = durable()
    assert isinstance(journal, SqliteStore | PostgresStore)  # both count their commits
    await journal.open()
    try:

        async def one(i: int) -> None:
            journal.record(new(f"c{i}", "s"))
            await journal.flush()

        before = journal.commits
        await asyncio.gather(*(one(i) for i in range(500)))
        commits = journal.commits - before
        # Group commit: far fewer transactions (fsyncs) than flushes.
        assert 1 <= commits < 100
        assert (await journal.counts()) == {"queued": 500}
    finally:
        await journal.close()


# ---- drift reconcile -----------------------------------------------------------------------


def ended(contact: str, segment: str, state: State, at: float = 1000.0) -> Assignment:
    """A pair confirmed `state` (an add `active`, a removal `removed`)."""
    assignment = new(contact, segment, at)
    assignment.intent = Intent.ADD if state is State.ACTIVE else Intent.REMOVE
    for step in (State.SENDING, State.WRITTEN, state):
        assignment.transition(step, NOW + at)
    return assignment


async def test_tracked_memberships_are_paged_in_key_order_from_a_cursor(store):
    for contact, segment, state in (
        ("c2", "s1", State.ACTIVE),
        ("c1", "s2", State.REMOVED),
        ("c1", "s1", State.ACTIVE),
        ("c3", "s1", State.FAILED),
    ):
        store.record(
            ended(contact, segment, state) if state is not State.FAILED else new(contact, segment)
        )
    store.record(new("c4", "s1"))  # queued: work in progress, not tracked
    await store.flush()
    assert await store.tracked_count() == 3
    first = await store.tracked_page(("", ""), 2)
    assert [(a.key, a.state, a.intent) for a in first] == [
        (("c1", "s1"), State.ACTIVE, Intent.ADD),
        (("c1", "s2"), State.REMOVED, Intent.REMOVE),
    ]
    rest = await store.tracked_page(first[-1].key, 2)
    assert [a.key for a in rest] == [("c2", "s1")]
    assert await store.tracked_page(rest[-1].key, 2) == []


async def test_one_pass_runs_at_a_time_and_only_its_runner_saves_progress(store):
    first = ReconcilePass(id="p1", started_at=NOW, total=3)
    store.start_pass(first)
    await store.flush()
    # A second pass queued while the first runs is not written.
    store.start_pass(ReconcilePass(id="p2", started_at=NOW + 1))
    await store.flush()
    assert await store.get_pass("p2") is None
    running = await store.running_pass()
    assert running is not None and (running.id, running.runner, running.total) == ("p1", "", 3)

    store.claim_pass("p1", "a")
    first.runner, first.read, first.cursor = "a", 2, ("c1", "s2")
    store.save_pass(first)
    await store.flush()
    # A survivor takes it over: the first runner's later progress is not saved.
    store.claim_pass("p1", "b")
    await store.flush()
    first.read = 3
    store.save_pass(first)
    await store.flush()
    taken = await store.get_pass("p1")
    assert taken is not None
    assert (taken.runner, taken.read, taken.cursor) == ("b", 2, ("c1", "s2"))

    taken.state, taken.finished_at, taken.drifted = PassState.DONE, NOW + 5, 1
    store.save_pass(taken)
    await store.flush()
    # An ended pass is never reopened, nor taken over.
    reopened = dataclasses.replace(taken, state=PassState.RUNNING, read=9)
    store.save_pass(reopened)
    store.claim_pass("p1", "c")
    await store.flush()
    ended_pass = await store.get_pass("p1")
    assert ended_pass is not None
    assert (ended_pass.state, ended_pass.read, ended_pass.runner) == (PassState.DONE, 2, "b")
    # Ended and a new one begun in one transaction: the new one is written.
    store.start_pass(ReconcilePass(id="p3", started_at=NOW + 6, segment_ids=("s1",), dry_run=True))
    await store.flush()
    newest = await store.passes(10)
    assert [(p.id, p.state) for p in newest] == [("p3", PassState.RUNNING), ("p1", PassState.DONE)]
    assert (newest[0].segment_ids, newest[0].dry_run, newest[0].total) == (("s1",), True, None)
    assert (newest[1].drifted, newest[1].finished_at) == (1, NOW + 5)
    # The schedule counts from the newest scheduled pass, not from one started by hand.
    assert await store.last_scheduled_pass() is None
    newest[0].state, newest[0].finished_at = PassState.DONE, NOW + 7
    store.save_pass(newest[0])
    store.start_pass(ReconcilePass(id="p4", started_at=NOW + 8, scheduled=True))
    await store.flush()
    anchor = await store.last_scheduled_pass()
    assert anchor is not None and anchor.id == "p4"


async def test_drift_is_journaled_against_the_pair_with_the_pass_progress(store):
    running = ReconcilePass(id="p1", started_at=NOW, runner="a")
    store.start_pass(running)
    await store.flush()
    for segment, state, at in (("s1", State.ACTIVE, 0), ("s2", State.REMOVED, 1)):
        running.read += 1
        running.drifted += 1
        running.cursor = ("c1", segment)
        store.record_drift(ended("c1", segment, state), running, NOW + at, state is State.ACTIVE)
    store.record_drift(ended("c2", "s1", State.ACTIVE), running, NOW + 2, True)
    await store.flush()
    found = await store.drift_of("c1")
    assert [(d.segment_id, d.intent, d.pass_id, d.requeued) for d in found] == [
        ("s1", Intent.ADD, "p1", True),
        ("s2", Intent.REMOVE, "p1", False),
    ]
    saved = await store.get_pass("p1")
    assert saved is not None and (saved.drifted, saved.cursor) == (2, ("c1", "s2"))
    created = await store.journal_created_at()
    assert created is not None and created <= time.time()
