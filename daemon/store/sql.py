"""The SQL both durable journals run, written once: schema, writes, reads, pruning, row decoding.

SQLite (`sqlite.py`) and PostgreSQL (`postgres.py`) hold the same tables with the same columns;
what differs is a few type names, the placeholders (`?N` for sqlite3, `$N` for asyncpg) and how
many rows one statement carries: SQLite binds one row per execution (or a few dozen in one
`VALUES` list), PostgreSQL every row of a transaction at once, one array per column (`unnest`),
so that a commit is a handful of statements whatever its size. Statements are written here with
`$N` placeholders and `{word}`s for what the dialects spell differently, and rendered once per
dialect (`render`, `Upsert.sqlite`, `Upsert.postgres`) when a backend's module is imported.

What only one backend has stays in its module: SQLite's file checks and delivery filter,
PostgreSQL's claims, inbox, leases and fence.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from scheduler.model import Assignment, FailureReason, Intent, Lane, State, storable
from scheduler.reconcile import PassState, ReconcilePass
from scheduler.store import BatchRecord

DEAD_LETTER_INDEXES = (
    "dead_letters",
    "dead_letters_by_segment",
    "dead_letters_by_reason",
    "dead_letters_by_segment_reason",
    "dead_letters_by_source",
)
"""The partial indexes of failed rows (`SCHEMA` step 7), one per dead-letter filter (every
filter naming a source walks the last)."""


class Dialect(enum.Enum):
    """A database's spelling of what the schema and the statements need."""

    SQLITE = {
        "real": "REAL",
        "blob": "BLOB",
        "boolean": "INTEGER",
        "true": "1",
        "without_rowid": " WITHOUT ROWID",
        "utc_now_text": "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        "greatest": "max",
        # The dead letters' partial indexes, named: SQLite's planner, without statistics, takes
        # an equality on `state` for as selective as one on `segment_id`, and walks every dead
        # letter (`assignments_by_state`) for a filter that one of these answers in its entries.
        **{index: f" INDEXED BY {index}" for index in DEAD_LETTER_INDEXES},
    }
    POSTGRESQL = {
        "real": "DOUBLE PRECISION",
        "blob": "BYTEA",
        "boolean": "BOOLEAN",
        "true": "TRUE",
        "without_rowid": "",
        "utc_now_text": "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
        "greatest": "greatest",
        # PostgreSQL's planner has statistics, and no such clause.
        **dict.fromkeys(DEAD_LETTER_INDEXES, ""),
    }


_PLACEHOLDER = re.compile(r"\$(\d+)")


@functools.lru_cache(maxsize=128)
def rendered(statement: str, dialect: Dialect) -> str:
    """A shared read as `dialect`'s driver takes it, rendered once per text."""
    return render(statement, dialect)


def render(sql: str, dialect: Dialect) -> str:
    """`sql` in the dialect: its `{word}`s spelled, and `$N` placeholders as sqlite3's `?N`."""
    text = sql.format_map(dialect.value)
    return _PLACEHOLDER.sub(r"?\1", text) if dialect is Dialect.SQLITE else text


# ---- schema -------------------------------------------------------------------------------------

