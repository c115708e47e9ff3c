"""The HTTP interface: webhooks in, the admin API, probes, metrics and the OpenAPI document.

The app only says what to serve; the process (daemon/runner.py) owns its lifecycle. Bad input
always gets a specific 4xx naming the problem; a 500 means a bug in segmapd, never bad input.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from daemon import intake
from daemon.intake import receive
from daemon.notifier import rfc3339
from daemon.openapi import OPENAPI_DOCUMENT
from daemon.service import Service
from daemon.store.base import dead_letter_key
from daemon.store.sql import DeadLetterKey
from listeners import InboundRequest, WebhookRejected
from listeners.base import REASONS
from listeners.payload import loads_unique
from scheduler.engine import SubmitResult
from scheduler.model import LANES, Assignment, FailureReason, Lane, State
from scheduler.reconcile import PassRunning, ReconcilePass
from scheduler.store import StoreUnavailable
from scheduler.validation import PairProgress, ReadBacklog

log = logging.getLogger(__name__)

SERVICE: web.AppKey[Service] = web.AppKey("service", Service)
MAX_WAIT_S = 300.0
WAIT_FORMAT = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)
# The metrics label of webhooks sent to a source name that is not configured.
UNCONFIGURED_SOURCE = "_unconfigured"
# A segment (or source) filter longer than any stored segment id can match nothing; the bound
# keeps a query string of megabytes out of the journal's query.
MAX_SEGMENT_FILTER_CHARS = 1024
#: Segments one reconcile pass may be limited to, and passes one listing may show.
MAX_RECONCILE_SEGMENTS = 10_000
MAX_RECONCILE_LIST = 1000
#: What a pass id can be (scheduler/reconcile.py makes them: a UTC time and a random suffix).
PASS_ID = re.compile(r"[0-9A-Za-z-]{1,64}")


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response encoded with orjson."""
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def problem(status: int, message: str, *, field: str | None = None, **extra: Any) -> web.Response:
    """An error response: `{"error": <reason phrase>, "message": ..., "field": ...}`."""
    body: dict[str, Any] = {"error": REASONS.get(status, "Error"), "message": message}
    if field is not None:
        body["field"] = field
    body.update(extra)
    headers = None
    if "retryAfter" in extra:
        headers = {"Retry-After": str(math.ceil(extra["retryAfter"]))}
    return json_response(body, status, headers)


def assignment_view(a: Assignment, progress: PairProgress | None = None) -> dict[str, Any]:
    """The public JSON shape of one assignment (with what validation saw, while it runs)."""
    view: dict[str, Any] = {
        "segmentId": a.segment_id,
        "intent": str(a.intent),
        "state": str(a.state),
        "reason": str(a.reason) if a.reason is not None else None,
        "message": a.message or None,
        "attempts": a.attempts,
        "lane": str(a.lane),
        "receivedAt": rfc3339(a.received_at),
        "updatedAt": rfc3339(a.updated_at),
    }
    if progress is not None:
        view["validation"] = {
            "reads": progress.reads,
            "lastReadAt": rfc3339(progress.last_read_at) if progress.last_read_at else None,
            "nextReadAt": rfc3339(progress.next_read_at) if progress.next_read_at else None,
            "awaitingRefresh": progress.awaiting_refresh,
        }
    return view


def read_backlog_view(
    backlog: ReadBacklog, read_rps: float, lanes: Iterable[Lane] = ()
) -> dict[str, Any]:
    """The read backlog as the contact API shows it beside pairs that wait for a read.

    `lanes` are the lanes of those pairs: `estimatedDrainS` is for the slowest of them.
    """

    def drain(reads: int) -> float | None:
        return round(reads / read_rps, 1) if read_rps > 0 else None

    # Live reads go first: a live pair waits for the live queue only. A bulk one waits for
    # both queues at most (the live one first, then its own; its share only makes it sooner).
    live = backlog.lanes[Lane.LIVE].waiting if Lane.LIVE in backlog.lanes else 0
    ahead = {lane: live if lane is Lane.LIVE else backlog.waiting for lane in LANES}
    shown = set(lanes) or set(LANES)
    return {
        "readsWaiting": backlog.waiting,
        "oldestWaitS": round(backlog.oldest_wait_s, 1),
        "awaitingRefresh": backlog.awaiting_refresh,
        "estimatedDrainS": drain(max(ahead[lane] for lane in shown)),
        "lanes": {
            str(lane): {
                "readsWaiting": b.waiting,
                "oldestWaitS": round(b.oldest_wait_s, 1),
                "estimatedDrainS": drain(ahead[lane]),
            }
            for lane, b in backlog.lanes.items()
        },
    }


