"""The sender: takes batches from the accumulator and writes them to CXone, outcomes to the ledger.

One flush loop picks the batch key whose batch is due (full, lingered, or early when the write gate
has room), waits for the write gate, then takes the fullest batch the limit allows and sends it
in a task of its own: one bulk request per batch, per-item outcomes, retries, single-write
fallback. Every attempt -- first send, resend, retry of failed ids, single-contact fallback --
passes the rate gate of its endpoint class. A 429 pauses the whole class and costs no attempt
(nothing was applied). A whole-request failure (5xx, timeout, reset) resends the same body under
the same idempotency key, so a write that did land is replayed, not applied twice. Item failures
that may succeed later go back to the accumulator as retry ids, where they join the segment's
next batch under a new key, because the body is different.

Outcomes go to the ledger; written pairs then go to the verifier. If the flush loop itself dies
(every iteration's error is caught, so that is a bug), every waiter fails at once (aiokafka's
`_fail_all`) instead of hanging on a writer that no longer moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, Protocol

from scheduler.accumulator import Accumulator
from scheduler.idempotency import new_batch_key, new_single_key
from scheduler.ledger import Ledger
from scheduler.logthrottle import ThrottledLog
from scheduler.model import Assignment, BatchKey, FailureReason, Intent
from scheduler.observer import EngineObserver
from scheduler.retry import RetryPolicy
from scheduler.store import BatchRecord, Store
from scheduler.upstream import (
    LOCAL_RESOURCE_WAIT_S,
    BulkResult,
    CXoneClient,
    LocalResourceError,
    RateLimited,
    SegmentNotFound,
    TransientError,
    UpstreamError,
    outcome_of,
    seconds_since,
)
from scheduler.waiters import Waiters

log = logging.getLogger(__name__)

# A resend that finds its key still being processed by CXone has not failed: the original request
# is still running. Such answers wait like a backoff but do not use up attempts, within this cap.
MAX_IN_PROGRESS_WAITS = 20
# A batch whose record the journal could not commit goes back to the buffer for this long.
JOURNAL_RETRY_S = 1.0

# Item error codes (CONTRACT.md section 2) and what they mean for the assignment.
# Per-item answers that mean the intent already holds: the membership is there (add), or is not
# (removal).
ITEM_WRITTEN = {
    Intent.ADD: frozenset({"ContactAlreadyInSegment"}),
    Intent.REMOVE: frozenset({"ContactNotInSegment"}),
}
ITEM_PERMANENT = {
    "ContactNotFound": FailureReason.CONTACT_NOT_FOUND,
    "InvalidContactId": FailureReason.INVALID_CONTACT_ID,
}


class Gate(Protocol):
    """Admission for one endpoint class (see scheduler.ratelimit.RateGate)."""

    rate_per_s: float

    async def acquire(self) -> None:
        """Wait until a request may be sent."""
        ...

    def pause(self, seconds: float) -> None:
        """Hold every request of the class for `seconds`."""
        ...

    def has_capacity(self) -> bool:
        """Whether a request could go now without waiting."""
        ...


class Verifier(Protocol):
    """What the sender hands written pairs to (the validation poller)."""

    def watch(self, assignments: list[Assignment]) -> None:
        """Start confirming these written assignments; outcomes go to the ledger."""
        ...

    def settle(self, assignments: list[Assignment], message: str) -> None:
        """Read these pairs, whose last write's outcome is unknown, until CXone shows them."""
        ...


