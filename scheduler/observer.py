"""Hooks through which the engine reports what it does (metrics, notifications), no-ops here."""

from __future__ import annotations

from scheduler.model import Assignment, State


class EngineObserver:
    """Override what you need; every hook must be cheap and must not raise."""

    def transitioned(self, assignment: Assignment, previous: State) -> None:
        """An assignment changed state."""

    def bulk_sent(self, segment_id: str, ids: int, attempt: int) -> None:
        """A bulk request with `ids` ids is about to be sent."""

    def upstream_outcome(self, endpoint: str, outcome: str, elapsed_s: float) -> None:
        """A CXone call ended: outcome is ok, rate_limited, transient, permanent or auth."""

    def membership_read(self, segment_id: str, is_member: bool) -> None:
        """A membership check answered."""

    def segment_refreshed(self, segment_id: str) -> None:
        """A segment refresh was accepted."""

    def finished(self, assignment: Assignment) -> None:
        """An assignment reached `active` or `failed` (the hook for outbound notifications)."""

    def retry_scheduled(self, segment_id: str, ids: int, delay_s: float) -> None:
        """Ids of a segment will be retried after `delay_s`."""
