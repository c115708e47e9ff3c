"""The SQLite journal on real files: recovery, migrations, bad files, pruning, a full disk."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.store import sql
from daemon.store.delivery_filter import capacity_for
from daemon.store.sqlite import (
    APPLICATION_ID,
    MIGRATIONS,
    SqliteStore,
    StoreOpenError,
    StoreUnavailable,
)
from scheduler.model import Assignment, FailureReason, Intent, Lane, State
from scheduler.store import BatchRecord
from tests.support.disks import fill, small_tmpfs


def assignment(contact: str, segment: str, *states: State) -> Assignment:
    now = time.time()
    a = Assignment(contact, segment, received_at=now, updated_at=now, history=[(State.QUEUED, now)])
    for state in states:
        a.transition(state, time.time())
    return a


async def test_unfinished_work_of_every_kind_survives_a_restart(tmp_path: Path):
    path = str(tmp_path / "journal.db")
    store = SqliteStore(path)
    await store.open()
    states = {
        "queued": (),
        "sending": (State.SENDING,),
        "retrying": (State.SENDING, State.RETRYING),
        "written": (State.SENDING, State.WRITTEN),
        "verifying": (State.SENDING, State.WRITTEN, State.VERIFYING),
        "active": (State.SENDING, State.WRITTEN, State.VERIFYING, State.ACTIVE),
    }
    for name, steps in states.items():
        # As the engine does: one record per transition.
        a = assignment(f"c-{name}", "s")
        store.record(a)
        for step in steps:
            a.transition(step, time.time())
            store.record(a)
    await store.save_batch(BatchRecord("b1", "s", ("c-sending",), "s:k1", 2))
    store.spend("s", time.time(), time.time() + 3600)
    store.remember_confirmation("c-active", "s", time.time())
    store.add("evt-1", b'{"type":"mapping.active"}')
    store.add("evt-2", b"{}")
    store.done("evt-2")
    await store.close()

    again = SqliteStore(path)
    recovered = await again.open()
    try:
        assert [(c, s, i) for c, s, _, i, _, _ in recovered.queued] == [("c-queued", "s", "add")]
        assert sorted(a.contact_id for a in recovered.assignments) == [
            "c-retrying",
            "c-sending",
            "c-verifying",
            "c-written",
        ]
        by_id = {a.contact_id: a for a in recovered.assignments}
        assert by_id["c-retrying"].state is State.RETRYING
        assert [s for s, _ in by_id["c-verifying"].history or []] == [
            "queued",
            "sending",
            "written",
            "verifying",
        ]
        assert recovered.batches == [BatchRecord("b1", "s", ("c-sending",), "s:k1", 2)]
        assert again.next_allowed("s") > time.time() + 3500
        assert [(c, s, m) for c, s, _, m in recovered.confirmations] == [("c-active", "s", True)]
        assert recovered.notifications == [("evt-1", b'{"type":"mapping.active"}')]
        assert again.pending() == [("evt-1", b'{"type":"mapping.active"}')]
    finally:
        await again.close()


async def test_an_old_schema_is_migrated_and_keeps_its_data(tmp_path: Path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute("PRAGMA application_id = 1397181776")
    old.executescript(MIGRATIONS[0])
    old.execute("PRAGMA user_version = 1")
    old.execute(
        "INSERT INTO assignments VALUES ('c', 's', 'queued', NULL, '', 0, ?, ?, 'queued:1.0;')",
        (time.time(), time.time()),
    )
    old.commit()
    old.close()
    store = SqliteStore(str(path))
    recovered = await store.open()
    await store.close()
    assert [c for c, *_ in recovered.queued] == ["c"]
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert check.execute("SELECT count(*) FROM journal_info").fetchone()[0] == 1
    check.close()


async def test_corrupt_foreign_and_newer_files_are_refused_clearly(tmp_path: Path):
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not an SQLite database, just bytes" * 100)
    with pytest.raises(StoreOpenError, match="not a usable segmapd journal"):
        await SqliteStore(str(corrupt)).open()

    foreign = tmp_path / "foreign.db"
    other = sqlite3.connect(foreign)
    other.execute("CREATE TABLE customers (id INTEGER)")
    other.commit()
    other.close()
    with pytest.raises(StoreOpenError, match="not a segmapd journal"):
        await SqliteStore(str(foreign)).open()
    # ...and it was left exactly as it was.
    other = sqlite3.connect(foreign)
    assert other.execute("PRAGMA application_id").fetchone()[0] == 0
    other.close()

    newer = tmp_path / "newer.db"
    store = SqliteStore(str(newer))
    await store.open()
    await store.close()
    bump = sqlite3.connect(newer)
    bump.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    bump.commit()
    bump.close()
    with pytest.raises(StoreOpenError, match="newer"):
        await SqliteStore(str(newer)).open()


async def test_finished_assignments_past_retention_are_pruned(tmp_path: Path):
    store = SqliteStore(str(tmp_path / "journal.db"), retention_s=3600)
    await store.open()
    try:
        # Finished long ago: a removal and a dead letter go; an active add is a membership
        # segmapd made, which a mirror (`set`) compares with, so it stays past retention.
        old = assignment("old", "s", State.SENDING, State.WRITTEN, State.VERIFYING, State.REMOVED)
        old.intent = Intent.REMOVE
        old.updated_at = time.time() - 7200
        store.record(old)
        dead = assignment("dead", "s", State.SENDING, State.FAILED)
        dead.reason = FailureReason.CONTACT_NOT_FOUND
        dead.attempts = 1
        dead.updated_at = time.time() - 7200
        store.record(dead)
        # A failure whose outcome was open may have left a membership: it stays tracked.
        unknown = assignment("unknown", "s", State.SENDING, State.FAILED)
        unknown.reason = FailureReason.RETRIES_EXHAUSTED
        unknown.attempts = 6
        unknown.updated_at = time.time() - 7200
        store.record(unknown)
        invalid = assignment("invalid", "s", State.FAILED)
        invalid.reason = FailureReason.RETRIES_EXHAUSTED
        invalid.updated_at = time.time() - 7200
        store.record(invalid)
        member = assignment(
            "member", "s", State.SENDING, State.WRITTEN, State.VERIFYING, State.ACTIVE
        )
        member.updated_at = time.time() - 7200
        store.record(member)
        stale_pending = assignment("pending", "s")
        stale_pending.updated_at = time.time() - 7200
        store.record(stale_pending)
        store.record(
            assignment("fresh", "s", State.SENDING, State.WRITTEN, State.VERIFYING, State.ACTIVE)
        )
        store._last_prune = 0.0  # let the next commit prune
        await store.flush()
        store.record(assignment("trigger", "s"))
        await store.flush()
        assert await store.contact("old") == []
        assert await store.contact("dead") == []
        assert await store.contact("invalid") == []
        assert [a.reason for a in await store.contact("unknown")] == [
            FailureReason.RETRIES_EXHAUSTED
        ]
        assert [a.state for a in await store.contact("member")] == [State.ACTIVE]
        assert [a.state for a in await store.contact("pending")] == [State.QUEUED]
        assert [a.state for a in await store.contact("fresh")] == [State.ACTIVE]
    finally:
        await store.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs for the journal."""
    with small_tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


