"""Salesforce Outbound Messages (workflow rule or Flow actions), answered in SOAP 1.1.

Salesforce POSTs one SOAP 1.1 envelope whose body holds a `notifications` element (namespace
`http://soap.sforce.com/2005/09/outbound`): `OrganizationId`, `ActionId`, `SessionId` (nil
unless "Send Session ID" is ticked), `EnterpriseUrl`, `PartnerUrl`, and up to 100 `Notification`
elements, each an `Id` and an `sObject` (`xsi:type="sf:Contact"`) whose children, in namespace
`urn:sobject.enterprise.soap.sforce.com`, are the fields selected on the outbound message. The
record's data is its latest at sending time, so the segments field is the contact's complete
list: it becomes a mirror (`set`). Salesforce retries anything but `200` with `<Ack>true</Ack>`
for up to 24 hours, and may deliver a notification more than once (same `Notification/Id`), so
each notification's `Id` is its redelivery key.

Salesforce signs nothing. What this kind checks instead, as Salesforce's security notes advise:
the message's `OrganizationId` (first 15 characters, case-sensitive, so a 15- or 18-character
setting both work) and, optionally, the client address against `allowed_networks` (Salesforce's
published ranges); TLS with Salesforce's client certificate is for the reverse proxy to check.

Decisions, per notification (never for the whole message, which Salesforce would retry for a
day without any chance of success):

- the segments field nil or empty is `set: []` (the picklist was cleared); absent from the
  sObject it is `set: []` too by default (`absent_segments_field = "clear"`): Salesforce leaves
  fields without a value out of the message, so a cleared picklist may arrive as no element at
  all, and reading that as "nothing to say" would leave the contact in its segments for ever.
  The price is that an outbound message that does not select the field clears every contact it
  sends; `absent_segments_field = "skip"` skips such notifications (`missing_field`) instead;
- the contact id field absent is skipped (`missing_field`); the time field absent (or nil)
  leaves the change in arrival order;
- a contact id that is empty (nil) or fails the id rule dead-letters the notification
  (`invalid_contact_id`), and so does a picklist listing more values than the per-event cap
  (`segment_not_found`);
- picklist values that fail the id rule are the notification's invalid part
  (`InboundEvent.invalid`, `segment_not_found`): only they are dead-lettered, and the rest is
  taken as a mirror of the valid values, so the contact keeps the valid segments it is in;
- the other notifications of the message are taken either way. Dead letters keep ids and values
  as sent, bounded (`listeners.payload.dead_event`).

Refused, the whole message (a SOAP Fault; nothing of it is taken): anything that is not
Salesforce's format (not XML, a DTD or entity, not a SOAP 1.1 envelope, no `notifications`,
a notification without `Id` or `sObject`, a field given twice, an 18-character
`OrganizationId` whose last three characters are not its checksum) with 400; another org with 403;
more than 100 notifications with 422; and an `occurred_at_field` value that is not an
xsd:dateTime with an offset within the accepted range, with 422. That field is an audit field
Salesforce fills alike for every record, so a bad value means the setting names the wrong
field: refusing shows the fault in Salesforce's outbound message monitor, and its retries
succeed once the setting is corrected, where acknowledging would lose the changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import ipaddress
import math
import re
from typing import ClassVar, Literal
from xml.etree.ElementTree import Element, ParseError
from xml.sax.saxutils import escape

import defusedxml.ElementTree as SafeElementTree
from defusedxml import DefusedXmlException
from pydantic import field_validator

from listeners.base import (
    DeadEvent,
    InboundEvent,
    InboundRequest,
    Outcome,
    ParsedDelivery,
    Reply,
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
    parse_event,
    parse_occurred_at,
)
from scheduler.model import FailureReason, MembershipChange

SOAP_ENVELOPE_NS = "http://schemas.xmlsoap.org/soap/envelope/"
"""SOAP 1.1, the only version Salesforce's outbound messages use."""

OUTBOUND_NS = "http://soap.sforce.com/2005/09/outbound"
"""The namespace of `notifications` and of the `notificationsResponse` acknowledgement."""

SOBJECT_NS = "urn:sobject.enterprise.soap.sforce.com"
"""The namespace of the sObject's fields (the enterprise WSDL's)."""

XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"

MAX_NOTIFICATIONS = 100
"""Salesforce's own bound (`maxOccurs="100"` in the outbound messaging WSDL); more is refused."""

