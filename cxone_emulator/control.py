"""The test control API under `/_emulator/`: config, reset, segments, members, counters."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from aiohttp import web

from cxone_emulator.config import ConfigError, merged
from cxone_emulator.keys import EMULATOR
from cxone_emulator.state import Member, is_valid_id

logger = logging.getLogger(__name__)

_PREFIX = "/_emulator"


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _bad(error: str, message: str, status: int = 400) -> web.Response:
    return _json({"error": error, "message": message}, status)


async def _body(request: web.Request) -> Any:
    """The JSON body, `None` when empty; raises `ValueError` when it is not JSON."""
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"body is not valid JSON: {error}") from None


async def get_config(request: web.Request) -> web.Response:
    """`GET /_emulator/config`."""
    return _json(request.app[EMULATOR].config.to_json())


async def patch_config(request: web.Request) -> web.Response:
    """`PATCH /_emulator/config`: deep-merge a partial config."""
    emulator = request.app[EMULATOR]
    try:
        patch = await _body(request)
        config = merged(emulator.config, {} if patch is None else patch)
    except (ValueError, ConfigError) as error:
        return _bad("InvalidConfig", str(error))
    emulator.configure(config)
    logger.info("config changed")
    return _json(config.to_json())


async def reset(request: web.Request) -> web.Response:
    """`POST /_emulator/reset`: forget state and counters (`{"config": true}`: config too)."""
    emulator = request.app[EMULATOR]
    try:
        body = await _body(request)
    except ValueError as error:
        return _bad("MalformedPayload", str(error))
    restore = isinstance(body, dict) and body.get("config") is True
    emulator.reset(restore_config=restore)
    return _json({"reset": True, "config_restored": restore})


async def put_segment(request: web.Request) -> web.Response:
    """`PUT /_emulator/segments/{segmentId}`: declare a static or dynamic segment."""
    emulator = request.app[EMULATOR]
    segment_id = request.match_info["segmentId"]
    if not is_valid_id(segment_id):
        return _bad("InvalidSegmentId", "segment id must be 1-128 characters of [A-Za-z0-9_.:-]")
    try:
        body = await _body(request)
    except ValueError as error:
        return _bad("MalformedPayload", str(error))
    kind = body.get("kind", "static") if isinstance(body, dict) else "static"
    if kind == "static":
        segment = emulator.directory.declare(segment_id, "static")
    elif kind == "dynamic":
        segment = emulator.directory.declare(segment_id, "dynamic")
    else:
        return _bad("MalformedPayload", 'kind must be "static" or "dynamic"')
    return _json({"segmentId": segment_id, "kind": segment.kind, "members": segment.written()})


async def delete_segment(request: web.Request) -> web.Response:
    """`DELETE /_emulator/segments/{segmentId}`: forget a segment."""
    segment_id = request.match_info["segmentId"]
    existed = request.app[EMULATOR].directory.delete(segment_id)
    return _json({"segmentId": segment_id, "deleted": existed})


async def list_segments(request: web.Request) -> web.Response:
    """`GET /_emulator/segments`."""
    segments = request.app[EMULATOR].directory.segments.values()
    return _json(
        {
            "segments": [
                {"segmentId": s.segment_id, "kind": s.kind, "members": s.written()}
                for s in segments
            ]
        }
    )


async def list_members(request: web.Request) -> web.Response:
    """`GET /_emulator/segments/{segmentId}/members`: members, indexed or not.

    A pair is listed while its latest write is an add, a read still says it is a member, or a
    write of it is not indexed yet; `removal` describes a latest write that is a removal.
    """
    segment_id = request.match_info["segmentId"]
    segment = request.app[EMULATOR].directory.segments.get(segment_id)
    if segment is None:
        return _bad("SegmentNotFound", f"segment {segment_id} not found", 404)
    now = time.monotonic()
    members = []
    for contact_id, member in segment.members.items():
        if not member.listed(now):
            # Removed, and reads say so too: nothing left to show.
            continue
        is_member, _ = member.read(now)
        pending_removal = None
        if not member.present:
            pending_removal = {"removedAt": member.removed_at, "stalled": member.stalled}
        members.append(
            {
                "contactId": contact_id,
                "addedAt": member.added_at,
                "indexed": member.visible(now),
                "stalled": member.stalled,
                "applied": member.applied,
                "isMember": is_member,
                "pendingWrites": member.pending(now),
                "removal": pending_removal,
            }
        )
    return _json({"segmentId": segment_id, "kind": segment.kind, "members": members})


async def edit_member(request: web.Request) -> web.Response:
    """`PUT` / `DELETE /_emulator/segments/{segmentId}/members/{contactId}`: an edit in CXone.

    What someone does in CXone's UI, or another integration does, behind the client's back: the
    contact joins (`PUT`) or leaves (`DELETE`) the static segment, indexed at once (reads show
    it from now on). No request counter moves and no idempotency key is involved. The segment
    is created as for a write when the emulator auto-creates segments.
    """
    emulator = request.app[EMULATOR]
    segment_id = request.match_info["segmentId"]
    contact_id = request.match_info["contactId"]
    if not is_valid_id(contact_id):
        return _bad("InvalidContactId", "contact id must be 1-128 characters of [A-Za-z0-9_.:-]")
    segment = emulator.directory.find(segment_id, emulator.config.auto_create_segments)
    if segment is None:
        return _bad("SegmentNotFound", f"segment {segment_id} not found", 404)
    if segment.kind != "static":
        return _bad("DynamicSegment", f"segment {segment_id} is dynamic: it has no members to edit")
    add = request.method == "PUT"
    now = time.monotonic()
    member = segment.members.get(contact_id)
    if member is None:
        if add:
            segment.members[contact_id] = Member(emulator.timestamp(), now, False)
    else:
        member.follow(add, emulator.timestamp(), now, 0.0)
    return _json({"segmentId": segment_id, "contactId": contact_id, "isMember": add})


async def put_missing(request: web.Request) -> web.Response:
    """`PUT /_emulator/contacts/missing`: the ids that answer ContactNotFound (replaces the set)."""
    try:
        body = await _body(request)
    except ValueError as error:
        return _bad("MalformedPayload", str(error))
    ids = body.get("contactIds") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(item, str) for item in ids):
        return _bad("MalformedPayload", 'body must be {"contactIds": [string, ...]}')
    emulator = request.app[EMULATOR]
    emulator.directory.missing = frozenset(ids)
    return _json({"contactIds": sorted(emulator.directory.missing)})


async def expire_tokens(request: web.Request) -> web.Response:
    """`POST /_emulator/tokens/expire`: every issued access token is expired from now on."""
    return _json({"expired": request.app[EMULATOR].tokens.expire_all()})


async def reset_counters(request: web.Request) -> web.Response:
    """`POST /_emulator/counters/reset`: zero the counters, keeping segments and members."""
    request.app[EMULATOR].counters.reset()
    return _json({"reset": True})


async def counters(request: web.Request) -> web.Response:
    """`GET /_emulator/counters`."""
    return _json(request.app[EMULATOR].counters.snapshot())


def add_routes(app: web.Application) -> None:
    """Register the control API on `app`."""
    router = app.router
    router.add_get(f"{_PREFIX}/config", get_config, allow_head=False)
    router.add_patch(f"{_PREFIX}/config", patch_config)
    router.add_post(f"{_PREFIX}/reset", reset)
    router.add_get(f"{_PREFIX}/segments", list_segments, allow_head=False)
    router.add_put(f"{_PREFIX}/segments/{{segmentId}}", put_segment)
    router.add_delete(f"{_PREFIX}/segments/{{segmentId}}", delete_segment)
    router.add_get(f"{_PREFIX}/segments/{{segmentId}}/members", list_members, allow_head=False)
    member = f"{_PREFIX}/segments/{{segmentId}}/members/{{contactId}}"
    router.add_put(member, edit_member)
    router.add_delete(member, edit_member)
    router.add_post(f"{_PREFIX}/counters/reset", reset_counters)
    router.add_put(f"{_PREFIX}/contacts/missing", put_missing)
    router.add_post(f"{_PREFIX}/tokens/expire", expire_tokens)
    router.add_get(f"{_PREFIX}/counters", counters, allow_head=False)
