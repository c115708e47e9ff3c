"""The emulator's state and rules, independent of HTTP: one object per running emulator."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson

from cxone_emulator.auth import Tokens
from cxone_emulator.config import EmulatorConfig, Faults
from cxone_emulator.counters import Counters
from cxone_emulator.faults import FaultInjector
from cxone_emulator.indexing import IndexingModel
from cxone_emulator.ratelimit import RateLimiter
from cxone_emulator.state import ID_PATTERN, Directory, IdempotencyStore, Member, Segment

_ITEM_MESSAGES = {
    "InvalidContactId": "contact id must be 1-128 characters of [A-Za-z0-9_.:-]",
    "DuplicateContactInBatch": "contact id appears more than once in the request",
    "ContactNotFound": "contact not found in the customer database",
    "IndexBusy": "index busy, retry later",
    "ContactAlreadyInSegment": "contact is already a member of the segment",
    "ContactNotInSegment": "contact is not a member of the segment",
}


def _duplicates(ids: list[str]) -> set[str]:
    """The ids present more than once in a payload."""
    if len(set(ids)) == len(ids):
        return set()
    seen: set[str] = set()
    duplicates: set[str] = set()
    for contact_id in ids:
        if contact_id in seen:
            duplicates.add(contact_id)
        seen.add(contact_id)
    return duplicates


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer a processed write produced: HTTP status and JSON body."""

    status: int
    body: bytes


