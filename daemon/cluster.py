"""Several instances on one PostgreSQL journal: segment ownership, forwarded work, takeovers.

Segments hash onto 64 shards (daemon/store/shards.py). Each live instance leases a fair share
of them (daemon/store/leases.py) and is the only one to batch, write and validate their
segments, so that one segment's work is coalesced in one place and batches stay full whichever
instance the load balancer gave the webhooks to. A change for a segment owned elsewhere is
forwarded through the journal's inbox, in the webhook's own transaction, and its owner, woken by
LISTEN/NOTIFY (or by polling, every `INBOX_POLL_S`), takes it into its engine and deletes it in
one transaction with what it became.

Every half second (or third of the lease time, if shorter) an instance renews its heartbeat
and leases; as often, and independently (taking shards may mean loading much work), it declares
dead the instances whose heartbeats are older than the lease, and moves towards its fair share:
it takes free shards (recovering their work from the journal exactly as a restart recovers it:
saved batches resent under their keys, queued and retrying work buffered, written work
validated) or hands shards over (its requests in flight for them end first; the rest stays
journaled for the next owner).

An instance found dead by the others (it was paused, or cut off from the database, for longer
than the lease) commits nothing more: its commits are refused. When it notices (its heartbeat
finds its membership gone, or a commit is refused), or when its own heartbeats have failed for
nearly a lease (the others may take its shards at the lease: it stops before), it fences
itself, without exiting: it cancels every request in flight and every retry (their batches are
journaled, and the new owners resend them under the same keys, which CXone replays), drops
every segment from memory without recording anything, discards what its journal had not
committed (nothing of it was acknowledged: a webhook is answered after its commit), and refuses
work (503 + Retry-After) while `/readyz` says so. Then it waits for the database and joins again
as a new member, ending its old membership if nobody has yet, and takes its fair share of shards
like any newcomer: their work comes back from the journal as in a takeover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from daemon.contact_holds import ContactHolds
from daemon.metrics import Metrics
from daemon.notifier import Notifier
from daemon.store.base import SharedJournal
from daemon.store.pending import InboxRow
from daemon.store.shards import SHARDS, shard_of
from scheduler.engine import Engine
from scheduler.model import FailureReason, Intent, Lane
from scheduler.ownership import ForwardedChange
from scheduler.store import StoreUnavailable
from scheduler.validation_state import MemoryConfirmationCache

log = logging.getLogger(__name__)

#: The inbox is read this often even when no notification came (a lost LISTEN connection).
INBOX_POLL_S = 1.0
#: At most this many forwarded changes are taken into the engine per transaction.
INBOX_BATCH = 5_000
#: Orphaned notifications (their deliverer died) are looked for this often.
NOTIFICATION_SWEEP_S = 10.0
#: Heartbeats go every third of the lease, and at least this often; so do the rounds that
#: declare the dead dead and take or hand over shards (joins and failovers settle fast).
HEARTBEAT_MAX_S = 0.5
#: A handover the database cannot record yet is tried again with backoff, up to this.
HANDOVER_RETRY_MOST_S = 5.0
#: An instance whose heartbeats have failed for its lease less this (or a quarter of the lease,
#: if shorter) fences itself: the others may declare it dead at the lease, and what it sends
#: must have stopped by then.
SELF_FENCE_MARGIN_S = 1.0
#: A fenced instance tries to join again this often at first, backing off to the second value
#: while the database does not answer.
REJOIN_FIRST_S = 0.25
REJOIN_MOST_S = 1.0


class ShardOwnership:
    """The engine's `Ownership` on a shared journal: the shards this instance leases.

    Built before the engine (which asks it), changed only by the `Cluster`'s lease loop. A
    shard being handed over is in both `owned` and `releasing`: its states are still recorded
    here (`holds`), but new work for it is forwarded (`owns` is false).
    """

    def __init__(self, store: SharedJournal, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self.owned: set[int] = set()
        self.releasing: set[int] = set()

    def owns(self, segment_id: str) -> bool:
        """Whether new work for the segment is batched here."""
        shard = shard_of(segment_id)
        return shard in self.owned and shard not in self.releasing

    def holds(self, segment_id: str) -> bool:
        """Whether this instance may still record the segment's states (owned or handing over)."""
        return shard_of(segment_id) in self.owned

    def forward(self, change: ForwardedChange) -> None:
        """Journal the change for its segment's owner (committed with the webhook)."""
        self._store.forward(change)
        self._metrics.record_forwarded()


#: The shard whose holder leads (`Cluster.leads`).
LEADER_SHARD = 0


