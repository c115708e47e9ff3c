"""Which segments this process batches, writes and validates, and where the others' work goes.

One process owns every segment. Several processes sharing one journal divide the segments
among themselves (daemon/cluster.py holds the leases); a change for a segment another process
owns is forwarded to it through the journal instead of being batched here, so that each
segment's adds and removals are coalesced by one process and batches stay full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from scheduler.model import FailureReason, Intent, Lane


@dataclass(frozen=True, slots=True)
class ForwardedChange:
    """One pair's change taken by this process for a segment another process owns.

    `reason` set: an event that can never succeed, to be dead-lettered by the owner. `repair`:
    a drift found by reconcile, queued again as segmapd holds it (`Changes.repair`). `source`:
    where the change came from (`MembershipChange.source`), which the owner journals.
    """

    contact_id: str
    segment_id: str
    intent: Intent
    occurred_at: float
    received_at: float
    reason: FailureReason | None = None
    message: str = ""
    lane: Lane = Lane.LIVE
    repair: bool = False
    source: str = ""


class Ownership(Protocol):
    """The engine's view of segment ownership."""

    def owns(self, segment_id: str) -> bool:
        """Whether new work for the segment is batched here."""
        ...

    def holds(self, segment_id: str) -> bool:
        """Whether this process may still record the segment's states.

        True while it owns the segment and while it hands it over (its requests in flight end
        here); false once another process may own it.
        """
        ...

    def forward(self, change: ForwardedChange) -> None:
        """Queue the change for the segment's owner (journaled with the request's commit)."""
        ...


class OwnEverything:
    """One process: every segment is its own."""

    def owns(self, segment_id: str) -> bool:
        """Always."""
        return True

    def holds(self, segment_id: str) -> bool:
        """Always."""
        return True

    def forward(self, change: ForwardedChange) -> None:
        """Never called: nothing is owned elsewhere."""
        raise AssertionError(f"no other owner for segment {change.segment_id!r}")