async def test_a_full_disk_refuses_commits_loses_nothing_and_recovers(small_disk: Path):
    store = SqliteStore(str(small_disk / "journal.db"))
    await store.open()
    filler = small_disk / "filler"
    try:
        store.record(assignment("before", "s"))
        await store.flush()
        fill(small_disk)  # to the last byte
        for i in range(2000):
            store.record(assignment(f"during-{i}", "segment-with-a-long-name-" * 3))
        with pytest.raises(StoreUnavailable):
            await store.flush()
        with pytest.raises(StoreUnavailable):
            await store.check_writable()
        # Space returns: the queued changes are committed, none lost.
        filler.unlink()
        deadline = time.monotonic() + 10
        while True:
            try:
                await store.flush()
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the journal did not recover"
        await store.check_writable()
        counts = await store.counts()
        assert counts == {"queued": 2001}
    finally:
        await store.close()


async def _filter_built(store: SqliteStore, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not store.delivery_filter.ready or store.delivery_filter.builds_running:
        assert time.monotonic() < deadline, "the delivery filter was never built"
        await asyncio.sleep(0.01)


async def test_new_deliveries_are_told_apart_in_memory_and_redeliveries_still_found(
    tmp_path: Path,
):
    path = str(tmp_path / "journal.db")
    store = SqliteStore(path)
    await store.open()
    for i in range(2000):
        await store.remember_delivery("crm", f"old-{i}", f'{{"n":{i}}}'.encode())
    await store.flush()
    await store.close()

    again = SqliteStore(path)
    await again.open()
    try:
        # Before the filter is built every lookup reads the journal, and finds the old ones.
        assert await again.delivery("crm", "old-7") == b'{"n":7}'
        await _filter_built(again)
        reads = again.journal_reads
        for i in range(2000):
            assert await again.delivery("crm", f"old-{i}") == f'{{"n":{i}}}'.encode()
        assert again.journal_reads - reads == 2000  # every "maybe" is checked in the journal
        reads = again.journal_reads
        for i in range(2000):
            assert await again.delivery("crm", f"new-{i}") is None
            assert await again.delivery("erp", f"old-{i}") is None  # keys are per source
        # At a 1 % false-positive rate, about 40 of these 4,000 lookups read the journal.
        assert again.journal_reads - reads < 150
    finally:
        await again.close()


async def test_keys_remembered_while_the_filter_builds_or_outgrows_it_are_never_missed(
    tmp_path: Path,
):
    path = str(tmp_path / "journal.db")
    with sqlite3.connect(path) as connection:  # a big journal, so that the build takes a while
        store = SqliteStore(path)
        await store.open()
        await store.close()
        connection.executemany(
            "INSERT INTO deliveries VALUES ('crm', ?, x'7b7d', ?)",
            ((f"bulk-{i}", time.time()) for i in range(200_000)),
        )
    store = SqliteStore(path, delivery_filter_capacity=1000)
    await store.open()
    try:
        assert store.delivery_filter.builds_running
        # Remembered during the first build: some committed before its snapshot, some after.
        for i in range(300):
            await store.remember_delivery("crm", f"during-{i}", b"{}")
            if i % 50 == 0:
                await store.flush()
        await store.flush()
        await _filter_built(store)
        first_capacity = store.delivery_filter.capacity
        # Twice the keys its snapshot counted: the bulk ones and any "during" key committed
        # before the snapshot (how many depends on how fast the build started).
        assert capacity_for(200_000, 1000) <= first_capacity <= capacity_for(200_300, 1000)
        # Far more keys than the filter was sized for: it is rebuilt, bigger, and misses none.
        for i in range(first_capacity + 10):
            await store.remember_delivery("crm", f"late-{i}", b"{}")
            if i % 5000 == 0:
                await store.flush()
        await store.flush()
        await _filter_built(store)
        assert store.delivery_filter.capacity > first_capacity
        seen = store.delivery_filter
        assert all(seen.may_contain(("crm", f"during-{i}")) for i in range(300))
        assert all(seen.may_contain(("crm", f"late-{i}")) for i in range(first_capacity + 10))
        assert all(seen.may_contain(("crm", f"bulk-{i}")) for i in range(200_000))
        assert await store.delivery("crm", "during-17") == b"{}"
    finally:
        await store.close()


async def test_a_delivery_taken_while_its_lookup_reads_the_journal_is_found(tmp_path: Path):
    store = SqliteStore(str(tmp_path / "journal.db"))
    await store.open()
    try:
        # Before the filter is built, a lookup reads the journal; the same delivery id arrives
        # again and is taken meanwhile. The lookup must see it, or both would be taken.
        lookup = asyncio.create_task(store.delivery("crm", "msg_twice"))
        await asyncio.sleep(0)  # the lookup is now waiting for its read
        assert store.journal_reads >= 1
        await store.remember_delivery("crm", "msg_twice", b'{"accepted":1}')
        assert await lookup == b'{"accepted":1}'
    finally:
        await store.close()


async def test_a_delivery_committed_while_its_lookup_reads_the_journal_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # The lookup's read takes its snapshot, empty; then the same delivery is taken, committed,
    # and leaves the in-memory answers before the read returns. The lookup must read again.
    store = SqliteStore(str(tmp_path / "journal.db"))
    await store.open()
    snapshot_taken, release = threading.Event(), threading.Event()
    query = store._query

    def held_query(sql: str, parameters: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        # The real read; only its return is held back (on the read thread), to fix the order.
        rows = query(sql, parameters)
        if sql.startswith("SELECT answer FROM deliveries") and not release.is_set():
            snapshot_taken.set()
            release.wait(10)
        return rows

    monkeypatch.setattr(store, "_query", held_query)
    try:
        lookup = asyncio.create_task(store.delivery("crm", "msg_late"))
        assert await asyncio.to_thread(snapshot_taken.wait, 10)
        await store.remember_delivery("crm", "msg_late", b'{"accepted":2}')
        await store.flush()  # committed, and no longer among the unconfirmed answers
        release.set()
        assert await lookup == b'{"accepted":2}'
    finally:
        release.set()
        await store.close()


@pytest.mark.parametrize(
    ("rows", "parameter_limit"),
    [(1, None), (127, None), (128, None), (129, None), (300, None), (300, 999), (300, 50)],
)
async def test_one_transaction_of_any_size_journals_every_row_as_given(
    tmp_path: Path, rows: int, parameter_limit: int | None
):
    # A transaction's rows go to SQLite in statements of up to 128 rows, fewer where the SQLite
    # build allows fewer parameters per statement (999 before 3.32): the sizes around the
    # boundaries, and several statements' worth, must all land, values intact.
    path = str(tmp_path / "journal.db")
    store = SqliteStore(path)
    await store.open()
    if parameter_limit is not None:
        assert store._writer is not None
        store._writer.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, parameter_limit)
    expected = {}
    for i in range(rows):
        a = assignment(f"c-{i}", f"s-{i % 7}")
        if i % 2:
            a.transition(State.SENDING, a.updated_at + 1.5)
        store.record(a)
        expected[(a.contact_id, a.segment_id)] = (str(a.state), a.received_at, a.updated_at)
        await store.remember_delivery("crm", f"d-{i}", b'{"accepted":1,"n":%d}' % i)
    await store.flush()
    await store.close()

    connection = sqlite3.connect(path)
    try:
        journaled = {
            (c, s): (state, received, updated)
            for c, s, state, received, updated in connection.execute(
                "SELECT contact_id, segment_id, state, received_at, updated_at FROM assignments"
            )
        }
        answers = dict(connection.execute("SELECT delivery_id, answer FROM deliveries"))
    finally:
        connection.close()
    assert journaled == expected
    assert answers == {f"d-{i}": b'{"accepted":1,"n":%d}' % i for i in range(rows)}


async def test_a_spent_refresh_budget_is_committed_before_try_spend_returns(tmp_path: Path):
    # The refresh is sent right after try_spend returns: a SIGKILL from then on must find the
    # spend in the file, or the restarted daemon refreshes again and earns a 429.
    path = tmp_path / "journal.db"
    store = SqliteStore(str(path))
    await store.open()
    try:
        now = time.time()
        assert await store.try_spend("seg", now, now + 3600) == 0.0
        # Read by another connection at once, as a restarted process would.
        with sqlite3.connect(path) as reader:
            rows = reader.execute("SELECT * FROM refresh_budget").fetchall()
        assert rows == [("seg", now + 3600)]
        # Spent: the next try answers when a refresh is allowed, and spends nothing.
        assert await store.try_spend("seg", now + 1, now + 7200) == now + 3600
        assert store.next_allowed("seg") == now + 3600
    finally:
        await store.close()


async def test_a_refresh_spend_that_cannot_be_committed_is_given_back(small_disk: Path):
    store = SqliteStore(str(small_disk / "journal.db"))
    await store.open()
    filler = small_disk / "filler"
    try:
        fill(small_disk)
        for i in range(2000):  # enough queued that the commit needs pages the disk lacks
            store.record(assignment(f"blip-{i}", "segment-with-a-long-name-" * 3))
        now = time.time()
        with pytest.raises(StoreUnavailable):
            await store.try_spend("seg", now, now + 3600)
        # Not sent, so not spent: the refresh is still allowed now, once the journal commits.
        assert store.next_allowed("seg") == 0.0
        filler.unlink()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert await store.try_spend("seg", now + 1, now + 3601) == 0.0
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        assert store.next_allowed("seg") == now + 3601
    finally:
        filler.unlink(missing_ok=True)
        await store.close()


async def test_a_journal_of_the_previous_release_is_upgraded_in_place(tmp_path: Path):
    # Written as the release before removals left it: schema 2, every row an add.
    path = tmp_path / "journal.db"
    with sqlite3.connect(path) as old:
        old.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        for number, script in enumerate(MIGRATIONS[:2], start=1):
            old.executescript(script)
            old.execute(f"PRAGMA user_version = {number}")
        old.executemany(
            "INSERT INTO assignments VALUES (?, ?, ?, NULL, '', ?, ?, ?, ?)",
            [
                ("c-q", "s", "queued", 0, 1.0, 1.0, "queued:1.0;"),
                ("c-v", "s", "verifying", 1, 1.0, 2.0, "queued:1.0;sending:1.5;verifying:2.0;"),
                ("c-s", "s", "sending", 1, 1.0, 1.5, "queued:1.0;sending:1.5;"),
            ],
        )
        old.execute("INSERT INTO batches VALUES ('b1', 's', '[\"c-s\"]', 's:k1', 1, 1.5)")
        old.execute("INSERT INTO confirmations VALUES ('c-a', 's', ?)", (time.time(),))
    store = SqliteStore(str(path))
    recovered = await store.open()
    try:
        assert recovered.queued == [("c-q", "s", 1.0, "add", 0.0, "live")]
        by_id = {a.contact_id: a for a in recovered.assignments}
        assert {c: (a.state, a.intent) for c, a in by_id.items()} == {
            "c-v": (State.VERIFYING, Intent.ADD),
            "c-s": (State.SENDING, Intent.ADD),
        }
        assert [s for s, _ in by_id["c-v"].history or []] == ["queued", "sending", "verifying"]
        # Every row of a journal from before lanes is live, and names no source.
        assert {a.lane for a in recovered.assignments} == {Lane.LIVE}
        assert {a.source for a in recovered.assignments} == {""}
        assert recovered.batches == [BatchRecord("b1", "s", ("c-s",), "s:k1", 1, Intent.ADD)]
        assert [(c, m) for c, _, _, m in recovered.confirmations] == [("c-a", True)]
        # And the upgraded journal takes removals.
        removal = assignment("c-r", "s")
        removal.intent = Intent.REMOVE
        store.record(removal)
        await store.flush()
        [stored] = await store.contact("c-r")
        assert stored.intent is Intent.REMOVE
    finally:
        await store.close()
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_a_writer_thread_stopped_by_an_unexpected_error_fails_flushes_at_once(
    tmp_path: Path,
):
    # An integer SQLite cannot bind raises OverflowError, not sqlite3.Error: the writer thread
    # stops. Flushes must fail with StoreUnavailable, now and later, never wait forever.
    store = SqliteStore(str(tmp_path / "journal.db"))
    await store.open()
    try:
        broken = assignment("c1", "s1", State.QUEUED)
        broken.attempts = 2**70
        store.record(broken)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.flush(), 10)
        store.record(assignment("c2", "s1", State.QUEUED))
        with pytest.raises(StoreUnavailable, match="writer thread stopped"):
            await asyncio.wait_for(store.flush(), 10)
    finally:
        await asyncio.wait_for(store.close(), 10)


