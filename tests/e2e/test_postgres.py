"""The real daemon on a PostgreSQL journal: webhooks end active, SIGKILL, a database restart."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.e2e.conftest import Daemon, StartDaemon
from tests.e2e.test_cli import segmapd
from tests.e2e.test_durability import kill_with_writes_in_flight_then_restart
from tests.support.emulator import EmulatorControl
from tests.support.postgres import PostgresServer


def on_postgres(postgres: PostgresServer, url: str) -> dict[str, Any]:
    """The `[store]` table of a daemon journaling to `url`, its password kept out of the URL."""
    return {"url": url, "password": postgres.password}


async def test_webhooks_end_active_and_survive_a_restart(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    daemon = await start_daemon(store=on_postgres(postgres, postgres_url))
    events = [{"contactId": f"pg{i}", "segmentIds": ["PG1", "PG2"]} for i in range(20)]
    status, answer = await daemon.webhook(http, events, msg_id="msg_pg_1")
    assert (status, answer["accepted"]) == (202, 40)
    for i in (0, 19):
        await daemon.wait_states(http, f"pg{i}", {"active"}, 30)
    assert {m["contactId"] for m in await emulator.members("PG1")} == {f"pg{i}" for i in range(20)}
    async with http.get(f"{daemon.url}/readyz") as response:
        assert response.status == 200, await response.text()

    daemon.process.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.process.wait, 20) == 0
    await asyncio.to_thread(daemon.restart)
    # The journal is the database's: states and the delivery's answer outlive the process.
    segments = await daemon.wait_states(http, "pg7", {"active"}, 5)
    assert sorted(segments) == ["PG1", "PG2"]
    status, again = await daemon.webhook(http, events, msg_id="msg_pg_1")
    assert (status, again) == (200, answer)


async def test_sigkill_with_writes_in_flight_replays_under_the_same_keys(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    store = on_postgres(postgres, postgres_url)
    await kill_with_writes_in_flight_then_restart(start_daemon, emulator, http, store, "pk")


async def webhook_status(
    daemon: Daemon, http: aiohttp.ClientSession, contact: str
) -> tuple[int, str]:
    """POST one signed webhook; its status and Retry-After header ('' when absent)."""
    body = orjson.dumps({"contactId": contact, "segmentIds": ["PR1"]})
    async with http.post(
        f"{daemon.url}/v1/webhooks/crm", data=body, headers=daemon.signed_headers(body)
    ) as response:
        await response.read()
        return response.status, response.headers.get("Retry-After", "")


async def test_a_database_restarted_mid_run_refuses_work_then_resumes_by_itself(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    # Slow writes, so that accepted work is still unfinished while the database is away.
    await emulator.configure({"limits": {"bulk": {"rate": 2, "burst": 1}}})
    daemon = await start_daemon(
        store=on_postgres(postgres, postgres_url), limits={"write_rps": 2.0}
    )
    accepted = [f"pr-{i}" for i in range(12)]
    for contact in accepted:
        assert (await webhook_status(daemon, http, contact))[0] == 202

    await asyncio.to_thread(postgres.stop)
    try:
        async with http.get(f"{daemon.url}/readyz") as response:
            assert response.status == 503
            assert "not writable" in (await response.json())["checks"]["store"]
        await asyncio.sleep(1.0)  # the engine meets the outage too (batches cannot be saved)
    finally:
        await asyncio.to_thread(postgres.start)

    # Back by itself: ready again, new work taken, everything accepted ends active.
    deadline = time.monotonic() + 20
    while True:
        async with http.get(f"{daemon.url}/readyz") as response:
            if response.status == 200:
                break
        assert time.monotonic() < deadline, "not ready after the database came back"
        await asyncio.sleep(0.2)
    assert (await webhook_status(daemon, http, "after"))[0] == 202
    for contact in [*accepted, "after"]:
        await daemon.wait_states(http, contact, {"active"}, 30)
    members = {m["contactId"] for m in await emulator.members("PR1")}
    assert {*accepted, "after"} <= members
    counters = await emulator.counters()
    assert counters["applied_twice"] == 0
    assert counters["idempotency_conflicts"]["IdempotencyKeyReused"] == 0


async def test_webhooks_are_answered_busy_while_the_database_is_down(
    start_daemon: StartDaemon,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    daemon = await start_daemon(store=on_postgres(postgres, postgres_url))
    assert (await webhook_status(daemon, http, "up"))[0] == 202
    await asyncio.to_thread(postgres.stop)
    try:
        status, retry_after = await webhook_status(daemon, http, "while-down")
        # The admin API's reads too: 503 with Retry-After, never a 500 with a traceback.
        admin_answers = []
        for method, path in (
            ("GET", "/v1/dead-letters"),
            ("GET", "/v1/contacts/up"),
            ("POST", "/v1/dead-letters/replay"),
        ):
            async with http.request(method, f"{daemon.url}{path}", headers=daemon.admin) as r:
                admin_answers.append((path, r.status, r.headers.get("Retry-After")))
    finally:
        await asyncio.to_thread(postgres.start)
    assert status == 503 and int(retry_after) > 0
    assert all(code == 503 and retry for _, code, retry in admin_answers), admin_answers
    # Taken once the database is back, by itself.
    deadline = time.monotonic() + 20
    while (status := (await webhook_status(daemon, http, "back"))[0]) != 202:
        assert status == 503 and time.monotonic() < deadline
        await asyncio.sleep(0.2)


async def test_an_unreachable_database_stops_it_with_a_status_systemd_restarts(
    start_daemon: StartDaemon,
    postgres: PostgresServer,
    postgres_url: str,
    cli_env: dict[str, str],
    tmp_path: Path,
):
    first = await start_daemon(store=on_postgres(postgres, postgres_url))
    # A database nobody answers at: exit 1, which systemd restarts.
    unreachable = tmp_path / "unreachable.toml"
    unreachable.write_text(
        first.config.read_text().replace(
            postgres_url, f"postgresql://segmap_test@127.0.0.1:{free_port()}/segmapd"
        )
    )
    code, _, err = await segmapd("run", "--config", str(unreachable), env=cli_env)
    assert code == 1
    assert "cannot reach the journal" in err and postgres.password not in err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
