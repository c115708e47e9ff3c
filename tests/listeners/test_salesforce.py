"""Salesforce Outbound Messages: documented SOAP format, org and network checks, SOAP replies.

Messages are written from Salesforce's outbound messaging WSDL and its published examples (the
`notifications` element, `Notification` with `Id` and an `sObject` of `xsi:type="sf:..."` whose
fields are in `urn:sobject.enterprise.soap.sforce.com`, a nil `SessionId`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from multidict import CIMultiDict
from pydantic import ValidationError

from listeners.base import InboundRequest, Outcome
from listeners.errors import WebhookRejected
from listeners.salesforce import (
    MISSING_FIELD,
    SalesforceAdapter,
    SalesforceSource,
    id_checksum,
)
from scheduler.model import FailureReason, MembershipChange

SOAPENV = "http://schemas.xmlsoap.org/soap/envelope/"
OUTBOUND = "http://soap.sforce.com/2005/09/outbound"

# From a published outbound message example: an 18-character org id and its 15-character form.
ORG_18 = "00D5e000000KQ2eEAG"
ORG_15 = "00D5e000000KQ2e"
OTHER_ORG = "00D5e000000XYZaEAA"
SESSION_ID = "00D5e000000KQ2e!AQ4AQFakeSessionTokenValue.0123456789abcdef"
CONTACT_A = "0035e00000ZkM3hAAF"
CONTACT_B = "0035e00000ZkM3iAAF"
NOTE_A = "04l5e00000Gx7QzAAJ"
NOTE_B = "04l0800002nrC5BAAU"
NOTE_C = "04lR00000004z4uIAA"
SALESFORCE_PEER = "96.43.144.10"  # inside 96.43.144.0/20, a published Salesforce range
PROXY = "10.0.0.5"

Field = str | None  # a field's text, or None for xsi:nil="true"


def sobject(fields: Mapping[str, Field], sobject_type: str = "Contact") -> str:
    children = "".join(
        f'<sf:{name} xsi:nil="true"/>' if value is None else f"<sf:{name}>{value}</sf:{name}>"
        for name, value in fields.items()
    )
    return (
        f'<sObject xsi:type="sf:{sobject_type}" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">'
        f"{children}</sObject>"
    )


def message(
    notifications: Sequence[tuple[str, Mapping[str, Field]]],
    *,
    org: str = ORG_18,
    session_id: str | None = None,
    prolog: str = '<?xml version="1.0" encoding="UTF-8"?>',
) -> bytes:
    """An outbound message as Salesforce sends it (one notifications element, N Notification)."""
    session = (
        '<SessionId xsi:nil="true"/>'
        if session_id is None
        else f"<SessionId>{session_id}</SessionId>"
    )
    body = "".join(
        f"<Notification><Id>{note_id}</Id>{sobject(fields)}</Notification>"
        for note_id, fields in notifications
    )
    return (
        f"{prolog}"
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        "<soapenv:Body>"
        '<notifications xmlns="http://soap.sforce.com/2005/09/outbound">'
        f"<OrganizationId>{org}</OrganizationId>"
        "<ActionId>04k5e000000CaRkAAK</ActionId>"
        f"{session}"
        f"<EnterpriseUrl>https://acme.my.salesforce.com/services/Soap/c/62.0/{org[:15]}</EnterpriseUrl>"
        f"<PartnerUrl>https://acme.my.salesforce.com/services/Soap/u/62.0/{org[:15]}</PartnerUrl>"
        f"{body}"
        "</notifications>"
        "</soapenv:Body>"
        "</soapenv:Envelope>"
    ).encode()


def request(
    body: bytes, *, peer: str | None = SALESFORCE_PEER, headers: Any = None
) -> InboundRequest:
    return InboundRequest(
        method="POST",
        path_qs="/v1/webhooks/salesforce",
        query_string="",
        headers=headers
        if headers is not None
        else {"content-type": "text/xml; charset=utf-8", "soapaction": '""'},
        body=body,
        peer=peer,
        received_at=time.time(),
    )


def adapter(**settings: Any) -> SalesforceAdapter:
    settings.setdefault("organization_id", ORG_18)
    return SalesforceAdapter(SalesforceSource(**settings))


def refused(source: SalesforceAdapter, body: bytes) -> WebhookRejected:
    with pytest.raises(WebhookRejected) as caught:
        source.parse(request(body))
    return caught.value


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# --- the documented message, org ids -------------------------------------------------------


@pytest.mark.parametrize("configured", [ORG_18, ORG_15])
@pytest.mark.parametrize("sent", [ORG_18, ORG_15])
def test_a_contact_notification_becomes_a_mirror_keyed_by_its_notification_id(
    configured: str, sent: str
) -> None:
    body = message(
        [(NOTE_A, {"Id": CONTACT_A, "Name": "Ada Lovelace", "CXone_Segments__c": "VIP;Spanish"})],
        org=sent,
    )
    parsed = adapter(organization_id=configured).parse(request(body))
    assert parsed.skipped == [] and parsed.dead == []
    [event] = parsed.events
    assert event.key == NOTE_A
    assert event.change.contact_id == CONTACT_A
    assert event.change.mirror == ("VIP", "Spanish")
    assert event.change.add == () and event.change.remove == ()
    assert event.change.occurred_at is None


@pytest.mark.parametrize(
    "sent",
    [
        OTHER_ORG,
        "00D5E000000KQ2eEAG",  # the same characters in another case: another org
        "00D5e000000KQ2",  # 14 characters
        "00D5e000000KQ2eEA",  # 17
        "",
    ],
)
def test_another_org_is_refused_with_403_without_quoting_the_expected_id(sent: str) -> None:
    error = refused(adapter(), message([(NOTE_A, {"Id": CONTACT_A})], org=sent))
    assert error.status == 403
    assert error.field == "notifications.OrganizationId"
    assert "another org" in error.message
    assert ORG_15 not in error.message or sent.startswith(ORG_15)


def test_the_other_orgs_refusal_is_a_soap_client_fault_with_status_403() -> None:
    source = adapter()
    error = refused(source, message([(NOTE_A, {"Id": CONTACT_A})], org=OTHER_ORG))
    reply = source.refused(error)
    assert reply.status == 403
    assert reply.content_type == "text/xml; charset=utf-8"
    code, text = fault(reply.body)
    assert code == "soapenv:Client"
    assert text == error.message


def test_a_message_without_organization_id_is_refused_with_400() -> None:
    body = message([(NOTE_A, {"Id": CONTACT_A})]).replace(
        f"<OrganizationId>{ORG_18}</OrganizationId>".encode(), b""
    )
    error = refused(adapter(), body)
    assert (error.status, error.field) == (400, "notifications.OrganizationId")


@pytest.mark.parametrize("suffix", ["AAA", "EAH", "FAG"])
def test_an_18_character_org_id_with_a_wrong_checksum_is_refused(suffix: str) -> None:
    # The first 15 characters are this org's; the checksum of them is EAG, never anything else.
    error = refused(adapter(), message([(NOTE_A, {"Id": CONTACT_A})], org=ORG_15 + suffix))
    assert (error.status, error.field) == (400, "notifications.OrganizationId")
    assert "checksum" in error.message and "'EAG'" in error.message


def test_the_checksum_of_a_sent_org_id_is_read_case_insensitively() -> None:
    parsed = adapter().parse(request(message([(NOTE_A, {"Id": CONTACT_A})], org=ORG_15 + "eag")))
    assert len(parsed.events) == 1


def test_the_org_is_checked_before_the_notifications_are_read() -> None:
    # An unauthenticated sender learns nothing about the mapping from a wrong-org message.
    too_many = [(NOTE_A, {"Id": CONTACT_A})] * 101
    assert refused(adapter(), message(too_many, org=OTHER_ORG)).status == 403


def test_a_published_example_with_only_an_id_field_clears_by_default_or_is_skipped() -> None:
    # The shape of a documented message (OpportunityLineItem, only sf:Id selected).
    body = message([(NOTE_C, {"Id": "00k40000004PHXtAAO"})])
    [event] = adapter().parse(request(body)).events
    assert (event.change.contact_id, event.change.mirror, event.key) == (
        "00k40000004PHXtAAO",
        (),
        NOTE_C,
    )
    parsed = adapter(absent_segments_field="skip").parse(request(body))
    assert parsed.events == [] and parsed.dead == []
    [skipped] = parsed.skipped
    assert skipped.reason == MISSING_FIELD
    assert skipped.key == NOTE_C
    assert "CXone_Segments__c" in skipped.detail


def test_an_absent_contact_id_field_is_skipped() -> None:
    body = message([(NOTE_C, {"CXone_Segments__c": "VIP"})])
    [skipped] = adapter().parse(request(body)).skipped
    assert (skipped.reason, skipped.key) == (MISSING_FIELD, NOTE_C)
    assert "Id" in skipped.detail


# --- hostile and malformed bodies -----------------------------------------------------------


def test_an_external_entity_is_refused_and_the_file_is_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:TOPSECRET-LOCAL-FILE:/root:/bin/bash\n")
    body = (
        f'<?xml version="1.0"?><!DOCTYPE soapenv:Envelope [<!ENTITY xxe SYSTEM "file://{secret}">]>'
    ).encode() + message([(NOTE_A, {"Id": "&xxe;", "CXone_Segments__c": "&xxe;"})], prolog="")
    source = adapter()
    error = refused(source, body)
    assert error.status == 400
    reply = source.refused(error)
    assert reply.status == 400
    for text in (error.message, repr(error), reply.body.decode()):
        assert "TOPSECRET" not in text
        assert str(secret) not in text


def test_the_classic_xxe_on_etc_passwd_is_refused() -> None:
    body = (
        b'<?xml version="1.0"?><!DOCTYPE foo [<!ELEMENT foo ANY >'
        b'<!ENTITY xxe SYSTEM "file:///etc/passwd" >]><foo>&xxe;</foo>'
    )
    error = refused(adapter(), body)
    assert error.status == 400
    assert "root:" not in error.message and "/etc/passwd" not in error.message


def test_billion_laughs_is_refused_quickly() -> None:
    entities = '<!ENTITY lol "lol">' + "".join(
        f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">'
        for i in range(1, 10)
    )
    body = f'<?xml version="1.0"?><!DOCTYPE lolz [{entities}]><lolz>&lol9;</lolz>'.encode()
    started = time.monotonic()
    error = refused(adapter(), body)
    assert error.status == 400
    assert "lol" not in error.message
    assert time.monotonic() - started < 1.0


def test_a_bare_doctype_is_refused() -> None:
    body = b"<!DOCTYPE soapenv:Envelope>" + message([(NOTE_A, {"Id": CONTACT_A})], prolog="")
    assert refused(adapter(), body).status == 400


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"", "XML"),
        (b"not xml at all", "XML"),
        (b'{"contactId": "1", "set": []}', "XML"),
        (b'<?xml version="1.0" encoding="klingon"?><x/>', "encoding"),
        (b"<x>\xff</x>", "XML"),
        (b"<notifications/>", "SOAP 1.1 envelope"),
        (
            b'<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope"><env:Body/>'
            b"</env:Envelope>",
            "SOAP 1.2",
        ),
        (b'<soapenv:Envelope xmlns:soapenv="' + SOAPENV.encode() + b'"/>', "Body"),
        (
            b'<soapenv:Envelope xmlns:soapenv="' + SOAPENV.encode() + b'"><soapenv:Body>'
            b"<notifications/></soapenv:Body></soapenv:Envelope>",
            "notifications",
        ),
    ],
)
def test_what_is_not_an_outbound_message_is_refused_with_400_naming_what_is_missing(
    body: bytes, words: str
) -> None:
    error = refused(adapter(), body)
    assert error.status == 400
    assert words in error.message


def test_a_message_without_notification_elements_is_refused() -> None:
    error = refused(adapter(), message([]))
    assert (error.status, error.field) == (400, "notifications.Notification")


def test_a_notification_without_id_or_sobject_is_refused() -> None:
    base = message([(NOTE_A, {"Id": CONTACT_A, "CXone_Segments__c": "VIP"})])
    no_id = base.replace(f"<Id>{NOTE_A}</Id>".encode(), b"")
    assert refused(adapter(), no_id).field == "Notification[0].Id"
    start, end = base.index(b"<sObject"), base.index(b"</sObject>") + len(b"</sObject>")
    no_sobject = base[:start] + base[end:]
    assert refused(adapter(), no_sobject).field == "Notification[0].sObject"


def test_a_field_given_twice_is_refused() -> None:
    body = message([(NOTE_A, {"Id": CONTACT_A, "CXone_Segments__c": "VIP"})]).replace(
        b"</sObject>", b"<sf:CXone_Segments__c>Spanish</sf:CXone_Segments__c></sObject>"
    )
    error = refused(adapter(), body)
    assert error.status == 400
    assert error.field == "Notification[0].sObject.CXone_Segments__c"


def test_a_huge_field_name_given_twice_is_named_shortened() -> None:
    name = "F" * 100_000
    field = f"<sf:{name}>x</sf:{name}>"
    body = message([(NOTE_A, {"Id": CONTACT_A})]).replace(
        b"</sObject>", (field * 2).encode() + b"</sObject>"
    )
    error = refused(adapter(), body)
    assert (error.status, error.field) == (400, "Notification[0].sObject." + "F" * 40)
    assert len(error.message) < 200


def test_at_most_100_notifications_are_taken_and_more_are_refused_not_truncated() -> None:
    hundred = [
        (f"04l5e00000G{i:04d}AAJ", {"Id": CONTACT_A, "CXone_Segments__c": "VIP"})
        for i in range(100)
    ]
    assert len(adapter().parse(request(message(hundred))).events) == 100
    error = refused(adapter(), message([*hundred, (NOTE_B, {"Id": CONTACT_B})]))
    assert error.status == 422
    assert "101" in error.message and "100" in error.message


# --- mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "mirror"),
    [
        ("VIP", ("VIP",)),
        (" VIP ; ;Spanish;VIP;", ("VIP", "Spanish")),
        (None, ()),  # xsi:nil: the picklist was cleared
        ("", ()),
        (" ; ", ()),
    ],
)
def test_the_picklist_is_the_contacts_complete_list(value: Field, mirror: tuple[str, ...]) -> None:
    body = message([(NOTE_A, {"Id": CONTACT_A, "CXone_Segments__c": value})])
    [event] = adapter().parse(request(body)).events
    assert event.change.mirror == mirror


def test_xsi_nil_wins_over_any_text_in_the_element() -> None:
    body = message([(NOTE_A, {"Id": CONTACT_A, "CXone_Segments__c": "VIP"})]).replace(
        b"<sf:CXone_Segments__c>", b'<sf:CXone_Segments__c xsi:nil="true">'
    )
    [event] = adapter().parse(request(body)).events
    assert event.change.mirror == ()


def test_an_absent_picklist_is_cleared_as_salesforce_omits_empty_fields() -> None:
    body = message([(NOTE_A, {"Id": CONTACT_A, "Name": "Ada"})])
    [event] = adapter().parse(request(body)).events
    assert event.change.mirror == ()
    parsed = adapter(absent_segments_field="skip").parse(request(body))
    assert parsed.events == []
    [skipped] = parsed.skipped
    assert (skipped.reason, skipped.key) == (MISSING_FIELD, NOTE_A)
    assert MISSING_FIELD in SalesforceAdapter.skip_reasons


def test_a_field_in_another_namespace_does_not_count() -> None:
    body = message([(NOTE_A, {"Id": CONTACT_A})]).replace(
        b"</sObject>", b'<CXone_Segments__c xmlns="urn:other">VIP</CXone_Segments__c></sObject>'
    )
    [skipped] = adapter(absent_segments_field="skip").parse(request(body)).skipped
    assert skipped.reason == MISSING_FIELD


@pytest.mark.parametrize("bad_id", [None, "", "not an id", "x" * 129])
def test_an_invalid_contact_id_is_dead_lettered_and_the_rest_still_taken(bad_id: Field) -> None:
    body = message(
        [
            (NOTE_A, {"Id": CONTACT_A, "CXone_Segments__c": "VIP"}),
            (NOTE_B, {"CXone_Contact_Id__c": bad_id, "CXone_Segments__c": "VIP;Spanish"}),
            (NOTE_C, {"CXone_Contact_Id__c": CONTACT_B, "CXone_Segments__c": None}),
        ]
    )
    # The first notification has no CXone_Contact_Id__c: skipped, not dead.
    parsed = adapter(contact_id_field="CXone_Contact_Id__c").parse(request(body))
    assert [s.key for s in parsed.skipped] == [NOTE_A]
    [event] = parsed.events
    assert (event.key, event.change.contact_id, event.change.mirror) == (NOTE_C, CONTACT_B, ())
    [dead] = parsed.dead
    assert dead.key == NOTE_B
    assert dead.reason is FailureReason.INVALID_CONTACT_ID
    assert dead.change.contact_id == (bad_id or "")
    assert dead.change.mirror == ("VIP", "Spanish")
    assert dead.message.startswith("Notification[1].sObject.CXone_Contact_Id__c: ")
    assert dead.message.endswith(f"(notification {NOTE_B})")


@pytest.mark.parametrize("cleared", [None, ""])
def test_a_nil_contact_id_with_a_cleared_picklist_is_kept_as_a_removal_from_every_segment(
    cleared: Field,
) -> None:
    # A dead letter is kept per (contact, segment): one that named no segment kept nothing.
    body = message([(NOTE_A, {"Id": None, "CXone_Segments__c": cleared}), (NOTE_B, {"Id": None})])
    parsed = adapter(occurred_at_field="LastModifiedDate").parse(request(body))
    assert parsed.events == []
    assert [(d.key, d.reason) for d in parsed.dead] == [
        (NOTE_A, FailureReason.INVALID_CONTACT_ID),
        (NOTE_B, FailureReason.INVALID_CONTACT_ID),
    ]
    for dead in parsed.dead:
        assert (dead.change.contact_id, dead.change.remove) == ("", ("*",))
        assert (dead.change.add, dead.change.mirror) == ((), None)
        assert "got an empty string" in dead.message


def test_a_huge_contact_id_is_dead_lettered_shortened_with_its_true_length() -> None:
    huge = "7" * 900_000
    body = message([(NOTE_A, {"Id": huge, "CXone_Segments__c": "VIP"})])
    [dead] = adapter().parse(request(body)).dead
    assert dead.reason is FailureReason.INVALID_CONTACT_ID
    assert len(dead.change.contact_id) == 1024
    assert dead.change.contact_id.startswith("7" * 900)
    assert dead.change.contact_id.endswith("…[shortened from 900000 characters]")
    assert "got 900000 characters" in dead.message
    assert len(dead.message) < 400


def test_a_segment_value_failing_the_id_rule_is_dead_lettered_and_the_rest_taken() -> None:
    stamp = "2026-12-01T10:00:00.000Z"
    body = message(
        [
            (
                NOTE_A,
                {
                    "Id": CONTACT_A,
                    "CXone_Segments__c": "VIP;Gold Customer",
                    "LastModifiedDate": stamp,
                },
            ),
            (NOTE_B, {"Id": CONTACT_B, "CXone_Segments__c": "VIP"}),
        ]
    )
    parsed = adapter(occurred_at_field="LastModifiedDate").parse(request(body))
    assert parsed.dead == []
    assert [e.key for e in parsed.events] == [NOTE_A, NOTE_B]
    taken = parsed.events[0]
    # The contact keeps VIP (same time, same key); only the bad value is dead-lettered.
    assert taken.change == MembershipChange(CONTACT_A, mirror=("VIP",), occurred_at=epoch(stamp))
    invalid = taken.invalid
    assert invalid is not None
    assert (invalid.key, invalid.reason) == (None, FailureReason.SEGMENT_NOT_FOUND)
    assert invalid.change == MembershipChange(
        CONTACT_A, add=("Gold Customer",), occurred_at=epoch(stamp)
    )
    assert invalid.message.startswith(
        "Notification[0].sObject.CXone_Segments__c[1]: value 'Gold Customer' (got ' ' at index 4)"
    )
    assert invalid.message.endswith(f"(notification {NOTE_A})")
    assert parsed.events[1].invalid is None


def test_when_every_picklist_value_is_invalid_the_valid_part_is_an_empty_mirror() -> None:
    values = ["Gold Customer", "VIP!", "a b", "c d", "Gold Customer"]
    body = message([(NOTE_A, {"Id": CONTACT_A, "CXone_Segments__c": ";".join(values)})])
    [taken] = adapter().parse(request(body)).events
    assert taken.change == MembershipChange(CONTACT_A, mirror=())
    assert taken.invalid is not None
    assert taken.invalid.change.add == ("Gold Customer", "VIP!", "a b", "c d")
    assert taken.invalid.message.startswith(
        "Notification[0].sObject.CXone_Segments__c: values [0] 'Gold Customer' "
        "(got ' ' at index 4), [1] 'VIP!' (got '!' at index 3), [2] 'a b' (got ' ' at index 1) "
        "and 2 more are no CXone segment ids"
    )


def test_an_invalid_contact_id_dead_letters_the_whole_notification_with_every_value() -> None:
    body = message([(NOTE_A, {"Id": "not an id", "CXone_Segments__c": "VIP;Gold Customer"})])
    parsed = adapter().parse(request(body))
    assert parsed.events == []
    [dead] = parsed.dead
    assert dead.reason is FailureReason.INVALID_CONTACT_ID
    assert dead.change.mirror == ("VIP", "Gold Customer")


def test_a_huge_picklist_value_is_dead_lettered_shortened_with_its_true_length() -> None:
    body = message([(NOTE_A, {"Id": CONTACT_A, "CXone_Segments__c": "VIP;" + "s" * 50_000})])
    [taken] = adapter().parse(request(body)).events
    assert taken.change.mirror == ("VIP",)
    assert taken.invalid is not None
    [kept] = taken.invalid.change.add
    assert len(kept) == 1024 and kept.endswith("…[shortened from 50000 characters]")
    assert "got 50000 characters" in taken.invalid.message
    assert len(taken.invalid.message) < 400


def test_more_segments_than_the_cap_dead_letters_the_notification() -> None:
    many = ";".join(f"S{i}" for i in range(150))
    parsed = adapter().parse(
        request(message([(NOTE_A, {"Id": CONTACT_A, "CXone_Segments__c": many})]))
    )
    [dead] = parsed.dead
    assert dead.reason is FailureReason.SEGMENT_NOT_FOUND
    assert parsed.events == []
    assert dead.change.mirror == tuple(f"S{i}" for i in range(100))
    assert "keeps the first 100 of the event's 150 segment values" in dead.message


def test_an_invalid_contact_id_does_not_hide_a_bad_occurred_at_field() -> None:
    # The time field is the same for every record: a bad value is a setting to correct.
    body = message([(NOTE_A, {"Id": "not an id", "CXone_Segments__c": "VIP", "Name": "Ada"})])
    error = refused(adapter(occurred_at_field="Name"), body)
    assert (error.status, error.field) == (422, "Notification[0].sObject.Name")


def test_dedup_keys_are_the_notification_ids() -> None:
    body = message(
        [
            (NOTE_A, {"Id": CONTACT_A, "CXone_Segments__c": "VIP"}),
            (NOTE_B, {"Id": CONTACT_B, "CXone_Segments__c": "Spanish"}),
            (NOTE_C, {"Id": CONTACT_A, "CXone_Segments__c": None}),
        ]
    )
    first = adapter().parse(request(body))
    retried = adapter().parse(request(body))  # Salesforce resends the same notification ids
    assert [e.key for e in first.events] == [NOTE_A, NOTE_B, NOTE_C]
    assert [e.key for e in retried.events] == [e.key for e in first.events]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("2026-12-01T10:00:00.000Z", "2026-12-01T10:00:00+00:00"),
        ("2026-12-01T10:00:00Z", "2026-12-01T10:00:00+00:00"),
        ("2026-12-01T11:00:00.250+01:00", "2026-12-01T10:00:00.250+00:00"),
    ],
)
def test_occurred_at_comes_from_the_configured_datetime_field(sent: str, expected: str) -> None:
    body = message(
        [(NOTE_A, {"Id": CONTACT_A, "CXone_Segments__c": "VIP", "LastModifiedDate": sent})]
    )
    [event] = adapter(occurred_at_field="LastModifiedDate").parse(request(body)).events
    assert event.change.occurred_at == pytest.approx(epoch(expected))
    # Not configured: arrival order, whatever the sObject holds.
    [plain] = adapter().parse(request(body)).events
    assert plain.change.occurred_at is None


def test_a_nil_occurred_at_leaves_arrival_order() -> None:
    body = message(
        [(NOTE_A, {"Id": CONTACT_A, "CXone_Segments__c": "VIP", "LastModifiedDate": None})]
    )
    [event] = adapter(occurred_at_field="LastModifiedDate").parse(request(body)).events
    assert event.change.occurred_at is None


def test_an_absent_occurred_at_field_leaves_arrival_order() -> None:
    body = message([(NOTE_A, {"Id": CONTACT_A, "CXone_Segments__c": "VIP"})])
    [event] = adapter(occurred_at_field="LastModifiedDate").parse(request(body)).events
    assert event.change.occurred_at is None and event.change.mirror == ("VIP",)


@pytest.mark.parametrize(
    "sent",
    [
        "Ada Lovelace",  # occurred_at_field names a text field
        "2026-12-01T10:00:00.000",  # no offset
        "1970-01-01T00:00:00.000Z",
        "2999-01-01T00:00:00.000Z",
    ],
)
def test_a_bad_occurred_at_refuses_the_message_naming_the_salesforce_field(sent: str) -> None:
    body = message(
        [
            (NOTE_A, {"Id": CONTACT_A, "CXone_Segments__c": "VIP", "Name": "2026-12-01T10:00:00Z"}),
            (NOTE_B, {"Id": CONTACT_B, "CXone_Segments__c": "VIP", "Name": sent}),
        ]
    )
    error = refused(adapter(occurred_at_field="Name"), body)
    assert error.status == 422
    assert error.field == "Notification[1].sObject.Name"
    assert error.message.startswith("Notification[1].sObject.Name:")


# --- networks -------------------------------------------------------------------------------


def test_without_allowed_networks_any_address_is_admitted() -> None:
    source = adapter()
    assert source.authenticate(request(b"", peer="203.0.113.9")) is None
    assert source.authenticate(request(b"", peer=None)) is None


@pytest.mark.parametrize(
    ("peer", "admitted"),
    [
        (SALESFORCE_PEER, True),
        ("::ffff:96.43.144.10", True),  # an IPv4 peer on a dual-stack socket
        ("204.14.232.1", True),
        ("203.0.113.9", False),
        ("2001:db8::1", False),
    ],
)
def test_allowed_networks_checks_the_peer(peer: str, admitted: bool) -> None:
    source = adapter(allowed_networks=["96.43.144.0/20", "204.14.232.0/21"])
    if admitted:
        assert source.authenticate(request(b"", peer=peer)) is None
    else:
        with pytest.raises(WebhookRejected) as caught:
            source.authenticate(request(b"", peer=peer))
        assert (caught.value.status, caught.value.field) == (403, "peer")


def test_an_unknown_peer_is_refused_when_networks_are_restricted() -> None:
    with pytest.raises(WebhookRejected) as caught:
        adapter(allowed_networks=["96.43.144.0/20"]).authenticate(request(b"", peer=None))
    assert caught.value.status == 403


def forwarded(value: str) -> dict[str, str]:
    return {"x-forwarded-for": value}


@pytest.mark.parametrize(
    ("peer", "header", "admitted"),
    [
        (PROXY, SALESFORCE_PEER, True),
        (PROXY, "203.0.113.9", False),
        # The client's own entries (left) prove nothing: the proxy's appended one decides.
        (PROXY, f"{SALESFORCE_PEER}, 203.0.113.9", False),
        (PROXY, f"203.0.113.9, {SALESFORCE_PEER}", True),
        # A chain of trusted proxies is walked past.
        (PROXY, f"{SALESFORCE_PEER}, 10.0.0.7", True),
        (PROXY, "203.0.113.9, 10.0.0.7", False),
        (PROXY, f"{SALESFORCE_PEER}:51234", True),
        # Not a trusted proxy: its X-Forwarded-For is the client's word, ignored.
        ("198.51.100.7", SALESFORCE_PEER, False),
    ],
)
def test_x_forwarded_for_is_believed_only_from_trusted_proxies(
    peer: str, header: str, admitted: bool
) -> None:
    source = adapter(allowed_networks=["96.43.144.0/20"], trusted_proxies=["10.0.0.0/24"])
    incoming = request(b"", peer=peer, headers=forwarded(header))
    if admitted:
        assert source.authenticate(incoming) is None
    else:
        with pytest.raises(WebhookRejected) as caught:
            source.authenticate(incoming)
        assert caught.value.status == 403


def test_a_trusted_proxy_without_x_forwarded_for_is_the_client() -> None:
    source = adapter(allowed_networks=["96.43.144.0/20"], trusted_proxies=["10.0.0.0/24"])
    with pytest.raises(WebhookRejected) as caught:
        source.authenticate(request(b"", peer=PROXY, headers={}))
    assert "10.0.0.5" in caught.value.message


def test_repeated_x_forwarded_for_headers_are_read_as_one_list() -> None:
    source = adapter(allowed_networks=["96.43.144.0/20"], trusted_proxies=["10.0.0.0/24"])
    headers = CIMultiDict(
        [("X-Forwarded-For", SALESFORCE_PEER), ("X-Forwarded-For", "203.0.113.9")]
    )
    with pytest.raises(WebhookRejected):
        source.authenticate(request(b"", peer=PROXY, headers=headers))
    headers = CIMultiDict(
        [("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-For", SALESFORCE_PEER)]
    )
    assert source.authenticate(request(b"", peer=PROXY, headers=headers)) is None


def test_a_garbled_x_forwarded_for_entry_is_refused() -> None:
    source = adapter(allowed_networks=["96.43.144.0/20"], trusted_proxies=["10.0.0.0/24"])
    with pytest.raises(WebhookRejected) as caught:
        source.authenticate(request(b"", peer=PROXY, headers=forwarded("unknown")))
    assert (caught.value.status, caught.value.field) == (403, "x-forwarded-for")


# --- answers --------------------------------------------------------------------------------


def fault(body: bytes) -> tuple[str, str]:
    root = ElementTree.fromstring(body)
    assert root.tag == f"{{{SOAPENV}}}Envelope"
    found = root.find(f"{{{SOAPENV}}}Body/{{{SOAPENV}}}Fault")
    assert found is not None
    return found.findtext("faultcode") or "", found.findtext("faultstring") or ""


def test_the_acknowledgement_is_the_documented_notifications_response() -> None:
    source = adapter()
    reply = source.accepted(Outcome(accepted=2, events=2))
    assert reply.status == 200
    assert reply.content_type == "text/xml; charset=utf-8"
    root = ElementTree.fromstring(reply.body)
    assert root.tag == f"{{{SOAPENV}}}Envelope"
    ack = root.find(f"{{{SOAPENV}}}Body/{{{OUTBOUND}}}notificationsResponse/{{{OUTBOUND}}}Ack")
    assert ack is not None and ack.text == "true"
    again = source.replayed(reply.body)
    assert (again.status, again.body, again.content_type) == (200, reply.body, reply.content_type)


def test_a_refusal_is_an_escaped_client_fault_with_the_rejections_status() -> None:
    text = "Notification[0].sObject.Id: <got> & 'more' \x00\x1b"
    reply = adapter().refused(WebhookRejected(422, text, "Notification[0].sObject.Id"))
    assert reply.status == 422
    code, faultstring = fault(reply.body)
    assert code == "soapenv:Client"
    assert faultstring == "Notification[0].sObject.Id: <got> & 'more' ??"


def test_busy_is_a_server_fault_with_retry_after() -> None:
    reply = adapter().busy("segmapd is shutting down", 2.1)
    assert reply.status == 503
    assert reply.headers == {"Retry-After": "3"}
    assert fault(reply.body) == ("soapenv:Server", "segmapd is shutting down")
    assert adapter().busy("x", 0.0).headers["Retry-After"] == "1"


# --- settings -------------------------------------------------------------------------------


def test_id_checksum_matches_salesforce_18_character_ids() -> None:
    # Pairs from published outbound messages: an org id and a notification id.
    assert id_checksum("00D5e000000KQ2e") == "EAG"
    assert id_checksum("04l0800002nrC5B") == "AAU"
    assert id_checksum("0035e00000ZkM3h") == "AAF"


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"organization_id": "00D5e000000KQ2"}, "15 or 18"),
        ({"organization_id": "00D5e000000KQ2eEA"}, "15 or 18"),
        ({"organization_id": "0035e00000ZkM3hAAF"}, "00D"),  # a contact id, not an org id
        ({"organization_id": "00D5e000000KQ2eEAA"}, "checksum"),
        ({"organization_id": "00D5e000000kq2eEAG"}, "checksum"),  # case lost in copying
        ({"organization_id": ORG_18, "allowed_networks": ["96.43.144.0/33"]}, "CIDR"),
        ({"organization_id": ORG_18, "allowed_networks": ["salesforce"]}, "CIDR"),
        ({"organization_id": ORG_18, "trusted_proxies": ["10.0.0.5/24"]}, "10.0.0.0/24"),
        ({"organization_id": ORG_18, "segments_field": "CXone Segments"}, "API name"),
        ({"organization_id": ORG_18, "contact_id_field": ""}, "API name"),
        ({"organization_id": ORG_18, "occurred_at_field": "Last Modified"}, "API name"),
        ({"organization_id": ORG_18, "secret": "x"}, "Extra inputs"),
    ],
)
def test_bad_settings_are_refused(settings: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        SalesforceSource(**settings)
    assert words in str(caught.value)


def test_good_settings_and_the_lowercase_checksum_form() -> None:
    source = SalesforceSource(
        organization_id="00D5e000000KQ2eeag",
        allowed_networks=["96.43.144.0/20", "2001:db8::/32"],
        trusted_proxies=["10.0.0.0/8"],
        occurred_at_field="LastModifiedDate",
    )
    assert source.kind == "salesforce"
    assert SalesforceSource.required_keys == ("organization_id",)
    assert SalesforceSource().organization_id == ""  # reported by the config check as required


def test_an_adapter_without_an_org_id_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="organization_id"):
        SalesforceAdapter(SalesforceSource())


def test_the_session_id_never_reaches_messages_details_or_reprs() -> None:
    source = adapter(contact_id_field="CXone_Contact_Id__c")
    texts = [repr(source), repr(SalesforceSource(organization_id=ORG_18))]
    body = message(
        [
            (NOTE_A, {"CXone_Contact_Id__c": CONTACT_A, "CXone_Segments__c": "VIP"}),
            (NOTE_B, {"CXone_Contact_Id__c": "bad id", "CXone_Segments__c": "VIP"}),
            (NOTE_C, {"Id": CONTACT_B}),
        ],
        session_id=SESSION_ID,
    )
    parsed = source.parse(request(body))
    assert len(parsed.events) == len(parsed.dead) == len(parsed.skipped) == 1
    texts += [repr(parsed), *(d.message for d in parsed.dead), *(s.detail for s in parsed.skipped)]
    for wrong in (message([(NOTE_A, {})], org=OTHER_ORG, session_id=SESSION_ID),):
        error = refused(source, wrong)
        texts += [error.message, repr(error), source.refused(error).body.decode()]
    texts.append(source.accepted(Outcome()).body.decode())
    for text in texts:
        assert SESSION_ID not in text
        assert "FakeSessionToken" not in text
