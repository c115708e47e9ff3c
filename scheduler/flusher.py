"""Sending batches: one bulk request per batch, per-item outcomes, retries, single-write fallback.

Every attempt -- first send, resend, retry of failed ids, single-contact fallback -- passes the
rate gate of its endpoint class. A 429 pauses the whole class and costs no attempt (nothing was
applied). A whole-request failure (5xx, timeout, reset) resends the same body under the same
idempotency key, so a write that did land is replayed, not applied twice. Item failures that may
succeed later go back to the buffer as retry ids, where they join the segment's next batch under
a new key, because the body is different.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, Protocol

from scheduler.idempotency import new_batch_key, new_single_key
from scheduler.logthrottle import ThrottledLog
from scheduler.model import FailureReason, Intent, Lane
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


class Ledger(Protocol):
    """The engine's side of a send: it owns assignment state."""

    def mark_sending(self, lane: Lane, contact_ids: list[str], *, new_attempt: bool = True) -> None:
        """The ids are about to be sent; `new_attempt` counts one more attempt for each."""
        ...

    def mark_retrying(self, lane: Lane, contact_ids: list[str]) -> None:
        """The ids wait for a backoff before their next attempt."""
        ...

    def mark_written(self, lane: Lane, contact_ids: list[str]) -> None:
        """CXone accepted the ids (or already had them)."""
        ...

    def mark_failed(
        self, lane: Lane, contact_ids: list[str], reason: FailureReason, message: str
    ) -> None:
        """The ids cannot be written."""
        ...

    def mark_uncertain(self, lane: Lane, contact_ids: list[str], message: str) -> None:
        """The last attempt's outcome is unknown (5xx, timeout, reset): reads settle it.

        `message` is the failure to record if reads do not show the change.
        """
        ...

    def attempts(self, lane: Lane, contact_id: str) -> int:
        """Attempts made so far for one assignment."""
        ...

    def requeue_later(self, lane: Lane, contact_ids: list[str], delay_s: float) -> None:
        """Put the ids back in the buffer as retry ids once `delay_s` has passed."""
        ...

    def spawn(
        self,
        coro_factory: Callable[[], Coroutine[Any, Any, None]],
        name: str,
        *,
        segment_id: str | None = None,
    ) -> None:
        """Run a supervised background task (`segment_id`: it sends that segment's work)."""
        ...


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


