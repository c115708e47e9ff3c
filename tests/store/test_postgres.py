"""The PostgreSQL journal beyond the contract: migrations, recovery, outages, shared keys."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from pydantic import SecretStr

from daemon.config import StoreConfig
from daemon.store import StoreOpenError, StoreUnreachable, from_url
from daemon.store.pg_common import fence_sql
from daemon.store.postgres import MIGRATIONS, PostgresStore
from daemon.store.shards import SHARDS
from scheduler.model import Assignment, Intent, Lane, State
from scheduler.ownership import ForwardedChange
from scheduler.store import BatchRecord, StoreUnavailable
from tests.support.postgres import PostgresServer

NOW = time.time()


def new(contact: str, segment: str, *path: State) -> Assignment:
    """An assignment, queued, then moved along `path` a second per step."""
    assignment = Assignment(contact, segment, received_at=NOW, updated_at=NOW)
    assignment.history = [(State.QUEUED, NOW)]
    for step, state in enumerate(path, 1):
        assignment.transition(state, NOW + step)
    return assignment


@pytest.fixture
def journal(postgres: PostgresServer, postgres_url: str) -> Callable[..., PostgresStore]:
    """Stores on one fresh database, made as the daemon makes them (`from_url`)."""

    def make() -> PostgresStore:
        store = from_url(StoreConfig(url=postgres_url, password=SecretStr(postgres.password)))
        assert isinstance(store, PostgresStore)
        return store

    return make


@pytest.fixture
async def opened(journal: Callable[..., PostgresStore]) -> AsyncIterator[PostgresStore]:
    """One open store on a fresh database."""
    store = journal()
    await store.open()
    yield store
    await store.close()


async def test_instances_starting_together_migrate_once(
    journal: Callable[..., PostgresStore], postgres: PostgresServer, postgres_url: str
):
    stores = [journal() for _ in range(3)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        stores[0].record(new("c1", "s1"))
        await stores[0].flush()
        assert await stores[2].counts() == {"queued": 1}
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    connection = await asyncpg.connect(postgres_url, password=postgres.password)
    try:
        versions = [r[0] for r in await connection.fetch("SELECT version FROM segmapd_schema")]
    finally:
        await connection.close()
    assert versions == list(range(1, len(MIGRATIONS) + 1))


async def test_a_journal_from_before_lanes_is_upgraded_and_its_rows_are_live(
    journal: Callable[..., PostgresStore], postgres: PostgresServer, postgres_url: str
):
    connection = await asyncpg.connect(postgres_url, password=postgres.password)
    try:
        await connection.execute(
            "CREATE TABLE segmapd_schema (version INTEGER PRIMARY KEY, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        for number, script in enumerate(MIGRATIONS[:3], start=1):
            await connection.execute(script)
            await connection.execute("INSERT INTO segmapd_schema (version) VALUES ($1)", number)
        await connection.execute(
            "INSERT INTO assignments (contact_id, segment_id, state, received_at, updated_at, "
            "history) VALUES ('c-old', 's', 'queued', $1, $1, 'queued:1.0;')",
            NOW,
        )
        await connection.execute(
            "INSERT INTO segmapd_inbox (shard, contact_id, segment_id, intent, occurred_at, "
            "received_at) VALUES (0, 'c-in', 's', 'add', 0, $1)",
            NOW,
        )
    finally:
        await connection.close()
    store = journal()
    await store.open()
    try:
        [old] = await store.contact("c-old")
        assert (old.state, old.lane, old.source) == (State.QUEUED, Lane.LIVE, "")
        [(_, row)] = await store.read_inbox(list(range(SHARDS)), 10)
        assert (row[8], row[10]) == ("live", "")
    finally:
        await store.close()


async def test_a_newer_schema_is_refused_untouched(
    journal: Callable[..., PostgresStore], postgres: PostgresServer, postgres_url: str
):
    first = journal()
    await first.open()
    await first.close()
    newer = len(MIGRATIONS) + 1
    connection = await asyncpg.connect(postgres_url, password=postgres.password)
    try:
        await connection.execute("INSERT INTO segmapd_schema (version) VALUES ($1)", newer)
        with pytest.raises(StoreOpenError) as refused:
            await journal().open()
        assert f"schema {newer} is newer than this segmapd knows ({len(MIGRATIONS)})" in str(
            refused.value
        )
        assert await connection.fetchval("SELECT max(version) FROM segmapd_schema") == newer
    finally:
        await connection.close()


async def test_what_is_unfinished_is_recovered_after_a_restart(
    journal: Callable[..., PostgresStore],
):
    first = journal()
    await first.open()
    first.record(new("q1", "s1"))
    first.record(new("q2", "s2"))
    sending = new("w1", "s1")
    first.record(sending)
    sending.transition(State.SENDING, NOW + 1)
    first.record(sending)  # each transition is recorded as it happens
    first.record(new("done", "s1", State.SENDING, State.WRITTEN, State.ACTIVE))
    await first.save_batch(BatchRecord("b1", "s1", ("w1", "x"), "s1:key-1", 2, Intent.REMOVE))
    await first.save_batch(BatchRecord("b2", "s1", ("y",), "s1:key-2", 1))
    await first.drop_batch("b2")
    first.add("n-1", b'{"n":1}')
    first.add("n-2", b'{"n":2}')
    first.done("n-1")
    assert await first.try_spend("vip", NOW, NOW + 3600) == 0.0
    first.remember_confirmation("c1", "vip", NOW, member=False)
    await first.close()  # flushes what is queued

    second = journal()
    opened = await second.open()
    # Work is recovered shard by shard, by the instance taking the shard (daemon/cluster.py).
    recovered = await second.load_segments(lambda segment: True)
    try:
        assert opened.queued == [] and opened.assignments == []
        assert sorted(recovered.queued) == [
            ("q1", "s1", NOW, "add", 0.0, "live"),
            ("q2", "s2", NOW, "add", 0.0, "live"),
        ]
        [sending] = recovered.assignments
        assert (sending.contact_id, sending.state) == ("w1", State.SENDING)
        assert sending.history == [(State.QUEUED, NOW), (State.SENDING, NOW + 1)]
        assert recovered.batches == [
            BatchRecord("b1", "s1", ("w1", "x"), "s1:key-1", 2, Intent.REMOVE)
        ]
        # Its adder left: any member may claim it, and one does, once.
        await second.leases(5.0, "second").join()
        assert await second.claim_notifications(10) == [("n-2", b'{"n":2}')]
        assert await second.claim_notifications(10) == []
        assert second.pending() == [("n-2", b'{"n":2}')]
        assert opened.refresh_budget == {"vip": NOW + 3600}
        assert second.next_allowed("vip") == NOW + 3600
        assert recovered.confirmations == [("c1", "vip", NOW, False)]
    finally:
        await second.close()


async def test_a_database_restart_refuses_flushes_then_commits_everything_queued(
    opened: PostgresStore, postgres: PostgresServer, caplog: pytest.LogCaptureFixture
):
    opened.record(new("before", "s1"))
    await opened.flush()
    with postgres.down():
        for i in range(50):
            opened.record(new(f"down-{i}", "s1"))
        await opened.remember_delivery("crm", "d-down", b"answer")
        opened.add("n-down", b"{}")
        with pytest.raises(StoreUnavailable):
            await opened.flush()
        with pytest.raises(StoreUnavailable):
            await opened.check_writable()
        with pytest.raises(StoreUnavailable):
            await opened.try_spend("vip", NOW, NOW + 3600)
        with pytest.raises(StoreUnavailable):
            await opened.counts()
        # A redelivery of what is queued is still recognised, from memory.
        assert await opened.delivery("crm", "d-down") == b"answer"
        opened.record(new("late", "s1"))
    # Back: the writer reconnects by itself; nothing queued was dropped.
    deadline = time.monotonic() + 15
    while True:
        try:
            await opened.flush()
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline, "no commit after the database came back"
            await asyncio.sleep(0.2)
    await opened.check_writable()
    assert await opened.counts() == {"queued": 52}
    assert await opened.delivery("crm", "d-down") == b"answer"
    assert "commit failed" in caplog.text
    assert any(r.levelno == logging.WARNING and "work again" in r.message for r in caplog.records)


async def test_a_delivery_claimed_by_two_instances_at_once_has_one_winner(
    journal: Callable[..., PostgresStore],
):
    first, second = journal(), journal()
    await asyncio.gather(first.open(), second.open())
    try:
        keys = [("crm", f"d-{i}") for i in range(40)]
        # Each answer: the keys the other instance holds.
        held_from_first, held_from_second = await asyncio.gather(
            first.claim_keys(keys), second.claim_keys(keys)
        )
        for key in keys:
            assert (key in held_from_first) != (key in held_from_second), key  # one took it
        for key in keys:
            winner, answer = (first, b"first") if key in held_from_second else (second, b"second")
            await winner.remember_delivery(*key, answer)
        await asyncio.gather(first.flush(), second.flush())
        for key in keys:
            answer = b"first" if key in held_from_second else b"second"
            assert await first.delivery(*key) == answer
            assert await second.delivery(*key) == answer
        # Answered: a later copy of the delivery finds every key taken, by either instance.
        assert await second.claim_keys(keys) == set(keys)
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_a_refresh_is_taken_by_one_instance_only(journal: Callable[..., PostgresStore]):
    first, second = journal(), journal()
    await asyncio.gather(first.open(), second.open())
    try:
        results = await asyncio.gather(
            first.try_spend("vip", NOW, NOW + 3600), second.try_spend("vip", NOW, NOW + 3600)
        )
        assert sorted(results) == [0.0, NOW + 3600]
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_the_password_is_never_shown(
    postgres: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    secret = postgres.password
    right = from_url(StoreConfig(url=postgres_url, password=SecretStr(secret)))
    assert secret not in repr(right) and secret not in str(right)
    await right.open()
    await right.close()
    # The same password, wrong for the role named, and in the URL as some users write it.
    in_url = postgres_url.replace("segmap_test@", f"nobody:{secret}@")
    for config in (
        StoreConfig(
            url=postgres_url.replace("segmap_test@", "nobody@"), password=SecretStr(secret)
        ),
        StoreConfig(url=in_url),
    ):
        store = from_url(config)
        assert secret not in repr(store)
        with pytest.raises(StoreOpenError) as refused:
            await store.open()
        message = str(refused.value)
        # The server answered: a configuration error (exit 2), not an outage to wait out.
        assert not isinstance(refused.value, StoreUnreachable)
        assert "PostgreSQL refused the connection" in message and secret not in message
        assert secret not in repr(refused.value)
    assert secret not in caplog.text


async def test_a_database_down_at_start_up_is_a_clear_open_error(postgres: PostgresServer):
    store = from_url(
        StoreConfig(
            url=f"postgresql://segmap_test@127.0.0.1:{_closed_port()}/journal",
            password=SecretStr(postgres.password),
        )
    )
    started = time.monotonic()
    with pytest.raises(StoreUnreachable, match=r"127\.0\.0\.1:\d+/…: cannot connect to PostgreSQL"):
        await store.open()
    assert time.monotonic() - started < 10
    await store.close()  # idempotent, also after a failed open
    await store.close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_an_idle_store_is_not_writable_while_the_database_is_down(
    opened: PostgresStore, postgres: PostgresServer
):
    await opened.check_writable()
    with postgres.down(), pytest.raises(StoreUnavailable, match="readiness probe failed"):
        await opened.check_writable()
    deadline = time.monotonic() + 15
    while True:
        try:
            await opened.check_writable()
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline, "not writable after the database came back"
            await asyncio.sleep(0.2)


async def _silence(postgres_url: str, password: str, instance: int, seconds: float) -> None:
    """Make an instance's last heartbeat `seconds` old, as if it had been paused that long."""
    connection = await asyncpg.connect(postgres_url, password=password)
    try:
        await connection.execute(
            "UPDATE segmapd_instances SET heartbeat_at = now() - make_interval(secs => $2) "
            "WHERE id = $1",
            instance,
            seconds,
        )
    finally:
        await connection.close()


