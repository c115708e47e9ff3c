"""Header bytes that are not text, sent raw over a socket to the real daemon.

aiohttp hands such bytes to the application as lone surrogates (`surrogateescape`); whatever
reads a header must answer them with a 4xx in the sender's protocol, never a 500 and an
error-level log line that anyone could provoke at will.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import orjson
import pytest

from tests.e2e.conftest import Daemon, StartDaemon
from tests.e2e.test_crm_sources import GITHUB_SECRET, SOURCES
from tests.e2e.test_intake_hardening import error_lines, exchange

BAD = b"\xff\xfe\x80"


def request(method: str, path: str, headers: list[bytes], body: bytes = b"") -> bytes:
    """A raw HTTP/1.1 request; each header line is given as bytes, sent exactly so."""
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: segmapd.test"]
    head += headers
    head += [b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def start(start_daemon: StartDaemon) -> Daemon:
    sections: dict[str, dict[str, Any]] = {name: dict(values) for name, values in SOURCES.items()}
    # Behind a trusted proxy, X-Forwarded-For is read: its bad bytes must be refused too.
    sections["sources.salesforce"]["trusted_proxies"] = ["127.0.0.0/8"]
    sections["sources.salesforce"]["allowed_networks"] = ["127.0.0.0/8"]
    return await start_daemon(**sections)


async def test_undecodable_bytes_in_the_admin_token_are_a_401_problem_and_no_error_log(
    start_daemon: StartDaemon, capfd: pytest.CaptureFixture[str]
):
    daemon = await start(start_daemon)
    token = daemon.admin_token.encode()
    authorizations = [
        b"Authorization: Bearer " + BAD,
        b"Authorization: Bearer " + token + BAD,
        b"Authorization: " + BAD + b" " + token,
    ]
    admin_calls = [
        ("GET", "/v1/contacts/100000000123", b""),
        ("GET", "/v1/dead-letters", b""),
        ("POST", "/v1/dead-letters/replay", b"{}"),
        ("POST", "/v1/mappings", b'{"contactId": "1", "segmentIds": ["VIP"]}'),
    ]
    for method, path, body in admin_calls:
        for authorization in authorizations:
            headers = [authorization, b"Content-Type: application/json"]
            status, answer_headers, answer = await exchange(
                daemon, request(method, path, headers, body)
            )
            assert status == 401, (method, path, authorization, answer)
            assert answer_headers["content-type"].startswith("application/json")
            assert orjson.loads(answer)["error"] == "Unauthorized"
    daemon.process.stop()
    assert error_lines(capfd.readouterr().err) == []


def github_signature(body: bytes) -> bytes:
    digest = hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return b"X-Hub-Signature-256: sha256=" + digest.encode()


async def test_undecodable_bytes_in_any_signature_header_of_any_kind_are_refused_in_its_protocol(
    start_daemon: StartDaemon, capfd: pytest.CaptureFixture[str]
):
    daemon = await start(start_daemon)
    now = str(int(time.time())).encode()
    now_ms = str(int(time.time() * 1000)).encode()
    github_body = b'{"changes": []}'
    soap = b'<?xml version="1.0"?><x/>'
    json_type = b"Content-Type: application/json"
    xml_type = b"Content-Type: text/xml"
    msg_id, stamp = b"webhook-id: msg_1", b"webhook-timestamp: " + now
    hubspot_stamp = b"X-HubSpot-Request-Timestamp: "
    zendesk_signature = b"X-Zendesk-Webhook-Signature: "
    zendesk_stamp = b"X-Zendesk-Webhook-Signature-Timestamp: "
    cases: list[tuple[str, list[bytes], bytes, int]] = [
        # Standard Webhooks: each of its three headers.
        ("crm", [b"webhook-id: " + BAD, stamp, b"webhook-signature: v1,x"], b"{}", 401),
        ("crm", [msg_id, b"webhook-timestamp: " + BAD, b"webhook-signature: v1,x"], b"{}", 401),
        ("crm", [msg_id, stamp, b"webhook-signature: v1," + BAD], b"{}", 401),
        ("crm", [msg_id, stamp, b"webhook-signature: " + BAD], b"{}", 401),
        # HubSpot: v3 and its timestamp, and the legacy version header and signature.
        ("hubspot", [b"X-HubSpot-Signature-v3: " + BAD, hubspot_stamp + now_ms], b"[]", 401),
        ("hubspot", [b"X-HubSpot-Signature-v3: abc=", hubspot_stamp + BAD], b"[]", 401),
        (
            "hubspot",
            [b"X-HubSpot-Signature-Version: " + BAD, b"X-HubSpot-Signature: " + BAD],
            b"[]",
            401,
        ),
        # Salesforce signs nothing; the address it is checked by comes from X-Forwarded-For.
        ("salesforce", [b"X-Forwarded-For: " + BAD, xml_type], soap, 403),
        ("salesforce", [b"X-Forwarded-For: 10.0.0.1, " + BAD, xml_type], soap, 403),
        # JSON kinds: the signature, a signed timestamp, a delivery id header.
        ("github", [b"X-Hub-Signature-256: sha256=" + BAD, json_type], github_body, 401),
        ("github", [b"X-Hub-Signature-256: " + BAD, json_type], github_body, 401),
        (
            "github",
            [github_signature(github_body), b"X-GitHub-Delivery: " + BAD, json_type],
            github_body,
            400,
        ),
        ("zendesk", [zendesk_signature + BAD, zendesk_stamp + b"2026-01-01T00:00:00Z"], b"{}", 401),
        ("zendesk", [zendesk_signature + b"YWJj", zendesk_stamp + BAD], b"{}", 401),
    ]
    for source, headers, body, expected in cases:
        status, answer_headers, answer = await exchange(
            daemon, request("POST", f"/v1/webhooks/{source}", headers, body)
        )
        assert status == expected, (source, headers, answer)
        if source == "salesforce":
            assert answer_headers["content-type"].startswith("text/xml")
            assert b"<soapenv:Fault>" in answer
        else:
            assert answer_headers["content-type"].startswith("application/json")
            assert set(orjson.loads(answer)) >= {"error", "message"}
    # A header nothing reads changes nothing.
    status, _, _ = await exchange(
        daemon, request("GET", "/healthz", [b"User-Agent: " + BAD, b"Accept: " + BAD])
    )
    assert status == 200
    daemon.process.stop()
    assert error_lines(capfd.readouterr().err) == []
