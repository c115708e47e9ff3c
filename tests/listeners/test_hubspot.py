"""HubSpot webhooks: signatures (v3, and v2/v1 when enabled), event mapping, keys, settings.

Signatures are computed here as HubSpot's "Validating requests" page describes them, with
hmac/hashlib directly; payloads follow the webhooks API's documented event example.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from listeners.base import InboundRequest, Outcome, ParsedDelivery
from listeners.errors import WebhookRejected
from listeners.hubspot import HubSpotAdapter, HubSpotSource
from scheduler.model import FailureReason, MembershipChange

# HubSpot's published examples (v3, v2 and v1 request validation).
DOC_SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
DOC_URL = "https://www.example.com/webhook_uri"
DOC_V3_BODY = b"{'example_field':'example_value'}"
DOC_V3_TIMESTAMP = "1693657560000"
DOC_V3_SIGNATURE = "K36dawei4A+QBNolUOqo7s91KQDWQ5MXZ/QufNYuk/Y="
DOC_V2_GET_SIGNATURE = "eee2dddcc73c94d699f5e395f4b9d454a069a6855fbfa152e91e88823087200e"
DOC_V1_BODY = (
    b'[{"eventId":1,"subscriptionId":12345,"portalId":62515,"occurredAt":1564113600000,'
    b'"subscriptionType":"contact.creation","attemptNumber":0,"objectId":123,'
    b'"changeSource":"CRM","changeFlag":"NEW","appId":54321}]'
)
DOC_V1_SIGNATURE = "232db2615f3d666fe21a8ec971ac7b5402d33b9a925784df3ca654d05f4817de"

SECRET = "5f3c2a9e-1b7d-4c8e-9a61-0d2f4e6b8c10"
PUBLIC_URL = "https://segmapd.example.com/v1/webhooks/hubspot"
NOW_MS = 1_764_633_600_000  # 2025-12-02T00:00:00Z
NOW = NOW_MS / 1000


def v3_signature(secret: str, method: str, uri: str, body: bytes, timestamp: str) -> str:
    """HubSpot's v3 steps: base64(HMAC-SHA256(secret, method + uri + body + timestamp))."""
    content = method.encode() + uri.encode() + body + timestamp.encode()
    return base64.b64encode(hmac.new(secret.encode(), content, hashlib.sha256).digest()).decode()


def v2_signature(secret: str, method: str, uri: str, body: bytes) -> str:
    """HubSpot's v2 steps: hex SHA-256 of secret + method + uri + body."""
    return hashlib.sha256(secret.encode() + method.encode() + uri.encode() + body).hexdigest()


def v1_signature(secret: str, body: bytes) -> str:
    """HubSpot's v1 steps: hex SHA-256 of secret + body."""
    return hashlib.sha256(secret.encode() + body).hexdigest()


def settings(**changes: Any) -> HubSpotSource:
    """Settings as a `[sources.NAME]` table gives them; the test secret and URL by default."""
    values: dict[str, Any] = {"client_secret": SECRET, "public_url": PUBLIC_URL}
    values.update(changes)
    return HubSpotSource.model_validate(values)


def adapter(**changes: Any) -> HubSpotAdapter:
    return HubSpotAdapter(settings(**changes))


def inbound(
    body: bytes,
    headers: dict[str, str],
    *,
    query: str = "",
    method: str = "POST",
    received_at: float = NOW,
) -> InboundRequest:
    path = "/v1/webhooks/hubspot" + (f"?{query}" if query else "")
    return InboundRequest(method, path, query, headers, body, "203.0.113.9", received_at)


def v3_request(
    body: bytes,
    *,
    secret: str = SECRET,
    signed_uri: str = PUBLIC_URL,
    query: str = "",
    timestamp_ms: int = NOW_MS,
    received_at: float = NOW,
) -> InboundRequest:
    stamp = str(timestamp_ms)
    headers = {
        "X-HubSpot-Signature-v3": v3_signature(secret, "POST", signed_uri, body, stamp),
        "X-HubSpot-Request-Timestamp": stamp,
        "Content-Type": "application/json",
    }
    return inbound(body, headers, query=query, received_at=received_at)


def refused(source: HubSpotAdapter, request: InboundRequest) -> WebhookRejected:
    with pytest.raises(WebhookRejected) as caught:
        source.authenticate(request)
    error = caught.value
    assert error.status == 401
    # Nothing secret leaks: not the secret, not a signature offered.
    shown = f"{error.message} {error.field} {error!r}"
    assert SECRET not in shown
    for value in request.headers.values():
        if len(value) > 20:
            assert value not in shown
    return error


# -- v3 -------------------------------------------------------------------------------------


