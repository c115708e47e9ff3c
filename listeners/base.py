"""The adapter protocol: what the daemon needs from every kind of webhook source.

A source kind (`standard`, `hubspot`, `salesforce`, `json`) is one module in this package that
provides a settings model (`[sources.NAME]` keys, a `SourceSettings` subclass whose `kind` is a
`Literal`) and an adapter built from it. The daemon's HTTP layer knows no kind: for every
delivery it builds an `InboundRequest`, then asks the adapter to

1. `authenticate` it (signature, organisation, network; given method, public URL, headers,
   body and peer address), which also names the delivery's redelivery key when the kind has one
   per delivery;
2. `parse` it into `ParsedDelivery`: the changes to take (each with its own redelivery key, for
   batched formats), the events skipped on purpose (answered as success so the CRM does not
   retry them, counted by reason), and the events that can never succeed (answered as success
   and dead-lettered, so the CRM does not retry them for a day);
3. answer in the CRM's own protocol: `accepted`, `replayed`, `refused`, `busy`.

Adapters never talk to CXone, the engine or the journal, and raise nothing but
`WebhookRejected`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import orjson
from pydantic import BaseModel, ConfigDict

from listeners.errors import WebhookRejected
from scheduler.model import FailureReason, MembershipChange


class SourceSettings(BaseModel):
    """Base of every kind's `[sources.NAME]` model: unknown keys are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class InboundRequest:
    """One webhook delivery as received, before anything is trusted.

    `path_qs` is the path and query string as the client sent them (behind a proxy this is the
    proxy's rewrite; kinds that sign the URL use their configured public URL instead);
    `query_string` is the raw query, "" when there is none. `headers` are case-insensitive in
    the daemon (a plain dict in unit tests must use lower-case names). `peer` is the address of
    the TCP peer, None when unknown. `received_at` is Unix seconds.
    """

    method: str
    path_qs: str
    query_string: str
    headers: Mapping[str, str]
    body: bytes
    peer: str | None
    received_at: float

    def header(self, name: str) -> str | None:
        """The header's value, case-insensitively, or None."""
        value = self.headers.get(name)
        if value is None:
            lowered = name.lower()
            for key, candidate in self.headers.items():
                if key.lower() == lowered:
                    return candidate
        return value


@dataclass(frozen=True, slots=True)
class InboundEvent:
    """One change to take. `key` is its redelivery key in a batched format, else None.

    `invalid` is the part of the same event that can never succeed (a segment value that is
    no CXone id, an option missing from a mapping), dead-lettered when the event is taken: only
    what is invalid is dead-lettered, and the valid rest is taken as usual. For a mirror, the
    valid part lists the valid values only, so the contact leaves every tracked segment the
    CRM no longer names, exactly as if the invalid values were absent. It shares the event's
    key (its `key` is None): the two are taken, or recognised as redelivered, together.
    """

    change: MembershipChange
    key: str | None = None
    invalid: DeadEvent | None = None


@dataclass(frozen=True, slots=True)
class SkippedEvent:
    """An event deliberately not acted on (another object type, a property segmapd ignores).

    `reason` is a short snake_case word from the adapter's fixed set (it becomes a metric
    label); `detail` goes to the debug log and never holds a secret.
    """

    reason: str
    detail: str = ""
    key: str | None = None


@dataclass(frozen=True, slots=True)
class DeadEvent:
    """An event that can never succeed, acknowledged and dead-lettered rather than refused.

    The CRM would retry a refusal for hours without any chance of success, holding up the
    deliveries behind it; the dead letter keeps the evidence (`segmapd dlq list`). `change`
    holds what the event asked for, its contact id as sent (it may fail the id rule), within
    the bounds `listeners.payload.dead_event` (which adapters build it with) sets: a long value
    shortened visibly, a change naming no segment kept as a removal from every segment (`*`).
    """

    change: MembershipChange
    reason: FailureReason
    message: str
    key: str | None = None


