"""Outbound notifications: every finished assignment as a signed Standard Webhooks event.

With `[notify] url` set, each assignment reaching `active`, `removed` or `failed` is POSTed to the
receiver as `mapping.active` / `mapping.removed` / `mapping.failed`, signed per
https://www.standardwebhooks.com/. Delivery is
at-least-once: the event is journaled before it is queued, retried with backoff until the
receiver takes it (2xx) or asks us to stop (410 Gone), and only then removed from the journal.

The engine calls `Notifier.enqueue` from its observer hook; it is a plain function that never
waits, so a slow or dead receiver can never slow the engine down.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import heapq
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Protocol

import aiohttp
import orjson
from yarl import URL

from daemon.cxone.transport import parse_retry_after
from listeners.signing import SIGNATURE_VERSION, SigningKey, decode_secret
from scheduler.model import TERMINAL_STATES, Assignment
from scheduler.retry import RetryPolicy

__all__ = [
    "DEFAULT_RETRY",
    "InMemoryJournal",
    "NotificationJournal",
    "Notifier",
    "build_event",
]

logger = logging.getLogger(__name__)

DEFAULT_RETRY: Final = RetryPolicy(initial_s=1.0, multiplier=2.0, max_s=60.0, jitter_ms=1000.0)
"""Backoff of failed deliveries: 1 s, x2, capped at 60 s, plus up to 1 s of jitter.

