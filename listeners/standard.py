"""Verifying Standard Webhooks deliveries (https://www.standardwebhooks.com/).

The reference library's `Webhook.verify()` is not used: its tolerance is fixed at five minutes,
it raises ValueError (not a verification error) on a signature entry without a comma or with bad
base64, it decodes the body as UTF-8 before checking it, and it never returns the delivery id.
The HMAC itself is in `listeners.signing`, shared with the sending side.
"""

from __future__ import annotations

import base64
import hmac
import time
from collections.abc import Mapping
from typing import ClassVar, Literal

from pydantic import Field, SecretStr

from listeners.base import (
    InboundEvent,
    InboundRequest,
    JsonReplies,
    ParsedDelivery,
    SourceSettings,
)
from listeners.errors import WebhookRejected
from listeners.payload import parse_events
from listeners.signing import (
    ID_HEADER,
    MSG_ID_PATTERN,
    MSG_ID_RULE,
    SIGNATURE_HEADER,
    SIGNATURE_VERSION,
    TIMESTAMP_HEADER,
    SigningKey,
    decode_secret,
)

# Unix seconds have 10 digits until 2286; the bound only keeps int() away from huge inputs.
_MAX_TIMESTAMP_DIGITS = 15


class StandardSource(SourceSettings):
    """`[sources.NAME]` with `kind = "standard"`: segmapd's own event body, Standard Webhooks.

    `secret` is the `whsec_<base64>` signing secret (or `secret_file`); `tolerance_s` how far
    `webhook-timestamp` may be from the receiver's clock, either way.
    """

    required_keys: ClassVar[tuple[str, ...]] = ("secret",)

    kind: Literal["standard"] = "standard"
    secret: SecretStr = SecretStr("")
    tolerance_s: int = Field(default=300, ge=1, le=86_400)


class StandardAdapter(JsonReplies):
    """A `standard` source: one signed delivery of one event or an array of events.

    The redelivery key is the delivery's `webhook-id`: a repeat is answered with the first
    answer without being parsed again.
    """

    kind: ClassVar[str] = "standard"
    skip_reasons: ClassVar[frozenset[str]] = frozenset()

    __slots__ = ("_verifier",)

    def __init__(self, settings: StandardSource) -> None:
        self._verifier = StandardWebhookVerifier(
            settings.secret.get_secret_value(), settings.tolerance_s
        )

    def __repr__(self) -> str:
        return f"StandardAdapter({self._verifier!r})"

    @property
    def verifier(self) -> StandardWebhookVerifier:
        """The signature check (the benchmark's reference handler uses it alone)."""
        return self._verifier

    def authenticate(self, request: InboundRequest) -> str | None:
        """The delivery's `webhook-id`, once its signature and timestamp check out."""
        return self._verifier.verify(request.headers, request.body, now=request.received_at)

    def parse(self, request: InboundRequest) -> ParsedDelivery:
        """The body's events (see `listeners.payload`), all or nothing."""
        return ParsedDelivery(events=[InboundEvent(e) for e in parse_events(request.body)])


class StandardWebhookVerifier:
    """Checks `webhook-id`, `webhook-timestamp` and `webhook-signature` for one source.

    `secret` is `whsec_<base64>`; a secret that is not usable raises ValueError here, at
    start-up, rather than turning every delivery into a 401. Several `v1,` signatures may be
    sent (secret rotation): one match is enough; entries of other versions are ignored.
    """

    __slots__ = ("_key", "_tolerance_s")

    def __init__(self, secret: str, tolerance_s: int) -> None:
        if type(tolerance_s) is not int or tolerance_s < 1:
            raise ValueError("tolerance_s must be a positive whole number of seconds")
        self._key = SigningKey(decode_secret(secret))
        self._tolerance_s = tolerance_s

    def __repr__(self) -> str:
        # The key stays out of reprs: they end up in logs and tracebacks.
        return f"StandardWebhookVerifier(tolerance_s={self._tolerance_s})"

    @property
    def tolerance_s(self) -> int:
        """How far `webhook-timestamp` may be from the receiver's clock, either way."""
        return self._tolerance_s

    def verify(self, headers: Mapping[str, str], body: bytes, now: float | None = None) -> str:
        """Return the delivery's `webhook-id` once its signature and timestamp check out.

        `headers` may be case-insensitive (aiohttp's) or a plain dict; `body` is the raw bytes
        as received; `now` (Unix seconds) defaults to the clock. Every failure is a
        `WebhookRejected` with status 401 naming the header at fault.
        """
        msg_id = _header(headers, ID_HEADER)
        if MSG_ID_PATTERN.fullmatch(msg_id) is None:
            raise WebhookRejected(401, f"header {ID_HEADER}: {MSG_ID_RULE}", ID_HEADER)
        stamp = _header(headers, TIMESTAMP_HEADER)
        # isdigit() alone would admit non-ASCII digits, which int() accepts but senders never sign.
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= _MAX_TIMESTAMP_DIGITS):
            raise WebhookRejected(
                401,
                f"header {TIMESTAMP_HEADER}: must be Unix time in whole seconds",
                TIMESTAMP_HEADER,
            )
        current = time.time() if now is None else now
        skew = int(stamp) - current
        if abs(skew) > self._tolerance_s:
            raise WebhookRejected(
                401,
                f"header {TIMESTAMP_HEADER}: timestamp outside tolerance "
                f"({skew:+.0f} s from the receiver's clock, allowed ±{self._tolerance_s} s)",
                TIMESTAMP_HEADER,
            )
        offered = _header(headers, SIGNATURE_HEADER)
        expected = self._key.signature(msg_id, stamp, body)
        for entry in offered.split():
            version, comma, encoded = entry.partition(",")
            if not comma or version != SIGNATURE_VERSION:
                continue
            try:
                candidate = base64.b64decode(encoded, validate=True)
            except ValueError:  # binascii.Error, or non-ASCII text
                continue
            if hmac.compare_digest(expected, candidate):
                return msg_id
        raise WebhookRejected(
            401,
            f"header {SIGNATURE_HEADER}: no {SIGNATURE_VERSION} signature matches this delivery",
            SIGNATURE_HEADER,
        )


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:
        # aiohttp's headers are case-insensitive; a plain dict (tests, the CLI) may not be.
        for key, candidate in headers.items():
            if key.lower() == name:
                value = candidate
                break
    if not value:
        raise WebhookRejected(401, f"header {name}: missing", name)
    return value
