"""Taking work back from the journal: at start (a restart) and at a takeover (a handover).

Both are the same step: the journal's unfinished rows of some segments become the engine's work
again, exactly as they stood. In-flight batches are resent as they were (same ids, same intent,
same idempotency key), so CXone replays a write that had landed instead of applying it twice.
Queued and retrying assignments go back to their batch key in the accumulator, written and verifying
ones back to validation. A queued change that waited for a batch's outcome follows that batch
again, as it would have.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from scheduler.accumulator import Accumulator
from scheduler.ledger import Change, Ledger
from scheduler.model import WRITE_PENDING_STATES, Assignment, AssignmentKey, Intent, Lane, State
from scheduler.store import BatchRecord

QueuedRow = tuple[str, str, float, str, float, str]
"""A queued assignment as the journal keeps it: (contact_id, segment_id, received_at, intent,
occurred_at, lane); the bulk of a backlog, kept as tuples, never objects."""

_INTENTS = {intent.value: intent for intent in Intent}
_LANES = {lane.value: lane for lane in Lane}


@dataclass
class RecoveredWork:
    """What the ledger took back that must be set going: batches to resend, pairs to validate."""

    batches: list[BatchRecord] = field(default_factory=list)
    written: list[Assignment] = field(default_factory=list)
    by_state: Counter[State] = field(default_factory=Counter)
    resent_ids: int = 0


def take_back(
    ledger: Ledger,
    accumulator: Accumulator,
    assignments: Iterable[Assignment],
    batches: Iterable[BatchRecord],
    queued: Iterable[QueuedRow] = (),
) -> RecoveredWork:
    """Put the journal's unfinished work of some segments back into the ledger.

    `assignments` are the pairs past queued (sending, retrying, written, verifying), `queued`
    the queued ones as rows, `batches` the saved batches of those segments.
    """
    batch_of: dict[AssignmentKey, BatchRecord] = {}
    for record in batches:
        for contact_id in record.contact_ids:
            batch_of[(contact_id, record.segment_id)] = record
    resend: dict[str, BatchRecord] = {}
    work = RecoveredWork()
    for assignment in assignments:
        work.by_state[assignment.state] += 1
        if assignment.state not in WRITE_PENDING_STATES:
            ledger.hold_live(assignment)
            work.written.append(assignment)
            continue
        ledger.pending_writes += 1
        key = assignment.key
        batch_key = (assignment.segment_id, assignment.intent)
        batch = batch_of.get(key)
        if batch is not None and batch.intent is assignment.intent:
            ledger.hold_live(assignment)
            accumulator.force_slot(assignment.contact_id)
            resend[batch.batch_id] = batch
        elif assignment.state is State.QUEUED:
            # Queued work lives in the accumulator only.
            if assignment.occurred_at:
                ledger.hold_time(key, assignment.occurred_at)
            contact_id, received_at, lane = (
                assignment.contact_id, assignment.received_at, assignment.lane
            )  # fmt: skip
            if accumulator.admit(contact_id, batch_key, received_at, lane):
                accumulator.buffer.add(batch_key, contact_id, received_at, lane)
        else:
            # Retrying: waits for its slot, then goes out with its batch key's next batch.
            ledger.hold_live(assignment)
            if accumulator.admit(assignment.contact_id, batch_key, 0.0, assignment.lane):
                accumulator.add_retries(batch_key, [assignment.contact_id], assignment.lane)
    # The backlog: usually nearly all of it, so kept to a dictionary lookup and two inserts.
    admit = accumulator.admit
    enqueue = accumulator.buffer.add
    hold_time = ledger.hold_time
    count = 0
    for contact_id, segment_id, received_at, intent_name, occurred_at, lane_name in queued:
        count += 1
        intent = _INTENTS[intent_name]
        lane = _LANES[lane_name]
        key = (contact_id, segment_id)
        if occurred_at:
            hold_time(key, occurred_at)
        batch = batch_of.get(key) if batch_of else None
        if batch is None:
            batch_key = (segment_id, intent)
            if admit(contact_id, batch_key, received_at, lane):
                enqueue(batch_key, contact_id, received_at, lane)
            continue
        accumulator.force_slot(contact_id)
        resend[batch.batch_id] = batch
        if batch.intent is intent:
            ledger.hold_live(
                Assignment(
                    contact_id,
                    segment_id,
                    received_at=received_at,
                    updated_at=received_at,
                    intent=intent,
                    occurred_at=occurred_at,
                    lane=lane,
                )
            )
        else:
            # The journal holds a newer change that waited for this batch's outcome: the
            # batch is resent (under its key) and the change follows it, as it would have.
            # The row keeps only the waiting change's lane, so the resent work takes it too;
            # that decides nothing, since the waiting change replaces it on the outcome.
            ledger.hold_live(
                Assignment(
                    contact_id,
                    segment_id,
                    state=State.SENDING,
                    attempts=batch.attempt,
                    received_at=received_at,
                    updated_at=received_at,
                    intent=batch.intent,
                    lane=lane,
                )
            )
            ledger.hold_waiting(key, Change(intent, occurred_at, received_at, lane))
    ledger.pending_writes += count
    work.by_state[State.QUEUED] += count
    work.batches = list(resend.values())
    work.resent_ids = sum(len(batch.contact_ids) for batch in work.batches)
    return work