def test_every_dead_letter_filter_walks_an_index_of_dead_letters(tmp_path: Path):
    journal = sqlite3.connect(tmp_path / "journal.db")
    for step in MIGRATIONS:
        journal.executescript(step)
    key = (1.0, "c", "s")
    for reason, segment, source in itertools.product(
        (None, FailureReason.NOT_INDEXED), (None, "VIP"), (None, "crm")
    ):
        statements = [
            sql.failed_query(50, reason, segment, source=source),
            sql.failed_query(50, reason, segment, key, key, source=source),
            sql.count_failed_query(reason, segment, source),
        ]
        for text, parameters in statements:
            rendered = sql.render(text, sql.Dialect.SQLITE)
            plan = [row[3] for row in journal.execute(f"EXPLAIN QUERY PLAN {rendered}", parameters)]
            walks = [step for step in plan if step.startswith(("SCAN assignments", "SEARCH"))]
            # A partial index of failed rows, or the primary key for a page's rows: never the
            # table, never the index of every state.
            assert walks, plan
            assert all("INDEX dead_letters" in s or "PRIMARY KEY" in s for s in walks), plan
            if source is not None and (reason or segment):
                # The source's entries are checked without reading a row each.
                assert any("COVERING INDEX dead_letters_by_source" in s for s in walks), plan
    journal.close()
