"""The one error every listener raises: a refused delivery, with the HTTP status to answer."""

from __future__ import annotations

# 5xx is deliberately absent: a listener only ever judges the request, and an internal failure
# answered with a 4xx would make the sender drop a delivery it should retry.
REJECTION_STATUSES = frozenset({400, 401, 403, 413, 415, 422})


class WebhookRejected(Exception):
    """A delivery refused before anything was journaled.

    `status` is the HTTP status to answer: 401 (not authenticated: a signature header is missing,
    malformed, stale or does not match), 403 (authenticated as, or sent from, someone this
    source does not accept: another organisation, a network not allowed), 400 (the body is not a
    usable document), 413 (too large), 415 (not the media type the kind takes), 422 (a
    well-formed document with an unacceptable value). `message` says what is wrong
    and where; `field` is that location alone (a header name such as `webhook-signature`, or a
    JSON path such as `body[2].segmentIds[0]`), or None.

    Messages go back to the sender and into logs, so they never contain a secret or a signature.
    """

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        if status not in REJECTION_STATUSES:
            raise ValueError(f"WebhookRejected status must be one of {sorted(REJECTION_STATUSES)}")
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def __repr__(self) -> str:
        return f"WebhookRejected({self.status}, {self.message!r}, field={self.field!r})"