def test_v3_passes_hubspots_published_test_vector() -> None:
    assert v3_signature(DOC_SECRET, "POST", DOC_URL, DOC_V3_BODY, DOC_V3_TIMESTAMP) == (
        DOC_V3_SIGNATURE
    )
    source = adapter(client_secret=DOC_SECRET, public_url=DOC_URL)
    headers = {
        "x-hubspot-signature-v3": DOC_V3_SIGNATURE,
        "x-hubspot-request-timestamp": DOC_V3_TIMESTAMP,
    }
    request = inbound(DOC_V3_BODY, headers, received_at=int(DOC_V3_TIMESTAMP) / 1000 + 30)
    assert source.authenticate(request) is None
    assert source.verifier.verify(request) == "v3"


def test_v3_signs_public_url_plus_the_query_string() -> None:
    body = b"[]"
    request = v3_request(body, signed_uri=f"{PUBLIC_URL}?tenant=eu&b=2", query="tenant=eu&b=2")
    assert adapter().verifier.verify(request) == "v3"
    # Signed without the query, or with another one: not this request.
    refused(adapter(), v3_request(body, signed_uri=PUBLIC_URL, query="tenant=eu&b=2"))
    refused(adapter(), v3_request(body, signed_uri=f"{PUBLIC_URL}?tenant=us", query="tenant=eu"))


def test_v3_decodes_the_characters_hubspot_lists_and_no_others() -> None:
    # HubSpot signs the URI with %3A %2F %3F %40 %21 %24 %27 %28 %29 %2A %2C %3B decoded (either
    # case); %20 and %3D stay encoded. The signed form is written out by hand.
    query = "next=a%3Ab%2fc%40d%21%24%27%28%29%2A%2C%3b%3F&name=x%20y&eq=%3D"
    signed = f"{PUBLIC_URL}?next=a:b/c@d!$'()*,;?&name=x%20y&eq=%3D"
    assert adapter().verifier.verify(v3_request(b"[]", signed_uri=signed, query=query)) == "v3"
    # Signing the raw (undecoded) form does not match.
    refused(adapter(), v3_request(b"[]", signed_uri=f"{PUBLIC_URL}?{query}", query=query))


def test_v3_wrong_secret_is_refused() -> None:
    error = refused(adapter(), v3_request(b"[]", secret="another-apps-client-secret"))
    assert error.field == "X-HubSpot-Signature-v3"
    assert "public_url" in error.message


def test_v3_signature_over_another_url_is_refused() -> None:
    # HubSpot's target URL and segmapd's public_url differ (http, another path, a trailing /).
    for signed in (
        "http://segmapd.example.com/v1/webhooks/hubspot",
        "https://segmapd.example.com/v1/webhooks/hubspot/",
        "https://segmapd.example.com/v1/webhooks/crm",
    ):
        assert refused(adapter(), v3_request(b"[]", signed_uri=signed)).field == (
            "X-HubSpot-Signature-v3"
        )


def test_v3_tampered_body_is_refused() -> None:
    request = v3_request(b'[{"objectId":1}]')
    tampered = inbound(b'[{"objectId":2}]', dict(request.headers))
    assert refused(adapter(), tampered).field == "X-HubSpot-Signature-v3"


def test_v3_stale_timestamp_is_refused() -> None:
    source = adapter(tolerance_s=300)
    assert source.verifier.verify(v3_request(b"[]", received_at=NOW + 299)) == "v3"
    error = refused(source, v3_request(b"[]", received_at=NOW + 301))
    assert error.field == "X-HubSpot-Request-Timestamp"
    assert "old" in error.message


def test_v3_future_timestamp_is_refused() -> None:
    source = adapter(tolerance_s=300)
    assert source.verifier.verify(v3_request(b"[]", received_at=NOW - 299)) == "v3"
    error = refused(source, v3_request(b"[]", received_at=NOW - 301))
    assert error.field == "X-HubSpot-Request-Timestamp"
    assert "ahead" in error.message


