"""One webhook delivery, through its source's adapter, into the engine and the journal.

This is the whole intake of `POST /v1/webhooks/{source}` for every kind (it knows the adapter
protocol, `listeners.base`, never a kind), and every other write path: `POST /v1/mappings`
(`take_mappings`) and the dead-letter replay (`replay`), each committing before it answers.
`daemon/http.py` only speaks HTTP around them. The order is what makes the answers trustworthy:

1. authenticate; a delivery the sender keys as a whole (`webhook-id`) that was seen before is
   answered as it was the first time, once that first answer is committed;
2. parse; events whose own keys were journaled before are redeliveries and add no work;
3. refuse with the kind's "busy" answer while draining or above the high-water mark, before
   anything is taken (a partial take of a batch would be redone anyway);
4. hand the changes to the engine, dead-letter the events that can never succeed, journal every
   key, and answer success only after the commit: a success means the work survives a crash.

A delivery that reaches two connections at once (a sender's retry racing its first attempt) is
one unit of work: keys being taken are claimed in memory, and the second waits for the first's
commit before answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from daemon.claims import ClaimKey, Claims
from daemon.config import MAPPINGS_SOURCE
from daemon.store import DeliveryLog
from listeners.base import (
    DeadEvent,
    InboundEvent,
    InboundRequest,
    Outcome,
    ParsedDelivery,
    Reply,
    SourceAdapter,
)
from listeners.errors import WebhookRejected
from listeners.payload import parse_events
from scheduler.engine import EngineClosed, EngineOverloaded, SubmitResult
from scheduler.model import Assignment, Intent, Lane, MembershipChange, storable
from scheduler.store import ContactHistory, StoreUnavailable

if TYPE_CHECKING:
    from daemon.service import Service

log = logging.getLogger(__name__)

# When draining or overloaded, how long a sender should wait before retrying.
DRAIN_RETRY_AFTER_S = 5.0
JOURNAL_RETRY_AFTER_S = 10.0
# Answered on a per-event key when nothing needs remembering but that it was taken.
_TAKEN = b"1"
# The claim of no keys (reusable: it holds nothing).
_NOTHING_CLAIMED: contextlib.nullcontext[None] = contextlib.nullcontext()
# A delivery another instance is taking (a shared journal): it is waited for this long, read
# this often, and looked at this many times before the sender is asked to retry.
CLAIM_WAIT_S = 5.0
CLAIM_POLL_S = 0.05
CLAIM_ROUNDS = 3


class Busy(Exception):
    """segmapd cannot take the delivery now; the sender must retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class _HeldElsewhere(Exception):
    """Another instance is taking some of the delivery's keys right now."""

    def __init__(self, keys: set[ClaimKey]) -> None:
        super().__init__(f"{len(keys)} keys held by another instance")
        self.keys = keys


async def receive(
    service: Service, source: str, adapter: SourceAdapter, request: InboundRequest
) -> Reply:
    """The answer to one delivery for configured `source`, in the adapter's protocol."""
    try:
        for _ in range(CLAIM_ROUNDS):
            try:
                return await _receive(service, source, adapter, request)
            except _HeldElsewhere as held:
                # Its taker answers once committed: then this copy is a redelivery of it.
                await _await_answers(service, held.keys)
        raise Busy("the same delivery is being taken by another instance; retry", 1.0)
    except WebhookRejected as rejection:
        return adapter.refused(rejection)
    except Busy as busy:
        return adapter.busy(busy.message, busy.retry_after_s)


async def _await_answers(service: Service, keys: set[ClaimKey]) -> None:
    """Wait (bounded) until every key has an answer committed by the instance taking it."""
    deadline = time.monotonic() + CLAIM_WAIT_S
    waiting = set(keys)
    while waiting and time.monotonic() < deadline:
        await asyncio.sleep(CLAIM_POLL_S)
        for source in {s for s, _ in waiting}:
            ids = [k for s, k in waiting if s == source]
            try:
                known = await service.store.known_deliveries(source, ids)
            except StoreUnavailable as exc:
                raise Busy(f"the journal cannot be read: {exc}", JOURNAL_RETRY_AFTER_S) from None
            waiting -= {(source, k) for k in known}


