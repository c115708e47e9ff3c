"""Shard leases in PostgreSQL: which live instance owns which shard, and who is dead.

Every instance has a row in `segmapd_instances`, whose heartbeat it renews together with the
leases of the shards it owns (`segmapd_shards.lease_until`). An instance whose heartbeat is
older than the lease time is dead: the first live instance that sees it deletes its row, while
holding its `EPOCH_LOCK` exclusively (every commit of that instance holds it shared and checks
the row, see `fence_sql`), so nothing the dead one commits from then on lands, even if it was
only paused. Its shards are then free, as are those released by an instance handing them over
or leaving, and live instances take them up to their fair share (each change of owner raises
the shard's epoch). An instance that finds itself fenced (declared dead, or cut off for nearly a
lease) joins again as a new member, ending its old membership itself if nobody has yet.

The statements lock the instance row before any shard row, in every transaction, so that a
heartbeat and a takeover never wait for each other in a cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg

from daemon.store.base import Heartbeat, Leases
from daemon.store.pg_common import CONNECT_TIMEOUT_S, EPOCH_LOCK, UNAVAILABLE, Connection, Member
from scheduler.store import StoreUnavailable

log = logging.getLogger(__name__)

INBOX_CHANNEL = "segmapd_inbox"

_T = TypeVar("_T")


class ShardLeases(Leases):
    """One instance's membership and leases on the journal's database."""

    def __init__(self, store: Member, lease_s: float, name: str = "") -> None:
        self._store = store
        self.lease_s = lease_s
        self.name = name or f"{socket.gethostname()} pid {os.getpid()}"
        self.instance_id: int | None = None
        self._listener: asyncpg.Connection | None = None
        self._beat = _Session()
        self._takeover = _Session()

    def __repr__(self) -> str:
        return f"ShardLeases({self.name!r}, instance {self.instance_id})"

    async def join(self) -> int:
        """Become a member: a new instance id, which every commit of this store checks.

        An instance joining again (it was fenced: declared dead, or cut off from the database
        for longer than its lease) ends its previous membership in the same transaction, as a
        takeover would: its shards are free at once, and nothing still under way under the old
        id can commit after this.
        """
        previous = self.instance_id

        async def join(connection: Connection) -> int:
            async with connection.transaction():
                if previous is not None:
                    await _end_membership(connection, previous)
                new: int = await connection.fetchval(
                    "INSERT INTO segmapd_instances (name) VALUES ($1) RETURNING id", self.name
                )
            return new

        # The takeover session: ending the old membership may wait for a commit of it to end.
        self.instance_id = await self._run(
            join, "joining" if previous is None else "joining again", takeover=True
        )
        self._store.instance_id = self.instance_id
        return self.instance_id

    async def heartbeat(self) -> Heartbeat | None:
        """Renew this instance and its leases; None if it was declared dead (fenced)."""
        me = self._me()

        async def renew(connection: Connection) -> Heartbeat | None:
            async with connection.transaction():
                alive = await connection.fetchval(
                    "UPDATE segmapd_instances SET heartbeat_at = now() WHERE id = $1 RETURNING id",
                    me,
                )
                if alive is None:
                    return None
                owned = await connection.fetch(
                    "UPDATE segmapd_shards SET lease_until = now() + make_interval(secs => $2) "
                    "WHERE owner = $1 RETURNING shard",
                    me,
                    self.lease_s,
                )
                live = await connection.fetchval(
                    "SELECT count(*) FROM segmapd_instances "
                    "WHERE heartbeat_at > now() - make_interval(secs => $1)",
                    self.lease_s,
                )
            return Heartbeat(frozenset(int(r[0]) for r in owned), max(1, int(live)))

        return await self._run(renew, "heartbeat")

    async def take(self, wanted: int) -> dict[int, int]:
        """Declare dead instances dead, then take up to `wanted` free shards: {shard: epoch}."""
        me = self._me()

        async def take(connection: Connection) -> dict[int, int]:
            async with connection.transaction():
                # In id order: two instances declaring the same two dead lock them alike.
                dead = await connection.fetch(
                    "SELECT id FROM segmapd_instances "
                    "WHERE heartbeat_at < now() - make_interval(secs => $1) AND id <> $2 "
                    "ORDER BY id",
                    self.lease_s,
                    me,
                )
                for (instance,) in dead:
                    gone = await _end_membership(connection, int(instance), self.lease_s)
                    if gone:
                        log.warning(
                            "cluster: instance %d missed its heartbeats for %g s: declared "
                            "dead, its shards are free",
                            instance,
                            self.lease_s,
                        )
                if wanted <= 0:
                    return {}
                rows = await connection.fetch(
                    "UPDATE segmapd_shards SET owner = $1, epoch = epoch + 1, "
                    "lease_until = now() + make_interval(secs => $2) WHERE shard IN ("
                    "SELECT shard FROM segmapd_shards s WHERE s.owner IS NULL OR NOT EXISTS "
                    "(SELECT 1 FROM segmapd_instances i WHERE i.id = s.owner) "
                    "ORDER BY shard LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING shard, epoch",
                    me,
                    self.lease_s,
                    wanted,
                )
            return {int(shard): int(epoch) for shard, epoch in rows}

        return await self._run(take, "taking shards", takeover=True)

    async def release(self, shards: Sequence[int]) -> None:
        """Give shards up (their work is committed): another instance may take them at once."""
        me = self._me()
        await self._run(
            lambda c: c.execute(
                "UPDATE segmapd_shards SET owner = NULL, lease_until = '-infinity' "
                "WHERE owner = $1 AND shard = ANY($2::int4[])",
                me,
                list(shards),
            ),
            "releasing shards",
            takeover=True,
        )

    async def leave(self) -> None:
        """Release every shard and end the membership (a clean stop)."""
        me = self.instance_id
        if me is None:
            return
        # Commits from here are unfenced: they carry no state of a shard (the cluster holds
        # none by now), and one racing the deletion must not find itself declared dead.
        self._store.instance_id = None

        async def leave(connection: Connection) -> None:
            async with connection.transaction():
                await connection.execute("DELETE FROM segmapd_instances WHERE id = $1", me)
                await connection.execute(
                    "UPDATE segmapd_shards SET owner = NULL, lease_until = '-infinity' "
                    "WHERE owner = $1",
                    me,
                )

        try:
            await self._run(leave, "leaving")
        except StoreUnavailable:
            self._store.instance_id = me
            raise
        self.instance_id = None

    async def members(self) -> list[tuple[int, str, int]]:
        """Live members as (id, name, shards owned), for the status of the cluster."""
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT i.id, i.name, count(s.shard) FROM segmapd_instances i "
                "LEFT JOIN segmapd_shards s ON s.owner = i.id "
                "WHERE i.heartbeat_at > now() - make_interval(secs => $1) "
                "GROUP BY i.id, i.name ORDER BY i.id",
                self.lease_s,
            ),
            "reading members",
        )
        return [(int(i), str(n), int(c)) for i, n, c in rows]

    async def listen(self, on_shard: Callable[[int], None]) -> bool:
        """Be woken when changes are forwarded to a shard (LISTEN); False if it cannot now.

        Polling covers what a lost connection misses: a notification is a hint, the inbox table
        is the truth.
        """
        if self._listener is not None and not self._listener.is_closed():
            return True

        def notified(_connection: object, _pid: int, _channel: str, payload: object) -> None:
            with contextlib.suppress(ValueError, TypeError):
                on_shard(int(str(payload)))

        connection: asyncpg.Connection | None = None
        try:
            connection = await self._store.connect()
            await connection.add_listener(INBOX_CHANNEL, notified)
        except BaseException as exc:
            if connection is not None:
                # Not kept, so not left open (cancelled at a stop, or the server went away).
                connection.terminate()
            if not isinstance(exc, UNAVAILABLE):
                raise
            log.info("cluster: cannot listen for forwarded work (%s); polling", type(exc).__name__)
            return False
        self._listener = connection
        return True

    async def close(self) -> None:
        """Stop listening and close the lease connection."""
        for session in (self._beat, self._takeover):
            connection, session.connection = session.connection, None
            if connection is not None and not connection.is_closed():
                with contextlib.suppress(*UNAVAILABLE):
                    await asyncio.wait_for(connection.close(), CONNECT_TIMEOUT_S)
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            with contextlib.suppress(*UNAVAILABLE):
                await asyncio.wait_for(listener.close(), CONNECT_TIMEOUT_S)

    def _me(self) -> int:
        if self.instance_id is None:
            raise StoreUnavailable("this instance has not joined")
        return self.instance_id

    async def _run(
        self,
        work: Callable[[Connection], Awaitable[_T]],
        what: str,
        *,
        takeover: bool = False,
    ) -> _T:
        # Connections of their own: a heartbeat must not queue behind the journal's commits
        # and reads for a pooled one, nor behind a takeover waiting for a dead instance's last
        # commit (a late heartbeat gets an instance declared dead).
        session = self._takeover if takeover else self._beat
        # A takeover may wait for the server to end a paused instance's transaction.
        timeout = self.lease_s * 2 if takeover else self.lease_s
        try:
            async with session.lock:
                connection = session.connection
                if connection is None or connection.is_closed():
                    session.connection = connection = await self._store.connect()
                try:
                    return await asyncio.wait_for(work(connection), timeout)
                except BaseException:
                    # Work cut off (cancelled at a clean stop, timed out, failed) may leave the
                    # session inside a transaction that nothing will end: asyncpg keeps even a
                    # cancelled BEGIN as the open transaction, and nests every later one in a
                    # savepoint that never commits (a leave or heartbeat that never lands).
                    # The session is not reused. (Terminating also drops a cancel request
                    # still on its way: a statement that was not cut off may then complete,
                    # which is as safe as any answer lost on the way.)
                    session.connection = None
                    if not connection.is_closed():
                        connection.terminate()
                    raise
        except (*UNAVAILABLE, StoreUnavailable) as exc:
            raise StoreUnavailable(
                f"{what} failed ({type(exc).__name__}: {str(exc).strip()[:200]})"
            ) from None


async def _end_membership(
    connection: Connection, instance: int, silent_for_s: float | None = None
) -> bool:
    """Delete an instance's row so that none of its commits lands after this transaction.

    With `silent_for_s`, only if its heartbeat is older than that (declaring it dead); without,
    in any case (the instance itself joining again). Whether the row was deleted.
    """
    key = instance % 2_147_483_647
    # A commit of that instance still under way holds the lock shared: if the instance is
    # paused mid-commit (even mid-message, where the server cannot tell it idle), it would hold
    # it for as long as it is paused. Its membership ends: its sessions are ended, and the
    # commit with them. (Only shared holders: another instance ending the same membership at
    # the same moment holds it exclusively, and is waited for instead.)
    await connection.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE "
        "locktype = 'advisory' AND classid = $1 AND objid = $2 "
        "AND objsubid = 2 AND mode = 'ShareLock' AND granted AND pid <> pg_backend_pid()",
        EPOCH_LOCK,
        key,
    )
    # Every later commit of it finds its row gone.
    await connection.execute("SELECT pg_advisory_xact_lock($1, $2)", EPOCH_LOCK, key)
    if silent_for_s is None:
        gone = await connection.fetchval(
            "DELETE FROM segmapd_instances WHERE id = $1 RETURNING id", instance
        )
    else:
        gone = await connection.fetchval(
            "DELETE FROM segmapd_instances WHERE id = $1 "
            "AND heartbeat_at < now() - make_interval(secs => $2) RETURNING id",
            instance,
            silent_for_s,
        )
    return gone is not None


class _Session:
    """A connection of the leases' own, and the lock that gives it one statement at a time."""

    __slots__ = ("connection", "lock")

    def __init__(self) -> None:
        self.connection: asyncpg.Connection | None = None
        self.lock = asyncio.Lock()
