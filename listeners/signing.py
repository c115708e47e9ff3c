"""Standard Webhooks signatures: the secret, the HMAC, and the three headers a sender sets.

Per https://www.standardwebhooks.com/ the signed content is
`{webhook-id}.{webhook-timestamp}.{body}` (the body as the exact bytes sent), the MAC is
HMAC-SHA256 keyed with the base64-decoded secret (its `whsec_` prefix removed), and
`webhook-signature` carries it as `v1,<base64>`.

Why not `standardwebhooks.Webhook` for this: its `sign()` takes the body as `str`, so a body that
is not UTF-8 cannot be checked byte for byte, and it decodes the secret with non-strict base64,
which silently drops characters that are not base64 (a mistyped secret becomes another key rather
than an error). The tests check this module against that library's `sign()` and against the
specification's published test vector.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

SECRET_PREFIX = "whsec_"  # noqa: S105 (a format marker, not a secret)
SIGNATURE_VERSION = "v1"
# The specification recommends 24-64 byte keys. Shorter keys are refused below 128 bits, where
# the value is more likely a placeholder (`whsec_test`) than a key anyone generated.
MIN_SECRET_BYTES = 16
# webhook-id is echoed into the signed content and kept as the redelivery key, so it is held to
# something a store and a log line can carry safely: visible ASCII, no spaces, bounded.
MSG_ID_PATTERN = re.compile(r"[\x21-\x7e]{1,256}")
MSG_ID_RULE = "must be 1-256 visible ASCII characters (no spaces)"

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


def decode_secret(secret: str) -> bytes:
    """The HMAC key in a `whsec_<base64>` secret (the prefix is optional, as in the reference).

    Raises ValueError, without quoting the secret, when it is empty, not base64 or too short.
    """
    encoded = secret.removeprefix(SECRET_PREFIX)
    if not encoded:
        raise ValueError("webhook secret is empty: expected whsec_ followed by base64")
    try:
        # Senders publish secrets with and without base64 padding; restore it, then be strict.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except ValueError:  # binascii.Error, or non-ASCII characters
        raise ValueError("webhook secret is not valid base64 after the whsec_ prefix") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(
            f"webhook secret is too short: {len(key)} bytes after base64 decoding, "
            f"at least {MIN_SECRET_BYTES} required"
        )
    return key


class SigningKey:
    """An HMAC-SHA256 key set up once; every signature starts from a copy of it.

    Keying HMAC anew costs a digest lookup and two SHA-256 blocks per call. The one-shot
    `hmac.digest()` is no better here: it gives up the GIL on every call, even for a few bytes,
    and under load the journal's writer thread then takes it and the event loop waits to get it
    back (it measured at 8-18 us per webhook in the daemon, against 1 us alone). A copied HMAC
    object keeps the GIL for messages below hashlib's 2 KiB threshold.
    """

    __slots__ = ("_mac",)

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return "SigningKey(<redacted>)"

    def signature(self, msg_id: str, timestamp: str, body: bytes) -> bytes:
        """The raw HMAC-SHA256 of `{msg_id}.{timestamp}.{body}`; `timestamp` exactly as sent."""
        mac = self._mac.copy()
        mac.update(b"%s.%s.%s" % (msg_id.encode("ascii"), timestamp.encode("ascii"), body))
        return mac.digest()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The `webhook-id`, `webhook-timestamp` and `webhook-signature` headers for `body`.

    `timestamp` is Unix time in whole seconds. Raises ValueError for a bad secret, or a `msg_id`
    or `timestamp` that a verifier would refuse.
    """
    if MSG_ID_PATTERN.fullmatch(msg_id) is None:
        raise ValueError(f"msg_id {MSG_ID_RULE}")
    if type(timestamp) is not int or timestamp < 0:
        raise ValueError("timestamp must be a non-negative integer (Unix seconds)")
    stamp = str(timestamp)
    digest = SigningKey(decode_secret(secret)).signature(msg_id, stamp, body)
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}",
    }


# ---- the sending side of other kinds' signatures (`segmapd send-example`) --------------------

# The percent-encodings HubSpot's v3 instructions decode in the URI before signing, and no
# others: https://developers.hubspot.com/docs/api/webhooks/validating-requests
_HUBSPOT_V3_DECODED = {
    "%3A": ":",
    "%2F": "/",
    "%3F": "?",
    "%40": "@",
    "%21": "!",
    "%24": "$",
    "%27": "'",
    "%28": "(",
    "%29": ")",
    "%2A": "*",
    "%2C": ",",
    "%3B": ";",
}
_HUBSPOT_V3_ENCODED = re.compile("|".join(_HUBSPOT_V3_DECODED), re.IGNORECASE)


def hubspot_v3_digest(
    client_secret: bytes, method: str, uri: str, body: bytes, timestamp_ms: str
) -> bytes:
    """The HMAC-SHA256 a `X-HubSpot-Signature-v3` carries (base64) for a request to `uri`.

    Keyed with the app's client secret, over method + URI (with the encodings HubSpot lists
    decoded) + body + `X-HubSpot-Request-Timestamp` (epoch ms, as sent). The HubSpot adapter
    checks deliveries with it; `send-example` signs with it.
    """
    decoded = _HUBSPOT_V3_ENCODED.sub(lambda found: _HUBSPOT_V3_DECODED[found[0].upper()], uri)
    content = b"".join(
        (method.encode("utf-8"), decoded.encode("utf-8"), body, timestamp_ms.encode("ascii"))
    )
    return hmac.new(client_secret, content, hashlib.sha256).digest()


def hubspot_v3_signature(
    client_secret: str, method: str, uri: str, body: bytes, timestamp_ms: str
) -> str:
    """`X-HubSpot-Signature-v3` as HubSpot computes it for a request to `uri`."""
    digest = hubspot_v3_digest(client_secret.encode("utf-8"), method, uri, body, timestamp_ms)
    return base64.b64encode(digest).decode("ascii")


def hubspot_legacy_signature(
    client_secret: str, version: str, method: str, uri: str, body: bytes
) -> str:
    """`X-HubSpot-Signature` of version `v2` or `v1`: hex SHA-256, as HubSpot computes it.

    v2 covers secret + method + URI + body; v1 secret + body.
    """
    secret = client_secret.encode("utf-8")
    if version == "v2":
        content = b"".join((secret, method.encode("utf-8"), uri.encode("utf-8"), body))
    elif version == "v1":
        content = secret + body
    else:
        raise ValueError(f"no HubSpot signature version {version!r}")
    return hashlib.sha256(content).hexdigest()
