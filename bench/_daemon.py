"""Pieces the process benchmarks share: emulator and daemon processes, configs, RSS, readiness.

Also runnable as `python -m bench._daemon bare`: the ingest benchmark's reference, a bare
aiohttp handler on uvloop that reads the body and answers 202 with a tiny JSON, announcing its
URL with the same JSON `listening` line as the daemon. `python -m bench._daemon checked` is the
same handler plus what any webhook receiver must do before answering -- check the Standard
Webhooks signature (secret in `BENCH_WEBHOOK_SECRET`) and parse the body -- with segmapd's own
code, and nothing else: no redelivery lookup, no journal, no scheduling.
`python -m bench._daemon journaled` is the checked handler plus the least a receiver that
promises "nothing lost" must add: each delivery's rows (its answer and one queued assignment
per segment, in segmapd's own schema, written by its own multi-row statements) committed to a
SQLite journal with `synchronous = FULL` by a writer thread, many deliveries per transaction,
before the answer. No redelivery lookup, no ordering, no scheduling: the floor under any
journaling receiver written this way, against which the daemon's cost of everything else shows.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.processes import ManagedProcess, emulator_process
from tests.support.toml import render_toml

if TYPE_CHECKING:
    from aiohttp import web

ADMIN_TOKEN = "bench-admin-" + "x" * 16
# The emulator's default credentials (tests/support/cxone.py).
CXONE = {
    "grant": "password",
    "client_id": "segmapd",
    "client_secret": "segmapd-secret",
    "access_key_id": "emulator-key",
    "access_key_secret": "emulator-secret=",
    "timeout_s": 5.0,
}
# Every endpoint class unthrottled: the emulator must never be what limits a benchmark.
UNLIMITED = {
    "limits": {
        "bulk": {"rate": 0, "burst": 1},
        "single": {"rate": 0, "burst": 1},
        "read": {"rate": 0, "burst": 1},
        "token": {"rate": 0, "burst": 1},
    },
    "indexing": {"median_s": 0.3, "p99_s": 0.8, "stall_fraction": 0.0},
}


def new_secret() -> str:
    """A fresh Standard Webhooks secret."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def start_emulator(workdir: Path, settings: dict[str, Any]) -> ManagedProcess:
    """An emulator process started with `settings` (merged onto its defaults)."""
    path = workdir / "emulator.json"
    path.write_text(json.dumps(settings))
    process = emulator_process(str(path))
    process.start()
    return process


def daemon_config(emulator_url: str, sections: dict[str, dict[str, Any]]) -> str:
    """TOML for a daemon against the emulator; `sections` override or add keys per section."""
    merged: dict[str, dict[str, Any]] = {
        "server": {"listen": "127.0.0.1:0", "admin_tokens": [ADMIN_TOKEN]},
        "cxone": {"issuer": emulator_url, **CXONE},
        "log": {"level": "warning"},
    }
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return render_toml(merged)


#: The columns of `queued_rows`, in order.
QUEUED_COLUMNS = (
    "contact_id, segment_id, state, reason, message, attempts, received_at, updated_at, history"
)


def queued_rows(
    now: float, contacts: int, segments_per_contact: int, segment_pool: int
) -> Iterator[tuple[Any, ...]]:
    """Journal rows (`QUEUED_COLUMNS`) of `contacts` x `segments_per_contact` queued assignments
    received in the minute before `now`, for benchmarks that start a daemon on a full journal."""
    for i in range(contacts):
        contact = str(100_000_000_000 + i)
        at = now - 60 + i * 1e-5
        for k in range(segments_per_contact):
            segment = f"seg-{(i + 17 * k) % segment_pool}"
            yield (contact, segment, "queued", None, "", 0, at, at, f"queued:{at!r};")


def daemon_process(config: Path) -> ManagedProcess:
    """A `segmapd run` process (not started yet)."""
    return ManagedProcess([sys.executable, "-m", "daemon.cli", "run", "--config", str(config)])


def bare_process() -> ManagedProcess:
    """The ingest reference server as a process (not started yet)."""
    return ManagedProcess([sys.executable, "-m", "bench._daemon", "bare"])


def checked_process(secret: str) -> ManagedProcess:
    """The bare server plus signature check and body parsing (not started yet)."""
    # The secret goes in the environment, not argv, where any user could read it with ps.
    return ManagedProcess(
        [sys.executable, "-m", "bench._daemon", "checked"], env={SECRET_ENV: secret}
    )


def journaled_process(secret: str, journal: Path) -> ManagedProcess:
    """The checked server plus a durable journal of each delivery (not started yet)."""
    return ManagedProcess(
        [sys.executable, "-m", "bench._daemon", "journaled"],
        env={SECRET_ENV: secret, JOURNAL_ENV: str(journal)},
    )


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """A blocking HTTP call (benchmark plumbing, never on a measured path's event loop)."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def wait_ready(url: str, timeout_s: float = 30.0, interval_s: float = 0.01) -> float:
    """Poll `/readyz` until it answers 200; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout_s
    last: tuple[int, bytes] = (0, b"")
    while time.monotonic() < deadline:
        try:
            last = http("GET", url + "/readyz")
        except OSError:
            last = (0, b"connection failed")
        if last[0] == 200:
            return time.monotonic()
        time.sleep(interval_s)
    raise RuntimeError(f"{url}/readyz not 200 within {timeout_s} s: {last!r}")