async def test_shards_go_to_the_first_instance_and_free_ones_only_to_the_next(
    journal: Callable[..., PostgresStore],
):
    first, second = journal(), journal()
    await asyncio.gather(first.open(), second.open())
    try:
        one, two = first.leases(5.0, "one"), second.leases(5.0, "two")
        await one.join()
        await two.join()
        assert sorted(await one.take(SHARDS)) == list(range(SHARDS))
        assert await two.take(SHARDS) == {}  # all held by a live instance
        beat = await one.heartbeat()
        assert beat is not None and beat.live_instances == 2 and len(beat.owned) == SHARDS
        await one.release([0, 1, 2])
        assert sorted(await two.take(10)) == [0, 1, 2]
        assert [(name, owned) for _, name, owned in await one.members()] == [
            ("one", SHARDS - 3),
            ("two", 3),
        ]
        await one.leave()  # a clean stop frees everything at once
        assert len(await two.take(SHARDS)) == SHARDS - 3
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_a_silent_instance_is_declared_dead_and_commits_nothing_more(
    journal: Callable[..., PostgresStore], postgres: PostgresServer, postgres_url: str
):
    first, second = journal(), journal()
    await asyncio.gather(first.open(), second.open())
    fenced: list[bool] = []
    first.on_fenced = lambda: fenced.append(True)
    try:
        one, two = first.leases(5.0, "one"), second.leases(5.0, "two")
        assert one.instance_id is None
        me = await one.join()
        await two.join()
        await one.take(SHARDS)
        first.record(new("before", "s1"))
        await first.flush()
        # Paused past its lease: the next instance to look declares it dead, takes its shards.
        await _silence(postgres_url, postgres.password, me, 6.0)
        taken = await two.take(SHARDS)
        assert len(taken) == SHARDS and all(epoch == 2 for epoch in taken.values())
        # It wakes: its commits are refused, it is told, and its heartbeat says so too.
        first.record(new("after", "s1"))
        with pytest.raises(StoreUnavailable, match="declared dead"):
            await first.flush()
        assert fenced == [True]
        assert await one.heartbeat() is None
        assert [a.contact_id for a in await second.contact("after")] == []
        assert [a.contact_id for a in await second.contact("before")] == ["before"]
    finally:
        first.instance_id = None  # its writer stops retrying the refused commit at close
        await asyncio.gather(first.close(), second.close())


