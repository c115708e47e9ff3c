"""Inbound webhook adapters: signature checks and payload to MembershipChange."""

from __future__ import annotations

from typing import TYPE_CHECKING

from listeners.base import Verifier
from listeners.errors import WebhookRejected
from listeners.payload import MAX_EVENTS, MAX_SEGMENTS_PER_EVENT, parse_events
from listeners.signing import decode_secret, sign
from listeners.standard import StandardWebhookVerifier

if TYPE_CHECKING:
    # Only for the annotation: listeners must not import the daemon at run time (the daemon
    # imports listeners).
    from daemon.config import SourceConfig

__all__ = [
    "MAX_EVENTS",
    "MAX_SEGMENTS_PER_EVENT",
    "StandardWebhookVerifier",
    "Verifier",
    "WebhookRejected",
    "decode_secret",
    "make_verifier",
    "parse_events",
    "sign",
]


def make_verifier(source: SourceConfig) -> Verifier:
    """The verifier for one `[sources.NAME]` table; call it at start-up.

    Raises ValueError when the secret is unusable, and NotImplementedError for a kind that has
    no adapter yet: a source that cannot verify must stop the daemon, never accept unverified
    deliveries.
    """
    if source.kind == "standard":
        return StandardWebhookVerifier(source.secret.get_secret_value(), source.tolerance_s)
    raise NotImplementedError(
        f'webhook source kind "{source.kind}" is not implemented yet; '
        'only kind = "standard" (Standard Webhooks) is supported'
    )
