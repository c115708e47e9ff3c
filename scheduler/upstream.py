"""What the engine needs from CXone: a client interface, its results and its classified errors.

The engine owns rate limiting and retries, so an implementation makes exactly one HTTP attempt per
call (apart from the one token refresh and resend that a 401 calls for) and reports the outcome
as a result or as one of the errors below, never retrying on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ItemFailure:
    """One contact id that a bulk write did not add, as CXone reported it."""

    contact_id: str
    code: int
    error: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class BulkResult:
    """The answer to a bulk membership write (HTTP 200)."""

    segment_id: str
    success_count: int
    failure_count: int
    failed: tuple[ItemFailure, ...] = ()
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class SingleResult:
    """The answer to a single-contact write: `error` is None when the contact was added."""

    status: int
    error: str | None = None
    message: str = ""
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class MembershipResult:
    """The answer to a membership check."""

    is_member: bool
    added_at: str | None = None


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """The answer to a segment refresh: accepted, or refused until `retry_after_s` has passed."""

    accepted: bool
    retry_after_s: float = 0.0


@dataclass(eq=False)
class UpstreamError(Exception):
    """A call that produced no usable result; subclasses say what the engine should do."""

    message: str
    status: int = 0
    error: str = ""
    retry_after_s: float = 0.0
    details: dict[str, object] = field(default_factory=dict)

    def __str__(self) -> str:
        code = f" {self.status}" if self.status else ""
        name = f" {self.error}" if self.error else ""
        return f"{type(self).__name__}{code}{name}: {self.message}"


class RateLimited(UpstreamError):
    """HTTP 429: nothing was applied; the whole endpoint class waits `retry_after_s`."""


class TransientError(UpstreamError):
    """5xx, timeout, reset or `IdempotencyKeyInProgress`: resend the same body and key."""


#: A request that could not leave this process (no file descriptor) is tried again after this,
#: spending no attempt: nothing reached CXone.
LOCAL_RESOURCE_WAIT_S = 1.0


class LocalResourceError(TransientError):
    """The process ran out of something local (file descriptors: EMFILE, ENFILE); nothing was sent.

    Not CXone's answer and not the request's fault, so it spends no attempt: the caller waits
    and sends again. Treating it as an ordinary failure turned accepted work into dead letters.
    """


class PermanentError(UpstreamError):
    """A request CXone will never accept as sent (400, 403, 413, 415, `IdempotencyKeyReused`)."""


class SegmentNotFound(PermanentError):
    """HTTP 404 `SegmentNotFound`: every assignment of that segment fails."""


class AuthError(UpstreamError):
    """Credentials were refused (the token endpoint said no, or a fresh token still got 401)."""


def outcome_of(exc: UpstreamError) -> str:
    """The metrics outcome of a failed call: local, transient, auth, permanent or error."""
    if isinstance(exc, LocalResourceError):
        return "local"
    if isinstance(exc, TransientError):
        return "transient"
    if isinstance(exc, AuthError):
        return "auth"
    if isinstance(exc, PermanentError):
        return "permanent"
    return "error"


def seconds_since(started: float) -> float:
    """Monotonic seconds since `started` (a `time.monotonic()` reading)."""
    return time.monotonic() - started


class CXoneClient(Protocol):
    """The CXone segment-membership API, one attempt per call."""

    async def bulk_add(
        self, segment_id: str, contact_ids: list[str], idempotency_key: str
    ) -> BulkResult:
        """POST a JSON array of ids to the segment's contacts (at most 200, no duplicates)."""
        ...

    async def single_add(
        self, segment_id: str, contact_id: str, idempotency_key: str
    ) -> SingleResult:
        """POST one `{"contactId"}` object; item errors come back in the result, not raised."""
        ...

    async def bulk_remove(
        self, segment_id: str, contact_ids: list[str], idempotency_key: str
    ) -> BulkResult:
        """DELETE a JSON array of ids from the segment's contacts (at most 200, no duplicates).

        The answer has the bulk write's shape; `ContactNotInSegment` (409) items mean the
        absence already holds.
        """
        ...

    async def single_remove(
        self, segment_id: str, contact_id: str, idempotency_key: str
    ) -> SingleResult:
        """DELETE one contact from the segment; item errors come back in the result."""
        ...

    async def is_member(self, segment_id: str, contact_id: str) -> MembershipResult:
        """GET the membership of one contact in one segment."""
        ...

    async def refresh(self, segment_id: str) -> RefreshResult:
        """POST a refresh of the segment; a 429 comes back as `accepted=False`, not raised."""
        ...
