"""HubSpot app webhooks (`kind = "hubspot"`): contact subscriptions to segment mirrors.

HubSpot POSTs a JSON array of events (up to 100) to the app's target URL and signs each request
(https://developers.hubspot.com/docs/api/webhooks/validating-requests):

- v3, `X-HubSpot-Signature-v3`: base64 of HMAC-SHA256, keyed with the app's client secret, over
  method + URI + body + `X-HubSpot-Request-Timestamp` (epoch milliseconds). In the URI the
  percent-encodings of `: / ? @ ! $ ' ( ) * , ;` are decoded first. segmapd sits behind a
  proxy, so the URI is the configured `public_url` (the target URL as set in HubSpot) plus the
  request's query string.
- v2 and v1, `X-HubSpot-Signature` with `X-HubSpot-Signature-Version`: hex SHA-256 of secret +
  method + URI + body (v2) or of secret + body (v1). Neither covers a time, so a captured
  request could be replayed for ever: they are accepted only where `signature_versions` lists
  them.

Events map to segmapd's own shape and go through `listeners.payload.parse_event`, so the id,
cap and time rules are the same as for every other kind:

- `contact.propertyChange` of `segments_property` (a multi-checkbox property): a mirror, `set`
  = the `;`-separated option values (trimmed, empties dropped), through `segment_values` when
  that table is given. An empty or null value is `set: []`.
- `contact.deletion`, `contact.privacyDeletion`: `set: []` (unless `deletions = false`).
- `contact.merge`: every contact merged away (`mergedObjectIds`, and `primaryObjectId` when the
  merge created a new record) gets `set: []`; the surviving record is not changed by the merge
  (unless `merges = "ignore"`).
- The same events in the newer generic format (`object.*` with `objectTypeId` `0-1`).
- `contact.restore` is skipped (`restored`): HubSpot sends no property value with it.
- Anything else (other properties, other contact events, other objects) is skipped.

What can never succeed is dead-lettered, never refused: a refusal would make HubSpot retry the
whole batch for a day. Only what is invalid is: values of the property that are not usable
segment ids (or not in `segment_values`) are the event's invalid part (`InboundEvent.invalid`),
and the rest is taken as a mirror of the valid values, so the contact keeps the valid segments
it is in. An event whose contact id fails the id rule, or whose value lists more segments than
the per-event cap, is dead-lettered whole. A body that is not a HubSpot event array (of at most
100 events, each key once) is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import Field, SecretStr, field_validator

from listeners.base import (
    DeadEvent,
    InboundEvent,
    InboundRequest,
    JsonReplies,
    ParsedDelivery,
    SkippedEvent,
    SourceSettings,
)
from listeners.errors import WebhookRejected
from listeners.payload import (
    ID_PATTERN,
    ID_RULE,
    MAX_SEGMENTS_PER_EVENT,
    dead_event,
    id_problem,
    json_type,
    may_repeat_keys,
    parse_event,
    reject_duplicate_keys,
)
from listeners.signing import hubspot_v3_digest
from scheduler.model import FailureReason, MembershipChange

SIGNATURE_V3_HEADER = "X-HubSpot-Signature-v3"
TIMESTAMP_HEADER = "X-HubSpot-Request-Timestamp"
SIGNATURE_HEADER = "X-HubSpot-Signature"
VERSION_HEADER = "X-HubSpot-Signature-Version"

TEMPLATE_FIELDS = ("objectId", "portalId", "appId")
"""Event fields a `contact_id` template may name; all are integers in HubSpot's events."""

CONTACT_OBJECT_TYPE_ID = "0-1"
"""HubSpot's object type id of contacts, in the generic (`object.*`) event format."""

SKIP_OTHER_OBJECT = "other_object"
SKIP_OTHER_EVENT = "other_event"
SKIP_OTHER_PROPERTY = "other_property"
SKIP_DELETIONS_OFF = "deletions_off"
SKIP_MERGES_OFF = "merges_off"
SKIP_MERGE_NOTHING_REMOVED = "merge_nothing_removed"
SKIP_RESTORED = "restored"
"""A restored contact: HubSpot sends no property value with the restore (see `_RESTORE`)."""

