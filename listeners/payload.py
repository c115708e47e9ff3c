"""Webhook bodies to `MembershipChange`s, validated all or nothing.

A body is one event `{"contactId": ID, "segmentIds": [ID, ...]}` or a JSON array of them. An ID
is a JSON string, or a JSON integer taken as its decimal text (CXone contact ids are 64-bit
integers and CRMs send them as numbers); either way it must pass CONTRACT.md's rule, 1-128
characters of `A-Z a-z 0-9 _ . : -`. Booleans and fractions are not ids. Neither are integers
beyond 64 bits: the JSON parser turns those into floats, and a rounded id would be another
contact, so they are refused, never rounded.

Statuses, with the location in both `message` and `field`:

- 400: not a usable document. Not UTF-8 JSON; neither an object nor an array of objects; an
  empty array; a missing key; an unknown key; `segmentIds` not an array.
- 422: a well-formed document with an unacceptable value. An id of the wrong type or failing the
  id rule; an empty `segmentIds`; a cap exceeded.

Unknown keys are refused: a typo such as `segmentIDs` must not pass as a lighter request. The
first problem refuses the whole delivery, so nothing is journaled from a body the sender has to
correct and send again. Duplicate segment ids within an event are dropped, keeping first
occurrences in order. A key repeated within one object is refused (400), never "last one wins":
the sender and segmapd would disagree about what was asked.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

import orjson

from listeners.errors import WebhookRejected
from scheduler.model import MembershipChange

MAX_EVENTS = 1000
"""Events per delivery. More is refused (422), never truncated."""

MAX_SEGMENTS_PER_EVENT = 100
"""Entries in one event's `segmentIds`, counted before duplicates are dropped (422 beyond)."""

ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
ID_RULE = "must be 1-128 characters of A-Z a-z 0-9 _ . : -"
_MAX_ID_LENGTH = 128

_CONTACT = "contactId"
_SEGMENTS = "segmentIds"
_KEYS = (_CONTACT, _SEGMENTS)
# How many unknown keys, and how much of each, a message quotes: the body is untrusted.
_QUOTED_KEYS = 5
_QUOTED_KEY_CHARS = 40


