"""kind = "json": GitHub-style and Zendesk signatures, JMESPath mapping, keys, settings.

Signatures are computed here with hmac/hashlib as each sender documents them:

- GitHub (docs.github.com, "Validating webhook deliveries"): `X-Hub-Signature-256:
  sha256=<hex HMAC-SHA256 of the raw body>`, the secret as a plain string; the documented test
  values are the secret "It's a Secret to Everybody" and the body "Hello, World!".
- Zendesk (developer.zendesk.com, "Verifying webhook authenticity"):
  `X-Zendesk-Webhook-Signature: base64(HMACSHA256(TIMESTAMP + BODY))` with
  `X-Zendesk-Webhook-Signature-Timestamp` such as `2021-07-25T10:00:00Z`, the signing secret
  used as the key string.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import tomllib
from datetime import datetime
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from listeners.base import InboundRequest
from listeners.errors import WebhookRejected
from listeners.json import JsonAdapter, JsonSource
from listeners.payload import MAX_EVENTS
from scheduler.model import FailureReason, MembershipChange

# ---- the two README examples, parsed exactly as written there ----------------------------------

README_EXAMPLES = """
[sources.zendesk]
kind = "json"
secret = "dGhpc19zZWNyZXRfaXNfZm9yX3Rlc3Rpbmdfb25seQ=="  # the webhook's signing secret
signature_header = "X-Zendesk-Webhook-Signature"
signature_encoding = "base64"
signed_content = "timestamp+body"
timestamp_header = "X-Zendesk-Webhook-Signature-Timestamp"
timestamp_format = "rfc3339"
when = "type == 'zen:event-type:user.custom_field_changed'"
contact_id = "detail.external_id"     # the CXone contact id, kept as the user's external id
set = "event.current"                 # the custom field's new value: "VIP;Spanish"
occurred_at = "time"
dedup_key = "id"

