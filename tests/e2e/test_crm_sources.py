"""HubSpot, Salesforce and generic JSON sources through the real daemon, journal and emulator.

Payloads follow each vendor's documented format, and signatures are computed here as each
vendor documents them (hmac and hashlib directly, never segmapd's own code).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import aiohttp
import orjson

from tests.e2e.conftest import Daemon, StartDaemon
from tests.support.emulator import EmulatorControl

HUBSPOT_SECRET = "3c5f0a9e-1b7d-4e2a-9c61-0d8e7f6a5b43"
# The URL HubSpot calls (the proxy's); segmapd itself listens on loopback behind it.
HUBSPOT_URL = "https://segmapd.example.com/v1/webhooks/hubspot"
ORG_ID = "00D5e000000KQ2eEAG"  # the 18-character form; messages carry it as 18 characters too
OTHER_ORG = "00D000000000001AAA"
GITHUB_SECRET = "It's a Secret to Everybody"
ZENDESK_SECRET = "dGhpc19zZWNyZXRfaXNfZm9yX3Rlc3Rpbmdfb25seQ=="

SOURCES: dict[str, dict[str, Any]] = {
    "sources.hubspot": {
        "kind": "hubspot",
        "client_secret": HUBSPOT_SECRET,
        "public_url": HUBSPOT_URL,
        "segments_property": "cxone_segments",
    },
    "sources.salesforce": {
        "kind": "salesforce",
        "organization_id": ORG_ID,
        "segments_field": "CXone_Segments__c",
        "occurred_at_field": "LastModifiedDate",
    },
    "sources.github": {
        "kind": "json",
        "secret": GITHUB_SECRET,
        "signature_header": "X-Hub-Signature-256",
        "signature_prefix": "sha256=",
        "signature_encoding": "hex",
        "delivery_id_header": "X-GitHub-Delivery",
        "events": "changes",
        "contact_id": "contact.cxone_id",
        "add": "segments_added",
        "remove": "segments_removed",
        "occurred_at": "changed_at",
    },
    "sources.zendesk": {
        "kind": "json",
        "secret": ZENDESK_SECRET,
        "signature_header": "X-Zendesk-Webhook-Signature",
        "signature_encoding": "base64",
        "signed_content": "timestamp+body",
        "timestamp_header": "X-Zendesk-Webhook-Signature-Timestamp",
        "timestamp_format": "rfc3339",
        "when": "type == 'zen:event-type:user.custom_field_changed'",
        "contact_id": "detail.external_id",
        "set": "event.current",
        "occurred_at": "time",
        "dedup_key": "id",
    },
}

_ids = itertools.count(1)


async def start(start_daemon: StartDaemon, **overrides: dict[str, Any]) -> Daemon:
    sections = {name: dict(values) for name, values in SOURCES.items()}
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return await start_daemon(**sections)


def states(body: Any) -> dict[str, str]:
    return {s["segmentId"]: s["state"] for s in body["segments"]}


async def wait_terminal(
    http: aiohttp.ClientSession, daemon: Daemon, contacts: list[str], timeout_s: float = 30
) -> dict[str, dict[str, str]]:
    found = {}
    for contact in contacts:
        view = await daemon.wait_states(http, contact, {"active", "removed"}, timeout_s)
        found[contact] = {segment: s["state"] for segment, s in view.items()}
    return found


async def wait_segments(
    http: aiohttp.ClientSession,
    daemon: Daemon,
    contact: str,
    want: dict[str, str],
    timeout_s: float = 30,
) -> dict[str, str]:
    """Poll the contact until the named segments are in the wanted states; all its states."""
    deadline = time.monotonic() + timeout_s
    found: dict[str, str] = {}
    while time.monotonic() < deadline:
        status, body = await daemon.contact(http, contact)
        found = states(body) if status == 200 else {}
        if all(found.get(segment) == state for segment, state in want.items()):
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"{contact} did not reach {want}: {found}")


async def metric(http: aiohttp.ClientSession, daemon: Daemon, name: str, **labels: str) -> float:
    async with http.get(f"{daemon.url}/metrics") as response:
        text = await response.text()
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- HubSpot -------------------------------------------------------------------------------


def hubspot_event(
    contact: int, value: str | None, occurred_ms: int, *, event_id: int | None = None, **extra: Any
) -> dict[str, Any]:
    """One contact.propertyChange as HubSpot's webhooks documentation shows it."""
    event: dict[str, Any] = {
        "eventId": event_id if event_id is not None else next(_ids),
        "subscriptionId": 4512,
        "portalId": 62515,
        "appId": 1160452,
        "occurredAt": occurred_ms,
        "subscriptionType": "contact.propertyChange",
        "attemptNumber": 0,
        "objectId": contact,
        "propertyName": "cxone_segments",
        "propertyValue": value,
        "changeSource": "CRM_UI",
        "sourceId": "userId:1234567",
    }
    event.update(extra)
    return event