def parse_events(body: bytes) -> list[MembershipChange]:
    """The events of a webhook or `/v1/mappings` body, in order; raises `WebhookRejected`."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise WebhookRejected(400, f"body: {_json_problem(exc, body)}", "body") from None
    if type(document) is dict:
        if _may_repeat_keys(body, 1):
            reject_duplicate_keys(body)
        return [_event(document, "body")]
    if type(document) is not list:
        raise WebhookRejected(
            400,
            f"body: must be an event object or an array of event objects, "
            f"not {_json_type(document)}",
            "body",
        )
    if not document:
        raise WebhookRejected(400, "body: empty array; send at least one event", "body")
    if len(document) > MAX_EVENTS:
        raise WebhookRejected(
            422, f"body: {len(document)} events; at most {MAX_EVENTS} per delivery", "body"
        )
    if _may_repeat_keys(body, len(document)):
        reject_duplicate_keys(body)
    return [_event(event, f"body[{index}]") for index, event in enumerate(document)]


def _may_repeat_keys(body: bytes, events: int) -> bool:
    """False only when no event object of `body` can hold a key twice; a cheap scan.

    orjson keeps the last of repeated keys without saying so. Any other key is refused as
    unknown anyway, so only `contactId` and `segmentIds` can repeat unnoticed; without a
    backslash (ids never contain one) every occurrence of those keys is spelled literally, and
    `events` of each means one per event. A value spelled like a key only costs the exact check.
    """
    return (
        body.count(b'"contactId"') > events or body.count(b'"segmentIds"') > events or b"\\" in body
    )


class _Unique(dict[str, Any]):
    """A decoded JSON object that remembers the first key it saw twice."""

    repeated: str | None = None


def _unique_pairs(pairs: list[tuple[str, Any]]) -> _Unique:
    decoded = _Unique(pairs)
    if len(decoded) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                decoded.repeated = key
                break
            seen.add(key)
    return decoded


def loads_unique(body: bytes) -> Any:
    """`body` decoded as JSON, refused (400) when any object in it repeats a key."""
    try:
        document = json.loads(body, object_pairs_hook=_unique_pairs)
    except RecursionError:
        raise WebhookRejected(400, "body: nested too deeply", "body") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise WebhookRejected(400, f"body: not valid JSON: {exc}", "body") from None
    # Iteratively (the document may be deep): the first object in document order that repeats.
    stack: list[tuple[Any, str]] = [(document, "body")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Unique):
            if node.repeated is not None:
                key = node.repeated[:_QUOTED_KEY_CHARS]
                raise WebhookRejected(
                    400,
                    f"{path}: key {key!r} appears more than once; send each key once",
                    f"{path}.{key}",
                )
            stack.extend((value, f"{path}.{key}") for key, value in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]") for i, value in reversed(list(enumerate(node))))
    return document


def reject_duplicate_keys(body: bytes) -> None:
    """Raise `WebhookRejected` (400, naming the key and its path) if an object repeats a key."""
    loads_unique(body)


def _event(event: object, path: str) -> MembershipChange:
    if type(event) is not dict:
        raise WebhookRejected(
            400,
            f"{path}: must be an object with {_CONTACT} and {_SEGMENTS}, not {_json_type(event)}",
            path,
        )
    if len(event) != len(_KEYS) or _CONTACT not in event or _SEGMENTS not in event:
        _refuse_keys(event, path)
    contact_id = _id(event[_CONTACT], path, _CONTACT, None)
    raw = event[_SEGMENTS]
    where = f"{path}.{_SEGMENTS}"
    if type(raw) is not list:
        raise WebhookRejected(
            400, f"{where}: must be an array of segment ids, not {_json_type(raw)}", where
        )
    if not raw:
        raise WebhookRejected(422, f"{where}: must list at least one segment id", where)
    if len(raw) > MAX_SEGMENTS_PER_EVENT:
        raise WebhookRejected(
            422,
            f"{where}: {len(raw)} segment ids; at most {MAX_SEGMENTS_PER_EVENT} per event",
            where,
        )
    segment_ids = [_id(value, path, _SEGMENTS, index) for index, value in enumerate(raw)]
    return MembershipChange(contact_id, tuple(dict.fromkeys(segment_ids)))


def _id(value: object, path: str, key: str, index: int | None) -> str:
    # The common case (a valid string) costs one type check and one regex match; paths and
    # explanations are only built on the way to an error.
    if type(value) is str:
        text = value
    elif type(value) is int:
        text = str(value)
    else:
        where = _where(path, key, index)
        if type(value) is float:
            detail = "not a fraction or an integer beyond 64 bits; send such ids as strings"
        else:
            detail = f"not {_json_type(value)}"
        raise WebhookRejected(422, f"{where}: must be a string or an integer, {detail}", where)
    if ID_PATTERN.fullmatch(text) is None:
        where = _where(path, key, index)
        raise WebhookRejected(422, f"{where}: {ID_RULE} ({_id_problem(text)})", where)
    return text


def _where(path: str, key: str, index: int | None) -> str:
    return f"{path}.{key}" if index is None else f"{path}.{key}[{index}]"


def _id_problem(text: str) -> str:
    if not text:
        return "got an empty string"
    if len(text) > _MAX_ID_LENGTH:
        return f"got {len(text)} characters"
    for position, char in enumerate(text):
        if ID_PATTERN.fullmatch(char) is None:
            return f"got {char!r} at index {position}"
    return "invalid"  # unreachable: one of the checks above holds for any failing id


def _refuse_keys(event: dict[str, object], path: str) -> NoReturn:
    unknown = [key for key in event if key not in _KEYS]
    if unknown:
        quoted = ", ".join(_quote_key(key) for key in unknown[:_QUOTED_KEYS])
        more = f" and {len(unknown) - _QUOTED_KEYS} more" if len(unknown) > _QUOTED_KEYS else ""
        noun = "key" if len(unknown) == 1 else "keys"
        raise WebhookRejected(
            400,
            f"{path}: unknown {noun} {quoted}{more}; an event has only {_CONTACT} and {_SEGMENTS}",
            f"{path}.{unknown[0][:_QUOTED_KEY_CHARS]}",
        )
    missing = next(key for key in _KEYS if key not in event)
    raise WebhookRejected(400, f"{path}.{missing}: required", f"{path}.{missing}")


def _quote_key(key: str) -> str:
    shown = repr(key[:_QUOTED_KEY_CHARS]) + ("..." if len(key) > _QUOTED_KEY_CHARS else "")
    for known in _KEYS:
        if key.lower() == known.lower():
            # The case-only typo is the likely one (segmentIDs, contactID).
            return f"{shown} (did you mean {known!r}?)"
    return shown


def _json_problem(exc: orjson.JSONDecodeError, body: bytes) -> str:
    if str(exc).startswith("str is not valid UTF-8"):
        # orjson's wording (about surrogates, at char 0) misleads senders; find the real byte.
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            return f"not valid UTF-8 (byte {bad.start}); JSON must be UTF-8"
    return f"not valid JSON: {exc}"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if type(value) is bool:
        return "a boolean"
    if type(value) in (int, float):
        return "a number"
    if type(value) is str:
        return "a string"
    if type(value) is list:
        return "an array"
    return "an object"