MAX_BATCH_EVENTS = 100
"""HubSpot's own bound on the events of one request; a longer array is not HubSpot's."""

# Epoch milliseconds have 13 digits until 2286; the bound only keeps int() away from huge inputs.
_MAX_TIMESTAMP_DIGITS = 16
_PROPERTY_NAME = re.compile(r"[A-Za-z0-9_]{1,100}")
# How much of an untrusted value a message quotes, and how many values it lists.
_QUOTED_CHARS = 64
_LISTED_VALUES = 3

_NOUNS: dict[type, str] = {str: "a string", list: "an array"}

SignatureVersion = Literal["v3", "v2", "v1"]

_PROPERTY_CHANGE = "propertyChange"
_DELETIONS = frozenset({"deletion", "privacyDeletion"})
_MERGE = "merge"
# A contact restored from the recycle bin gets its property values back in HubSpot, but HubSpot
# sends only the restore event, no property change: segmapd cannot know its segments (and with
# `deletions = true` it took the contact out of them at the deletion). Skipped and counted as
# `restored`; the README says to change the property again or import the memberships.
_RESTORE = "restore"


def _only_v3() -> list[SignatureVersion]:
    # v1 and v2 carry no timestamp: a replay of a captured request cannot be told apart.
    return ["v3"]