class Sender:
    """The flush loop, the sends in flight, and what each send's answer means for its ids.

    Without a verifier a pair's journey ends at `written`; with one, written pairs go to it.
    """

    def __init__(
        self,
        *,
        client: CXoneClient,
        store: Store,
        ledger: Ledger,
        accumulator: Accumulator,
        waiters: Waiters,
        write_gate: Gate,
        single_gate: Gate,
        retry: RetryPolicy,
        rng: random.Random,
        observer: EngineObserver,
        verifier: Verifier | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._store = store
        self._ledger = ledger
        self._accumulator = accumulator
        self._waiters = waiters
        self._write_gate = write_gate
        self._single_gate = single_gate
        self._retry = retry
        self._rng = rng
        self._observer = observer
        self._verifier = verifier
        self._wall = wall_clock
        self._clock = clock
        self._sleep = sleep
        # CXone's per-item refusals come from the CRM's data: warned about, at a bounded rate.
        self._dead_letters = ThrottledLog(log)
        self._tasks: set[asyncio.Task[None]] = set()
        # Sends in flight per segment, so that a handover can wait for its segments' outcomes.
        self._sending: dict[str, set[asyncio.Task[None]]] = {}
        # Segments being handed over: nothing new is batched for them (see `drain`).
        self._releasing: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._draining = False
        #: Why the flush loop died, once it has (a bug: its iterations catch their errors).
        self.failure: BaseException | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the flush loop was started and has not been stopped."""
        return self._flusher is not None

    def start(self) -> None:
        """Start the flush loop (idempotent)."""
        if self._flusher is not None:
            return
        self._flusher = asyncio.create_task(self._flush_loop(), name="segmap-flusher")
        self._flusher.add_done_callback(self._on_flusher_done)

    async def stop(self, budget_s: float) -> None:
        """Send what is buffered, wait for in-flight sends, then cancel the rest; idempotent.

        Ids still waiting for a backoff keep their `retrying` state in the journal, which is
        where a durable journal's recovery picks them up.
        """
        self._draining = True
        self._accumulator.wake()
        deadline = self._clock() + budget_s
        if self._flusher is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(
                    asyncio.shield(self._flusher), max(0.0, deadline - self._clock())
                )
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - self._clock()))
        self._accumulator.cancel_timers()
        leftovers = [t for t in [self._flusher, *self._tasks] if t is not None and not t.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.gather(*leftovers, return_exceptions=True)
            log.warning("engine stop: cancelled %d tasks past the budget", len(leftovers))
        self._flusher = None
        self._dead_letters.flush()

    def _on_flusher_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # The loop catches per-iteration errors; reaching here means it is dead. Fail every waiter
        # loudly instead of letting callers hang on an engine that no longer moves.
        self.failure = task.exception()
        log.critical("flusher died: %r", self.failure)
        self._waiters.fail_all(RuntimeError(f"engine failed: {self.failure!r}"))

    def resend(self, batches: list[BatchRecord]) -> None:
        """Send recovered batches again as they were (same ids, intent and key)."""
        for batch in batches:
            self.spawn(
                partial(self.send, batch, token_held=False),
                f"resend {batch.segment_id}",
                segment_id=batch.segment_id,
            )
        if batches:
            self._accumulator.wake()

    def segments(self) -> set[str]:
        """The segments with sends in flight."""
        return set(self._sending)

    async def drain(self, segments: set[str], budget_s: float) -> None:
        """Batch nothing new for `segments`, and let their sends in flight end (within budget).

        Past the budget a send is cancelled: its outcome is the next owner's to learn (the
        batch is journaled and resent under its key, which CXone replays).
        """
        self._releasing |= segments
        try:
            tasks = [t for s in segments for t in self._sending.get(s, ()) if not t.done()]
            if tasks:
                await asyncio.wait(tasks, timeout=budget_s)
            for task in tasks:
                if not task.done():
                    task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._releasing -= segments

    def abandon(self) -> None:
        """Cancel every send in flight and every retry timer now (this process lost its segments).

        Each send ends at its next step, where the ledger records nothing for a segment it no
        longer holds; its batch stays journaled and is resent under its key by the new owner.
        """
        for task in self._tasks:
            task.cancel()
        self._accumulator.cancel_timers()

    # ---- the flush loop ------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            # While draining, sends still running may put work back in the buffer (a contact's
            # parked segment released, ids failed for a retry): stop only once none is left.
            if self._draining and not self._accumulator and not self._tasks:
                return
            try:
                await self._flush_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # One bad iteration must not stop the writer; log it and go on.
                log.exception("flusher iteration failed")
                await asyncio.sleep(0.1)

    def _handed_over(self, batch_key: BatchKey) -> bool:
        return batch_key[0] in self._releasing

    async def _flush_once(self) -> None:
        accumulator = self._accumulator
        # The buffer keeps received (wall-clock) times, so linger is measured on that clock.
        now = self._wall()
        skip = self._handed_over if self._releasing else None
        batch_key = accumulator.pick(
            now,
            spare_capacity=self._write_gate.has_capacity(),
            draining=self._draining,
            skip=skip,
        )
        if batch_key is None:
            await accumulator.wait_for_data(now, skip)
            return
        await self._write_gate.acquire()
        # Choose again now that a request may go: under backlog the wait for the token is where
        # batches fill up, so the batch sent is the fullest the limit allows.
        skip = self._handed_over if self._releasing else None
        batch_key = (
            accumulator.pick(self._wall(), spare_capacity=True, draining=self._draining, skip=skip)
            or batch_key
        )
        if batch_key[0] in self._releasing:
            return  # handed over while this send waited for its token: the token goes unused
        entries = accumulator.take(batch_key)
        if not entries:
            return
        contact_ids = self._ledger.take_for_batch(batch_key, entries)
        batch = self.new_batch(batch_key, contact_ids)
        segment_id = batch_key[0]
        self.spawn(
            partial(self.send, batch, token_held=True), f"send {segment_id}", segment_id=segment_id
        )

    # ---- supervised tasks ----------------------------------------------------------------

    def spawn(
        self,
        coro_factory: Callable[[], Coroutine[Any, Any, None]],
        name: str,
        *,
        segment_id: str | None = None,
    ) -> None:
        """Run a background task that is kept referenced and whose failure is logged.

        `segment_id`: the task sends that segment's work (a handover waits for it).
        """
        task = asyncio.create_task(coro_factory(), name=name)
        self._tasks.add(task)
        if segment_id is not None:
            self._sending.setdefault(segment_id, set()).add(task)
            task.add_done_callback(partial(self._send_done, segment_id))
        task.add_done_callback(self._task_done)

    def _send_done(self, segment_id: str, task: asyncio.Task[None]) -> None:
        tasks = self._sending.get(segment_id)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._sending[segment_id]

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._draining:
            self._accumulator.wake()  # the flusher may be waiting for the last send to end
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # ---- outcomes ------------------------------------------------------------------------

    def _written(self, batch_key: BatchKey, contact_ids: list[str]) -> None:
        """CXone holds these writes: to the verifier, or, with none, their journey ends."""
        written = self._ledger.written(batch_key, contact_ids)
        if self._verifier is not None:
            self._verifier.watch(written)
        else:
            for assignment in written:
                self._ledger.finish(assignment)

    def _uncertain(self, batch_key: BatchKey, contact_ids: list[str], message: str) -> None:
        """The last attempt's outcome is unknown: reads settle it (without a verifier, failed)."""
        if self._verifier is None:
            self._ledger.failed(batch_key, contact_ids, FailureReason.RETRIES_EXHAUSTED, message)
            return
        self._verifier.settle(self._ledger.uncertain(batch_key, contact_ids, message), message)

    def _requeue_later(self, batch_key: BatchKey, contact_ids: list[str], delay_s: float) -> None:
        """After the backoff the ids rejoin their batch key, if they are still waiting for it."""
        self._accumulator.requeue_later(
            batch_key, contact_ids, delay_s, self._ledger.still_retrying
        )

    # ---- one batch -----------------------------------------------------------------------

    def new_batch(self, batch_key: BatchKey, contact_ids: list[str]) -> BatchRecord:
        """A batch for ids never sent together before: a fresh idempotency key."""
        segment_id, intent = batch_key
        return BatchRecord(
            batch_id=uuid.uuid4().hex,
            segment_id=segment_id,
            contact_ids=tuple(contact_ids),
            idempotency_key=new_batch_key(segment_id),
            attempt=1,
            intent=intent,
        )

    async def send(self, batch: BatchRecord, *, token_held: bool) -> None:
        """Send the batch until every id has an outcome or has been handed to a retry."""
        segment_id = batch.segment_id
        batch_key = (segment_id, batch.intent)
        ids = list(batch.contact_ids)
        try:
            await self._store.save_batch(batch)
        except Exception as exc:  # the journal cannot commit: do not send what it cannot track
            log.warning(
                "segment %s: journal unavailable (%s); %d ids wait in the buffer",
                segment_id,
                exc,
                len(ids),
            )
            self._requeue_later(batch_key, ids, JOURNAL_RETRY_S)
            return
        self._ledger.sending(batch_key, ids)
        try:
            await self._send_until_settled(batch, ids, token_held=token_held)
        except asyncio.CancelledError:
            # Stopped mid-request (the drain budget ran out): whether CXone applied it is
            # unknown, so the batch stays in the journal and the next start resends it under
            # the same key, to be replayed rather than applied twice.
            raise
        except Exception:
            log.exception(
                "segment %s: sending a batch failed unexpectedly; ids retried", segment_id
            )
            self._ledger.retrying(batch_key, ids)
            self._requeue_later(batch_key, ids, JOURNAL_RETRY_S)
        await self._store.drop_batch(batch.batch_id)

    async def _send_until_settled(
        self, batch: BatchRecord, ids: list[str], *, token_held: bool
    ) -> None:
        """Send (and resend) until the ids have outcomes or were handed to retries."""
        segment_id = batch.segment_id
        batch_key = (segment_id, batch.intent)
        bulk_call = (
            self._client.bulk_add if batch.intent is Intent.ADD else self._client.bulk_remove
        )
        in_progress_waits = 0
        need_token = not token_held
        while True:
            if need_token:
                await self._write_gate.acquire()
            need_token = True
            self._observer.bulk_sent(segment_id, len(ids), batch.attempt)
            started = time.monotonic()
            try:
                result = await bulk_call(segment_id, ids, batch.idempotency_key)
            except LocalResourceError as exc:
                self._observer.upstream_outcome("bulk", "local", seconds_since(started))
                log.warning(
                    "segment %s: %s; sending again in %.0f s",
                    segment_id,
                    exc,
                    LOCAL_RESOURCE_WAIT_S,
                )
                await self._sleep(LOCAL_RESOURCE_WAIT_S)
                continue
            except RateLimited as exc:
                self._observer.upstream_outcome("bulk", "rate_limited", seconds_since(started))
                self._write_gate.pause(exc.retry_after_s)
                continue
            except SegmentNotFound as exc:
                self._observer.upstream_outcome("bulk", "permanent", seconds_since(started))
                self._dead_letters.warning(
                    str(FailureReason.SEGMENT_NOT_FOUND),
                    "segment %s: %d ids dead-lettered (segment_not_found): %s",
                    segment_id,
                    len(ids),
                    exc,
                )
                self._ledger.failed(batch_key, ids, FailureReason.SEGMENT_NOT_FOUND, str(exc))
                return
            except UpstreamError as exc:
                self._observer.upstream_outcome("bulk", outcome_of(exc), seconds_since(started))
                if isinstance(exc, TransientError):
                    # CXone may have applied it before failing to answer.
                    self._ledger.note_outcome_unknown(batch_key, ids)
                if exc.error == "IdempotencyKeyInProgress" and (
                    in_progress_waits < MAX_IN_PROGRESS_WAITS
                ):
                    in_progress_waits += 1
                    self._ledger.retrying(batch_key, ids)
                    await self._sleep(self._retry.delay(1, self._rng, exc.retry_after_s))
                    self._ledger.sending(batch_key, ids, new_attempt=False)
                    continue
                resend = await self._after_request_failure(batch, ids, exc)
                if resend is None:
                    return
                batch = resend
                continue
            self._observer.upstream_outcome("bulk", "ok", seconds_since(started))
            self._apply(batch_key, ids, result)
            return

    async def _after_request_failure(
        self, batch: BatchRecord, ids: list[str], exc: UpstreamError
    ) -> BatchRecord | None:
        """Decide what follows a failed request; returns the batch to resend, or None."""
        segment_id = batch.segment_id
        batch_key = (segment_id, batch.intent)
        if exc.error == "IdempotencyKeyReused":
            # Our own bug if it ever happens: never try to force the key, take a new one.
            log.error("idempotency key reused for segment %s; sending under a new key", segment_id)
        exhausted = [c for c in ids if self._retry.exhausted(self._ledger.attempts(batch_key, c))]
        remaining = [c for c in ids if c not in set(exhausted)]
        for contact_id in exhausted:
            self.spawn(
                partial(self.fallback, batch_key, contact_id, str(exc)),
                f"fallback {segment_id}",
                segment_id=segment_id,
            )
        if not remaining:
            return None
        failed_attempts = max(self._ledger.attempts(batch_key, c) for c in remaining)
        delay = self._retry.delay(failed_attempts, self._rng, exc.retry_after_s)
        self._observer.retry_scheduled(segment_id, len(remaining), delay)
        log.warning(
            "bulk write to %s failed (%s); %d ids again in %.1f s",
            segment_id,
            exc,
            len(remaining),
            delay,
        )
        if len(remaining) != len(ids) or exc.error == "IdempotencyKeyReused":
            # A different body needs a different key: the ids rejoin the buffer as retries.
            self._ledger.retrying(batch_key, remaining)
            self._requeue_later(batch_key, remaining, delay)
            return None
        self._ledger.retrying(batch_key, ids)
        await self._sleep(delay)
        resend = BatchRecord(
            batch_id=batch.batch_id,
            segment_id=segment_id,
            contact_ids=batch.contact_ids,
            idempotency_key=batch.idempotency_key,
            attempt=batch.attempt + 1,
            intent=batch.intent,
        )
        await self._store.save_batch(resend)
        self._ledger.sending(batch_key, ids)
        return resend

    def _apply(self, batch_key: BatchKey, ids: list[str], result: BulkResult) -> None:
        """Turn a 200 answer into per-id outcomes."""
        segment_id, intent = batch_key
        holds = ITEM_WRITTEN[intent]
        written_failures: list[str] = []
        retry: list[str] = []
        permanent: dict[FailureReason, list[str]] = {}
        messages: dict[FailureReason, str] = {}
        listed: set[str] = set()
        for item in result.failed:
            listed.add(item.contact_id)
            if item.error in holds:
                written_failures.append(item.contact_id)
            elif item.error in ITEM_PERMANENT:
                reason = ITEM_PERMANENT[item.error]
                permanent.setdefault(reason, []).append(item.contact_id)
                messages[reason] = f"{item.code} {item.error}: {item.message}".strip()
            else:
                # IndexBusy, DuplicateContactInBatch (we dedup, so never expected) and any code
                # this version does not know: try that id again.
                retry.append(item.contact_id)
        if result.failure_count > len(result.failed):
            # CXone masks failures past the first 200 ids; we never send more, so this means the
            # answer is not what the contract says. The poller will catch any id that is missing.
            log.error(
                "segment %s: failureCount %d but %d failures listed; unlisted ids counted written",
                segment_id,
                result.failure_count,
                len(result.failed),
            )
        written = [c for c in ids if c not in listed]
        written.extend(written_failures)
        if written:
            self._written(batch_key, written)
        for reason, contact_ids in permanent.items():
            self._dead_letters.warning(
                str(reason),
                "segment %s: %d %s dead-lettered (%s), e.g. contact %r: %s",
                segment_id,
                len(contact_ids),
                "removals" if intent is Intent.REMOVE else "adds",
                reason,
                contact_ids[0],
                messages[reason],
            )
            self._ledger.failed(batch_key, contact_ids, reason, messages[reason])
        if retry:
            self._retry_items(batch_key, retry)

    def _retry_items(self, batch_key: BatchKey, contact_ids: list[str]) -> None:
        """Item failures: retry those ids only, or fall back once they are out of attempts."""
        segment_id = batch_key[0]
        again: list[str] = []
        for contact_id in contact_ids:
            if self._retry.exhausted(self._ledger.attempts(batch_key, contact_id)):
                self.spawn(
                    partial(self.fallback, batch_key, contact_id, "item failed every attempt"),
                    f"fallback {segment_id}",
                    segment_id=segment_id,
                )
            else:
                again.append(contact_id)
        if not again:
            return
        failed_attempts = max(self._ledger.attempts(batch_key, c) for c in again)
        delay = self._retry.delay(failed_attempts, self._rng)
        self._observer.retry_scheduled(segment_id, len(again), delay)
        self._ledger.retrying(batch_key, again)
        self._requeue_later(batch_key, again, delay)

    async def fallback(self, batch_key: BatchKey, contact_id: str, last_error: str) -> None:
        """The last resort for an id that failed every bulk attempt: one single-contact write."""
        segment_id, intent = batch_key
        single_call = (
            self._client.single_add if intent is Intent.ADD else self._client.single_remove
        )
        log.error(
            "contact %s failed %d bulk writes to segment %s (last: %s); trying one single write",
            contact_id,
            self._ledger.attempts(batch_key, contact_id),
            segment_id,
            last_error,
        )
        key = new_single_key(segment_id, contact_id)
        self._ledger.sending(batch_key, [contact_id])
        while True:
            await self._single_gate.acquire()
            started = time.monotonic()
            try:
                result = await single_call(segment_id, contact_id, key)
            except LocalResourceError as exc:
                self._observer.upstream_outcome("single", "local", seconds_since(started))
                log.warning("contact %s: %s; sending again", contact_id, exc)
                await self._sleep(LOCAL_RESOURCE_WAIT_S)
                continue
            except RateLimited as exc:
                self._observer.upstream_outcome("single", "rate_limited", seconds_since(started))
                self._single_gate.pause(exc.retry_after_s)
                continue
            except SegmentNotFound as exc:
                self._observer.upstream_outcome("single", "permanent", seconds_since(started))
                self._dead_letters.warning(
                    str(FailureReason.SEGMENT_NOT_FOUND),
                    "segment %s: contact %r dead-lettered (segment_not_found): %s",
                    segment_id,
                    contact_id,
                    exc,
                )
                self._ledger.failed(
                    batch_key, [contact_id], FailureReason.SEGMENT_NOT_FOUND, str(exc)
                )
                return
            except UpstreamError as exc:
                self._observer.upstream_outcome("single", outcome_of(exc), seconds_since(started))
                self._not_written(
                    batch_key,
                    contact_id,
                    f"bulk: {last_error}; single write: {exc}",
                    unknown=isinstance(exc, TransientError),
                )
                return
            self._observer.upstream_outcome("single", "ok", seconds_since(started))
            break
        if result.error is None or result.error in ITEM_WRITTEN[intent]:
            log.error("single write of contact %s to segment %s succeeded", contact_id, segment_id)
            self._written(batch_key, [contact_id])
            return
        message = f"single write: {result.status} {result.error} {result.message}".strip()
        reason = ITEM_PERMANENT.get(result.error or "")
        if reason is None:
            # Refused for now (IndexBusy, ...): it did not apply, but an earlier attempt may have.
            self._not_written(batch_key, contact_id, message, unknown=False)
            return
        self._dead_letters.warning(
            str(reason),
            "segment %s: contact %r dead-lettered (%s): %s",
            segment_id,
            contact_id,
            reason,
            message,
        )
        self._ledger.failed(batch_key, [contact_id], reason, message)

    def _not_written(
        self, batch_key: BatchKey, contact_id: str, message: str, *, unknown: bool
    ) -> None:
        """The last resort did not write the id: failed, unless CXone may hold it all the same.

        It may when this answer leaves the outcome open (a 5xx, a timeout, a reset: `unknown`)
        or when an earlier attempt's did: then reads settle it, shown or not shown; otherwise
        it is dead-lettered as exhausted.
        """
        segment_id = batch_key[0]
        if unknown or self._ledger.outcome_unknown(batch_key, contact_id):
            log.error(
                "single write of contact %s to segment %s failed: %s; CXone may hold it all "
                "the same, reading the membership to settle it",
                contact_id,
                segment_id,
                message,
            )
            self._uncertain(batch_key, [contact_id], message)
            return
        log.error(
            "single write of contact %s to segment %s failed: %s; dead-lettered",
            contact_id,
            segment_id,
            message,
        )
        self._ledger.failed(batch_key, [contact_id], FailureReason.RETRIES_EXHAUSTED, message)