async def _receive(
    service: Service, source: str, adapter: SourceAdapter, request: InboundRequest
) -> Reply:
    claims = service.claims
    delivery_key = adapter.authenticate(request)
    if delivery_key is not None:
        delivery_key = storable(delivery_key)
    held: list[ClaimKey] = []
    if delivery_key is not None:
        earlier = await _earlier_answer(service, claims, (source, delivery_key))
        if earlier is not None:
            return adapter.replayed(earlier)
        if claims.holder((source, delivery_key)) is not None:
            # Another copy started while we looked; it answers once it has committed.
            raise Busy("the same delivery is being taken now; retry", DRAIN_RETRY_AFTER_S)
        held.append((source, delivery_key))
    # The delivery's own key is held from here, before anything else can wait.
    with claims.claim(held) as delivered:
        parsed = await off_loop_if_large(
            partial(_parse_from, adapter, request, source), len(request.body)
        )
        if not parsed.dead and all(event.key is None for event in parsed.events):
            # No event keys of its own (a delivery keyed as a whole): nothing to look up.
            fresh, redelivered, fresh_dead, keys = parsed.events, 0, [], []
        else:
            while True:
                fresh, redelivered = await _new_events(service, claims, source, parsed.events)
                fresh_dead = await _new_dead(service, claims, source, parsed.dead, fresh)
                keys = [(source, e.key) for e in fresh if e.key is not None]
                keys += [(source, d.key) for d in fresh_dead if d.key is not None]
                # A copy of one of these events may have been claimed meanwhile: look again.
                if not any(claims.holder(key) is not None for key in keys):
                    break
        # No event keys (a delivery keyed as a whole): nothing to hold, and no future made.
        with claims.claim(keys) if keys else _NOTHING_CLAIMED as committed:
            refuse_if_busy(service, sum(len(e.change.segment_ids) for e in fresh))
            everything = [*keys, (source, delivery_key)] if delivery_key is not None else keys
            await _claim_across_instances(service, everything)
            queued = False  # whether work of the delivery is queued in the journal
            try:
                # Admitted as a whole above: the delivery is taken whole, never in part.
                taken = await take_events(service, fresh, fresh_dead, admitted=True)
                queued = True
                for dead in taken.dead_letters:
                    _log_dead_letter(source, dead)
                total = SubmitResult.total(taken.results, stale=taken.dead_stale)
                outcome = Outcome(
                    accepted=total.queued + total.joined + total.cached + total.stale,
                    duplicates=total.joined + total.cached,
                    stale=total.stale,
                    events=len(fresh),
                    redelivered=redelivered + len(parsed.dead) - len(fresh_dead),
                    skipped=len(parsed.skipped),
                    dead_lettered=len(taken.dead_letters),
                )
                reply = adapter.accepted(outcome)
                store: DeliveryLog = service.store
                for claimed_source, key in keys:
                    await store.remember_delivery(claimed_source, key, _TAKEN)
                if delivery_key is not None:
                    await store.remember_delivery(source, delivery_key, reply.body)
                await commit(service)
                if committed is not None:
                    committed.set_result(True)
                delivered.set_result(True)
            except BaseException:
                # Nothing taken: the claims go at once, so that a retry (here or elsewhere) is
                # not held up for the claim time. Work queued stays claimed: it is committed,
                # with its answers, once the journal can.
                if not queued:
                    with contextlib.suppress(StoreUnavailable):
                        await service.store.unclaim_keys(everything)
                raise
    _count(service, source, adapter, parsed, outcome)
    return reply


async def _claim_across_instances(service: Service, keys: list[ClaimKey]) -> None:
    """Claim the keys in a shared journal; `_HeldElsewhere` if another instance has some.

    Within one process the in-memory claims above are enough; instances sharing a database
    claim there too, so that the same delivery sent to two of them at once is taken once. The
    claim is replaced by the answer in the webhook's own commit; claims of a copy that backs
    off are withdrawn at once.
    """
    if not keys or service.cluster is None:
        return  # one process on its journal: the in-memory claims are all there is
    store: DeliveryLog = service.store
    try:
        held = await store.claim_keys(keys)
    except StoreUnavailable as exc:
        raise Busy(f"the journal cannot be written: {exc}", JOURNAL_RETRY_AFTER_S) from None
    if held:
        mine = [key for key in keys if key not in held]
        with contextlib.suppress(StoreUnavailable):  # else they lapse after the claim time
            await store.unclaim_keys(mine)
        raise _HeldElsewhere(held)