class Cluster:
    """An instance's part of the cluster: the lease loop, forwarded work, fencing."""

    def __init__(
        self,
        *,
        store: SharedJournal,
        ownership: ShardOwnership,
        engine: Engine,
        cache: MemoryConfirmationCache,
        metrics: Metrics,
        lease_s: float,
        contact_limit: int,
        handover_budget_s: float,
        name: str = "",
        notifier: Notifier | None = None,
        holds: ContactHolds | None = None,
    ) -> None:
        self._store = store
        self._engine = engine
        # Changes are taken under the contacts' holds, as the intake takes them.
        self._holds = holds if holds is not None else ContactHolds()
        self._cache = cache
        self._metrics = metrics
        self._notifier = notifier
        self._contact_limit = contact_limit
        self._handover_budget_s = handover_budget_s
        self.leases = store.leases(lease_s, name)
        self.lease_s = lease_s
        # Shards whose leases this instance holds; those being handed over are in both (the
        # sets of `ownership`, which the engine asks).
        self._ownership = ownership
        self._owned = ownership.owned
        self._releasing = ownership.releasing
        self.live_instances = 1
        self._inbox_wake = asyncio.Event()
        self._taking: set[int] = set()  # inbox rows taken, their deletion not committed yet
        self._tasks: list[asyncio.Task[None]] = []
        self._handover: asyncio.Task[None] | None = None
        self._stopping = False
        # Fenced: this membership is over (or about to be); the instance owns nothing, refuses
        # work, and joins again as a new member. `_membership` counts the memberships so far:
        # what an await began under an earlier one is not applied to the next.
        self._fenced = False
        self.fence_reason = ""
        self._fenced_at = 0.0
        self._membership = 0
        # When the last successful heartbeat was sent (monotonic), and how long they may fail
        # before this instance fences itself.
        self._last_beat = time.monotonic()
        self._interval = min(lease_s / 3, HEARTBEAT_MAX_S)
        self._self_fence_s = lease_s - min(SELF_FENCE_MARGIN_S, lease_s / 4)
        self._balance_wake = asyncio.Event()
        # An outage fails every heartbeat and round: said once, and again when it changes.
        self._beat_failures = _Failures("heartbeats")
        self._round_failures = _Failures("taking and handing over shards")
        self._join_failures = _Failures("joining again (fenced)")
        store.holds = ownership.holds
        store.holds_shard = self._owned.__contains__
        store.on_fenced = self._declared_dead
        metrics.bind_cluster(
            owned=lambda: len(self._owned),
            instances=lambda: self.live_instances,
            fenced=lambda: self._fenced,
        )

    def __repr__(self) -> str:
        return f"Cluster({self.leases!r}, {len(self._owned)} shards)"

    @property
    def fenced(self) -> bool:
        """Whether this instance is fenced: it owns nothing and takes no work until it rejoins."""
        return self._fenced

    def owns(self, segment_id: str) -> bool:
        """Whether new work for the segment is batched here (`ShardOwnership.owns`)."""
        return self._ownership.owns(segment_id)

    def leads(self) -> bool:
        """Whether this instance runs what the cluster runs once (drift reconcile's passes).

        The holder of `LEADER_SHARD`: one instance at most holds it, and when that one dies or
        is fenced a survivor takes it over with the shard's lease.
        """
        return (
            not self._fenced and LEADER_SHARD in self._owned and LEADER_SHARD not in self._releasing
        )

    @property
    def owned_shards(self) -> frozenset[int]:
        """The shards this instance leases now, those being handed over included (read only)."""
        return frozenset(self._owned)

    @property
    def releasing_shards(self) -> frozenset[int]:
        """The shards this instance is handing over now (read only)."""
        return frozenset(self._releasing)

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Join, take a fair share of the shards (recovering their work), start the loops."""
        await self.leases.join()
        self._last_beat = time.monotonic()
        log.info(
            "cluster: joined as instance %d (%s), lease %g s",
            self.leases.instance_id,
            self.leases.name,
            self.lease_s,
        )
        await self._beat()
        await self._balance()
        await self.leases.listen(self._notified)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._heartbeat_loop(), name="cluster-heartbeats"),
            loop.create_task(self._self_fence_loop(), name="cluster-self-fence"),
            loop.create_task(self._lease_loop(), name="cluster-leases"),
            loop.create_task(self._inbox_loop(), name="cluster-inbox"),
        ]
        if self._notifier is not None:
            self._tasks.append(loop.create_task(self._sweep_loop(), name="cluster-notifications"))

    async def stop(self) -> None:
        """Stop the loops, release every shard and leave (after the engine's final flush)."""
        self._stopping = True
        tasks = [t for t in [*self._tasks, self._handover] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        self._handover = None
        try:
            if self._fenced or self.leases.instance_id is None:
                return
            await self._store.flush()
            # Nothing of the shards is recorded from here: their next owner's states win.
            left = len(self._owned)
            self._owned.clear()
            await self.leases.leave()
        except StoreUnavailable as exc:
            # The leases expire by themselves: the others take the shards after lease_s.
            log.error("cluster: could not leave cleanly (%s); the leases will expire", exc)
            return
        finally:
            await self.leases.close()
        log.info("cluster: left, %d shards released", left)
        self._metrics.record_lease_change("released", left)

    # ---- heartbeats, and the fence -------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        # A loop of its own: a round that takes shards may load much work, and a heartbeat
        # waiting for it would get this instance declared dead, or fence it.
        while True:
            if self._fenced:
                if self._stopping:
                    return  # stopping: no new membership
                await self._rejoin()
                continue
            await asyncio.sleep(self._interval)
            try:
                await self._beat()
                self._beat_failures.ended()
            except StoreUnavailable as exc:
                # The database is away: nothing can be committed either. If it stays away
                # for nearly a lease, `_self_fence_loop` fences this instance.
                self._beat_failures.failed(exc)
            except Exception:  # a bug must not end the heartbeats: the others would take over
                log.exception("cluster: heartbeat failed")

    async def _beat(self) -> None:
        """Renew the membership and the leases; fence this instance if it was declared dead."""
        membership = self._membership
        started = time.monotonic()
        expected = set(self._owned)
        beat = await self.leases.heartbeat()
        if membership != self._membership:
            return  # fenced while it was renewed: the next membership beats for itself
        if beat is None:
            self._declared_dead()
            return
        # Only a takeover moves a lease away from a live holder: this one was declared dead
        # while it went on running (its heartbeat came too late). Shards taken or handed over
        # while the heartbeat was out are not counted.
        lost = (expected & self._owned) - beat.owned
        if lost:
            log.error("cluster: shards %s were taken over", sorted(lost))
            self._declared_dead()
            return
        self._last_beat = started
        if time.monotonic() - started > self.lease_s / 2:
            log.warning("cluster: a heartbeat took %.1f s", time.monotonic() - started)
        if beat.live_instances != self.live_instances:
            log.info("cluster: %d live instances", beat.live_instances)
        self.live_instances = beat.live_instances
        # The per-contact in-flight limit is the tenant's: each instance keeps its share.
        self._engine.set_contact_limit(self._contact_limit // beat.live_instances)

    async def _self_fence_loop(self) -> None:
        """Fence this instance once its heartbeats have failed for nearly a lease.

        The others may declare it dead when its last heartbeat is a lease old, and resend its
        work: by then it must have stopped sending. (A paused instance cannot; its commits are
        refused when it wakes, and it fences itself then.)
        """
        while True:
            left = self._last_beat + self._self_fence_s - time.monotonic()
            if left > 0 or self._fenced:
                await asyncio.sleep(max(left, self._interval))
                continue
            self._fence(
                "cut_off",
                f"no heartbeat reached the database for {time.monotonic() - self._last_beat:.1f} "
                f"s (the lease is {self.lease_s:g} s): the others may take its shards",
            )

    def _declared_dead(self) -> None:
        """The others declared this instance dead: its heartbeat or a commit was refused."""
        self._fence(
            "declared_dead",
            f"this instance was declared dead (silent for more than {self.lease_s:g} s) and its "
            "shards taken over",
        )

    def _fence(self, cause: str, reason: str) -> None:
        """Stop everything of this membership at once; `_rejoin` starts the next one.

        Synchronous, so that nothing runs between the steps: no shard is held any more (so
        nothing of any segment is recorded), the engine drops every segment and cancels every
        request in flight, and the journal drops what it had not committed.
        """
        if self._fenced:
            return
        self._fenced = True
        self._membership += 1
        self._fenced_at = time.monotonic()
        self.fence_reason = reason
        lost = len(self._owned)
        self._owned.clear()
        self._releasing.clear()
        self._taking.clear()
        handover, self._handover = self._handover, None
        if handover is not None and handover is not asyncio.current_task():
            handover.cancel()
        let_go = self._engine.abandon()
        self._cache.clear()
        dropped = self._store.discard_pending()
        self._metrics.record_lease_change("lost", lost)
        self._metrics.record_fenced(cause)
        log.error(
            "cluster: %s; fenced: %d shards, %d assignments dropped from memory (their work is "
            "in the journal for the next owners), %d uncommitted changes discarded; it refuses "
            "work and joins again as a new member once the database answers",
            reason,
            lost,
            let_go,
            dropped,
        )

    async def _rejoin(self) -> None:
        """Join again as a new member, once the database answers (the old membership ends)."""
        delay = REJOIN_FIRST_S
        while True:
            try:
                await self.leases.join()
                break
            except StoreUnavailable as exc:
                self._join_failures.failed(exc)
            except Exception:  # a bug must not keep the instance fenced for ever
                log.exception("cluster: joining again failed")
            await asyncio.sleep(delay)
            delay = min(delay * 2, REJOIN_MOST_S)
        self._join_failures.ended()
        self._last_beat = time.monotonic()
        self._fenced = False
        self.fence_reason = ""
        log.warning(
            "cluster: joined again as instance %d after %.1f s fenced; taking a fair share of "
            "the shards",
            self.leases.instance_id,
            time.monotonic() - self._fenced_at,
        )
        self._balance_wake.set()

    # ---- the lease loop ----------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        # At least every half second: a death is seen (and the shards moved) within about
        # lease_s + 0.5 s by every survivor, not one heartbeat phase after another.
        while True:
            self._balance_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._balance_wake.wait(), self._interval)
            if self._fenced:
                continue
            try:
                await self._balance()
                self._round_failures.ended()
            except StoreUnavailable as exc:
                # The database is away: nothing can be committed either, so nothing is done
                # that the leases do not cover. Their expiry is the others' business.
                self._round_failures.failed(exc)
            except Exception:  # a bug must not end the takeovers
                log.exception("cluster: lease round failed")

    def _fair_share(self) -> int:
        return math.ceil(SHARDS / max(1, self.live_instances))

    async def _balance(self) -> None:
        """Declare the dead dead, and take free shards or hand some over, to the fair share."""
        fair = self._fair_share()
        if self._stopping or (not self._engine.accepting and self._owned):
            await self.leases.take(0)  # still declare the dead dead: their shards free up
            return
        if len(self._owned) > fair:
            if self._handover is None or self._handover.done():
                extra = sorted(self._owned - self._releasing)[fair:]
                self._handover = asyncio.get_running_loop().create_task(
                    self._hand_over(set(extra)), name="cluster-handover"
                )
            return
        membership = self._membership
        taken = await self.leases.take(fair - len(self._owned))
        if taken and membership == self._membership:
            # (Taken under a membership since fenced: those leases ended with it.)
            await self._adopt(set(taken))

    async def _adopt(self, shards: set[int]) -> None:
        membership = self._membership
        started = time.monotonic()
        try:
            recovered = await self._store.load_segments(lambda s: shard_of(s) in shards)
        except StoreUnavailable:
            # Taken but not loaded: give them back, someone (maybe this one) takes them again.
            with contextlib.suppress(StoreUnavailable):
                await self.leases.release(sorted(shards))
            raise
        if membership != self._membership:
            return  # fenced while loading: the leases went with the membership
        self._owned |= shards
        self._cache.restore(recovered.confirmations, time.time())
        self._engine.adopt(recovered.assignments, recovered.batches, recovered.queued)
        self._metrics.record_lease_change("taken", len(shards))
        self._inbox_wake.set()
        log.info(
            "cluster: took %d shards (%d now) in %.2f s: %d queued, %d in flight or validating, "
            "%d saved batches",
            len(shards),
            len(self._owned),
            time.monotonic() - started,
            len(recovered.queued),
            len(recovered.assignments),
            len(recovered.batches),
        )

    async def _hand_over(self, shards: set[int]) -> None:
        membership = self._membership
        self._releasing |= shards
        try:
            segments = {s for s in self._engine.segments() if shard_of(s) in shards}
            await self._engine.release_segments(segments, self._handover_budget_s)
            delay = 0.25
            while True:
                if membership != self._membership:
                    return  # fenced meanwhile: the shards went with the membership
                # Until the database takes both steps: a shard dropped here but still leased
                # in the database would be worked by nobody.
                try:
                    await self._store.flush()
                    self._owned -= shards  # nothing more of them is recorded from here
                    await self.leases.release(sorted(shards))
                    break
                except StoreUnavailable as exc:
                    log.warning("cluster: handing %d shards over: %s; retrying", len(shards), exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, HANDOVER_RETRY_MOST_S)
        finally:
            self._releasing -= shards
        self._metrics.record_lease_change("released", len(shards))
        log.info("cluster: handed %d shards over (%d now)", len(shards), len(self._owned))

    # ---- forwarded work ------------------------------------------------------------------------

    def _notified(self, shard: int) -> None:
        if shard in self._owned:
            self._inbox_wake.set()

    async def _inbox_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._inbox_wake.wait(), INBOX_POLL_S)
            self._inbox_wake.clear()
            try:
                while await self._take_inbox():
                    pass
                await self.leases.listen(self._notified)
            except StoreUnavailable as exc:
                log.info("cluster: reading forwarded work failed (%s)", exc)
            except Exception:  # a bug must not end the intake of forwarded work
                log.exception("cluster: taking forwarded work failed")

    async def _take_inbox(self) -> bool:
        """Take one batch of forwarded changes into the engine; whether there may be more."""
        if not self._engine.accepting or self._engine.overloaded:
            # Above the high-water mark the inbox holds the backlog, durably, not memory.
            return False
        shards = sorted(self._owned - self._releasing)
        if not shards:
            return False
        rows = [
            (row_id, row)
            for row_id, row in await self._store.read_inbox(shards, INBOX_BATCH)
            if row_id not in self._taking
        ]
        if not rows:
            return False
        contacts = list({row[1] for _, row in rows})
        with await self._holds.hold(contacts):
            return await self._take_rows(rows, contacts)

    async def _take_rows(self, rows: list[tuple[int, InboxRow]], contacts: list[str]) -> bool:
        """`_take_inbox` with the rows' contacts held: their histories, then the changes."""
        histories = await self._store.histories(contacts)
        # The awaits above may have seen shards go: what is no longer owned waits for its owner.
        mine = [
            (i, row) for i, row in rows if row[0] in self._owned and row[0] not in self._releasing
        ]
        if not mine or not self._engine.accepting:
            return False
        changes = [
            ForwardedChange(
                contact_id=contact_id,
                segment_id=segment_id,
                intent=Intent(intent),
                occurred_at=occurred_at,
                received_at=received_at,
                reason=FailureReason(reason) if reason else None,
                message=message,
                lane=Lane(lane),
                repair=repair,
                source=source,
            )
            for _, (
                _,
                contact_id,
                segment_id,
                intent,
                occurred_at,
                received_at,
                reason,
                message,
                lane,
                repair,
                source,
            ) in mine
        ]
        self._engine.submit_forwarded(
            changes,
            {c: (h.assignments, h.mirrored_at) for c, h in histories.items()},
        )
        ids = [i for i, _ in mine]
        # In the same transaction as the states the changes became: taken exactly once.
        self._store.consume_inbox([(i, row[0]) for i, row in mine])
        self._taking.update(ids)
        self._metrics.record_inbox_taken(len(ids))
        try:
            await self._store.flush()
        except StoreUnavailable:
            return False  # committed when the journal returns; `_taking` keeps them out
        self._taking.difference_update(ids)
        return len(rows) >= INBOX_BATCH

    # ---- notifications whose deliverer died ---------------------------------------------------

    async def _sweep_loop(self) -> None:
        assert self._notifier is not None
        while True:
            if self._fenced:  # a claim under a membership that is over is anyone's at once
                await asyncio.sleep(NOTIFICATION_SWEEP_S)
                continue
            try:
                found = await self._store.claim_notifications(100)
            except StoreUnavailable as exc:
                log.info("cluster: looking for undelivered notifications failed (%s)", exc)
                await asyncio.sleep(NOTIFICATION_SWEEP_S)
                continue
            except Exception:
                log.exception("cluster: looking for undelivered notifications failed")
                await asyncio.sleep(NOTIFICATION_SWEEP_S)
                continue
            for event_id, body in found:
                self._notifier.resend(event_id, body)
            if found:
                log.info("cluster: took %d undelivered notifications over", len(found))
            await asyncio.sleep(NOTIFICATION_SWEEP_S)


class _Failures:
    """One loop's failures in a row, logged when they start or change and when they end."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._last = ""
        self._count = 0

    def failed(self, exc: Exception) -> None:
        """Another failure: a warning if it is the first or says something new."""
        self._count += 1
        message = str(exc)
        if message != self._last:
            log.warning("cluster: %s", message)
            self._last = message

    def ended(self) -> None:
        """The loop works again: say so if it had failed."""
        if self._count:
            log.info("cluster: %s work again after %d failures", self._what, self._count)
        self._last, self._count = "", 0
