"""Engines wired to a real HTTP client and the session's emulator process."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from daemon.cxone import HttpCXoneClient
from daemon.store.memory import MemoryStore
from daemon.wiring import build_scheduler
from scheduler.engine import BatchingPolicy, Engine
from scheduler.model import Assignment, Lane, State
from scheduler.observer import EngineObserver
from scheduler.ownership import Ownership
from scheduler.ratelimit import RateGate
from scheduler.retry import RetryPolicy
from scheduler.upstream import BulkResult, MembershipResult, RefreshResult, SingleResult
from scheduler.validation import MembershipPoller, ReadLanePolicy, ValidationPolicy
from scheduler.validation_state import MemoryConfirmationCache, MemoryRefreshBudget
from tests.support.cxone import emulator_settings
from tests.support.emulator import EmulatorControl
from tests.support.processes import ManagedProcess

# Fast timings so integration tests finish in seconds; the policy's shape is what is tested.
FAST_RETRY = RetryPolicy(initial_s=0.2, multiplier=1.5, max_s=1.0, jitter_ms=100, attempts=5)
FAST_BATCHING = BatchingPolicy(min_size=50, max_size=200, linger_s=0.2)


class RecordingObserver(EngineObserver):
    """Keeps what the engine reports, and checks the per-contact in-flight limit as it goes."""

    def __init__(self) -> None:
        self.retries: list[tuple[str, int, float]] = []
        self.bulk_sizes: list[int] = []
        self.outcomes: list[tuple[str, str]] = []
        self.states: dict[tuple[str, str], State] = {}
        self.max_inflight_per_contact = 0
        self._inflight: dict[str, int] = {}
        self.reads_by_lane: Counter[Lane] = Counter()

    def transitioned(self, assignment: Assignment, previous: State) -> None:
        in_flight = {State.SENDING, State.RETRYING}
        was = previous in in_flight
        now = assignment.state in in_flight
        contact = assignment.contact_id
        if now and not was:
            self._inflight[contact] = self._inflight.get(contact, 0) + 1
        elif was and not now:
            self._inflight[contact] -= 1
        self.max_inflight_per_contact = max(
            self.max_inflight_per_contact, self._inflight.get(contact, 0)
        )
        self.states[assignment.key] = assignment.state

    def bulk_sent(self, segment_id: str, ids: int, attempt: int) -> None:
        self.bulk_sizes.append(ids)

    def upstream_outcome(self, endpoint: str, outcome: str, elapsed_s: float) -> None:
        self.outcomes.append((endpoint, outcome))

    def retry_scheduled(self, segment_id: str, ids: int, delay_s: float) -> None:
        self.retries.append((segment_id, ids, delay_s))

    def membership_read(self, segment_id: str, is_member: bool, lane: Lane = Lane.LIVE) -> None:
        self.reads_by_lane[lane] += 1


class KeyLog:
    """Wraps the real client and keeps every bulk request's (segment, ids, idempotency key).

    Bulk writes go to `bulk_calls`, bulk removals to `remove_calls`.
    """

    def __init__(self, client: HttpCXoneClient) -> None:
        self.client = client
        self.bulk_calls: list[tuple[str, tuple[str, ...], str]] = []
        self.remove_calls: list[tuple[str, tuple[str, ...], str]] = []
        self.reads: list[tuple[str, str, float]] = []
        self.refreshes: list[str] = []
        # Each refresh: its segment, when it was sent and answered (wall clock), and whether
        # CXone accepted it (None: it raised).
        self.refresh_log: list[tuple[str, float, float, bool | None]] = []

    async def bulk_add(
        self, segment_id: str, contact_ids: list[str], idempotency_key: str
    ) -> BulkResult:
        self.bulk_calls.append((segment_id, tuple(contact_ids), idempotency_key))
        return await self.client.bulk_add(segment_id, contact_ids, idempotency_key)

    async def single_add(
        self, segment_id: str, contact_id: str, idempotency_key: str
    ) -> SingleResult:
        return await self.client.single_add(segment_id, contact_id, idempotency_key)

    async def bulk_remove(
        self, segment_id: str, contact_ids: list[str], idempotency_key: str
    ) -> BulkResult:
        self.remove_calls.append((segment_id, tuple(contact_ids), idempotency_key))
        return await self.client.bulk_remove(segment_id, contact_ids, idempotency_key)

    async def single_remove(
        self, segment_id: str, contact_id: str, idempotency_key: str
    ) -> SingleResult:
        return await self.client.single_remove(segment_id, contact_id, idempotency_key)

    async def is_member(self, segment_id: str, contact_id: str) -> MembershipResult:
        self.reads.append((segment_id, contact_id, time.monotonic()))
        return await self.client.is_member(segment_id, contact_id)

    async def refresh(self, segment_id: str) -> RefreshResult:
        self.refreshes.append(segment_id)
        sent = time.time()
        accepted: bool | None = None
        try:
            result = await self.client.refresh(segment_id)
            accepted = result.accepted
            return result
        finally:
            self.refresh_log.append((segment_id, sent, time.time(), accepted))

    def assert_keys_consistent(self) -> None:
        """One key, one body: a key is reused only for a byte-identical resend."""
        bodies: dict[str, tuple[str, tuple[str, ...]]] = {}
        for segment_id, ids, key in self.bulk_calls + self.remove_calls:
            first = bodies.setdefault(key, (segment_id, ids))
            assert first == (segment_id, ids), f"key {key} reused for another body"


class EngineHarness:
    """An engine, its client, store and observer, against the emulator."""

    def __init__(
        self,
        engine: Engine,
        client: KeyLog,
        store: MemoryStore,
        observer: RecordingObserver,
        poller: MembershipPoller | None,
        budget: MemoryRefreshBudget,
    ) -> None:
        self.engine = engine
        self.poller = poller
        self.budget = budget
        self.client = client
        self.store = store
        self.observer = observer

    async def states(self, contact_id: str) -> dict[str, Assignment]:
        return {a.segment_id: a for a in await self.store.contact(contact_id)}


MakeEngine = Callable[..., Awaitable[EngineHarness]]


@pytest.fixture
async def make_engine(
    emulator: EmulatorControl, emulator_proc: ManagedProcess
) -> AsyncIterator[MakeEngine]:
    """Build and start engines against the emulator; stops them after the test."""
    built: list[EngineHarness] = []

    async def factory(
        *,
        write_rps: float = 50.0,
        single_write_rps: float = 20.0,
        batching: BatchingPolicy = FAST_BATCHING,
        retry: RetryPolicy = FAST_RETRY,
        seed: int = 42,
        validation: ValidationPolicy | None = None,
        read_rps: float = 200.0,
        read_lanes: ReadLanePolicy | None = None,
        ownership: Ownership | None = None,
        **settings: Any,
    ) -> EngineHarness:
        settings.setdefault("timeout_s", 2.0)
        http_client = HttpCXoneClient(emulator_settings(emulator_proc.url, **settings))
        await http_client.start()
        client = KeyLog(http_client)
        store = MemoryStore()
        observer = RecordingObserver()
        budget = MemoryRefreshBudget()
        scheduler = build_scheduler(
            client=client,
            store=store,
            write_gate=RateGate("bulk", write_rps),
            single_gate=RateGate("single", single_write_rps),
            read_gate=RateGate("read", read_rps),
            batching=batching,
            retry=retry,
            observer=observer,
            validation=validation,
            read_lanes=read_lanes,
            cache=(
                MemoryConfirmationCache(validation.cache_ttl_s) if validation is not None else None
            ),
            budget=budget,
            ownership=ownership,
            rng=random.Random(seed),
            validation_rng=random.Random(seed),
        )
        engine, poller = scheduler.engine, scheduler.poller
        if poller is not None:
            await poller.start()
        await engine.start()
        harness = EngineHarness(engine, client, store, observer, poller, budget)
        built.append(harness)
        return harness

    yield factory
    for harness in built:
        await harness.engine.stop(budget_s=5.0)
        if harness.poller is not None:
            await harness.poller.stop()
        await harness.client.client.close()