def _parse_from(adapter: SourceAdapter, request: InboundRequest, source: str) -> ParsedDelivery:
    """The adapter's parse of the delivery, every change marked as `source`'s, keys storable.

    The source is journaled with the pairs each change starts (dead letters included), so
    that dead letters can be listed and replayed by source. Each event is rebuilt once, with
    its key as the journal can keep it (see `storable`).
    """
    parsed = adapter.parse(request)
    events = parsed.events
    for index, event in enumerate(events):
        invalid = event.invalid
        if invalid is not None:
            invalid = _dead_from(invalid, source)
        key = storable(event.key) if event.key is not None else None
        events[index] = InboundEvent(event.change.from_source(source), key, invalid)
    dead = parsed.dead
    for index, letter in enumerate(dead):
        dead[index] = _dead_from(letter, source)
    return parsed


def _dead_from(letter: DeadEvent, source: str) -> DeadEvent:
    """The dead event, marked as `source`'s, its key storable."""
    key = storable(letter.key) if letter.key is not None else None
    return DeadEvent(letter.change.from_source(source), letter.reason, letter.message, key)


def _count(
    service: Service, source: str, adapter: SourceAdapter, parsed: ParsedDelivery, outcome: Outcome
) -> None:
    metrics = service.metrics
    metrics.record_delivery(source, adapter.kind, outcome)
    for skipped in parsed.skipped:
        metrics.record_skipped(source, adapter.kind, skipped.reason)
        log.debug("source %s: event skipped (%s) %s", source, skipped.reason, skipped.detail)


async def _earlier_answer(service: Service, claims: Claims, key: ClaimKey) -> bytes | None:
    """The committed answer to an earlier delivery with this key, waiting for one in progress."""
    holder = claims.holder(key)
    if holder is not None:
        await asyncio.shield(holder)
    earlier = await _lookup(service, key)
    if earlier is None:
        return None
    # The first delivery may still be queued behind a full disk: answer once it is committed.
    await commit(service)
    return earlier


async def _lookup(service: Service, key: ClaimKey) -> bytes | None:
    """The journaled answer for a key; `Busy` while the journal cannot be read."""
    try:
        return await service.store.delivery(*key)
    except StoreUnavailable as exc:
        raise Busy(f"the journal cannot be read: {exc}", JOURNAL_RETRY_AFTER_S) from None


async def _seen_keys(service: Service, claims: Claims, source: str, keys: list[str]) -> set[str]:
    """The keys taken before, waiting for a taker in progress; the rest in one journal read."""
    seen: set[str] = set()
    unknown: list[str] = []
    for key in dict.fromkeys(keys):
        holder = claims.holder((source, key))
        if holder is not None and await asyncio.shield(holder):
            seen.add(key)
        else:
            # No taker, or its taker failed to commit: this copy takes it (or fails alike).
            unknown.append(key)
    if unknown:
        try:
            seen |= await service.store.known_deliveries(source, unknown)
        except StoreUnavailable as exc:
            raise Busy(f"the journal cannot be read: {exc}", JOURNAL_RETRY_AFTER_S) from None
    return seen


async def _new_events(
    service: Service, claims: Claims, source: str, events: list[InboundEvent]
) -> tuple[list[InboundEvent], int]:
    """The events not taken before, and how many were (a key repeated in one delivery too)."""
    keys = [event.key for event in events if event.key is not None]
    seen = await _seen_keys(service, claims, source, keys) if keys else set()
    fresh: list[InboundEvent] = []
    within: set[str] = set()
    repeated = 0
    for event in events:
        key = event.key
        if key is not None:
            if key in within or key in seen:
                repeated += 1
                continue
            within.add(key)
        fresh.append(event)
    return fresh, repeated


async def _new_dead(
    service: Service,
    claims: Claims,
    source: str,
    dead: list[DeadEvent],
    fresh: list[InboundEvent],
) -> list[DeadEvent]:
    """The dead events not taken before; a key repeated in the delivery counts once."""
    within = {event.key for event in fresh if event.key is not None}
    keys = [event.key for event in dead if event.key is not None and event.key not in within]
    seen = await _seen_keys(service, claims, source, keys) if keys else set()
    found = []
    for event in dead:
        if event.key is not None:
            if event.key in within or event.key in seen:
                continue
            within.add(event.key)
        found.append(event)
    return found


Parsed = TypeVar("Parsed")