SCHEMA: list[str] = [
    # 1: the initial schema.
    """
    CREATE TABLE assignments (
        contact_id  TEXT NOT NULL,
        segment_id  TEXT NOT NULL,
        state       TEXT NOT NULL,
        reason      TEXT,
        message     TEXT NOT NULL DEFAULT '',
        attempts    INTEGER NOT NULL DEFAULT 0,
        received_at {real} NOT NULL,
        updated_at  {real} NOT NULL,
        history     TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (contact_id, segment_id)
    ){without_rowid};
    CREATE INDEX assignments_by_state ON assignments (state, updated_at);
    CREATE TABLE batches (
        batch_id        TEXT PRIMARY KEY,
        segment_id      TEXT NOT NULL,
        contact_ids     TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        attempt         INTEGER NOT NULL,
        saved_at        {real} NOT NULL
    );
    CREATE TABLE deliveries (
        source      TEXT NOT NULL,
        delivery_id TEXT NOT NULL,
        answer      {blob} NOT NULL,
        received_at {real} NOT NULL,
        PRIMARY KEY (source, delivery_id)
    ){without_rowid};
    CREATE INDEX deliveries_by_time ON deliveries (received_at);
    CREATE TABLE refresh_budget (
        segment_id   TEXT PRIMARY KEY,
        next_allowed {real} NOT NULL
    ){without_rowid};
    CREATE TABLE confirmations (
        contact_id   TEXT NOT NULL,
        segment_id   TEXT NOT NULL,
        confirmed_at {real} NOT NULL,
        PRIMARY KEY (contact_id, segment_id)
    ){without_rowid};
    CREATE TABLE notifications (
        event_id TEXT PRIMARY KEY,
        body     {blob} NOT NULL,
        added_at {real} NOT NULL
    );
    """,
    # 2: who made the journal and when, for `segmapd` diagnostics and support.
    """
    CREATE TABLE journal_info (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ){without_rowid};
    INSERT INTO journal_info VALUES ('created_at', {utc_now_text});
    """,
    # 3: removals and ordering. Every assignment and batch has an intent (all earlier ones were
    # adds); an assignment keeps the CRM's time of the change it works towards (0: its arrival);
    # a confirmation remembers what was confirmed (all earlier ones were memberships); changes
    # that arrived older than what was in progress are kept as stale.
    """
    ALTER TABLE assignments ADD COLUMN intent TEXT NOT NULL DEFAULT 'add';
    ALTER TABLE assignments ADD COLUMN occurred_at {real} NOT NULL DEFAULT 0;
    ALTER TABLE batches ADD COLUMN intent TEXT NOT NULL DEFAULT 'add';
    ALTER TABLE confirmations ADD COLUMN member {boolean} NOT NULL DEFAULT {true};
    CREATE TABLE stale_changes (
        contact_id  TEXT NOT NULL,
        segment_id  TEXT NOT NULL,
        intent      TEXT NOT NULL,
        occurred_at {real} NOT NULL,
        received_at {real} NOT NULL
    );
    CREATE INDEX stale_changes_by_time ON stale_changes (received_at);
    """,
    # 4: a mirror (`set`) says the contact is in no segment it does not list, as of its time:
    # per contact, the time of the newest mirror applied, so that an older change for any
    # segment, delivered late, is found stale.
    """
    CREATE TABLE mirrors (
        contact_id  TEXT PRIMARY KEY,
        occurred_at {real} NOT NULL,
        updated_at  {real} NOT NULL
    ){without_rowid};
    CREATE INDEX mirrors_by_time ON mirrors (updated_at);
    """,
    # 5: live changes first (issue 21). Every assignment is in a lane, `live` or `bulk`; the
    # rows of journals from before were all live.
    """
    ALTER TABLE assignments ADD COLUMN lane TEXT NOT NULL DEFAULT 'live';
    """,
    # 6: drift reconcile (issue 22). The passes, at most one running (the partial unique index
    # refuses a second, across instances), with their figures and the cursor a restart or a
    # survivor resumes from; `runner` names the instance running it, and progress is saved only
    # while it still does. Every drift found, against its pair.
    """
    CREATE TABLE reconcile_passes (
        id             TEXT PRIMARY KEY,
        state          TEXT NOT NULL,
        dry_run        {boolean} NOT NULL,
        segment_ids    TEXT NOT NULL,
        scheduled      {boolean} NOT NULL,
        total          INTEGER NOT NULL,
        read_count     INTEGER NOT NULL,
        in_step        INTEGER NOT NULL,
        drifted        INTEGER NOT NULL,
        requeued       INTEGER NOT NULL,
        skipped        INTEGER NOT NULL,
        started_at     {real} NOT NULL,
        finished_at    {real},
        cursor_contact TEXT NOT NULL,
        cursor_segment TEXT NOT NULL,
        runner         TEXT NOT NULL,
        message        TEXT NOT NULL
    );
    CREATE UNIQUE INDEX reconcile_one_running ON reconcile_passes (state) WHERE state = 'running';
    CREATE INDEX reconcile_passes_by_start ON reconcile_passes (started_at);
    CREATE TABLE drift (
        contact_id TEXT NOT NULL,
        segment_id TEXT NOT NULL,
        intent     TEXT NOT NULL,
        pass_id    TEXT NOT NULL,
        found_at   {real} NOT NULL,
        requeued   {boolean} NOT NULL
    );
    CREATE INDEX drift_by_contact ON drift (contact_id, segment_id);
    CREATE INDEX drift_by_time ON drift (found_at);
    """,
    # 7: the dead letters, paged and counted by the console and the API with a cursor, filtered
    # by segment, reason and source. Partial indexes of failed rows only: a page, a count or a
    # replay of 100,000 dead letters walks their entries alone (never the table, never other
    # states), and rows in other states cost these indexes nothing when they change. One per
    # filter, each in the list's order after its filter's columns, so no filter needs a sort;
    # `state` last, so that SQLite counts from the entries alone (its planner reads the row for
    # a column the index does not hold, even one its WHERE fixes). Sources are few, so one
    # index serves every filter naming one: it holds the segment and the reason too, which the
    # walk of the source's entries checks without reading rows.
    # Each assignment's source: where the change that started it came from (a webhook source's
    # name, `mappings`); written by the rows that start a pair and kept by later transitions.
    # Rows from before have none ('').
    """
    ALTER TABLE assignments ADD COLUMN source TEXT NOT NULL DEFAULT '';
    CREATE INDEX dead_letters ON assignments (updated_at, contact_id, segment_id, state)
        WHERE state = 'failed';
    CREATE INDEX dead_letters_by_segment
        ON assignments (segment_id, updated_at, contact_id, state) WHERE state = 'failed';
    CREATE INDEX dead_letters_by_reason
        ON assignments (reason, updated_at, contact_id, segment_id, state) WHERE state = 'failed';
    CREATE INDEX dead_letters_by_segment_reason
        ON assignments (segment_id, reason, updated_at, contact_id, state) WHERE state = 'failed';
    CREATE INDEX dead_letters_by_source
        ON assignments (source, updated_at, contact_id, segment_id, reason, state)
        WHERE state = 'failed';
    """,
]
"""The journal's tables as they grew, step by step: SQLite's migrations 1-7; PostgreSQL's first
one is steps 1-4 at once (the PostgreSQL journal began with the fourth shape), its fourth the
fifth step, its fifth the sixth, its sixth the seventh."""