def metric_total(url: str, name: str) -> float:
    """The sum of every sample of metric `name` (all label sets) on the daemon's /metrics."""
    status, body = http("GET", url + "/metrics")
    if status != 200:
        raise RuntimeError(f"{url}/metrics answered {status}")
    total, seen = 0.0, False
    for line in body.decode().splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    if not seen:
        raise RuntimeError(f"no {name} in {url}/metrics")
    return total


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of a process from /proc/PID/status (VmRSS, VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def pid_of(process: ManagedProcess) -> int:
    """The pid of a started process."""
    assert process.proc is not None
    return process.proc.pid


def workdir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory for configs and journals, removed afterwards."""
    return tempfile.TemporaryDirectory(prefix=f"segmapd-{prefix}-")


# ---- the bare reference server ------------------------------------------------------------------


SECRET_ENV = "BENCH_WEBHOOK_SECRET"
JOURNAL_ENV = "BENCH_JOURNAL"


def _serve_bare(checked: bool) -> None:
    import os

    from aiohttp import web

    from listeners.payload import parse_events
    from listeners.standard import StandardWebhookVerifier

    answer = b'{"accepted":3,"duplicates":0}'
    verifier = StandardWebhookVerifier(os.environ[SECRET_ENV], 3600) if checked else None

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if verifier is not None:
            # A refused request would show in wrk's non-2xx count and void the run.
            verifier.verify(request.headers, body)
            parse_events(body)
        return web.Response(body=answer, status=202, content_type="application/json")

    serve_webhooks(handle)


def _serve_journaled() -> None:
    import asyncio
    import os
    import threading

    from aiohttp import web

    from daemon.store import sqlite as journal
    from listeners.payload import parse_events
    from listeners.standard import StandardWebhookVerifier

    answer = b'{"accepted":3,"duplicates":0}'
    verifier = StandardWebhookVerifier(os.environ[SECRET_ENV], 3600)
    connection = journal.connect(os.environ[JOURNAL_ENV], "FULL")
    wake = threading.Condition()
    # (assignment rows, delivery row, the future its answer waits on) per delivery not committed
    queued: list[tuple[list[tuple[Any, ...]], tuple[Any, ...], asyncio.Future[None]]] = []
    loop: asyncio.AbstractEventLoop | None = None

    def settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
        for future in futures:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    def write_loop() -> None:
        while True:
            with wake:
                while not queued:
                    wake.wait()
                work = queued[:]
                queued.clear()
            error: BaseException | None = None
            try:
                connection.execute("BEGIN IMMEDIATE")
                rows = [row for assignments, _, _ in work for row in assignments]
                journal.UPSERT_ASSIGNMENTS.run(connection, rows)
                journal.INSERT_DELIVERIES.run(connection, [delivery for _, delivery, _ in work])
                connection.execute("COMMIT")
            except Exception as exc:  # answered 500: wrk counts it, and the run is invalid
                error = exc
                with contextlib.suppress(Exception):
                    connection.execute("ROLLBACK")
            assert loop is not None
            loop.call_soon_threadsafe(settle, [future for _, _, future in work], error)

    async def handle(request: web.Request) -> web.Response:
        nonlocal loop
        body = await request.read()
        verifier.verify(request.headers, body)
        now = time.time()
        rows = [
            (
                change.contact_id,
                segment_id,
                "queued",
                None,
                "",
                0,
                now,
                now,
                "add",
                change.occurred_at or 0.0,
                "live",
                "crm",
                f"queued:{now!r};",
            )
            for change in parse_events(body)
            for segment_id in change.add
        ]
        if loop is None:
            loop = asyncio.get_running_loop()
            threading.Thread(target=write_loop, name="journal-writer", daemon=True).start()
        future = loop.create_future()
        with wake:
            queued.append((rows, ("crm", request.headers["webhook-id"], answer, now), future))
            wake.notify()
        await future
        return web.Response(body=answer, status=202, content_type="application/json")

    serve_webhooks(handle)


def serve_webhooks(handle: Callable[[web.Request], Awaitable[web.Response]]) -> None:
    """Serve `POST /v1/webhooks/{source}` with `handle` on uvloop until SIGTERM or SIGINT.

    The URL is announced with the daemon's JSON `listening` line, so `ManagedProcess` can run
    a reference server like the daemon. No access log: the daemon keeps none either.
    """
    import asyncio

    import uvloop
    from aiohttp import web

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/v1/webhooks/{source}", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(json.dumps({"event": "listening", "url": f"http://{host}:{port}"}), flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        uvloop.run(serve())


if __name__ == "__main__":
    if sys.argv[1:] in (["bare"], ["checked"]):
        _serve_bare(checked=sys.argv[1] == "checked")
    elif sys.argv[1:] == ["journaled"]:
        _serve_journaled()
    else:
        sys.exit("usage: python -m bench._daemon bare|checked|journaled")