[sources.crm]
kind = "json"
secret = "It's a Secret to Everybody"
signature_header = "X-Hub-Signature-256"
signature_prefix = "sha256="
signature_encoding = "hex"
delivery_id_header = "X-GitHub-Delivery"
events = "changes"
contact_id = "contact.cxone_id"
add = "segments_added"
remove = "segments_removed"
occurred_at = "changed_at"
"""

TABLES: dict[str, dict[str, Any]] = tomllib.loads(README_EXAMPLES)["sources"]
ZENDESK_SECRET = TABLES["zendesk"]["secret"]
GITHUB_SECRET = TABLES["crm"]["secret"]

NOW_ISO = "2025-06-02T10:00:05Z"
NOW = datetime.fromisoformat(NOW_ISO).timestamp()


def settings(name: str, **changes: Any) -> JsonSource:
    return JsonSource.model_validate({**TABLES[name], **changes})


def adapter(name: str, **changes: Any) -> JsonAdapter:
    return JsonAdapter(settings(name, **changes))


def request(headers: dict[str, str], body: bytes, received_at: float = NOW) -> InboundRequest:
    return InboundRequest(
        method="POST",
        path_qs="/v1/webhooks/x",
        query_string="",
        headers=headers,
        body=body,
        peer="192.0.2.1",
        received_at=received_at,
    )


# ---- GitHub-style -------------------------------------------------------------------------------


def github_signature(body: bytes, secret: str = GITHUB_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


GITHUB_DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"  # the form GitHub's docs show

CRM_BODY = orjson.dumps(
    {
        "event": "contact.segments_changed",
        "changes": [
            {
                "contact": {"id": 901, "cxone_id": "4815162342"},
                "segments_added": "VIP; Spanish",
                "segments_removed": ["ChurnRisk"],
                "changed_at": "2025-06-02T09:59:00Z",
            },
            {
                "contact": {"id": 902, "cxone_id": 1234567890123},
                "segments_added": ["Gold"],
                "segments_removed": None,
                "changed_at": 1748858340000,
            },
        ],
    }
)


def github_headers(body: bytes, **changes: str) -> dict[str, str]:
    headers = {
        "X-Hub-Signature-256": github_signature(body),
        "X-GitHub-Delivery": GITHUB_DELIVERY,
        "X-GitHub-Event": "push",
    }
    headers.update(changes)
    return headers


def test_githubs_documented_test_vector_authenticates() -> None:
    # docs.github.com: this secret and payload give exactly this signature.
    body = b"Hello, World!"
    headers = {
        "X-Hub-Signature-256": (
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        ),
        "X-GitHub-Delivery": GITHUB_DELIVERY,
    }
    crm = adapter("crm")
    assert crm.authenticate(request(headers, body)) == f"delivery:{GITHUB_DELIVERY}"
    # Authentic, but not JSON: the body is refused.
    error = refused_parse(crm, body)
    assert (error.status, error.field) == (400, "body")
    assert error.message.startswith("body: not valid JSON")


def test_a_github_style_batch_maps_add_remove_and_occurred_at() -> None:
    crm = adapter("crm")
    delivery = request(github_headers(CRM_BODY), CRM_BODY)
    assert crm.authenticate(delivery) == f"delivery:{GITHUB_DELIVERY}"
    parsed = crm.parse(delivery)
    assert [e.change for e in parsed.events] == [
        MembershipChange(
            "4815162342",
            add=("VIP", "Spanish"),
            remove=("ChurnRisk",),
            occurred_at=datetime.fromisoformat("2025-06-02T09:59:00+00:00").timestamp(),
        ),
        MembershipChange("1234567890123", add=("Gold",), occurred_at=1748858340.0),
    ]
    # The delivery has its key; its events need none.
    assert [e.key for e in parsed.events] == [None, None]
    assert parsed.skipped == [] and parsed.dead == []


def test_the_delivery_key_is_the_same_for_a_redelivery() -> None:
    crm = adapter("crm")
    first = crm.authenticate(request(github_headers(CRM_BODY), CRM_BODY))
    again = crm.authenticate(request(github_headers(CRM_BODY), CRM_BODY, received_at=NOW + 3600))
    other = crm.authenticate(
        request(github_headers(CRM_BODY, **{"X-GitHub-Delivery": "d2"}), CRM_BODY)
    )
    assert first == again == f"delivery:{GITHUB_DELIVERY}"
    assert other == "delivery:d2"


def rejected(crm: JsonAdapter, delivery: InboundRequest, secret: str) -> WebhookRejected:
    with pytest.raises(WebhookRejected) as caught:
        crm.authenticate(delivery)
    error = caught.value
    # Nothing secret leaks: not the secret, not the signatures offered or expected.
    text = f"{error.message} {error!r} {error.field}"
    assert secret not in text
    for value in delivery.headers.values():
        if "signature" in value.lower() or len(value) >= 40:
            assert value not in text
    assert hmac.new(secret.encode(), delivery.body, hashlib.sha256).hexdigest() not in text
    return error


@pytest.mark.parametrize(
    ("signature", "expected"),
    [
        (None, "header X-Hub-Signature-256: missing"),
        ("", "header X-Hub-Signature-256: missing"),
        (
            hmac.new(b"another secret", CRM_BODY, hashlib.sha256).hexdigest(),
            "header X-Hub-Signature-256: must start with 'sha256='",
        ),
        (
            "sha1=" + hmac.new(GITHUB_SECRET.encode(), CRM_BODY, hashlib.sha1).hexdigest(),
            "header X-Hub-Signature-256: must start with 'sha256='",
        ),
        (
            "sha256=" + "zz" * 32,
            "header X-Hub-Signature-256: not an HMAC-SHA256 signature (64 hex digits expected "
            "after 'sha256=')",
        ),
        (
            "sha256=" + hmac.new(GITHUB_SECRET.encode(), CRM_BODY, hashlib.sha256).hexdigest()[:-2],
            "header X-Hub-Signature-256: not an HMAC-SHA256 signature (64 hex digits expected "
            "after 'sha256=')",
        ),
        (
            github_signature(CRM_BODY, "another secret"),
            "header X-Hub-Signature-256: the signature does not match this delivery (check the "
            "secret, and that nothing re-encodes the body on the way)",
        ),
    ],
)
def test_bad_github_style_signatures_are_401_naming_the_header(
    signature: str | None, expected: str
) -> None:
    headers = github_headers(CRM_BODY)
    del headers["X-Hub-Signature-256"]
    if signature is not None:
        headers["x-hub-signature-256"] = signature
    error = rejected(adapter("crm"), request(headers, CRM_BODY), GITHUB_SECRET)
    assert (error.status, error.field, error.message) == (401, "X-Hub-Signature-256", expected)


def test_a_tampered_body_is_refused() -> None:
    headers = github_headers(CRM_BODY)
    tampered = CRM_BODY.replace(b"ChurnRisk", b"ChurnRisq")
    error = rejected(adapter("crm"), request(headers, tampered), GITHUB_SECRET)
    assert (error.status, error.field) == (401, "X-Hub-Signature-256")


def test_hex_signatures_are_case_insensitive_and_one_of_several_may_match() -> None:
    crm = adapter("crm")
    upper = "sha256=" + github_signature(CRM_BODY).removeprefix("sha256=").upper()
    assert crm.authenticate(
        request(github_headers(CRM_BODY, **{"X-Hub-Signature-256": upper}), CRM_BODY)
    )
    rotated = f"{github_signature(CRM_BODY, 'the old secret')} {github_signature(CRM_BODY)}"
    headers = github_headers(CRM_BODY, **{"X-Hub-Signature-256": rotated})
    assert crm.authenticate(request(headers, CRM_BODY)) == f"delivery:{GITHUB_DELIVERY}"


@pytest.mark.parametrize(("value", "rule"), [(None, "missing"), ("has space", "must be")])
def test_a_missing_or_bad_delivery_id_is_400(value: str | None, rule: str) -> None:
    headers = github_headers(CRM_BODY)
    del headers["X-GitHub-Delivery"]
    if value is not None:
        headers["X-GitHub-Delivery"] = value
    with pytest.raises(WebhookRejected) as caught:
        adapter("crm").authenticate(request(headers, CRM_BODY))
    assert (caught.value.status, caught.value.field) == (400, "X-GitHub-Delivery")
    assert caught.value.message.startswith(f"header X-GitHub-Delivery: {rule}")


# ---- Zendesk ------------------------------------------------------------------------------------


def zendesk_body(
    current: Any = "VIP;Spanish",
    external_id: Any = "4815162342",
    event_id: str = "2b24ef10-19d4-4740-93cf-8f98ec4776c0",
    event_type: str = "zen:event-type:user.custom_field_changed",
) -> bytes:
    # The documented event schema (developer.zendesk.com, "Webhook event types"): `type`,
    # `account_id`, `id`, `time`, `zendesk_event_version`, `subject`, `detail` (the user, ids
    # as strings) and `event` (what changed, with `current` and `previous`).
    return orjson.dumps(
        {
            "type": event_type,
            "account_id": 12514403,
            "id": event_id,
            "time": "2025-06-02T09:58:18Z",
            "zendesk_event_version": "2022-06-20",
            "subject": "zen:user:6596848315901",
            "detail": {
                "created_at": "2025-05-04T05:27:58Z",
                "email": "jdoe@example.com",
                "external_id": external_id,
                "default_group_id": "0",
                "id": "6596848315901",
                "organization_id": "0",
                "role": "end-user",
                "updated_at": "2025-06-02T09:58:18Z",
            },
            "event": {
                "field": {"id": "360012345678", "title": "CXone segments", "type": "text"},
                "current": current,
                "previous": "VIP",
            },
        }
    )


def zendesk_headers(
    body: bytes, timestamp: str = NOW_ISO, secret: str = ZENDESK_SECRET
) -> dict[str, str]:
    digest = hmac.new(secret.encode(), timestamp.encode() + body, hashlib.sha256).digest()
    return {
        "X-Zendesk-Webhook-Signature": base64.b64encode(digest).decode(),
        "X-Zendesk-Webhook-Signature-Timestamp": timestamp,
    }


def test_a_zendesk_custom_field_change_mirrors_the_segments() -> None:
    zendesk = adapter("zendesk")
    body = zendesk_body()
    delivery = request(zendesk_headers(body), body)
    # Per-event keys: the delivery has none of its own.
    assert zendesk.authenticate(delivery) is None
    parsed = zendesk.parse(delivery)
    (taken,) = parsed.events
    assert taken.change == MembershipChange(
        "4815162342",
        mirror=("VIP", "Spanish"),
        occurred_at=datetime.fromisoformat("2025-06-02T09:58:18+00:00").timestamp(),
    )
    assert taken.key == "event:2b24ef10-19d4-4740-93cf-8f98ec4776c0"


def test_a_zendesk_redelivery_has_the_same_event_key() -> None:
    zendesk = adapter("zendesk")
    body = zendesk_body()
    first = zendesk.parse(request(zendesk_headers(body), body))
    # A retry may be signed again with a new timestamp; the event id stays.
    later = "2025-06-02T10:04:00Z"
    received = datetime.fromisoformat(later).timestamp()
    retried = request(zendesk_headers(body, later), body, received_at=received)
    assert zendesk.authenticate(retried) is None
    assert [e.key for e in zendesk.parse(retried).events] == [e.key for e in first.events]


def test_a_cleared_zendesk_field_means_in_none_of_the_segments() -> None:
    body = zendesk_body(current="")
    (taken,) = adapter("zendesk").parse(request(zendesk_headers(body), body)).events
    assert taken.change.mirror == ()


def test_other_zendesk_events_and_users_without_an_external_id_are_skipped() -> None:
    zendesk = adapter("zendesk")
    other = zendesk_body(event_type="zen:event-type:user.name_changed")
    parsed = zendesk.parse(request(zendesk_headers(other), other))
    assert [(s.reason, s.key) for s in parsed.skipped] == [("filtered", None)]
    assert parsed.events == []
    for missing in ("", None):
        body = zendesk_body(external_id=missing)
        parsed = zendesk.parse(request(zendesk_headers(body), body))
        assert [s.reason for s in parsed.skipped] == ["no_contact"]
        assert parsed.skipped[0].key == "event:2b24ef10-19d4-4740-93cf-8f98ec4776c0"
    body = zendesk_body(current=None)
    assert [s.reason for s in zendesk.parse(request(zendesk_headers(body), body)).skipped] == [
        "no_change"
    ]
    assert JsonAdapter.skip_reasons == {"filtered", "no_contact", "no_change"}


def test_an_invalid_contact_id_is_dead_lettered_not_refused() -> None:
    body = zendesk_body(external_id="jdoe@example.com")
    parsed = adapter("zendesk").parse(request(zendesk_headers(body), body))
    (dead,) = parsed.dead
    assert dead.reason is FailureReason.INVALID_CONTACT_ID
    assert dead.change == MembershipChange(
        "jdoe@example.com", mirror=("VIP", "Spanish"), occurred_at=dead.change.occurred_at
    )
    assert dead.message.startswith("body.events[0].contactId: must be 1-128 characters")
    assert "detail.external_id" in dead.message
    assert dead.key == "event:2b24ef10-19d4-4740-93cf-8f98ec4776c0"
    assert parsed.events == [] and parsed.skipped == []


def test_an_invalid_contact_id_that_clears_is_kept_as_a_removal_from_every_segment() -> None:
    # A dead letter is kept per (contact, segment): one naming no segment would keep nothing.
    body = zendesk_body(external_id="jdoe@example.com", current="")
    (dead,) = adapter("zendesk").parse(request(zendesk_headers(body), body)).dead
    assert dead.reason is FailureReason.INVALID_CONTACT_ID
    assert dead.change == MembershipChange(
        "jdoe@example.com", remove=("*",), occurred_at=dead.change.occurred_at
    )
    assert dead.change.occurred_at is not None


def test_a_huge_contact_id_is_dead_lettered_shortened_with_its_true_length() -> None:
    body = zendesk_body(external_id="x" * 5000)
    (dead,) = adapter("zendesk").parse(request(zendesk_headers(body), body)).dead
    assert len(dead.change.contact_id) == 1024
    assert dead.change.contact_id.startswith("x" * 900)
    assert dead.change.contact_id.endswith("…[shortened from 5000 characters]")
    assert "got 5000 characters" in dead.message
    assert len(dead.message) < 400


def test_a_contact_id_nested_too_deeply_to_write_out_is_still_dead_lettered() -> None:
    # orjson reads deeper documents than it writes: the id as sent cannot be shown whole.
    nested = b"[" * 300 + b"]" * 300
    body = b'{"changes": [{"contact": {"cxone_id": ' + nested + b'}, "segments_added": ["s1"]}]}'
    (dead,) = adapter("crm").parse(request({}, body)).dead
    assert dead.change.contact_id == "(an array nested too deeply to show)"
    assert dead.change.add == ("s1",)


def test_an_invalid_contact_id_with_a_bad_segment_refuses_the_delivery() -> None:
    body = zendesk_body(external_id="jdoe@example.com", current="VIP;not a segment")
    error = refused_parse(adapter("zendesk"), body, zendesk_headers(body))
    assert (error.status, error.field) == (422, "body.events[0].set[1]")


@pytest.mark.parametrize(
    ("offset_s", "ok"), [(0, True), (300, True), (-300, True), (301, False), (-301, False)]
)
def test_the_zendesk_timestamp_must_be_within_tolerance(offset_s: int, ok: bool) -> None:
    body = zendesk_body()
    delivery = request(zendesk_headers(body), body, received_at=NOW + offset_s)
    zendesk = adapter("zendesk")
    if ok:
        assert zendesk.authenticate(delivery) is None
        return
    error = rejected(zendesk, delivery, ZENDESK_SECRET)
    assert (error.status, error.field) == (401, "X-Zendesk-Webhook-Signature-Timestamp")
    assert "timestamp outside tolerance" in error.message
    assert "allowed ±300 s" in error.message


@pytest.mark.parametrize(
    ("change", "field", "expected"),
    [
        (
            {"X-Zendesk-Webhook-Signature-Timestamp": None},
            "X-Zendesk-Webhook-Signature-Timestamp",
            "missing",
        ),
        (
            {"X-Zendesk-Webhook-Signature-Timestamp": "1748858405"},
            "X-Zendesk-Webhook-Signature-Timestamp",
            "must be an RFC 3339 time",
        ),
        (
            {"X-Zendesk-Webhook-Signature-Timestamp": "2025-06-02T10:00:05"},
            "X-Zendesk-Webhook-Signature-Timestamp",
            "must be an RFC 3339 time",
        ),
        ({"X-Zendesk-Webhook-Signature": None}, "X-Zendesk-Webhook-Signature", "missing"),
        (
            {"X-Zendesk-Webhook-Signature": "not base64!"},
            "X-Zendesk-Webhook-Signature",
            "not an HMAC-SHA256 signature (base64 of 32 bytes expected)",
        ),
    ],
)
def test_malformed_zendesk_headers_are_401(
    change: dict[str, str | None], field: str, expected: str
) -> None:
    body = zendesk_body()
    headers: dict[str, str] = zendesk_headers(body)
    for name, value in change.items():
        del headers[name]
        if value is not None:
            headers[name] = value
    error = rejected(adapter("zendesk"), request(headers, body), ZENDESK_SECRET)
    assert (error.status, error.field) == (401, field)
    assert error.message.startswith(f"header {field}: {expected}")


def test_a_zendesk_signature_with_another_secret_or_over_another_timestamp_is_401() -> None:
    body = zendesk_body()
    zendesk = adapter("zendesk")
    wrong = request(zendesk_headers(body, secret="another secret"), body)
    assert rejected(zendesk, wrong, ZENDESK_SECRET).field == "X-Zendesk-Webhook-Signature"
    moved = zendesk_headers(body)
    moved["X-Zendesk-Webhook-Signature-Timestamp"] = "2025-06-02T10:00:06Z"
    error = rejected(zendesk, request(moved, body), ZENDESK_SECRET)
    assert error.field == "X-Zendesk-Webhook-Signature"
    # Body then timestamp is not what Zendesk signs.
    swapped = hmac.new(ZENDESK_SECRET.encode(), body + NOW_ISO.encode(), hashlib.sha256).digest()
    headers = zendesk_headers(body)
    headers["X-Zendesk-Webhook-Signature"] = base64.b64encode(swapped).decode()
    assert rejected(zendesk, request(headers, body), ZENDESK_SECRET).status == 401


# ---- other signing schemes ----------------------------------------------------------------------


def test_timestamp_dot_body_with_unix_seconds_and_a_base64_secret() -> None:
    key = b"\x00\x01binary key\xff"
    source = settings(
        "crm",
        secret=base64.b64encode(key).decode(),
        secret_encoding="base64",
        signature_header="X-Signature",
        signature_prefix="v1=",
        signed_content="timestamp.body",
        timestamp_header="X-Timestamp",
        timestamp_format="unix",
        delivery_id_header="",
    )
    stamp = str(int(NOW))
    signature = hmac.new(key, f"{stamp}.".encode() + CRM_BODY, hashlib.sha256).hexdigest()
    headers = {"X-Signature": f"v1={signature}", "X-Timestamp": stamp}
    body_key = "sha256:" + hashlib.sha256(CRM_BODY).hexdigest()
    assert JsonAdapter(source).authenticate(request(headers, CRM_BODY)) == body_key
    plain = hmac.new(key, stamp.encode() + CRM_BODY, hashlib.sha256).hexdigest()
    headers["X-Signature"] = f"v1={plain}"
    with pytest.raises(WebhookRejected) as caught:
        JsonAdapter(source).authenticate(request(headers, CRM_BODY))
    assert caught.value.field == "X-Signature"


def test_unix_ms_timestamps() -> None:
    source = settings(
        "crm",
        signed_content="timestamp+body",
        timestamp_header="X-Timestamp",
        timestamp_format="unix_ms",
    )
    stamp = str(int(NOW * 1000) - 2000)
    signature = hmac.new(GITHUB_SECRET.encode(), stamp.encode() + CRM_BODY, hashlib.sha256)
    headers = github_headers(CRM_BODY, **{"X-Hub-Signature-256": "sha256=" + signature.hexdigest()})
    headers["X-Timestamp"] = stamp
    assert JsonAdapter(source).authenticate(request(headers, CRM_BODY))
    headers["X-Timestamp"] = str(int(NOW))  # seconds where milliseconds belong: 1970
    with pytest.raises(WebhookRejected) as caught:
        JsonAdapter(source).authenticate(request(headers, CRM_BODY))
    assert caught.value.field == "X-Timestamp"


def test_without_any_key_the_body_hash_is_the_delivery_key() -> None:
    crm = adapter("crm", delivery_id_header="")
    first = crm.authenticate(request(github_headers(CRM_BODY), CRM_BODY))
    again = crm.authenticate(request(github_headers(CRM_BODY), CRM_BODY, received_at=NOW + 60))
    assert first == again == "sha256:" + hashlib.sha256(CRM_BODY).hexdigest()
    other = CRM_BODY.replace(b"VIP", b"VIQ")
    assert crm.authenticate(request(github_headers(other), other)) != first


# ---- mapping ------------------------------------------------------------------------------------


def refused_parse(
    crm: JsonAdapter, body: bytes, headers: dict[str, str] | None = None
) -> WebhookRejected:
    with pytest.raises(WebhookRejected) as caught:
        crm.parse(request(headers or {}, body))
    return caught.value


def crm_body(*changes: dict[str, Any]) -> bytes:
    return orjson.dumps({"event": "contact.segments_changed", "changes": list(changes)})


def change(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "contact": {"cxone_id": "c1"},
        "segments_added": ["s1"],
        "changed_at": "2025-06-02T09:59:00Z",
    }
    base.update(fields)
    return base


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        (
            {"segments_added": 7},
            "body.events[0].add",
            "body.events[0].add: the add expression 'segments_added' gave a number; it must "
            "give an array of segment ids or a ';'-separated string",
        ),
        (
            {"segments_added": {"id": "s1"}},
            "body.events[0].add",
            "body.events[0].add: the add expression 'segments_added' gave an object",
        ),
        (
            {"segments_added": ["s1", True]},
            "body.events[0].add[1]",
            "body.events[0].add[1]: must be a string or an integer, not a boolean "
            "(from add = 'segments_added')",
        ),
        (
            {"segments_removed": ["s1"]},
            "body.events[0].remove[0]",
            "body.events[0].remove[0]: segment 's1' is also in add",
        ),
        (
            {"changed_at": 1748858340},
            "body.events[0].occurredAt",
            "body.events[0].occurredAt: 1748858340 ms is before 2000-01-01T00:00:00Z (epoch "
            "seconds? send milliseconds) (from occurred_at = 'changed_at')",
        ),
        (
            {"changed_at": "2025-06-02 09:59"},
            "body.events[0].occurredAt",
            "body.events[0].occurredAt: must be an RFC 3339 time",
        ),
        (
            {"segments_added": [f"s{n}" for n in range(101)]},
            "body.events[0].add",
            "body.events[0].add: 101 segment ids; at most 100 per event",
        ),
    ],
)
def test_values_segmapd_cannot_take_refuse_the_delivery_naming_the_field(
    fields: dict[str, Any], field: str, message: str
) -> None:
    body = crm_body(change(), change(**fields))
    error = refused_parse(adapter("crm"), body)
    index_one = field.replace("events[0]", "events[1]")
    assert (error.status, error.field) == (422, index_one)
    assert error.message.startswith(message.replace("events[0]", "events[1]"))


def test_an_invalid_contact_id_of_the_wrong_type_is_dead_lettered_as_sent() -> None:
    parsed = adapter("crm").parse(request({}, crm_body(change(contact={"cxone_id": 1.5}))))
    (dead,) = parsed.dead
    assert dead.change.contact_id == "1.5"
    assert dead.change.add == ("s1",)
    assert "must be a string or an integer" in dead.message


def test_events_from_an_object_a_list_and_the_cap() -> None:
    one = adapter("crm", events="@", contact_id="contact.cxone_id")
    (taken,) = one.parse(request({}, orjson.dumps(change()))).events
    assert taken.change.contact_id == "c1"
    crm = adapter("crm")
    assert crm.parse(request({}, crm_body())).events == []
    many = crm_body(*[change(contact={"cxone_id": f"c{n}"}) for n in range(MAX_EVENTS)])
    assert len(crm.parse(request({}, many)).events) == MAX_EVENTS
    too_many = crm_body(*[change() for _ in range(MAX_EVENTS + 1)])
    error = refused_parse(crm, too_many)
    assert (error.status, error.field) == (422, "body")
    assert error.message == f"body: {MAX_EVENTS + 1} events; at most {MAX_EVENTS} per delivery"


@pytest.mark.parametrize("document", [{"other": []}, {"changes": "x"}, {"changes": 3}])
def test_an_events_expression_that_finds_no_array_is_422(document: Any) -> None:
    error = refused_parse(adapter("crm"), orjson.dumps(document))
    assert (error.status, error.field) == (422, "body")
    assert "the events expression 'changes' gave" in error.message


@pytest.mark.parametrize(
    ("body", "start"),
    [
        (b"", "body: not valid JSON"),
        (b"{'changes': []}", "body: not valid JSON"),
        (b'{"changes": [], "changes": [1]}', "body: key 'changes' appears more than once"),
    ],
)
def test_bodies_that_are_not_usable_json_are_400(body: bytes, start: str) -> None:
    error = refused_parse(adapter("crm"), body)
    assert error.status == 400
    assert error.message.startswith(start)


def test_a_string_list_is_split_on_the_separator_and_trimmed() -> None:
    crm = adapter("crm", list_separator=",")
    body = crm_body(change(segments_added=" VIP , Spanish,,", segments_removed="Gold"))
    (taken,) = crm.parse(request({}, body)).events
    assert (taken.change.add, taken.change.remove) == (("VIP", "Spanish"), ("Gold",))


def test_empty_adds_and_removes_change_nothing_and_are_skipped() -> None:
    body = crm_body(change(segments_added="", segments_removed=[]))
    parsed = adapter("crm").parse(request({}, body))
    assert [s.reason for s in parsed.skipped] == ["no_change"]


def test_an_expression_on_a_deeply_nested_body_is_422_not_a_crash() -> None:
    crm = adapter("crm", events="[@]", contact_id="to_string(@)")
    deep = b'{"a":' * 1000 + b"1" + b"}" * 1000
    error = refused_parse(crm, deep)
    assert (error.status, error.field) == (422, "body.events[0]")


def test_a_runtime_expression_error_is_422_naming_the_expression() -> None:
    crm = adapter("crm", occurred_at="abs(changed_at)")
    error = refused_parse(crm, crm_body(change()))
    assert (error.status, error.field) == (422, "body.events[0]")
    assert "the occurred_at expression 'abs(changed_at)' failed on this body" in error.message


def test_a_runtime_expression_error_quotes_a_huge_value_only_in_part() -> None:
    crm = adapter("crm", occurred_at="abs(changed_at)")
    error = refused_parse(crm, crm_body(change(changed_at="x" * 100_000)))
    assert (error.status, error.field) == (422, "body.events[0]")
    assert "In function abs(), invalid type for value: xxx" in error.message
    assert 'received: "string"' in error.message
    assert "characters left out]" in error.message
    assert len(error.message) < 500


def test_dedup_keys_are_per_event_stable_and_unique_within_a_delivery() -> None:
    crm = adapter("crm", dedup_key="event_id", delivery_id_header="")
    body = crm_body(change(event_id="e1"), change(event_id=2, contact={"cxone_id": "c2"}))
    assert crm.authenticate(request(github_headers(body), body)) is None
    keys = [e.key for e in crm.parse(request({}, body)).events]
    assert keys == ["event:e1", "event:2"]
    assert [e.key for e in crm.parse(request({}, body)).events] == keys
    twice = crm_body(change(event_id="e1"), change(event_id="e1"))
    error = refused_parse(crm, twice)
    assert (error.status, error.field) == (422, "body.events[1].dedup_key")
    assert "same dedup key as body.events[0]" in error.message
    missing = refused_parse(crm, crm_body(change()))
    assert (missing.status, missing.field) == (422, "body.events[0].dedup_key")
    assert "gave null" in missing.message


# ---- settings -----------------------------------------------------------------------------------


def config_error(**changes: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        settings("crm", **changes)
    return str(caught.value)


@pytest.mark.parametrize(
    ("key", "expression", "message"),
    [
        ("contact_id", "contact.[", "contact_id: not a valid JMESPath expression"),
        ("add", "segments[?", "add: not a valid JMESPath expression"),
        ("events", "", "events: required"),
        ("occurred_at", "to_epoch(changed_at)", "occurred_at: JMESPath has no function to_epoch()"),
        ("dedup_key", "join(',')", "dedup_key: join() takes 2 argument(s), 1 given"),
        ("when", "not_null()", "when: not_null() takes at least 1 argument(s), 0 given"),
    ],
)
def test_bad_expressions_are_refused_naming_the_key(
    key: str, expression: str, message: str
) -> None:
    assert message in config_error(**{key: expression})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"signed_content": "timestamp+body"}, "timestamp_header: required when signed_content"),
        ({"timestamp_header": "X-Timestamp"}, "timestamp_header: only used when the timestamp"),
        ({"add": "", "remove": ""}, "add, remove or set: at least one is required"),
        ({"set": "segments"}, "set: the complete list of segments cannot be combined"),
        ({"signature_header": "X Sig"}, "signature_header: 'X Sig' is not an HTTP header name"),
        ({"signature_header": ""}, "signature_header: required"),
        ({"signature_prefix": "sha256= "}, "signature_prefix: must be ASCII without spaces"),
        ({"secret_encoding": "hex"}, "secret: not valid hex (secret_encoding = 'hex')"),
        ({"signature_encoding": "base32"}, "signature_encoding"),
        ({"tolerance_s": 0}, "tolerance_s"),
        ({"list_separator": ""}, "list_separator"),
    ],
)
def test_inconsistent_settings_are_refused(changes: dict[str, Any], message: str) -> None:
    text = config_error(**changes)
    assert message in text
    assert GITHUB_SECRET not in text


def test_unknown_and_missing_keys_are_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        settings("crm", segments_property="x")
    assert [e["type"] for e in caught.value.errors()] == ["extra_forbidden"]
    table = {k: v for k, v in TABLES["crm"].items() if k != "contact_id"}
    with pytest.raises(ValidationError) as missing:
        JsonSource.model_validate(table)
    assert [(e["loc"], e["type"]) for e in missing.value.errors()] == [(("contact_id",), "missing")]


def test_an_adapter_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="secret: required"):
        adapter("crm", secret="")
    assert JsonSource.required_keys == ("secret",)


def test_reprs_hide_the_secret() -> None:
    source = settings("zendesk")
    assert ZENDESK_SECRET not in repr(source)
    assert ZENDESK_SECRET not in str(source)
    assert ZENDESK_SECRET not in repr(JsonAdapter(source))
    assert "X-Zendesk-Webhook-Signature" in repr(JsonAdapter(source))