# ---- writes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upsert:
    """An INSERT of whole rows of one table, and what a row already there becomes.

    `types` are PostgreSQL's names of each column's type, for the arrays `unnest` reads;
    `conflict` is the `ON CONFLICT` clause (empty: none), in the dialects' shared spelling.
    """

    table: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    conflict: str = ""

    @property
    def head(self) -> str:
        """`INSERT INTO table (columns)`."""
        return f"INSERT INTO {self.table} ({', '.join(self.columns)})"

    def tail(self, dialect: Dialect) -> str:
        """The conflict clause in the dialect."""
        return render(self.conflict, dialect)

    def sqlite(self) -> str:
        """One row per execution (sqlite3's `executemany`)."""
        values = ", ".join("?" * len(self.columns))
        return f"{self.head} VALUES ({values}) {self.tail(Dialect.SQLITE)}".rstrip()

    def postgres(self) -> str:
        """Every row at once, one array per column."""
        arrays = ", ".join(f"${n}::{kind}[]" for n, kind in enumerate(self.types, 1))
        tail = self.tail(Dialect.POSTGRESQL)
        return f"{self.head} SELECT * FROM unnest({arrays}) {tail}".rstrip()  # noqa: S608


@dataclass(frozen=True)
class Delete:
    """A DELETE of rows by their key: one key per execution, or every key in one array."""

    table: str
    key: str
    type: str

    def sqlite(self) -> str:
        """One key per execution."""
        return f"DELETE FROM {self.table} WHERE {self.key} = ?"  # noqa: S608 (constants)

    def postgres(self) -> str:
        """Every key at once."""
        return f"DELETE FROM {self.table} WHERE {self.key} = ANY($1::{self.type}[])"  # noqa: S608


