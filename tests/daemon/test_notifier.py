"""The outbound notifier against a real HTTP receiver on loopback that verifies every signature."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import inspect
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from standardwebhooks import Webhook

from daemon.notifier import InMemoryJournal, Notifier, build_event
from daemon.store.sqlite import SqliteStore
from scheduler.model import Assignment, FailureReason, Intent, State
from scheduler.retry import RetryPolicy

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
FAST = RetryPolicy(initial_s=0.05, multiplier=2.0, max_s=0.2, jitter_ms=0.0)
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@dataclass
class Received:
    """One request the receiver got (after its signature was verified)."""

    at: float
    headers: dict[str, str]
    body: bytes

    @property
    def event_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> Any:
        return orjson.loads(self.body)


Responder = Callable[[Received, int], Awaitable[web.Response]]


async def accept(request: Received, index: int) -> web.Response:
    return web.Response(status=204)


class Receiver:
    """A webhook receiver that checks each request with the Standard Webhooks verifier."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.unverified: list[str] = []
        self.respond: Responder = accept
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            Webhook(SECRET).verify(body, dict(request.headers))
        except Exception as exc:
            self.unverified.append(repr(exc))
            return web.Response(status=401)
        received = Received(asyncio.get_running_loop().time(), dict(request.headers), body)
        self.requests.append(received)
        return await self.respond(received, len(self.requests) - 1)

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                await asyncio.sleep(0.01)
        return self.requests


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    target = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", target.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    target.url = f"http://{host}:{port}/hooks"
    yield target
    await runner.cleanup()
    assert target.unverified == []


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/hooks"


class Outcomes(list[str]):
    def __call__(self, outcome: str) -> None:
        self.append(outcome)


MakeNotifier = Callable[..., Notifier]


@pytest.fixture
async def make_notifier() -> AsyncIterator[MakeNotifier]:
    made: list[Notifier] = []

    def factory(url: str, **options: Any) -> Notifier:
        options.setdefault("retry", FAST)
        notifier = Notifier(url, SECRET, **options)
        made.append(notifier)
        return notifier

    yield factory
    for notifier in made:
        await notifier.stop(0)


