"""The durable journal: one SQLite file in WAL mode, written by one thread with group commit.

A write-behind journal (daemon/store/write_behind.py): every change the engine records goes
into an in-memory queue at once (no I/O on the event loop). A writer thread takes everything
queued, applies it in one transaction and commits; `flush()` returns once everything recorded
before it is committed, so concurrent webhooks share one fsync. When a commit fails (disk full,
read-only file system), nothing is dropped: the changes stay queued and are retried, `flush()`
raises `StoreUnavailable` meanwhile, and the store recovers by itself when the disk does. Reads
run on a thread of their own, on a connection of their own.
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
from functools import partial
from pathlib import Path
from typing import Any, Literal

from rbloom import Bloom

from daemon.store import sql
from daemon.store.base import Recovered, StoreOpenError
from daemon.store.delivery_filter import (
    MIN_CAPACITY,
    DeliveryFilter,
    DeliveryKey,
    capacity_for,
    new_bloom,
)
from daemon.store.pending import PendingWork
from daemon.store.write_behind import WriteBehindJournal
from scheduler.store import StoreUnavailable

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
MIGRATIONS: list[str] = [sql.render(step, sql.Dialect.SQLITE) for step in sql.SCHEMA]

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


# The journal's two hot statements (also what bench.ingest's journaled floor writes with).
UPSERT_ASSIGNMENTS = _MultiRowInsert(
    sql.ASSIGNMENTS.head, len(sql.ASSIGNMENTS.columns), sql.ASSIGNMENTS.tail(sql.Dialect.SQLITE)
)
# Answers are bytes, bound (and stored) as BLOBs, as the deliveries' bodies were.
INSERT_DELIVERIES = _MultiRowInsert(
    sql.DELIVERIES.head, len(sql.DELIVERIES.columns), sql.DELIVERIES.tail(sql.Dialect.SQLITE)
)
# Every other write, one row per execution.
_WRITES = {write: write.sqlite() for write in sql.WRITES}
_CONTACTS = f"SELECT {sql.ASSIGNMENT_COLUMNS} FROM assignments WHERE contact_id"  # noqa: S608
_PRUNE = [sql.render(text, sql.Dialect.SQLITE) for text in (sql.PRUNE_FINISHED, *sql.PRUNE_EXPIRED)]


class SqliteStore(WriteBehindJournal):
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
        super().__init__(shown=path, retention_s=retention_s, clock=clock)
        self.path = path
        self.synchronous = synchronous
        self._wake = threading.Condition(self._lock)
        # Whether the writer sleeps on `_wake`. Only then does a change need a notify() (Python
        # code, on the hot path): a change queued while the writer commits is seen when it loops.
        self._writer_idle = False
        # The writer takes what is queued once the event loop's turn that queued it has ended
        # (`_turn_ended`), not at the first change: a turn takes every request that arrived
        # together up to its flush, and a commit taken in the middle of one held the rows of a
        # request but not its flush, which then waited for a second commit. (The thread may
        # still take a later turn's first changes before that turn ends: the gate is let go by
        # the turn before. Then a request waits for two commits, as all did before.)
        self._turn_ending = False  # a `_turn_ended` callback is scheduled on the loop
        self._turn_queued = False  # a turn that queued changes has ended since the last take
        self._loop_thread: int | None = None
        self._file_lock = JournalLock(path)
        self._closing = False
        # Set when the writer thread stopped on an error that is not the database's.
        self._writer_stopped: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-read")
        # Commits whose deliveries left `_unconfirmed`: a lookup whose read overlapped one reads
        # again, since its snapshot may predate the commit.
        self._deliveries_settled = 0
        # A filter of the committed deliveries' keys (those not committed are `_unconfirmed`).
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
        self._loop_thread = threading.get_ident()
        self._turn_ending = False
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

    # ---- writes -------------------------------------------------------------------------------

    async def remember_delivery(self, source: str, delivery_id: str, answer: bytes) -> None:
        """Queue the delivery's answer; committed with the webhook's flush."""
        await super().remember_delivery(source, delivery_id, answer)
        self._seen.add((source, delivery_id))
        if self._seen.needs_build() and time.monotonic() - self._filter_failed_at > FILTER_RETRY_S:
            self._build_filter()

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

    def _query(self, statement: str, parameters: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        assert self._reader is not None
        return self._reader.execute(statement, tuple(parameters)).fetchall()

    async def _select(self, statement: str, *arguments: Any) -> list[tuple[Any, ...]]:
        text = sql.rendered(statement, sql.Dialect.SQLITE)
        rows: list[tuple[Any, ...]] = await self._read(lambda: self._query(text, arguments))
        return rows

    async def _read_histories(
        self, contact_ids: list[str]
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        def read() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            rows: list[tuple[Any, ...]] = []
            mirrors: list[tuple[Any, ...]] = []
            for start in range(0, len(contact_ids), _IN_CHUNK):
                chunk = contact_ids[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows += self._query(f"{_CONTACTS} IN ({marks})", chunk)
                mirrors += self._query(f"{sql.MIRROR_TIMES} WHERE contact_id IN ({marks})", chunk)
            return rows, mirrors

        found: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]] = await self._read(read)
        return found

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

    # ---- the refresh budget ---------------------------------------------------------------------

    async def try_spend(self, segment_id: str, now: float, next_allowed: float) -> float:
        """Spend and commit before the refresh is sent; 0.0, or when it will be allowed.

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

    # ---- the writer thread --------------------------------------------------------------------

    def _nudge(self) -> None:
        """Let the writer take the change once this turn of the loop ends (the lock is held)."""
        loop = self._loop
        if loop is None or threading.get_ident() != self._loop_thread or not loop.is_running():
            # Not queued from the running loop's thread (a test's, or the loop is gone): at once.
            self._release_queued()
        elif not self._turn_ending:
            self._turn_ending = True
            loop.call_soon(self._turn_ended)

    def _turn_ended(self) -> None:
        """On the loop, after the turn that queued changes: the writer may take them."""
        with self._lock:
            self._turn_ending = False
            self._release_queued()

    def _release_queued(self) -> None:
        """What is queued may be taken; wake the writer if it sleeps (the lock is held)."""
        self._turn_queued = True
        if self._writer_idle:
            self._writer_idle = False
            self._wake.notify()

    def _may_take(self) -> bool:
        """Whether the writer is to commit now (the lock is held).

        What a turn of the loop queued, once the turn ended; what failed to commit, on every
        try; and, once closing, whatever is left.
        """
        if not self._has_work():
            # Taken already (by a take after a later change): the next change waits for its turn.
            self._turn_queued = False
            return False
        return self._turn_queued or self._closing or not self._carry.empty()

    def _writer_problem(self) -> str | None:
        if self._thread is None:
            return "the journal is not open"
        # Else a flush would wait for a commit that nothing will ever make.
        return self._writer_stopped

    def _on_loop(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(callback)

    def _flush_error(self, message: str, exc: BaseException) -> StoreUnavailable:
        # The driver's words alone: the answer a webhook gets need not name the journal's path.
        return StoreUnavailable(str(exc))

    def _deliveries_committed(self, keys: list[DeliveryKey]) -> None:
        self._deliveries_settled += 1
        super()._deliveries_committed(keys)

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._may_take():
                    if self._closing:
                        return
                    self._writer_idle = True
                    woken = self._wake.wait(timeout=60.0)
                    self._writer_idle = False
                    if not woken:
                        break  # idle for a minute: a chance to prune
                self._turn_queued = False
                work = self._take_work()
                closing = self._closing
            try:
                self._commit(work)
            except sqlite3.Error as exc:
                self._commit_failed(work, exc)
                if closing:
                    log.error(
                        "journal %s: closing with %d uncommitted changes",
                        self.path,
                        len(work.assignments),
                    )
                    return
                time.sleep(RETRY_AFTER_FAILURE_S)
                continue
            except Exception as exc:
                # Not the database's error (a bug, memory): this thread cannot go on. Fail the
                # waiting commits now, and every later flush says so (`_writer_problem`),
                # rather than leave webhooks waiting for an answer that never comes.
                log.critical("journal %s: the writer thread stopped: %r", self.path, exc)
                with self._lock:
                    self._writer_stopped = f"the journal's writer thread stopped: {exc!r}"
                    stranded = self._pending.waiters
                    self._pending.waiters = []
                self._commit_failed(work, exc)
                error = StoreUnavailable(self._writer_stopped)
                self._on_loop(partial(self._settle, stranded, [], error))
                return
            self._committed(work)
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
            if write is sql.ASSIGNMENTS:
                UPSERT_ASSIGNMENTS.run(connection, rows)
            elif write is sql.DELIVERIES:
                INSERT_DELIVERIES.run(connection, rows)
            else:
                connection.executemany(_WRITES[write], rows)

    def _maybe_prune(self) -> None:
        if not self._prune_due():
            return
        horizon = self._last_prune - self.retention_s
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
        # Already (contact, segment, received, intent, occurred, lane) as stored: no per-row
        # conversion for the biggest list.
        recovered.queued = self._query(sql.QUEUED)
        recovered.assignments = [
            sql.assignment_from_row(row) for row in self._query(sql.UNFINISHED)
        ]
        recovered.batches = [sql.batch_from_row(row) for row in self._query(sql.SAVED_BATCHES)]
        recovered.refresh_budget = dict(self._query(sql.REFRESH_TIMES))
        recovered.confirmations = [
            sql.confirmation_from_row(row) for row in self._query(sql.CONFIRMED)
        ]
        recovered.notifications = [
            (str(e), bytes(body))
            for e, body in self._query("SELECT event_id, body FROM notifications ORDER BY added_at")
        ]
        return recovered
