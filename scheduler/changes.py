"""What a change does to its pairs: newest wins, stale, join, supersede, mirror, dead letters.

`Changes` decides, for each pair a CRM's change names, what happens: the change is stale (older
than what the pair has), joins work in progress of the same intent, supersedes work of the other
intent, is already confirmed as asked (the validation cache), goes to the segment's owner (the
segment is another process's), or is new work. It issues the outcome to the ledger as a command
and keeps no state of its own. A mirror (`set`) is compared with the memberships segmapd
tracks; a dead letter is ordered like any change and never takes a pair's place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from scheduler.accumulator import BatchingPolicy
from scheduler.ledger import Current, Ledger
from scheduler.model import (
    Assignment,
    AssignmentKey,
    FailureReason,
    Intent,
    Lane,
    MembershipChange,
    State,
    storable,
)
from scheduler.ownership import ForwardedChange, Ownership


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """What a request did: new work queued, work joined, pairs confirmed as asked, stale ones.

    A stale change is older than what is in progress or confirmed for its pair: ignored.
    """

    queued: int = 0
    joined: int = 0
    cached: int = 0
    stale: int = 0
    # The segments the change put to work or found done (a mirror's removals included), for
    # `?wait=`; the stale ones apart, since nothing will ever happen to them.
    segments: tuple[str, ...] = ()
    stale_segments: tuple[str, ...] = ()

    @classmethod
    def total(cls, results: Iterable[SubmitResult], *, stale: int = 0) -> SubmitResult:
        """The sum of many results, in one pass.

        `sum()` of them copies the growing segment tuples at every step: a 100,000-assignment
        delivery held the event loop for most of a second there.
        """
        queued = joined = cached = 0
        segments: list[str] = []
        stale_segments: list[str] = []
        for result in results:
            queued += result.queued
            joined += result.joined
            cached += result.cached
            stale += result.stale
            segments += result.segments
            stale_segments += result.stale_segments
        return cls(queued, joined, cached, stale, tuple(segments), tuple(stale_segments))

    def __add__(self, other: SubmitResult) -> SubmitResult:
        return SubmitResult(
            self.queued + other.queued,
            self.joined + other.joined,
            self.cached + other.cached,
            self.stale + other.stale,
            self.segments + other.segments,
            self.stale_segments + other.stale_segments,
        )


@dataclass(frozen=True, slots=True)
class DeadLetterResult:
    """What `Changes.dead_letter` did with a change nobody can act on, per pair.

    `recorded`: dead letters journaled (or forwarded to their owner); `stale`: pairs the change
    was older than; `kept`: pairs whose own state (work in progress, or a state segmapd reached
    for another change) stays, so that an event nobody can act on never replaces it.
    """

    recorded: int = 0
    stale: int = 0
    kept: int = 0


# A pair's outcome, as `Changes._change_pair` counts it (indexes of `SubmitResult`'s counts).
_QUEUED, _JOINED, _CACHED, _STALE = range(4)
_RESULTS = {
    _QUEUED: SubmitResult(queued=1),
    _JOINED: SubmitResult(joined=1),
    _CACHED: SubmitResult(cached=1),
}


class EngineOverloaded(Exception):
    """More assignments wait to be written than the high-water mark allows; try again later."""

    def __init__(self, pending: int, high_water: int, retry_after_s: float) -> None:
        super().__init__(f"{pending} assignments pending (high-water mark {high_water})")
        self.retry_after_s = retry_after_s


class Confirmations(Protocol):
    """What changes ask of validation: what CXone confirmed lately, and to stop confirming."""

    def known(self, contact_id: str, segment_id: str) -> bool | None:
        """The membership confirmed within the validation cache TTL (member or not), or None."""
        ...

    def forget(self, contact_id: str, segment_id: str) -> None:
        """Stop confirming the pair and drop what is cached of it (a newer change is coming)."""
        ...

    def promote(self, contact_id: str, segment_id: str) -> None:
        """The pair being confirmed moved to the live lane: its next read goes with live ones."""
        ...


class Changes:
    """Turns CRM changes into commands for the ledger (see the module docstring)."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        ownership: Ownership,
        batching: BatchingPolicy,
        write_rate_per_s: float,
        confirmations: Confirmations | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._ledger = ledger
        self._ownership = ownership
        self.batching = batching
        self._write_rate_per_s = write_rate_per_s
        self._confirmations = confirmations
        self._wall = wall_clock

    # ---- admission -----------------------------------------------------------------------

    def admission_wait(self, assignments: int) -> float | None:
        """None if `assignments` more fit below the high-water mark; else seconds to wait.

        The wait is how long the writer, at its configured rate of full batches, needs to take
        the queue back below the mark (at least one second).
        """
        excess = self._ledger.pending_writes + assignments - self.batching.high_water
        if excess <= 0:
            return None
        per_second = self._write_rate_per_s * self.batching.max_size
        return max(1.0, excess / per_second)

    @property
    def overloaded(self) -> bool:
        """Whether new work would be refused for the high-water mark."""
        return self._ledger.pending_writes >= self.batching.high_water

    # ---- changes -------------------------------------------------------------------------

    def submit(
        self,
        change: MembershipChange,
        history: Mapping[str, Assignment] | None = None,
        mirrored_at: float = 0.0,
        *,
        admitted: bool = False,
    ) -> SubmitResult:
        """Take a change: queue new work, join or supersede work in progress, skip stale ones.

        See `Engine.submit` for the arguments. Raises `EngineOverloaded` above the high-water
        mark unless `admitted`.
        """
        wait_s = None if admitted else self.admission_wait(1)
        if wait_s is not None:
            raise EngineOverloaded(self._ledger.pending_writes, self.batching.high_water, wait_s)
        now = self._wall()
        contact_id = change.contact_id
        past = history or {}
        wanted: dict[str, Intent] = {}
        if change.mirror is not None:
            listed = dict.fromkeys(change.mirror)
            for segment_id in self.tracked(contact_id, past):
                if segment_id not in listed:
                    wanted[segment_id] = Intent.REMOVE
            for segment_id in listed:
                wanted[segment_id] = Intent.ADD
        else:
            for segment_id in change.add:
                wanted.setdefault(segment_id, Intent.ADD)
            for segment_id in change.remove:
                wanted.setdefault(segment_id, Intent.REMOVE)
        occurred = change.occurred_at or 0.0
        # Counted here, one result built at the end: a result per pair was most of the cost.
        counts = [0, 0, 0, 0]
        stale: list[str] = []
        change_pair = self._change_pair
        lane, source = change.lane, change.source
        for segment_id, intent in wanted.items():
            outcome = change_pair(
                contact_id,
                segment_id,
                intent,
                occurred,
                now,
                past.get(segment_id),
                mirrored_at,
                lane,
                False,
                source,
            )
            counts[outcome] += 1
            if outcome == _STALE:
                stale.append(segment_id)
        if change.mirror is not None and (occurred or now) > mirrored_at:
            self._ledger.record_mirror(contact_id, occurred or now)
        segments = tuple(wanted) if not stale else tuple(s for s in wanted if s not in stale)
        queued, joined, cached, stale_count = counts
        return SubmitResult(queued, joined, cached, stale_count, segments, tuple(stale))

    def change_pair(  # noqa: PLR0917 (one pair's whole change)
        self,
        contact_id: str,
        segment_id: str,
        intent: Intent,
        occurred_at: float,
        now: float,
        past: Assignment | None,
        mirrored_at: float = 0.0,
        lane: Lane = Lane.LIVE,
        repair: bool = False,
        source: str = "",
    ) -> SubmitResult:
        """One pair's change, compared with what is in progress and what `past` says.

        `repair`: a drift reconcile found (forwarded on as such if the segment moved again).
        `source`: where the change came from, journaled with the pair if it starts it.
        """
        outcome = self._change_pair(
            contact_id, segment_id, intent, occurred_at, now, past, mirrored_at, lane, repair,
            source,
        )  # fmt: skip
        if outcome == _STALE:
            return SubmitResult(stale=1, stale_segments=(segment_id,))
        return _RESULTS[outcome]

    def _change_pair(  # noqa: PLR0917 (one pair's whole change)
        self,
        contact_id: str,
        segment_id: str,
        intent: Intent,
        occurred_at: float,
        now: float,
        past: Assignment | None,
        mirrored_at: float,
        lane: Lane = Lane.LIVE,
        repair: bool = False,
        source: str = "",
    ) -> int:
        """`change_pair`'s outcome: `_QUEUED`, `_JOINED`, `_CACHED` or `_STALE`.

        A change that starts the pair (new work, a supersede, a cache hit) journals `source`
        with it; one that joins work in progress leaves the pair's source as it is.
        """
        ledger = self._ledger
        key = (contact_id, segment_id)
        version = occurred_at or now
        current = ledger.current(key)
        if (current is not None or past is not None or mirrored_at) and self._stale(
            key, intent, version, now, current, past, mirrored_at
        ):
            return _STALE
        if not self._ownership.owns(segment_id):
            # Its owner coalesces it with the segment's other work and compares it again with
            # what it holds (newer than the journal this process read).
            self._ownership.forward(
                ForwardedChange(
                    contact_id,
                    segment_id,
                    intent,
                    occurred_at,
                    now,
                    lane=lane,
                    repair=repair,
                    source=source,
                )
            )
            return _QUEUED
        if current is not None:
            if current.intent is intent:
                if ledger.renew(key, occurred_at, now, lane) and self._confirmations is not None:
                    self._confirmations.promote(contact_id, segment_id)
                return _JOINED
            if self._confirmations is not None and ledger.validating(key):
                self._confirmations.forget(contact_id, segment_id)
            ledger.supersede(key, intent, occurred_at, now, lane, source)
            return _QUEUED
        confirmations = self._confirmations
        known = confirmations.known(contact_id, segment_id) if confirmations else None
        if known is not None and known is (intent is Intent.ADD):
            # Confirmed as asked within the cache TTL: no call.
            ledger.record_confirmed(contact_id, segment_id, intent, occurred_at, now, lane, source)
            return _CACHED
        ledger.queue_new(contact_id, segment_id, intent, occurred_at, now, lane, source)
        return _QUEUED

    def _stale(  # noqa: PLR0917 (the pair's whole standing, from its two callers)
        self,
        key: AssignmentKey,
        intent: Intent,
        version: float,
        now: float,
        current: Current | None,
        past: Assignment | None,
        mirrored_at: float,
    ) -> bool:
        """Whether a change at `version` is older than what the pair has; journaled if so.

        What the pair has: its change in progress (`current`), else its journaled state
        (`past`), and in any case the contact's newest mirror (`mirrored_at`), which said the
        contact is in no segment it did not list.
        """
        newest = current.version if current is not None else (past.version if past else None)
        if mirrored_at and (newest is None or mirrored_at > newest):
            newest = mirrored_at
        if newest is None or version >= newest:
            return False
        self._ledger.record_stale(key[0], key[1], intent, version, now)
        return True

    def tracked(self, contact_id: str, history: Mapping[str, Assignment]) -> list[str]:
        """Segments the contact may be in because of segmapd: what a mirror compares with.

        A membership segmapd made stays tracked until CXone confirms it removed: a pair whose
        newest change is an add (in progress, or done), and one whose add or removal failed
        where CXone may hold the membership all the same (`Assignment.may_hold_membership`).
        Not tracked: a confirmed removal, a removal in progress, an add CXone refused (the
        contact or segment unknown to it) and a dead letter of an event nobody could act on.
        `history` holds the journaled pairs.
        """
        found = []
        current_of = self._ledger.current
        for segment_id, past in history.items():
            current = current_of((contact_id, segment_id))
            if current is not None:
                if current.intent is Intent.ADD:
                    found.append(segment_id)
            elif past.may_hold_membership:
                found.append(segment_id)
        return found

    # ---- drift (scheduler/reconcile.py) ---------------------------------------------------

    def repair(self, held: Assignment) -> bool:
        """Queue a pair again whose membership CXone no longer shows as `held` says it should.

        `held` is the pair's journaled state, confirmed once (`active` or `removed`). The pair
        is compared like any change, with `held`'s intent and time (the CRM's time of the change
        it holds), so that a newer change, in progress or arriving later, still wins; its
        confirmation is forgotten first, since CXone just contradicted it. The work goes in the
        bulk lane, from the held pair's source. A segment owned elsewhere goes to its owner,
        marked as a repair. Returns whether the pair was queued (or forwarded).
        """
        contact_id, segment_id = held.key
        now = self._wall()
        # The held change's own place in the order (its occurredAt, or its arrival when the
        # CRM gave none): a repair never passes a change that came after it.
        version = held.version
        if self._confirmations is not None and self._ownership.owns(segment_id):
            self._confirmations.forget(contact_id, segment_id)
        outcome = self._change_pair(
            contact_id,
            segment_id,
            held.intent,
            version,
            now,
            held,
            0.0,
            Lane.BULK,
            repair=True,
            source=held.source,
        )
        return outcome == _QUEUED

    # ---- events nobody can act on --------------------------------------------------------

    def dead_letter(
        self,
        change: MembershipChange,
        reason: FailureReason,
        message: str,
        history: Mapping[str, Assignment] | None = None,
        mirrored_at: float = 0.0,
    ) -> DeadLetterResult:
        """Record the change's pairs as failed without sending anything.

        For an event that can never succeed (its contact id fails the id rule, a segment value
        is no CXone id) that a source acknowledges anyway, so that its CRM stops retrying it:
        the dead letter keeps what was asked, and why it was not done. Adds and a mirror's list
        become failed adds, removals failed removals. Nothing is ever sent for them, and a
        replay skips them: they were invalid when they arrived (`Assignment.dead_on_arrival`).

        Ordering holds as for any change: one older than what the pair had (`history`, the
        contact's journaled assignments by segment, or the mirror at `mirrored_at`) is stale.
        And a dead letter never replaces a pair's own state: work in progress, or a state
        reached for a change segmapd acted on, stays (an `active` membership stays tracked, so
        that a later removal or clear still removes it). Only a pair with nothing yet, or with
        an earlier dead letter, takes it.
        """
        ledger = self._ledger
        now = self._wall()
        version = change.occurred_at or now
        wanted: dict[str, Intent] = {}
        for segment_id in (*change.add, *(change.mirror or ())):
            wanted.setdefault(storable(segment_id), Intent.ADD)
        for segment_id in change.remove:
            wanted.setdefault(storable(segment_id), Intent.REMOVE)
        contact_id = storable(change.contact_id)
        past_of = history or {}
        recorded = stale = kept = 0
        for segment_id, intent in wanted.items():
            key = (contact_id, segment_id)
            current = ledger.current(key)
            past = past_of.get(segment_id)
            if self._stale(key, intent, version, now, current, past, mirrored_at):
                stale += 1
                continue
            if current is not None or (past is not None and not past.dead_on_arrival):
                kept += 1
                continue
            if not self._ownership.owns(segment_id):
                # Its owner compares it again with what it holds.
                self._ownership.forward(
                    ForwardedChange(
                        contact_id,
                        segment_id,
                        intent,
                        version,
                        now,
                        reason=reason,
                        message=storable(message),
                        source=change.source,
                    )
                )
                recorded += 1
                continue
            ledger.record_dead_letter(
                Assignment(
                    contact_id,
                    segment_id,
                    state=State.FAILED,
                    reason=reason,
                    message=storable(message),
                    received_at=now,
                    updated_at=now,
                    intent=intent,
                    occurred_at=version,
                    source=change.source,
                )
            )
            recorded += 1
        return DeadLetterResult(recorded, stale, kept)

    # ---- changes another process took for segments owned here ----------------------------

    def submit_forwarded(
        self,
        changes: Iterable[ForwardedChange],
        histories: Mapping[str, tuple[Mapping[str, Assignment], float]],
    ) -> SubmitResult:
        """Take changes another process journaled for segments owned here.

        `histories` maps each contact to (its journaled assignments by segment, its newest
        mirror time), read after the changes were. Each change is compared again with what is
        in progress here and in the journal, as if it had arrived here at its received time.
        Changes for segments no longer owned are forwarded again.
        """
        results: list[SubmitResult] = []
        for change in changes:
            past, mirrored_at = histories.get(change.contact_id, ({}, 0.0))
            if change.reason is not None:
                self.dead_letter(
                    MembershipChange(
                        change.contact_id,
                        add=(change.segment_id,) if change.intent is Intent.ADD else (),
                        remove=(change.segment_id,) if change.intent is Intent.REMOVE else (),
                        occurred_at=change.occurred_at or None,
                        source=change.source,
                    ),
                    change.reason,
                    change.message,
                    past,
                    mirrored_at,
                )
                continue
            if change.repair and self._confirmations is not None:
                # A drift found by another process: CXone contradicted the confirmation.
                self._confirmations.forget(change.contact_id, change.segment_id)
            results.append(
                self.change_pair(
                    change.contact_id,
                    change.segment_id,
                    change.intent,
                    change.occurred_at,
                    change.received_at,
                    past.get(change.segment_id),
                    mirrored_at,
                    change.lane,
                    change.repair,
                    change.source,
                )
            )
        return SubmitResult.total(results)