#: A body this large is parsed on a worker thread: validating a thousand events takes tens of
#: milliseconds, which the event loop spends serving other requests meanwhile (the GIL passes
#: between the two every few milliseconds).
PARSE_OFF_LOOP_BYTES = 64 * 1024


async def off_loop_if_large(parse: Callable[[], Parsed], size: int) -> Parsed:
    """`parse()`, on a worker thread when the body is `PARSE_OFF_LOOP_BYTES` or more."""
    if size < PARSE_OFF_LOOP_BYTES:
        return parse()
    return await asyncio.to_thread(parse)


def refuse_if_busy(service: Service, assignments: int) -> None:
    """Raise `Busy` when draining or fenced, or if `assignments` more would cross high water."""
    if service.draining:
        raise Busy("segmapd is shutting down", DRAIN_RETRY_AFTER_S)
    cluster = service.cluster
    if cluster is not None and cluster.fenced:
        # Its membership is over: nothing it takes could be committed until it has joined again.
        raise Busy(
            "this instance is rejoining the cluster (fenced); retry, or send to another instance",
            DRAIN_RETRY_AFTER_S,
        )
    engine = service.engine
    wait_s = engine.admission_wait(assignments)
    if wait_s is not None:
        raise Busy(
            f"{engine.pending_writes} assignments pending (server.high_water "
            f"{engine.batching.high_water}); retry later",
            wait_s,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Taken:
    """What `take_events` did: each event's result, in order, and the dead letters it handled."""

    results: list[SubmitResult]
    # Those recorded (or forwarded to their owner): not the stale ones, nor those a pair's own
    # state kept out.
    dead_letters: list[DeadEvent]
    # Pairs of the dead letters found older than what they had: counted with the stale ones.
    dead_stale: int = 0


#: A delivery of more than this many assignments is taken in slices, the event loop serving
#: other requests between them: a body of 100,000 assignments must not hold every other request
#: (and the probes) for seconds.
SLICE_ASSIGNMENTS = 500
#: A slice ends after the event that took it past this long (a slice of a fixed number of
#: assignments took 15 ms on one machine and 30 on a slower or busier one; two large bodies
#: taken at once make a request wait for a slice of each).
SLICE_S = 0.004


async def take_events(
    service: Service,
    events: list[InboundEvent],
    dead: Sequence[DeadEvent] = (),
    *,
    admitted: bool = False,
) -> Taken:
    """Hand a delivery's events to the engine, in order, then its dead letters; `Busy` if closed.

    The histories of the contacts that need one are read in one go before anything is taken,
    so a failed read refuses the delivery with nothing of it queued. A delivery larger than
    `SLICE_ASSIGNMENTS` is then taken in slices of `SLICE_S`, the event loop served between them,
    holding its contacts meanwhile (`ContactHolds`: a take of one of them waits), so that
    nothing another request takes can come between a contact's history and its changes; a
    small delivery is taken without waiting for anything after its read. What each change puts
    to work joins its contact's history when the contact comes again in the delivery: a later
    change (a mirror, say) sees what an earlier one of the same delivery started, so that the
    events of one delivery apply in their order, as separate deliveries would. An event's
    invalid part (`InboundEvent.invalid`) is dead-lettered in its event's place, and the events
    nobody can act on after the changes, each compared with the pair's history like any change.
    `admitted`: the caller checked the high-water mark for all of them (`refuse_if_busy`).
    """
    reading = {
        event.change.contact_id
        for event in events
        if event.invalid is not None or _needs_history(event.change)
    }
    reading.update(storable(letter.change.contact_id) for letter in dead)
    sliced = len(events) > 1 and (
        sum(len(event.change.segment_ids) for event in events) > SLICE_ASSIGNMENTS
    )
    holds = service.holds
    if not reading and not sliced:
        # Nothing to wait for from here to the last change: no other take can come between.
        if holds.busy:
            await holds.wait_clear([event.change.contact_id for event in events])
        return await _take(service, events, dead, {}, admitted=admitted, sliced=False)
    named = {event.change.contact_id for event in events}
    named.update(storable(letter.change.contact_id) for letter in dead)
    with await holds.hold(named):
        try:
            found = await service.store.histories(list(reading)) if reading else {}
        except StoreUnavailable as exc:
            raise Busy(f"the journal cannot be read: {exc}", JOURNAL_RETRY_AFTER_S) from None
        # A history for every contact read, empty for one the journal holds nothing of: what
        # the delivery starts for it is noted there for its later events.
        histories = {
            contact_id: found.get(contact_id) or ContactHistory() for contact_id in reading
        }
        return await _take(service, events, dead, histories, admitted=admitted, sliced=sliced)


async def _take(
    service: Service,
    events: list[InboundEvent],
    dead: Sequence[DeadEvent],
    histories: dict[str, ContactHistory],
    *,
    admitted: bool,
    sliced: bool,
) -> Taken:
    """`take_events` once the histories are read: the changes, then the dead letters."""
    engine = service.engine
    if len(events) == 1 and not dead:
        # The usual delivery, one event needing no history (it would read none): the steps
        # below reduced to what they do for it, without their closures and slices.
        event = events[0]
        if event.invalid is None and not _needs_history(event.change):
            try:
                result = engine.submit(event.change, admitted=admitted)
            except (EngineClosed, EngineOverloaded):
                raise Busy("segmapd is not taking work now", DRAIN_RETRY_AFTER_S) from None
            if result.cached:
                service.metrics.record_cache_hit(result.cached)
            return Taken([result], [])
    results: list[SubmitResult] = []
    recorded: list[DeadEvent] = []
    dead_stale = 0
    # Contacts named again later in the delivery: what their changes start is noted.
    repeated = _repeated_contacts(events, dead) if histories else set()

    def dead_letter(letter: DeadEvent) -> None:
        nonlocal dead_stale
        history = histories.get(storable(letter.change.contact_id)) or ContactHistory()
        outcome = engine.dead_letter(
            letter.change, letter.reason, letter.message, history.assignments, history.mirrored_at
        )
        dead_stale += outcome.stale
        if outcome.recorded:
            recorded.append(letter)

    turn = service.holds.slice_turn
    holding = False  # whether this take holds the slice turn
    if sliced:
        await turn.acquire()
        holding = True
    slice_started = time.perf_counter()
    try:
        for index, event in enumerate(events):
            if (
                sliced
                and index
                and not service.draining
                and time.perf_counter() - slice_started >= SLICE_S
            ):
                # The slice before it done: serve other requests. The turn is held over the
                # yield, so another large take waiting for it runs its slice in a later turn of
                # the loop, not in this one after this take's. (Not while draining: the drain
                # waits for the take before it stops the engine, and what is left of it then
                # costs CPU time only, not turns of a loop busy with the final flush.)
                await asyncio.sleep(0)
                turn.release()
                holding = False
                await turn.acquire()
                holding = True
                slice_started = time.perf_counter()
            change = event.change
            history = histories.get(change.contact_id)
            if history is None:
                results.append(engine.submit(change, admitted=admitted))
                continue
            result = engine.submit(
                change, history.assignments, history.mirrored_at, admitted=admitted
            )
            results.append(result)
            if change.contact_id in repeated:
                _note_taken(history, change, result)
            if event.invalid is not None:
                # In its event's place: a later event of the delivery may clear the contact.
                dead_letter(event.invalid)
    except (EngineClosed, EngineOverloaded):
        raise Busy("segmapd is not taking work now", DRAIN_RETRY_AFTER_S) from None
    finally:
        if holding:
            turn.release()
    for letter in dead:
        dead_letter(letter)
    cached = sum(result.cached for result in results)
    if cached:
        service.metrics.record_cache_hit(cached)
    return Taken(results, recorded, dead_stale)


def _repeated_contacts(events: list[InboundEvent], dead: Sequence[DeadEvent]) -> set[str]:
    """The contacts a delivery names more than once (in events, or events and dead letters)."""
    if len(events) + len(dead) < 2:
        return set()
    counts = Counter(event.change.contact_id for event in events)
    counts.update(storable(letter.change.contact_id) for letter in dead)
    return {contact_id for contact_id, count in counts.items() if count > 1}


async def submit_each(
    service: Service, changes: list[MembershipChange], *, admitted: bool = False
) -> list[SubmitResult]:
    """`take_events` for plain changes (`/v1/mappings`, a replay): each one's result, in order."""
    taken = await take_events(
        service, [InboundEvent(change) for change in changes], admitted=admitted
    )
    return taken.results


def _log_dead_letter(source: str, dead: DeadEvent) -> None:
    log.warning("source %s: event dead-lettered (%s): %s", source, dead.reason, dead.message)


def _note_taken(history: ContactHistory, change: MembershipChange, result: SubmitResult) -> None:
    """Make the history hold what `change` asked of each pair it did not find stale.

    Only the intent and the change's time count (the engine answers for a pair with work in
    progress); a pair forwarded to its owner, or confirmed as asked, is known from here on too.
    """
    contact_id = change.contact_id
    now = time.time()
    listed = set(change.mirror) if change.mirror is not None else set(change.add)
    for segment_id in result.segments:
        intent = Intent.ADD if segment_id in listed else Intent.REMOVE
        history.assignments[segment_id] = Assignment(
            contact_id,
            segment_id,
            received_at=now,
            updated_at=now,
            intent=intent,
            occurred_at=change.occurred_at or 0.0,
        )
    if change.mirror is not None:
        history.mirrored_at = max(history.mirrored_at, change.occurred_at or now)


def _needs_history(change: MembershipChange) -> bool:
    """Whether the change is compared with the contact's journaled history.

    A mirror (`set`) compares with the memberships segmapd made, and a change with its own
    time may be older than what was confirmed, or than the last mirror, before. A change with
    neither is the newest by arrival, and costs no journal read, unless another change of the
    same contact in the delivery reads the history (see `take_events`).
    """
    return change.mirror is not None or change.occurred_at is not None


@dataclasses.dataclass(frozen=True, slots=True)
class Mapped:
    """What `take_mappings` took: the events, each one's result, and their totals."""

    events: list[MembershipChange]
    results: list[SubmitResult]
    total: SubmitResult


async def take_mappings(service: Service, body: bytes, lane: Lane = Lane.LIVE) -> Mapped:
    """`POST /v1/mappings`: parse a body of events, admit them, take them in `lane`, commit.

    Returns only once what it took is committed: an answer means the work survives a crash.
    `WebhookRejected` for a body it cannot take, `Busy` when segmapd cannot take work now.
    """
    events = await off_loop_if_large(partial(_parse_mappings, body, lane), len(body))
    refuse_if_busy(service, sum(len(event.segment_ids) for event in events))
    results = await submit_each(service, events, admitted=True)
    await commit(service)
    return Mapped(events, results, SubmitResult.total(results))


def _parse_mappings(body: bytes, lane: Lane) -> list[MembershipChange]:
    """The body's events, each taken in `lane` from the admin API (`MAPPINGS_SOURCE`).

    Whatever its lane: `segmapd import` is one client of `?lane=bulk` among others, and nothing
    tells it apart.
    """
    return [event.from_source(MAPPINGS_SOURCE, lane) for event in parse_events(body)]


async def replay(
    service: Service, dead_letters: Sequence[Assignment], lane: Lane = Lane.LIVE
) -> tuple[int, int]:
    """Queue dead letters again, each as what it was (an add, or a removal); commit, then answer.

    Their work goes in `lane` (bulk for a replay of every dead letter, see the API), and keeps
    each one's source.

    Returns (replayed, skipped). A dead letter of an event nobody could act on is skipped: its
    values were invalid when they arrived, and sending them now would send them as they are
    (`Assignment.dead_on_arrival`); the CRM's next change of the record brings corrected ones.
    Like every write path, it returns only once what it queued is committed: an answer means
    the replay survives a crash. `Busy` when segmapd cannot take the work now.
    """
    chosen = [letter for letter in dead_letters if not letter.dead_on_arrival]
    refuse_if_busy(service, len(chosen))
    changes = [
        MembershipChange(
            letter.contact_id, add=(letter.segment_id,), lane=lane, source=letter.source
        )
        if letter.intent is Intent.ADD
        else MembershipChange(
            letter.contact_id, remove=(letter.segment_id,), lane=lane, source=letter.source
        )
        for letter in chosen
    ]
    results = await submit_each(service, changes, admitted=True)
    await commit(service)
    replayed = sum(result.queued for result in results)
    log.info(
        "replayed %d dead letters (%d invalid on arrival skipped)",
        replayed,
        len(dead_letters) - len(chosen),
    )
    return replayed, len(dead_letters) - len(chosen)


async def commit(service: Service) -> None:
    """Return once everything taken so far is journaled; raise `Busy` while it cannot be."""
    try:
        await service.store.flush()
    except StoreUnavailable as exc:
        raise Busy(f"the journal cannot commit: {exc}", JOURNAL_RETRY_AFTER_S) from None