# History is text, "state:time;" per transition, so that appending the transitions of a
# transaction is a concatenation; a fresh start (queued) replaces it. The source is written by
# the rows that start a pair; a later transition's row has none ('') and keeps the journal's.
ASSIGNMENTS = Upsert(
    "assignments",
    (
        "contact_id",
        "segment_id",
        "state",
        "reason",
        "message",
        "attempts",
        "received_at",
        "updated_at",
        "intent",
        "occurred_at",
        "lane",
        "source",
        "history",
    ),
    (
        "text",
        "text",
        "text",
        "text",
        "text",
        "int4",
        "float8",
        "float8",
        "text",
        "float8",
        "text",
        "text",
        "text",
    ),
    """ON CONFLICT (contact_id, segment_id) DO UPDATE SET
        state = excluded.state, reason = excluded.reason,
        message = excluded.message, attempts = excluded.attempts,
        received_at = excluded.received_at, updated_at = excluded.updated_at,
        intent = excluded.intent, occurred_at = excluded.occurred_at,
        lane = excluded.lane,
        source = CASE
            WHEN excluded.source <> '' THEN excluded.source ELSE assignments.source
        END,
        history = CASE
            WHEN excluded.history LIKE 'queued:%' THEN excluded.history
            ELSE assignments.history || excluded.history
        END""",
)
BATCHES = Upsert(
    "batches",
    (
        "batch_id",
        "segment_id",
        "contact_ids",
        "idempotency_key",
        "attempt",
        "saved_at",
        "intent",
    ),
    ("text", "text", "text", "text", "int4", "float8", "text"),
    "ON CONFLICT (batch_id) DO UPDATE SET segment_id = excluded.segment_id, "
    "contact_ids = excluded.contact_ids, idempotency_key = excluded.idempotency_key, "
    "attempt = excluded.attempt, saved_at = excluded.saved_at, intent = excluded.intent",
)
BATCHES_DONE = Delete("batches", "batch_id", "text")
# The first answer to a key is the one kept. (PostgreSQL replaces a claim, an empty answer.)
DELIVERIES = Upsert(
    "deliveries",
    ("source", "delivery_id", "answer", "received_at"),
    ("text", "text", "bytea", "float8"),
    "ON CONFLICT (source, delivery_id) DO NOTHING",
)
REFRESH_BUDGET = Upsert(
    "refresh_budget",
    ("segment_id", "next_allowed"),
    ("text", "float8"),
    "ON CONFLICT (segment_id) DO UPDATE SET next_allowed = excluded.next_allowed",
)
CONFIRMATIONS = Upsert(
    "confirmations",
    ("contact_id", "segment_id", "confirmed_at", "member"),
    ("text", "text", "float8", "bool"),
    "ON CONFLICT (contact_id, segment_id) DO UPDATE SET "
    "confirmed_at = excluded.confirmed_at, member = excluded.member",
)
STALE_CHANGES = Upsert(
    "stale_changes",
    ("contact_id", "segment_id", "intent", "occurred_at", "received_at"),
    ("text", "text", "text", "float8", "float8"),
)
# An older mirror never lowers the time: mirrors may commit out of order.
MIRRORS = Upsert(
    "mirrors",
    ("contact_id", "occurred_at", "updated_at"),
    ("text", "float8", "float8"),
    "ON CONFLICT (contact_id) DO UPDATE SET "
    "occurred_at = {greatest}(mirrors.occurred_at, excluded.occurred_at), "
    "updated_at = excluded.updated_at",
)
NOTIFICATIONS = Upsert(
    "notifications",
    ("event_id", "body", "added_at"),
    ("text", "bytea", "float8"),
    "ON CONFLICT (event_id) DO UPDATE SET body = excluded.body, added_at = excluded.added_at",
)
NOTIFICATIONS_DONE = Delete("notifications", "event_id", "text")


@dataclass(frozen=True)
class Update:
    """An UPDATE of rows by their key, each row (key, then `columns`) one row's new values.

    `where` adds a condition on a column named `guard` (the last value of each row): a row
    matches only while that column still holds it. SQLite binds one row per execution,
    PostgreSQL every row at once from arrays.
    """

    table: str
    key: str
    columns: tuple[str, ...]
    types: tuple[str, ...]  # the key's, then the columns', then the guard's
    guard: str = ""
    # A fixed condition on the row as it is (in the dialects' shared spelling), or "".
    only: str = ""

    def sqlite(self) -> str:
        """One row per execution: `?1` the key, then the columns, then the guard."""
        sets = ", ".join(f"{column} = ?{n}" for n, column in enumerate(self.columns, 2))
        where = f"{self.key} = ?1"
        if self.guard:
            where += f" AND {self.guard} = ?{len(self.columns) + 2}"
        if self.only:
            where += f" AND {self.only}"
        return f"UPDATE {self.table} SET {sets} WHERE {where}"  # noqa: S608 (constants)

    def postgres(self) -> str:
        """Every row at once, one array per column."""
        names = [self.key, *self.columns, *([self.guard] if self.guard else [])]
        arrays = ", ".join(f"${n}::{kind}[]" for n, kind in enumerate(self.types, 1))
        sets = ", ".join(f"{column} = u.{column}" for column in self.columns)
        where = f"t.{self.key} = u.{self.key}"
        if self.guard:
            where += f" AND t.{self.guard} = u.{self.guard}"
        if self.only:
            where += f" AND t.{self.only}"
        return (
            f"UPDATE {self.table} AS t SET {sets} "  # noqa: S608 (constants)
            f"FROM unnest({arrays}) AS u({', '.join(names)}) WHERE {where}"
        )