Its `attempts` field is not used: `Notifier(max_attempts=...)` decides when to give up.
"""

# The receiver may ask for a pause with Retry-After; past an hour it is more likely a bug (or a
# hostile value) than a plan, and the event would look lost.
MAX_RETRY_AFTER_S: Final = 3600.0
# `multiplier ** n` overflows a float near n = 1024 with x2; every policy has reached its cap
# long before 64 failures, so the backoff is computed as if no more than that had failed.
_MAX_BACKOFF_EXPONENT: Final = 64
_RETRY_AFTER_STATUSES: Final = frozenset({429, 503})
_USER_AGENT: Final = "segmapd-notifier"

DELIVERED: Final = "delivered"
RETRY: Final = "retry"
DROPPED: Final = "dropped"


class NotificationJournal(Protocol):
    """Where events wait until the receiver has them, so a restart can send them again.

    Calls are synchronous because `Notifier.enqueue` must not wait: a durable implementation
    should buffer its writes (group commit) rather than block in `add`.
    """

    def add(self, event_id: str, body: bytes) -> None:
        """Keep the event until `done` is called for it (adding an id again is a no-op)."""

    def done(self, event_id: str) -> None:
        """The event needs no further delivery (delivered or dropped); forget it."""

    def pending(self) -> list[tuple[str, bytes]]:
        """Every event added and not done, oldest first, as `(event_id, body)`."""
        ...


class InMemoryJournal:
    """A `NotificationJournal` in a dict: survives `stop()`/`start()`, not the process."""

    def __init__(self) -> None:
        self._events: dict[str, bytes] = {}

    def add(self, event_id: str, body: bytes) -> None:
        """Keep the event until `done`."""
        self._events.setdefault(event_id, body)

    def done(self, event_id: str) -> None:
        """Forget the event."""
        self._events.pop(event_id, None)

    def pending(self) -> list[tuple[str, bytes]]:
        """Events not yet done, in the order they were added."""
        return list(self._events.items())

    def __len__(self) -> int:
        return len(self._events)


def rfc3339(timestamp: float) -> str:
    """Unix time as RFC 3339 UTC with milliseconds, e.g. 2026-11-27T18:14:21.000Z."""
    return (
        datetime.fromtimestamp(timestamp, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def build_event(assignment: Assignment) -> tuple[str, bytes]:
    """Return `(webhook_id, body)` of the event announcing a finished assignment.

    The id is derived from what identifies the news, not drawn at random: the contact, the
    segment, the outcome (the event type), and the change that led to it, known by the time it
    was received (`received_at`, journaled with the assignment before it is ever sent). Not by
    the time the outcome was reached: a restart between the confirmation and the journal's
    commit redoes the confirmation later, and the same news must keep its id so the receiver
    can drop the resend as a duplicate. A later change of the same pair (a new request, a
    replayed dead letter) is received anew and so gets a new id.

    The event's `timestamp` is when the assignment got there, so the body of an event resent
    from the journal is byte-for-byte the same; only a redone confirmation may carry a later
    timestamp under the same id.
    """
    state = str(assignment.state)
    intent = str(assignment.intent)
    identity = orjson.dumps(
        [assignment.contact_id, assignment.segment_id, intent, state, repr(assignment.received_at)]
    )
    event_id = "msg_" + hashlib.sha256(identity).hexdigest()[:32]
    body = orjson.dumps(
        {
            "type": f"mapping.{state}",
            "timestamp": rfc3339(assignment.updated_at),
            "data": {
                "contactId": assignment.contact_id,
                "segmentId": assignment.segment_id,
                "intent": intent,
                "state": state,
                "reason": str(assignment.reason) if assignment.reason is not None else None,
                # null when there is none, as the admin API says it (`assignment_view`).
                "message": assignment.message or None,
                "attempts": assignment.attempts,
                "receivedAt": rfc3339(assignment.received_at),
                "updatedAt": rfc3339(assignment.updated_at),
            },
        }
    )
    return event_id, body


@dataclass(slots=True)
class _Event:
    event_id: str
    body: bytes
    failures: int = 0


@dataclass(order=True, slots=True)
class _Delayed:
    due: float
    seq: int
    event: _Event = field(compare=False)


def _display_url(url: URL) -> str:
    # Receivers sometimes take a token in the userinfo or the query: keep both out of logs.
    return str(url.with_user(None).with_query(None).with_fragment(None))


def check_notify_url(url: str) -> URL:
    """`url` as the notifier sends to it; ValueError unless absolute http(s)."""
    target = URL(url)
    if target.scheme not in {"http", "https"} or not target.host:
        raise ValueError("notify url must be an absolute http:// or https:// URL")
    return target


class Notifier:
    """Sends finished assignments to one webhook receiver, signed, retried, at least once.

    Scheduling: `enqueue` appends to an unbounded ready queue that `concurrency` workers drain,
    one POST at a time each. A failed event does not keep its worker sleeping through its
    backoff: it goes into a heap ordered by due time, and one timer task moves it back to the
    ready queue when it is due. So a failing receiver (or one poisoned event) costs at most
    `concurrency` requests in flight, never idle workers, and other events keep flowing while
    retries wait. The webhook id and body of an event are fixed once; the timestamp and the
    signature are made afresh for every attempt.
    """

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        max_attempts: int | None = None,
        concurrency: int = 8,
        session: aiohttp.ClientSession | None = None,
        on_outcome: Callable[[str], None] | None = None,
        journal: NotificationJournal | None = None,
    ) -> None:
        """Check the settings; nothing runs until `start()`.

        `max_attempts=None` retries until delivered (or stopped); with a number, the event is
        dropped after that many failed attempts. `session` is borrowed, never closed; without
        one, the notifier makes (and closes) its own. `on_outcome` gets "delivered", "retry"
        or "dropped" after each attempt, for metrics.
        """
        target = check_notify_url(url)
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (or None: never give up)")
        self._url = target
        self._display = _display_url(target)
        # Decoded (and checked) once: a malformed secret is a ValueError here, at start-up.
        self._key = SigningKey(decode_secret(secret))
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retry = retry or DEFAULT_RETRY
        self._max_attempts = max_attempts
        self._concurrency = concurrency
        self._session = session
        self._own_session = session is None
        self._on_outcome = on_outcome
        self._journal: NotificationJournal = journal if journal is not None else InMemoryJournal()
        self._rng = random.Random()

        self._ready: asyncio.Queue[_Event] = asyncio.Queue()
        self._delayed: list[_Delayed] = []
        self._seq = 0
        # Ids queued, waiting for a retry or in flight: the same event is never sent twice at
        # once (a re-queued journal entry that was also enqueued, a duplicate hook call).
        self._known: set[str] = set()
        self._inflight = 0
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False

    def __repr__(self) -> str:
        state = "stopped" if self._closing else "running" if self._started else "new"
        return f"Notifier(url={self._display!r}, {state}, pending={self.pending})"

    @property
    def pending(self) -> int:
        """Events not yet delivered or dropped: queued, waiting for a retry, or in flight."""
        return len(self._known)

    @property
    def journal(self) -> NotificationJournal:
        """The journal of undelivered events."""
        return self._journal

    def enqueue(self, assignment: Assignment) -> None:
        """Journal and queue the event for a finished assignment; returns at once, never raises.

        Meant for `EngineObserver.finished`. After `stop()` the event is only journaled, so a
        durable journal sends it on the next start.
        """
        if assignment.state not in TERMINAL_STATES:
            logger.warning(
                "not notifying %s/%s: state %s is not terminal",
                assignment.contact_id,
                assignment.segment_id,
                assignment.state,
            )
            return
        event_id, body = build_event(assignment)
        try:
            self._journal.add(event_id, body)
        except Exception:
            # Still worth sending from memory: only a crash before delivery would lose it now.
            logger.exception("notification journal failed to add %s", event_id)
        if self._closing:
            return
        self._queue(_Event(event_id, body))

    def resend(self, event_id: str, body: bytes) -> None:
        """Deliver a journaled event another process left undelivered (it is already journaled)."""
        self._queue(_Event(event_id, body))

    def _queue(self, event: _Event) -> None:
        if event.event_id in self._known:
            return
        self._known.add(event.event_id)
        self._ready.put_nowait(event)

    async def start(self) -> None:
        """Queue the journal's pending events, then start the workers. Idempotent."""
        if self._closing:
            raise RuntimeError("a stopped Notifier cannot be started again")
        if self._started:
            return
        self._started = True
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"User-Agent": _USER_AGENT})
        resent = 0
        for event_id, body in self._journal.pending():
            if event_id not in self._known:
                self._queue(_Event(event_id, body))
                resent += 1
        if resent:
            logger.info("notifier: %d journaled event(s) to send again", resent)
        self._runner = asyncio.create_task(self._run(), name="notifier")
        self._runner.add_done_callback(self._runner_done)

    async def stop(self, budget_s: float = 5.0) -> None:
        """Refuse new events, deliver what is queued within `budget_s`, then cancel. Idempotent.

        Events not delivered by then stay in the journal. Backoff is honoured while draining (a
        receiver that is down must not be hammered): the wait ends early once only retries due
        after the budget are left.
        """
        if self._closing:
            return
        self._closing = True
        if self._runner is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max(0.0, budget_s)
            while self._known and not self._runner.done():
                remaining = deadline - loop.time()
                if remaining <= 0 or self._only_late_retries(deadline):
                    break
                self._progress.clear()
                try:
                    await asyncio.wait_for(self._progress.wait(), remaining)
                except TimeoutError:
                    break
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # our caller is being cancelled, not just the runner
            except Exception:
                logger.debug("notifier runner had failed before stop", exc_info=True)
        if self._own_session and self._session is not None:
            await self._session.close()
        left = len(self._known)
        if left:
            logger.warning(
                "notifier stopped with %d undelivered event(s) left in the journal", left
            )
        else:
            logger.info("notifier stopped; every event delivered")

    def _only_late_retries(self, deadline: float) -> bool:
        return (
            self._ready.empty()
            and self._inflight == 0
            and (not self._delayed or self._delayed[0].due > deadline)
        )

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._closing:
            return
        # The workers only end on a bug: say so loudly instead of silently sending nothing.
        logger.error(
            "notifier stopped delivering; %d event(s) stay in the journal",
            len(self._known),
            exc_info=task.exception(),
        )

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._timer(), name="notifier-timer")
            for index in range(self._concurrency):
                group.create_task(self._worker(), name=f"notifier-worker-{index}")

    async def _timer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Cleared before looking at the heap: a retry scheduled while we wait sets it again.
            self._wakeup.clear()
            now = loop.time()
            while self._delayed and self._delayed[0].due <= now:
                self._ready.put_nowait(heapq.heappop(self._delayed).event)
            timeout = self._delayed[0].due - now if self._delayed else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _worker(self) -> None:
        while True:
            event = await self._ready.get()
            self._inflight += 1
            try:
                await self._deliver(event)
            except Exception:
                # A bug in this loop must not lose the event or kill the worker.
                logger.exception("notifier: unexpected error delivering %s", event.event_id)
                self._reschedule(event, 0.0)
            finally:
                self._inflight -= 1

    async def _deliver(self, event: _Event) -> None:
        status, retry_after_s = await self._post(event)
        if status is not None and 200 <= status < 300:
            logger.debug("notification %s delivered (HTTP %d)", event.event_id, status)
            self._finish(event, DELIVERED)
        elif status == 410:
            logger.warning(
                "notification %s dropped: %s answered 410 Gone", event.event_id, self._display
            )
            self._finish(event, DROPPED)
        else:
            event.failures += 1
            if self._max_attempts is not None and event.failures >= self._max_attempts:
                logger.error(
                    "notification %s dropped after %d failed attempt(s) to %s",
                    event.event_id,
                    event.failures,
                    self._display,
                )
                self._finish(event, DROPPED)
            else:
                self._reschedule(event, retry_after_s)
                self._report(RETRY)

    async def _post(self, event: _Event) -> tuple[int | None, float]:
        """Make one attempt; return the status (None: no answer) and any Retry-After seconds."""
        assert self._session is not None
        stamp = str(int(time.time()))
        digest = self._key.signature(event.event_id, stamp, event.body)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": event.event_id,
            "webhook-timestamp": stamp,
            "webhook-signature": f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}",
        }
        try:
            async with self._session.post(
                self._url,
                data=event.body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                retry_after_s = 0.0
                if response.status in _RETRY_AFTER_STATUSES:
                    retry_after_s = min(
                        parse_retry_after(response.headers.get("Retry-After"), 0.0),
                        MAX_RETRY_AFTER_S,
                    )
                if not 200 <= response.status < 300:
                    logger.info(
                        "notification %s: %s answered HTTP %d (attempt %d)",
                        event.event_id,
                        self._display,
                        response.status,
                        event.failures + 1,
                    )
                return response.status, retry_after_s
        except (TimeoutError, aiohttp.ClientError) as exc:
            logger.info(
                "notification %s: no answer from %s (%s, attempt %d)",
                event.event_id,
                self._display,
                type(exc).__name__,
                event.failures + 1,
            )
            return None, 0.0

    def _reschedule(self, event: _Event, retry_after_s: float) -> None:
        failures = min(max(event.failures, 1), _MAX_BACKOFF_EXPONENT)
        delay = self._retry.delay(failures, self._rng, retry_after_s)
        self._seq += 1
        due = asyncio.get_running_loop().time() + delay
        heapq.heappush(self._delayed, _Delayed(due, self._seq, event))
        self._wakeup.set()
        self._progress.set()

    def _finish(self, event: _Event, outcome: str) -> None:
        try:
            self._journal.done(event.event_id)
        except Exception:
            # The receiver has it (or refused it for good); a resend after restart is harmless.
            logger.exception("notification journal failed to mark %s done", event.event_id)
        self._known.discard(event.event_id)
        self._progress.set()
        self._report(outcome)

    def _report(self, outcome: str) -> None:
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(outcome)
        except Exception:
            # Metrics are a side concern: a broken hook must not stop deliveries.
            logger.exception("notifier on_outcome hook failed for %s", outcome)
