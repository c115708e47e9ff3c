"""Hooks through which the engine reports what it does (metrics, notifications), no-ops here."""

from __future__ import annotations

from collections.abc import Mapping

from scheduler.model import Assignment, Intent, Lane, State


class EngineObserver:
    """Override what you need; every hook must be cheap and must not raise."""

    def transitioned(self, assignment: Assignment, previous: State) -> None:
        """An assignment changed state."""

    def restored(self, counts: Mapping[State, int]) -> None:
        """Unfinished assignments taken back from the journal at start, by state."""

    def let_go(self, counts: Mapping[State, int]) -> None:
        """Unfinished assignments this process let go of (handed over or fenced), by state.

        Their work stays in the journal, for the segments' next owner.
        """

    def bulk_sent(self, segment_id: str, ids: int, attempt: int) -> None:
        """A bulk request with `ids` ids is about to be sent."""

    def upstream_outcome(self, endpoint: str, outcome: str, elapsed_s: float) -> None:
        """A CXone call ended: outcome is ok, rate_limited, transient, permanent or auth."""

    def membership_read(self, segment_id: str, is_member: bool, lane: Lane = Lane.LIVE) -> None:
        """A membership check of a pair in `lane` answered."""

    def segment_refreshed(self, segment_id: str) -> None:
        """A segment refresh was accepted."""

    def finished(self, assignment: Assignment) -> None:
        """An assignment reached `active` or `failed` (the hook for outbound notifications)."""

    def retry_scheduled(self, segment_id: str, ids: int, delay_s: float) -> None:
        """Ids of a segment will be retried after `delay_s`."""

    def stale_change(self, contact_id: str, segment_id: str, intent: Intent) -> None:
        """A change arrived older than the one in progress or confirmed: ignored, no call."""

    def superseded(self, assignment: Assignment, by: Intent) -> None:
        """Work in progress gave way to a newer change of the other intent."""


class CompositeObserver(EngineObserver):
    """Forwards every hook to several observers (metrics, notifications, ...)."""

    def __init__(self, observers: list[EngineObserver]) -> None:
        self._observers = list(observers)
        # The hooks called for every assignment go only to the observers that override them
        # (notifications care for finished ones only): a call per assignment is the hot path.
        self._transitioned = [
            o.transitioned
            for o in self._observers
            if type(o).transitioned is not EngineObserver.transitioned
        ]
        self._finished = [
            o.finished for o in self._observers if type(o).finished is not EngineObserver.finished
        ]

    def transitioned(self, assignment: Assignment, previous: State) -> None:
        """Forward."""
        for hook in self._transitioned:
            hook(assignment, previous)

    def restored(self, counts: Mapping[State, int]) -> None:
        """Forward."""
        for observer in self._observers:
            observer.restored(counts)

    def let_go(self, counts: Mapping[State, int]) -> None:
        """Forward."""
        for observer in self._observers:
            observer.let_go(counts)

    def bulk_sent(self, segment_id: str, ids: int, attempt: int) -> None:
        """Forward."""
        for observer in self._observers:
            observer.bulk_sent(segment_id, ids, attempt)

    def upstream_outcome(self, endpoint: str, outcome: str, elapsed_s: float) -> None:
        """Forward."""
        for observer in self._observers:
            observer.upstream_outcome(endpoint, outcome, elapsed_s)

    def membership_read(self, segment_id: str, is_member: bool, lane: Lane = Lane.LIVE) -> None:
        """Forward."""
        for observer in self._observers:
            observer.membership_read(segment_id, is_member, lane)

    def segment_refreshed(self, segment_id: str) -> None:
        """Forward."""
        for observer in self._observers:
            observer.segment_refreshed(segment_id)

    def finished(self, assignment: Assignment) -> None:
        """Forward."""
        for hook in self._finished:
            hook(assignment)

    def retry_scheduled(self, segment_id: str, ids: int, delay_s: float) -> None:
        """Forward."""
        for observer in self._observers:
            observer.retry_scheduled(segment_id, ids, delay_s)

    def stale_change(self, contact_id: str, segment_id: str, intent: Intent) -> None:
        """Forward to every observer."""
        for observer in self._observers:
            observer.stale_change(contact_id, segment_id, intent)

    def superseded(self, assignment: Assignment, by: Intent) -> None:
        """Forward to every observer."""
        for observer in self._observers:
            observer.superseded(assignment, by)