MISSING_FIELD = "missing_field"
"""Skip reason: a configured field is not among the sObject's fields (not selected)."""

XML = "text/xml; charset=utf-8"

_SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
# Salesforce API names: a letter, then letters, digits and single underscores (custom fields end
# in __c, managed ones start with a namespace and __). The check catches typos at start-up.
_FIELD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,79}")
_ORG_ID = re.compile(r"00D[A-Za-z0-9]{12}(?:[A-Za-z0-9]{3})?")
_NOTIFICATION_ID = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")
# The 18-character form appends one character per 5-character chunk of the 15, naming which of
# the chunk's characters are upper case (bit i for position i) in this alphabet.
_CHECKSUM_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
# Characters XML 1.0 cannot carry at all, even escaped; a fault quotes untrusted text.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_QUOTED_CHARS = 40
_LISTED_VALUES = 3

_ACK = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    f'<soapenv:Envelope xmlns:soapenv="{SOAP_ENVELOPE_NS}">'
    "<soapenv:Body>"
    f'<notificationsResponse xmlns="{OUTBOUND_NS}"><Ack>true</Ack></notificationsResponse>'
    "</soapenv:Body>"
    "</soapenv:Envelope>"
).encode()


class SalesforceSource(SourceSettings):
    """`[sources.NAME]` with `kind = "salesforce"`: Salesforce Outbound Messages.

    Salesforce does not sign outbound messages; `organization_id` (Setup > Company Information,
    15 or 18 characters; compared on its first 15, case-sensitively) is what identifies the
    sender, with `allowed_networks` (CIDRs; empty admits any address) where Salesforce's IP
    ranges can be listed. `trusted_proxies` are the CIDRs of reverse proxies whose
    `X-Forwarded-For` is believed. `contact_id_field` is the sObject field holding the CXone
    contact id; `segments_field` the multi-select picklist (`;`-separated) listing the contact's
    segments; `occurred_at_field`, if set, an xsd:dateTime field (`LastModifiedDate`) that
    orders changes, else they are ordered by arrival. `absent_segments_field` says what a
    notification without the segments field means: `clear` (out of every segment; Salesforce
    omits empty fields) or `skip`.
    """

    required_keys: ClassVar[tuple[str, ...]] = ("organization_id",)

    kind: Literal["salesforce"] = "salesforce"
    organization_id: str = ""
    contact_id_field: str = "Id"
    segments_field: str = "CXone_Segments__c"
    occurred_at_field: str = ""
    absent_segments_field: Literal["clear", "skip"] = "clear"
    allowed_networks: list[str] = []
    trusted_proxies: list[str] = []

    @field_validator("organization_id")
    @classmethod
    def _check_organization_id(cls, value: str) -> str:
        # Empty is left to the config check, which reports every missing required key at once.
        if value:
            check_organization_id(value)
        return value

    @field_validator("contact_id_field", "segments_field")
    @classmethod
    def _check_field_name(cls, value: str) -> str:
        return check_field_name(value)

    @field_validator("occurred_at_field")
    @classmethod
    def _check_optional_field_name(cls, value: str) -> str:
        return check_field_name(value) if value else value

    @field_validator("allowed_networks", "trusted_proxies")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        parse_networks(value)
        return value


def check_organization_id(value: str) -> None:
    """Raise ValueError unless `value` is a Salesforce organization id (15 or 18 characters).

    An organization id starts with the key prefix `00D`; the 18-character form's last three
    characters must be the case checksum of the first 15, which catches a mistyped character.
    """
    if _ORG_ID.fullmatch(value) is None:
        raise ValueError(
            "must be a Salesforce organization id: 15 or 18 letters and digits starting with "
            "00D (Setup > Company Information > Salesforce.com Organization ID)"
        )
    # The suffix itself is read case-insensitively by Salesforce (that is its purpose).
    if len(value) == 18 and value[15:].upper() != id_checksum(value[:15]):
        raise ValueError(
            f"the last three characters of an 18-character id are the case checksum of the "
            f"first 15, {id_checksum(value[:15])!r} here; check the id was copied exactly"
        )


def id_checksum(id15: str) -> str:
    """The three characters that turn a 15-character Salesforce id into its 18-character form."""
    suffix = ""
    for start in range(0, 15, 5):
        bits = sum(1 << i for i, char in enumerate(id15[start : start + 5]) if "A" <= char <= "Z")
        suffix += _CHECKSUM_ALPHABET[bits]
    return suffix


