"""Idempotency keys for writes: one per distinct request body, never shared across segments."""

from __future__ import annotations

import uuid

MAX_KEY_LENGTH = 255


def new_batch_key(segment_id: str) -> str:
    """A fresh key for a new request body to `segment_id`.

    The key is random rather than derived from the body: the same ids sent again later as a new
    request (a replay from the dead-letter queue, say) must be applied, not answered from CXone's
    24-hour replay store with an old outcome. A resend of the *same* request reuses the key that
    was stored with it. The segment id is kept in the key only to make it readable in logs.
    """
    suffix = uuid.uuid4().hex
    prefix = segment_id[: MAX_KEY_LENGTH - len(suffix) - 1]
    return f"{prefix}:{suffix}"


def new_single_key(segment_id: str, contact_id: str) -> str:
    """A fresh key for a single-contact write of `contact_id` to `segment_id`."""
    suffix = uuid.uuid4().hex
    # Ids are at most 128 characters each, but keep the bound explicit.
    readable = f"{segment_id}:{contact_id}"[: MAX_KEY_LENGTH - len(suffix) - 3]
    return f"{readable}:1:{suffix}"
