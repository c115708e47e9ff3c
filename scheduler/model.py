"""The unit of work (an assignment of one contact to one segment) and its state machine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Intent(enum.StrEnum):
    """What an assignment works towards: the contact in the segment, or out of it."""

    ADD = "add"
    REMOVE = "remove"


#: Both intents, as a tuple: iterating the enum class itself is several times slower.
INTENTS: tuple[Intent, ...] = (Intent.ADD, Intent.REMOVE)


class Lane(enum.StrEnum):
    """Which work goes first: `live` (webhooks, single mappings) or `bulk` (imports, replays).

    CXone reads, not writes, decide how fast anything is confirmed: a live change must not wait
    behind a backfill. Live ids go into their segment's next batch ahead of bulk ids, and live
    reads go first, bulk keeping a guaranteed minimum share of the read budget.
    """

    LIVE = "live"
    BULK = "bulk"


#: Both lanes, live first.
LANES: tuple[Lane, ...] = (Lane.LIVE, Lane.BULK)


class BulkCredit:
    """Live first, with a guaranteed least share for bulk: whose turn it is when both wait.

    One scheme for reads (the poller) and writes (the buffer's choice of batch). Each live turn
    taken while bulk had one due earns bulk `share / (1 - share)` of a turn in credit, and bulk
    goes as soon as its credit reaches one, so bulk gets exactly `share` of the turns while both
    wait. Credit is earned only while bulk waits (capped at one turn more than it earns at once),
    so idle time banks none; when live has nothing due, bulk takes every turn anyway.
    """

    __slots__ = ("credit", "per_live", "share")

    def __init__(self, share: float) -> None:
        if not 0.0 <= share < 1.0:
            raise ValueError(f"bulk_share_min must be in [0, 1), not {share}")
        self.share = share
        #: Bulk's credit, in turns, for each live turn taken while bulk waited.
        self.per_live = share / (1.0 - share)
        self.credit = 0.0

    def bulk_turn(self) -> bool:
        """Whether bulk goes next when both lanes have a turn due."""
        return self.credit >= 1.0

    def taken(self, lane: Lane, *, bulk_waited: bool) -> None:
        """Settle the credit for a turn taken by `lane` (`bulk_waited`: bulk had one due)."""
        if lane is Lane.LIVE:
            if bulk_waited:
                self.credit = min(self.credit + self.per_live, 1.0 + self.per_live)
        elif self.credit >= 1.0:
            self.credit -= 1.0

    def reset(self) -> None:
        """Forget the credit (the queues it was earned against are gone)."""
        self.credit = 0.0


class State(enum.StrEnum):
    """Where an assignment stands; `active`, `removed` and `failed` are terminal.

    An add ends `active` and a removal `removed`, each only once CXone's reads show it.
    """

    QUEUED = "queued"
    SENDING = "sending"
    RETRYING = "retrying"
    WRITTEN = "written"
    VERIFYING = "verifying"
    ACTIVE = "active"
    REMOVED = "removed"
    FAILED = "failed"


TERMINAL_STATES = frozenset({State.ACTIVE, State.REMOVED, State.FAILED})
# States in which the write itself is still pending: these count against the queue's high-water
# mark and against the per-contact in-flight limit.
WRITE_PENDING_STATES = frozenset({State.QUEUED, State.SENDING, State.RETRYING})

# Which transitions the engine may make. A terminal assignment may start over (a new request for
# it after the validation cache expired, or a dead-letter replay). A newer change of the other
# intent starts the pair over from where it is (a queued or retrying one at once, a written or
# verifying one by leaving validation, one being sent once its request has an outcome).
ALLOWED_TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.SENDING, State.FAILED, State.QUEUED}),
    # Sending -> verifying: the last write's outcome is unknown, and reads settle it.
    State.SENDING: frozenset(
        {State.WRITTEN, State.RETRYING, State.SENDING, State.VERIFYING, State.FAILED, State.QUEUED}
    ),
    State.RETRYING: frozenset({State.SENDING, State.FAILED, State.QUEUED}),
    State.WRITTEN: frozenset(
        {State.VERIFYING, State.ACTIVE, State.REMOVED, State.FAILED, State.QUEUED}
    ),
    State.VERIFYING: frozenset(
        {State.ACTIVE, State.REMOVED, State.FAILED, State.VERIFYING, State.QUEUED}
    ),
    State.ACTIVE: frozenset({State.QUEUED}),
    State.REMOVED: frozenset({State.QUEUED}),
    State.FAILED: frozenset({State.QUEUED}),
}


class FailureReason(enum.StrEnum):
    """Why an assignment ended `failed`."""

    CONTACT_NOT_FOUND = "contact_not_found"
    INVALID_CONTACT_ID = "invalid_contact_id"
    SEGMENT_NOT_FOUND = "segment_not_found"
    RETRIES_EXHAUSTED = "retries_exhausted"
    NOT_INDEXED = "not_indexed"


# Failures after which CXone may hold the membership all the same: the last write's outcome
# was unknown (retries exhausted on 5xx, timeouts, resets), or a write CXone accepted never
# showed. A membership is tracked through them until a removal is confirmed.
UNCERTAIN_FAILURES = frozenset({FailureReason.RETRIES_EXHAUSTED, FailureReason.NOT_INDEXED})


class InvalidTransition(RuntimeError):
    """The engine tried a transition the state machine does not allow (a bug, never input)."""


AssignmentKey = tuple[str, str]
"""(contact_id, segment_id)."""

BatchKey = tuple[str, Intent]
"""(segment_id, intent): what one batch may hold (a batch never mixes adds and removals)."""


@dataclass(slots=True)
class Assignment:
    """One (contact, segment) membership the CRM asked for.

    `history` is kept only where someone needs it (stores, status views); the engine's live
    assignments leave it at None, because a million pending assignments would otherwise carry a
    million lists.
    """

    contact_id: str
    segment_id: str
    state: State = State.QUEUED
    reason: FailureReason | None = None
    message: str = ""
    attempts: int = 0
    received_at: float = 0.0
    updated_at: float = 0.0
    history: list[tuple[State, float]] | None = field(default=None)
    intent: Intent = Intent.ADD
    # The CRM's time of the change this works towards (its occurredAt, else its arrival): a
    # change older than this is stale.
    occurred_at: float = 0.0
    # An attempt for this change ended without saying whether CXone applied it (a 5xx, a
    # timeout, a reset): a later refusal does not prove the membership absent. Kept in memory
    # only: after a restart the batch is resent under its key and answered anew.
    outcome_unknown: bool = False
    # Which lane the pair's work goes in (journaled): see `Lane`.
    lane: Lane = Lane.LIVE
    # Where the change that started the pair came from (`MembershipChange.source`), as the
    # journal keeps it. Set on the rows that start a pair and read back from the journal; the
    # engine's objects for later transitions leave it "", which the journal never writes over
    # a source (a million queued pairs carry no source in memory).
    source: str = ""

    @property
    def version(self) -> float:
        """The time ordering compares: the change's occurredAt, or its arrival."""
        return self.occurred_at or self.received_at

    @property
    def key(self) -> AssignmentKey:
        """The assignment's identity."""
        return (self.contact_id, self.segment_id)

    @property
    def terminal(self) -> bool:
        """Whether the assignment has ended (active or failed)."""
        return self.state in TERMINAL_STATES

    @property
    def dead_on_arrival(self) -> bool:
        """A dead letter of an event nobody could act on: failed before any attempt.

        Its values were invalid when they arrived (a contact id or segment value that is no
        CXone id, an option missing from a mapping): a replay would send them as they are.
        """
        return self.state is State.FAILED and self.attempts == 0

    @property
    def may_hold_membership(self) -> bool:
        """Whether CXone may hold this pair's membership because of segmapd (see `tracked`).

        An add that is not a failure CXone answered for certain, and an add or a removal whose
        failure left the outcome open (`UNCERTAIN_FAILURES`).
        """
        if self.state is State.FAILED:
            return self.attempts > 0 and self.reason in UNCERTAIN_FAILURES
        return self.intent is Intent.ADD and self.state is not State.REMOVED

    def transition(
        self,
        state: State,
        at: float,
        *,
        reason: FailureReason | None = None,
        message: str = "",
    ) -> None:
        """Move to `state` at wall-clock time `at`, recording it in the history."""
        if state not in ALLOWED_TRANSITIONS[self.state] and state != self.state:
            raise InvalidTransition(
                f"{self.contact_id}/{self.segment_id}: {self.state} -> {state} is not allowed"
            )
        self.state = state
        self.reason = reason
        self.message = message
        self.updated_at = at
        if self.history is not None:
            self.history.append((state, at))


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """What a CRM says about one contact's segments (one event).

    `add` lists segments the contact is now in; `remove` those it is no longer in; `mirror`
    (the body's `set`), when given, is the complete list among the segments segmapd tracks for
    the contact. `occurred_at` is the CRM's event time (epoch seconds), None for "as it
    arrives". `lane` is where its work goes: live unless a bulk source (an import, a replay
    of every dead letter) says bulk. `source` is where it came from, journaled with the pairs
    it starts: the configured source's name for a webhook, `mappings` for the admin API, a
    dead letter's own for its replay; "" when nothing says.
    """

    contact_id: str
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    mirror: tuple[str, ...] | None = None
    occurred_at: float | None = None
    lane: Lane = Lane.LIVE
    source: str = ""

    def from_source(self, source: str, lane: Lane | None = None) -> MembershipChange:
        """The same change, taken from `source` (and in `lane`, when given).

        Built directly: `dataclasses.replace` costs three times as much, once per event.
        """
        return MembershipChange(
            self.contact_id,
            self.add,
            self.remove,
            self.mirror,
            self.occurred_at,
            self.lane if lane is None else lane,
            source,
        )

    @property
    def segment_ids(self) -> tuple[str, ...]:
        """Every segment the change names, each once, adds first."""
        return tuple(dict.fromkeys((*self.add, *self.remove, *(self.mirror or ()))))


def storable(text: str) -> str:
    """`text` as any journal can keep it: NUL and lone surrogates replaced.

    Text from outside (a contact id dead-lettered as sent, an event's redelivery key, CXone's
    error message) may hold either; PostgreSQL's text type takes neither, and no UTF-8 encoder
    takes a lone surrogate: one such row would fail every commit it is part of.
    """
    if text.isascii() and "\x00" not in text:
        return text
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
