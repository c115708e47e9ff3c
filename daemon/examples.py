"""Example deliveries for `segmapd send-example`: one per source kind, as that sender sends it.

Each is built from the source's own settings (secret, signature settings, field names, mapping
expressions), so that a source can be tried before the CRM is wired up: a standard event signed
per Standard Webhooks, a v3-signed HubSpot batch, a Salesforce Outbound Message, a signed JSON
body. The source's real adapter then reads the example locally: what it says the example asks
for is shown before sending, and a `json` body built from the expressions is only sent when the
adapter reads back exactly the contact and segments asked for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

import jmespath
import orjson

from listeners import (
    HubSpotSource,
    InboundRequest,
    JsonSource,
    ParsedDelivery,
    SalesforceSource,
    SourceSettings,
    StandardSource,
    WebhookRejected,
    make_adapter,
    sign,
)
from listeners.json import decode_key
from listeners.signing import hubspot_legacy_signature, hubspot_v3_signature

DEFAULT_CONTACT = "100000000123"
DEFAULT_SEGMENTS = ("VIP", "Spanish", "ChurnRisk")

# HubSpot's own example values (its webhooks documentation) for the fields no setting names.
HUBSPOT_PORTAL_ID = 62515
HUBSPOT_APP_ID = 1160452
HUBSPOT_SUBSCRIPTION_ID = 4512

_ALPHANUMERIC = string.ascii_letters + string.digits


class ExampleError(ValueError):
    """No example can be built as asked; the message says why and what to do instead."""


@dataclass(frozen=True, slots=True)
class ExampleDelivery:
    """One delivery to POST to `/v1/webhooks/<source>`: body, headers, and what it asks for."""

    body: bytes
    headers: dict[str, str]
    description: str
    asks: list[str]


def build_example(
    settings: SourceSettings,
    *,
    contact: str | None,
    segments: list[str] | None,
    body: bytes | None = None,
    now: float,
) -> ExampleDelivery:
    """The example delivery for a source with these settings.

    `body`, when given, is sent as it is (signed as the source's sender signs); otherwise an
    example of the kind's format is made for `contact` and `segments` (their defaults when
    None). Raises ExampleError when the settings or the arguments allow no example.
    """
    try:
        adapter = make_adapter(settings)
    except ValueError as exc:
        raise ExampleError(f"the source's settings are unusable: {exc}") from None
    if isinstance(settings, StandardSource):
        delivery = _standard(settings, contact, segments, body, now)
    elif isinstance(settings, HubSpotSource):
        delivery = _hubspot(settings, contact, segments, body, now)
    elif isinstance(settings, SalesforceSource):
        delivery = _salesforce(settings, contact, segments, body, now)
    elif isinstance(settings, JsonSource):
        delivery = _json(settings, contact, segments, body, now)
    else:
        raise ExampleError(f"no example for source kind {getattr(settings, 'kind', '?')!r}")
    request = InboundRequest(
        method="POST",
        path_qs="/",
        query_string="",
        headers=delivery.headers,
        body=delivery.body,
        peer="127.0.0.1",
        received_at=now,
    )
    try:
        parsed = adapter.parse(request)
    except WebhookRejected as exc:
        if body is None:
            raise ExampleError(f"the example is not readable as this source: {exc}") from None
        # The daemon refuses it the same way, in the sender's protocol: that is worth seeing.
        return ExampleDelivery(
            delivery.body, delivery.headers, delivery.description, [f"refused: {exc}"]
        )
    asks = describe(parsed)
    if body is None and isinstance(settings, JsonSource):
        _check_json_example(settings, parsed, contact or DEFAULT_CONTACT, segments)
    return ExampleDelivery(delivery.body, delivery.headers, delivery.description, asks)


def describe(parsed: ParsedDelivery) -> list[str]:
    """What a parsed delivery asks for, one line per change (`contact C: add A, B`)."""
    lines = []
    for event in parsed.events:
        change = event.change
        parts = []
        if change.mirror is not None:
            parts.append("set " + (", ".join(change.mirror) or "(no segments)"))
        if change.add:
            parts.append("add " + ", ".join(change.add))
        if change.remove:
            parts.append("remove " + ", ".join(change.remove))
        lines.append(f"contact {change.contact_id}: {'; '.join(parts)}")
    lines += [f"dead-lettered ({dead.reason}): {dead.message}" for dead in parsed.dead]
    lines += [f"skipped ({skipped.reason}): {skipped.detail}" for skipped in parsed.skipped]
    return lines


# ---- standard --------------------------------------------------------------------------------


def _standard(
    settings: StandardSource,
    contact: str | None,
    segments: list[str] | None,
    body: bytes | None,
    now: float,
) -> ExampleDelivery:
    if body is None:
        event = {
            "contactId": contact or DEFAULT_CONTACT,
            "segmentIds": list(segments or DEFAULT_SEGMENTS),
        }
        body = orjson.dumps(event)
    msg_id = f"msg_example_{secrets.token_hex(8)}"
    headers = sign(settings.secret.get_secret_value(), msg_id, int(now), body)
    headers["Content-Type"] = "application/json"
    return ExampleDelivery(body, headers, "a Standard Webhooks-signed event", [])


# ---- hubspot ---------------------------------------------------------------------------------


def _hubspot(
    settings: HubSpotSource,
    contact: str | None,
    segments: list[str] | None,
    body: bytes | None,
    now: float,
) -> ExampleDelivery:
    if body is None:
        object_id = contact or DEFAULT_CONTACT
        if not (object_id.isascii() and object_id.isdigit()):
            raise ExampleError(
                f"--contact: a HubSpot contact is its record id, a whole number, not "
                f"{object_id!r}; the CXone contact id is made from it by contact_id = "
                f"{settings.contact_id!r}"
            )
        if segments is None:
            # The option values HubSpot sends: segment_values' own keys where it maps them.
            segments = list(settings.segment_values)[:3] or list(DEFAULT_SEGMENTS)
        occurred_ms = int(now * 1000)
        event = {
            "eventId": secrets.randbelow(2**31),
            "subscriptionId": HUBSPOT_SUBSCRIPTION_ID,
            "portalId": HUBSPOT_PORTAL_ID,
            "appId": HUBSPOT_APP_ID,
            "occurredAt": occurred_ms,
            "subscriptionType": "contact.propertyChange",
            "attemptNumber": 0,
            "objectId": int(object_id),
            "propertyName": settings.segments_property,
            "propertyValue": ";".join(segments),
            "changeSource": "CRM_UI",
        }
        body = orjson.dumps([event])
    secret = settings.client_secret.get_secret_value()
    uri = settings.public_url
    headers = {"Content-Type": "application/json"}
    if "v3" in settings.signature_versions:
        stamp = str(int(now * 1000))
        headers["X-HubSpot-Request-Timestamp"] = stamp
        headers["X-HubSpot-Signature-v3"] = hubspot_v3_signature(secret, "POST", uri, body, stamp)
        signed = "v3-signed"
    else:
        version = "v2" if "v2" in settings.signature_versions else "v1"
        headers["X-HubSpot-Signature-Version"] = version
        headers["X-HubSpot-Signature"] = hubspot_legacy_signature(
            secret, version, "POST", uri, body
        )
        signed = f"{version}-signed"
    return ExampleDelivery(body, headers, f"a {signed} HubSpot batch (for {uri})", [])


# ---- salesforce ------------------------------------------------------------------------------

_SOAP_HEAD = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
    'xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
    "<soapenv:Body>"
    '<notifications xmlns="http://soap.sforce.com/2005/09/outbound">'
)
_SOAP_TAIL = "</notifications></soapenv:Body></soapenv:Envelope>"


def _salesforce(
    settings: SalesforceSource,
    contact: str | None,
    segments: list[str] | None,
    body: bytes | None,
    now: float,
) -> ExampleDelivery:
    if body is None:
        org = settings.organization_id
        fields: dict[str, str] = {"Id": _salesforce_id("003")}
        fields[settings.contact_id_field] = contact or DEFAULT_CONTACT
        fields[settings.segments_field] = ";".join(segments or DEFAULT_SEGMENTS)
        if settings.occurred_at_field:
            stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
            fields[settings.occurred_at_field] = stamp.replace("+00:00", "Z")
        sobject = "".join(
            f"<sf:{name}>{escape(value)}</sf:{name}>" for name, value in fields.items()
        )
        body = (
            f"{_SOAP_HEAD}"
            f"<OrganizationId>{escape(org)}</OrganizationId>"
            f"<ActionId>{_salesforce_id('04k')}</ActionId>"
            '<SessionId xsi:nil="true"/>'
            f"<EnterpriseUrl>https://example.my.salesforce.com/services/Soap/c/62.0/{org[:15]}"
            "</EnterpriseUrl>"
            f"<PartnerUrl>https://example.my.salesforce.com/services/Soap/u/62.0/{org[:15]}"
            "</PartnerUrl>"
            f"<Notification><Id>{_salesforce_id('04l')}</Id>"
            '<sObject xsi:type="sf:Contact" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">'
            f"{sobject}</sObject></Notification>"
            f"{_SOAP_TAIL}"
        ).encode()
    headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}
    return ExampleDelivery(body, headers, "a Salesforce Outbound Message", [])


def _salesforce_id(prefix: str) -> str:
    """A fresh 18-character record id with a key prefix (a new notification is not a repeat)."""
    return prefix + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(15))


# ---- json ------------------------------------------------------------------------------------


def _json(
    settings: JsonSource,
    contact: str | None,
    segments: list[str] | None,
    body: bytes | None,
    now: float,
) -> ExampleDelivery:
    if body is None:
        body = orjson.dumps(
            _json_body(
                settings, contact or DEFAULT_CONTACT, list(segments or DEFAULT_SEGMENTS), now
            )
        )
    key = decode_key(settings.secret.get_secret_value(), settings.secret_encoding)
    headers = {"Content-Type": "application/json"}
    signed = body
    if settings.signed_content != "body":
        stamp = _timestamp(settings.timestamp_format, now)
        headers[settings.timestamp_header] = stamp
        separator = b"." if settings.signed_content == "timestamp.body" else b""
        signed = stamp.encode("ascii") + separator + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    encoded = digest.hex() if settings.signature_encoding == "hex" else base64.b64encode(digest)
    text = encoded if isinstance(encoded, str) else encoded.decode("ascii")
    headers[settings.signature_header] = settings.signature_prefix + text
    if settings.delivery_id_header:
        headers[settings.delivery_id_header] = f"example-{secrets.token_hex(8)}"
    return ExampleDelivery(body, headers, f"a JSON body signed in {settings.signature_header}", [])


def _timestamp(timestamp_format: str, now: float) -> str:
    if timestamp_format == "unix":
        return str(int(now))
    if timestamp_format == "unix_ms":
        return str(int(now * 1000))
    return datetime.fromtimestamp(int(now), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_body(settings: JsonSource, contact: str, segments: list[str], now: float) -> Any:
    """A body the source's expressions map to `contact` and `segments`, where they allow it.

    Field paths (`detail.external_id`), `@`, a projection of a path (`items[*]`) and `when`
    tests of a path against a literal (`type == 'x'`, joined by `&&`) can be written into;
    anything else is left out, and the adapter's reading (checked afterwards) says whether the
    body still works.
    """
    hint = "give a delivery as your sender sends it with --body FILE"
    event: dict[str, Any] = {}
    contact_path = _field_path(settings.contact_id)
    if contact_path is None or not contact_path:
        raise ExampleError(
            f"cannot write a contact id where contact_id = {settings.contact_id!r} reads it; {hint}"
        )
    target = "set" if settings.set else "add" if settings.add else "remove"
    segments_path = _field_path(getattr(settings, target))
    if not segments_path:
        raise ExampleError(
            f"cannot write segments where {target} = {getattr(settings, target)!r} reads them; "
            f"{hint}"
        )
    if settings.when and not _satisfy(event, _tree(settings.when)):
        raise ExampleError(f"cannot make when = {settings.when!r} true; {hint}")
    _put(event, contact_path, contact)
    _put(event, segments_path, segments)
    occurred_path = _field_path(settings.occurred_at) if settings.occurred_at else None
    if occurred_path:
        _put(event, occurred_path, int(now * 1000))
    dedup_path = _field_path(settings.dedup_key) if settings.dedup_key else None
    if dedup_path:
        _put(event, dedup_path, f"example-{secrets.token_hex(8)}")
    events = _tree(settings.events)
    if events.get("type") == "current":
        return event
    path = _field_path(settings.events) or _projected_path(events)
    if not path:
        raise ExampleError(f"cannot place the event where events = {settings.events!r} finds it")
    document: dict[str, Any] = {}
    _put(document, path, [event])
    return document


def _check_json_example(
    settings: JsonSource, parsed: ParsedDelivery, contact: str, segments: list[str] | None
) -> None:
    """Refuse to send a built body that the adapter does not read as the contact and segments."""
    wanted = tuple(segments or DEFAULT_SEGMENTS)
    changes = [event.change for event in parsed.events]
    found = changes[0] if len(changes) == 1 else None
    if found is not None:
        got = found.mirror if settings.set else found.add if settings.add else found.remove
        if found.contact_id == contact and got == wanted:
            return
    read = "; ".join(describe(parsed)) or "nothing"
    raise ExampleError(
        f"the body built from this source's expressions reads as {read}, not as contact "
        f"{contact} with {', '.join(wanted)}; give a delivery as your sender sends it with "
        f"--body FILE"
    )


def _field_path(expression: str) -> list[str] | None:
    """The keys of a plain field path (`a.b.c`; `@` is []), or None for any other expression."""
    return _path_of(_tree(expression))


def _tree(expression: str) -> dict[str, Any]:
    """The parsed tree of a JMESPath expression (already compiled once by the settings)."""
    tree: dict[str, Any] = dict(jmespath.compile(expression).parsed)
    return tree


def _path_of(node: dict[str, Any]) -> list[str] | None:
    kind = node.get("type")
    if kind == "current":
        return []
    if kind == "field":
        return [str(node["value"])]
    if kind == "subexpression":
        path: list[str] = []
        for child in node.get("children", ()):
            part = _path_of(child)
            if part is None:
                return None
            path += part
        return path
    return None


def _projected_path(node: dict[str, Any]) -> list[str] | None:
    """The path of `path[*]` (a projection of a field path onto its items), else None."""
    children = node.get("children", ())
    if node.get("type") == "projection" and len(children) == 2:
        return _path_of(children[0]) if children[1].get("type") == "identity" else None
    return None


def _satisfy(event: dict[str, Any], node: dict[str, Any]) -> bool:
    """Write into `event` what makes the `when` test `node` true; False if that is not known."""
    kind = node.get("type")
    if kind == "and_expression":
        return all(_satisfy(event, child) for child in node.get("children", ()))
    if kind == "comparator" and node.get("value") == "eq":
        left, right = node["children"]
        if right.get("type") != "literal":
            left, right = right, left
        path = _path_of(left)
        if right.get("type") == "literal" and path:
            _put(event, path, right["value"])
            return True
        return False
    path = _path_of(node)
    if path:
        _put(event, path, True)
        return True
    return False


def _put(document: dict[str, Any], path: list[str], value: Any) -> None:
    node = document
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


def webhook_path(source: str) -> str:
    """`/v1/webhooks/<source>`, the name percent-encoded as one path segment."""
    return "/v1/webhooks/" + quote(source, safe="")