def finished(
    contact: str = "c1",
    segment: str = "s1",
    state: State = State.ACTIVE,
    *,
    received_at: float = T0,
    updated_at: float = T0 + 2.5,
    reason: FailureReason | None = None,
    message: str = "",
) -> Assignment:
    return Assignment(
        contact_id=contact,
        segment_id=segment,
        state=state,
        reason=reason,
        message=message,
        attempts=2,
        received_at=received_at,
        updated_at=updated_at,
    )


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_delivers_active_and_failed_events(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    outcomes = Outcomes()
    notifier = make_notifier(receiver.url, on_outcome=outcomes)
    await notifier.start()
    active = finished("c1", "s1")
    failed = finished(
        "c2",
        "s2",
        State.FAILED,
        reason=FailureReason.CONTACT_NOT_FOUND,
        message="no such contact",
    )
    notifier.enqueue(active)
    notifier.enqueue(failed)

    requests = await receiver.wait_for(2)
    await until(lambda: notifier.pending == 0)

    by_type = {r.payload["type"]: r for r in requests}
    assert by_type["mapping.active"].payload == {
        "type": "mapping.active",
        "timestamp": "2023-11-14T22:13:22.500Z",
        "data": {
            "contactId": "c1",
            "segmentId": "s1",
            "intent": "add",
            "state": "active",
            "reason": None,
            "message": None,
            "attempts": 2,
            "receivedAt": "2023-11-14T22:13:20.000Z",
            "updatedAt": "2023-11-14T22:13:22.500Z",
        },
    }
    assert by_type["mapping.failed"].payload["data"] == {
        "contactId": "c2",
        "segmentId": "s2",
        "intent": "add",
        "state": "failed",
        "reason": "contact_not_found",
        "message": "no such contact",
        "attempts": 2,
        "receivedAt": "2023-11-14T22:13:20.000Z",
        "updatedAt": "2023-11-14T22:13:22.500Z",
    }
    for request, assignment in (
        (by_type["mapping.active"], active),
        (by_type["mapping.failed"], failed),
    ):
        assert request.headers["Content-Type"] == "application/json"
        assert (request.event_id, request.body) == build_event(assignment)
    assert outcomes == ["delivered", "delivered"]
    assert notifier.journal.pending() == []


def test_event_id_is_deterministic_and_distinct() -> None:
    first_id, first_body = build_event(finished())
    again_id, again_body = build_event(finished())
    assert (first_id, first_body) == (again_id, again_body)
    assert first_id.startswith("msg_")
    # The same change confirmed later (as a restart redoes it) is the same news: the same id.
    assert build_event(finished(updated_at=T0 + 30))[0] == first_id
    # Another change of the pair, another outcome or another pair: another id.
    assert build_event(finished(received_at=T0 + 1))[0] != first_id
    assert build_event(finished(state=State.FAILED))[0] != first_id
    assert build_event(finished(segment="s2"))[0] != first_id
    assert build_event(finished(contact="c2"))[0] != first_id


async def test_a_confirmation_redone_after_a_restart_keeps_the_webhook_id(tmp_path: Path) -> None:
    # The journal holds the assignment as verifying; the daemon confirms it, notifies, and
    # dies before the journal's commit. The restarted daemon confirms it again, later.
    path = str(tmp_path / "journal.db")
    store = SqliteStore(path)
    await store.open()
    journaled = Assignment("c1", "s1", received_at=T0, updated_at=T0)
    for state in (State.SENDING, State.WRITTEN, State.VERIFYING):
        journaled.transition(state, T0 + 1)
        store.record(journaled)
    await store.close()
    journaled.transition(State.ACTIVE, T0 + 4)
    first_id, _ = build_event(journaled)

    again = SqliteStore(path)
    recovered = await again.open()
    try:
        (redone,) = recovered.assignments
        redone.transition(State.ACTIVE, T0 + 600)
        assert build_event(redone)[0] == first_id

        # The pair's next change, received after the restart, is different news.
        newer = Assignment("c1", "s1", received_at=T0 + 700, updated_at=T0 + 700)
        newer.transition(State.SENDING, T0 + 701)
        newer.transition(State.WRITTEN, T0 + 702)
        newer.transition(State.ACTIVE, T0 + 705)
        assert build_event(newer)[0] != first_id
    finally:
        await again.close()


async def test_retries_after_500_with_the_same_id_and_a_fresh_signature(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    async def flaky(request: Received, index: int) -> web.Response:
        return web.Response(status=500 if index < 2 else 200)

    receiver.respond = flaky
    outcomes = Outcomes()
    notifier = make_notifier(receiver.url, on_outcome=outcomes)
    await notifier.start()
    notifier.enqueue(finished())

    requests = await receiver.wait_for(3)
    await until(lambda: notifier.pending == 0)

    assert len({r.event_id for r in requests}) == 1
    assert len({r.body for r in requests}) == 1
    signer = Webhook(SECRET)
    for request in requests:
        # Each attempt is signed for its own timestamp (the receiver verified it as well).
        sent_at = datetime.fromtimestamp(int(request.headers["webhook-timestamp"]), UTC)
        expected = signer.sign(request.event_id, sent_at, request.body.decode())
        assert request.headers["webhook-signature"] == expected
    assert requests[1].at - requests[0].at >= FAST.initial_s
    assert outcomes == ["retry", "retry", "delivered"]
    assert notifier.journal.pending() == []


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(
    receiver: Receiver, make_notifier: MakeNotifier, status: int
) -> None:
    async def busy_once(request: Received, index: int) -> web.Response:
        if index == 0:
            return web.Response(status=status, headers={"Retry-After": "1"})
        return web.Response(status=204)

    receiver.respond = busy_once
    notifier = make_notifier(receiver.url)
    await notifier.start()
    notifier.enqueue(finished())

    requests = await receiver.wait_for(2)
    # The backoff alone would have retried after 50 ms.
    assert requests[1].at - requests[0].at >= 0.95
    assert requests[0].event_id == requests[1].event_id


async def test_410_gone_drops_the_event(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    async def gone(request: Received, index: int) -> web.Response:
        return web.Response(status=410)

    receiver.respond = gone
    outcomes = Outcomes()
    notifier = make_notifier(receiver.url, on_outcome=outcomes)
    await notifier.start()
    notifier.enqueue(finished())

    await until(lambda: outcomes == ["dropped"])
    await asyncio.sleep(4 * FAST.initial_s)  # long enough for a retry, were there one
    assert len(receiver.requests) == 1
    assert notifier.pending == 0
    assert notifier.journal.pending() == []


async def test_max_attempts_gives_up(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    async def broken(request: Received, index: int) -> web.Response:
        return web.Response(status=500)

    receiver.respond = broken
    outcomes = Outcomes()
    notifier = make_notifier(receiver.url, on_outcome=outcomes, max_attempts=3)
    await notifier.start()
    notifier.enqueue(finished())

    await until(lambda: "dropped" in outcomes)
    assert outcomes == ["retry", "retry", "dropped"]
    assert len(receiver.requests) == 3
    assert notifier.journal.pending() == []


async def test_a_timeout_is_retried(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    async def slow_once(request: Received, index: int) -> web.Response:
        if index == 0:
            await asyncio.sleep(1.0)
        return web.Response(status=204)

    receiver.respond = slow_once
    outcomes = Outcomes()
    notifier = make_notifier(receiver.url, on_outcome=outcomes, timeout_s=0.2)
    await notifier.start()
    notifier.enqueue(finished())

    await until(lambda: outcomes == ["retry", "delivered"])
    assert receiver.requests[0].event_id == receiver.requests[1].event_id


async def test_a_failing_event_does_not_hold_up_others(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    async def refuse_bad(request: Received, index: int) -> web.Response:
        bad = request.payload["data"]["contactId"] == "bad"
        return web.Response(status=503 if bad else 204)

    receiver.respond = refuse_bad
    slow = RetryPolicy(initial_s=0.5, multiplier=2.0, max_s=1.0, jitter_ms=0.0)
    notifier = make_notifier(receiver.url, retry=slow, concurrency=1)
    await notifier.start()
    notifier.enqueue(finished("bad"))
    await receiver.wait_for(1)
    notifier.enqueue(finished("good"))

    requests = await receiver.wait_for(2)
    # The only worker was free for "good" while "bad" waited out its backoff.
    assert requests[1].payload["data"]["contactId"] == "good"
    assert requests[1].at - requests[0].at < slow.initial_s
    await until(lambda: notifier.pending == 1)


def test_enqueue_is_a_plain_function_and_never_waits() -> None:
    assert not inspect.iscoroutinefunction(Notifier.enqueue)
    journal = InMemoryJournal()
    # No event loop running: enqueue cannot await anything, and the queue has no bound.
    notifier = Notifier("http://127.0.0.1:9/hooks", SECRET, journal=journal)
    for index in range(10_000):
        notifier.enqueue(finished(f"c{index}"))
    assert notifier.pending == 10_000
    assert len(journal) == 10_000
    notifier.enqueue(finished("c0"))  # the same transition reported twice: one event
    assert notifier.pending == 10_000


def test_non_terminal_assignments_are_ignored() -> None:
    notifier = Notifier("http://127.0.0.1:9/hooks", SECRET)
    notifier.enqueue(finished(state=State.WRITTEN))
    assert notifier.pending == 0
    assert notifier.journal.pending() == []


async def test_stop_delivers_what_is_queued(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    async def slowish(request: Received, index: int) -> web.Response:
        await asyncio.sleep(0.01)
        return web.Response(status=204)

    receiver.respond = slowish
    notifier = make_notifier(receiver.url, concurrency=2)
    await notifier.start()
    for index in range(40):
        notifier.enqueue(finished(f"c{index}"))
    assert notifier.pending == 40

    await notifier.stop(5.0)

    assert len({r.event_id for r in receiver.requests}) == 40
    assert notifier.pending == 0
    assert notifier.journal.pending() == []
    # After stop: journaled for the next run, not sent.
    notifier.enqueue(finished("late"))
    await asyncio.sleep(0.1)
    assert len(receiver.requests) == 40
    assert [event_id for event_id, _ in notifier.journal.pending()] == [
        build_event(finished("late"))[0]
    ]


async def test_undelivered_events_survive_stop_and_are_resent_on_start(
    receiver: Receiver, dead_url: str, make_notifier: MakeNotifier
) -> None:
    journal = InMemoryJournal()
    down = make_notifier(dead_url, journal=journal)
    await down.start()
    assignments = [finished(f"c{index}") for index in range(3)]
    for assignment in assignments:
        down.enqueue(assignment)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await down.stop(0.3)
    assert loop.time() - started < 2.0
    expected = [build_event(a) for a in assignments]
    assert journal.pending() == expected

    up = make_notifier(receiver.url, journal=journal)
    await up.start()
    await receiver.wait_for(3)
    await until(lambda: up.pending == 0)
    assert sorted((r.event_id, r.body) for r in receiver.requests) == sorted(expected)
    assert journal.pending() == []


async def test_start_and_stop_are_idempotent(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    async with aiohttp.ClientSession() as session:
        notifier = make_notifier(receiver.url, session=session)
        await notifier.start()
        await notifier.start()
        notifier.enqueue(finished())
        await receiver.wait_for(1)
        await notifier.stop(1.0)
        await notifier.stop(1.0)
        assert len(receiver.requests) == 1
        assert not session.closed  # borrowed, not ours to close
        with pytest.raises(RuntimeError):
            await notifier.start()


async def test_secret_stays_out_of_repr_and_logs(
    receiver: Receiver, make_notifier: MakeNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    async def flaky(request: Received, index: int) -> web.Response:
        return web.Response(status=500 if index == 0 else 204)

    receiver.respond = flaky
    caplog.set_level(logging.DEBUG, logger="daemon.notifier")
    notifier = make_notifier(receiver.url + "?token=hush-hush")
    await notifier.start()
    notifier.enqueue(finished())
    await receiver.wait_for(2)
    await notifier.stop(1.0)

    raw = SECRET.removeprefix("whsec_")
    for text in (repr(notifier), str(notifier), caplog.text):
        assert raw not in text
        assert "hush-hush" not in text
    assert "/hooks" in repr(notifier)


@pytest.mark.parametrize(
    ("url", "secret"),
    [("ftp://example.com/x", SECRET), ("/relative", SECRET), ("http://example.com/x", "")],
    # Named ids: the secret is random, and test ids must be the same in every parallel worker.
    ids=["ftp-url", "relative-url", "no-secret"],
)
def test_bad_settings_are_refused(url: str, secret: str) -> None:
    with pytest.raises(Exception):  # noqa: B017 (ValueError or the signer's own error)
        Notifier(url, secret)


def test_a_confirmed_removal_is_announced_as_mapping_removed() -> None:
    removal = Assignment(
        "c9",
        "s9",
        state=State.REMOVED,
        attempts=1,
        received_at=1_700_000_000.0,
        updated_at=1_700_000_004.0,
        intent=Intent.REMOVE,
    )
    event_id, body = build_event(removal)
    payload = orjson.loads(body)
    assert payload["type"] == "mapping.removed"
    assert (payload["data"]["intent"], payload["data"]["state"]) == ("remove", "removed")
    # An add of the same pair received at the same moment is other news: another id.
    added = dataclasses.replace(removal, state=State.ACTIVE, intent=Intent.ADD)
    assert build_event(added)[0] != event_id
