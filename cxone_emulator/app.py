"""The CXone-facing HTTP routes: discovery, token, membership writes, removals, reads, refresh."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from cxone_emulator.auth import TokenError, cxone_configuration, openid_configuration
from cxone_emulator.config import EmulatorConfig, Faults
from cxone_emulator.control import add_routes
from cxone_emulator.counters import BUCKET_OF
from cxone_emulator.emulator import Emulator, Outcome
from cxone_emulator.faults import Fault, hang_then_close, reset_connection
from cxone_emulator.keys import EMULATOR
from cxone_emulator.ratelimit import retry_after
from cxone_emulator.state import ID_PATTERN, IdempotencyEntry, Segment

logger = logging.getLogger(__name__)

JSON = "application/json"
_ACCEPTABLE = frozenset({"application/json", "application/*", "*/*"})
_NOT_ACCEPTABLE_HTML = (
    b"<html><head><title>406 Not Acceptable</title></head>"
    b"<body><h1>Not Acceptable</h1></body></html>"
)
_SEGMENTS = "/api/v2/segments/{segmentId}"

monotonic = time.monotonic


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer (orjson-encoded)."""
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    return web.Response(status=status, body=payload, content_type=JSON, headers=headers)


def error_response(
    status: int, error: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """A whole-request error: `{"error", "message"}`."""
    return json_response(status, {"error": error, "message": message}, headers)


def _base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _accepts_json(header: str | None) -> bool:
    if not header:
        return False
    return any(part.split(";", 1)[0].strip().lower() in _ACCEPTABLE for part in header.split(","))


def _gate(emulator: Emulator, request: web.Request) -> web.Response | None:
    """The auth (401) and Accept (406) checks every API call passes first."""
    if emulator.config.require_auth and not emulator.tokens.authorized(
        request.headers.get("Authorization"), monotonic()
    ):
        return error_response(
            401,
            "Unauthorized",
            "missing, unknown or expired access token",
            {"WWW-Authenticate": "Bearer"},
        )
    if not _accepts_json(request.headers.get("Accept")):
        # CXone's gateway answers a non-JSON Accept with an HTML page.
        return web.Response(status=406, body=_NOT_ACCEPTABLE_HTML, content_type="text/html")
    return None


def _too_many(wait_s: float) -> web.Response:
    return error_response(
        429,
        "TooManyRequests",
        "rate limit exceeded",
        {"Retry-After": str(retry_after(wait_s))},
    )


def _early(emulator: Emulator, cls: str, response: web.Response) -> web.Response:
    """Answer before the rate limit (not a 429): counted as admitted."""
    counters = emulator.counters
    counters.admit(cls, monotonic())
    counters.answered(cls, response.status)
    return response


def _limited(emulator: Emulator, cls: str, wait_s: float) -> web.Response:
    counters = emulator.counters
    counters.refused(cls)
    counters.answered(cls, 429)
    return _too_many(wait_s)


async def _inflict(
    emulator: Emulator, request: web.Request, cls: str, fault: Fault, faults: Faults
) -> web.Response:
    """Carry out a drawn fault and count it; the answer returned is never seen for reset/hang."""
    counters = emulator.counters
    counters.faults[fault.kind] += 1
    if fault.kind == "error":
        counters.answered(cls, fault.status)
        return error_response(fault.status, fault.error, "injected fault")
    counters.answered(cls, fault.kind)
    if fault.kind == "reset":
        reset_connection(request)
    else:
        await hang_then_close(request, faults.hang_s)
    return web.Response(status=500)


async def _delay(faults: Faults) -> None:
    if faults.latency_ms > 0:
        await asyncio.sleep(faults.latency_ms / 1000.0)


# --- discovery and token -------------------------------------------------------------------


async def openid_discovery(request: web.Request) -> web.Response:
    """`GET /.well-known/openid-configuration`."""
    emulator = request.app[EMULATOR]
    emulator.counters.answered("discovery", 200)
    return json_response(200, openid_configuration(_base_url(request)))


async def cxone_discovery(request: web.Request) -> web.Response:
    """`GET /.well-known/cxone-configuration?tenantId=T`."""
    emulator = request.app[EMULATOR]
    tenant_id = request.query.get("tenantId", "")
    document = cxone_configuration(emulator.config, _base_url(request), tenant_id)
    if document is None:
        emulator.counters.answered("discovery", 404)
        return error_response(404, "TenantNotFound", "unknown tenantId")
    emulator.counters.answered("discovery", 200)
    return json_response(200, document)


async def token(request: web.Request) -> web.Response:
    """`POST /auth/token`: password, client_credentials and refresh_token grants."""
    emulator = request.app[EMULATOR]
    counters = emulator.counters
    now = monotonic()
    counters.arrived("token", now)
    body = await request.read()
    wait_s = emulator.limiter.take("token", now)
    if wait_s > 0:
        return _limited(emulator, "token", wait_s)
    counters.admit("token", now)
    faults = emulator.config.faults.token
    await _delay(faults)
    fault = emulator.injector.draw(faults, write=False)
    if fault is not None:
        return await _inflict(emulator, request, "token", fault, faults)
    try:
        answer = emulator.tokens.grant(
            emulator.config,
            _base_url(request),
            request.headers.get("Authorization"),
            body,
            monotonic(),
        )
    except TokenError as error:
        counters.answered("token", error.status)
        return json_response(error.status, error.body(), {"Cache-Control": "no-store"})
    counters.answered("token", 200)
    return json_response(200, answer, {"Cache-Control": "no-store", "Pragma": "no-cache"})


# --- segment membership ---------------------------------------------------------------------


def _parse_write(
    body: bytes, max_ids: int, *, allow_single: bool = True
) -> tuple[list[str] | str, web.Response | None]:
    """The ids of a bulk write (a list) or the id of a single write (a str), or an error.

    A bulk removal (`allow_single=False`) takes only the array: its single form is the member
    path.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [], error_response(400, "MalformedPayload", "body is not valid JSON")
    if isinstance(payload, list):
        for item in payload:
            if not isinstance(item, str):
                return [], error_response(
                    400, "MalformedPayload", "every element must be a contact id string"
                )
        if not payload:
            return [], error_response(400, "EmptyBatch", "the batch holds no contact ids")
        if len(payload) > max_ids:
            return [], error_response(
                413, "BatchTooLarge", f"a batch holds at most {max_ids} contact ids"
            )
        return payload, None
    if not allow_single:
        return [], error_response(400, "MalformedPayload", "body must be an array of contact ids")
    if isinstance(payload, dict):
        contact_id = payload.get("contactId")
        if isinstance(contact_id, str):
            return contact_id, None
        return [], error_response(400, "MalformedPayload", "contactId must be a string")
    return [], error_response(
        400, "MalformedPayload", "body must be an array of contact ids or an object"
    )


def _valid_key(key: str) -> bool:
    return 1 <= len(key) <= 255 and key.isascii() and key.isprintable()


def _segment_not_found(segment_id: str) -> Outcome:
    body = {"error": "SegmentNotFound", "message": f"segment {segment_id} not found"}
    return Outcome(404, orjson.dumps(body))


async def write(request: web.Request) -> web.Response:
    """`POST /api/v2/segments/{segmentId}/contacts`: bulk (array) or single (object) write."""
    # The class decides the rate limit and counters, so it is known before any check answers.
    return await _checked_write(
        request, lambda body: "single" if body.lstrip()[:1] == b"{" else "bulk", allow_single=True
    )


async def _checked_write(
    request: web.Request, class_of: Callable[[bytes], str], *, allow_single: bool
) -> web.Response:
    """A write or bulk removal through the checks CXone makes before applying anything."""
    emulator = request.app[EMULATOR]
    counters = emulator.counters
    body = await request.read()
    now = monotonic()
    cls = class_of(body)
    counters.arrived(cls, now)
    refused = _gate(emulator, request)
    if refused is not None:
        return _early(emulator, cls, refused)
    if request.content_type != JSON:
        return _early(
            emulator,
            cls,
            error_response(415, "UnsupportedMediaType", "Content-Type must be application/json"),
        )
    ids, malformed = _parse_write(body, emulator.config.max_bulk_ids, allow_single=allow_single)
    if malformed is not None:
        return _early(emulator, cls, malformed)
    key, refused = _key_refused(request)
    if refused is not None:
        return _early(emulator, cls, refused)
    # Removals take their tokens from the writes' buckets: CXone limits the resource.
    wait_s = emulator.limiter.take(BUCKET_OF.get(cls, cls), now)
    if wait_s > 0:
        return _limited(emulator, cls, wait_s)
    counters.admit(cls, now)
    return await _write_admitted(emulator, request, cls, ids, body=body, key=key)


def _key_refused(request: web.Request) -> tuple[str | None, web.Response | None]:
    """The `Idempotency-Key` header, or the 400 for one that breaks the syntax."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _valid_key(key):
        return key, error_response(
            400, "InvalidIdempotencyKey", "Idempotency-Key must be 1-255 printable ASCII"
        )
    return key, None


async def remove_bulk(request: web.Request) -> web.Response:
    """`DELETE /api/v2/segments/{segmentId}/contacts`: bulk removal of a JSON array of ids."""
    return await _checked_write(request, lambda _: "bulk_remove", allow_single=False)


async def remove_single(request: web.Request) -> web.Response:
    """`DELETE /api/v2/segments/{segmentId}/contacts/{contactId}`: remove one member."""
    emulator = request.app[EMULATOR]
    counters = emulator.counters
    body = await request.read()
    now = monotonic()
    cls = "single_remove"
    counters.arrived(cls, now)
    refused = _gate(emulator, request)
    if refused is not None:
        return _early(emulator, cls, refused)
    key, refused = _key_refused(request)
    if refused is not None:
        return _early(emulator, cls, refused)
    wait_s = emulator.limiter.take("single", now)
    if wait_s > 0:
        return _limited(emulator, cls, wait_s)
    counters.admit(cls, now)
    contact_id = request.match_info["contactId"]
    return await _write_admitted(emulator, request, cls, contact_id, body=body, key=key)


async def _write_admitted(
    emulator: Emulator,
    request: web.Request,
    cls: str,
    ids: list[str] | str,
    *,
    body: bytes,
    key: str | None,
) -> web.Response:
    """A write or removal past the rate limit: latency, fault, segment, idempotency, items."""
    counters = emulator.counters
    store = emulator.idempotency
    # The method is part of the scope: an add and a removal of one path never share a key.
    scope = f"{request.method} {request.path}"
    body_hash = hashlib.sha256(body).digest() if key is not None else b""
    reserved: IdempotencyEntry | None = None
    busy_at_arrival = False
    if key is not None:
        # The key is "in progress" from here on (added latency included), and a request that
        # arrives while it is in progress is answered so even if the first one ends meanwhile.
        arrival_entry = store.lookup(key, monotonic())
        if arrival_entry is None:
            reserved = store.reserve(key, scope, body_hash, monotonic())
        else:
            busy_at_arrival = arrival_entry.answer is None
    try:
        # Removals hit the same resources as writes, so they share the writes' fault settings.
        by_class = emulator.config.faults
        faults = by_class.single if cls in ("single", "single_remove") else by_class.bulk
        await _delay(faults)
        fault = emulator.injector.draw(faults, write=True)
        if fault is not None and not fault.after_apply:
            # Nothing applied, nothing stored: the same key may be sent again.
            return await _inflict(emulator, request, cls, fault, faults)
        headers: dict[str, str] | None = None
        segment_id = request.match_info["segmentId"]
        segment = emulator.directory.find(segment_id, emulator.config.auto_create_segments)
        if segment is None:
            outcome = _segment_not_found(segment_id)
        else:
            answer: tuple[Outcome, dict[str, str] | None] | None = None
            if key is not None and reserved is None:
                entry = store.lookup(key, monotonic())
                if entry is None:
                    reserved = store.reserve(key, scope, body_hash, monotonic())
                else:
                    answer = _idempotent_answer(
                        emulator, cls, entry, scope, body_hash, busy=busy_at_arrival
                    )
            if answer is not None:
                outcome, headers = answer
            else:
                outcome = _apply(emulator, cls, segment, ids, faults)
        if reserved is not None and key is not None:
            if fault is not None and fault.kind == "hang":
                # A gateway timeout after the commit: the key stays "in progress" meanwhile.
                counters.faults["hang"] += 1
                counters.answered(cls, "hang")
                await hang_then_close(request, faults.hang_s)
                store.complete(key, reserved, outcome.status, outcome.body)
                return web.Response(status=500)
            store.complete(key, reserved, outcome.status, outcome.body)
        if fault is not None:
            return await _inflict(emulator, request, cls, fault, faults)
        counters.answered(cls, outcome.status)
        return json_response(outcome.status, outcome.body, headers)
    finally:
        if reserved is not None and key is not None:
            store.release(key, reserved)


def _apply(
    emulator: Emulator, cls: str, segment: Segment, ids: list[str] | str, faults: Faults
) -> Outcome:
    """Apply the items of an admitted write or removal to its segment."""
    now = monotonic()
    if isinstance(ids, str):
        if cls == "single_remove":
            return emulator.single_remove(segment, ids, faults, now)
        return emulator.single(segment, ids, faults, now)
    if cls == "bulk_remove":
        return emulator.bulk_remove(segment, ids, faults, now)
    return emulator.bulk(segment, ids, faults, now)


def _idempotent_answer(
    emulator: Emulator,
    cls: str,
    entry: IdempotencyEntry,
    scope: str,
    body_hash: bytes,
    *,
    busy: bool,
) -> tuple[Outcome, dict[str, str] | None]:
    """The answer to a key seen before: in progress, reused elsewhere, or a replay."""
    conflicts = emulator.counters.idempotency_conflicts
    if busy or entry.answer is None:
        conflicts["IdempotencyKeyInProgress"] += 1
        body = {
            "error": "IdempotencyKeyInProgress",
            "message": "a request with this Idempotency-Key is still being processed",
        }
        return Outcome(409, orjson.dumps(body)), None
    if entry.scope != scope or entry.body_hash != body_hash:
        conflicts["IdempotencyKeyReused"] += 1
        body = {
            "error": "IdempotencyKeyReused",
            "message": "this Idempotency-Key was used with another method, path or body",
        }
        return Outcome(409, orjson.dumps(body)), None
    emulator.counters.replayed(cls)
    return Outcome(entry.answer.status, entry.answer.body), {"Idempotent-Replayed": "true"}


async def membership(request: web.Request) -> web.Response:
    """`GET /api/v2/segments/{segmentId}/contacts/{contactId}`: is the contact a member yet."""
    emulator = request.app[EMULATOR]
    counters = emulator.counters
    now = monotonic()
    counters.arrived("read", now)
    refused = _gate(emulator, request)
    if refused is not None:
        return _early(emulator, "read", refused)
    wait_s = emulator.limiter.take("read", now)
    if wait_s > 0:
        return _limited(emulator, "read", wait_s)
    counters.admit("read", now)
    faults = emulator.config.faults.read
    if faults.latency_ms > 0:
        await _delay(faults)
    fault = emulator.injector.draw(faults, write=False)
    if fault is not None:
        return await _inflict(emulator, request, "read", fault, faults)
    match_info = request.match_info
    segment_id = match_info["segmentId"]
    contact_id = match_info["contactId"]
    segment = emulator.directory.find(segment_id, emulator.config.auto_create_segments)
    if segment is None:
        counters.answered("read", 404)
        return json_response(404, _segment_not_found(segment_id).body)
    if ID_PATTERN.fullmatch(contact_id) is None:
        counters.answered("read", 400)
        return error_response(400, "InvalidContactId", "contact id fails the id rule")
    member = segment.members.get(contact_id)
    is_member, added_at = (False, None) if member is None else member.read(monotonic())
    body = {
        "contactId": contact_id,
        "segmentId": segment_id,
        "isMember": is_member,
        "addedAt": added_at,
    }
    counters.answered("read", 200)
    return json_response(200, body)


async def refresh(request: web.Request) -> web.Response:
    """`POST /api/v2/segments/{segmentId}/refresh`: index pending writes within 1 s."""
    emulator = request.app[EMULATOR]
    counters = emulator.counters
    now = monotonic()
    counters.arrived("refresh", now)
    refused = _gate(emulator, request)
    if refused is not None:
        return _early(emulator, "refresh", refused)
    segment_id = request.match_info["segmentId"]
    wait_s = emulator.refresh_wait(segment_id, now)
    if wait_s > 0:
        return _limited(emulator, "refresh", wait_s)
    counters.admit("refresh", now)
    faults = emulator.config.faults.refresh
    await _delay(faults)
    fault = emulator.injector.draw(faults, write=False)
    if fault is not None:
        return await _inflict(emulator, request, "refresh", fault, faults)
    segment = emulator.directory.find(segment_id, emulator.config.auto_create_segments)
    if segment is None:
        counters.answered("refresh", 404)
        return json_response(404, _segment_not_found(segment_id).body)
    emulator.refresh(segment, monotonic())
    counters.answered("refresh", 202)
    return json_response(202, {"segmentId": segment_id, "status": "refreshing"})


def create_app(config: EmulatorConfig, rng: random.Random) -> web.Application:
    """The emulator's web application: CXone routes plus the `/_emulator/` control API."""
    app = web.Application()
    app[EMULATOR] = Emulator(config, rng)
    router = app.router
    router.add_get("/.well-known/openid-configuration", openid_discovery)
    router.add_get("/.well-known/cxone-configuration", cxone_discovery)
    router.add_post("/auth/token", token)
    router.add_post(f"{_SEGMENTS}/contacts", write)
    router.add_delete(f"{_SEGMENTS}/contacts", remove_bulk)
    router.add_get(f"{_SEGMENTS}/contacts/{{contactId}}", membership, allow_head=False)
    router.add_delete(f"{_SEGMENTS}/contacts/{{contactId}}", remove_single)
    router.add_post(f"{_SEGMENTS}/refresh", refresh)
    add_routes(app)
    return app