PASS_COLUMNS = (
    "id",
    "state",
    "dry_run",
    "segment_ids",
    "scheduled",
    "total",
    "read_count",
    "in_step",
    "drifted",
    "requeued",
    "skipped",
    "started_at",
    "finished_at",
    "cursor_contact",
    "cursor_segment",
    "runner",
    "message",
)
_PASS_TYPES = (
    "text",
    "text",
    "bool",
    "text",
    "bool",
    "int4",
    "int4",
    "int4",
    "int4",
    "int4",
    "int4",
    "float8",
    "float8",
    "text",
    "text",
    "text",
    "text",
)
# A pass is taken over by the instance that resumes it: from then on only its progress counts.
# Only a running pass: one that ended is never reopened.
PASS_CLAIMS = Update(
    "reconcile_passes", "id", ("runner",), ("text", "text"), only="state = 'running'"
)
# Progress is saved only by the pass's runner (`guard`): an instance that lost the pass to a
# survivor cannot overwrite the survivor's figures or cursor.
PASS_PROGRESS = Update(
    "reconcile_passes",
    "id",
    (*PASS_COLUMNS[1:-2], "message"),
    ("text", *_PASS_TYPES[1:-2], "text", "text"),
    guard="runner",
    only="state = 'running'",
)
# A new pass; refused (nothing written) while another runs: `reconcile_one_running`.
PASS_STARTS = Upsert("reconcile_passes", PASS_COLUMNS, _PASS_TYPES, "ON CONFLICT DO NOTHING")
DRIFT = Upsert(
    "drift",
    ("contact_id", "segment_id", "intent", "pass_id", "found_at", "requeued"),
    ("text", "text", "text", "text", "float8", "bool"),
)

WRITES: tuple[Upsert | Delete | Update, ...] = (
    ASSIGNMENTS,
    BATCHES,
    BATCHES_DONE,
    DELIVERIES,
    REFRESH_BUDGET,
    CONFIRMATIONS,
    STALE_CHANGES,
    MIRRORS,
    NOTIFICATIONS,
    NOTIFICATIONS_DONE,
    # A pass ending before another starts in the same transaction: claims and progress first.
    PASS_CLAIMS,
    PASS_PROGRESS,
    PASS_STARTS,
    DRIFT,
)
"""Every table a transaction writes, in the order it writes them (`PendingWork.writes`)."""


# ---- reads --------------------------------------------------------------------------------------

# In the order `assignment_from_row` reads them (SELECT * would follow the table's, which
# ALTER TABLE appends to).
ASSIGNMENT_COLUMNS = (
    "contact_id, segment_id, state, reason, message, attempts, received_at, updated_at, "
    "history, intent, occurred_at, lane, source"
)
CONTACT = f"SELECT {ASSIGNMENT_COLUMNS} FROM assignments WHERE contact_id = $1"  # noqa: S608 (constants)
COUNTS = "SELECT state, count(*) FROM assignments GROUP BY state"
MIRROR_TIMES = "SELECT contact_id, occurred_at FROM mirrors"


DeadLetterKey = tuple[float, str, str]
"""Where a dead letter stands in the list: (failed at, contact id, segment id), the keyset
cursor the list is paged by (oldest first, ties in id order)."""