class Emulator:
    """Everything an emulator instance knows: config, segments, tokens, limits and counters."""

    def __init__(self, config: EmulatorConfig, rng: random.Random) -> None:
        self.startup_config = config
        self.config = config
        self.rng = rng
        self.directory = Directory()
        self.idempotency = IdempotencyStore(config.idempotency_ttl_s)
        self.tokens = Tokens()
        self.limiter = RateLimiter(config.limits)
        self.indexing = IndexingModel(config.indexing, rng)
        self.injector = FaultInjector(rng)
        self.counters = Counters()
        self._stamp_second = -1
        self._stamp_text = ""

    def configure(self, config: EmulatorConfig) -> None:
        """Switch to a new config; rate buckets restart full only when the limits changed."""
        previous = self.config
        self.config = config
        if config.limits != previous.limits:
            self.limiter.configure(config.limits)
        self.indexing.configure(config.indexing)
        self.idempotency.ttl_s = config.idempotency_ttl_s

    def reset(self, restore_config: bool) -> None:
        """Forget all state and counters, optionally also restoring the start-up config."""
        if restore_config:
            self.config = self.startup_config
        self.directory.reset()
        self.idempotency.reset()
        self.idempotency.ttl_s = self.config.idempotency_ttl_s
        self.tokens.reset()
        self.limiter.configure(self.config.limits)
        self.indexing.configure(self.config.indexing)
        self.counters.reset()

    def timestamp(self) -> str:
        """The current time in RFC 3339 (UTC, whole seconds), formatted once per second."""
        wall = int(time.time())
        if wall != self._stamp_second:
            self._stamp_second = wall
            self._stamp_text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
        return self._stamp_text

    def _add(self, segment: Segment, contact_id: str, now: float, added_at: str) -> bool:
        """Add a membership unless the latest write of the pair already is an add."""
        member = segment.members.get(contact_id)
        if member is None:
            delay = self.indexing.draw()
            segment.members[contact_id] = Member(added_at, now + delay, math.isinf(delay))
        elif member.present:
            self._again(member)
            return False
        else:
            member.follow(True, added_at, now, self.indexing.draw())
        self.counters.items["added"] += 1
        return True

    def _remove(self, segment: Segment, contact_id: str, now: float, removed_at: str) -> bool:
        """Remove a membership unless the latest write of the pair is not an add."""
        member = segment.members.get(contact_id)
        if member is None or not member.present:
            return False
        member.follow(False, removed_at, now, self.indexing.draw())
        self.counters.removal_items["removed"] += 1
        return True

    def _again(self, member: Member) -> None:
        member.applied += 1
        if member.applied == 2:
            self.counters.applied_twice += 1

    def bulk(self, segment: Segment, ids: list[str], faults: Faults, now: float) -> Outcome:
        """Apply a bulk write of `ids` (strings) to `segment` and build the 200 answer."""
        counters = self.counters
        items = counters.items
        duplicates = _duplicates(ids)
        counters.bulk_request(len(ids), bool(duplicates))
        missing = self.directory.missing
        members = segment.members
        dynamic = segment.kind == "dynamic"
        busy_rate = faults.index_busy_rate
        random_ = self.rng.random
        fullmatch = ID_PATTERN.fullmatch
        added_at = self.timestamp()
        draw = self.indexing.draw
        inf = math.inf
        shown_limit = self.config.chunk_size
        failed: list[dict[str, Any]] = []
        failure_count = 0
        for position, contact_id in enumerate(ids):
            code = 0
            error = ""
            if fullmatch(contact_id) is None:
                code, error = 400, "InvalidContactId"
            elif contact_id in duplicates:
                code, error = 400, "DuplicateContactInBatch"
            elif contact_id in missing:
                code, error = 404, "ContactNotFound"
            elif busy_rate > 0 and random_() < busy_rate:
                code, error = 503, "IndexBusy"
            elif dynamic:
                items["ignored_dynamic"] += 1
                continue
            else:
                member = members.get(contact_id)
                if member is None:
                    # The hot path of a bulk write: a pair never written before.
                    delay = draw()
                    members[contact_id] = Member(added_at, now + delay, delay == inf)
                    items["added"] += 1
                    continue
                if self._add(segment, contact_id, now, added_at):
                    continue
                code, error = 409, "ContactAlreadyInSegment"
            items[error] += 1
            failure_count += 1
            # CXone processes large batches in chunks and reports only the first chunk's failures.
            if position < shown_limit:
                failed.append(_failed_item(contact_id, code, error))
        return _bulk_answer(segment.segment_id, len(ids), failure_count, failed)

    def single(self, segment: Segment, contact_id: str, faults: Faults, now: float) -> Outcome:
        """Apply a single-contact write: 201, or the item error as the whole answer."""
        items = self.counters.items
        refused = self._single_refusal(contact_id, faults)
        status, error = refused or (201, "")
        if refused is None:
            if segment.kind == "dynamic":
                items["ignored_dynamic"] += 1
            elif not self._add(segment, contact_id, now, self.timestamp()):
                status, error = 409, "ContactAlreadyInSegment"
        if error:
            items[error] += 1
            return Outcome(status, orjson.dumps({"error": error, "message": _ITEM_MESSAGES[error]}))
        body = {"contactId": contact_id, "segmentId": segment.segment_id, "status": "added"}
        return Outcome(201, orjson.dumps(body))

    def bulk_remove(self, segment: Segment, ids: list[str], faults: Faults, now: float) -> Outcome:
        """Apply a bulk removal of `ids` (strings) from `segment` and build the 200 answer."""
        counters = self.counters
        items = counters.removal_items
        duplicates = _duplicates(ids)
        counters.bulk_remove_request(len(ids), bool(duplicates))
        missing = self.directory.missing
        dynamic = segment.kind == "dynamic"
        busy_rate = faults.index_busy_rate
        removed_at = self.timestamp()
        shown_limit = self.config.chunk_size
        failed: list[dict[str, Any]] = []
        failure_count = 0
        for position, contact_id in enumerate(ids):
            if ID_PATTERN.fullmatch(contact_id) is None:
                code, error = 400, "InvalidContactId"
            elif contact_id in duplicates:
                code, error = 400, "DuplicateContactInBatch"
            elif contact_id in missing:
                code, error = 404, "ContactNotFound"
            elif busy_rate > 0 and self.rng.random() < busy_rate:
                code, error = 503, "IndexBusy"
            elif dynamic:
                items["ignored_dynamic"] += 1
                continue
            elif self._remove(segment, contact_id, now, removed_at):
                continue
            else:
                code, error = 409, "ContactNotInSegment"
            items[error] += 1
            failure_count += 1
            if position < shown_limit:
                failed.append(_failed_item(contact_id, code, error))
        return _bulk_answer(segment.segment_id, len(ids), failure_count, failed)

    def single_remove(
        self, segment: Segment, contact_id: str, faults: Faults, now: float
    ) -> Outcome:
        """Apply a single-contact removal: 200, or the item error as the whole answer."""
        items = self.counters.removal_items
        refused = self._single_refusal(contact_id, faults)
        status, error = refused or (200, "")
        if refused is None:
            if segment.kind == "dynamic":
                items["ignored_dynamic"] += 1
            elif not self._remove(segment, contact_id, now, self.timestamp()):
                status, error = 409, "ContactNotInSegment"
        if error:
            items[error] += 1
            return Outcome(status, orjson.dumps({"error": error, "message": _ITEM_MESSAGES[error]}))
        body = {"contactId": contact_id, "segmentId": segment.segment_id, "status": "removed"}
        return Outcome(200, orjson.dumps(body))

    def _single_refusal(self, contact_id: str, faults: Faults) -> tuple[int, str] | None:
        """The item error a single write or removal gets before its segment is looked at.

        A bad id, a contact CXone does not know, or an injected IndexBusy; None otherwise.
        """
        if ID_PATTERN.fullmatch(contact_id) is None:
            return 400, "InvalidContactId"
        if contact_id in self.directory.missing:
            return 404, "ContactNotFound"
        if self.injector.index_busy(faults):
            return 503, "IndexBusy"
        return None

    def refresh_wait(self, segment_id: str, now: float) -> float:
        """Seconds until `segment_id` may be refreshed again (0 = now)."""
        last = self.directory.refreshed_at.get(segment_id)
        if last is None:
            return 0.0
        return max(0.0, last + self.config.refresh_min_interval_s - now)

    def refresh(self, segment: Segment, now: float) -> None:
        """Refresh a segment: every pending write (removals too) becomes visible within 1 s."""
        self.directory.refreshed_at[segment.segment_id] = now
        segment.refresh(now, self.indexing.after_refresh())


def _failed_item(contact_id: str, code: int, error: str) -> dict[str, Any]:
    """One entry of a bulk answer's `failedContacts`."""
    return {"contactId": contact_id, "code": code, "error": error, "message": _ITEM_MESSAGES[error]}


def _bulk_answer(
    segment_id: str, ids: int, failure_count: int, failed: list[dict[str, Any]]
) -> Outcome:
    """The 200 answer of a bulk write or removal (only the first chunk's failures listed)."""
    body = {
        "segmentId": segment_id,
        "successCount": ids - failure_count,
        "failureCount": failure_count,
        "failedContacts": failed,
    }
    return Outcome(200, orjson.dumps(body))
