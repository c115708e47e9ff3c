"""Webhook bodies to `MembershipChange`s, validated all or nothing.

A body is one event or a JSON array of them. An event names a contact and what changes:

    {"contactId": ID, "segmentIds": [ID, ...]}              add (the original form)
    {"contactId": ID, "add": [ID, ...], "remove": [ID, ...]}  either list, or both
    {"contactId": ID, "set": [ID, ...]}                     mirror: the complete list; may be []

plus, on any of them, an optional `"occurredAt"`: when the CRM made the change, an RFC 3339
timestamp with an offset (`2026-12-01T10:00:00Z`, `2026-12-01T11:00:00.250+01:00`) or a JSON
integer of epoch milliseconds. It orders changes to one (contact, segment): the newest wins.

An ID is a JSON string, or a JSON integer taken as its decimal text (CXone contact ids are 64-bit
integers and CRMs send them as numbers); either way it must pass CONTRACT.md's rule, 1-128
characters of `A-Z a-z 0-9 _ . : -`. Booleans and fractions are not ids. Neither are integers
beyond 64 bits: the JSON parser turns those into floats, and a rounded id would be another
contact, so they are refused, never rounded.

Statuses, with the location in both `message` and `field`:

- 400: not a usable document. Not UTF-8 JSON; neither an object nor an array of objects; an
  empty array; a missing key (`contactId`, or all of `segmentIds`, `add`, `remove` and `set`); an
  unknown key; a repeated key; a segment list that is not an array.
- 422: a well-formed document with an unacceptable value. An id of the wrong type or failing the
  id rule; an event that changes nothing (its lists are empty; only `set` may be empty); `set`
  beside another list; `segmentIds` beside `add`; one segment both added and removed; a cap
  exceeded; an `occurredAt` that is not an offset RFC 3339 time or integer milliseconds, or is
  outside the accepted range.

Unknown keys are refused: a typo such as `segmentIDs` must not pass as a lighter request. The
first problem refuses the whole delivery, so nothing is journaled from a body the sender has to
correct and send again. Duplicate segment ids within a list are dropped, keeping first
occurrences in order. A key repeated within one object is refused (400), never "last one wins":
the sender and segmapd would disagree about what was asked.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from typing import Any, NoReturn

import orjson

from listeners.base import DeadEvent
from listeners.errors import WebhookRejected
from scheduler.model import FailureReason, MembershipChange

MAX_EVENTS = 1000
"""Events per delivery. More is refused (422), never truncated."""

MAX_SEGMENTS_PER_EVENT = 100
"""Segment ids one event names, all its lists together, counted before duplicates are dropped
(422 beyond)."""

EARLIEST_OCCURRED_AT_S = 946_684_800.0
"""2000-01-01T00:00:00Z. Earlier is a unit mistake, not a CRM event: epoch seconds sent where
milliseconds belong land in January 1970, and a placeholder 0 is 1970 too."""

MAX_OCCURRED_AT_AHEAD_S = 900.0
"""How far past segmapd's clock an `occurredAt` may be. The newest change to a pair wins, so a
change stamped by a clock running ahead would make every honest change after it stale until the
wall clock caught up: a day ahead would freeze a pair for a day. Fifteen minutes is far beyond
the skew of any synchronised clock (and a standard source's signature already needs its clock
within `tolerance_s`), yet refuses the usual mistake, a local time sent with a `Z` or the wrong
offset, which is off by whole hours and would otherwise pass unnoticed."""

ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
ID_RULE = "must be 1-128 characters of A-Z a-z 0-9 _ . : -"
_MAX_ID_LENGTH = 128

MAX_KEPT_CHARS = 1024
"""The most of an untrusted contact id or segment value a dead letter keeps (`kept_as_sent`).

Dead letters keep what the CRM sent, ids that fail the id rule included, so that an admin sees
what to correct; but the sender is untrusted and a value can be as long as the body. 1,024
characters show any real mistake (an e-mail address, a label, a URL) in full, eight times the
longest valid id."""

EVERY_SEGMENT = "*"
"""The segment a dead letter names for an event that named none (a cleared list, a deletion).