def _dead_letter_filter(
    reason: FailureReason | None,
    segment_id: str | None,
    source: str | None,
    parameters: list[object],
) -> tuple[str, list[str], list[str]]:
    """The filter's index (as a `{word}`), its conditions, and the key columns left to order by.

    A column the filter fixes orders nothing: leaving it out of the cursor's comparison keeps
    the comparison on the columns that follow the filter's in its index (`SCHEMA` step 7). A
    filter naming a source walks the source's entries, whose segment and reason it checks
    there (`dead_letters_by_source` holds both).
    """
    conditions = ["state = 'failed'"]
    if source is not None:
        parameters.append(source)
        conditions.append(f"source = ${len(parameters)}")
    if reason is not None:
        parameters.append(str(reason))
        conditions.append(f"reason = ${len(parameters)}")
    if segment_id is not None:
        parameters.append(segment_id)
        conditions.append(f"segment_id = ${len(parameters)}")
    ordered = ["updated_at", "contact_id"] + (["segment_id"] if segment_id is None else [])
    if source is not None:
        return "assignments{dead_letters_by_source}", conditions, ordered
    index = "dead_letters" + ("_by_segment" if segment_id is not None else "")
    if reason is not None:
        index += "_reason" if segment_id is not None else "_by_reason"
    return f"assignments{{{index}}}", conditions, ordered


def _beyond(ordered: list[str], key: DeadLetterKey, operator: str, parameters: list[object]) -> str:
    """`(columns) <operator> (key's values)`, with the key's values as parameters."""
    values = {"updated_at": key[0], "contact_id": key[1], "segment_id": key[2]}
    placeholders = []
    for column in ordered:
        parameters.append(values[column])
        placeholders.append(f"${len(parameters)}")
    return f"({', '.join(ordered)}) {operator} ({', '.join(placeholders)})"


def failed_query(
    limit: int,
    reason: FailureReason | None,
    segment_id: str | None,
    after: DeadLetterKey | None = None,
    through: DeadLetterKey | None = None,
    *,
    source: str | None = None,
) -> tuple[str, list[object]]:
    """Dead letters, oldest first, of the filter's reason, segment and source: SQL, parameters.

    `after` starts past a cursor (the last row of the previous page); `through` stops at one (the
    newest row a caller counted, so that what failed since is left out). Each filter walks a
    partial index of failed rows in order and stops at `limit` rows: no sort, no other
    state, whatever the filter.

    A source with a segment or a reason walks the source's entries, checking the others there.
    The page's keys are found from the entries alone, then its rows read by key: the table
    has no rowid, so SQLite would otherwise read the row of every entry it walks before it
    checks the entry's segment and reason (a source's 100,000 dead letters, to find a few).
    """
    parameters: list[object] = [limit]
    table, conditions, ordered = _dead_letter_filter(reason, segment_id, source, parameters)
    if after is not None:
        conditions.append(_beyond(ordered, after, ">", parameters))
    if through is not None:
        conditions.append(_beyond(ordered, through, "<=", parameters))
    where, order = " AND ".join(conditions), ", ".join(ordered)
    if source is not None and (reason is not None or segment_id is not None):
        # The outer sort is of the page's rows only.
        sql = (
            f"SELECT {ASSIGNMENT_COLUMNS} FROM assignments "  # noqa: S608 (fixed fragments)
            f"WHERE (contact_id, segment_id) IN (SELECT contact_id, segment_id FROM {table} "
            f"WHERE {where} ORDER BY {order} LIMIT $1) ORDER BY {order}"
        )
    else:
        sql = (
            f"SELECT {ASSIGNMENT_COLUMNS} FROM {table} "  # noqa: S608 (fixed fragments)
            f"WHERE {where} ORDER BY {order} LIMIT $1"
        )
    return sql, parameters


def count_failed_query(
    reason: FailureReason | None, segment_id: str | None, source: str | None = None
) -> tuple[str, list[object]]:
    """How many dead letters the filter keeps, and the newest one's key: SQL and parameters.

    One statement, so one snapshot: the newest key is that of the rows counted. Both walk the
    filter's partial index alone (a count of its entries, and its last entry).
    """
    parameters: list[object] = []
    table, conditions, ordered = _dead_letter_filter(reason, segment_id, source, parameters)
    where = " AND ".join(conditions)
    descending = ", ".join(f"{column} DESC" for column in ordered)
    sql = (
        "SELECT n.matching, k.updated_at, k.contact_id, k.segment_id FROM "  # noqa: S608 (fixed)
        f"(SELECT count(*) AS matching FROM {table} WHERE {where}) AS n LEFT JOIN "
        f"(SELECT updated_at, contact_id, segment_id FROM {table} WHERE {where} "
        f"ORDER BY {descending} LIMIT 1) AS k ON 1 = 1"
    )
    return sql, parameters


