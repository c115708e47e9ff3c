"""`kind = "json"`: any sender of HMAC-signed JSON (Zendesk, GitHub-style senders, iPaaS tools).

The sender's own body is mapped to segmapd's event shape by JMESPath expressions
(https://jmespath.org/), one per `[sources.NAME]` key: `events` finds the list of events in the
body, and for each event `contact_id`, `add`, `remove` or `set`, and optionally `occurred_at`,
`when` (a filter) and `dedup_key`. The result, `{"contactId", "add"/"remove"/"set",
"occurredAt"}`, is validated by `listeners.payload.parse_event`, so a generic sender obeys the
same id, list, cap and time rules as a `standard` one.

Authentication is an HMAC-SHA256 over the body, or over a timestamp header and the body
(`timestamp+body` concatenated, as Zendesk signs; `timestamp.body`, as Standard-Webhooks-like
senders do), sent hex or base64 in a configured header, optionally after a prefix such as
GitHub's `sha256=`. The header may hold several whitespace-separated signatures (secret
rotation); one match is enough.

Redelivery keys, from the most to the least precise:

- `delivery_id_header` (GitHub's `X-GitHub-Delivery`): the delivery's key, `delivery:<value>`;
  a repeat is answered with the first answer, unparsed.
- `dedup_key`: each event's key, `event:<value>`, for senders that batch or retry events.
- neither: the delivery's key is `sha256:<hex>` of the body, since a redelivery is
  byte-identical. A genuine repeat of an identical body (no time or id in it) within the
  redelivery window counts as a redelivery too, so senders whose bodies can repeat should put
  a time or an id in the body, or configure one of the keys above.

Decisions on bad events, all or nothing like the `standard` kind: a value the expressions find
that segmapd cannot take (a segment id failing the id rule, a list of the wrong type, an
`occurredAt` out of range) refuses the whole delivery with 422 naming the value and the
expression, because this sender can correct its mapping and send again. So, unlike the
`hubspot` and `salesforce` kinds, a bad segment value is not split off from its event as an
invalid part: refused, nothing of the delivery is taken, and nothing is dead-lettered over a
valid membership. One exception: a contact id that is present but fails the id rule is
dead-lettered (`invalid_contact_id`, the id as sent within `payload.dead_event`'s bounds), since
it is CRM data that no resend fixes and a refusal would block the deliveries behind it; no
valid membership can have that id. Events
the expressions find nothing in are skipped and counted: `filtered` (`when` is false),
`no_contact` (contact id null or empty), `no_change` (add, remove and set all absent).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any, ClassVar, Literal

import jmespath
import orjson
from jmespath import functions as jmespath_functions
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult
from pydantic import ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator

from listeners.base import (
    InboundEvent,
    InboundRequest,
    JsonReplies,
    ParsedDelivery,
    SkippedEvent,
    SourceSettings,
)
from listeners.errors import WebhookRejected
from listeners.payload import (
    MAX_EVENTS,
    dead_event,
    json_type,
    parse_event,
    reject_duplicate_keys,
)
from scheduler.model import FailureReason

SKIP_FILTERED = "filtered"
SKIP_NO_CONTACT = "no_contact"
SKIP_NO_CHANGE = "no_change"

SignedContent = Literal["body", "timestamp+body", "timestamp.body"]
TimestampFormat = Literal["unix", "unix_ms", "rfc3339"]

# RFC 9110 `token`: what a header name may be made of.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
# The delivery and dedup keys segmapd stores: visible ASCII, bounded (MSG_ID_RULE's 256 less the
# longest prefix).
_KEY_VALUE = re.compile(r"[\x21-\x7e]{1,200}")
_KEY_RULE = "must be 1-200 visible ASCII characters (no spaces)"
_HMAC_BYTES = hashlib.sha256().digest_size
# Unix seconds have 10 digits until 2286, milliseconds 13; the bound keeps int() off huge input.
_MAX_TIMESTAMP_DIGITS = 15
_MAX_TIMESTAMP_CHARS = 64
# RFC 3339 `date-time` with its offset; fromisoformat alone takes ISO 8601 forms beyond it.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
# How much of a JMESPath error a message quotes (it may quote a value from the body).
_MAX_DETAIL_CHARS = 300
# Any valid id: stands in for an invalid contact id while the rest of its event is checked.
_PLACEHOLDER_ID = "0"

_EXPRESSION_KEYS = ("events", "when", "contact_id", "add", "remove", "set", "occurred_at")
_SEGMENT_KEYS = {"add": "add", "remove": "remove", "set": "set"}  # config key -> event key


class JsonSource(SourceSettings):
    """`[sources.NAME]` with `kind = "json"`: a signed JSON body mapped by JMESPath expressions.

    Signature: `secret` (or `secret_file`) is the shared key, taken as its UTF-8 bytes unless
    `secret_encoding` says `base64` or `hex`; `signature_header` holds the HMAC-SHA256,
    `signature_encoding` `hex` or `base64`, after `signature_prefix`; `signed_content` is the
    `body`, or `timestamp+body` / `timestamp.body` with `timestamp_header` in
    `timestamp_format`, which must be within `tolerance_s` of the receiver's clock.

    Mapping (JMESPath; "" = not used): `events` gives the events (an array, or one object);
    per event, `when` filters, `contact_id` names the contact, `add`, `remove` or `set` the
    segments (an array, or a string split on `list_separator`; null = absent), `occurred_at`
    the change's time (RFC 3339 or epoch milliseconds), `dedup_key` its redelivery key.
    `delivery_id_header` names a header holding a per-delivery id.
    """

    # A model-level error would otherwise quote the whole table, secret included.
    model_config = ConfigDict(**SourceSettings.model_config, hide_input_in_errors=True)

    required_keys: ClassVar[tuple[str, ...]] = ("secret",)

    kind: Literal["json"] = "json"
    secret: SecretStr = SecretStr("")
    secret_encoding: Literal["utf-8", "base64", "hex"] = "utf-8"  # noqa: S105 (an encoding)
    signature_header: str
    signature_encoding: Literal["hex", "base64"] = "hex"
    signature_prefix: str = ""
    signed_content: SignedContent = "body"
    timestamp_header: str = ""
    timestamp_format: TimestampFormat = "unix"
    tolerance_s: int = Field(default=300, ge=1, le=86_400)
    delivery_id_header: str = ""
    events: str = "@"
    when: str = ""
    contact_id: str
    add: str = ""
    remove: str = ""
    set: str = ""
    list_separator: str = Field(default=";", min_length=1, max_length=8)
    occurred_at: str = ""
    dedup_key: str = ""

    @field_validator("signature_header", "timestamp_header", "delivery_id_header")
    @classmethod
    def _header_name(cls, value: str, info: ValidationInfo) -> str:
        if value and _HEADER_NAME.fullmatch(value) is None:
            raise ValueError(f"{info.field_name}: {value!r} is not an HTTP header name")
        if info.field_name == "signature_header" and not value:
            raise ValueError("signature_header: required (the header holding the signature)")
        return value

    @field_validator("signature_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if any(char.isspace() for char in value) or not value.isascii():
            raise ValueError("signature_prefix: must be ASCII without spaces, such as 'sha256='")
        return value

    @field_validator(*_EXPRESSION_KEYS, "dedup_key")
    @classmethod
    def _expression(cls, value: str, info: ValidationInfo) -> str:
        if value:
            compile_expression(str(info.field_name), value)
        elif info.field_name in ("events", "contact_id"):
            raise ValueError(f"{info.field_name}: required (a JMESPath expression)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JsonSource:
        if not (self.add or self.remove or self.set):
            raise ValueError("add, remove or set: at least one is required (what events change)")
        if self.set and (self.add or self.remove):
            raise ValueError(
                "set: the complete list of segments cannot be combined with add or remove; "
                "configure set alone, or add and/or remove"
            )
        uses_timestamp = self.signed_content != "body"
        if uses_timestamp and not self.timestamp_header:
            raise ValueError(
                f"timestamp_header: required when signed_content = {self.signed_content!r}"
            )
        if not uses_timestamp and self.timestamp_header:
            # An unsigned timestamp proves nothing: anyone replaying a delivery can refresh it.
            raise ValueError(
                "timestamp_header: only used when the timestamp is signed; set signed_content "
                "to 'timestamp+body' or 'timestamp.body', or remove timestamp_header"
            )
        secret = self.secret.get_secret_value()
        if secret:
            # Unusable secrets fail at start-up (and in check-config), not on every delivery.
            decode_key(secret, self.secret_encoding)
        return self


def compile_expression(key: str, expression: str) -> ParsedResult:
    """`expression` compiled, or ValueError naming `key`; unknown functions are caught here too.

    JMESPath itself only finds an unknown function name or a wrong number of arguments when the
    expression runs, which would turn a typo into a 422 on every delivery.
    """
    try:
        compiled = jmespath.compile(expression)
    except JMESPathError as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"{key}: not a valid JMESPath expression: {detail}") from None
    tree: Any = compiled.parsed
    for node in _nodes(tree):
        if node.get("type") != "function_expression":
            continue
        name = node.get("value")
        entry = jmespath_functions.Functions.FUNCTION_TABLE.get(name)
        if entry is None:
            raise ValueError(f"{key}: JMESPath has no function {name}()")
        signature = entry["signature"]
        given = len(node.get("children", ()))
        variadic = bool(signature) and bool(signature[-1].get("variadic"))
        expected = len(signature)
        if (variadic and given < expected) or (not variadic and given != expected):
            least = "at least " if variadic else ""
            raise ValueError(f"{key}: {name}() takes {least}{expected} argument(s), {given} given")
    return compiled


def _nodes(tree: dict[str, Any]) -> Iterator[dict[str, Any]]:
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in node.get("children", ()) if isinstance(child, dict))


def decode_key(secret: str, encoding: str) -> bytes:
    """The HMAC key from `secret` as configured; ValueError (never quoting it) if unusable."""
    if encoding == "utf-8":
        return secret.encode("utf-8")
    try:
        if encoding == "base64":
            key = base64.b64decode(secret.strip(), validate=True)
        else:
            key = bytes.fromhex(secret.strip())
    except (binascii.Error, ValueError):
        raise ValueError(f"secret: not valid {encoding} (secret_encoding = {encoding!r})") from None
    if not key:
        raise ValueError(f"secret: decodes to no bytes (secret_encoding = {encoding!r})")
    return key


class JsonAdapter(JsonReplies):
    """A `json` source: verifies the configured HMAC, maps the body with JMESPath.

    See the module docstring for the redelivery keys and how bad events are treated.
    """

    kind: ClassVar[str] = "json"
    skip_reasons: ClassVar[frozenset[str]] = frozenset(
        {SKIP_FILTERED, SKIP_NO_CONTACT, SKIP_NO_CHANGE}
    )

    __slots__ = ("_expressions", "_key", "_settings")

    def __init__(self, settings: JsonSource) -> None:
        secret = settings.secret.get_secret_value()
        if not secret:
            # A source without a secret would accept anyone's deliveries.
            raise ValueError("secret: required (or secret_file)")
        self._key = decode_key(secret, settings.secret_encoding)
        self._settings = settings
        self._expressions = {
            key: compile_expression(key, getattr(settings, key))
            for key in (*_EXPRESSION_KEYS, "dedup_key")
            if getattr(settings, key)
        }

    def __repr__(self) -> str:
        # The key stays out of reprs: they end up in logs and tracebacks.
        s = self._settings
        return (
            f"JsonAdapter(signature_header={s.signature_header!r}, "
            f"signed_content={s.signed_content!r}, events={s.events!r}, "
            f"contact_id={s.contact_id!r})"
        )

    # ---- authentication -------------------------------------------------------------------

    def authenticate(self, request: InboundRequest) -> str | None:
        """The delivery's key once the signature (and timestamp) check out; see the module."""
        s = self._settings
        offered = self._offered_signatures(request)
        signed = request.body
        if s.signed_content != "body":
            stamp = self._fresh_timestamp(request)
            separator = b"." if s.signed_content == "timestamp.body" else b""
            signed = stamp.encode("ascii") + separator + request.body
        expected = hmac.new(self._key, signed, hashlib.sha256).digest()
        # Every candidate is compared, so the time taken does not say which one matched.
        matched = False
        for candidate in offered:
            matched |= hmac.compare_digest(expected, candidate)
        if not matched:
            raise WebhookRejected(
                401,
                f"header {s.signature_header}: the signature does not match this delivery "
                f"(check the secret, and that nothing re-encodes the body on the way)",
                s.signature_header,
            )
        if s.delivery_id_header:
            delivery_id = request.header(s.delivery_id_header)
            name = s.delivery_id_header
            if not delivery_id:
                raise WebhookRejected(400, f"header {name}: missing", name)
            if _KEY_VALUE.fullmatch(delivery_id) is None:
                raise WebhookRejected(400, f"header {name}: {_KEY_RULE}", name)
            return f"delivery:{delivery_id}"
        if "dedup_key" in self._expressions:
            return None
        return "sha256:" + hashlib.sha256(request.body).hexdigest()

    def _offered_signatures(self, request: InboundRequest) -> list[bytes]:
        s = self._settings
        name = s.signature_header
        value = request.header(name)
        if not value or not value.strip():
            raise WebhookRejected(401, f"header {name}: missing", name)
        entries = [entry for entry in value.split() if entry.startswith(s.signature_prefix)]
        if not entries:
            raise WebhookRejected(
                401, f"header {name}: must start with {s.signature_prefix!r}", name
            )
        decoded = []
        for entry in entries:
            candidate = _decode_signature(entry[len(s.signature_prefix) :], s.signature_encoding)
            if candidate is not None:
                decoded.append(candidate)
        if not decoded:
            what = "64 hex digits" if s.signature_encoding == "hex" else "base64 of 32 bytes"
            raise WebhookRejected(
                401,
                f"header {name}: not an HMAC-SHA256 signature ({what} expected"
                f"{' after ' + repr(s.signature_prefix) if s.signature_prefix else ''})",
                name,
            )
        return decoded

    def _fresh_timestamp(self, request: InboundRequest) -> str:
        """The timestamp header exactly as sent, once it parses and is within tolerance."""
        s = self._settings
        name = s.timestamp_header
        stamp = request.header(name)
        if not stamp:
            raise WebhookRejected(401, f"header {name}: missing", name)
        seconds = _timestamp_seconds(stamp, s.timestamp_format)
        if seconds is None:
            rule = {
                "unix": "Unix time in whole seconds",
                "unix_ms": "Unix time in whole milliseconds",
                "rfc3339": "an RFC 3339 time with an offset, such as 2026-12-01T10:00:00Z",
            }[s.timestamp_format]
            raise WebhookRejected(401, f"header {name}: must be {rule}", name)
        skew = seconds - request.received_at
        if abs(skew) > s.tolerance_s:
            raise WebhookRejected(
                401,
                f"header {name}: timestamp outside tolerance ({skew:+.0f} s from the "
                f"receiver's clock, allowed ±{s.tolerance_s} s)",
                name,
            )
        return stamp

    # ---- parsing --------------------------------------------------------------------------

    def parse(self, request: InboundRequest) -> ParsedDelivery:
        """The body's events as the expressions map them, all or nothing (see the module)."""
        try:
            document = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise WebhookRejected(400, f"body: not valid JSON: {exc}", "body") from None
        if _may_repeat_keys(request.body, document):
            # A repeated key would be read as its last copy, which the sender may not mean.
            reject_duplicate_keys(request.body)
        events = self._events(document)
        delivery = ParsedDelivery()
        seen_keys: dict[str, int] = {}
        for index, event in enumerate(events):
            self._event(event, index, delivery, seen_keys)
        return delivery

    def _events(self, document: Any) -> list[Any]:
        found = self._search("events", document, "body")
        if type(found) is dict:
            return [found]
        if type(found) is not list:
            raise WebhookRejected(
                422,
                f"body: the events expression {self._settings.events!r} gave "
                f"{json_type(found)}; it must give an array of events or one event object",
                "body",
            )
        if len(found) > MAX_EVENTS:
            raise WebhookRejected(
                422, f"body: {len(found)} events; at most {MAX_EVENTS} per delivery", "body"
            )
        return found

    def _event(
        self, event: Any, index: int, delivery: ParsedDelivery, seen_keys: dict[str, int]
    ) -> None:
        path = f"body.events[{index}]"
        if "when" in self._expressions and not _truthy(self._search("when", event, path)):
            delivery.skipped.append(SkippedEvent(SKIP_FILTERED, f"{path}: when is false"))
            return
        key = self._dedup_key(event, index, seen_keys)
        contact = self._search("contact_id", event, path)
        if contact is None or contact == "":
            detail = f"{path}: contact_id {self._settings.contact_id!r} found nothing"
            delivery.skipped.append(SkippedEvent(SKIP_NO_CONTACT, detail, key))
            return
        mapped: dict[str, Any] = {"contactId": contact}
        for config_key, event_key in _SEGMENT_KEYS.items():
            if config_key in self._expressions:
                segments = self._segments(config_key, event, path)
                if segments is not None:
                    mapped[event_key] = segments
        if len(mapped) == 1:
            detail = f"{path}: the add, remove and set expressions found nothing"
            delivery.skipped.append(SkippedEvent(SKIP_NO_CHANGE, detail, key))
            return
        if "occurred_at" in self._expressions:
            occurred_at = self._search("occurred_at", event, path)
            if occurred_at is not None:
                mapped["occurredAt"] = occurred_at
        try:
            change = parse_event(mapped, path)
        except WebhookRejected as exc:
            if exc.field != f"{path}.contactId":
                raise self._explained(exc, path) from None
            # Checked with a stand-in id, the rest of the event must still be valid.
            try:
                change = parse_event({**mapped, "contactId": _PLACEHOLDER_ID}, path)
            except WebhookRejected as other:
                raise self._explained(other, path) from None
            # The dead letter keeps the id as sent (`dead_event` bounds its length, visibly).
            change = dataclasses.replace(change, contact_id=_as_text(contact))
            message = f"{exc.message} (from contact_id = {self._settings.contact_id!r})"
            delivery.dead.append(dead_event(change, FailureReason.INVALID_CONTACT_ID, message, key))
            return
        delivery.events.append(InboundEvent(change, key))

    def _segments(self, config_key: str, event: Any, path: str) -> list[Any] | None:
        found = self._search(config_key, event, path)
        if found is None:
            return None
        if type(found) is str:
            pieces = [piece.strip() for piece in found.split(self._settings.list_separator)]
            found = [piece for piece in pieces if piece]
        elif type(found) is not list:
            where = f"{path}.{_SEGMENT_KEYS[config_key]}"
            raise WebhookRejected(
                422,
                f"{where}: the {config_key} expression {getattr(self._settings, config_key)!r} "
                f"gave {json_type(found)}; it must give an array of segment ids or a "
                f"{self._settings.list_separator!r}-separated string",
                where,
            )
        # An empty add or remove changes nothing; an empty set says "in none of them".
        if not found and config_key != "set":
            return None
        return found

    def _dedup_key(self, event: Any, index: int, seen_keys: dict[str, int]) -> str | None:
        if "dedup_key" not in self._expressions:
            return None
        path = f"body.events[{index}]"
        found = self._search("dedup_key", event, path)
        where = f"{path}.dedup_key"
        expression = self._settings.dedup_key
        if type(found) is int:
            found = str(found)
        if type(found) is not str:
            raise WebhookRejected(
                422,
                f"{where}: the dedup_key expression {expression!r} gave {json_type(found)}; "
                f"it must give a string or an integer",
                where,
            )
        if _KEY_VALUE.fullmatch(found) is None:
            raise WebhookRejected(
                422, f"{where}: the dedup_key expression {expression!r} {_KEY_RULE}", where
            )
        key = f"event:{found}"
        earlier = seen_keys.setdefault(key, index)
        if earlier != index:
            # The second would be taken for a redelivery of the first and silently dropped.
            raise WebhookRejected(
                422,
                f"{where}: same dedup key as body.events[{earlier}]; the dedup_key expression "
                f"{expression!r} must give each event its own key",
                where,
            )
        return key

    def _search(self, config_key: str, data: Any, path: str) -> Any:
        try:
            return self._expressions[config_key].search(data)
        except RecursionError:
            # A function such as to_string() walks the data recursively; orjson allows deeper.
            raise WebhookRejected(
                422, f"{path}: nested too deeply for the {config_key} expression", path
            ) from None
        except JMESPathError as exc:
            detail = _shortened(" ".join(str(exc).split()))
            raise WebhookRejected(
                422,
                f"{path}: the {config_key} expression {getattr(self._settings, config_key)!r} "
                f"failed on this body: {detail}",
                path,
            ) from None

    def _explained(self, rejection: WebhookRejected, path: str) -> WebhookRejected:
        """`rejection` with the expression that produced the value named in its message."""
        field = rejection.field or ""
        for config_key, event_key in (("occurred_at", "occurredAt"), *_SEGMENT_KEYS.items()):
            if field == f"{path}.{event_key}" or field.startswith(f"{path}.{event_key}["):
                expression = getattr(self._settings, config_key)
                message = f"{rejection.message} (from {config_key} = {expression!r})"
                return WebhookRejected(rejection.status, message, rejection.field)
        return rejection