async def test_a_fenced_instance_drops_what_it_had_not_committed_and_joins_again(
    journal: Callable[..., PostgresStore], postgres: PostgresServer, postgres_url: str
):
    first, second = journal(), journal()
    await asyncio.gather(first.open(), second.open())
    fenced: list[bool] = []
    first.on_fenced = lambda: fenced.append(True)
    try:
        one, two = first.leases(5.0, "one"), second.leases(5.0, "two")
        me = await one.join()
        await two.join()
        await one.take(SHARDS)
        await _silence(postgres_url, postgres.password, me, 6.0)
        await two.take(SHARDS)  # declared dead
        # A webhook's work and answer, refused: kept queued for a retry, the answer in memory.
        first.record(new("lost", "s1"))
        await first.remember_delivery("crm", "d-lost", b"accepted")
        with pytest.raises(StoreUnavailable, match="declared dead"):
            await first.flush()
        assert fenced == [True]
        assert await first.delivery("crm", "d-lost") == b"accepted"
        # More queued meanwhile, and someone waiting for its commit.
        first.record(new("lost-too", "s1"))
        waiting = asyncio.ensure_future(first.flush())
        await asyncio.sleep(0)
        # Fenced: all of it is dropped, its waiter told, and the answer forgotten (a
        # redelivery is taken anew).
        assert first.discard_pending() == 2
        with pytest.raises(StoreUnavailable, match="fenced"):
            await waiting
        assert await first.delivery("crm", "d-lost") is None
        # Joined again as a new member: its commits land again, and nothing dropped does.
        assert await one.join() != me
        first.record(new("after", "s1"))
        await first.flush()
        assert [a.contact_id for a in await second.contact("after")] == ["after"]
        assert await second.contact("lost") == [] and await second.contact("lost-too") == []
        assert await second.delivery("crm", "d-lost") is None
        assert fenced == [True]
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_an_instance_joining_again_ends_its_old_membership_at_once(
    journal: Callable[..., PostgresStore], postgres: PostgresServer, postgres_url: str
):
    first, second = journal(), journal()
    await asyncio.gather(first.open(), second.open())
    try:
        one, two = first.leases(5.0, "one"), second.leases(5.0, "two")
        old = await one.join()
        await two.join()
        assert len(await one.take(SHARDS)) == SHARDS
        # It fenced itself (cut off) before anyone declared it dead, and joins again: its old
        # shards are free at once, not after the lease, and its old id commits nothing more.
        new_id = await one.join()
        assert new_id != old and first.instance_id == new_id
        assert len(await two.take(SHARDS)) == SHARDS
        assert sorted(name for _, name, _ in await two.members()) == ["one", "two"]
        connection = await asyncpg.connect(postgres_url, password=postgres.password)
        try:
            async with connection.transaction():
                with pytest.raises(asyncpg.RaiseError, match="fenced"):
                    await connection.execute(fence_sql(old))
        finally:
            await connection.close()
        first.record(new("c1", "s1"))
        await first.flush()  # under the new membership
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_rows_of_segments_the_instance_no_longer_holds_are_left_out(
    opened: PostgresStore,
):
    opened.holds = lambda segment: segment != "gone"
    opened.record(new("c1", "kept"))
    opened.record(new("c1", "gone"))
    await opened.save_batch(BatchRecord("b-gone", "gone", ("c1",), "gone:key", 1))
    await opened.flush()
    assert [a.segment_id for a in await opened.contact("c1")] == ["kept"]
    recovered = await opened.load_segments(lambda segment: True)
    assert recovered.batches == []