# Dead letters per segment: the by-segment index's entries, counted in the background.
FAILED_BY_SEGMENT = (
    "SELECT segment_id, count(*) FROM assignments{dead_letters_by_segment} "
    "WHERE state = 'failed' GROUP BY segment_id"
)


# What a restart (or a shard's new owner) takes back. A shared journal narrows each to the
# segments taken (`AND segment_id = ANY(...)`, `WHERE segment_id = ANY(...)`).
QUEUED = (
    "SELECT contact_id, segment_id, received_at, intent, occurred_at, lane FROM assignments "
    "WHERE state = 'queued'"
)
UNFINISHED = (
    f"SELECT {ASSIGNMENT_COLUMNS} FROM assignments "  # noqa: S608 (a constant)
    "WHERE state IN ('sending', 'retrying', 'written', 'verifying')"
)
SAVED_BATCHES = (
    "SELECT batch_id, segment_id, contact_ids, idempotency_key, attempt, intent FROM batches"
)
CONFIRMED = "SELECT contact_id, segment_id, confirmed_at, member FROM confirmations"
REFRESH_TIMES = "SELECT segment_id, next_allowed FROM refresh_budget"

# Drift reconcile: the memberships segmapd made and holds (an add confirmed `active`, a removal
# confirmed `removed`, retained for `store.retention_days`), in key order from a cursor.
TRACKED_STATES = "state IN ('active', 'removed')"
TRACKED_PAGE = (
    f"SELECT {ASSIGNMENT_COLUMNS} FROM assignments "  # noqa: S608 (constants)
    f"WHERE {TRACKED_STATES} AND (contact_id, segment_id) > ($1, $2) "
    "ORDER BY contact_id, segment_id LIMIT $3"
)
TRACKED_COUNT = f"SELECT count(*) FROM assignments WHERE {TRACKED_STATES}"  # noqa: S608
PASS_SELECT = f"SELECT {', '.join(PASS_COLUMNS)} FROM reconcile_passes"  # noqa: S608
PASS_BY_ID = f"{PASS_SELECT} WHERE id = $1"
PASS_RUNNING = f"{PASS_SELECT} WHERE state = 'running'"
PASS_LAST_SCHEDULED = f"{PASS_SELECT} WHERE scheduled ORDER BY started_at DESC, id DESC LIMIT 1"
PASSES_NEWEST = f"{PASS_SELECT} ORDER BY started_at DESC, id DESC LIMIT $1"
DRIFT_OF_CONTACT = (
    "SELECT segment_id, intent, pass_id, found_at, requeued FROM drift "
    "WHERE contact_id = $1 ORDER BY found_at"
)
JOURNAL_CREATED = "SELECT value FROM journal_info WHERE key = 'created_at'"


# ---- pruning ------------------------------------------------------------------------------------

# Finished assignments older than the retention horizon ($1): a confirmed removal, and a failure
# that cannot have left a membership in CXone (one never sent, or one CXone refused for certain).
# Active adds are the memberships segmapd made: a mirror (`set`) compares with them, so they are
# kept for as long as the membership exists, past any retention; so are failures that may have
# left one (`Assignment.may_hold_membership`).
PRUNE_FINISHED = (
    "DELETE FROM assignments WHERE updated_at < $1 AND (state = 'removed' OR (state = 'failed' "
    "AND (attempts = 0 OR reason IS NULL OR reason NOT IN ('retries_exhausted', 'not_indexed'))))"
)
# Everything else past the horizon ($1), by the time each table keeps.
PRUNE_EXPIRED = [
    f"DELETE FROM {table} WHERE {column} < $1"  # noqa: S608 (constants)
    for table, column in (
        ("stale_changes", "received_at"),
        ("mirrors", "updated_at"),
        ("deliveries", "received_at"),
        ("confirmations", "confirmed_at"),
        ("drift", "found_at"),
    )
] + [
    # Ended passes; a running one has no end time. The newest scheduled one stays: it is what
    # the schedule counts its interval from.
    "DELETE FROM reconcile_passes WHERE finished_at < $1 AND id NOT IN ("
    "SELECT id FROM reconcile_passes WHERE scheduled ORDER BY started_at DESC, id DESC LIMIT 1)"
]


# ---- rows ---------------------------------------------------------------------------------------

