"""What the HTTP route needs from any inbound webhook kind."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Verifier(Protocol):
    """Authenticates one delivery of one webhook source."""

    def verify(self, headers: Mapping[str, str], body: bytes, now: float | None = None) -> str:
        """Return the sender's delivery id, or raise `WebhookRejected` (never anything else)."""
        ...