def test_v3_timestamp_is_milliseconds() -> None:
    # A timestamp in seconds is 55 years "old" against a clock in the 2020s.
    request = v3_request(b"[]", timestamp_ms=NOW_MS // 1000)
    assert refused(adapter(), request).field == "X-HubSpot-Request-Timestamp"


def test_missing_and_malformed_headers_are_refused() -> None:
    good = dict(v3_request(b"[]").headers)
    without_signature = {k: v for k, v in good.items() if k != "X-HubSpot-Signature-v3"}
    assert refused(adapter(), inbound(b"[]", without_signature)).field == "X-HubSpot-Signature-v3"
    assert refused(adapter(), inbound(b"[]", {})).field == "X-HubSpot-Signature-v3"
    without_stamp = {k: v for k, v in good.items() if k != "X-HubSpot-Request-Timestamp"}
    assert refused(adapter(), inbound(b"[]", without_stamp)).field == (
        "X-HubSpot-Request-Timestamp"
    )
    for stamp in ("", "1764633600000.5", "-1764633600000", "١٧٦٤٦٣٣٦٠٠٠٠٠", "9" * 40):
        headers = {**good, "X-HubSpot-Request-Timestamp": stamp}
        assert refused(adapter(), inbound(b"[]", headers)).field == "X-HubSpot-Request-Timestamp"
    not_base64 = {**good, "X-HubSpot-Signature-v3": "not base64!"}
    assert refused(adapter(), inbound(b"[]", not_base64)).field == "X-HubSpot-Signature-v3"


# -- v2 and v1 --------------------------------------------------------------------------------


def legacy_headers(version: str, signature: str) -> dict[str, str]:
    return {"X-HubSpot-Signature": signature, "X-HubSpot-Signature-Version": version}


def test_hubspots_published_v2_and_v1_examples() -> None:
    assert v2_signature(DOC_SECRET, "GET", DOC_URL, b"") == DOC_V2_GET_SIGNATURE
    assert v1_signature(DOC_SECRET, DOC_V1_BODY) == DOC_V1_SIGNATURE
    source = adapter(
        client_secret=DOC_SECRET, public_url=DOC_URL, signature_versions=["v3", "v2", "v1"]
    )
    get = inbound(b"", legacy_headers("v2", DOC_V2_GET_SIGNATURE), method="GET")
    assert source.verifier.verify(get) == "v2"
    post = inbound(DOC_V1_BODY, legacy_headers("v1", DOC_V1_SIGNATURE))
    assert source.verifier.verify(post) == "v1"


def test_v2_and_v1_are_refused_unless_enabled() -> None:
    body = b'[{"objectId":1}]'
    v2 = inbound(body, legacy_headers("v2", v2_signature(SECRET, "POST", PUBLIC_URL, body)))
    v1 = inbound(body, legacy_headers("v1", v1_signature(SECRET, body)))
    for request in (v2, v1):
        error = refused(adapter(), request)
        assert error.field == "X-HubSpot-Signature-v3"
        assert "not accepted" in error.message
    assert refused(adapter(signature_versions=["v2"]), v1).field == "X-HubSpot-Signature-Version"
    assert refused(adapter(signature_versions=["v1"]), v2).field == "X-HubSpot-Signature-Version"
    assert adapter(signature_versions=["v3", "v2"]).verifier.verify(v2) == "v2"
    assert adapter(signature_versions=["v1"]).verifier.verify(v1) == "v1"
    # HubSpot sends v3 beside the older header; with v3 not listed its header is not looked at.
    both = inbound(body, {**dict(v3_request(body, secret="other").headers), **dict(v1.headers)})
    assert adapter(signature_versions=["v1"]).verifier.verify(both) == "v1"


def test_v2_covers_the_url_and_query_and_v1_the_body() -> None:
    source = adapter(signature_versions=["v2", "v1"])
    body = b"[]"
    signed = v2_signature(SECRET, "POST", f"{PUBLIC_URL}?a=1", body)
    assert source.verifier.verify(inbound(body, legacy_headers("v2", signed), query="a=1")) == "v2"
    assert refused(source, inbound(body, legacy_headers("v2", signed))).field == (
        "X-HubSpot-Signature"
    )
    wrong = legacy_headers("v1", v1_signature("another-secret", body))
    assert refused(source, inbound(body, wrong)).field == "X-HubSpot-Signature"
    missing = {"X-HubSpot-Signature-Version": "v1"}
    assert refused(source, inbound(body, missing)).field == "X-HubSpot-Signature"


def test_a_legacy_signature_that_is_not_ascii_is_a_401_not_a_crash() -> None:
    source = adapter(signature_versions=["v2", "v1"])
    # Undecodable header bytes reach the adapter as surrogates (aiohttp decodes leniently).
    for version in ("v1", "v2"):
        headers = legacy_headers(version, "\udcff\udcfe" + "a" * 62)
        assert refused(source, inbound(b"[]", headers)).status == 401


def test_a_bad_v3_signature_is_not_rescued_by_a_good_v2_one() -> None:
    body = b"[]"
    headers = {
        **dict(v3_request(body, secret="another-apps-client-secret").headers),
        **legacy_headers("v2", v2_signature(SECRET, "POST", PUBLIC_URL, body)),
    }
    source = adapter(signature_versions=["v3", "v2"])
    assert refused(source, inbound(body, headers)).field == "X-HubSpot-Signature-v3"


# -- mapping ----------------------------------------------------------------------------------


def event(**fields: Any) -> dict[str, Any]:
    """An event shaped like the webhooks API's documented example."""
    base: dict[str, Any] = {
        "objectId": 1246965,
        "propertyName": "cxone_segments",
        "propertyValue": "VIP;Spanish",
        "changeSource": "CRM_UI",
        "eventId": 3816279340,
        "subscriptionId": 25,
        "portalId": 33,
        "appId": 1160452,
        "occurredAt": 1462216307945,
        "subscriptionType": "contact.propertyChange",
        "attemptNumber": 0,
    }
    base.update(fields)
    return {key: value for key, value in base.items() if value is not _ABSENT}


_ABSENT = object()


def parse(events: list[Any], **settings: Any) -> ParsedDelivery:
    return adapter(**settings).parse(v3_request(orjson.dumps(events)))


def mirror(contact: str, segments: tuple[str, ...], occurred_ms: int) -> MembershipChange:
    return MembershipChange(contact, mirror=segments, occurred_at=occurred_ms / 1000)


def test_documented_payload_maps_the_segments_property_and_skips_the_rest() -> None:
    # HubSpot's documented two-event example, the first event about the segments property
    # (plus one about the property of the original example).
    body = [
        event(propertyValue=" VIP ; Spanish;;VIP;"),
        {
            "objectId": 1246978,
            "changeSource": "IMPORT",
            "eventId": 3816279480,
            "subscriptionId": 22,
            "portalId": 33,
            "appId": 1160452,
            "occurredAt": 1462216307945,
            "subscriptionType": "contact.creation",
            "attemptNumber": 0,
        },
        event(propertyName="lifecyclestage", propertyValue="subscriber", changeSource="ACADEMY"),
    ]
    parsed = parse(body)
    assert [e.change for e in parsed.events] == [
        mirror("1246965", ("VIP", "Spanish"), 1462216307945)
    ]
    assert parsed.events[0].key is not None
    assert [s.reason for s in parsed.skipped] == ["other_event", "other_property"]
    assert parsed.dead == []


def test_event_type_is_accepted_for_subscription_type() -> None:
    documented = event(subscriptionType=_ABSENT, eventType="contact.propertyChange")
    parsed = parse([documented])
    assert [e.change.mirror for e in parsed.events] == [("VIP", "Spanish")]
    both = event(eventType="contact.propertyChange")
    assert len(parse([both]).events) == 1
    with pytest.raises(WebhookRejected) as caught:
        parse([event(eventType="contact.deletion")])
    assert (caught.value.status, caught.value.field) == (422, "body[0].eventType")


def test_empty_or_null_value_is_an_empty_mirror() -> None:
    for value in ("", None, " ; "):
        parsed = parse([event(propertyValue=value)])
        assert [e.change.mirror for e in parsed.events] == [()], value


def test_segment_values_maps_options_and_only_unmapped_ones_are_dead_lettered() -> None:
    table = {"vip": "SEG-100", "es": "SEG-200", "spanish": "SEG-200"}
    parsed = parse([event(propertyValue="vip;es;spanish")], segment_values=table)
    assert [e.change.mirror for e in parsed.events] == [("SEG-100", "SEG-200")]
    assert [e.invalid for e in parsed.events] == [None]
    parsed = parse(
        [event(propertyValue="vip;gold"), event(eventId=2, propertyValue="es")],
        segment_values=table,
    )
    # The mapped option is taken; only the unmapped one is dead-lettered, beside it.
    assert [e.change.mirror for e in parsed.events] == [("SEG-100",), ("SEG-200",)]
    assert parsed.dead == []
    invalid = parsed.events[0].invalid
    assert invalid is not None
    assert invalid.reason is FailureReason.SEGMENT_NOT_FOUND
    assert "body[0].propertyValue" in invalid.message
    assert "option 'gold' of cxone_segments is not in segment_values" in invalid.message
    assert "a replay would not help" in invalid.message
    assert invalid.change == MembershipChange(
        "1246965", add=("gold",), occurred_at=1462216307945 / 1000
    )
    assert invalid.key is None
    assert parsed.events[1].invalid is None


def test_unmapped_values_can_be_ignored() -> None:
    parsed = parse(
        [event(propertyValue="vip;gold")],
        segment_values={"vip": "SEG-100"},
        unmapped_values="ignore",
    )
    assert [e.change.mirror for e in parsed.events] == [("SEG-100",)]
    assert parsed.dead == []


def test_a_value_that_cannot_be_a_segment_id_is_dead_lettered_and_the_rest_taken() -> None:
    parsed = parse([event(propertyValue="VIP;Gold Tier"), event(eventId=2, objectId=7)])
    assert [e.change.contact_id for e in parsed.events] == ["1246965", "7"]
    assert parsed.events[0].change == mirror("1246965", ("VIP",), 1462216307945)
    assert parsed.dead == []
    invalid = parsed.events[0].invalid
    assert invalid is not None
    assert invalid.reason is FailureReason.SEGMENT_NOT_FOUND
    assert invalid.change == MembershipChange(
        "1246965", add=("Gold Tier",), occurred_at=1462216307945 / 1000
    )
    assert "body[0].propertyValue: option 'Gold Tier' (got ' ' at index 4)" in invalid.message
    assert "cannot be a CXone segment id" in invalid.message
    assert "a replay would not help" in invalid.message


def test_a_bad_value_beside_a_valid_one_keeps_the_valid_membership() -> None:
    # Contact 500 is in VIP; HubSpot sends VIP plus a value that is no segment id. The event is
    # taken as "VIP only" (same time, same key), and only the bad value is dead-lettered.
    parsed = parse([event(objectId=500, propertyValue="VIP;bad value")])
    [taken] = parsed.events
    assert taken.change == mirror("500", ("VIP",), 1462216307945)
    assert taken.key == parse([event(objectId=500, propertyValue="VIP")]).events[0].key
    assert taken.invalid is not None
    assert taken.invalid.change == MembershipChange(
        "500", add=("bad value",), occurred_at=1462216307945 / 1000
    )
    assert (taken.invalid.reason, taken.invalid.key) == (FailureReason.SEGMENT_NOT_FOUND, None)
    assert parsed.dead == []


def test_when_every_value_is_invalid_the_valid_part_is_an_empty_mirror() -> None:
    parsed = parse([event(propertyValue="bad value; bad value ;Gold Tier")])
    [taken] = parsed.events
    # The contact is in none of the valid segments, as HubSpot says.
    assert taken.change == mirror("1246965", (), 1462216307945)
    assert taken.invalid is not None
    assert taken.invalid.change.add == ("bad value", "Gold Tier")
    assert "options 'bad value' (got ' ' at index 3), 'Gold Tier'" in taken.invalid.message
    assert "cannot be CXone segment ids" in taken.invalid.message


def test_many_invalid_values_are_all_kept_and_the_message_lists_a_few() -> None:
    values = [f"bad {i}" for i in range(8)]
    parsed = parse([event(propertyValue=";".join(["VIP", *values]))])
    invalid = parsed.events[0].invalid
    assert invalid is not None
    assert invalid.change.add == tuple(values)
    assert "'bad 0' (got ' ' at index 3), 'bad 1'" in invalid.message
    assert "and 5 more" in invalid.message
    assert "'bad 3'" not in invalid.message


def test_an_invalid_contact_id_dead_letters_the_whole_event_with_every_value() -> None:
    template = "c" * 121 + "-{objectId}"
    parsed = parse([event(propertyValue="VIP;bad value")], contact_id=template)
    assert parsed.events == []
    [dead] = parsed.dead
    assert dead.reason is FailureReason.INVALID_CONTACT_ID
    assert dead.change.mirror == ("VIP", "bad value")
    assert dead.key is not None


def test_an_invalid_contact_id_that_clears_is_kept_as_a_removal_from_every_segment() -> None:
    # A dead letter is kept per (contact, segment): one naming no segment would keep nothing.
    template = "c" * 121 + "-{objectId}"
    deletion = event(
        subscriptionType="contact.deletion", propertyName=_ABSENT, propertyValue=_ABSENT
    )
    parsed = parse([event(propertyValue=""), {**deletion, "eventId": 2}], contact_id=template)
    assert parsed.events == []
    assert [d.change.remove for d in parsed.dead] == [("*",), ("*",)]
    assert [d.change.mirror for d in parsed.dead] == [None, None]
    assert [d.change.occurred_at for d in parsed.dead] == [1462216307.945] * 2
    assert all(d.reason is FailureReason.INVALID_CONTACT_ID for d in parsed.dead)


def test_more_values_than_the_cap_dead_letter_the_event_keeping_the_first_ones() -> None:
    values = [f"S{i}" for i in range(150)]
    parsed = parse([event(propertyValue=";".join(values))])
    assert parsed.events == []
    [dead] = parsed.dead
    assert dead.reason is FailureReason.SEGMENT_NOT_FOUND
    assert dead.change.mirror == tuple(values[:100])
    assert "150 segment ids; at most 100 per event" in dead.message
    assert "keeps the first 100 of the event's 150 segment values" in dead.message


def test_a_huge_value_is_dead_lettered_shortened_visibly_and_never_quoted_whole() -> None:
    huge = "x" * 5000
    parsed = parse([event(propertyValue=f"VIP;{huge}")])
    [taken] = parsed.events
    assert taken.change.mirror == ("VIP",)
    assert taken.invalid is not None
    [kept] = taken.invalid.change.add
    assert len(kept) == 1024
    assert kept.startswith("x" * 900)
    assert kept.endswith("…[shortened from 5000 characters]")
    assert "got 5000 characters" in taken.invalid.message
    assert len(taken.invalid.message) < 1000


def test_an_invalid_contact_id_is_dead_lettered_not_refused() -> None:
    # A template that fits the id rule, except for long objectIds.
    template = "c" * 121 + "-{objectId}"
    parsed = parse([event(objectId=42), event(eventId=2)], contact_id=template)
    assert [e.change.contact_id for e in parsed.events] == ["c" * 121 + "-42"]
    [dead] = parsed.dead
    assert dead.reason is FailureReason.INVALID_CONTACT_ID
    assert dead.change.contact_id == "c" * 121 + "-1246965"
    assert dead.change.mirror == ("VIP", "Spanish")
    assert "body[1].objectId" in dead.message
    assert dead.key == parse([event(eventId=2)], contact_id=template).dead[0].key


def test_contact_id_template_uses_event_fields() -> None:
    parsed = parse([event()], contact_id="hs-{portalId}-{objectId}")
    assert parsed.events[0].change.contact_id == "hs-33-1246965"
    with pytest.raises(WebhookRejected) as caught:
        parse([event(portalId=_ABSENT)], contact_id="{portalId}:{objectId}:{appId}")
    assert (caught.value.status, caught.value.field) == (400, "body[0].portalId")


def test_deletions_clear_the_contact() -> None:
    body = [
        event(subscriptionType="contact.deletion", propertyName=_ABSENT, propertyValue=_ABSENT),
        event(
            subscriptionType="contact.privacyDeletion",
            objectId=99,
            eventId=5,
            propertyName=_ABSENT,
            propertyValue=_ABSENT,
        ),
    ]
    parsed = parse(body)
    assert [e.change for e in parsed.events] == [
        mirror("1246965", (), 1462216307945),
        mirror("99", (), 1462216307945),
    ]
    off = parse(body, deletions=False)
    assert off.events == []
    assert [s.reason for s in off.skipped] == ["deletions_off", "deletions_off"]


def merge_event(**fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "subscriptionType": "contact.merge",
        "propertyName": _ABSENT,
        "propertyValue": _ABSENT,
        "objectId": 300,
        "primaryObjectId": 300,
        "mergedObjectIds": [100, 200],
        "newObjectId": 300,
        "numberOfPropertiesMoved": 12,
    }
    values.update(fields)
    return event(**values)


def test_merge_clears_the_contacts_merged_away() -> None:
    parsed = parse([merge_event()])
    assert [e.change for e in parsed.events] == [
        mirror("100", (), 1462216307945),
        mirror("200", (), 1462216307945),
    ]
    keys = [e.key for e in parsed.events]
    assert len(set(keys)) == 2


def test_merge_into_a_new_record_clears_the_primary_too() -> None:
    parsed = parse([merge_event(objectId=300, primaryObjectId=100, mergedObjectIds=[200])])
    assert [e.change.contact_id for e in parsed.events] == ["200", "100"]
    without_new = merge_event(newObjectId=_ABSENT, objectId=100, primaryObjectId=100)
    assert [e.change.contact_id for e in parse([without_new]).events] == ["200"]


def test_merges_can_be_ignored_and_a_merge_that_removes_nothing_is_skipped() -> None:
    off = parse([merge_event()], merges="ignore")
    assert (off.events, [s.reason for s in off.skipped]) == ([], ["merges_off"])
    nothing = parse([merge_event(mergedObjectIds=[300])])
    assert [s.reason for s in nothing.skipped] == ["merge_nothing_removed"]
    with pytest.raises(WebhookRejected) as caught:
        parse([merge_event(mergedObjectIds=[100, "200"])])
    assert (caught.value.status, caught.value.field) == (422, "body[0].mergedObjectIds[1]")


def test_other_events_are_skipped_with_a_reason_from_the_fixed_set() -> None:
    body = [
        {"subscriptionType": "company.creation", "objectId": 1, "eventId": 1},
        event(subscriptionType="deal.propertyChange", propertyName="amount"),
        event(subscriptionType="contact.creation"),
        event(subscriptionType="contact.restore"),
        # Association changes carry from/to ids and no objectId: skipped, not refused.
        {
            "subscriptionType": "contact.associationChange",
            "fromObjectId": 1,
            "toObjectId": 2,
            "associationType": "CONTACT_TO_COMPANY",
        },
        event(propertyName="firstname", propertyValue="Ana"),
        event(subscriptionType="object.propertyChange", objectTypeId="0-2"),
    ]
    source = adapter()
    parsed = source.parse(v3_request(orjson.dumps(body)))
    assert parsed.events == []
    assert [s.reason for s in parsed.skipped] == [
        "other_object",
        "other_object",
        "other_event",
        "restored",
        "other_event",
        "other_property",
        "other_object",
    ]
    assert {s.reason for s in parsed.skipped} <= source.skip_reasons


def test_a_restored_contact_is_skipped_as_restored_in_both_formats() -> None:
    # HubSpot sends no property value with a restore: segmapd cannot know the segments.
    restores = [
        event(subscriptionType="contact.restore", propertyName=_ABSENT, propertyValue=_ABSENT),
        event(
            subscriptionType="object.restore",
            objectTypeId="0-1",
            propertyName=_ABSENT,
            propertyValue=_ABSENT,
            eventId=2,
        ),
    ]
    parsed = parse(restores)
    assert (parsed.events, parsed.dead) == ([], [])
    assert [s.reason for s in parsed.skipped] == ["restored", "restored"]
    assert "change cxone_segments again" in parsed.skipped[0].detail
    assert "restored" in HubSpotAdapter.skip_reasons


def test_generic_object_events_for_contacts_are_taken() -> None:
    parsed = parse([event(subscriptionType="object.propertyChange", objectTypeId="0-1")])
    assert [e.change.mirror for e in parsed.events] == [("VIP", "Spanish")]


def test_redelivery_gives_the_same_keys_and_distinct_events_distinct_keys() -> None:
    batch = [
        event(),
        event(subscriptionType="contact.deletion", eventId=9),
        merge_event(eventId=10),
    ]
    first = [e.key for e in parse(batch).events]
    again = [e.key for e in parse([{**e, "attemptNumber": 3} for e in batch]).events]
    assert first == again
    assert len(set(first)) == len(first) == 4
    # eventId is not unique on its own: another contact, time or subscription is another event.
    variants = [
        event(objectId=2),
        event(occurredAt=1462216307946),
        event(subscriptionId=26),
        event(portalId=34),
    ]
    keys = {e.key for e in parse(variants).events}
    assert len(keys) == 4
    assert first[0] not in keys


# -- malformed bodies -------------------------------------------------------------------------


def rejected_body(body: bytes, **settings: Any) -> WebhookRejected:
    with pytest.raises(WebhookRejected) as caught:
        adapter(**settings).parse(v3_request(body))
    return caught.value


def test_malformed_bodies_are_refused_naming_the_field() -> None:
    cases: list[tuple[bytes, int, str]] = [
        (b"not json", 400, "body"),
        (b'{"objectId": 1}', 400, "body"),
        (b"[]", 400, "body"),
        (orjson.dumps([{}] * 1001), 422, "body"),
        (orjson.dumps([event(), 7]), 400, "body[1]"),
        (orjson.dumps([event(objectId=True)]), 422, "body[0].objectId"),
        (orjson.dumps([event(objectId="1246965")]), 422, "body[0].objectId"),
        (orjson.dumps([event(occurredAt=_ABSENT)]), 400, "body[0].occurredAt"),
        (orjson.dumps([event(occurredAt="2016-05-02T19:11:47Z")]), 422, "body[0].occurredAt"),
        (orjson.dumps([event(occurredAt=1462216307.9)]), 422, "body[0].occurredAt"),
        (orjson.dumps([event(eventId=_ABSENT)]), 400, "body[0].eventId"),
        (orjson.dumps([event(portalId=None)]), 400, "body[0].portalId"),
        (orjson.dumps([event(subscriptionId="25")]), 422, "body[0].subscriptionId"),
        (orjson.dumps([event(subscriptionType=_ABSENT)]), 400, "body[0].subscriptionType"),
        (orjson.dumps([event(subscriptionType=5)]), 422, "body[0].subscriptionType"),
        (orjson.dumps([event(propertyName=_ABSENT)]), 400, "body[0].propertyName"),
        (orjson.dumps([event(propertyValue=["VIP"])]), 422, "body[0].propertyValue"),
        (orjson.dumps([event(propertyValue=_ABSENT)]), 400, "body[0].propertyValue"),
        (b'[{"subscriptionType": "contact.deletion", "objectId": 1e400}]', 400, "body"),
    ]
    for body, status, field in cases:
        error = rejected_body(body)
        assert (error.status, error.field) == (status, field), body[:80]
        assert field in error.message


def test_more_than_hubspots_100_events_are_refused_naming_the_count_and_the_limit() -> None:
    batch = [event(eventId=i, objectId=i) for i in range(1, 102)]
    error = rejected_body(orjson.dumps(batch))
    assert (error.status, error.field) == (422, "body")
    assert "101 events" in error.message
    assert "at most 100" in error.message
    assert len(parse(batch[:100]).events) == 100


def _raw_event(value_json: bytes, extra: bytes = b"") -> bytes:
    """One documented propertyChange, written out so that a key can be repeated."""
    return (
        b'{"objectId": 1246965, "propertyName": "cxone_segments", "changeSource": "CRM_UI",'
        b' "eventId": 3816279340, "subscriptionId": 25, "portalId": 33, "appId": 1160452,'
        b' "occurredAt": 1462216307945, "subscriptionType": "contact.propertyChange",'
        b' "attemptNumber": 0, "sourceId": "userId:45678", "propertyValue": '
        + value_json
        + extra
        + b"}"
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        # Which of the two values HubSpot meant cannot be known: never "the last one wins".
        (b"[" + _raw_event(b'"VIP"', b', "propertyValue": "Gold"') + b"]", "body[0].propertyValue"),
        (
            b"[" + _raw_event(b'"VIP"') + b", " + _raw_event(b'"VIP"', b', "objectId": 7') + b"]",
            "body[1].objectId",
        ),
        # Spelled with an escape, the key is the same key once decoded.
        (b"[" + _raw_event(b'"VIP"', b', "object\\u0049d": 7') + b"]", "body[0].objectId"),
        # In an object nested in a field segmapd does not read, too.
        (b"[" + _raw_event(b'"VIP"', b', "extra": {"a": 1, "a": 2}') + b"]", "body[0].extra.a"),
        # Colons in values (sourceId, ids such as urn:seg:1) do not hide a repeat.
        (
            b"[" + _raw_event(b'"urn:seg:1;urn:seg:2"', b', "eventId": 1') + b"]",
            "body[0].eventId",
        ),
    ],
)
def test_a_repeated_key_refuses_the_batch_naming_it(body: bytes, field: str) -> None:
    error = rejected_body(body)
    assert (error.status, error.field) == (400, field)
    assert "appears more than once" in error.message