def hubspot_headers(
    body: bytes,
    *,
    secret: str = HUBSPOT_SECRET,
    url: str = HUBSPOT_URL,
    timestamp_ms: int | None = None,
) -> dict[str, str]:
    """v3: base64 HMAC-SHA256 of method + URI + body + timestamp, keyed with the secret."""
    stamp = str(timestamp_ms if timestamp_ms is not None else int(time.time() * 1000))
    signed = b"POST" + url.encode() + body + stamp.encode()
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return {
        "Content-Type": "application/json",
        "X-HubSpot-Signature-v3": base64.b64encode(digest).decode(),
        "X-HubSpot-Request-Timestamp": stamp,
    }


async def post_hubspot(
    http: aiohttp.ClientSession, daemon: Daemon, events: list[dict[str, Any]], **signing: Any
) -> tuple[int, Any]:
    body = orjson.dumps(events)
    async with http.post(
        f"{daemon.url}/v1/webhooks/hubspot", data=body, headers=hubspot_headers(body, **signing)
    ) as response:
        return response.status, await response.json(content_type=None)


async def test_a_hubspot_batch_becomes_memberships_and_its_redelivery_adds_no_work(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    now_ms = int(time.time() * 1000)
    contacts = [710000000001, 710000000002, 710000000003]
    batch = [hubspot_event(c, "VIP;Spanish", now_ms - 2000) for c in contacts]
    # Events segmapd does not act on ride in the same batch and are answered as taken.
    batch.append(hubspot_event(contacts[0], "x", now_ms, propertyName="firstname"))
    batch.append({**hubspot_event(contacts[0], None, now_ms), "subscriptionType": "deal.creation"})
    status, answer = await post_hubspot(http, daemon, batch)
    assert (status, answer) == (200, {"accepted": 6, "duplicates": 0, "stale": 0})
    found = await wait_terminal(http, daemon, [str(c) for c in contacts])
    assert all(view == {"Spanish": "active", "VIP": "active"} for view in found.values())
    written = (await emulator.counters())["bulk_ids"]["ids"]
    assert written == 6

    # HubSpot retries with attemptNumber incremented and a new signature: no new work.
    again = [{**event, "attemptNumber": 1} for event in batch]
    status, answer = await post_hubspot(http, daemon, again)
    assert (status, answer) == (200, {"accepted": 0, "duplicates": 0, "stale": 0})
    await asyncio.sleep(0.5)
    assert (await emulator.counters())["bulk_ids"]["ids"] == written
    labels = {"source": "hubspot", "kind": "hubspot"}
    assert await metric(http, daemon, "segmapd_events_redelivered_total", **labels) == 3
    assert await metric(http, daemon, "segmapd_events_accepted_total", **labels) == 3
    assert (
        await metric(
            http, daemon, "segmapd_events_skipped_total", **labels, reason="other_property"
        )
        == 2
    )
    assert (
        await metric(http, daemon, "segmapd_events_skipped_total", **labels, reason="other_object")
        == 2
    )


async def test_hubspot_events_are_ordered_by_occurred_at_and_a_deletion_clears_the_contact(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    now_ms = int(time.time() * 1000)
    contact = 710000000010
    # The newer change arrives first; the older one, delivered late, must not undo it.
    status, _ = await post_hubspot(http, daemon, [hubspot_event(contact, "VIP", now_ms - 1000)])
    assert status == 200
    await wait_terminal(http, daemon, [str(contact)])
    status, answer = await post_hubspot(
        http, daemon, [hubspot_event(contact, "Gold", now_ms - 5000)]
    )
    assert (status, answer["stale"]) == (200, 2)  # Gold's add and VIP's removal are older
    _, body = await daemon.contact(http, str(contact))
    assert states(body) == {"VIP": "active"}
    # A newer change of the property: Gold in, VIP out.
    await post_hubspot(http, daemon, [hubspot_event(contact, "Gold", now_ms - 500)])
    assert await wait_terminal(http, daemon, [str(contact)]) == {
        str(contact): {"Gold": "active", "VIP": "removed"}
    }
    deletion = {**hubspot_event(contact, None, now_ms), "subscriptionType": "contact.deletion"}
    del deletion["propertyName"], deletion["propertyValue"]
    status, _ = await post_hubspot(http, daemon, [deletion])
    assert status == 200
    assert await wait_terminal(http, daemon, [str(contact)]) == {
        str(contact): {"Gold": "removed", "VIP": "removed"}
    }
    assert (await emulator.counters())["applied_twice"] == 0


async def test_a_hubspot_value_that_is_no_segment_id_leaves_the_valid_memberships_in_place(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    now_ms = int(time.time() * 1000)
    contact = 710000000500
    status, _ = await post_hubspot(
        http, daemon, [hubspot_event(contact, "VIP;Gold", now_ms - 3000)]
    )
    assert status == 200
    await wait_segments(http, daemon, str(contact), {"VIP": "active", "Gold": "active"})
    # The property now lists VIP and a value no CXone segment can have: the event is taken as
    # "VIP only" (Gold leaves, VIP stays active), and only "bad value" can never succeed.
    status, answer = await post_hubspot(
        http, daemon, [hubspot_event(contact, "VIP;bad value", now_ms - 1000)]
    )
    assert (status, answer) == (200, {"accepted": 2, "duplicates": 1, "stale": 0})
    found = await wait_segments(http, daemon, str(contact), {"VIP": "active", "Gold": "removed"})
    # Whatever segmapd keeps of "bad value" (a dead letter), it is never a membership.
    assert found.get("bad value", "failed") == "failed"
    # VIP was added once and never undone; Gold added, then removed.
    counters = await emulator.counters()
    assert (counters["bulk_ids"]["ids"], counters["bulk_remove_ids"]["ids"]) == (2, 1)
    assert counters["applied_twice"] == 0


async def test_a_query_string_is_signed_as_sent_and_one_contact_twice_in_a_batch_ends_as_the_last(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    now_ms = int(time.time() * 1000)
    contact = 710000000020
    # HubSpot changed the value twice within one batch: the second, newer, value wins.
    batch = [
        hubspot_event(contact, "VIP;Gold", now_ms - 2000),
        hubspot_event(contact, "VIP", now_ms - 1000),
    ]
    body = orjson.dumps(batch)
    query = "portal=62515&tag=a%20b%26c"  # encodings HubSpot leaves as they are
    async with http.post(
        f"{daemon.url}/v1/webhooks/hubspot?{query}",
        data=body,
        headers=hubspot_headers(body, url=f"{HUBSPOT_URL}?{query}"),
    ) as response:
        assert response.status == 200, await response.text()
    found = await wait_terminal(http, daemon, [str(contact)])
    assert found[str(contact)]["VIP"] == "active"
    assert found[str(contact)].get("Gold", "removed") == "removed"


async def test_one_hubspot_batch_sent_on_two_connections_at_once_is_one_unit_of_work(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    now_ms = int(time.time() * 1000)
    contacts = [720000000000 + i for i in range(50)]
    batch = [hubspot_event(c, "VIP", now_ms - 1000) for c in contacts]
    first, second = await asyncio.gather(
        post_hubspot(http, daemon, batch),
        post_hubspot(http, daemon, [{**e, "attemptNumber": 1} for e in batch]),
    )
    assert first[0] == second[0] == 200
    # Between them, each event was taken once.
    assert first[1]["accepted"] + second[1]["accepted"] == 50
    await wait_terminal(http, daemon, [str(c) for c in contacts])
    counters = await emulator.counters()
    assert counters["bulk_ids"]["ids"] == 50
    assert counters["applied_twice"] == 0
    labels = {"source": "hubspot", "kind": "hubspot"}
    assert await metric(http, daemon, "segmapd_events_redelivered_total", **labels) == 50


async def test_every_hubspot_refusal_is_a_401_or_400_and_loses_nothing_accepted(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    now_ms = int(time.time() * 1000)
    kept = 730000000001
    status, _ = await post_hubspot(http, daemon, [hubspot_event(kept, "VIP", now_ms - 100)])
    assert status == 200
    refused_contact = 730000000002
    batch = [hubspot_event(refused_contact, "VIP", now_ms)]
    cases: dict[str, dict[str, Any]] = {
        "wrong secret": {"secret": "00000000-0000-0000-0000-000000000000"},
        # Signed for the loopback URL segmapd sees, not the public one HubSpot calls.
        "wrong URL": {"url": f"{daemon.url}/v1/webhooks/hubspot"},
        "stale timestamp": {"timestamp_ms": now_ms - 301_000},
        "future timestamp": {"timestamp_ms": now_ms + 301_000},
    }
    for case, signing in cases.items():
        status, body = await post_hubspot(http, daemon, batch, **signing)
        assert status == 401, case
        assert body["error"] == "Unauthorized" and body["field"].startswith("X-HubSpot"), case
        assert HUBSPOT_SECRET not in str(body)
    body_bytes = orjson.dumps({"objectId": refused_contact})  # an object, not HubSpot's array
    async with http.post(
        f"{daemon.url}/v1/webhooks/hubspot", data=body_bytes, headers=hubspot_headers(body_bytes)
    ) as response:
        assert response.status == 400
        assert (await response.json())["field"] == "body"
    bad_type = [{**batch[0], "objectId": True}]
    status, body = await post_hubspot(http, daemon, bad_type)
    assert status in (400, 422) and body["field"] == "body[0].objectId"
    # Nothing refused was taken; what was accepted before still ends as asked.
    assert (await daemon.contact(http, str(refused_contact)))[0] == 404
    assert await wait_terminal(http, daemon, [str(kept)]) == {str(kept): {"VIP": "active"}}


async def test_above_the_high_water_mark_each_kind_answers_busy_in_its_own_protocol(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    # Slow writes keep the first batch pending while the second arrives.
    await emulator.configure({"faults": {"bulk": {"latency_ms": 4000}}})
    daemon = await start(start_daemon, server={"high_water": 60})
    now_ms = int(time.time() * 1000)
    first = [hubspot_event(740000000000 + i, "VIP", now_ms) for i in range(50)]
    assert (await post_hubspot(http, daemon, first))[0] == 200
    second = [hubspot_event(741000000000 + i, "VIP", now_ms) for i in range(50)]
    body = orjson.dumps(second)
    async with http.post(
        f"{daemon.url}/v1/webhooks/hubspot", data=body, headers=hubspot_headers(body)
    ) as response:
        assert response.status == 503
        assert int(response.headers["Retry-After"]) >= 1
        assert "high_water" in (await response.json())["message"]
    # 20 more assignments than the 50 pending would cross the mark of 60.
    message = salesforce_message(
        [
            (f"04l0000000000{i:02d}AAA", contact_fields(f"7420000000{i:02d}", "VIP"))
            for i in range(20)
        ]
    )
    async with http.post(
        f"{daemon.url}/v1/webhooks/salesforce", data=message, headers=SOAP_HEADERS
    ) as response:
        assert response.status == 503
        assert int(response.headers["Retry-After"]) >= 1
        fault = ElementTree.fromstring(await response.read()).find(f".//{{{SOAP_NS}}}Fault")
        assert fault is not None and fault.findtext("faultcode") == "soapenv:Server"
        assert "high_water" in (fault.findtext("faultstring") or "")
    await emulator.configure({"faults": {"bulk": {"latency_ms": 0}}})
    # What was taken before the refusals still ends active.
    await wait_terminal(http, daemon, [str(740000000000 + i) for i in range(50)], 60)


# ---- Salesforce ----------------------------------------------------------------------------

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
OUTBOUND_NS = "http://soap.sforce.com/2005/09/outbound"
SOAP_HEADERS = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}


Fields = dict[str, str | None]


def contact_fields(contact_id: str, segments: str | None = None, **more: str | None) -> Fields:
    """A Contact sObject's fields: Id, the segments picklist (None: nil) and any others."""
    return {"Id": contact_id, "CXone_Segments__c": segments, **more}


def salesforce_message(
    notifications: list[tuple[str, dict[str, str | None]]], *, org: str = ORG_ID
) -> bytes:
    """An Outbound Message as Salesforce's outbound messaging WSDL describes it."""
    parts = []
    for notification_id, fields in notifications:
        values = "".join(
            f'<sf:{name} xsi:nil="true"/>' if value is None else f"<sf:{name}>{value}</sf:{name}>"
            for name, value in fields.items()
        )
        parts.append(
            f"<Notification><Id>{notification_id}</Id>"
            f'<sObject xsi:type="sf:Contact" '
            f'xmlns:sf="urn:sobject.enterprise.soap.sforce.com">{values}</sObject>'
            f"</Notification>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soapenv:Envelope xmlns:soapenv="{SOAP_NS}" '
        'xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        "<soapenv:Body>"
        f'<notifications xmlns="{OUTBOUND_NS}">'
        f"<OrganizationId>{org}</OrganizationId>"
        "<ActionId>04k5e000000CbJeAAK</ActionId>"
        '<SessionId xsi:nil="true"/>'
        "<EnterpriseUrl>https://example.my.salesforce.com/services/Soap/c/59.0/00D5e000000KQ2e"
        "</EnterpriseUrl>"
        "<PartnerUrl>https://example.my.salesforce.com/services/Soap/u/59.0/00D5e000000KQ2e"
        "</PartnerUrl>" + "".join(parts) + "</notifications></soapenv:Body></soapenv:Envelope>"
    ).encode()


async def post_salesforce(
    http: aiohttp.ClientSession, daemon: Daemon, message: bytes
) -> tuple[int, ElementTree.Element]:
    async with http.post(
        f"{daemon.url}/v1/webhooks/salesforce", data=message, headers=SOAP_HEADERS
    ) as response:
        assert response.headers["Content-Type"].startswith("text/xml")
        return response.status, ElementTree.fromstring(await response.read())


def acked(envelope: ElementTree.Element) -> bool:
    return envelope.findtext(f".//{{{OUTBOUND_NS}}}Ack") == "true"


def fault_text(envelope: ElementTree.Element) -> str:
    fault = envelope.find(f".//{{{SOAP_NS}}}Fault")
    assert fault is not None
    return fault.findtext("faultstring") or ""


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


async def test_salesforce_notifications_are_acked_after_journaling_and_redeliveries_add_nothing(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    now = time.time()
    message = salesforce_message(
        [
            ("04l5e00000A1bCdAAA", contact_fields("750000000001", "VIP;Spanish")),
            (
                "04l5e00000A1bCeAAA",
                contact_fields("750000000002", "VIP", LastModifiedDate=iso(now - 1)),
            ),
            # An id no CXone contact can have: acknowledged and dead-lettered, never faulted.
            ("04l5e00000A1bCfAAA", contact_fields("not a contact id", "VIP")),
        ]
    )
    status, envelope = await post_salesforce(http, daemon, message)
    assert status == 200 and acked(envelope)
    found = await wait_terminal(http, daemon, ["750000000001", "750000000002"])
    assert found == {
        "750000000001": {"Spanish": "active", "VIP": "active"},
        "750000000002": {"VIP": "active"},
    }
    _, listed = await daemon.dead_letters(http)
    dead = listed["deadLetters"]
    assert [(d["contactId"], d["reason"]) for d in dead] == [
        ("not a contact id", "invalid_contact_id")
    ]
    written = (await emulator.counters())["bulk_ids"]["ids"]
    # Salesforce resends the same notifications (same ids) until it sees the Ack.
    status, envelope = await post_salesforce(http, daemon, message)
    assert status == 200 and acked(envelope)
    await asyncio.sleep(0.5)
    assert (await emulator.counters())["bulk_ids"]["ids"] == written == 3
    labels = {"source": "salesforce", "kind": "salesforce"}
    assert await metric(http, daemon, "segmapd_events_redelivered_total", **labels) == 3
    assert await metric(http, daemon, "segmapd_events_dead_lettered_total", **labels) == 1

    # Clearing the picklist (nil, or left out as Salesforce does for empty fields) removes.
    cleared = salesforce_message(
        [
            ("04l5e00000A1bCgAAA", contact_fields("750000000001", None)),
            ("04l5e00000A1bChAAA", {"Id": "750000000002"}),
        ]
    )
    status, envelope = await post_salesforce(http, daemon, cleared)
    assert status == 200 and acked(envelope)
    found = await wait_terminal(http, daemon, ["750000000001", "750000000002"])
    assert found == {
        "750000000001": {"Spanish": "removed", "VIP": "removed"},
        "750000000002": {"VIP": "removed"},
    }


async def test_salesforce_changes_are_ordered_by_last_modified_date(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    now = time.time()
    contact = "750000000010"
    newer = salesforce_message(
        [
            (
                "04l5e00000A2bCdAAA",
                contact_fields(contact, "VIP", LastModifiedDate=iso(now - 1)),
            )
        ]
    )
    older = salesforce_message(
        [
            (
                "04l5e00000A2bCeAAA",
                contact_fields(contact, "Gold", LastModifiedDate=iso(now - 10)),
            )
        ]
    )
    assert (await post_salesforce(http, daemon, newer))[0] == 200
    await wait_terminal(http, daemon, [contact])
    assert (await post_salesforce(http, daemon, older))[0] == 200
    await asyncio.sleep(0.5)
    _, body = await daemon.contact(http, contact)
    assert states(body) == {"VIP": "active"}


async def test_every_salesforce_refusal_is_a_soap_fault_with_the_right_status(
    start_daemon: StartDaemon, http: aiohttp.ClientSession, tmp_path: Path
):
    daemon = await start(start_daemon)
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("TOP-SECRET-FILE-CONTENT")
    contact = "760000000001"
    good = salesforce_message([("04l5e00000A3bCdAAA", contact_fields(contact, "VIP"))])
    status, envelope = await post_salesforce(
        http,
        daemon,
        salesforce_message([("04l5e00000A3bCeAAA", {"Id": "760000000002"})], org=OTHER_ORG),
    )
    assert status == 403 and "another org" in fault_text(envelope)
    xxe = good.replace(
        b'<?xml version="1.0" encoding="UTF-8"?>',
        b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file://'
        + str(secret_file).encode()
        + b'">]>',
    ).replace(b">VIP<", b">&x;<")
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
        b"<lolz>&lol3;</lolz>"
    )
    for case, body in {
        "xxe": xxe,
        "entity bomb": bomb,
        "not xml": b"contactId=760000000003",
        "truncated": good[: len(good) // 2],
    }.items():
        async with http.post(
            f"{daemon.url}/v1/webhooks/salesforce", data=body, headers=SOAP_HEADERS
        ) as response:
            text = await response.text()
            assert response.status == 400, case
            assert "TOP-SECRET-FILE-CONTENT" not in text
            fault = ElementTree.fromstring(text).find(f".//{{{SOAP_NS}}}Fault")
            assert fault is not None and fault.findtext("faultcode") == "soapenv:Client", case
    assert (await daemon.contact(http, "760000000002"))[0] == 404
    assert (await daemon.contact(http, contact))[0] == 404
    # The genuine message still goes through afterwards.
    status, envelope = await post_salesforce(http, daemon, good)
    assert status == 200 and acked(envelope)
    assert await wait_terminal(http, daemon, [contact]) == {contact: {"VIP": "active"}}


async def test_a_salesforce_picklist_value_that_is_no_segment_id_keeps_the_valid_memberships(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    now = time.time()
    contact = "750000000020"
    first = salesforce_message(
        [
            (
                "04l5e00000A5bCdAAA",
                contact_fields(contact, "VIP;Gold", LastModifiedDate=iso(now - 3)),
            )
        ]
    )
    status, envelope = await post_salesforce(http, daemon, first)
    assert status == 200 and acked(envelope)
    await wait_segments(http, daemon, contact, {"VIP": "active", "Gold": "active"})
    changed = salesforce_message(
        [
            (
                "04l5e00000A5bCeAAA",
                contact_fields(contact, "VIP;Bad Value", LastModifiedDate=iso(now - 1)),
            )
        ]
    )
    status, envelope = await post_salesforce(http, daemon, changed)
    assert status == 200 and acked(envelope)
    found = await wait_segments(http, daemon, contact, {"VIP": "active", "Gold": "removed"})
    assert found.get("Bad Value", "failed") == "failed"


async def test_a_salesforce_notification_with_a_nil_id_and_no_picklist_is_kept_as_a_dead_letter(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    nil_id: Fields = {"Id": None, "CXone_Segments__c": None}  # xsi:nil="true" both
    message = salesforce_message([("04l5e00000A6bCdAAA", nil_id)])
    status, envelope = await post_salesforce(http, daemon, message)
    assert status == 200 and acked(envelope)
    # It named no segment; it is kept as the removal from every segment ("*") it asked for.
    status, listed = await daemon.dead_letters(http)
    assert status == 200
    letters = listed["deadLetters"]
    assert [(d["contactId"], d["segmentId"], d["intent"], d["reason"]) for d in letters] == [
        ("", "*", "remove", "invalid_contact_id")
    ]
    assert "04l5e00000A6bCdAAA" in letters[0]["message"]


async def test_a_huge_salesforce_contact_id_is_dead_lettered_shortened_with_its_length(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    huge = "7" * 900_000
    message = salesforce_message([("04l5e00000A7bCdAAA", contact_fields(huge, "VIP"))])
    status, envelope = await post_salesforce(http, daemon, message)
    assert status == 200 and acked(envelope)
    status, listed = await daemon.dead_letters(http)
    assert status == 200
    [letter] = listed["deadLetters"]
    assert letter["reason"] == "invalid_contact_id" and letter["segmentId"] == "VIP"
    assert len(letter["contactId"]) == 1024
    assert letter["contactId"].endswith("…[shortened from 900000 characters]")
    assert "got 900000 characters" in letter["message"]


async def test_salesforce_allowed_networks_refuse_other_addresses(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start(
        start_daemon, **{"sources.salesforce": {"allowed_networks": ["10.0.0.0/8"]}}
    )
    message = salesforce_message([("04l5e00000A4bCdAAA", contact_fields("770000000001", "VIP"))])
    status, envelope = await post_salesforce(http, daemon, message)
    assert status == 403 and "allowed_networks" in fault_text(envelope)
    assert (await daemon.contact(http, "770000000001"))[0] == 404


# ---- generic JSON ----------------------------------------------------------------------------


async def post_github_style(
    http: aiohttp.ClientSession, daemon: Daemon, document: Any, delivery: str, secret: str
) -> tuple[int, Any]:
    body = orjson.dumps(document)
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": f"sha256={signature}",
        "X-GitHub-Delivery": delivery,
    }
    async with http.post(f"{daemon.url}/v1/webhooks/github", data=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def test_a_github_style_json_sender_adds_and_removes_and_redeliveries_repeat_the_answer(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    contact = "780000000001"
    document = {
        "changes": [
            {
                "contact": {"cxone_id": contact},
                "segments_added": "VIP; Spanish",
                "segments_removed": [],
                "changed_at": iso(time.time() - 2),
            }
        ]
    }
    status, answer = await post_github_style(http, daemon, document, "d-1", GITHUB_SECRET)
    assert (status, answer) == (202, {"accepted": 2, "duplicates": 0, "stale": 0})
    assert await wait_terminal(http, daemon, [contact]) == {
        contact: {"Spanish": "active", "VIP": "active"}
    }
    # The same delivery id again: the first answer, no new work.
    status, again = await post_github_style(http, daemon, document, "d-1", GITHUB_SECRET)
    assert (status, again) == (200, answer)
    removal = {
        "changes": [
            {
                "contact": {"cxone_id": contact},
                "segments_removed": ["Spanish"],
                "changed_at": iso(time.time() - 1),
            }
        ]
    }
    status, _ = await post_github_style(http, daemon, removal, "d-2", GITHUB_SECRET)
    assert status == 202
    assert await wait_terminal(http, daemon, [contact]) == {
        contact: {"Spanish": "removed", "VIP": "active"}
    }
    status, body = await post_github_style(http, daemon, removal, "d-3", "not the secret")
    assert status == 401 and body["field"] == "X-Hub-Signature-256"
    # Delivered late, an older change (it re-added Spanish) is stale: the removal stands.
    older = {
        "changes": [
            {
                "contact": {"cxone_id": contact},
                "segments_added": ["Spanish"],
                "changed_at": iso(time.time() - 30),
            }
        ]
    }
    status, answer = await post_github_style(http, daemon, older, "d-4", GITHUB_SECRET)
    assert (status, answer["stale"]) == (202, 1)
    # A malformed body, correctly signed: 400 naming it, and nothing accepted before is lost.
    bad = b'{"changes": [{"contact": '
    signature = hmac.new(GITHUB_SECRET.encode(), bad, hashlib.sha256).hexdigest()
    async with http.post(
        f"{daemon.url}/v1/webhooks/github",
        data=bad,
        headers={"X-Hub-Signature-256": f"sha256={signature}", "X-GitHub-Delivery": "d-5"},
    ) as response:
        assert response.status == 400
        assert (await response.json())["field"] == "body"
    _, view = await daemon.contact(http, contact)
    assert states(view) == {"Spanish": "removed", "VIP": "active"}
    counters = await emulator.counters()
    assert counters["bulk_ids"]["ids"] == 2 and counters["applied_twice"] == 0


async def test_a_zendesk_webhook_sets_the_contacts_segments_and_stale_signatures_are_refused(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    contact = "790000000001"

    async def post(document: Any, stamp: str) -> tuple[int, Any]:
        body = orjson.dumps(document)
        signed = stamp.encode() + body
        signature = base64.b64encode(
            hmac.new(ZENDESK_SECRET.encode(), signed, hashlib.sha256).digest()
        ).decode()
        headers = {
            "Content-Type": "application/json",
            "X-Zendesk-Webhook-Signature": signature,
            "X-Zendesk-Webhook-Signature-Timestamp": stamp,
        }
        async with http.post(
            f"{daemon.url}/v1/webhooks/zendesk", data=body, headers=headers
        ) as response:
            return response.status, await response.json(content_type=None)

    # The envelope of a Zendesk event webhook (user custom field changed).
    event = {
        "type": "zen:event-type:user.custom_field_changed",
        "account_id": 12514403,
        "id": "2b7c2a0f-5e3b-4a4e-9d11-6d8f1d3c2b01",
        "time": iso(time.time() - 1),
        "zendesk_event_version": "2022-11-06",
        "subject": "zen:user:9001",
        "detail": {"id": "9001", "external_id": contact, "role": "end-user"},
        "event": {"current": "VIP;Gold", "previous": ""},
    }
    now = iso(time.time()).replace(".000", "")
    status, answer = await post(event, now)
    assert (status, answer) == (202, {"accepted": 2, "duplicates": 0, "stale": 0})
    assert await wait_terminal(http, daemon, [contact]) == {
        contact: {"Gold": "active", "VIP": "active"}
    }
    stale = iso(time.time() - 600).replace(".000", "")
    changed = {**event, "id": "another-event", "event": {"current": "", "previous": "VIP;Gold"}}
    status, body = await post(changed, stale)
    assert status == 401 and body["field"] == "X-Zendesk-Webhook-Signature-Timestamp"
    _, view = await daemon.contact(http, contact)
    assert states(view) == {"Gold": "active", "VIP": "active"}


# ---- what the README promises of each kind, through the real daemon --------------------------


async def test_hubspot_refuses_more_than_100_events_and_a_repeated_key_and_skips_a_restore(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    now_ms = int(time.time() * 1000)
    # HubSpot sends at most 100 events a request: more is not HubSpot.
    batch = [hubspot_event(720000000000 + i, "VIP", now_ms) for i in range(101)]
    status, answer = await post_hubspot(http, daemon, batch)
    assert status == 422, answer
    assert "101" in answer["message"] and "100" in answer["message"], answer
    # A repeated JSON key is refused as for every other body: segmapd never guesses.
    body = orjson.dumps([hubspot_event(720000000200, "VIP", now_ms)]).replace(
        b'"propertyValue":"VIP"', b'"propertyValue":"VIP","propertyValue":"Gold"'
    )
    async with http.post(
        f"{daemon.url}/v1/webhooks/hubspot", data=body, headers=hubspot_headers(body)
    ) as response:
        answer = await response.json()
        assert response.status == 400, answer
        assert "propertyValue" in answer["message"], answer
    # A restored contact is skipped, counted under its own reason.
    restore = {**hubspot_event(720000000300, None, now_ms), "subscriptionType": "contact.restore"}
    del restore["propertyName"], restore["propertyValue"]
    status, answer = await post_hubspot(http, daemon, [restore])
    assert (status, answer) == (200, {"accepted": 0, "duplicates": 0, "stale": 0})
    labels = {"source": "hubspot", "kind": "hubspot", "reason": "restored"}
    assert await metric(http, daemon, "segmapd_events_skipped_total", **labels) == 1
    for contact in (720000000000, 720000000200, 720000000300):
        status, _ = await daemon.contact(http, str(contact))
        assert status == 404  # nothing was taken


async def test_salesforce_refuses_an_organization_id_with_a_wrong_checksum(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start(start_daemon)
    # The configured org's first 15 characters, with a case checksum that is not theirs.
    forged = ORG_ID[:15] + ("AAA" if ORG_ID[15:] != "AAA" else "BBB")
    message = salesforce_message(
        [("04l0000000000x1", contact_fields("003000000000601", "VIP"))], org=forged
    )
    status, envelope = await post_salesforce(http, daemon, message)
    assert status == 400
    assert "checksum" in fault_text(envelope)
    status, _ = await daemon.contact(http, "003000000000601")
    assert status == 404