class HubSpotSource(SourceSettings):
    """`[sources.NAME]` with `kind = "hubspot"`: a HubSpot app's contact webhooks.

    `client_secret` (or `client_secret_file`) is the app's client secret; `public_url` the
    target URL exactly as set in HubSpot (v3 and v2 signatures cover it). `segments_property`
    is the internal name of the contact property listing the contact's segments; `contact_id`
    a template over the event's `objectId`, `portalId` and `appId` giving the CXone contact
    id. `segment_values` optionally maps HubSpot option values to CXone segment ids; with a
    table, `unmapped_values` says what a value missing from it does: `dead_letter` it (default;
    the event's other values are taken) or `ignore` it. `deletions` and `merges` say
    whether deleted and merged-away contacts are taken out of their segments.
    `signature_versions` lists the signatures accepted (v1 and v2 only when listed; they carry
    no timestamp); `tolerance_s` how far `X-HubSpot-Request-Timestamp` may be from the
    receiver's clock, either way.
    """

    required_keys: ClassVar[tuple[str, ...]] = ("client_secret", "public_url")

    kind: Literal["hubspot"] = "hubspot"
    client_secret: SecretStr = SecretStr("")
    public_url: str = ""
    segments_property: str = "cxone_segments"
    contact_id: str = "{objectId}"
    segment_values: dict[str, str] = Field(default_factory=dict)
    unmapped_values: Literal["dead_letter", "ignore"] = "dead_letter"
    deletions: bool = True
    merges: Literal["clear_merged", "ignore"] = "clear_merged"
    signature_versions: list[SignatureVersion] = Field(default_factory=_only_v3, min_length=1)
    tolerance_s: int = Field(default=300, ge=1, le=86_400)

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        # Empty is left to the daemon's required-key check, which names the `_file` form.
        if value:
            check_public_url(value)
        return value

    @field_validator("segments_property")
    @classmethod
    def _check_segments_property(cls, value: str) -> str:
        if _PROPERTY_NAME.fullmatch(value) is None:
            raise ValueError(
                "must be the property's internal name: 1-100 of A-Z a-z 0-9 _ "
                "(Settings > Properties > the property > Internal name)"
            )
        return value

    @field_validator("contact_id")
    @classmethod
    def _check_contact_id(cls, value: str) -> str:
        check_contact_id_template(value)
        return value

    @field_validator("segment_values")
    @classmethod
    def _check_segment_values(cls, value: dict[str, str]) -> dict[str, str]:
        for option, segment in value.items():
            if option != option.strip() or not option:
                raise ValueError(
                    f"option {option[:_QUOTED_CHARS]!r}: option values are matched after "
                    f"trimming, so a key must be non-empty without surrounding spaces"
                )
            if ";" in option:
                raise ValueError(f"option {option[:_QUOTED_CHARS]!r}: ';' separates values")
            if ID_PATTERN.fullmatch(segment) is None:
                raise ValueError(
                    f"option {option[:_QUOTED_CHARS]!r}: segment id {segment[:_QUOTED_CHARS]!r} "
                    f"{ID_RULE}"
                )
        return value

    @field_validator("signature_versions")
    @classmethod
    def _check_signature_versions(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("list each version once")
        return value


def check_public_url(url: str) -> None:
    """Raise ValueError unless `url` is an absolute http(s) URL with no query or fragment.

    The query string is the request's own (it is appended when the signature is checked), and
    HubSpot never sends a fragment.
    """
    if url != url.strip() or any(char.isspace() for char in url):
        raise ValueError("must not contain spaces")
    try:
        parts = urlsplit(url)
        # Reading the port validates it (a non-number or one beyond 65535 raises).
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(
            "must be the absolute http(s) target URL set in HubSpot, such as "
            "https://segmapd.example.com/v1/webhooks/hubspot"
        )
    if parts.query or url.endswith("?"):
        raise ValueError(
            "must not have a query string: the request's own query string is added to it"
        )
    if parts.fragment or "#" in url:
        raise ValueError("must not have a fragment (#...)")


def check_contact_id_template(template: str) -> None:
    """Raise ValueError unless `template` names only known event fields, objectId among them.

    Its literal text must be id characters too: the fields are integers, so such a template
    always gives a valid id (short of the length limit), and a typo fails here, not per event.
    """
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); write a literal brace as {{{{") from None
    named: set[str] = set()
    literal = []
    for text, field, spec, conversion in pieces:
        literal.append(text)
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS:
            raise ValueError(
                f"unknown placeholder {{{field[:_QUOTED_CHARS]}}}; "
                f"known are {', '.join('{' + name + '}' for name in TEMPLATE_FIELDS)}"
            )
        if spec or conversion:
            raise ValueError(f"placeholder {{{field}}} takes no format or conversion")
        named.add(field)
    if "objectId" not in named:
        raise ValueError("must contain {objectId}: without it every contact gets the same id")
    text = "".join(literal)
    if text and re.fullmatch(r"[A-Za-z0-9_.:-]*", text) is None:
        raise ValueError(f"its text outside placeholders {ID_RULE.removeprefix('must be ')}")


class HubSpotAdapter(JsonReplies):
    """A `hubspot` source: signed batches of contact events, each with its own redelivery key.

    HubSpot's `eventId` is documented as not guaranteed unique, so an event's key is built from
    the fields that together identify it: portalId, subscriptionId, eventId, objectId,
    occurredAt, the subscription type and, for property changes, the property name (and, for
    merges, the contact merged away). A redelivery repeats all of them (only attemptNumber
    changes), so it has the same keys and adds no work.
    """

    kind: ClassVar[str] = "hubspot"
    skip_reasons: ClassVar[frozenset[str]] = frozenset(
        {
            SKIP_OTHER_OBJECT,
            SKIP_OTHER_EVENT,
            SKIP_OTHER_PROPERTY,
            SKIP_DELETIONS_OFF,
            SKIP_MERGES_OFF,
            SKIP_MERGE_NOTHING_REMOVED,
            SKIP_RESTORED,
        }
    )
    # HubSpot counts any 2xx as delivered; 200 is what its documentation shows.
    accepted_status: ClassVar[int] = 200

    __slots__ = ("_mapper", "_verifier")

    def __init__(self, settings: HubSpotSource) -> None:
        self._verifier = HubSpotSignatureVerifier(
            settings.client_secret.get_secret_value(),
            settings.public_url,
            tuple(settings.signature_versions),
            settings.tolerance_s,
        )
        self._mapper = _EventMapper(settings)

    def __repr__(self) -> str:
        return f"HubSpotAdapter({self._verifier!r}, {self._mapper!r})"

    @property
    def verifier(self) -> HubSpotSignatureVerifier:
        """The signature check."""
        return self._verifier

    def authenticate(self, request: InboundRequest) -> str | None:
        """None once the signature checks out: HubSpot deliveries have keys per event only."""
        self._verifier.verify(request)
        return None

    def parse(self, request: InboundRequest) -> ParsedDelivery:
        """The batch's events taken, skipped and dead-lettered, or `WebhookRejected`."""
        return self._mapper.parse(request.body)


class HubSpotSignatureVerifier:
    """Checks one HubSpot delivery's signature headers against the app's client secret.

    v3 is used when its header is present and v3 is enabled; otherwise the version named by
    `X-HubSpot-Signature-Version`, if enabled. A v3 header that does not match is refused
    rather than passed to an older version: HubSpot signs every version from the same request,
    so a mismatch there is a wrong secret or URL, which the older version would only hide.
    """

    __slots__ = ("_public_url", "_secret", "_tolerance_s", "_versions")

    def __init__(
        self, client_secret: str, public_url: str, versions: tuple[str, ...], tolerance_s: int
    ) -> None:
        if not client_secret:
            raise ValueError("client_secret is empty: copy the app's client secret from HubSpot")
        check_public_url(public_url)
        unknown = set(versions) - {"v1", "v2", "v3"}
        if not versions or unknown:
            raise ValueError("signature_versions must list some of v3, v2, v1")
        if type(tolerance_s) is not int or tolerance_s < 1:
            raise ValueError("tolerance_s must be a positive whole number of seconds")
        self._secret = client_secret.encode("utf-8")
        self._public_url = public_url
        self._versions = versions
        self._tolerance_s = tolerance_s

    def __repr__(self) -> str:
        # The secret stays out of reprs: they end up in logs and tracebacks.
        return (
            f"HubSpotSignatureVerifier(public_url={self._public_url!r}, "
            f"versions={list(self._versions)!r}, tolerance_s={self._tolerance_s})"
        )

    def signed_uri(self, query_string: str) -> str:
        """The URI HubSpot signed: `public_url`, plus `?` and the query string if there is one."""
        return f"{self._public_url}?{query_string}" if query_string else self._public_url

    def verify(self, request: InboundRequest) -> str:
        """The version that matched (`v3`, `v2` or `v1`); `WebhookRejected` (401) otherwise."""
        offered_v3 = request.header(SIGNATURE_V3_HEADER)
        if "v3" in self._versions and offered_v3:
            self._verify_v3(request, offered_v3)
            return "v3"
        legacy = request.header(VERSION_HEADER)
        if legacy in self._versions and legacy in ("v1", "v2"):
            self._verify_legacy(request, legacy)
            return legacy
        raise self._missing(legacy)

    def _missing(self, legacy: str | None) -> WebhookRejected:
        enabled = ", ".join(self._versions)
        if "v3" in self._versions:
            note = ""
            if legacy:
                note = (
                    f"; {VERSION_HEADER} {legacy[:8]!r} is not accepted "
                    f"(signature_versions = {enabled})"
                )
            return WebhookRejected(
                401, f"header {SIGNATURE_V3_HEADER}: missing{note}", SIGNATURE_V3_HEADER
            )
        shown = "missing" if not legacy else f"{legacy[:8]!r} is not accepted"
        return WebhookRejected(
            401,
            f"header {VERSION_HEADER}: {shown} (signature_versions = {enabled})",
            VERSION_HEADER,
        )

    def _verify_v3(self, request: InboundRequest, offered: str) -> None:
        stamp = request.header(TIMESTAMP_HEADER)
        if not stamp:
            raise WebhookRejected(401, f"header {TIMESTAMP_HEADER}: missing", TIMESTAMP_HEADER)
        # isdigit() alone would admit non-ASCII digits, which int() accepts but HubSpot never signs.
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= _MAX_TIMESTAMP_DIGITS):
            raise WebhookRejected(
                401,
                f"header {TIMESTAMP_HEADER}: must be Unix time in whole milliseconds",
                TIMESTAMP_HEADER,
            )
        skew_s = int(stamp) / 1000 - request.received_at
        if skew_s < -self._tolerance_s:
            raise WebhookRejected(
                401,
                f"header {TIMESTAMP_HEADER}: request is {-skew_s:.0f} s old (at most "
                f"{self._tolerance_s} s); refused as a possible replay",
                TIMESTAMP_HEADER,
            )
        if skew_s > self._tolerance_s:
            raise WebhookRejected(
                401,
                f"header {TIMESTAMP_HEADER}: {skew_s:.0f} s ahead of the receiver's clock (at "
                f"most {self._tolerance_s} s); check the clocks",
                TIMESTAMP_HEADER,
            )
        expected = hubspot_v3_digest(
            self._secret, request.method, self.signed_uri(request.query_string), request.body, stamp
        )
        try:
            candidate = base64.b64decode(offered.strip(), validate=True)
        except ValueError:  # binascii.Error, or non-ASCII text
            raise WebhookRejected(
                401, f"header {SIGNATURE_V3_HEADER}: not base64", SIGNATURE_V3_HEADER
            ) from None
        if not hmac.compare_digest(expected, candidate):
            raise WebhookRejected(
                401,
                f"header {SIGNATURE_V3_HEADER}: does not match this delivery (check "
                f"client_secret, and that public_url is exactly the target URL set in HubSpot)",
                SIGNATURE_V3_HEADER,
            )

    def _verify_legacy(self, request: InboundRequest, version: str) -> None:
        offered = request.header(SIGNATURE_HEADER)
        if not offered:
            raise WebhookRejected(401, f"header {SIGNATURE_HEADER}: missing", SIGNATURE_HEADER)
        if version == "v2":
            # v2's URI is the request's exactly as sent: HubSpot's v2 steps decode nothing.
            uri = self.signed_uri(request.query_string).encode("utf-8")
            content = b"".join((self._secret, request.method.encode("utf-8"), uri, request.body))
        else:
            content = self._secret + request.body
        expected = hashlib.sha256(content).hexdigest().encode()
        # A header that is not ASCII (undecodable bytes arrive as surrogates) matches nothing.
        presented = offered.strip().lower().encode("ascii", "replace")
        if not hmac.compare_digest(expected, presented):
            hint = "client_secret and public_url" if version == "v2" else "client_secret"
            raise WebhookRejected(
                401,
                f"header {SIGNATURE_HEADER}: {version} signature does not match this delivery "
                f"(check {hint})",
                SIGNATURE_HEADER,
            )


@dataclass(frozen=True, slots=True)
class _Event:
    """The fields of one HubSpot event that every handled contact event carries."""

    raw: dict[str, Any]
    path: str
    subscription_type: str
    action: str
    object_id: int
    occurred_at_ms: int
    key: str


class _EventMapper:
    """HubSpot event arrays to `ParsedDelivery` under one source's settings."""

    __slots__ = (
        "_deletions",
        "_fields",
        "_merges",
        "_property",
        "_template",
        "_unmapped",
        "_values",
    )

    def __init__(self, settings: HubSpotSource) -> None:
        self._property = settings.segments_property
        self._template = settings.contact_id
        self._fields = frozenset(
            field for _, field, _, _ in string.Formatter().parse(settings.contact_id) if field
        )
        self._values: Mapping[str, str] = dict(settings.segment_values)
        self._unmapped = settings.unmapped_values
        self._deletions = settings.deletions
        self._merges = settings.merges

    def __repr__(self) -> str:
        return (
            f"segments_property={self._property!r}, contact_id={self._template!r}, "
            f"segment_values={len(self._values)} mapped, deletions={self._deletions}, "
            f"merges={self._merges!r}"
        )

    def parse(self, body: bytes) -> ParsedDelivery:
        """Every event of the batch, in order."""
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise WebhookRejected(400, f"body: not valid JSON: {exc}", "body") from None
        if type(document) is not list:
            raise WebhookRejected(
                400,
                f"body: must be a JSON array of HubSpot events, not {json_type(document)}",
                "body",
            )
        if not document:
            raise WebhookRejected(
                400, "body: empty array; HubSpot sends at least one event", "body"
            )
        if len(document) > MAX_BATCH_EVENTS:
            raise WebhookRejected(
                422,
                f"body: {len(document)} events; HubSpot sends at most {MAX_BATCH_EVENTS} per "
                f"request",
                "body",
            )
        if may_repeat_keys(body, document):
            # orjson keeps the last copy of a repeated key; the sender may mean another one.
            reject_duplicate_keys(body)
        delivery = ParsedDelivery()
        for index, raw in enumerate(document):
            self._take(raw, f"body[{index}]", delivery)
        return delivery

    def _take(self, raw: object, path: str, delivery: ParsedDelivery) -> None:
        if type(raw) is not dict:
            raise WebhookRejected(
                400, f"{path}: must be an event object, not {json_type(raw)}", path
            )
        subscription_type = _subscription_type(raw, path)
        obj, dot, action = subscription_type.partition(".")
        if obj == "object" and dot:
            # The generic format names the object type by id; contacts are 0-1.
            if raw.get("objectTypeId") != CONTACT_OBJECT_TYPE_ID:
                delivery.skipped.append(
                    SkippedEvent(SKIP_OTHER_OBJECT, f"{path}: {subscription_type[:_QUOTED_CHARS]}")
                )
                return
        elif obj != "contact" or not dot:
            delivery.skipped.append(
                SkippedEvent(SKIP_OTHER_OBJECT, f"{path}: {subscription_type[:_QUOTED_CHARS]}")
            )
            return
        if action == _PROPERTY_CHANGE:
            name = _required(raw, path, "propertyName", str)
            if name != self._property:
                delivery.skipped.append(
                    SkippedEvent(SKIP_OTHER_PROPERTY, f"{path}: {name[:_QUOTED_CHARS]}")
                )
                return
            self._property_change(_read_event(raw, path, subscription_type, action), delivery)
        elif action in _DELETIONS:
            if not self._deletions:
                delivery.skipped.append(SkippedEvent(SKIP_DELETIONS_OFF, f"{path}: {action}"))
                return
            event = _read_event(raw, path, subscription_type, action)
            self._clear(event, event.object_id, event.key, delivery)
        elif action == _MERGE:
            if self._merges == "ignore":
                delivery.skipped.append(SkippedEvent(SKIP_MERGES_OFF, f"{path}: merge"))
                return
            self._merge(_read_event(raw, path, subscription_type, action), delivery)
        elif action == _RESTORE:
            delivery.skipped.append(
                SkippedEvent(
                    SKIP_RESTORED,
                    f"{path}: {subscription_type[:_QUOTED_CHARS]}: HubSpot sends no property "
                    f"value with a restore; change {self._property} again to set its segments",
                )
            )
        else:
            delivery.skipped.append(
                SkippedEvent(SKIP_OTHER_EVENT, f"{path}: {subscription_type[:_QUOTED_CHARS]}")
            )

    def _property_change(self, event: _Event, delivery: ParsedDelivery) -> None:
        if "propertyValue" not in event.raw:
            # A cleared property comes as "" (or null); a missing value is not read as one,
            # since that would take the contact out of every segment.
            where = f"{event.path}.propertyValue"
            raise WebhookRejected(400, f'{where}: required ("" or null when cleared)', where)
        value = event.raw["propertyValue"]
        if value is not None and type(value) is not str:
            where = f"{event.path}.propertyValue"
            raise WebhookRejected(
                422, f"{where}: must be a string or null, not {json_type(value)}", where
            )
        asked: list[str] = []  # every value the event names, mapped where mapped
        valid: list[str] = []
        invalid: list[str] = []  # as sent
        for part in (value or "").split(";"):
            option = part.strip()
            if not option:
                continue
            if self._values:
                segment = self._values.get(option)
                if segment is None:
                    if self._unmapped == "dead_letter":
                        invalid.append(option)
                        asked.append(option)
                    continue
            elif ID_PATTERN.fullmatch(option) is None:
                invalid.append(option)
                asked.append(option)
                continue
            else:
                segment = option
            valid.append(segment)
            asked.append(segment)
        contact_id = self._contact_id(event, event.object_id)
        if len(asked) > MAX_SEGMENTS_PER_EVENT:
            # Beyond the cap no part of the list can be taken: `_mirror` dead-letters it all.
            self._mirror(event, contact_id, asked, event.key, delivery)
            return
        dead_part = None
        if invalid:
            dead_part = self._invalid_part(event, contact_id, list(dict.fromkeys(invalid)))
        self._mirror(event, contact_id, valid, event.key, delivery, asked=asked, invalid=dead_part)

    def _invalid_part(self, event: _Event, contact_id: str, invalid: list[str]) -> DeadEvent:
        """The values of a property change that can never be taken, for the dead letter.

        The valid rest of the event is taken as a mirror of the valid values only, so a contact
        keeps the segments still listed and leaves those no longer listed, as HubSpot says.
        """
        where = f"{event.path}.propertyValue"
        several = len(invalid) > 1
        noun, them = ("options", "them") if several else ("option", "it")
        if self._values:
            message = (
                f"{where}: {noun} {_listing(invalid, explained=False)} of {self._property} "
                f"{'are' if several else 'is'} not in segment_values; the event was taken "
                f"without {them}. Add {them} there (or set "
                f'unmapped_values = "ignore") and change the property again in HubSpot (a '
                f"replay would not help: it would send the same value unmapped)"
            )
        else:
            message = (
                f"{where}: {noun} {_listing(invalid, explained=True)} of {self._property} "
                f"cannot be {'CXone segment ids' if several else 'a CXone segment id'} "
                f"({ID_RULE}); the event was taken without {them}. Make each option's internal "
                f"value the CXone segment id (or map it with segment_values) and change the "
                f"property again in HubSpot (a replay would not help: it would send the same "
                f"value)"
            )
        change = MembershipChange(
            contact_id, add=tuple(invalid), occurred_at=event.occurred_at_ms / 1000
        )
        # No key of its own: it is taken, or known as redelivered, with the event it is part of.
        return dead_event(change, FailureReason.SEGMENT_NOT_FOUND, message)

    def _merge(self, event: _Event, delivery: ParsedDelivery) -> None:
        raw, path = event.raw, event.path
        merged = _required(raw, path, "mergedObjectIds", list)
        for index, value in enumerate(merged):
            _integer(value, f"{path}.mergedObjectIds[{index}]")
        primary = _integer(
            _required(raw, path, "primaryObjectId", object), f"{path}.primaryObjectId"
        )
        created = raw.get("newObjectId")
        survivor = event.object_id if created is None else _integer(created, f"{path}.newObjectId")
        # Without a new record the primary survives; with one, the primary is merged away too.
        gone = [contact for contact in dict.fromkeys([*merged, primary]) if contact != survivor]
        if not gone:
            delivery.skipped.append(
                SkippedEvent(SKIP_MERGE_NOTHING_REMOVED, f"{path}: survivor {survivor}")
            )
            return
        for contact in gone:
            self._clear(event, contact, f"{event.key}:{contact}", delivery)

    def _clear(self, event: _Event, object_id: int, key: str, delivery: ParsedDelivery) -> None:
        self._mirror(event, self._contact_id(event, object_id), [], key, delivery)

    def _mirror(
        self,
        event: _Event,
        contact_id: str,
        segments: list[str],
        key: str,
        delivery: ParsedDelivery,
        *,
        asked: list[str] | None = None,
        invalid: DeadEvent | None = None,
    ) -> None:
        """Take `segments` as the contact's list, `invalid` (values left out) beside it.

        `asked` is everything the event named (`segments` when None): what a dead letter of the
        whole event keeps.
        """
        shape = {"contactId": contact_id, "set": segments, "occurredAt": event.occurred_at_ms}
        try:
            change = parse_event(shape, event.path)
        except WebhookRejected as rejected:
            # The id and segment rules are about HubSpot's data, which a retry cannot change:
            # the event is kept as a dead letter. Anything else (its time) refuses the batch.
            whole = segments if asked is None else asked
            dead = self._dead(event, contact_id, whole, rejected, key)
            if dead is None:
                raise
            delivery.dead.append(dead)
            return
        delivery.events.append(InboundEvent(change, key, invalid))

    def _dead(
        self,
        event: _Event,
        contact_id: str,
        segments: list[str],
        rejected: WebhookRejected,
        key: str,
    ) -> DeadEvent | None:
        field = rejected.field or ""
        detail = rejected.message.partition(": ")[2] or rejected.message
        if field == f"{event.path}.contactId":
            reason = FailureReason.INVALID_CONTACT_ID
            message = (
                f"{event.path}.objectId: contact id {_quoted(contact_id)} from contact_id "
                f"{self._template!r}: {detail}"
            )
        elif field.startswith(f"{event.path}.set"):
            # Only the cap reaches here: values failing the id rule were split off before.
            reason = FailureReason.SEGMENT_NOT_FOUND
            message = (
                f"{event.path}.propertyValue: {self._property} lists {detail}; nothing of the "
                f"event was taken"
            )
        else:
            return None
        change = MembershipChange(
            contact_id, mirror=tuple(segments), occurred_at=event.occurred_at_ms / 1000
        )
        return dead_event(change, reason, message, key)

    def _contact_id(self, event: _Event, object_id: int) -> str:
        values: dict[str, object] = {"objectId": object_id}
        for name in self._fields - {"objectId"}:
            where = f"{event.path}.{name}"
            values[name] = _integer(_required(event.raw, event.path, name, object), where)
        return self._template.format_map(values)


def _read_event(raw: dict[str, Any], path: str, subscription_type: str, action: str) -> _Event:
    """The fields every handled event needs, checked, and its redelivery key."""
    object_id = _integer(_required(raw, path, "objectId", object), f"{path}.objectId")
    occurred = _required(raw, path, "occurredAt", object)
    if type(occurred) is not int:
        where = f"{path}.occurredAt"
        raise WebhookRejected(
            422, f"{where}: must be integer epoch milliseconds, not {json_type(occurred)}", where
        )
    identity = [
        _integer(_required(raw, path, name, object), f"{path}.{name}")
        for name in ("portalId", "subscriptionId", "eventId")
    ]
    parts = [*map(str, identity), str(object_id), str(occurred), subscription_type]
    if action == _PROPERTY_CHANGE:
        parts.append(raw["propertyName"])
    return _Event(raw, path, subscription_type, action, object_id, occurred, ":".join(parts))


def _subscription_type(raw: dict[str, Any], path: str) -> str:
    """`subscriptionType`, or `eventType` as HubSpot's documented example names it."""
    subscription = raw.get("subscriptionType")
    event_type = raw.get("eventType")
    for name, value in (("subscriptionType", subscription), ("eventType", event_type)):
        if value is not None and (type(value) is not str or not value):
            where = f"{path}.{name}"
            raise WebhookRejected(
                422, f"{where}: must be a non-empty string, not {json_type(value)}", where
            )
    if subscription is None and event_type is None:
        where = f"{path}.subscriptionType"
        raise WebhookRejected(400, f"{where}: required (or eventType)", where)
    if subscription is not None and event_type is not None and subscription != event_type:
        where = f"{path}.eventType"
        raise WebhookRejected(
            422,
            f"{where}: {_quoted(event_type)} contradicts subscriptionType {_quoted(subscription)}",
            where,
        )
    chosen = subscription if subscription is not None else event_type
    return str(chosen)


def _required(raw: dict[str, Any], path: str, name: str, kind: type) -> Any:
    place = f"{path}.{name}"
    if name not in raw or raw[name] is None:
        raise WebhookRejected(400, f"{place}: required", place)
    value = raw[name]
    if kind is not object and type(value) is not kind:
        noun = _NOUNS.get(kind, kind.__name__)
        raise WebhookRejected(422, f"{place}: must be {noun}, not {json_type(value)}", place)
    return value


def _integer(value: object, where: str) -> int:
    if type(value) is not int:
        shown = json_type(value)
        if type(value) is float:
            shown = "a fraction or an integer beyond 64 bits"
        raise WebhookRejected(422, f"{where}: must be an integer, not {shown}", where)
    return value


def _listing(values: list[str], *, explained: bool) -> str:
    """The first values quoted (with what breaks the id rule when `explained`), and a count."""
    shown = []
    for value in values[:_LISTED_VALUES]:
        problem = id_problem(value) if explained else None
        shown.append(_quoted(value) + (f" ({problem})" if problem else ""))
    more = len(values) - _LISTED_VALUES
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _quoted(text: str) -> str:
    return repr(text[:_QUOTED_CHARS]) + ("..." if len(text) > _QUOTED_CHARS else "")