# ---- middleware ------------------------------------------------------------------------------


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn aiohttp's HTTP errors into JSON problems, and bugs into a logged 500."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SERVICE].config.server.max_body_bytes
        return problem(413, f"body larger than {limit} bytes (server.max_body_bytes)")
    except web.HTTPRequestTimeout:
        timeout_s = request.app[SERVICE].config.server.body_timeout_s
        response = problem(408, f"body not received within {timeout_s:g} s (server.body_timeout_s)")
        response.force_close()  # the rest of the body may still trickle in
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem(exc.status, exc.reason)
    except asyncio.CancelledError:
        raise
    except StoreUnavailable as exc:
        # The journal is away (a database outage): a state of the service, not a bug; the
        # caller asks again later.
        return problem(503, f"the journal cannot be read: {exc}", retryAfter=10.0)
    except (HttpProcessingError, RequestPayloadError, ConnectionResetError) as exc:
        # A malformed or abandoned body (bad chunking, short Content-Length, a dropped client):
        # the sender's doing, which anyone can repeat, so no traceback and no error line.
        log.debug("malformed body on %s %s: %s", request.method, request.path, type(exc).__name__)
        response = problem(400, "malformed or incomplete request body")
        response.force_close()
        return response
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem(500, "internal error; see the segmapd log")


# ---- helpers -----------------------------------------------------------------------------------


