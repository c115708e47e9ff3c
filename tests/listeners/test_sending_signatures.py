"""The sending side of HubSpot's signatures (`segmapd send-example`) against the adapter's check.

HubSpot's published examples pin the computation; the adapter then accepts what the
sending side signs, for a target URL holding the encodings HubSpot decodes before signing.
"""

from __future__ import annotations

import time

from pydantic import SecretStr

from listeners import HubSpotAdapter, HubSpotSource, InboundRequest
from listeners.signing import hubspot_legacy_signature, hubspot_v3_signature
from tests.listeners.test_hubspot import (
    DOC_SECRET,
    DOC_URL,
    DOC_V1_BODY,
    DOC_V1_SIGNATURE,
    DOC_V3_BODY,
    DOC_V3_SIGNATURE,
    DOC_V3_TIMESTAMP,
)

SECRET = "hubspot-client-secret"


def request(headers: dict[str, str], body: bytes) -> InboundRequest:
    return InboundRequest(
        method="POST",
        path_qs="/v1/webhooks/hubspot",
        query_string="",
        headers=headers,
        body=body,
        peer="127.0.0.1",
        received_at=time.time(),
    )


def test_v3_and_v1_match_hubspots_published_examples() -> None:
    signature = hubspot_v3_signature(DOC_SECRET, "POST", DOC_URL, DOC_V3_BODY, DOC_V3_TIMESTAMP)
    assert signature == DOC_V3_SIGNATURE
    assert hubspot_legacy_signature(DOC_SECRET, "v1", "POST", "", DOC_V1_BODY) == (DOC_V1_SIGNATURE)


def test_the_adapter_accepts_what_the_sending_side_signs() -> None:
    # %3A and %40 are decoded before signing; %20 is not (HubSpot's list).
    url = "https://segmapd.example.com/hooks%3Ahubspot/%40crm/a%20b"
    body = b"[]"
    stamp = str(int(time.time() * 1000))
    v3 = {
        "x-hubspot-signature-v3": hubspot_v3_signature(SECRET, "POST", url, body, stamp),
        "x-hubspot-request-timestamp": stamp,
    }
    source = HubSpotSource(client_secret=SecretStr(SECRET), public_url=url)
    assert HubSpotAdapter(source).verifier.verify(request(v3, body)) == "v3"
    for version in ("v2", "v1"):
        legacy = {
            "x-hubspot-signature-version": version,
            "x-hubspot-signature": hubspot_legacy_signature(SECRET, version, "POST", url, body),
        }
        only = HubSpotSource(
            client_secret=SecretStr(SECRET), public_url=url, signature_versions=[version]
        )
        assert HubSpotAdapter(only).verifier.verify(request(legacy, body)) == version
