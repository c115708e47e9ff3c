"""The journal on PostgreSQL (`store.url = "postgresql://user@host:port/db"`), with group commit.

A write-behind journal (daemon/store/write_behind.py), as the SQLite one: every change is
queued in memory at once, and one background task commits everything queued in ONE
transaction, each table's rows in one array-valued statement (daemon/store/sql.py). While the
database cannot commit (down, unreachable, restarting) nothing is dropped: the changes stay
queued and are retried with backoff, `flush()` and `check_writable()` raise `StoreUnavailable`
meanwhile, and the store carries on by itself when the database is back (the pool reconnects).

Commits are as durable as the server's `synchronous_commit` makes them (never overridden here;
with synchronous replication a commit also waits for the standby).

A delivery claim and a refresh spend are single atomic statements, committed before they
return, so that several processes on one database never take the same key or refresh twice.
Schema migrations run under a transaction-level advisory lock: instances that start together
migrate once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from daemon.config import display_url
from daemon.store import sql
from daemon.store.base import (
    ClusterStatus,
    InstanceStatus,
    Leases,
    Recovered,
    ShardStatus,
    SharedJournal,
    StoreOpenError,
    StoreUnreachable,
)
from daemon.store.delivery_filter import DeliveryKey
from daemon.store.leases import ShardLeases
from daemon.store.pending import (
    InboxRow,
    PendingWork,
)
from daemon.store.pg_common import (
    CONNECT_TIMEOUT_S,
    FENCED,
    IDLE_IN_TRANSACTION_MS,
    UNAVAILABLE,
    Connection,
    describe,
    fence_sql,
)
from daemon.store.shards import shard_of
from daemon.store.shared_gate import SharedRateGate
from daemon.store.write_behind import PRUNE_INTERVAL_S, WriteBehindJournal
from scheduler.ownership import ForwardedChange
from scheduler.ratelimit import AdmissionGate
from scheduler.store import StoreUnavailable

log = logging.getLogger(__name__)

__all__ = ["MIGRATIONS", "PostgresStore"]

#: How long close() waits for its last commit before closing the pool anyway.
CLOSE_FLUSH_TIMEOUT_S = 5.0
#: A statement running longer fails (and is retried): a partitioned network must not hold a
#: commit, and every webhook waiting on it, forever.
COMMAND_TIMEOUT_S = 15.0
#: Backoff between attempts to commit while the database fails: from the first to the last.
RETRY_FIRST_S = 0.25
RETRY_MOST_S = 2.0
#: Connections per process: the writer's, and a few for concurrent reads and atomic steps.
POOL_MAX = 6
#: Delivery keys committed lately, kept in memory (see `PostgresStore.delivery`).
RECENT_DELIVERIES = 200_000
#: An arbitrary constant, the key of the advisory lock migrations hold ("SGMP" in hex).
MIGRATION_LOCK = 0x53474D50

# Answers from a running server that a retry will not change: wrong role or password, no such
# database, no privilege. At start-up they are configuration errors, not an outage.
_REFUSED = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InsufficientPrivilegeError,
)


MIGRATIONS: list[str] = [
    # 1: the journal as the SQLite one has it after its migration 4: the same tables and
    # columns, and an index of the validation cache by time, for pruning.
    sql.render("".join(sql.SCHEMA[:4]), sql.Dialect.POSTGRESQL)
    + "CREATE INDEX confirmations_by_time ON confirmations (confirmed_at);",
    # 2: who holds the instance lock (InstanceGuard), for the message a second instance gets,
    # and the epoch every commit checks, so that an instance that lost the lock without
    # noticing (its connection dropped silently) can write nothing after another took it.
    """
    CREATE TABLE segmapd_holder (
        id     INTEGER PRIMARY KEY CHECK (id = 1),
        holder TEXT NOT NULL,
        since  TIMESTAMPTZ NOT NULL,
        epoch  BIGINT NOT NULL
    );
    """,
    # 3: several instances (daemon/cluster.py). Live instances and their heartbeats; the 64
    # shards segments hash onto, each leased by one instance (epoch: raised at every change of
    # owner); the inbox of changes forwarded to a shard's owner; the shared rate gates; who
    # delivers each notification. The single-instance lock of migration 2 is replaced.
    """
    DROP TABLE segmapd_holder;
    CREATE TABLE segmapd_instances (
        id           BIGSERIAL PRIMARY KEY,
        name         TEXT NOT NULL,
        started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
        heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE segmapd_shards (
        shard       INTEGER PRIMARY KEY,
        owner       BIGINT,
        epoch       BIGINT NOT NULL DEFAULT 0,
        lease_until TIMESTAMPTZ NOT NULL DEFAULT '-infinity'
    );
    INSERT INTO segmapd_shards (shard) SELECT generate_series(0, 63);
    INSERT INTO journal_info VALUES ('shards', '64');
    CREATE TABLE segmapd_inbox (
        id          BIGSERIAL PRIMARY KEY,
        shard       INTEGER NOT NULL,
        contact_id  TEXT NOT NULL,
        segment_id  TEXT NOT NULL,
        intent      TEXT NOT NULL,
        occurred_at DOUBLE PRECISION NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        reason      TEXT,
        message     TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX segmapd_inbox_by_shard ON segmapd_inbox (shard, id);
    CREATE INDEX segmapd_inbox_by_contact ON segmapd_inbox (contact_id);
    CREATE TABLE segmapd_gates (
        name         TEXT PRIMARY KEY,
        tat          DOUBLE PRECISION NOT NULL DEFAULT 0,
        paused_until DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    ALTER TABLE notifications ADD COLUMN claimed_until DOUBLE PRECISION NOT NULL DEFAULT 0;
    ALTER TABLE notifications ADD COLUMN claimed_by BIGINT;
    """,
    # 4: live changes first (issue 21): the assignments' lane (`sql.SCHEMA`'s fifth step), and
    # a forwarded change's, which its owner keeps.
    sql.render(sql.SCHEMA[4], sql.Dialect.POSTGRESQL)
    + "ALTER TABLE segmapd_inbox ADD COLUMN lane TEXT NOT NULL DEFAULT 'live';",
    # 5: drift reconcile (`sql.SCHEMA`'s sixth step), and a forwarded change that repairs a
    # drift, which its owner queues again though its validation cache says otherwise.
    sql.render(sql.SCHEMA[5], sql.Dialect.POSTGRESQL)
    + "ALTER TABLE segmapd_inbox ADD COLUMN repair BOOLEAN NOT NULL DEFAULT false;",
    # 6: the assignments' source and the dead letters' partial indexes (`sql.SCHEMA`'s seventh
    # step), and a forwarded change's source, which its owner journals.
    sql.render(sql.SCHEMA[6], sql.Dialect.POSTGRESQL)
    + "ALTER TABLE segmapd_inbox ADD COLUMN source TEXT NOT NULL DEFAULT '';",
]


# The version table: one row per migration applied, so that a migration applied twice (two
# instances migrating at once without the lock) would fail on the primary key, not pass.
_SCHEMA_TABLE = """
    CREATE TABLE IF NOT EXISTS segmapd_schema (
        version    INTEGER PRIMARY KEY,
        applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
"""

# Every row of a table at once, one array per column: a transaction never waits for the client
# in the middle of a statement (as executemany's pipeline does), so that a process paused
# mid-commit is seen idle in its transaction, and ended by the server.
_WRITES = {write: write.postgres() for write in sql.WRITES}
# The first answer to a key is the one kept; an empty answer is a claim in progress
# (`claim_keys`), which the answer replaces.
_WRITES[sql.DELIVERIES] = dataclasses.replace(
    sql.DELIVERIES,
    conflict="ON CONFLICT (source, delivery_id) DO UPDATE SET answer = excluded.answer, "
    "received_at = excluded.received_at WHERE deliveries.answer = ''::bytea",
).postgres()
# A notification added is its adder's to deliver, claimed for NOTIFICATION_CLAIM_S ($4) by this
# instance ($5).
_ADD_NOTIFICATIONS = (
    "INSERT INTO notifications (event_id, body, added_at, claimed_until, claimed_by) "
    "SELECT e, b, a, extract(epoch FROM clock_timestamp()) + $4, $5::int8 "
    "FROM unnest($1::text[], $2::bytea[], $3::float8[]) AS n(e, b, a) "
    "ON CONFLICT (event_id) DO UPDATE "
    "SET body = excluded.body, added_at = excluded.added_at, "
    "claimed_until = excluded.claimed_until, claimed_by = excluded.claimed_by"
)
_PRUNE = [sql.PRUNE_FINISHED, *sql.PRUNE_EXPIRED]
# Changes forwarded to their segment's owner and not taken yet, of one contact.
_FORWARDED = (
    "SELECT segment_id, intent, occurred_at, received_at, lane FROM segmapd_inbox "
    "WHERE contact_id = $1 AND reason IS NULL ORDER BY id"
)
_CONTACTS = f"{sql.CONTACT.removesuffix(' = $1')} = ANY($1::text[])"
_MIRRORS = f"{sql.MIRROR_TIMES} WHERE contact_id = ANY($1::text[])"
_SEGMENTS = " AND segment_id = ANY($1::text[])"
# The cluster as the console shows it: members and leases, times as Unix seconds.
_INSTANCES = (
    "SELECT id, name, extract(epoch FROM started_at)::float8, "
    "extract(epoch FROM heartbeat_at)::float8, "
    "extract(epoch FROM now() - heartbeat_at)::float8 FROM segmapd_instances ORDER BY id"
)
_SHARDS = (
    "SELECT shard, owner, epoch, CASE WHEN lease_until = '-infinity' THEN NULL "
    "ELSE extract(epoch FROM lease_until - now())::float8 END FROM segmapd_shards ORDER BY shard"
)
# Forwarded changes not taken yet are queued work too, in the inbox.
_COUNTS = (
    f"{sql.COUNTS} UNION ALL SELECT 'queued', count(*) FROM segmapd_inbox WHERE reason IS NULL"  # noqa: S608
)
_IN_SEGMENTS = " WHERE segment_id = ANY($1::text[])"
# Claims of keys by a delivery being taken now, before its work is journaled: another instance
# finds the key claimed and waits for the answer. A claim its taker never answered (it died
# between claim and commit) is taken over once it is CLAIM_TTL_S old. Returns the keys taken.
_CLAIM_KEYS = """
    INSERT INTO deliveries (source, delivery_id, answer, received_at)
    SELECT k.source, k.delivery_id, ''::bytea, extract(epoch FROM clock_timestamp())
    FROM unnest($1::text[], $2::text[]) AS k(source, delivery_id)
    ON CONFLICT (source, delivery_id) DO UPDATE SET received_at = excluded.received_at
    WHERE deliveries.answer = ''::bytea AND deliveries.received_at < excluded.received_at - $3
    RETURNING source, delivery_id
"""
# A claim not answered within this long is its taker's failure: another delivery may take it.
CLAIM_TTL_S = 30.0
# A notification is its deliverer's for this long; then any instance may claim it (the
# deliverer died, or is still retrying: delivery is at least once).
NOTIFICATION_CLAIM_S = 120.0

_T = TypeVar("_T")


class PostgresStore(WriteBehindJournal, SharedJournal):
    """The journal behind `store.url = "postgresql://user@host:port/database"`.

    `password` is the role's (from `store.password` / `password_file`), kept out of the URL
    and out of every repr, log line and error message: those show `display_url(url)`.
    """

    def __init__(
        self,
        url: str,
        *,
        password: str = "",
        retention_s: float = 7 * 86_400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(shown=display_url(url), retention_s=retention_s, clock=clock)
        self.url = url
        self._password = password
        self._pool: asyncpg.Pool | None = None
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._committing = False
        # Set by `discard_pending` while a commit is under way: if it fails, it is not retried.
        self._discarded = False
        self._closing = False
        self._closed = False
        self._pruning: asyncio.Task[None] | None = None
        # Claims of deliveries dropped by a fence, to withdraw (see `_drop_deliveries`).
        self._abandoned_claims: set[tuple[str, str]] = set()
        # Delivery keys committed lately, oldest first: a lookup that read before their commit
        # finds them here.
        self._recent: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        # Claims of delivery keys: committed without waiting for the WAL (see `claim_keys`).
        self._claim_pool: asyncpg.Pool | None = None
        self._claim_queue: list[
            tuple[list[tuple[str, str]], asyncio.Future[set[tuple[str, str]]]]
        ] = []
        self._claimer: asyncio.Task[None] | None = None
        # Set by the cluster membership (daemon/cluster.py) once this instance has joined: every
        # commit then checks that the instance is still a member (`fence_sql`), and rows of
        # segments it no longer holds are left out (`holds`, see `_leave_out_unheld`).
        self.instance_id: int | None = None
        self.holds: Callable[[str], bool] | None = None
        self.holds_shard: Callable[[int], bool] = lambda shard: True
        self.on_fenced: Callable[[], None] | None = None
        self._leases: list[Leases] = []

    def as_shared(self) -> PostgresStore:
        """The journal itself: several instances share it."""
        return self

    def leases(self, lease_s: float, name: str) -> Leases:
        """The instance's membership and shard leases on the database."""
        leases = ShardLeases(self, lease_s, name)
        self._leases.append(leases)  # their connections close with the journal
        return leases

    def pool(self) -> asyncpg.Pool | None:
        """The connection pool while the journal is open (for the cluster's own statements)."""
        return None if self._closed else self._pool

    async def connect(self) -> asyncpg.Connection:
        """A connection of its own (not pooled), for a session that must last: LISTEN."""
        return await asyncpg.connect(
            self.url,
            password=self._password or None,
            timeout=CONNECT_TIMEOUT_S,
            # As the pool's: a process paused in a transaction must not hold its locks.
            server_settings={"idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION_MS},
        )

    def rate_gate(
        self, name: str, rate_per_s: float, *, tolerance_s: float | None = None
    ) -> AdmissionGate:
        """The endpoint class's gate: one budget in the database for every instance."""
        return SharedRateGate(name, rate_per_s, self.pool, tolerance_s=tolerance_s)

    def __repr__(self) -> str:
        return f"PostgresStore({self.shown!r})"

    # ---- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> Recovered:
        """Connect, migrate the schema (once, under a lock), start the writer, recover."""
        if self._pool is not None:
            raise StoreOpenError(f"{self.shown}: the journal is already open")
        try:
            pool = await asyncpg.create_pool(
                self.url,
                password=self._password or None,
                min_size=1,
                max_size=POOL_MAX,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
                reset=_keep_session,
                # A process paused in a transaction (SIGSTOP, a frozen VM) would hold its locks
                # and block the instance taking its shards over: the server ends it instead.
                server_settings={"idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION_MS},
            )
        except _REFUSED as exc:
            # The server answered: no restart will change its mind (exit 2, not retried).
            raise StoreOpenError(
                f"{self.shown}: PostgreSQL refused the connection ({describe(exc)}); check the "
                "role, store.password, the database name and pg_hba.conf"
            ) from None
        except UNAVAILABLE as exc:
            raise StoreUnreachable(
                f"{self.shown}: cannot connect to PostgreSQL ({describe(exc)}); check that the "
                "server runs and accepts this role, and store.url / store.password"
            ) from None
        except ValueError as exc:  # a URL the driver cannot parse
            raise StoreOpenError(f"{self.shown}: not a usable PostgreSQL URL ({exc})") from None
        try:
            async with pool.acquire() as connection:
                await _migrate(connection, self.shown)
                recovered = await _load_shared_state(connection)
            self._claim_pool = await asyncpg.create_pool(
                self.url,
                password=self._password or None,
                min_size=1,
                max_size=4,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
                reset=_keep_session,
                # A claim lost in a crash is no loss: the answer that follows it is committed
                # durably, in the webhook's own transaction, and replaces the claim.
                server_settings={"synchronous_commit": "off"},
            )
        except StoreOpenError:
            await self._abandon(pool)
            raise
        except (*UNAVAILABLE, StoreUnavailable) as exc:
            await self._abandon(pool)
            raise StoreUnreachable(
                f"{self.shown}: cannot open the journal ({describe(exc)})"
            ) from None
        except BaseException:
            await self._abandon(pool)
            raise
        self._pool = pool
        self._closing = self._closed = False
        self._refresh = dict(recovered.refresh_budget)
        self._writer = asyncio.get_running_loop().create_task(
            self._write_loop(), name="journal-writer"
        )
        log.info("journal %s: open (its work is recovered shard by shard)", self.shown)
        return recovered

    async def _abandon(self, pool: asyncpg.Pool) -> None:
        """Undo a failed open(): the pools closed."""
        await _close_pool(pool)
        claim_pool, self._claim_pool = self._claim_pool, None
        if claim_pool is not None:
            await _close_pool(claim_pool)

    async def close(self) -> None:
        """Commit what is queued (within a bound), stop the writer, close the pool; idempotent."""
        if self._closed or self._pool is None:
            self._closed = True
            return
        self._closed = True
        with contextlib.suppress(StoreUnavailable, TimeoutError):
            await asyncio.wait_for(self.flush(), CLOSE_FLUSH_TIMEOUT_S)
        self._closing = True
        self._wake.set()
        writer = self._writer
        self._writer = None
        if writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(writer), CLOSE_FLUSH_TIMEOUT_S)
            except TimeoutError:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
        left = self._pending
        if self._in_flight is not None:
            left = self._in_flight
        if not left.empty():
            log.error(
                "journal %s: closing with %d uncommitted assignment changes",
                self.shown,
                len(left.assignments),
            )
        pruning, self._pruning = self._pruning, None
        if pruning is not None and not pruning.done():
            pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pruning
        for leases in self._leases:
            await leases.close()
        claimer, self._claimer = self._claimer, None
        if claimer is not None and not claimer.done():
            claimer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await claimer
        pool, self._pool = self._pool, None
        await _close_pool(pool)
        claim_pool, self._claim_pool = self._claim_pool, None
        if claim_pool is not None:
            await _close_pool(claim_pool)

    async def check_writable(self) -> None:
        """Raise StoreUnavailable while commits fail, or the database does not answer."""
        await super().check_writable()

        # With nothing queued a flush touches no database: ask the server itself, so that an
        # idle instance is not ready while its database is down.
        async def probe(connection: Connection) -> None:
            await connection.execute("SELECT 1", timeout=5.0)

        await self._with_connection(probe, "readiness probe")

    def discard_pending(self) -> int:
        """Drop every change not committed yet, failing its waiters; how many assignment changes.

        For an instance the others declared dead (daemon/cluster.py): nothing it queued can be
        committed any more under its membership, and the states it queued are superseded by
        the new owners', who recover its segments from what it did commit. None of it was
        acknowledged: a webhook is answered only once its commit is done, and that commit now
        fails. A commit already under way is not interrupted: it lands (the instance was still
        a member when it began) or fails, and is then not retried.
        """
        with self._lock:
            dropped = [self._pending, self._carry]
            if self._committing:
                self._discarded = True
            else:
                self._in_flight = None  # the failed transaction waiting for its retry: dropped
            self._pending, self._carry = PendingWork(), PendingWork()
        self.last_error = ""  # the dropped transaction's: the next commit tells
        failure = StoreUnavailable(
            f"journal {self.shown}: this instance was fenced; its uncommitted changes were dropped"
        )
        changes = 0
        for work in dropped:
            changes += len(work.assignments)
            self._drop_deliveries(work)
            for waiter in work.waiters:
                if not waiter.done():
                    waiter.set_exception(failure)
        self._wake.set()
        return changes

    def _drop_deliveries(self, work: PendingWork) -> None:
        """The deliveries of dropped work were never answered: a redelivery is taken anew.

        Not answered from memory as if journaled, and not held off by their claims, which are
        withdrawn before the next claim (`_claim_loop`).
        """
        for key in work.deliveries:
            self._unconfirmed.pop(key, None)
            self._abandoned_claims.add(key)

    # ---- writes -------------------------------------------------------------------------------

    def forward(self, change: ForwardedChange) -> None:
        """Queue a change for the owner of its segment's shard (committed with the webhook)."""
        row = (
            shard_of(change.segment_id),
            change.contact_id,
            change.segment_id,
            str(change.intent),
            change.occurred_at,
            change.received_at,
            str(change.reason) if change.reason is not None else None,
            change.message,
            str(change.lane),
            change.repair,
            change.source,
        )
        with self._lock:
            self._pending.inbox.append(row)
            self._nudge()

    def consume_inbox(self, rows: Sequence[tuple[int, int]]) -> None:
        """Queue the deletion of inbox rows, (id, shard), taken into this engine.

        Committed with the states they became, and only while their shard is held.
        """
        with self._lock:
            self._pending.inbox_done.update(rows)
            self._nudge()

    async def read_inbox(self, shards: Sequence[int], limit: int) -> list[tuple[int, InboxRow]]:
        """Committed inbox rows of these shards, oldest first: (id, row)."""
        rows = await self._fetch(
            "SELECT id, shard, contact_id, segment_id, intent, occurred_at, received_at, reason, "
            "message, lane, repair, source FROM segmapd_inbox WHERE shard = ANY($1::int4[]) "
            "ORDER BY id LIMIT $2",
            list(shards),
            limit,
        )
        return [
            (
                int(r[0]),
                (
                    int(r[1]),
                    r[2],
                    r[3],
                    r[4],
                    float(r[5]),
                    float(r[6]),
                    r[7],
                    r[8],
                    r[9],
                    bool(r[10]),
                    r[11],
                ),
            )
            for r in rows
        ]

    async def claim_keys(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Claim delivery keys for a delivery being taken; returns those another one holds.

        A key already answered, or claimed by a delivery still being taken (here or in another
        instance), is not taken. The claim is committed at once without waiting for the disk,
        so that another instance sees it; the answer, committed with the work, replaces it.
        Claims of concurrent deliveries share one statement (as their commits share one
        transaction): one round trip per webhook was half of what ingest cost.
        """
        if self._claim_pool is None or not keys:
            return set()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[set[tuple[str, str]]] = loop.create_future()
        self._claim_queue.append((list(dict.fromkeys(keys)), future))
        if self._claimer is None or self._claimer.done():
            self._claimer = loop.create_task(self._claim_loop(), name="journal-claims")
        return await future

    async def _claim_loop(self) -> None:
        while self._claim_queue:
            batch, self._claim_queue = self._claim_queue, []
            wanted = list(dict.fromkeys(key for keys, _ in batch for key in keys))
            pool = self._claim_pool
            try:
                if pool is None:
                    raise StoreUnavailable("the journal is not open")
                if self._abandoned_claims:
                    abandoned = list(self._abandoned_claims)
                    await self.unclaim_keys(abandoned)
                    self._abandoned_claims.difference_update(abandoned)
                rows = await pool.fetch(
                    _CLAIM_KEYS,
                    [source for source, _ in wanted],
                    [key for _, key in wanted],
                    CLAIM_TTL_S,
                    timeout=CONNECT_TIMEOUT_S,
                )
            except (*UNAVAILABLE, StoreUnavailable) as exc:
                failure = StoreUnavailable(
                    f"journal {self.shown}: claiming a delivery failed ({describe(exc)})"
                )
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                continue
            free = {(str(row[0]), str(row[1])) for row in rows}
            for keys, future in batch:
                mine = [key for key in keys if key in free]
                free.difference_update(mine)  # a key two of them asked for is the first's
                if not future.done():
                    future.set_result({key for key in keys if key not in mine})

    async def unclaim_keys(self, keys: Sequence[tuple[str, str]]) -> None:
        """Withdraw claims not answered (a copy that backs off for another instance's)."""
        pool = self._claim_pool
        if pool is None or not keys:
            return
        try:
            await pool.execute(
                "DELETE FROM deliveries d USING unnest($1::text[], $2::text[]) AS k(s, i) "
                "WHERE d.source = k.s AND d.delivery_id = k.i AND d.answer = ''::bytea",
                [source for source, _ in keys],
                [key for _, key in keys],
                timeout=CONNECT_TIMEOUT_S,
            )
        except UNAVAILABLE as exc:
            raise StoreUnavailable(
                f"journal {self.shown}: withdrawing claims failed ({describe(exc)})"
            ) from None

    async def claim_notifications(self, limit: int) -> list[tuple[str, bytes]]:
        """Notifications no instance is delivering (their deliverer died): claimed for this one.

        `FOR UPDATE SKIP LOCKED`: instances claiming at once take different rows.
        """
        rows = await self._fetch(
            "UPDATE notifications SET claimed_until = extract(epoch FROM clock_timestamp()) + $1, "
            "claimed_by = $3::int8 WHERE event_id IN (SELECT event_id FROM notifications n "
            "WHERE (n.claimed_until < extract(epoch FROM clock_timestamp()) OR NOT EXISTS "
            "(SELECT 1 FROM segmapd_instances i WHERE i.id = n.claimed_by)) "
            "AND ($3::int8 IS NULL OR n.claimed_by IS DISTINCT FROM $3::int8) "
            "ORDER BY added_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING event_id, body",
            NOTIFICATION_CLAIM_S,
            limit,
            self.instance_id,
        )
        found = [(str(e), bytes(body)) for e, body in rows]
        for event_id, body in found:
            self._notifications[event_id] = body
        return found

    async def load_segments(self, selected: Callable[[str], bool]) -> Recovered:
        """The unfinished work and the validation cache of the segments `selected` picks.

        What a shard's new owner takes back, exactly as a restart recovers the whole journal.
        """

        async def load(connection: Connection) -> Recovered:
            async with connection.transaction(isolation="repeatable_read", readonly=True):
                names = await connection.fetch(
                    "SELECT DISTINCT segment_id FROM assignments WHERE state IN "
                    "('queued', 'sending', 'retrying', 'written', 'verifying') "
                    "UNION SELECT DISTINCT segment_id FROM batches "
                    "UNION SELECT DISTINCT segment_id FROM confirmations"
                )
                segments = [str(row[0]) for row in names if selected(str(row[0]))]
                return await _load_recovery(connection, segments)

        return await self._with_connection(load, "recovery")

    async def try_spend(self, segment_id: str, now: float, next_allowed: float) -> float:
        """RefreshBudget: take the refresh in one committed UPDATE if allowed; 0.0, or when.

        StoreUnavailable (the database cannot commit) means: do not send.
        """
        in_flight = self._in_flight
        if segment_id in self._pending.budget or (
            in_flight is not None and segment_id in in_flight.budget
        ):
            # A spend (or a give-back) of this segment is queued: it goes first, in order.
            await self.flush()

        async def take(connection: Connection) -> float:
            taken = await connection.fetchval(
                "INSERT INTO refresh_budget AS b (segment_id, next_allowed) VALUES ($1, $3) "
                "ON CONFLICT (segment_id) DO UPDATE SET next_allowed = excluded.next_allowed "
                "WHERE b.next_allowed <= $2 RETURNING true",
                segment_id,
                now,
                next_allowed,
            )
            if taken:
                return 0.0
            allowed = await connection.fetchval(
                "SELECT next_allowed FROM refresh_budget WHERE segment_id = $1", segment_id
            )
            return float(allowed) if allowed is not None else 0.0

        allowed = await self._with_connection(take, "refresh budget")
        self._refresh[segment_id] = next_allowed if allowed == 0.0 else allowed
        return allowed

    # ---- reads --------------------------------------------------------------------------------

    async def _with_connection(self, work: Callable[[Connection], Awaitable[_T]], what: str) -> _T:
        """Run `work` on a pooled connection; a database that cannot serve is StoreUnavailable."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("the journal is not open")
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT_S) as connection:
                return await work(connection)
        except UNAVAILABLE as exc:
            raise StoreUnavailable(
                f"journal {self.shown}: {what} failed ({describe(exc)})"
            ) from None

    async def _fetch(self, statement: str, *arguments: Any) -> list[asyncpg.Record]:
        async def fetch(connection: Connection) -> list[asyncpg.Record]:
            return await connection.fetch(statement, *arguments)

        return await self._with_connection(fetch, "read")

    async def _select(self, statement: str, *arguments: Any) -> list[asyncpg.Record]:
        return await self._fetch(sql.rendered(statement, sql.Dialect.POSTGRESQL), *arguments)

    async def _forwarded(self, contact_id: str) -> list[asyncpg.Record]:
        return await self._fetch(_FORWARDED, contact_id)

    async def _read_histories(
        self, contact_ids: list[str]
    ) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
        async def read(
            connection: Connection,
        ) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
            # One snapshot for both tables.
            async with connection.transaction(isolation="repeatable_read", readonly=True):
                rows = await connection.fetch(_CONTACTS, contact_ids)
                mirrors = await connection.fetch(_MIRRORS, contact_ids)
            return rows, mirrors

        return await self._with_connection(read, "read")

    async def cluster_status(self) -> ClusterStatus:
        """Every member and shard lease, in one snapshot, on the database's clock."""

        async def read(connection: Connection) -> ClusterStatus:
            async with connection.transaction(isolation="repeatable_read", readonly=True):
                instances = await connection.fetch(_INSTANCES)
                shards = await connection.fetch(_SHARDS)
            return ClusterStatus(
                [
                    InstanceStatus(int(i), str(name), float(started), float(beat), float(age))
                    for i, name, started, beat, age in instances
                ],
                [
                    ShardStatus(
                        int(shard),
                        int(owner) if owner is not None else None,
                        int(epoch),
                        float(left) if left is not None and math.isfinite(left) else None,
                    )
                    for shard, owner, epoch, left in shards
                ],
            )

        return await self._with_connection(read, "reading the cluster")

    async def counts(self) -> dict[str, int]:
        """Retained assignments per state."""
        rows = await self._fetch(_COUNTS)
        counts: dict[str, int] = {}
        for state, count in rows:
            if count:
                counts[str(state)] = counts.get(str(state), 0) + int(count)
        return counts

    async def known_deliveries(self, source: str, delivery_ids: Sequence[str]) -> set[str]:
        """Which keys have an answer: those in memory, then the rest in one read."""
        found = {
            key
            for key in delivery_ids
            if (source, key) in self._unconfirmed or (source, key) in self._recent
        }
        rest = [key for key in dict.fromkeys(delivery_ids) if key not in found]
        if rest:
            rows = await self._fetch(
                "SELECT delivery_id FROM deliveries WHERE source = $1 AND delivery_id = ANY($2) "
                "AND answer <> ''::bytea",
                source,
                rest,
            )
            found.update(str(row[0]) for row in rows)
            # Committed while we read (see `delivery`): in `_recent` by now.
            found.update(key for key in rest if (source, key) in self._recent)
            found.update(key for key in rest if (source, key) in self._unconfirmed)
        return found

    async def delivery(self, source: str, delivery_id: str) -> bytes | None:
        """The answer to an earlier delivery, if retained (queued ones count too)."""
        key = (source, delivery_id)
        answer = self._unconfirmed.get(key)
        if answer is not None:
            return answer
        rows = await self._fetch(
            "SELECT answer FROM deliveries WHERE source = $1 AND delivery_id = $2 "
            "AND answer <> ''::bytea",
            source,
            delivery_id,
        )
        if rows:
            return bytes(rows[0][0])
        # Committed while we read, after the read's snapshot: then it left `_unconfirmed` for
        # `_recent` (re-reading instead cost up to four reads a webhook under load).
        return self._unconfirmed.get(key) or self._recent.get(key)

    # ---- the writer task ----------------------------------------------------------------------

    def _nudge(self) -> None:
        self._wake.set()

    def _writer_problem(self) -> str | None:
        if self._writer is None or self._closing:
            return "the journal is not open"
        if self._writer.done():
            # A writer that died (a bug) must not leave every webhook waiting for ever.
            failure = None if self._writer.cancelled() else self._writer.exception()
            return f"the journal writer stopped ({failure!r})"
        return None

    def _on_loop(self, callback: Callable[[], None]) -> None:
        callback()  # the writer is a task on the loop

    def _describe(self, exc: BaseException) -> str:
        return describe(exc)

    def _deliveries_committed(self, keys: list[DeliveryKey]) -> None:
        # Kept a while: a lookup that read before their commit finds them here.
        recent = self._recent
        for key in keys:
            answer = self._unconfirmed.pop(key, None)
            if answer is not None:
                recent[key] = answer
        while len(recent) > RECENT_DELIVERIES:
            recent.popitem(last=False)

    async def _write_loop(self) -> None:
        delay = RETRY_FIRST_S
        while True:
            with self._lock:
                work = self._take_work() if self._has_work() else None
            if work is None:
                if self._closing:
                    return
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), PRUNE_INTERVAL_S / 60)
                except TimeoutError:
                    self._schedule_prune()  # idle: a chance to prune
                continue
            closing = self._closing
            failure = await self._try_commit(work)
            if failure is not None:  # any failure: keep the changes, answer busy, retry
                self._commit_failed(work, failure)
                if closing:
                    with self._lock:
                        self._in_flight = None
                        self._pending.absorb(self._carry)  # kept visible to close()'s report
                        self._carry = PendingWork()
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MOST_S)
                continue
            delay = RETRY_FIRST_S
            self._committed(work)
            self._schedule_prune()

    async def _try_commit(self, work: PendingWork) -> Exception | None:
        """Commit `work`; the failure, or None. `_committing` says a commit is under way."""
        self._committing, self._discarded = True, False
        try:
            await self._commit(work)
        except Exception as exc:  # any failure: the writer keeps the changes and retries
            return exc
        finally:
            self._committing = False
        return None

    async def _commit(self, work: PendingWork) -> None:
        if work.empty():
            return
        pool = self._pool
        assert pool is not None
        self._leave_out_unheld(work)
        async with pool.acquire(timeout=CONNECT_TIMEOUT_S) as connection:
            # BEGIN and the fence travel together: the commit cycle is what bounds ingest, and
            # a round trip of its own for the fence cost a quarter of it.
            instance = self.instance_id
            begin = "BEGIN" if instance is None else f"BEGIN; {fence_sql(instance)}"
            try:
                await connection.execute(begin)
                await self._apply(connection, work)
                await connection.execute("COMMIT")
            except asyncpg.RaiseError as exc:
                await _rollback(connection)
                if instance is not None and FENCED in str(exc):
                    # Only the current membership's refusal counts: a commit begun under a
                    # membership already ended (the instance joined again since) says nothing.
                    if self.on_fenced is not None and instance == self.instance_id:
                        self.on_fenced()
                    raise StoreUnavailable(
                        f"journal {self.shown}: this instance was declared dead and its shards "
                        "taken over; it commits nothing more"
                    ) from None
                raise
            except BaseException:
                await _rollback(connection)
                raise
        self.commits += 1

    def _leave_out_unheld(self, work: PendingWork) -> None:
        """Leave out of this commit the rows of segments this instance no longer holds.

        The engine checks ownership when a state changes; a row is written by the commit after
        that, and a shard can change hands in between. A handover (daemon/cluster.py) flushes,
        then stops holding the shards, then releases their leases: a row queued while that flush
        was committing is left for the next transaction, which may begin after another instance
        has taken the shards and loaded their work from the journal. The commit fence cannot
        tell, since it refuses an instance declared dead, not one live instance's rows of shards
        it gave up. So each commit asks, as it begins, which of its rows are still this
        instance's to write: states, saved batches and validation-cache entries of segments no
        longer held are dropped (the new owner's are newer, or it recovered what was committed),
        and a forwarded change taken into this engine is deleted from the inbox only while its
        shard is held, else it stays for the shard's owner (no transition of the engine's shows
        that deletion). Rows queued after a fence by anything that does not ask the engine's
        ownership (the validation cache) are dropped here too.
        """
        holds = self.holds
        if holds is None:
            return
        for key in [k for k in work.assignments if not holds(k[1])]:
            del work.assignments[key]
            work.history.pop(key, None)
            segments = work.contacts.get(key[0])
            if segments is not None:
                segments.discard(key[1])
                if not segments:
                    del work.contacts[key[0]]
        # A forwarded change taken into the engine is deleted from the inbox only with the
        # states it became: those left out, it stays for the shard's owner.
        for row_id in [i for i, shard in work.inbox_done.items() if not self.holds_shard(shard)]:
            del work.inbox_done[row_id]
        for batch_id in [b for b, r in work.batches_saved.items() if not holds(r.segment_id)]:
            del work.batches_saved[batch_id]
        for key in [k for k in work.confirmations if not holds(k[1])]:
            del work.confirmations[key]

    async def _apply(self, connection: Connection, work: PendingWork) -> None:
        if work.inbox:
            await connection.execute(
                "INSERT INTO segmapd_inbox (shard, contact_id, segment_id, intent, occurred_at, "
                "received_at, reason, message, lane, repair, source) SELECT * FROM unnest("
                "$1::int4[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::float8[], "
                "$7::text[], $8::text[], $9::text[], $10::bool[], $11::text[])",
                *(list(column) for column in zip(*work.inbox, strict=True)),
            )
            # Delivered at commit, to the instances listening (the shards' owners).
            await connection.execute(
                "SELECT pg_notify('segmapd_inbox', s::text) FROM unnest($1::int4[]) AS s",
                sorted({row[0] for row in work.inbox}),
            )
        if work.inbox_done:
            await connection.execute(
                "DELETE FROM segmapd_inbox WHERE id = ANY($1::int8[])", list(work.inbox_done)
            )
        for write, rows in work.writes(self._clock()):
            if write is sql.NOTIFICATIONS:
                await connection.execute(
                    _ADD_NOTIFICATIONS,
                    *_columns(rows),
                    NOTIFICATION_CLAIM_S,
                    self.instance_id,
                )
            else:
                await connection.execute(_WRITES[write], *_columns(rows))

    def _commit_failed(self, work: PendingWork, exc: BaseException) -> None:
        if not self._discarded:
            super()._commit_failed(work, exc)
            return
        # Dropped meanwhile (`discard_pending`): not retried. Its error is no news of the
        # database: the next commit (or the readiness probe) tells.
        message = f"journal {self.shown}: commit failed: {describe(exc)}"
        log.warning("%s; its %d changes are dropped (fenced)", message, len(work.assignments))
        self._fail_waiters(work, StoreUnavailable(message))
        with self._lock:
            self._in_flight = None
        self.last_error = ""
        # Its deliveries were never answered: a redelivery must be taken anew, not answered
        # from memory as if it had been journaled.
        self._on_loop(lambda: self._drop_deliveries(work))

    def _schedule_prune(self) -> None:
        """Start a prune when one is due, on a task of its own: commits never wait for it."""
        if self._pool is None or self._closing:
            return
        if self._pruning is not None and not self._pruning.done():
            return
        if not self._prune_due():
            return
        self._pruning = asyncio.get_running_loop().create_task(
            self._prune(self._last_prune), name="journal-prune"
        )

    async def _prune(self, now: float) -> None:
        try:
            await self._maybe_prune(now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a prune that fails is retried next time, never fatal
            log.warning("journal %s: pruning failed (%s)", self.shown, describe(exc))

    async def _maybe_prune(self, now: float) -> None:
        horizon = now - self.retention_s

        async def prune(connection: Connection) -> str:
            async with connection.transaction():
                finished, *expired = _PRUNE
                pruned: str = await connection.execute(finished, horizon)
                for statement in expired:
                    await connection.execute(statement, horizon)
            return pruned

        try:
            status = await self._with_connection(prune, "pruning")
        except StoreUnavailable as exc:
            log.warning("%s", exc)
            return
        count = int(status.rpartition(" ")[2] or 0)
        if count:
            log.info("journal %s: pruned %d finished assignments past retention", self.shown, count)


# ---- schema and recovery ------------------------------------------------------------------------


async def _migrate(connection: Connection, shown: str) -> None:
    """Bring the schema to MIGRATIONS' version, once however many processes start together.

    The advisory lock is held to the end of the transaction: a second instance waits for it,
    then finds the schema current. A schema newer than this code is refused, untouched.
    """
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await connection.execute(_SCHEMA_TABLE)
        version = int(
            await connection.fetchval("SELECT coalesce(max(version), 0) FROM segmapd_schema")
        )
        if version > len(MIGRATIONS):
            raise StoreOpenError(
                f"{shown}: journal schema {version} is newer than this segmapd knows "
                f"({len(MIGRATIONS)}); upgrade segmapd"
            )
        for number in range(version + 1, len(MIGRATIONS) + 1):
            log.info("journal %s: migrating schema %d -> %d", shown, number - 1, number)
            await connection.execute(MIGRATIONS[number - 1])
            await connection.execute("INSERT INTO segmapd_schema (version) VALUES ($1)", number)


async def _load_shared_state(connection: Connection) -> Recovered:
    """What the store itself keeps at hand: the refresh budgets (work is recovered per shard)."""
    recovered = Recovered()
    recovered.refresh_budget = {
        str(s): float(at) for s, at in await connection.fetch(sql.REFRESH_TIMES)
    }
    return recovered


async def _load_recovery(connection: Connection, segments: list[str]) -> Recovered:
    """What is unfinished in these segments, as SqliteStore recovers it (caller's snapshot)."""
    recovered = Recovered()
    recovered.queued = [
        (str(c), str(s), float(received), str(intent), float(occurred), str(lane))
        for c, s, received, intent, occurred, lane in await connection.fetch(
            # Oldest first: the buffer takes insertion order for age (which batch goes next).
            f"{sql.QUEUED}{_SEGMENTS} ORDER BY received_at",
            segments,
        )
    ]
    recovered.assignments = [
        sql.assignment_from_row(row)
        for row in await connection.fetch(f"{sql.UNFINISHED}{_SEGMENTS}", segments)
    ]
    recovered.batches = [
        sql.batch_from_row(row)
        for row in await connection.fetch(
            f"{sql.SAVED_BATCHES}{_IN_SEGMENTS} ORDER BY saved_at, batch_id", segments
        )
    ]
    recovered.confirmations = [
        sql.confirmation_from_row(row)
        for row in await connection.fetch(f"{sql.CONFIRMED}{_IN_SEGMENTS}", segments)
    ]
    return recovered


async def _close_pool(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), CLOSE_FLUSH_TIMEOUT_S)
    except (TimeoutError, *UNAVAILABLE):
        pool.terminate()


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows as one list per column: the arrays of an `unnest` statement."""
    return [list(column) for column in zip(*rows, strict=True)]


async def _keep_session(connection: asyncpg.Connection) -> None:
    """The pool's reset on release, left out: a round trip per release, for nothing.

    The store keeps no session state (no LISTEN, cursors, settings or session locks).
    """


async def _rollback(connection: Connection) -> None:
    """End a failed transaction; a connection that cannot is closed by the pool anyway."""
    with contextlib.suppress(*UNAVAILABLE):
        await connection.execute("ROLLBACK")