def test_colons_in_values_are_not_taken_for_repeated_keys() -> None:
    parsed = adapter().parse(v3_request(b"[" + _raw_event(b'"urn:seg:1;urn:seg:2"') + b"]"))
    assert [e.change.mirror for e in parsed.events] == [("urn:seg:1", "urn:seg:2")]


def test_an_occurred_at_outside_the_accepted_range_refuses_the_batch() -> None:
    # The same time rule as every kind: seconds where milliseconds belong.
    error = rejected_body(orjson.dumps([event(occurredAt=1462216307)]))
    assert (error.status, error.field) == (422, "body[0].occurredAt")


def test_unknown_extra_fields_are_allowed() -> None:
    parsed = parse([event(sourceId="userId:45678", isSensitive=False, changeFlag="UPDATED")])
    assert len(parsed.events) == 1


# -- settings ---------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    defaults = settings()
    assert defaults.kind == "hubspot"
    assert defaults.segments_property == "cxone_segments"
    assert defaults.contact_id == "{objectId}"
    assert defaults.segment_values == {}
    assert defaults.unmapped_values == "dead_letter"
    assert defaults.merges == "clear_merged"
    assert defaults.signature_versions == ["v3"]
    assert defaults.tolerance_s == 300
    assert defaults.deletions is True
    assert HubSpotSource.required_keys == ("client_secret", "public_url")
    # Empty required keys are left to the daemon's check (which names client_secret_file).
    assert HubSpotSource().public_url == ""


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ValidationError, match="client_secrett"):
        HubSpotSource.model_validate({"client_secrett": SECRET, "public_url": PUBLIC_URL})