_STATES = {state.value: state for state in State}
_INTENTS = {intent.value: intent for intent in Intent}
_LANES = {lane.value: lane for lane in Lane}


def assignment_from_row(row: Iterable[Any]) -> Assignment:
    """An assignment from its columns in `ASSIGNMENT_COLUMNS` order."""
    (contact_id, segment_id, state, reason, message, attempts, received, updated, history,
     intent, occurred_at, lane, source) = row  # fmt: skip
    steps = [
        (_STATES[name], float(at))
        for name, _, at in (step.partition(":") for step in history.split(";") if step)
    ]
    if len(steps) > 1:
        # A commit whose acknowledgement was lost (the connection dropped at COMMIT) is retried
        # and may have landed: its transitions are then appended again, the same states at the
        # same times. No real history holds one state twice at one instant.
        steps = list(dict.fromkeys(steps))
    return Assignment(
        contact_id=contact_id,
        segment_id=segment_id,
        state=_STATES[state],
        reason=FailureReason(reason) if reason else None,
        message=message,
        attempts=attempts,
        received_at=received,
        updated_at=updated,
        history=steps,
        intent=_INTENTS[intent],
        occurred_at=occurred_at,
        lane=_LANES[lane],
        source=source,
    )


def intent_named(name: str) -> Intent:
    """The intent a column holds."""
    return _INTENTS[name]


def lane_named(name: str) -> Lane:
    """The lane a column holds."""
    return _LANES[name]


def batch_row(batch: BatchRecord, saved_at: float) -> tuple[str, str, str, str, int, float, str]:
    """A batch as the `batches` table holds it (its ids as a JSON array)."""
    return (
        batch.batch_id,
        batch.segment_id,
        orjson.dumps(list(batch.contact_ids)).decode(),
        batch.idempotency_key,
        batch.attempt,
        saved_at,
        str(batch.intent),
    )


def batch_from_row(row: Iterable[Any]) -> BatchRecord:
    """A batch from its columns in `SAVED_BATCHES` order."""
    batch_id, segment_id, ids, key, attempt, intent = row
    return BatchRecord(batch_id, segment_id, tuple(orjson.loads(ids)), key, attempt, Intent(intent))


def confirmation_from_row(row: Iterable[Any]) -> tuple[str, str, float, bool]:
    """A validation-cache entry from its columns in `CONFIRMED` order."""
    contact_id, segment_id, confirmed_at, member = row
    return (str(contact_id), str(segment_id), float(confirmed_at), bool(member))


def pass_row(reconcile_pass: ReconcilePass) -> tuple[Any, ...]:
    """A pass as `reconcile_passes` holds it, in `PASS_COLUMNS` order.

    Its segments as a JSON array; an unknown total as -1.
    """
    p = reconcile_pass
    return (
        p.id,
        str(p.state),
        p.dry_run,
        orjson.dumps(list(p.segment_ids)).decode(),
        p.scheduled,
        -1 if p.total is None else p.total,
        p.read,
        p.in_step,
        p.drifted,
        p.requeued,
        p.skipped,
        p.started_at,
        p.finished_at,
        p.cursor[0],
        p.cursor[1],
        p.runner,
        storable(p.message),
    )


def pass_progress_row(reconcile_pass: ReconcilePass) -> tuple[Any, ...]:
    """A pass as `PASS_PROGRESS` saves it: key, columns, then its runner (the guard)."""
    row = pass_row(reconcile_pass)
    return (*row[:-2], row[-1], row[-2])


def pass_from_row(row: Iterable[Any]) -> ReconcilePass:
    """A pass from its columns in `PASS_COLUMNS` order."""
    (pass_id, state, dry_run, segment_ids, scheduled, total, read, in_step, drifted, requeued,
     skipped, started, finished, cursor_contact, cursor_segment, runner, message) = row  # fmt: skip
    return ReconcilePass(
        id=pass_id,
        started_at=float(started),
        dry_run=bool(dry_run),
        segment_ids=tuple(orjson.loads(segment_ids)),
        scheduled=bool(scheduled),
        state=PassState(state),
        total=None if total < 0 else int(total),
        read=int(read),
        in_step=int(in_step),
        drifted=int(drifted),
        requeued=int(requeued),
        skipped=int(skipped),
        finished_at=None if finished is None else float(finished),
        cursor=(cursor_contact, cursor_segment),
        runner=runner,
        message=message,
    )