class BatchSender:
    """Sends bulk batches and single-contact fallbacks, and reports outcomes to the ledger."""

    def __init__(
        self,
        *,
        client: CXoneClient,
        store: Store,
        ledger: Ledger,
        write_gate: Gate,
        single_gate: Gate,
        retry: RetryPolicy,
        rng: random.Random,
        observer: EngineObserver,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._client = client
        self._store = store
        self._ledger = ledger
        self._write_gate = write_gate
        self._single_gate = single_gate
        self._retry = retry
        self._rng = rng
        self._observer = observer
        self._sleep = sleep
        # CXone's per-item refusals come from the CRM's data: warned about, at a bounded rate.
        self._dead_letters = ThrottledLog(log)

    def new_batch(self, lane: Lane, contact_ids: list[str]) -> BatchRecord:
        """A batch for ids never sent together before: a fresh idempotency key."""
        segment_id, intent = lane
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
        lane = (segment_id, batch.intent)
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
            self._ledger.requeue_later(lane, ids, JOURNAL_RETRY_S)
            return
        self._ledger.mark_sending(lane, ids)
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
            self._ledger.mark_retrying(lane, ids)
            self._ledger.requeue_later(lane, ids, JOURNAL_RETRY_S)
        await self._store.drop_batch(batch.batch_id)

    async def _send_until_settled(
        self, batch: BatchRecord, ids: list[str], *, token_held: bool
    ) -> None:
        """Send (and resend) until the ids have outcomes or were handed to retries."""
        segment_id = batch.segment_id
        lane = (segment_id, batch.intent)
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
                self._ledger.mark_failed(lane, ids, FailureReason.SEGMENT_NOT_FOUND, str(exc))
                return
            except UpstreamError as exc:
                self._observer.upstream_outcome("bulk", outcome_of(exc), seconds_since(started))
                if exc.error == "IdempotencyKeyInProgress" and (
                    in_progress_waits < MAX_IN_PROGRESS_WAITS
                ):
                    in_progress_waits += 1
                    self._ledger.mark_retrying(lane, ids)
                    await self._sleep(self._retry.delay(1, self._rng, exc.retry_after_s))
                    self._ledger.mark_sending(lane, ids, new_attempt=False)
                    continue
                resend = await self._after_request_failure(batch, ids, exc)
                if resend is None:
                    return
                batch = resend
                continue
            self._observer.upstream_outcome("bulk", "ok", seconds_since(started))
            self._apply(lane, ids, result)
            return

    async def _after_request_failure(
        self, batch: BatchRecord, ids: list[str], exc: UpstreamError
    ) -> BatchRecord | None:
        """Decide what follows a failed request; returns the batch to resend, or None."""
        segment_id = batch.segment_id
        lane = (segment_id, batch.intent)
        if exc.error == "IdempotencyKeyReused":
            # Our own bug if it ever happens: never try to force the key, take a new one.
            log.error("idempotency key reused for segment %s; sending under a new key", segment_id)
        exhausted = [c for c in ids if self._retry.exhausted(self._ledger.attempts(lane, c))]
        remaining = [c for c in ids if c not in set(exhausted)]
        for contact_id in exhausted:
            self._ledger.spawn(
                partial(self.fallback, lane, contact_id, str(exc)),
                f"fallback {segment_id}",
                segment_id=segment_id,
            )
        if not remaining:
            return None
        failed_attempts = max(self._ledger.attempts(lane, c) for c in remaining)
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
            self._ledger.mark_retrying(lane, remaining)
            self._ledger.requeue_later(lane, remaining, delay)
            return None
        self._ledger.mark_retrying(lane, ids)
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
        self._ledger.mark_sending(lane, ids)
        return resend

    def _apply(self, lane: Lane, ids: list[str], result: BulkResult) -> None:
        """Turn a 200 answer into per-id outcomes."""
        segment_id, intent = lane
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
            self._ledger.mark_written(lane, written)
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
            self._ledger.mark_failed(lane, contact_ids, reason, messages[reason])
        if retry:
            self._retry_items(lane, retry)

    def _retry_items(self, lane: Lane, contact_ids: list[str]) -> None:
        """Item failures: retry those ids only, or fall back once they are out of attempts."""
        segment_id = lane[0]
        again: list[str] = []
        for contact_id in contact_ids:
            if self._retry.exhausted(self._ledger.attempts(lane, contact_id)):
                self._ledger.spawn(
                    partial(self.fallback, lane, contact_id, "item failed every attempt"),
                    f"fallback {segment_id}",
                    segment_id=segment_id,
                )
            else:
                again.append(contact_id)
        if not again:
            return
        failed_attempts = max(self._ledger.attempts(lane, c) for c in again)
        delay = self._retry.delay(failed_attempts, self._rng)
        self._observer.retry_scheduled(segment_id, len(again), delay)
        self._ledger.mark_retrying(lane, again)
        self._ledger.requeue_later(lane, again, delay)

    async def fallback(self, lane: Lane, contact_id: str, last_error: str) -> None:
        """The last resort for an id that failed every bulk attempt: one single-contact write."""
        segment_id, intent = lane
        single_call = (
            self._client.single_add if intent is Intent.ADD else self._client.single_remove
        )
        log.error(
            "contact %s failed %d bulk writes to segment %s (last: %s); trying one single write",
            contact_id,
            self._ledger.attempts(lane, contact_id),
            segment_id,
            last_error,
        )
        key = new_single_key(segment_id, contact_id)
        self._ledger.mark_sending(lane, [contact_id])
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
                self._ledger.mark_failed(
                    lane, [contact_id], FailureReason.SEGMENT_NOT_FOUND, str(exc)
                )
                return
            except UpstreamError as exc:
                self._observer.upstream_outcome("single", outcome_of(exc), seconds_since(started))
                message = f"bulk: {last_error}; single write: {exc}"
                if isinstance(exc, TransientError):
                    # A 5xx, timeout or reset: CXone may have applied it before failing to
                    # answer. Reads settle it: shown, it is confirmed like any write; not shown
                    # within a window of reads, it fails as exhausted.
                    log.error(
                        "single write of contact %s to segment %s failed: %s; the outcome is "
                        "unknown, reading the membership to settle it",
                        contact_id,
                        segment_id,
                        exc,
                    )
                    self._ledger.mark_uncertain(lane, [contact_id], message)
                    return
                log.error(
                    "single write of contact %s to segment %s failed: %s; dead-lettered",
                    contact_id,
                    segment_id,
                    exc,
                )
                self._ledger.mark_failed(
                    lane, [contact_id], FailureReason.RETRIES_EXHAUSTED, message
                )
                return
            self._observer.upstream_outcome("single", "ok", seconds_since(started))
            break
        if result.error is None or result.error in ITEM_WRITTEN[intent]:
            log.error("single write of contact %s to segment %s succeeded", contact_id, segment_id)
            self._ledger.mark_written(lane, [contact_id])
            return
        reason = ITEM_PERMANENT.get(result.error, FailureReason.RETRIES_EXHAUSTED)
        message = f"single write: {result.status} {result.error} {result.message}".strip()
        log.error(
            "single write of contact %s to segment %s refused (%s); dead-lettered",
            contact_id,
            segment_id,
            message,
        )
        self._ledger.mark_failed(lane, [contact_id], reason, message)