@pytest.mark.parametrize(
    "url",
    [
        "segmapd.example.com/v1/webhooks/hubspot",
        "ftp://segmapd.example.com/hook",
        "https:///v1/webhooks/hubspot",
        "https://segmapd.example.com/v1/webhooks/hubspot?tenant=eu",
        "https://segmapd.example.com/v1/webhooks/hubspot?",
        "https://segmapd.example.com/v1/webhooks/hubspot#top",
        "https://segmapd.example.com:99999/hook",
        " https://segmapd.example.com/hook",
        "https://segmapd.example.com/web hook",
    ],
)
def test_bad_public_url_is_an_error(url: str) -> None:
    with pytest.raises(ValidationError, match="public_url"):
        settings(public_url=url)


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{email}", "unknown placeholder"),
        ("{objectId}-{propertyValue}", "unknown placeholder"),
        ("{portalId}", "must contain {objectId}"),
        ("contact", "must contain {objectId}"),
        ("{objectId!r}", "no format"),
        ("{objectId:08d}", "no format"),
        ("{objectId", "not a valid template"),
        ("hs {objectId}", "text outside placeholders"),
        ("hs/{objectId}", "text outside placeholders"),
    ],
)
def test_bad_contact_id_template_is_an_error(template: str, problem: str) -> None:
    with pytest.raises(ValidationError, match="contact_id") as caught:
        settings(contact_id=template)
    assert problem in str(caught.value)