The journal keeps dead letters per (contact, segment), so an event with an invalid contact id
that took the contact out of every segment would otherwise leave no trace but a log line. `*` is
no segment id (it fails the id rule), so it can never be taken for one, and it is a removal:
what the event asked for."""

_CONTACT = "contactId"
_SEGMENTS = "segmentIds"
_ADD = "add"
_REMOVE = "remove"
_SET = "set"
_OCCURRED_AT = "occurredAt"
_KEYS = (_CONTACT, _SEGMENTS, _ADD, _REMOVE, _SET, _OCCURRED_AT)
_KEY_SET = frozenset(_KEYS)
_KEY_LIST = "contactId, segmentIds, add, remove, set and occurredAt"
# RFC 3339 section 5.6 `date-time`, ASCII digits only; `datetime.fromisoformat` alone would also
# take ISO 8601 forms RFC 3339 does not (week dates, no separators, no seconds).
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})?"
)
_MAX_TIMESTAMP_CHARS = 64
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
        events: list[Any] = [document]
    elif type(document) is list:
        if not document:
            raise WebhookRejected(400, "body: empty array; send at least one event", "body")
        if len(document) > MAX_EVENTS:
            raise WebhookRejected(
                422, f"body: {len(document)} events; at most {MAX_EVENTS} per delivery", "body"
            )
        events = document
    else:
        raise WebhookRejected(
            400,
            f"body: must be an event object or an array of event objects, "
            f"not {json_type(document)}",
            "body",
        )
    try:
        if events is document:
            changes = [_event(event, f"body[{index}]") for index, event in enumerate(events)]
        else:
            changes = [_event(document, "body")]
    except WebhookRejected:
        # A repeated key is the first thing to correct: the refusal of a value may be about the
        # copy of the key that orjson happened to keep.
        if may_repeat_keys(body, events):
            reject_duplicate_keys(body)
        raise
    if may_repeat_keys(body, events):
        reject_duplicate_keys(body)
    return changes


def parse_event(event: object, path: str) -> MembershipChange:
    """One already-decoded event object (segmapd's own keys), validated as `parse_events` does.

    Adapters that map another format build this shape and hand it here, so every kind obeys
    the same id, list, cap and time rules; `path` names the event in messages (`body[3]`).
    """
    return _event(event, path)


def may_repeat_keys(body: bytes, events: list[Any]) -> bool:
    r"""False only when no object anywhere in `body` can hold a key twice; a cheap scan.

    `events` is what orjson decoded from `body`, as a list: the array of events, or `[document]`
    for any other document.

    orjson keeps the last of repeated keys without saying so, and the exact check (the stdlib
    parser) costs several times the parse, so it runs only when a count says it may find
    something. The count: every key of every object in a JSON document is followed by one
    structural `:`, and the other colons are inside strings. So `body.count(b":")` is at least the
    number of key occurrences. The common body, whose ids and values hold no colon, has no more
    colons than its top-level objects have keys and passes with one byte scan and a sum of
    lengths.

    Otherwise (colons in values: `urn:crm:1`, RFC 3339 times, HubSpot's `userId:123`; nested
    objects) the decoded document is written out again by orjson, which writes the colons of
    strings as they are and one structural colon per key it holds, at any depth: when the body
    has no backslash, its strings are written literally too, so it has more colons than the
    rewrite exactly when orjson dropped a repeated key. A backslash (`\u003a` decodes to a colon
    without being one in the body), or a document too deep for orjson to write, gets the exact
    check.
    """
    colons = body.count(b":")
    keys = 0
    for event in events:
        if type(event) is dict:
            keys += len(event)
    if colons <= keys:
        return False
    if b"\\" in body:
        return True
    try:
        rewritten = orjson.dumps(events)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
        return True
    return colons > rewritten.count(b":")


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
        raise WebhookRejected(400, f"{path}: must be an event object, not {json_type(event)}", path)
    # The original form, by far the most common, takes the shortest way.
    if len(event) == 2 and _SEGMENTS in event and _CONTACT in event:
        contact_id = _id(event[_CONTACT], path, _CONTACT, None)
        raw = _list(event, path, _SEGMENTS)
        if not raw:
            where = f"{path}.{_SEGMENTS}"
            raise WebhookRejected(422, f"{where}: must list at least one segment id", where)
        _check_cap(path, _SEGMENTS, len(raw), len(raw))
        return MembershipChange(contact_id, _ids(raw, path, _SEGMENTS))
    return _general_event(event, path)


def _general_event(event: dict[str, Any], path: str) -> MembershipChange:
    if not _KEY_SET.issuperset(event):
        _refuse_unknown([key for key in event if key not in _KEY_SET], path)
    if _CONTACT not in event:
        where = f"{path}.{_CONTACT}"
        raise WebhookRejected(400, f"{where}: required", where)
    if _SET in event:
        return _mirror_event(event, path)
    if _SEGMENTS in event:
        if _ADD in event:
            # Two spellings of the adds. Merging them would be harmless for the list, but a
            # sender writing both most likely means something else by one of them (a mirror,
            # say), so it is asked to choose rather than guessed for.
            where = f"{path}.{_ADD}"
            raise WebhookRejected(
                422,
                f"{where}: segmentIds and add both list segments to add; send them in one of "
                f"the two (add with remove, or segmentIds alone as before)",
                where,
            )
        add_key = _SEGMENTS
    else:
        add_key = _ADD
    has_add = add_key in event
    has_remove = _REMOVE in event
    if not has_add and not has_remove:
        where = f"{path}.{_SEGMENTS}"
        raise WebhookRejected(
            400, f"{where}: required (or add, remove or set: what the event changes)", where
        )
    raw_add = _list(event, path, add_key) if has_add else []
    raw_remove = _list(event, path, _REMOVE) if has_remove else []
    contact_id = _id(event[_CONTACT], path, _CONTACT, None)
    _check_cap(path, add_key, len(raw_add), len(raw_add))
    _check_cap(path, _REMOVE, len(raw_remove), len(raw_add) + len(raw_remove))
    add = _ids(raw_add, path, add_key) if raw_add else ()
    remove = _ids(raw_remove, path, _REMOVE) if raw_remove else ()
    if not add and not remove:
        where = f"{path}.{add_key if has_add else _REMOVE}"
        detail = (
            f"{add_key} and remove are both empty; an event must change something"
            if has_add and has_remove
            else "must list at least one segment id"
        )
        raise WebhookRejected(422, f"{where}: {detail}", where)
    if add and remove and not set(add).isdisjoint(remove):
        _refuse_overlap(add, raw_remove, path, add_key)
    occurred_at = _occurred_at(event[_OCCURRED_AT], path) if _OCCURRED_AT in event else None
    return MembershipChange(contact_id, add, remove, occurred_at=occurred_at)


def _mirror_event(event: dict[str, Any], path: str) -> MembershipChange:
    others = [key for key in (_SEGMENTS, _ADD, _REMOVE) if key in event]
    if others:
        # `set` is the whole truth about the contact; beside explicit changes one of the two
        # would have to lose, and the sender would not know which.
        where = f"{path}.{_SET}"
        raise WebhookRejected(
            422,
            f"{where}: set is the complete list of segments and cannot be combined with "
            f"{' and '.join(others)}; send set alone, or add and remove",
            where,
        )
    raw = _list(event, path, _SET)
    contact_id = _id(event[_CONTACT], path, _CONTACT, None)
    _check_cap(path, _SET, len(raw), len(raw))
    # An empty `set` is a statement too: the contact is in none of the tracked segments.
    mirror = _ids(raw, path, _SET)
    occurred_at = _occurred_at(event[_OCCURRED_AT], path) if _OCCURRED_AT in event else None
    return MembershipChange(contact_id, mirror=mirror, occurred_at=occurred_at)


def _refuse_overlap(
    add: tuple[str, ...], raw_remove: list[Any], path: str, add_key: str
) -> NoReturn:
    added = set(add)
    for index, value in enumerate(raw_remove):
        # Only ids `_id` accepted reach here: an integer id is its decimal text.
        text = value if type(value) is str else str(value)
        if text in added:
            where = f"{path}.{_REMOVE}[{index}]"
            raise WebhookRejected(
                422,
                f"{where}: segment {text!r} is also in {add_key}; an event cannot both add and "
                f"remove a segment",
                where,
            )
    raise AssertionError("unreachable: the lists were found to overlap")


def _list(event: dict[str, Any], path: str, key: str) -> list[Any]:
    raw = event[key]
    if type(raw) is not list:
        where = f"{path}.{key}"
        raise WebhookRejected(
            400, f"{where}: must be an array of segment ids, not {json_type(raw)}", where
        )
    return raw


def _check_cap(path: str, key: str, entries: int, named: int) -> None:
    # Entries count before duplicates are dropped: the cap bounds the work of reading lists.
    if named <= MAX_SEGMENTS_PER_EVENT:
        return
    where = f"{path}.{key}"
    total = "" if named == entries else f", {named} in this event's lists together"
    raise WebhookRejected(
        422,
        f"{where}: {entries} segment ids{total}; at most {MAX_SEGMENTS_PER_EVENT} per event",
        where,
    )


def _ids(raw: list[Any], path: str, key: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys([_id(value, path, key, index) for index, value in enumerate(raw)]))


def parse_occurred_at(value: object, path: str) -> float:
    """`value`, an event's `occurredAt`, as epoch seconds, checked as `parse_event` checks it.

    `path` names the event: a refusal (`WebhookRejected`) names `{path}.occurredAt`.
    """
    return _occurred_at(value, path)


def _occurred_at(value: object, path: str) -> float:
    """`occurredAt` as epoch seconds: RFC 3339 with an offset, or integer epoch milliseconds."""
    if type(value) is int:
        seconds = value / 1000
    elif type(value) is str:
        seconds = _rfc3339_seconds(value, path)
    else:
        where = f"{path}.{_OCCURRED_AT}"
        if type(value) is float:
            detail = "not a fraction: epoch milliseconds are an integer"
        else:
            detail = f"not {json_type(value)}"
        raise WebhookRejected(
            422,
            f"{where}: must be an RFC 3339 time with an offset or integer epoch milliseconds, "
            f"{detail}",
            where,
        )
    if seconds < EARLIEST_OCCURRED_AT_S:
        where = f"{path}.{_OCCURRED_AT}"
        hint = " (epoch seconds? send milliseconds)" if type(value) is int else ""
        raise WebhookRejected(
            422, f"{where}: {_shown(value)} is before 2000-01-01T00:00:00Z{hint}", where
        )
    ahead = seconds - time.time()
    if ahead > MAX_OCCURRED_AT_AHEAD_S:
        where = f"{path}.{_OCCURRED_AT}"
        raise WebhookRejected(
            422,
            f"{where}: {_shown(value)} is {ahead:.0f} s ahead of segmapd's clock (at most "
            f"{MAX_OCCURRED_AT_AHEAD_S:.0f} s); check the sender's clock and time zone",
            where,
        )
    return seconds


def _shown(value: object) -> str:
    if type(value) is int:
        return f"{value} ms"
    text = str(value)
    return repr(text[:_MAX_TIMESTAMP_CHARS]) + ("..." if len(text) > _MAX_TIMESTAMP_CHARS else "")


def _rfc3339_seconds(text: str, path: str) -> float:
    matched = _RFC3339.fullmatch(text) if len(text) <= _MAX_TIMESTAMP_CHARS else None
    if matched is None or matched.group(1) is None:
        where = f"{path}.{_OCCURRED_AT}"
        if matched is None:
            problem = (
                "must be an RFC 3339 time such as '2026-12-01T10:00:00Z' or integer epoch "
                f"milliseconds, got {_shown(text)}"
            )
        else:
            # Read as UTC or as segmapd's local time, it would be wrong by the sender's offset.
            problem = f"{_shown(text)} has no UTC offset; add Z or +HH:MM"
        raise WebhookRejected(422, f"{where}: {problem}", where)
    try:
        # fromisoformat takes only the upper-case T and Z that RFC 3339 lets be either case.
        parsed = datetime.fromisoformat(text.upper())
    except ValueError as exc:
        where = f"{path}.{_OCCURRED_AT}"
        raise WebhookRejected(
            422, f"{where}: {_shown(text)} is not a valid time ({exc})", where
        ) from None
    return parsed.timestamp()


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
            detail = f"not {json_type(value)}"
        raise WebhookRejected(422, f"{where}: must be a string or an integer, {detail}", where)
    if ID_PATTERN.fullmatch(text) is None:
        where = _where(path, key, index)
        raise WebhookRejected(422, f"{where}: {ID_RULE} ({_id_problem(text)})", where)
    return text


def id_problem(text: str) -> str | None:
    """None when `text` passes the id rule (`ID_RULE`); else what is wrong, for a message.

    "got an empty string", "got 900000 characters", "got ' ' at index 4": the value itself is
    not quoted, since it may be as long as the body.
    """
    if ID_PATTERN.fullmatch(text) is not None:
        return None
    return _id_problem(text)


def kept_as_sent(text: str) -> str:
    """`text` as a dead letter keeps it: whole up to `MAX_KEPT_CHARS` characters.

    A longer value is shortened visibly, never silently: its first characters, then
    `…[shortened from N characters]` with its true length, `MAX_KEPT_CHARS` in all. A shortened
    value is far beyond the id rule's 128 characters (and holds `…`), so it is never an id.
    """
    if len(text) <= MAX_KEPT_CHARS:
        return text
    marker = f"…[shortened from {len(text)} characters]"
    return text[: MAX_KEPT_CHARS - len(marker)] + marker


def dead_event(
    change: MembershipChange, reason: FailureReason, message: str, key: str | None = None
) -> DeadEvent:
    """A `DeadEvent` for `change` as sent, within bounds every journal can keep.

    Its contact id and segment values go through `kept_as_sent`; each list keeps at most
    `MAX_SEGMENTS_PER_EVENT` values, the first ones, and the message then says how many there
    were; a change that names no segment (a cleared list, a deletion) becomes a removal from
    `EVERY_SEGMENT`, since a dead letter is kept per (contact, segment) and one naming none
    would keep nothing.
    """
    add = _kept_values(change.add)
    remove = _kept_values(change.remove)
    mirror = None if change.mirror is None else _kept_values(change.mirror)
    longest = max(len(change.add), len(change.remove), len(change.mirror or ()))
    if longest > MAX_SEGMENTS_PER_EVENT:
        message += (
            f" (this dead letter keeps the first {MAX_SEGMENTS_PER_EVENT} of the event's "
            f"{longest} segment values)"
        )
    if not (add or remove or mirror):
        remove, mirror = (EVERY_SEGMENT,), None
    kept = MembershipChange(
        kept_as_sent(change.contact_id), add, remove, mirror, occurred_at=change.occurred_at
    )
    return DeadEvent(kept, reason, message, key)


def _kept_values(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(kept_as_sent(value) for value in values[:MAX_SEGMENTS_PER_EVENT]))


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


def _refuse_unknown(unknown: list[str], path: str) -> NoReturn:
    quoted = ", ".join(_quote_key(key) for key in unknown[:_QUOTED_KEYS])
    more = f" and {len(unknown) - _QUOTED_KEYS} more" if len(unknown) > _QUOTED_KEYS else ""
    noun = "key" if len(unknown) == 1 else "keys"
    raise WebhookRejected(
        400,
        f"{path}: unknown {noun} {quoted}{more}; an event has only {_KEY_LIST}",
        f"{path}.{unknown[0][:_QUOTED_KEY_CHARS]}",
    )


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


def json_type(value: object) -> str:
    """A decoded JSON value's type as messages name it: "null", "a string", "an array", ..."""
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
