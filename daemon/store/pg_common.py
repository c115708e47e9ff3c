"""What every PostgreSQL module of the store shares: errors, timeouts, the commit fence.

The journal (`postgres.py`), the shard leases (`leases.py`) and the shared rate gates
(`shared_gate.py`) each talk to the database; the leases and the journal also meet at the
fence, the statement that opens every commit and that a takeover makes fail. Both sides of it
are here, so that neither module imports the other: the leases know the journal only as a
`Member` (its instance id, and a connection of its own).
"""

from __future__ import annotations

from typing import Protocol, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

#: Which asyncpg errors mean "the database cannot serve this now": connection refused or
#: lost, the server shutting down or starting, a timeout, a pool closing. The caller retries
#: (or answers 503); it never treats them as a bug in its own data.
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # A connection left mid-operation by a lost server ("another operation is in progress").
    asyncpg.InternalClientError,
)

#: Connecting (and authenticating) at most this long: an unreachable host must not hang start-up
#: or a reconnect for the driver's default minute.
CONNECT_TIMEOUT_S = 5.0
#: A session idle inside a transaction this long is ended by the server: a process paused
#: mid-commit (SIGSTOP, a frozen VM) must not block the instance taking its shards over. A
#: live commit never idles between its statements; one ended anyway is retried.
IDLE_IN_TRANSACTION_MS = "3000"
#: The key (with the instance id) of the lock commits share and a takeover takes alone ("SGME").
EPOCH_LOCK = 0x53474D45
#: The message of the exception a fenced commit raises in the database.
FENCED = "segmapd: fenced: this instance was declared dead"

# What the pool lends (a proxy) and a plain connection: statements work the same on either.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


class Member(Protocol):
    """The journal as the shard leases see it: whose commits the fence checks.

    `instance_id` is set by the leases when the instance joins (and cleared when it leaves):
    from then on every commit of the journal opens with `fence_sql(instance_id)`.
    """

    instance_id: int | None

    async def connect(self) -> asyncpg.Connection:
        """A connection of its own (not pooled), for a session that must last."""
        ...


def fence_sql(instance_id: int) -> str:
    """The statement that opens every commit: refuse it unless this instance is still a member.

    An instance whose leases expired (it was paused, or cut off) is declared dead by the one
    taking its shards, which deletes its row while holding `EPOCH_LOCK` for it exclusively;
    every commit holds the same lock shared, so a commit still under way ends first and every
    later one fails here. (Advisory locks live in memory; a row lock would cost a write on
    every commit.)
    """
    key = int(instance_id) % 2_147_483_647  # an integer of ours: safe to write into the text
    return (
        f"DO $fence$ BEGIN PERFORM pg_advisory_xact_lock_shared({EPOCH_LOCK}, {key}); "  # noqa: S608 (integers and a constant of ours)
        f"IF NOT EXISTS (SELECT 1 FROM segmapd_instances WHERE id = {int(instance_id)}) "
        f"THEN RAISE EXCEPTION '{FENCED}'; END IF; END $fence$"
    )


def describe(exc: BaseException) -> str:
    """A driver error as one line: its class and message (never a password: none is in them)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
