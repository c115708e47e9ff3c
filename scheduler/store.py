"""The journal the engine writes through: every transition, every in-flight batch.

The engine keeps live assignments in memory and records each change here; implementations
(in-memory, SQLite, Redis) decide how and when it becomes durable. Queries serve the status API
for everything retained, including assignments the engine has finished with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from scheduler.model import Assignment, Intent


class StoreUnavailable(Exception):
    """The journal cannot commit right now (disk full, read-only); nothing recorded is lost."""


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """A bulk request as it was (or is about to be) sent: resending it must be byte-identical."""

    batch_id: str
    segment_id: str
    contact_ids: tuple[str, ...]
    idempotency_key: str
    attempt: int
    intent: Intent = Intent.ADD


@dataclass(slots=True)
class ContactHistory:
    """What the journal holds about one contact: what a new change is compared with.

    `assignments` by segment, newest state; `mirrored_at` the time of the newest mirror
    applied to the contact (0: none retained).
    """

    assignments: dict[str, Assignment] = field(default_factory=dict)
    mirrored_at: float = 0.0


class Store(Protocol):
    """What the scheduler needs of the journal: its rows queued, batches saved, a contact read.

    The ledger records every transition (and stale changes, mirror times), the sender saves a
    batch before it sends it and drops it after, and the engine flushes at its stop and reads a
    contact for `wait()`. The daemon's journals (daemon/store/) implement this and much more.
    """

    def record(self, assignment: Assignment) -> None:
        """Queue a snapshot of the assignment's current state; must not block the event loop."""
        ...

    def record_stale(
        self, contact_id: str, segment_id: str, intent: str, occurred_at: float, at: float
    ) -> None:
        """Queue a note of a change that arrived stale (older than the pair's newest)."""
        ...

    def record_mirror(self, contact_id: str, occurred_at: float) -> None:
        """Queue the time of a mirror (`set`) applied to the contact; the newest is kept.

        A mirror lists every segment the contact is in, so it also says, as of its time, that
        the contact is in no other: a change older than it, for any segment, is stale.
        """
        ...

    async def flush(self) -> None:
        """Return once everything recorded so far is as durable as the store makes it.

        Raises StoreUnavailable while the journal cannot commit; the changes stay queued.
        """
        ...

    async def save_batch(self, batch: BatchRecord) -> None:
        """Make the batch durable before it is sent (a resend after a crash reuses its key)."""
        ...

    async def drop_batch(self, batch_id: str) -> None:
        """Forget a batch whose outcome has been recorded."""
        ...

    async def contact(self, contact_id: str) -> list[Assignment]:
        """Every retained assignment of one contact, newest state."""
        ...