async def read_body(request: web.Request) -> bytes:
    """The body, refused with 413 past the limit: aiohttp stops reading there, never truncates."""
    service = request.app[SERVICE]
    limit = service.config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    if request.content.is_eof():
        # The whole body is buffered already (a small one arrives with its head): the read
        # cannot wait, and a timer armed and cancelled per webhook is ~5 % of the loop's time.
        return await request.read()
    # aiohttp bounds no body read: a sender trickling bytes would hold a connection forever.
    try:
        async with asyncio.timeout(service.config.server.body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout() from None


def require_admin(request: web.Request) -> web.Response | None:
    """None if the request carries a configured admin bearer token, else a 401 response."""
    tokens = request.app[SERVICE].config.server.admin_tokens
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return problem(401, "admin API: send Authorization: Bearer <server.admin_tokens entry>")
    # aiohttp hands over header bytes that are not UTF-8 as lone surrogates (surrogateescape):
    # encoded back the same way they are the bytes sent, which match no token, rather than an
    # exception (a 500 and an error-level log line that anyone could repeat at will).
    offered = presented.encode("utf-8", "surrogateescape")
    # Compare against every token, without stopping at a match, in constant time each.
    matched = False
    for token in tokens:
        expected = token.get_secret_value().encode("utf-8", "surrogateescape")
        matched |= hmac.compare_digest(expected, offered)
    if not matched:
        return problem(401, "admin API: token not accepted")
    return None


def _encodable(text: str) -> bool:
    """Whether a journal can be asked for `text`: valid Unicode, and no NUL.

    No stored id holds either (they are made storable on the way in); PostgreSQL's text type
    takes neither, so asking for one would fail the query itself (a 503 that retrying never
    mends) where the answer is simply "no such id".
    """
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def commit(service: Service) -> web.Response | None:
    """None once everything taken so far is journaled; else the 503 to answer instead."""
    try:
        await intake.commit(service)
    except intake.Busy as busy:
        return problem(503, busy.message, retryAfter=busy.retry_after_s)
    return None


def accepted_body(result: SubmitResult) -> dict[str, int]:
    """The answer: assignments the request named, those already pending or done, stale ones.

    `accepted` counts every assignment taken (new, duplicate or stale); `duplicates` those that
    joined work in progress or were already confirmed as asked; `stale` those older than what
    segmapd already works towards or has confirmed, ignored without any call.
    """
    duplicates = result.joined + result.cached
    return {
        "accepted": result.queued + duplicates + result.stale,
        "duplicates": duplicates,
        "stale": result.stale,
    }


# ---- routes ------------------------------------------------------------------------------------


async def webhook(request: web.Request) -> web.Response:
    """POST /v1/webhooks/{source}: a delivery in the source kind's own format."""
    service = request.app[SERVICE]
    source = request.match_info["source"]
    adapter = service.sources.get(source)
    if adapter is None:
        # Only configured sources get their own series: any path may arrive here.
        response = problem(
            404, f"no webhook source named {source!r} (configure [sources.{source}])"
        )
        service.metrics.record_webhook(UNCONFIGURED_SOURCE, UNCONFIGURED_SOURCE, 404)
        return response
    try:
        body = await read_body(request)
    except web.HTTPRequestEntityTooLarge:
        limit = service.config.server.max_body_bytes
        reply = adapter.refused(
            WebhookRejected(413, f"body larger than {limit} bytes (server.max_body_bytes)")
        )
    else:
        inbound = InboundRequest(
            method=request.method,
            # As sent, percent-encodings and all: signatures cover the raw form.
            path_qs=request.raw_path,
            query_string=request.rel_url.raw_query_string,
            headers=request.headers,
            body=body,
            peer=request.remote,
            received_at=time.time(),
        )
        reply = await receive(service, source, adapter, inbound)
    service.metrics.record_webhook(source, adapter.kind, reply.status)
    return web.Response(
        body=reply.body,
        status=reply.status,
        headers={"Content-Type": reply.content_type, **reply.headers},
    )


def lane_of(request: web.Request, default: Lane) -> Lane | web.Response:
    """The `?lane=` of a request (`live` or `bulk`), `default` without one; or the 400."""
    names = request.query.getall("lane", ())
    if not names:
        return default
    if len(names) > 1:
        return problem(400, "lane: give it once", field="lane")
    return named_lane(names[0])


def named_lane(value: object) -> Lane | web.Response:
    """The lane a query or body names (`live` or `bulk`); or the 400 naming `lane`."""
    if isinstance(value, str):
        try:
            return Lane(value)
        except ValueError:
            pass
    return problem(400, "lane: must be live or bulk", field="lane")


async def mappings(request: web.Request) -> web.Response:
    """POST /v1/mappings[?wait=SECONDS][&lane=live|bulk]: a webhook body, with an admin token.

    Live by default; `lane=bulk` for backfills (`segmapd import` sends it), whose work goes
    behind live work for writes and reads alike.
    """
    service = request.app[SERVICE]
    denied = require_admin(request)
    if denied is not None:
        return denied
    lane = lane_of(request, Lane.LIVE)
    if isinstance(lane, web.Response):
        return lane
    wait_s = 0.0
    if "wait" in request.query:
        text = request.query["wait"]
        # ASCII digits only: float() also takes "1_0", Arabic-Indic digits and "inf", none of which
        # a caller means as a number of seconds.
        if WAIT_FORMAT.fullmatch(text) is None:
            return problem(
                400, "wait: must be a number of seconds, such as 30 or 2.5", field="wait"
            )
        wait_s = float(text)
        if not 0 <= wait_s <= MAX_WAIT_S:
            return problem(400, f"wait: must be between 0 and {MAX_WAIT_S:g}", field="wait")
    try:
        taken = await intake.take_mappings(service, await read_body(request), lane)
    except WebhookRejected as exc:
        return problem(exc.status, exc.message, field=exc.field)
    except intake.Busy as busy:
        return problem(503, busy.message, retryAfter=busy.retry_after_s)
    events, per_event = taken.events, taken.results
    answer: dict[str, Any] = dict(accepted_body(taken.total))
    if not wait_s:
        return json_response(answer, 202)
    deadline = time.monotonic() + wait_s
    results = []
    all_done = True
    for event, outcome in zip(events, per_event, strict=True):
        remaining = max(0.0, deadline - time.monotonic())
        # Every segment the change put to work: a mirror's removals too, which it does not
        # name. Its stale segments are reported apart: nothing will ever happen to them.
        segments = outcome.segments
        states = await service.engine.wait(event.contact_id, segments, remaining)
        all_done &= all(a.terminal for a in states) and len(states) == len(segments)
        results.append(
            {
                "contactId": event.contact_id,
                "segments": [assignment_view(a) for a in states],
                "stale": list(outcome.stale_segments),
            }
        )
    answer["complete"] = all_done
    answer["results"] = results
    return json_response(answer, 200 if all_done else 202)


async def contact(request: web.Request) -> web.Response:
    """GET /v1/contacts/{contactId}: every retained assignment of a contact."""
    service = request.app[SERVICE]
    denied = require_admin(request)
    if denied is not None:
        return denied
    contact_id = request.match_info["contactId"]
    # An id no journal can hold (a NUL) is held by nobody.
    assignments = await service.store.contact(contact_id) if _encodable(contact_id) else []
    if not assignments:
        return problem(404, f"no assignments for contact {contact_id!r}", field="contactId")
    poller = service.poller
    segments = []
    validating: set[Lane] = set()  # the lanes of the pairs being validated
    for a in assignments:
        progress = poller.progress(a.contact_id, a.segment_id) if not a.terminal else None
        if progress is not None:
            validating.add(a.lane)
        view = assignment_view(a, progress)
        # The pair's transitions since its newest change began, as the journal keeps them.
        view["history"] = [
            {"state": str(state), "at": rfc3339(at)} for state, at in (a.history or ())
        ]
        segments.append(view)
    body: dict[str, Any] = {"contactId": contact_id, "segments": segments}
    drift = await service.store.drift_of(contact_id)
    if drift:
        # What reconcile found CXone holding otherwise than segmapd did, oldest first.
        body["drift"] = [
            {
                "segmentId": d.segment_id,
                "intent": str(d.intent),
                "passId": d.pass_id,
                "foundAt": rfc3339(d.found_at),
                "requeued": d.requeued,
            }
            for d in drift
        ]
    if validating:
        body["validation"] = read_backlog_view(
            poller.backlog(), service.config.limits.read_rps, validating
        )
    return json_response(body)


# A page of dead letters the replay takes at a time: its rows, then its commit.
REPLAY_PAGE = 1000
# Dead letters named one by one in a replay (the console's selection is a page of them).
MAX_NAMED_DEAD_LETTERS = 1000
# A cursor longer than two ids kept as sent at their longest (1,024 characters of up to 4 UTF-8
# bytes each, in base64) cannot be one of ours.
MAX_CURSOR_CHARS = 11_000


def encode_cursor(key: DeadLetterKey) -> str:
    """A dead letter's place in the list as the opaque text clients pass back."""
    return base64.urlsafe_b64encode(orjson.dumps(list(key))).decode().rstrip("=")


def decode_cursor(text: str) -> DeadLetterKey | None:
    """The key a cursor of ours holds; None when the text is not one."""
    if not 1 <= len(text) <= MAX_CURSOR_CHARS:
        return None
    try:
        value = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        return None
    if not (isinstance(value, list) and len(value) == 3):
        return None
    at, contact_id, segment_id = value
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        return None
    if not (isinstance(contact_id, str) and isinstance(segment_id, str)):
        return None
    if not (_encodable(contact_id) and _encodable(segment_id)):
        return None
    return float(at), contact_id, segment_id


def once(request: web.Request, names: Iterable[str]) -> web.Response | None:
    """The 400 for the first of the query parameters `names` given more than once, else None."""
    for name in names:
        if len(request.query.getall(name, ())) > 1:
            return problem(400, f"{name}: give it once", field=name)
    return None


def limit_param(request: web.Request, default: int, most: int) -> int | web.Response:
    """The query's `limit` (`default` when absent), from 1 to `most`; or the 400 naming it."""
    refused = once(request, ("limit",))
    if refused is not None:
        return refused
    try:
        limit = int(request.query.get("limit", str(default)))
    except ValueError:
        return problem(400, "limit: must be an integer", field="limit")
    if not 1 <= limit <= most:
        return problem(400, f"limit: must be between 1 and {most}", field="limit")
    return limit


T = TypeVar("T")


def _optional(
    given: Mapping[str, object], name: str, parse: Callable[[object, str], T | web.Response]
) -> T | web.Response | None:
    """A query parameter or body field `parse`d (the 400 naming it if bad), None when absent."""
    return parse(given[name], name) if name in given else None


def _reason_named(value: object, field: str) -> FailureReason | web.Response:
    if isinstance(value, str):
        try:
            return FailureReason(value)
        except ValueError:
            pass
    return problem(400, f"{field}: must be one of {', '.join(FailureReason)}", field=field)


def _exact_filter(value: object, field: str) -> str | web.Response:
    """A filter matched exactly (`segment`, `source`) as given; or the 400 naming `field`."""
    if isinstance(value, str) and 1 <= len(value) <= MAX_SEGMENT_FILTER_CHARS and _encodable(value):
        return value
    return problem(
        400, f"{field}: must be 1-{MAX_SEGMENT_FILTER_CHARS} characters of UTF-8 text", field=field
    )


def _cursor_named(value: object, field: str) -> DeadLetterKey | web.Response:
    key = decode_cursor(value) if isinstance(value, str) else None
    if key is None:
        return problem(400, f"{field}: not a cursor this API gave", field=field)
    return key


@dataclasses.dataclass(frozen=True, slots=True)
class _DeadLetterFilter:
    """The dead letters' filters of a listing (query) or a replay (body), each None if absent."""

    reason: FailureReason | None
    segment: str | None
    source: str | None
    cursor: DeadLetterKey | None  # `after` for a listing, `through` for a replay


def _dead_letter_filter(
    given: Mapping[str, object], cursor_name: str
) -> _DeadLetterFilter | web.Response:
    """The filters in `given` (`reason`, `segment`, `source` and `cursor_name`), or the 400."""
    reason = _optional(given, "reason", _reason_named)
    if isinstance(reason, web.Response):
        return reason
    segment = _optional(given, "segment", _exact_filter)
    if isinstance(segment, web.Response):
        return segment
    source = _optional(given, "source", _exact_filter)
    if isinstance(source, web.Response):
        return source
    cursor = _optional(given, cursor_name, _cursor_named)
    if isinstance(cursor, web.Response):
        return cursor
    return _DeadLetterFilter(reason, segment, source, cursor)


async def dead_letters(request: web.Request) -> web.Response:
    """GET /v1/dead-letters: failed assignments, oldest first, a page at a time.

    `reason`, `segment` and `source` keep only the dead letters of that failure reason,
    segment and source (where the change that started the pair came from: a webhook source's
    name, `mappings` for the admin API); `after` (a previous page's `next`) continues past that
    page; `count=true` adds how many the filter keeps (`matching`) and the newest one's cursor
    (`newest`, the `through` of a replay of exactly those). Each filter is one walk of an
    index of dead letters alone (no table scan); a count walks every entry the filter keeps
    (about 5 ms per 100,000 on SQLite, 25 ms on PostgreSQL).
    """
    service = request.app[SERVICE]
    denied = require_admin(request)
    if denied is not None:
        return denied
    refused = once(request, ("limit", "reason", "segment", "source", "after", "count"))
    if refused is not None:
        return refused
    query = request.query
    limit = limit_param(request, 1000, 100_000)
    if isinstance(limit, web.Response):
        return limit
    chosen = _dead_letter_filter(query, "after")
    if isinstance(chosen, web.Response):
        return chosen
    reason, segment, source = chosen.reason, chosen.segment, chosen.source
    count = query.get("count", "false")
    if count not in ("true", "false"):
        return problem(400, "count: must be true or false", field="count")
    # What the contact API already shows (recorded, not yet committed) is listed too.
    refused = await commit(service)
    if refused is not None:
        return refused
    store = service.store
    failed = await store.failed(
        limit, reason=reason, segment_id=segment, source=source, after=chosen.cursor
    )
    body: dict[str, Any] = {
        "deadLetters": [dead_letter_view(a) for a in failed],
        "next": encode_cursor(dead_letter_key(failed[-1])) if len(failed) == limit else None,
    }
    if count == "true":
        matching, newest = await store.count_failed(
            reason=reason, segment_id=segment, source=source
        )
        body["matching"] = matching
        body["newest"] = encode_cursor(newest) if newest is not None else None
    return json_response(body)


def dead_letter_view(a: Assignment) -> dict[str, Any]:
    """The public JSON shape of a dead letter: the assignment, its contact and its source.

    The source is null for a dead letter journaled before segmapd recorded sources.
    """
    return {"contactId": a.contact_id, **assignment_view(a), "source": a.source or None}


REPLAY_KEYS = {"contactIds", "deadLetters", "reason", "segment", "source", "through", "lane"}


class ReplayRequest:
    """What a replay's body asks for: which dead letters, in which lane (see the handler)."""

    def __init__(self) -> None:
        self.contacts: set[str] | None = None
        self.pairs: set[tuple[str, str]] | None = None
        self.reason: FailureReason | None = None
        self.segment: str | None = None
        self.source: str | None = None
        self.through: DeadLetterKey | None = None
        self.lane: Lane | None = None

    def keeps(self, letter: Assignment, *, through_applied: bool = False) -> bool:
        """Whether the dead letter is one the request names (its filter applied by the query).

        `through_applied`: the journal's query already kept only dead letters up to `through`,
        in its own order (a PostgreSQL collation may order contact ids otherwise than Python):
        checked again here, a tie on the time would drop rows the count included.
        """
        if self.contacts is not None and letter.contact_id not in self.contacts:
            return False
        if self.pairs is not None and (letter.contact_id, letter.segment_id) not in self.pairs:
            return False
        return (
            (self.reason is None or letter.reason is self.reason)
            and (self.segment is None or letter.segment_id == self.segment)
            and (self.source is None or letter.source == self.source)
            and (through_applied or self.through is None or dead_letter_key(letter) <= self.through)
        )


def _named_pairs(value: object) -> set[tuple[str, str]] | web.Response:
    field = "deadLetters"
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_NAMED_DEAD_LETTERS:
        return problem(
            400, f"{field}: must be a list of 1-{MAX_NAMED_DEAD_LETTERS} entries", field=field
        )
    pairs: set[tuple[str, str]] = set()
    for number, item in enumerate(value):
        if not (
            isinstance(item, dict)
            and set(item) == {"contactId", "segmentId"}
            and isinstance(item["contactId"], str)
            and isinstance(item["segmentId"], str)
            and _encodable(item["contactId"])
            and _encodable(item["segmentId"])
        ):
            return problem(
                400,
                f'{field}[{number}]: must be {{"contactId": "...", "segmentId": "..."}}',
                field=f"{field}[{number}]",
            )
        pairs.add((item["contactId"], item["segmentId"]))
    return pairs


def parse_replay(body: bytes) -> ReplayRequest | web.Response:
    """The replay's body as a request, or the 400 naming what is wrong with it."""
    asked = ReplayRequest()
    if not body.strip():
        return asked
    try:
        # Small and rare: the exact check for repeated keys costs nothing here.
        parsed = loads_unique(body)
    except WebhookRejected as exc:
        return problem(exc.status, exc.message, field=exc.field)
    if not isinstance(parsed, dict) or set(parsed) - REPLAY_KEYS:
        return problem(
            400,
            'body: expected an object of "contactIds", "deadLetters", "reason", "segment", '
            '"source", "through" and "lane", or nothing',
        )
    if "contactIds" in parsed and "deadLetters" in parsed:
        return problem(400, "deadLetters: cannot be combined with contactIds", field="deadLetters")
    ids = parsed.get("contactIds")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return problem(400, "contactIds: must be a list of strings", field="contactIds")
        # Ids no journal can hold (a NUL) have no dead letters to replay.
        asked.contacts = {i for i in ids if _encodable(i)}
    if "deadLetters" in parsed:
        pairs = _named_pairs(parsed["deadLetters"])
        if isinstance(pairs, web.Response):
            return pairs
        asked.pairs = pairs
    chosen = _dead_letter_filter(parsed, "through")
    if isinstance(chosen, web.Response):
        return chosen
    asked.reason, asked.segment, asked.source = chosen.reason, chosen.segment, chosen.source
    asked.through = chosen.cursor
    if "lane" in parsed:
        named = named_lane(parsed["lane"])
        if isinstance(named, web.Response):
            return named
        asked.lane = named
    return asked


async def _named_dead_letters(service: Service, asked: ReplayRequest) -> list[Assignment]:
    """The dead letters a replay names one by one: a read of each named contact."""
    assert asked.pairs is not None
    found: list[Assignment] = []
    for contact_id in sorted({contact for contact, _ in asked.pairs}):
        found += [
            a
            for a in await service.store.contact(contact_id)
            if a.state is State.FAILED and asked.keeps(a)
        ]
    return found


async def replay_dead_letters(request: web.Request) -> web.Response:
    """POST /v1/dead-letters/replay: put failed assignments back in the queue.

    Body (optional): `{"contactIds": [...]}` replays those contacts' dead letters;
    `{"deadLetters": [{"contactId", "segmentId"}, ...]}` exactly those; `reason`, `segment`,
    `source` and `through` (a cursor: the `newest` a count gave) keep only the dead letters of
    that reason, segment and source up to that one, alone or with either list (each replayed
    from its own source); empty or `{}` replays every
    dead letter. A replay of named contacts or dead letters goes in the live lane, any other in
    the bulk lane; `"lane": "live"|"bulk"` chooses. The filtered set is walked a page at a
    time, each page committed before the next is read.
    """
    service = request.app[SERVICE]
    denied = require_admin(request)
    if denied is not None:
        return denied
    asked = parse_replay(await read_body(request))
    if isinstance(asked, web.Response):
        return asked
    lane = asked.lane
    if lane is None:
        # Replaying everything (or a filter's worth) is a backfill; named ones are someone
        # waiting for them.
        named = asked.contacts is not None or asked.pairs is not None
        lane = Lane.LIVE if named else Lane.BULK
    refused = await commit(service)  # dead letters recorded a moment ago are replayed too
    if refused is not None:
        return refused
    replayed = skipped = 0
    try:
        if asked.pairs is not None:
            replayed, skipped = await intake.replay(
                service, await _named_dead_letters(service, asked), lane
            )
        else:
            # Never past the newest dead letter there is now: one replayed here that fails
            # again during the walk is not replayed twice (nor forever).
            _, newest = await service.store.count_failed(
                reason=asked.reason, segment_id=asked.segment, source=asked.source
            )
            if newest is not None and (asked.through is None or newest < asked.through):
                asked.through = newest
            after: DeadLetterKey | None = None
            while newest is not None:
                page = await service.store.failed(
                    REPLAY_PAGE,
                    reason=asked.reason,
                    segment_id=asked.segment,
                    source=asked.source,
                    after=after,
                    through=asked.through,
                )
                chosen = [a for a in page if asked.keeps(a, through_applied=True)]
                if chosen:
                    done, passed = await intake.replay(service, chosen, lane)
                    replayed += done
                    skipped += passed
                if len(page) < REPLAY_PAGE:
                    break
                after = dead_letter_key(page[-1])
    except intake.Busy as busy:
        # Pages replayed so far are committed (and no longer dead letters): asking again
        # replays the rest.
        return problem(503, busy.message, retryAfter=busy.retry_after_s)
    return json_response({"replayed": replayed, "skipped": skipped}, 202)


def pass_view(reconcile_pass: ReconcilePass) -> dict[str, Any]:
    """The public JSON shape of a reconcile pass."""
    p = reconcile_pass
    return {
        "id": p.id,
        "state": str(p.state),
        "dryRun": p.dry_run,
        "segmentIds": list(p.segment_ids),
        "scheduled": p.scheduled,
        "total": p.total,
        "read": p.read,
        "inStep": p.in_step,
        "drifted": p.drifted,
        "requeued": p.requeued,
        "skipped": p.skipped,
        "startedAt": rfc3339(p.started_at),
        "finishedAt": rfc3339(p.finished_at) if p.finished_at is not None else None,
        "message": p.message or None,
    }


async def start_reconcile(request: web.Request) -> web.Response:
    """POST /v1/reconcile: start a drift pass now; 202 with it, 409 naming the one running.

    Body (optional): `{"segmentIds": [...], "dryRun": true}`.
    """
    service = request.app[SERVICE]
    denied = require_admin(request)
    if denied is not None:
        return denied
    body = await read_body(request)
    segment_ids: list[str] = []
    dry_run = False
    if body.strip():
        try:
            parsed = loads_unique(body)
        except WebhookRejected as exc:
            return problem(exc.status, exc.message, field=exc.field)
        if not isinstance(parsed, dict) or set(parsed) - {"segmentIds", "dryRun"}:
            return problem(400, 'body: expected {"segmentIds": [...], "dryRun": true|false}')
        ids = parsed.get("segmentIds", [])
        if (
            not isinstance(ids, list)
            or len(ids) > MAX_RECONCILE_SEGMENTS
            or not all(
                isinstance(i, str) and 1 <= len(i) <= MAX_SEGMENT_FILTER_CHARS and _encodable(i)
                for i in ids
            )
        ):
            return problem(
                400,
                f"segmentIds: must be a list of at most {MAX_RECONCILE_SEGMENTS} segment ids "
                f"(1-{MAX_SEGMENT_FILTER_CHARS} characters each)",
                field="segmentIds",
            )
        segment_ids = ids
        dry_run_value = parsed.get("dryRun", False)
        if not isinstance(dry_run_value, bool):
            return problem(400, "dryRun: must be true or false", field="dryRun")
        dry_run = dry_run_value
    try:
        started = await service.reconciler.begin(segment_ids, dry_run=dry_run)
    except PassRunning as running:
        return problem(
            409,
            f"reconcile pass {running.running.id} is running; follow it at "
            f"/v1/reconcile/{running.running.id}",
            running=pass_view(running.running),
        )
    except StoreUnavailable as exc:
        return problem(503, f"journal unavailable: {exc}", retryAfter=5)
    return json_response(pass_view(started), 202)


async def reconcile_passes(request: web.Request) -> web.Response:
    """GET /v1/reconcile[?limit=N]: recent passes, newest first."""
    service = request.app[SERVICE]
    denied = require_admin(request)
    if denied is not None:
        return denied
    limit = limit_param(request, 20, MAX_RECONCILE_LIST)
    if isinstance(limit, web.Response):
        return limit
    try:
        passes = await service.reconciler.recent(limit)
    except StoreUnavailable as exc:
        return problem(503, f"journal unavailable: {exc}", retryAfter=5)
    return json_response({"passes": [pass_view(p) for p in passes]})


async def reconcile_pass(request: web.Request) -> web.Response:
    """GET /v1/reconcile/{id}: one pass."""
    service = request.app[SERVICE]
    denied = require_admin(request)
    if denied is not None:
        return denied
    pass_id = request.match_info["id"]
    if not PASS_ID.fullmatch(pass_id):
        # No pass has such an id (one with a NUL, say, no journal could even be asked for).
        return problem(404, "no such reconcile pass", field="id")
    try:
        found = await service.reconciler.get(pass_id)
    except StoreUnavailable as exc:
        return problem(503, f"journal unavailable: {exc}", retryAfter=5)
    if found is None:
        return problem(404, f"no reconcile pass {pass_id!r}", field="id")
    return json_response(pass_view(found))


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the event loop answers and the engine's writer is alive."""
    service = request.app[SERVICE]
    if not service.engine.healthy:
        return json_response({"status": "failing", "reason": "the writer task died"}, 503)
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: store writable, CXone token, not draining, below high-water, not fenced."""
    report = await request.app[SERVICE].readiness.evaluate()
    status = 200 if report.ready else 503
    return json_response({"ready": report.ready, "checks": report.checks}, status)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text exposition."""
    body, content_type = request.app[SERVICE].metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: the OpenAPI 3.1 description of this API."""
    return json_response(OPENAPI_DOCUMENT)


def build_app(service: Service) -> web.Application:
    """The aiohttp application serving `service`."""
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=service.config.server.max_body_bytes,
    )
    app[SERVICE] = service
    app.router.add_post("/v1/webhooks/{source}", webhook)
    app.router.add_post("/v1/mappings", mappings)
    app.router.add_get("/v1/contacts/{contactId}", contact)
    app.router.add_get("/v1/dead-letters", dead_letters)
    app.router.add_post("/v1/dead-letters/replay", replay_dead_letters)
    app.router.add_post("/v1/reconcile", start_reconcile)
    app.router.add_get("/v1/reconcile", reconcile_passes)
    app.router.add_get("/v1/reconcile/{id}", reconcile_pass)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app