def test_other_settings_are_checked() -> None:
    bad: list[dict[str, Any]] = [
        {"segments_property": "CXone Segments"},
        {"segments_property": ""},
        {"segment_values": {"vip": "not a segment"}},
        {"segment_values": {" vip": "SEG-1"}},
        {"segment_values": {"a;b": "SEG-1"}},
        {"signature_versions": []},
        {"signature_versions": ["v4"]},
        {"signature_versions": ["v3", "v3"]},
        {"tolerance_s": 0},
        {"merges": "keep"},
        {"unmapped_values": "drop"},
    ]
    for changes in bad:
        with pytest.raises(ValidationError):
            settings(**changes)


def test_adapter_needs_a_secret_and_url() -> None:
    with pytest.raises(ValueError, match="client_secret"):
        HubSpotAdapter(settings(client_secret=""))
    with pytest.raises(ValueError, match="absolute"):
        HubSpotAdapter(settings(public_url=""))


def test_repr_hides_the_secret() -> None:
    configured = settings()
    source = HubSpotAdapter(configured)
    for shown in (repr(configured), str(configured), repr(source), repr(source.verifier)):
        assert SECRET not in shown
    assert PUBLIC_URL in repr(source)


def test_replies() -> None:
    source = adapter()
    reply = source.accepted(Outcome(accepted=2, events=1))
    assert reply.status == 200
    assert orjson.loads(reply.body)["accepted"] == 2
    refusal = source.refused(WebhookRejected(422, "body[0].objectId: bad", "body[0].objectId"))
    assert refusal.status == 422
    assert orjson.loads(refusal.body)["field"] == "body[0].objectId"
    busy = source.busy("draining", 2.5)
    assert (busy.status, busy.headers["Retry-After"]) == (503, "3")