async def test_forwarded_changes_reach_the_owner_once_and_show_as_queued(
    journal: Callable[..., PostgresStore],
):
    first, second = journal(), journal()
    await asyncio.gather(first.open(), second.open())
    try:
        first.forward(ForwardedChange("c9", "vip", Intent.ADD, NOW, NOW + 1, source="crm"))
        first.forward(
            ForwardedChange("c9", "old", Intent.REMOVE, 0.0, NOW + 2, lane=Lane.BULK, source="")
        )
        await first.flush()
        # Status from any instance shows them queued until their owner takes them, each in
        # the lane it came in.
        [old, vip] = await second.contact("c9")
        assert (vip.segment_id, vip.state, vip.intent) == ("vip", State.QUEUED, Intent.ADD)
        assert (old.segment_id, old.intent) == ("old", Intent.REMOVE)
        assert (vip.lane, old.lane) == (Lane.LIVE, Lane.BULK)
        rows = await second.read_inbox(list(range(SHARDS)), 10)
        assert [row[2] for _, row in rows] == ["vip", "old"]
        assert [row[8] for _, row in rows] == ["live", "bulk"]
        # The owner journals each with the source it came from.
        assert [row[10] for _, row in rows] == ["crm", ""]
        second.consume_inbox([(row_id, row[0]) for row_id, row in rows])
        await second.flush()
        assert await first.read_inbox(list(range(SHARDS)), 10) == []
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_a_key_claimed_by_one_instance_is_not_taken_by_another_until_answered(
    journal: Callable[..., PostgresStore],
):
    first, second = journal(), journal()
    await asyncio.gather(first.open(), second.open())
    try:
        key = ("crm", "d-1")
        assert await first.claim_keys([key]) == set()
        assert await second.claim_keys([key, ("crm", "d-2")]) == {key}
        await second.unclaim_keys([("crm", "d-2")])
        assert await second.delivery(*key) is None  # a claim is no answer
        await first.remember_delivery(*key, b"first answer")
        await first.flush()
        assert await second.delivery(*key) == b"first answer"
        assert await second.claim_keys([key]) == {key}  # answered: never taken again
        assert await first.claim_keys([("crm", "d-2")]) == set()  # withdrawn: free
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_text_no_journal_can_keep_is_kept_readably(opened: PostgresStore):
    # What the engine hands the store is already storable (Engine.dead_letter); the message
    # path is the store's own: a NUL in CXone's error text must not stop every commit.
    opened.record(new("good", "s1"))
    opened.record(Assignment("c1", "s1", message="CXone said \x00 and \udce9"))
    await opened.flush()
    [kept] = await opened.contact("c1")
    assert kept.message == "CXone said \ufffd and ?"