def check_field_name(value: str) -> str:
    """`value` if it is a Salesforce field API name (`Id`, `CXone_Segments__c`), else ValueError."""
    if _FIELD_NAME.fullmatch(value) is None:
        raise ValueError(
            "must be a Salesforce field API name (a letter, then up to 79 letters, digits or "
            "underscores, such as CXone_Segments__c), not a label"
        )
    return value


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(values: list[str]) -> tuple[Network, ...]:
    """The CIDRs as networks; ValueError naming the first one that is not a network."""
    networks: list[Network] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip()))
        except ValueError as exc:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f"; did you mean {ipaddress.ip_network(value.strip(), strict=False)}?"
            raise ValueError(f"{value!r} is not a CIDR network ({exc}){hint}") from None
    return tuple(networks)


class SalesforceAdapter:
    """A `salesforce` source: one Outbound Message of up to 100 notifications, a SOAP answer.

    Messages have no per-delivery key (`authenticate` returns None); every notification's `Id`
    is its own key, so a retried message adds nothing it already gave. See the module docstring
    for what is skipped, dead-lettered and refused.
    """

    kind: ClassVar[str] = "salesforce"
    skip_reasons: ClassVar[frozenset[str]] = frozenset({MISSING_FIELD})

    __slots__ = (
        "_allowed",
        "_contact_id_field",
        "_occurred_at_field",
        "_organization_id",
        "_proxies",
        "_segments_field",
        "_skip_absent_segments",
    )

    def __init__(self, settings: SalesforceSource) -> None:
        if not settings.organization_id:
            # Without it any org could write memberships: refuse to start, never accept all.
            raise ValueError("salesforce source: organization_id is required")
        check_organization_id(settings.organization_id)
        self._organization_id = settings.organization_id[:15]
        self._contact_id_field = check_field_name(settings.contact_id_field)
        self._segments_field = check_field_name(settings.segments_field)
        self._skip_absent_segments = settings.absent_segments_field == "skip"
        self._occurred_at_field = settings.occurred_at_field
        if self._occurred_at_field:
            check_field_name(self._occurred_at_field)
        self._allowed = parse_networks(settings.allowed_networks)
        self._proxies = parse_networks(settings.trusted_proxies)

    def __repr__(self) -> str:
        return (
            f"SalesforceAdapter(organization_id={self._organization_id!r}, "
            f"contact_id_field={self._contact_id_field!r}, "
            f"segments_field={self._segments_field!r}, "
            f"occurred_at_field={self._occurred_at_field!r}, "
            f"allowed_networks={len(self._allowed)}, trusted_proxies={len(self._proxies)})"
        )

    def authenticate(self, request: InboundRequest) -> str | None:
        """Refuse (403) a client outside `allowed_networks`; the org id is checked in `parse`."""
        if not self._allowed:
            return None
        client, where = self.client_address(request)
        if not any(client.version == net.version and client in net for net in self._allowed):
            raise WebhookRejected(
                403, f"{where}: client address {client} is not in allowed_networks", where
            )
        return None

    def client_address(self, request: InboundRequest) -> tuple[Address, str]:
        """The client's address and where it was read (`peer` or `x-forwarded-for`).

        Behind a trusted proxy, the right-most `X-Forwarded-For` entry that is not itself a
        trusted proxy: entries to its left were written by the client and prove nothing.
        """
        if request.peer is None:
            raise WebhookRejected(403, "peer: the client address is unknown", "peer")
        peer = _address(request.peer)
        if peer is None:
            raise WebhookRejected(403, "peer: the client address is not an IP address", "peer")
        if not self._trusted(peer):
            return peer, "peer"
        entries = _forwarded_for(request)
        client = peer
        for entry in reversed(entries):
            address = _address(entry)
            if address is None:
                raise WebhookRejected(
                    403,
                    f"x-forwarded-for: entry {_quoted(entry)} is not an IP address",
                    "x-forwarded-for",
                )
            client = address
            if not self._trusted(address):
                break
        return client, "x-forwarded-for" if entries else "peer"

    def _trusted(self, address: Address) -> bool:
        return any(address.version == net.version and address in net for net in self._proxies)

    def parse(self, request: InboundRequest) -> ParsedDelivery:
        """The message's notifications: taken, skipped or dead-lettered, each keyed by its Id."""
        notifications = _notifications(request.body)
        self._check_organization(notifications)
        elements = notifications.findall(f"{{{OUTBOUND_NS}}}Notification")
        if not elements:
            raise WebhookRejected(
                400, "notifications: no Notification element", "notifications.Notification"
            )
        if len(elements) > MAX_NOTIFICATIONS:
            raise WebhookRejected(
                422,
                f"notifications: {len(elements)} Notification elements; Salesforce sends at "
                f"most {MAX_NOTIFICATIONS} per message",
                "notifications.Notification",
            )
        delivery = ParsedDelivery()
        for index, element in enumerate(elements):
            self._notification(element, f"Notification[{index}]", delivery)
        return delivery

    def _check_organization(self, notifications: Element) -> None:
        # SessionId, EnterpriseUrl and PartnerUrl are never read: segmapd makes no calls back to
        # Salesforce, and the session id is a credential that must not reach a log.
        sent = _text(notifications, f"{{{OUTBOUND_NS}}}OrganizationId")
        if sent is None:
            raise WebhookRejected(
                400, "notifications.OrganizationId: required", "notifications.OrganizationId"
            )
        if len(sent) not in (15, 18) or not hmac.compare_digest(
            sent[:15].encode("utf-8", "replace"), self._organization_id.encode()
        ):
            # The expected id is not quoted: it is the one thing a forger would need.
            raise WebhookRejected(
                403,
                f"notifications.OrganizationId: {_quoted(sent)} is another org than this "
                f"source accepts",
                "notifications.OrganizationId",
            )
        # Salesforce's 18-character ids always end in the case checksum of their first 15 (the
        # config check insists on it too): any other suffix is not from Salesforce.
        if len(sent) == 18 and sent[15:].upper() != id_checksum(sent[:15]):
            raise WebhookRejected(
                400,
                f"notifications.OrganizationId: {_quoted(sent)}: the last three characters of "
                f"an 18-character id are the case checksum of the first 15, "
                f"{id_checksum(sent[:15])!r} here; Salesforce never sends another",
                "notifications.OrganizationId",
            )

    def _notification(self, element: Element, path: str, delivery: ParsedDelivery) -> None:
        key = _text(element, f"{{{OUTBOUND_NS}}}Id")
        if key is None or _NOTIFICATION_ID.fullmatch(key) is None:
            problem = "required" if key is None else f"not a Salesforce id: {_quoted(key)}"
            raise WebhookRejected(400, f"{path}.Id: {problem}", f"{path}.Id")
        sobject = element.find(f"{{{OUTBOUND_NS}}}sObject")
        if sobject is None:
            raise WebhookRejected(400, f"{path}.sObject: required", f"{path}.sObject")
        fields = _fields(sobject, f"{path}.sObject")
        missing = [self._contact_id_field] if self._contact_id_field not in fields else []
        if self._segments_field not in fields:
            if self._skip_absent_segments:
                missing.append(self._segments_field)
            else:
                fields[self._segments_field] = ""  # how Salesforce sends a cleared picklist
        if missing:
            delivery.skipped.append(
                SkippedEvent(
                    MISSING_FIELD,
                    f"{path} (notification {key}): sObject has no {', '.join(missing)}; select "
                    f"the field(s) on the outbound message",
                    key,
                )
            )
            return
        contact_id = fields[self._contact_id_field].strip()
        values = [value.strip() for value in fields[self._segments_field].split(";")]
        values = [value for value in values if value]
        occurred_at = None
        stamp = fields.get(self._occurred_at_field, "").strip()
        if self._occurred_at_field and stamp:
            # An absent, nil or empty time leaves the change in arrival order; a bad one
            # refuses the message (see the module docstring), whatever else is wrong.
            try:
                occurred_at = parse_occurred_at(stamp, path)
            except WebhookRejected as rejection:
                raise WebhookRejected(rejection.status, *self._renamed(rejection, path)) from None
        valid: list[str] = []
        invalid: list[tuple[int, str]] = []  # (index in the picklist, value as sent)
        for index, value in enumerate(values):
            if ID_PATTERN.fullmatch(value) is None:
                invalid.append((index, value))
            else:
                valid.append(value)
        # Beyond the cap no part of the list can be taken: parse_event refuses all of it.
        taken = values if len(values) > MAX_SEGMENTS_PER_EVENT else valid
        try:
            change = parse_event({"contactId": contact_id, "set": taken}, path)
        except WebhookRejected as rejection:
            # The dead letter keeps what the notification asked, its values as sent.
            asked = MembershipChange(contact_id, mirror=tuple(values), occurred_at=occurred_at)
            delivery.dead.append(self._dead(rejection, path, key, asked))
            return
        change = dataclasses.replace(change, occurred_at=occurred_at)
        dead_part = self._invalid_part(change, invalid, path, key) if invalid else None
        delivery.events.append(InboundEvent(change, key, dead_part))

    def _invalid_part(
        self, change: MembershipChange, invalid: list[tuple[int, str]], path: str, key: str
    ) -> DeadEvent:
        """The picklist values that are no segment id, for the dead letter beside `change`.

        `change` is the notification's valid rest, a mirror of its valid values: the contact
        keeps the segments still listed and leaves those no longer listed.
        """
        where = f"{path}.sObject.{self._segments_field}"
        shown = [f"{_quoted(value)} ({id_problem(value)})" for _, value in invalid[:_LISTED_VALUES]]
        if len(invalid) == 1:
            index = invalid[0][0]
            what = f"{where}[{index}]: value {shown[0]} is no CXone segment id"
        else:
            listed = ", ".join(
                f"[{index}] {text}" for (index, _), text in zip(invalid, shown, strict=False)
            )
            more = len(invalid) - _LISTED_VALUES
            listed += f" and {more} more" if more > 0 else ""
            what = f"{where}: values {listed} are no CXone segment ids"
        message = (
            f"{what} ({ID_RULE}); the notification was taken without "
            f"{'them' if len(invalid) > 1 else 'it'}. Make each picklist value's API name the "
            f"CXone segment id (notification {key})"
        )
        as_sent = tuple(value for _, value in invalid)
        asked = MembershipChange(change.contact_id, add=as_sent, occurred_at=change.occurred_at)
        # No key of its own: it is taken, or known as redelivered, with its notification.
        return dead_event(asked, FailureReason.SEGMENT_NOT_FOUND, message)

    def _renamed(self, rejection: WebhookRejected, path: str) -> tuple[str, str]:
        """The rejection's message and field with the sObject's own field names.

        parse_event names segmapd's keys; the sender knows its fields by their Salesforce names.
        """
        where = rejection.field or path
        names = {
            f"{path}.contactId": f"{path}.sObject.{self._contact_id_field}",
            f"{path}.set": f"{path}.sObject.{self._segments_field}",
            f"{path}.occurredAt": f"{path}.sObject.{self._occurred_at_field}",
        }
        for ours, theirs in names.items():
            if where.startswith(ours):
                return rejection.message.replace(ours, theirs, 1), where.replace(ours, theirs, 1)
        return rejection.message, where

    def _dead(
        self, rejection: WebhookRejected, path: str, key: str, asked: MembershipChange
    ) -> DeadEvent:
        """The whole notification dead-lettered for `rejection` (its contact id, or the cap)."""
        message, _ = self._renamed(rejection, path)
        reason = (
            FailureReason.INVALID_CONTACT_ID
            if (rejection.field or "").startswith(f"{path}.contactId")
            else FailureReason.SEGMENT_NOT_FOUND
        )
        # The notification id lets the admin find it in Salesforce's outbound message monitor.
        return dead_event(asked, reason, f"{message} (notification {key})", key)

    def accepted(self, outcome: Outcome) -> Reply:
        """200 with `<Ack>true</Ack>`: Salesforce's only success answer (it has no counts)."""
        return Reply(200, _ACK, XML)

    def replayed(self, earlier: bytes) -> Reply:
        """200 with the first answer (the same acknowledgement)."""
        return Reply(200, earlier, XML)

    def refused(self, rejection: WebhookRejected) -> Reply:
        """A SOAP 1.1 Client fault with the rejection's status and message."""
        return Reply(rejection.status, soap_fault("soapenv:Client", rejection.message), XML)

    def busy(self, message: str, retry_after_s: float) -> Reply:
        """503, a SOAP 1.1 Server fault and `Retry-After` (Salesforce retries on its schedule)."""
        return Reply(
            503,
            soap_fault("soapenv:Server", message),
            XML,
            {"Retry-After": str(max(1, math.ceil(retry_after_s)))},
        )


