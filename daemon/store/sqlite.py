"""The durable journal: one SQLite file in WAL mode, written by one thread with group commit.

Every change the engine records goes into an in-memory queue at once (no I/O on the event
loop). A writer thread takes everything queued, applies it in one transaction and commits;
`flush()` returns once everything recorded before it is committed, so concurrent webhooks share
one fsync. When a commit fails (disk full, read-only file system), nothing is dropped: the
changes stay queued and are retried, `flush()` raises `StoreUnavailable` meanwhile, and the
store recovers by itself when the disk does.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import math
import os
import socket
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from rbloom import Bloom

from daemon.store.base import JournalStore, Recovered, StoreOpenError
from daemon.store.delivery_filter import (
    MIN_CAPACITY,
    DeliveryFilter,
    DeliveryKey,
    capacity_for,
    new_bloom,
)
from daemon.store.pending import (
    AssignmentRow,
    PendingWork,
    assemble_histories,
    merge_newer,
)
from daemon.store.sql import (
    ASSIGNMENT_COLUMNS,
    ASSIGNMENTS,
    BATCHES,
    BATCHES_DONE,
    CONFIRMATIONS,
    CONFIRMED,
    CONTACT,
    COUNTS,
    DELIVERIES,
    MIRROR_TIMES,
    MIRRORS,
    NOTIFICATIONS,
    NOTIFICATIONS_DONE,
    PRUNE_EXPIRED,
    PRUNE_FINISHED,
    QUEUED,
    REFRESH_BUDGET,
    REFRESH_TIMES,
    SAVED_BATCHES,
    SCHEMA,
    STALE_CHANGES,
    UNFINISHED,
    Dialect,
    assignment_from_row,
    batch_from_row,
    confirmation_from_row,
    failed_query,
    render,
)
from scheduler.model import Assignment, FailureReason, storable
from scheduler.store import BatchRecord, ContactHistory, StoreUnavailable

log = logging.getLogger(__name__)

#: How long close() waits for its last commit before closing the file anyway (a hung disk must
#: not hold the process past systemd's TimeoutStopSec).
CLOSE_FLUSH_TIMEOUT_S = 5.0

__all__ = ["SqliteStore", "StoreOpenError", "StoreUnavailable", "connect"]

# "SGMP": marks the file as ours, so a foreign SQLite file is refused instead of altered.
APPLICATION_ID = 0x53474D50
RETRY_AFTER_FAILURE_S = 1.0
# The writer's upserts (INSERT ... ON CONFLICT DO UPDATE) need 3.24.
MIN_SQLITE = (3, 24, 0)
# Rows per INSERT statement at most; fewer where the SQLite build allows fewer parameters per
# statement (999 by default before 3.32, 32,766 since).
ROWS_PER_STATEMENT = 128
# Journal reads at most for one redelivery lookup (see `SqliteStore.delivery`).
LOOKUP_READS = 4
# After a failed build of the delivery filter, lookups go to SQLite for this long before retrying.
FILTER_RETRY_S = 60.0

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

# The schema's steps, as SQLite applies them (numbered by `PRAGMA user_version`).
MIGRATIONS: list[str] = [render(step, Dialect.SQLITE) for step in SCHEMA]

# Contacts per `IN (...)` list: well below SQLite's default limit of 999 bound parameters.
_IN_CHUNK = 500


# ---- file level -------------------------------------------------------------------------------


class JournalLock:
    """An exclusive OS lock on `<journal>.lock`, held for as long as a process uses the journal.

    Two processes on one journal would both take the same deliveries and both send the same
    batches. The lock is `flock()` on a file of its own, never on the database: SQLite's own
    (POSIX) locks on the database are dropped when any descriptor of that file is closed in the
    process. The kernel releases it when the holder exits, however it exits, so a crash never
    leaves a stale lock behind; the file only says who holds it.
    """

    __slots__ = ("_fd", "path")

    def __init__(self, journal: str) -> None:
        self.path = f"{journal}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise StoreOpenError naming the journal and its holder."""
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreOpenError(f"{self.path}: cannot open the journal's lock ({exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            journal = self.path.removesuffix(".lock")
            raise StoreOpenError(
                f"{journal}: the journal is in use by another segmapd process ({holder}); "
                "one journal serves one process: stop that one, or give this one its own "
                "store.url"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreOpenError(f"{self.path}: cannot lock the journal ({exc})") from None
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {_utc_now()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let go of the lock (idempotent); the file stays, empty of meaning."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def connect(path: str, synchronous: Synchronous) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the journal; raises StoreOpenError if unusable."""
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise StoreOpenError(
            f"{path}: the journal needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer "
            f"(its upserts); this Python has SQLite {sqlite3.sqlite_version}"
        )
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise StoreOpenError(f"{path}: cannot open the journal ({exc})") from None
    try:
        connection.execute("PRAGMA busy_timeout = 5000")
        journal_mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(journal_mode).lower() != "wal":
            log.warning("journal %s: WAL mode refused (%s)", path, journal_mode)
        connection.execute(f"PRAGMA synchronous = {synchronous}")
        _migrate(connection, path)
    except sqlite3.DatabaseError as exc:
        connection.close()
        raise StoreOpenError(f"{path}: not a usable segmapd journal ({exc})") from None
    except StoreOpenError:
        connection.close()
        raise
    return connection


def _migrate(connection: sqlite3.Connection, path: str) -> None:
    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if application_id != APPLICATION_ID:
        if application_id != 0 or tables:
            raise StoreOpenError(
                f"{path}: an SQLite file that is not a segmapd journal; refusing to touch it"
            )
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    if version > len(MIGRATIONS):
        raise StoreOpenError(
            f"{path}: journal schema {version} is newer than this segmapd knows "
            f"({len(MIGRATIONS)}); upgrade segmapd"
        )
    for number in range(version + 1, len(MIGRATIONS) + 1):
        log.info("journal %s: migrating schema %d -> %d", path, number - 1, number)
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[number - 1].split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {number}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise


# ---- the writer thread --------------------------------------------------------------------------


class _MultiRowInsert:
    """An INSERT of many rows as a few `VALUES (...), (...)` statements.

    Why not executemany(): the sqlite3 module gives up the GIL around every row's step and must
    win it back from the busy event loop each time; one statement gives it up once for all its
    rows. Why not one JSON parameter read with json_each(): SQLite then parses the JSON and
    extracts every value, which cost about a third more CPU than binding the values directly.

    Statements hold a multiple of 8 rows (up to ROWS_PER_STATEMENT) and one last statement the
    remaining 1-7, so that a few dozen statement texts serve every transaction: each distinct
    text is prepared once and kept in the connection's statement cache (128 by default), where
    one text per row count would fill it and cost megabytes.
    """

    def __init__(self, head: str, columns: int, tail: str = "") -> None:
        self._head = head
        self._tail = tail
        self._columns = columns
        self._row = "(" + ", ".join("?" * columns) + ")"
        self._texts: dict[int, str] = {}

    def _text(self, rows: int) -> str:
        text = self._texts.get(rows)
        if text is None:
            values = ", ".join([self._row] * rows)
            text = self._texts[rows] = f"{self._head} VALUES {values} {self._tail}"
        return text

    def run(self, connection: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert `rows` (each with the statement's columns, in order)."""
        allowed = connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // self._columns
        most = min(ROWS_PER_STATEMENT, allowed)
        if most >= 8:
            most -= most % 8
        start = 0
        while start < len(rows):
            left = len(rows) - start
            size = min(most, left - left % 8) or min(left, most)
            chunk = rows[start : start + size]
            connection.execute(self._text(size), list(itertools.chain.from_iterable(chunk)))
            start += size


_UPSERT_ASSIGNMENTS = _MultiRowInsert(
    ASSIGNMENTS.head, len(ASSIGNMENTS.columns), ASSIGNMENTS.tail(Dialect.SQLITE)
)
# Answers are bytes, bound (and stored) as BLOBs, as the deliveries' bodies were.
_INSERT_DELIVERIES = _MultiRowInsert(
    DELIVERIES.head, len(DELIVERIES.columns), DELIVERIES.tail(Dialect.SQLITE)
)
# Every other write, one row per execution.
_WRITES = {
    write: write.sqlite()
    for write in (
        BATCHES,
        BATCHES_DONE,
        REFRESH_BUDGET,
        CONFIRMATIONS,
        STALE_CHANGES,
        MIRRORS,
        NOTIFICATIONS,
        NOTIFICATIONS_DONE,
    )
}
_CONTACT = render(CONTACT, Dialect.SQLITE)
_CONTACTS = f"SELECT {ASSIGNMENT_COLUMNS} FROM assignments WHERE contact_id"  # noqa: S608
_PRUNE = [render(sql, Dialect.SQLITE) for sql in (PRUNE_FINISHED, *PRUNE_EXPIRED)]


class SqliteStore(JournalStore):
    """The journal behind `store.url = "sqlite:///path"`."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: Synchronous = "FULL",
        retention_s: float = 7 * 86_400,
        clock: Callable[[], float] = time.time,
        delivery_filter_capacity: int = MIN_CAPACITY,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.retention_s = retention_s
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Whether the writer sleeps on `_wake`. Only then does a change need a notify() (Python
        # code, on the hot path): a change queued while the writer commits is seen when it loops.
        self._writer_idle = False
        self._pending = PendingWork()
        # The transaction the writer is committing (or failed to, and will retry): its changes
        # are in neither `_pending` nor the file yet.
        self._in_flight: PendingWork | None = None
        self._file_lock = JournalLock(path)
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-read")
        self.last_error: str = ""
        self.commits = 0
        self._last_prune = 0.0
        self._refresh: dict[str, float] = {}
        self._notifications: OrderedDict[str, bytes] = OrderedDict()
        # Deliveries remembered but not yet committed (their answers), and a filter of the rest.
        self._unconfirmed: dict[DeliveryKey, bytes] = {}
        # Commits whose deliveries left `_unconfirmed`: a lookup whose read overlapped one reads
        # again, since its snapshot may predate the commit.
        self._deliveries_settled = 0
        self._seen = DeliveryFilter()
        self._filter_task: asyncio.Task[None] | None = None
        self._filter_failed_at = -math.inf
        self._filter_min_capacity = delivery_filter_capacity
        self.journal_reads = 0  # reads sent to the read thread, for tests and diagnostics

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r}, synchronous={self.synchronous})"

    # ---- lifecycle --------------------------------------------------------------------------

    async def open(self) -> Recovered:
        """Open and migrate the file, start the writer, and return what is unfinished."""
        self._loop = asyncio.get_running_loop()
        # Before the file is touched: a second process must change nothing, not even migrate.
        self._file_lock.acquire()
        try:
            self._writer = await asyncio.to_thread(connect, self.path, self.synchronous)
            self._reader = await self._read(lambda: connect(self.path, self.synchronous))
        except BaseException:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._file_lock.release()
            raise
        recovered: Recovered = await self._read(self._load_recovery)
        self._refresh = dict(recovered.refresh_budget)
        self._notifications = OrderedDict(recovered.notifications)
        self._thread = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
        self._thread.start()
        self._build_filter()
        log.info(
            "journal %s: %d unfinished assignments, %d in-flight batches, %d notifications",
            self.path,
            len(recovered.assignments) + len(recovered.queued),
            len(recovered.batches),
            len(recovered.notifications),
        )
        return recovered

    async def close(self) -> None:
        """Commit what is queued (if the disk allows), stop the writer, close the file."""
        if self._thread is None:
            self._file_lock.release()  # an open() that failed part-way may hold it
            return
        # A writer that cannot commit (or has died) must not keep the file open: close anyway.
        with contextlib.suppress(StoreUnavailable, TimeoutError):
            await asyncio.wait_for(self.flush(), CLOSE_FLUSH_TIMEOUT_S)
        if self._filter_task is not None:
            self._filter_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filter_task
        with self._lock:
            self._closing = True
            self._writer_idle = False
            self._wake.notify()
        await asyncio.to_thread(self._thread.join, 15.0)
        self._thread = None
        if self._reader is not None:
            reader = self._reader
            await self._read(reader.close)
            self._reader = None
        self._reads.shutdown(wait=True)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._file_lock.release()

    # ---- writes (Store protocol) -----------------------------------------------------------

    def record(self, assignment: Assignment) -> None:
        """Queue the assignment's current state and its latest transition."""
        key = assignment.key
        row: AssignmentRow = (
            assignment.contact_id,
            assignment.segment_id,
            str(assignment.state),
            str(assignment.reason) if assignment.reason is not None else None,
            storable(assignment.message),
            assignment.attempts,
            assignment.received_at,
            assignment.updated_at,
            str(assignment.intent),
            assignment.occurred_at,
        )
        with self._lock:
            self._pending.assignments[key] = row
            self._pending.contacts.setdefault(assignment.contact_id, set()).add(key[1])
            self._pending.history.setdefault(key, []).append(
                (str(assignment.state), assignment.updated_at)
            )
            self._nudge()

    async def flush(self) -> None:
        """Wait until everything queued so far is committed; StoreUnavailable if it cannot be."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._thread is None:
                raise StoreUnavailable("the journal is not open")
            self._pending.waiters.append(future)
            self._nudge()
        await future

    async def save_batch(self, batch: BatchRecord) -> None:
        """Commit the batch (with its key and body) before it is sent."""
        with self._lock:
            self._pending.batches_saved[batch.batch_id] = batch
            self._pending.batches_dropped.discard(batch.batch_id)
        await self.flush()

    async def drop_batch(self, batch_id: str) -> None:
        """Forget the batch (its outcome is recorded); committed with the next transaction."""
        with self._lock:
            if self._pending.batches_saved.pop(batch_id, None) is None:
                self._pending.batches_dropped.add(batch_id)
            self._nudge()

    async def remember_delivery(self, source: str, delivery_id: str, answer: bytes) -> None:
        """Queue the delivery's answer; committed with the webhook's flush."""
        key = (source, delivery_id)
        self._unconfirmed[key] = answer
        self._seen.add(key)
        with self._lock:
            self._pending.deliveries.setdefault(key, (answer, self._clock()))
            self._nudge()
        if self._seen.needs_build() and time.monotonic() - self._filter_failed_at > FILTER_RETRY_S:
            self._build_filter()

    async def check_writable(self) -> None:
        """Raise StoreUnavailable while commits fail."""
        if self.last_error:
            raise StoreUnavailable(self.last_error)
        await asyncio.wait_for(self.flush(), 5.0)

    # ---- reads ---------------------------------------------------------------------------

    @property
    def delivery_filter(self) -> DeliveryFilter:
        """The in-memory filter that spares most webhooks a journal read."""
        return self._seen

    async def _read(self, function: Callable[[], Any]) -> Any:
        self.journal_reads += 1
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._reads, function)
        except sqlite3.Error as exc:
            # A read that fails (an I/O error) is the journal being unavailable, not a bug.
            raise StoreUnavailable(f"journal read failed: {exc}") from None

    def _query(self, sql: str, parameters: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        assert self._reader is not None
        return self._reader.execute(sql, tuple(parameters)).fetchall()

    def _uncommitted(self, contact_id: str) -> dict[str, Assignment]:
        """The contact's recorded changes not committed yet, by segment (newest wins)."""
        found: dict[str, Assignment] = {}
        with self._lock:
            for work in (self._in_flight, self._pending):
                if work is None:
                    continue
                for segment in work.contacts.get(contact_id, ()):
                    row = work.assignments[(contact_id, segment)]
                    found[segment] = assignment_from_row((*row[:8], "", row[8], row[9]))
        return found

    async def contact(self, contact_id: str) -> list[Assignment]:
        """The contact's assignments as recorded, committed or not.

        A mirror (`set`) compares with these: a change recorded a moment ago by a concurrent
        request must be seen though its transaction has not committed yet.
        """
        before = self._uncommitted(contact_id)
        rows = await self._read(lambda: self._query(_CONTACT, (contact_id,)))
        merged = {row[1]: assignment_from_row(row) for row in rows}
        merge_newer(merged, before)
        merged.update(self._uncommitted(contact_id))
        return [merged[segment] for segment in sorted(merged)]

    async def histories(self, contact_ids: Sequence[str]) -> dict[str, ContactHistory]:
        """Each contact's assignments and newest mirror time, committed or not, in one read.

        The intake of a batch (a HubSpot delivery holds 100 contacts) asks once for all of
        them, rather than once per contact and per table.
        """
        wanted = list(dict.fromkeys(contact_ids))
        before = {c: (self._uncommitted(c), self._uncommitted_mirror(c)) for c in wanted}

        def read() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            rows: list[tuple[Any, ...]] = []
            mirrors: list[tuple[Any, ...]] = []
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows += self._query(f"{_CONTACTS} IN ({marks})", chunk)
                mirrors += self._query(f"{MIRROR_TIMES} WHERE contact_id IN ({marks})", chunk)
            return rows, mirrors

        rows, mirrors = await self._read(read)
        return assemble_histories(
            wanted,
            [assignment_from_row(row) for row in rows],
            {str(c): float(at) for c, at in mirrors},
            before,
            lambda c: (self._uncommitted(c), self._uncommitted_mirror(c)),
        )

    async def failed(
        self,
        limit: int = 1000,
        *,
        reason: FailureReason | None = None,
        segment_id: str | None = None,
    ) -> list[Assignment]:
        """Dead letters, oldest first; of `reason` and `segment_id` when given (`failed_query`)."""
        sql, parameters = failed_query(limit, reason, segment_id)
        query = render(sql, Dialect.SQLITE)
        rows = await self._read(lambda: self._query(query, parameters))
        return [assignment_from_row(row) for row in rows]

    async def counts(self) -> dict[str, int]:
        """Retained assignments per state."""
        rows = await self._read(lambda: self._query(COUNTS))
        return {str(state): int(count) for state, count in rows}

    async def delivery(self, source: str, delivery_id: str) -> bytes | None:
        """The answer to an earlier delivery, if retained (queued ones count too).

        A new delivery is almost always told apart in memory, by the delivery filter; only
        a key the filter may hold costs a read of the journal.
        """
        key = (source, delivery_id)
        answer = self._unconfirmed.get(key)
        if answer is not None:
            return answer
        if not self._seen.may_contain(key):
            return None
        for _ in range(LOOKUP_READS):
            settled = self._deliveries_settled
            rows = await self._read(
                lambda: self._query(
                    "SELECT answer FROM deliveries WHERE source = ? AND delivery_id = ?",
                    (source, delivery_id),
                )
            )
            if rows:
                return bytes(rows[0][0])
            # The same delivery may have been taken while we read: its answer is the one that
            # will be journaled (the caller remembers its own without another wait).
            answer = self._unconfirmed.get(key)
            if answer is not None or self._deliveries_settled == settled:
                return answer
            # Deliveries were committed while we read, and left `_unconfirmed`: this one may be
            # among them, committed after our read's snapshot. A new read sees it.
        # Commits overlapped every read (a slow disk under load). The second read already began
        # after any commit the first one missed, so only a delivery taken since our first check
        # can still hide: then the sender gets a fresh answer, and its assignments join those
        # already pending, so no write is doubled.
        return self._unconfirmed.get(key)

    # ---- the delivery filter -------------------------------------------------------------------

    def _build_filter(self) -> None:
        """Start building the delivery filter from the journal, in the background."""
        # Keys not committed yet are missing from the snapshot the build reads: collect them.
        self._seen.begin_build(self._unconfirmed)
        self._filter_task = asyncio.get_running_loop().create_task(self._run_filter_build())

    async def _run_filter_build(self) -> None:
        try:
            # On a thread and connection of its own: a scan of millions of keys must not hold
            # up the lookups and status reads queued on the read thread meanwhile.
            built, capacity, journaled = await asyncio.to_thread(self._load_delivery_keys)
        except asyncio.CancelledError:
            self._seen.abandon_build()
            raise
        except (sqlite3.Error, MemoryError) as exc:
            self._seen.abandon_build()
            self._filter_failed_at = time.monotonic()
            log.warning(
                "journal %s: delivery filter not built (%s); redeliveries are looked up in "
                "the journal meanwhile",
                self.path,
                exc,
            )
            return
        self._seen.finish_build(built, capacity, journaled)
        log.debug("journal %s: delivery filter built from %d deliveries", self.path, journaled)

    def _load_delivery_keys(self) -> tuple[Bloom, int, int]:
        """Worker thread: a filter of every journaled delivery key, its capacity and key count."""
        connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            connection.execute("BEGIN")  # one snapshot for the count and the keys
            journaled = connection.execute("SELECT count(*) FROM deliveries").fetchone()[0]
            capacity = capacity_for(journaled, self._filter_min_capacity)
            bloom = new_bloom(capacity)
            # Rows are (source, delivery_id) tuples: the same keys (and hashes) as DeliveryKey.
            bloom.update(connection.execute("SELECT source, delivery_id FROM deliveries"))
        finally:
            connection.close()
        return bloom, capacity, journaled

    # ---- validation state and notifications, write-through ------------------------------------

    def next_allowed(self, segment_id: str) -> float:
        """RefreshBudget: when the segment may be refreshed next."""
        return self._refresh.get(segment_id, 0.0)

    def spend(self, segment_id: str, at: float, next_allowed: float) -> None:
        """RefreshBudget: record when the next refresh is allowed; committed with the next flush."""
        self._refresh[segment_id] = next_allowed
        with self._lock:
            self._pending.budget[segment_id] = next_allowed
            self._nudge()

    async def try_spend(self, segment_id: str, now: float, next_allowed: float) -> float:
        """RefreshBudget: spend and commit before the refresh is sent; 0.0, or when allowed.

        A refresh sent with its spend only queued, then a crash, would be sent again after the
        restart and answered 429. StoreUnavailable (the commit failed) means: do not send.
        """
        allowed = self._refresh.get(segment_id, 0.0)
        if allowed > now:
            return allowed
        self.spend(segment_id, now, next_allowed)
        try:
            await self.flush()
        except StoreUnavailable:
            # Not sent, so not spent: a journal blip must not cost the segment its refresh for
            # an hour. The pending value is put back too, in case it is committed later.
            self.spend(segment_id, now, allowed)
            raise
        return 0.0

    def remember_confirmation(
        self, contact_id: str, segment_id: str, at: float, member: bool = True
    ) -> None:
        """Persist a validation-cache entry: what was confirmed (member or not), and when."""
        with self._lock:
            self._pending.confirmations[(contact_id, segment_id)] = (at, member)
            self._nudge()

    def record_stale(
        self, contact_id: str, segment_id: str, intent: str, occurred_at: float, at: float
    ) -> None:
        """Journal a change that arrived older than the one in progress (it costs no call)."""
        with self._lock:
            self._pending.stale.append((contact_id, segment_id, intent, occurred_at, at))
            self._nudge()

    def record_mirror(self, contact_id: str, occurred_at: float) -> None:
        """Journal the time of a mirror applied to the contact (the newest is kept)."""
        with self._lock:
            earlier = self._pending.mirrors.get(contact_id)
            if earlier is None or occurred_at > earlier[0]:
                self._pending.mirrors[contact_id] = (occurred_at, self._clock())
            self._nudge()

    def _uncommitted_mirror(self, contact_id: str) -> float:
        newest = 0.0
        with self._lock:
            for work in (self._in_flight, self._pending):
                if work is not None and contact_id in work.mirrors:
                    newest = max(newest, work.mirrors[contact_id][0])
        return newest

    def add(self, event_id: str, body: bytes) -> None:
        """NotificationJournal: an event to deliver."""
        self._notifications[event_id] = body
        with self._lock:
            self._pending.notifications_added[event_id] = (body, self._clock())
            self._pending.notifications_done.discard(event_id)
            self._nudge()

    def done(self, event_id: str) -> None:
        """NotificationJournal: the event was delivered (or dropped for good)."""
        self._notifications.pop(event_id, None)
        with self._lock:
            if self._pending.notifications_added.pop(event_id, None) is None:
                self._pending.notifications_done.add(event_id)
            self._nudge()

    def pending(self) -> list[tuple[str, bytes]]:
        """NotificationJournal: events not yet delivered."""
        return list(self._notifications.items())

    # ---- the writer thread --------------------------------------------------------------------

    def _nudge(self) -> None:
        """Wake the writer if it sleeps; the caller holds the lock and has queued a change."""
        if self._writer_idle:
            self._writer_idle = False
            self._wake.notify()

    def _write_loop(self) -> None:
        carry = PendingWork()  # changes of a failed transaction, retried first
        while True:
            with self._lock:
                while self._pending.empty() and not self._pending.waiters and carry.empty():
                    if self._closing:
                        return
                    self._writer_idle = True
                    woken = self._wake.wait(timeout=60.0)
                    self._writer_idle = False
                    if not woken:
                        break  # idle for a minute: a chance to prune
                work, self._pending = self._pending, PendingWork()
                closing = self._closing
            if not carry.empty():
                # A failed transaction's changes go first; later ones are merged onto them.
                carry.absorb(work)
                work, carry = carry, PendingWork()
            with self._lock:
                self._in_flight = work
            try:
                self._commit(work)
            except sqlite3.Error as exc:
                self._failed(work, exc)
                work.waiters = []
                carry = work
                if closing:
                    log.error(
                        "journal %s: closing with %d uncommitted changes",
                        self.path,
                        len(work.assignments),
                    )
                    return
                time.sleep(RETRY_AFTER_FAILURE_S)
                continue
            with self._lock:
                self._in_flight = None
            if self.last_error:
                log.warning("journal %s: commits work again", self.path)
                self.last_error = ""
            self._resolve(work.waiters, None, list(work.deliveries))
            self._maybe_prune()

    def _commit(self, work: PendingWork) -> None:
        connection = self._writer
        assert connection is not None
        if work.empty():
            return
        connection.execute("BEGIN IMMEDIATE")
        try:
            self._apply(connection, work)
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        self.commits += 1

    def _apply(self, connection: sqlite3.Connection, work: PendingWork) -> None:
        for write, rows in work.writes(self._clock()):
            if write is ASSIGNMENTS:
                _UPSERT_ASSIGNMENTS.run(connection, rows)
            elif write is DELIVERIES:
                _INSERT_DELIVERIES.run(connection, rows)
            else:
                connection.executemany(_WRITES[write], rows)

    def _failed(self, work: PendingWork, exc: sqlite3.Error) -> None:
        message = f"journal {self.path}: commit failed: {exc}"
        if message != self.last_error:
            log.error("%s; keeping %d changes queued and retrying", message, len(work.assignments))
        self.last_error = message
        self._resolve(work.waiters, StoreUnavailable(str(exc)))

    def _resolve(
        self,
        waiters: list[asyncio.Future[None]],
        error: Exception | None,
        committed_deliveries: list[DeliveryKey] | None = None,
    ) -> None:
        """On the loop: settle the waiters; forget the answers of deliveries now committed."""
        loop = self._loop
        if loop is None or not (waiters or committed_deliveries) or loop.is_closed():
            return

        def settle() -> None:
            if committed_deliveries:
                self._deliveries_settled += 1
            for key in committed_deliveries or ():
                self._unconfirmed.pop(key, None)
            for waiter in waiters:
                if waiter.done():
                    continue
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle)

    def _maybe_prune(self) -> None:
        now = self._clock()
        if now - self._last_prune < 3600:
            return
        self._last_prune = now
        horizon = now - self.retention_s
        connection = self._writer
        assert connection is not None
        try:
            connection.execute("BEGIN IMMEDIATE")
            finished, *expired = _PRUNE
            pruned = connection.execute(finished, (horizon,)).rowcount
            for statement in expired:
                connection.execute(statement, (horizon,))
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            log.warning("journal %s: pruning failed: %s", self.path, exc)
            return
        if pruned:
            log.info("journal %s: pruned %d finished assignments past retention", self.path, pruned)

    # ---- recovery -------------------------------------------------------------------------------

    def _load_recovery(self) -> Recovered:
        recovered = Recovered()
        # Already (str, str, float, str, float) as stored: no per-row conversion for the biggest
        # list.
        recovered.queued = self._query(QUEUED)
        recovered.assignments = [assignment_from_row(row) for row in self._query(UNFINISHED)]
        recovered.batches = [batch_from_row(row) for row in self._query(SAVED_BATCHES)]
        recovered.refresh_budget = dict(self._query(REFRESH_TIMES))
        recovered.confirmations = [confirmation_from_row(row) for row in self._query(CONFIRMED)]
        recovered.notifications = [
            (str(e), bytes(body))
            for e, body in self._query("SELECT event_id, body FROM notifications ORDER BY added_at")
        ]
        return recovered