async def test_notifications_left_by_a_dead_member_are_claimed_once_between_members(
    journal: Callable[..., PostgresStore], postgres: PostgresServer, postgres_url: str
):
    stores = [journal() for _ in range(3)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        adder, *takers = stores
        leases = [store.leases(5.0, f"member-{n}") for n, store in enumerate(stores)]
        dead = await leases[0].join()
        for n in range(40):
            adder.add(f"n-{n}", b"{}")
        await adder.flush()
        for member in leases[1:]:
            await member.join()
        # While their deliverer lives, nobody else takes them.
        assert await takers[0].claim_notifications(100) == []
        await _silence(postgres_url, postgres.password, dead, 6.0)
        await leases[1].take(0)  # declared dead
        first, second = await asyncio.gather(
            takers[0].claim_notifications(25), takers[1].claim_notifications(25)
        )
        claimed = [event for event, _ in first + second]
        assert len(claimed) == 40 and len(set(claimed)) == 40  # SKIP LOCKED: none twice
    finally:
        adder.instance_id = None
        await asyncio.gather(*(member.close() for member in leases))
        await asyncio.gather(*(store.close() for store in stores))


async def test_a_forwarded_change_taken_is_deleted_only_with_what_it_became(
    opened: PostgresStore,
):
    opened.forward(ForwardedChange("c1", "vip", Intent.ADD, NOW, NOW))
    await opened.flush()
    [(row_id, row)] = await opened.read_inbox(list(range(SHARDS)), 10)
    # Taken into the engine, but the shard is gone before the commit: the change stays for
    # the shard's owner, and the state it became is left out.
    opened.holds = lambda segment: False
    opened.holds_shard = lambda shard: False
    opened.record(new("c1", "vip"))
    opened.consume_inbox([(row_id, row[0])])
    await opened.flush()
    assert [i for i, _ in await opened.read_inbox(list(range(SHARDS)), 10)] == [row_id]
    # Reads while such a commit is queued do not trip over the rows left out.
    opened.record(new("c2", "vip"))
    await opened.flush()
    assert [a.segment_id for a in await opened.contact("c2")] == []


async def test_a_heartbeat_cancelled_at_any_point_does_not_keep_the_membership_alive(
    journal: Callable[..., PostgresStore], postgres: PostgresServer, postgres_url: str
):
    # A clean stop cancels the heartbeat loop, which may be anywhere in its transaction at
    # that moment (its BEGIN included); the leave that follows on the same session must still
    # end the membership at once, or a restarted instance waits a whole lease for the shards
    # of its own previous run. Cancelled after 0, 1, 2... turns of the loop, until a heartbeat
    # ends before its cancel: every step of its round trips is cut off once, on any machine.
    first, second = journal(), journal()
    await asyncio.gather(first.open(), second.open())
    observer = await asyncpg.connect(postgres_url, password=postgres.password)
    try:
        one, two = first.leases(5.0, "one"), second.leases(5.0, "two")
        await two.join()
        for turns in range(100_000):
            me = await one.join()
            beating = asyncio.ensure_future(one.heartbeat())
            for _ in range(turns):
                await asyncio.sleep(0)
            finished = beating.done()
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            await one.leave()
            left = await observer.fetchval(
                "SELECT count(*) FROM segmapd_instances WHERE id = $1", me
            )
            assert left == 0, f"cancelled after {turns} turns: the leave did not commit"
            if finished:
                break
        else:
            raise AssertionError("no heartbeat ended within 100,000 turns of the loop")
        await two.heartbeat()  # the loop may have taken longer than the lease
        assert [name for _, name, _ in await two.members()] == ["two"]
    finally:
        await observer.close()
        await asyncio.gather(first.close(), second.close())