def _decode_signature(text: str, encoding: str) -> bytes | None:
    try:
        if encoding == "hex":
            # fromhex would skip spaces; entries were split on whitespace, so none are left.
            decoded = bytes.fromhex(text)
        else:
            decoded = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        return None
    return decoded if len(decoded) == _HMAC_BYTES else None


def _timestamp_seconds(stamp: str, timestamp_format: str) -> float | None:
    # isdigit() alone would admit non-ASCII digits, which int() takes but no sender signs.
    if timestamp_format in ("unix", "unix_ms"):
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= _MAX_TIMESTAMP_DIGITS):
            return None
        return int(stamp) / (1000 if timestamp_format == "unix_ms" else 1)
    if len(stamp) > _MAX_TIMESTAMP_CHARS or _RFC3339.fullmatch(stamp) is None:
        return None
    try:
        return datetime.fromisoformat(stamp.upper()).timestamp()
    except ValueError:  # a well-formed but impossible date, such as month 13
        return None


def _may_repeat_keys(body: bytes, document: Any) -> bool:
    """False only when no object in `body` can hold a key twice (see payload.may_repeat_keys).

    Every key occurrence is followed by one structural `:`, so a body with no more colons than
    the decoded document has keys cannot repeat one; other bodies get the exact check.
    """
    keys = 0
    stack = [document]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            keys += len(node)
            stack.extend(node.values())
        elif type(node) is list:
            stack.extend(node)
    return body.count(b":") > keys


def _shortened(detail: str) -> str:
    """A JMESPath error as a message quotes it: its start and end, never all of a huge value.

    JMESPath's type errors quote the value they were given, which may be as long as the body;
    what matters (the function, the types expected and received) is at either end.
    """
    if len(detail) <= _MAX_DETAIL_CHARS:
        return detail
    head, tail = _MAX_DETAIL_CHARS * 2 // 3, _MAX_DETAIL_CHARS // 3
    left_out = len(detail) - head - tail
    return f"{detail[:head]}…[{left_out} characters left out]…{detail[-tail:]}"


def _truthy(value: Any) -> bool:
    # JMESPath's truth: false, null, "", [] and {} are false; everything else (0 too) is true.
    return not (value is None or value is False or value in ("", [], {}))


def _as_text(value: Any) -> str:
    """A value the contact_id expression found, as text: a string as is, anything else as JSON."""
    if type(value) is str:
        return value
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        # orjson writes at most 254 levels of nesting, fewer than it reads.
        return f"({json_type(value)} nested too deeply to show)"