@dataclass(slots=True)
class ParsedDelivery:
    """What one delivery holds, in order."""

    events: list[InboundEvent] = field(default_factory=list)
    skipped: list[SkippedEvent] = field(default_factory=list)
    dead: list[DeadEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the daemon did with a delivery, once it is journaled: the adapter's answer says so.

    Assignments: `accepted` counts every one taken (new, duplicate or stale), `duplicates` those
    that joined work in progress or were already confirmed, `stale` those older than what
    segmapd already works towards. Events: `events` taken, `redelivered` whose key was already
    journaled (no work), `skipped` and `dead_lettered` as parsed.
    """

    accepted: int = 0
    duplicates: int = 0
    stale: int = 0
    events: int = 0
    redelivered: int = 0
    skipped: int = 0
    dead_lettered: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer in the sender's protocol, independent of the HTTP server."""

    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)


class SourceAdapter(Protocol):
    """One configured webhook source of some kind (see the module docstring)."""

    kind: ClassVar[str]
    """The `kind` value in the config: the metrics label and the registry key."""

    skip_reasons: ClassVar[frozenset[str]]
    """Every `SkippedEvent.reason` this kind produces (a bounded metric label set)."""

    def authenticate(self, request: InboundRequest) -> str | None:
        """Check the request is from the configured sender; raise `WebhookRejected` if not.

        Returns the delivery's redelivery key for kinds that have one per delivery (the
        daemon then answers a repeat with `replayed`, without parsing), else None.
        """
        ...

    def parse(self, request: InboundRequest) -> ParsedDelivery:
        """The delivery's events, or `WebhookRejected` (the whole delivery is refused)."""
        ...

    def accepted(self, outcome: Outcome) -> Reply:
        """The success answer, sent once everything taken is committed."""
        ...

    def replayed(self, earlier: bytes) -> Reply:
        """The answer to a delivery whose key was seen; `earlier` is `accepted(...)`'s body."""
        ...

    def refused(self, rejection: WebhookRejected) -> Reply:
        """The answer to a refused delivery (nothing of it was taken)."""
        ...

    def busy(self, message: str, retry_after_s: float) -> Reply:
        """The answer while segmapd cannot take work (draining, high water, journal down).

        It must tell the sender to retry, after `retry_after_s` where its protocol can say so.
        """
        ...


def problem_json(status: int, message: str, *, field: str | None = None) -> bytes:
    """The JSON problem body every JSON-speaking kind uses for a refusal."""
    body: dict[str, str] = {"error": REASONS.get(status, "Error"), "message": message}
    if field is not None:
        body["field"] = field
    return orjson.dumps(body)


REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    413: "PayloadTooLarge",
    414: "URITooLong",
    415: "UnsupportedMediaType",
    422: "UnprocessableEntity",
    429: "TooManyRequests",
    431: "RequestHeaderFieldsTooLarge",
    500: "InternalError",
    503: "ServiceUnavailable",
}
"""The `error` word of a JSON problem, by status."""


class JsonReplies:
    """Answers for kinds that speak JSON: segmapd's own accepted body, JSON problems.

    Success is `202 {"accepted": n, "duplicates": m, "stale": k}`; a refusal is the JSON problem
    with the rejection's status; busy is `503` with `Retry-After` (whole seconds, rounded up).
    """

    accepted_status: ClassVar[int] = 202

    def accepted(self, outcome: Outcome) -> Reply:
        """`accepted_status` with the assignment counts."""
        body = orjson.dumps(
            {"accepted": outcome.accepted, "duplicates": outcome.duplicates, "stale": outcome.stale}
        )
        return Reply(self.accepted_status, body, JSON)

    def replayed(self, earlier: bytes) -> Reply:
        """200 with the first delivery's answer."""
        return Reply(200, earlier, JSON)

    def refused(self, rejection: WebhookRejected) -> Reply:
        """The rejection as a JSON problem."""
        return Reply(
            rejection.status,
            problem_json(rejection.status, rejection.message, field=rejection.field),
            JSON,
        )

    def busy(self, message: str, retry_after_s: float) -> Reply:
        """503 with `Retry-After` and `retryAfter` in the body."""
        body = orjson.dumps(
            {"error": REASONS[503], "message": message, "retryAfter": retry_after_s}
        )
        return Reply(503, body, JSON, {"Retry-After": str(max(1, math.ceil(retry_after_s)))})


JSON = "application/json"