def soap_fault(code: str, message: str) -> bytes:
    """A SOAP 1.1 envelope holding one Fault with `code` and `message` as its faultstring."""
    text = escape(_NOT_XML_CHAR.sub("?", message))
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soapenv:Envelope xmlns:soapenv="{SOAP_ENVELOPE_NS}">'
        "<soapenv:Body><soapenv:Fault>"
        f"<faultcode>{code}</faultcode><faultstring>{text}</faultstring>"
        "</soapenv:Fault></soapenv:Body>"
        "</soapenv:Envelope>"
    ).encode()


def _notifications(body: bytes) -> Element:
    """The `notifications` element of a SOAP 1.1 envelope, parsed without DTDs or entities."""
    try:
        root = SafeElementTree.fromstring(
            body, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except DefusedXmlException:
        # The exception names the DTD or entity (possibly a local path): it stays out of replies.
        raise WebhookRejected(
            400, "body: a DTD or entity declaration is not allowed in an outbound message", "body"
        ) from None
    except ParseError as exc:
        raise WebhookRejected(400, f"body: not well-formed XML ({exc})", "body") from None
    except (LookupError, ValueError):  # an unknown encoding declaration, say
        raise WebhookRejected(400, "body: not readable XML (its encoding)", "body") from None
    envelope = f"{{{SOAP_ENVELOPE_NS}}}Envelope"
    if root.tag != envelope:
        version = " (this is SOAP 1.2; outbound messages are SOAP 1.1)"
        detail = version if root.tag == f"{{{_SOAP12_NS}}}Envelope" else ""
        raise WebhookRejected(
            400, f"body: not a SOAP 1.1 envelope (the root is {_tag(root)}){detail}", "body"
        )
    soap_body = root.find(f"{{{SOAP_ENVELOPE_NS}}}Body")
    if soap_body is None:
        raise WebhookRejected(400, "Envelope: no soapenv:Body", "Envelope.Body")
    notifications = soap_body.find(f"{{{OUTBOUND_NS}}}notifications")
    if notifications is None:
        raise WebhookRejected(
            400,
            f"Body: no notifications element in namespace {OUTBOUND_NS}; is this an outbound "
            f"message?",
            "Body.notifications",
        )
    return notifications


def _fields(sobject: Element, path: str) -> dict[str, str]:
    """The sObject's fields by name; a nil or empty field is ""."""
    fields: dict[str, str] = {}
    prefix = f"{{{SOBJECT_NS}}}"
    for child in sobject:
        if not isinstance(child.tag, str) or not child.tag.startswith(prefix):
            continue
        name = child.tag[len(prefix) :]
        if name in fields:
            # Two values for one field: which one Salesforce meant cannot be known.
            raise WebhookRejected(
                400,
                f"{path}.{_bounded(name)}: appears more than once",
                f"{path}.{_bounded(name)}",
            )
        nil = child.get(f"{{{XSI_NS}}}nil", "").strip() in ("true", "1")
        fields[name] = "" if nil else "".join(child.itertext())
    return fields


def _text(parent: Element, tag: str) -> str | None:
    child = parent.find(tag)
    if child is None:
        return None
    return "".join(child.itertext()).strip()


def _address(text: str) -> Address | None:
    """An IP address from a peer or `X-Forwarded-For` entry (`[v6]:port`, `v4:port` too)."""
    candidate = text.strip()
    if candidate.startswith("["):
        candidate = candidate[1:].partition("]")[0]
    elif candidate.count(":") == 1:
        candidate = candidate.partition(":")[0]
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; the allow-list says a.b.c.d.
        return address.ipv4_mapped
    return address


def _forwarded_for(request: InboundRequest) -> list[str]:
    """Every `X-Forwarded-For` entry, in order, across repeated headers."""
    getall = getattr(request.headers, "getall", None)
    if getall is not None:
        values: list[str] = list(getall("X-Forwarded-For", []))
    else:
        value = request.header("x-forwarded-for")
        values = [] if value is None else [value]
    return [entry.strip() for value in values for entry in value.split(",") if entry.strip()]


def _tag(element: Element) -> str:
    return _quoted(str(element.tag))


def _bounded(text: str) -> str:
    return text[:_QUOTED_CHARS]


def _quoted(text: str) -> str:
    return repr(text[:_QUOTED_CHARS]) + ("..." if len(text) > _QUOTED_CHARS else "")
