"""HubSpot benchmark: batches of 100 contact property changes, assignments accepted per second.

HubSpot sends up to 100 events per request. Each request here is a JSON array of 100
`contact.propertyChange` events of the segments property, each for its own contact and each
with the value `a;b;c`, so one request carries 300 assignments; every event has its own
eventId, and no event is sent twice (a repeat would be a cheap redelivery). Every request
carries a valid `X-HubSpot-Signature-v3`, computed here as HubSpot documents it (base64 of
HMAC-SHA256 with the client secret over method + URI + body + timestamp), signed beforehand
with a fresh timestamp; a Lua script makes wrk cycle through them, each wrk thread through its
own share. The signatures are at most a few tens of seconds old when sent, well inside the
source's default `tolerance_s` (300 s), which the benchmark keeps.

The daemon (`segmapd run`, SQLite journal with `synchronous = FULL`, a `[sources.hubspot]` of
`kind = "hubspot"`, CXone = an emulator process with CXone's default limits,
`server.high_water` far above the run) and the reference take the same requests from the same
wrk settings in the same run. The reference is a bare aiohttp handler on uvloop that runs the
HubSpot adapter's `authenticate` and `parse` (segmapd's own code) and answers 200: what any
receiver must do before it answers, and nothing else (no redelivery lookup, no journal, no
scheduling). It is also a process: `python -m bench.hubspot reference PUBLIC_URL`, the client
secret in the environment.

Rates count the requests wrk saw answered 2xx within the run. A run is valid only if wrk saw
no non-2xx answer and no socket error, no request was sent twice, the daemon's
`segmapd_assignments_accepted` counts 300 for every answered request, and after the daemon
drained, the journal holds 300 assignments (a row per contact and segment in `assignments`) and
100 redelivery keys for every request it took: every answered one, plus at most one per
connection still in flight when wrk stopped, which the daemon takes but wrk does not count.

HubSpot counts a delivery as failed when it is not answered within 5 seconds, so the daemon's
p99 and slowest answer are reported beside that limit: at the full load above, where latency is
mostly queueing (64 requests in flight), and in one more daemon run at 10 requests in flight,
the concurrency limit in HubSpot's own webhook settings example, which HubSpot never exceeds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import shutil
import sqlite3
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench import _wrk
from bench._daemon import (
    daemon_config,
    daemon_process,
    metric_total,
    start_emulator,
    wait_ready,
    workdir,
)
from bench._wrk import WrkResult, lua_script
from tests.support.processes import ManagedProcess

RUNS = 3
THREADS = 2
# Full load, as ingest.py: far more requests in flight than HubSpot sends to one target URL.
CONNECTIONS = 64
# HubSpot sends at most its concurrency limit at once; 10 in HubSpot's own settings example.
HUBSPOT_CONNECTIONS = 10
# A request takes the daemon seconds at full load: a run must hold several of them in turn.
DURATION_S = 10
LATENCY_DURATION_S = 5
EVENTS_PER_REQUEST = 100  # HubSpot's maximum batch
SEGMENTS = ("a", "b", "c")
ASSIGNMENTS_PER_REQUEST = EVENTS_PER_REQUEST * len(SEGMENTS)
# Requests signed per run; wrk must not get through them all against the daemon (the reference
# may: it keeps no keys). The run reports a wrap-around, which makes it invalid.
POOL = 2_500
HUBSPOT_ANSWER_LIMIT_S = 5.0

SOURCE = "hubspot"
# What the app's target URL would be in HubSpot; v3 signatures cover it, not the loopback URL.
PUBLIC_URL = f"https://segmapd.example.com/v1/webhooks/{SOURCE}"
SEGMENTS_PROPERTY = "cxone_segments"
PORTAL_ID = 62515
APP_ID = 54321
SUBSCRIPTION_ID = 1_234_567
# Contacts are distinct across runs too, as ingest.py does.
FIRST_OBJECT_ID = 100_000_000_000
SECRET_ENV = "BENCH_HUBSPOT_CLIENT_SECRET"

LUA = lua_script("/v1/webhooks/hubspot", ("X-HubSpot-Request-Timestamp", "X-HubSpot-Signature-v3"))


@dataclass
class Journal:
    """What the journal file held after the daemon drained."""

    assignments: int
    event_keys: int


@dataclass
class DaemonRun:
    """One daemon run: wrk's view, the daemon's own count, the journal's, the drain time."""

    wrk: WrkResult
    connections: int
    accepted: int
    journal: Journal
    drain_s: float

    @property
    def accepted_per_s(self) -> float:
        """Assignments answered as accepted within the run, per second."""
        return assignments_per_s(self.wrk)


def assignments_per_s(result: WrkResult) -> float:
    """Assignments in the requests answered 2xx, per second of the run."""
    return result.ok * ASSIGNMENTS_PER_REQUEST / result.duration_s


def new_client_secret() -> str:
    """A fresh secret shaped like a HubSpot app's client secret (a UUID)."""
    raw = secrets.token_hex(16)
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def sign_v3(client_secret: str, body: bytes, timestamp_ms: int) -> str:
    """`X-HubSpot-Signature-v3` as HubSpot computes it, for a POST to `PUBLIC_URL`."""
    content = b"POST" + PUBLIC_URL.encode() + body + str(timestamp_ms).encode()
    digest = hmac.new(client_secret.encode(), content, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def batch(run: int, request: int, occurred_at_ms: int) -> bytes:
    """Request `request` of run `run`: 100 property changes, each a new contact and eventId."""
    first = (run * POOL + request) * EVENTS_PER_REQUEST
    value = ";".join(SEGMENTS)
    return orjson.dumps(
        [
            {
                "eventId": first + k + 1,
                "subscriptionId": SUBSCRIPTION_ID,
                "portalId": PORTAL_ID,
                "appId": APP_ID,
                "occurredAt": occurred_at_ms,
                "subscriptionType": "contact.propertyChange",
                "attemptNumber": 0,
                "objectId": FIRST_OBJECT_ID + first + k,
                "changeSource": "CRM_UI",
                "propertyName": SEGMENTS_PROPERTY,
                "propertyValue": value,
            }
            for k in range(EVENTS_PER_REQUEST)
        ]
    )


def write_pool(client_secret: str, prefix: Path, run: int) -> None:
    """Sign POOL requests, split over one file per wrk thread (`prefix.0`, `prefix.1`, ...)."""
    now_ms = int(time.time() * 1000)
    files = [open(f"{prefix}.{t}", "w") for t in range(THREADS)]  # noqa: SIM115
    try:
        for i in range(POOL):
            body = batch(run, i, now_ms)
            signature = sign_v3(client_secret, body, now_ms)
            files[i % THREADS].write(f"{now_ms}\t{signature}\t{body.decode()}\n")
    finally:
        for handle in files:
            handle.close()


def remove_pool(prefix: Path) -> None:
    """Delete a run's request files (tens of MB each)."""
    for t in range(THREADS):
        Path(f"{prefix}.{t}").unlink(missing_ok=True)


def run_wrk(
    url: str,
    script: Path,
    prefix: Path,
    connections: int = CONNECTIONS,
    duration_s: int = DURATION_S,
) -> WrkResult:
    """One wrk run against `url` through the signed requests under `prefix`."""
    # A request timeout well past HubSpot's 5 s, so a slow answer is measured, not cut off.
    return _wrk.run_wrk(
        url,
        script,
        prefix,
        threads=THREADS,
        connections=connections,
        duration_s=duration_s,
        timeout_s=30,
    )


def read_journal(path: Path) -> Journal:
    """Count the journal's assignment rows and the source's redelivery keys."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assignments = connection.execute("SELECT count(*) FROM assignments").fetchone()[0]
        keys = connection.execute(
            "SELECT count(*) FROM deliveries WHERE source = ?", (SOURCE,)
        ).fetchone()[0]
    finally:
        connection.close()
    return Journal(int(assignments), int(keys))


def daemon_run(
    emulator_url: str,
    client_secret: str,
    root: Path,
    script: Path,
    prefix: Path,
    run: int,
    connections: int = CONNECTIONS,
    duration_s: int = DURATION_S,
) -> DaemonRun:
    """Start a daemon on a fresh journal, load it, drain it; wrk's, its own, the journal's view."""
    directory = root / f"run-{run}"
    directory.mkdir()
    journal = directory / "journal.db"
    config = directory / "segmapd.toml"
    config.write_text(
        daemon_config(
            emulator_url,
            {
                "server": {"high_water": 50_000_000, "drain_budget_s": 3.0},
                "store": {"url": f"sqlite://{journal}", "synchronous": "FULL"},
                f"sources.{SOURCE}": {
                    "kind": "hubspot",
                    "client_secret": client_secret,
                    "public_url": PUBLIC_URL,
                    "segments_property": SEGMENTS_PROPERTY,
                },
            },
        )
    )
    daemon = daemon_process(config)
    url = daemon.start()
    try:
        wait_ready(url)
        result = run_wrk(url, script, prefix, connections, duration_s)
        accepted = int(metric_total(url, "segmapd_assignments_accepted_total"))
    finally:
        stopped = time.monotonic()
        status = daemon.stop(timeout_s=60)
        drain_s = time.monotonic() - stopped
    if status != 0:
        raise RuntimeError(f"the daemon exited with {status} after the load")
    return DaemonRun(result, connections, accepted, read_journal(journal), drain_s)


def reference_process(client_secret: str) -> ManagedProcess:
    """The reference server (HubSpot signature check and parsing, then 200) as a process."""
    # The secret goes in the environment, not argv, where any user could read it with ps.
    return ManagedProcess(
        [sys.executable, "-m", "bench.hubspot", "reference", PUBLIC_URL],
        env={SECRET_ENV: client_secret},
    )


def problems_of(name: str, daemon: DaemonRun, reference: WrkResult | None) -> list[str]:
    """Why run `name` is invalid; empty when it is valid."""
    found = []
    result = daemon.wrk
    if result.non2xx or result.socket_errors:
        found.append(f"{name}: daemon: {result.non2xx} non-2xx, {result.socket_errors} errors")
    if reference is not None and (reference.non2xx or reference.socket_errors):
        found.append(
            f"{name}: reference: {reference.non2xx} non-2xx, {reference.socket_errors} errors"
        )
    if result.wraps:
        found.append(f"{name}: wrk went through all {POOL} signed requests (raise POOL)")
    # wrk stops with requests in flight: the daemon still takes them (its count, read right
    # after the load, may miss the last few; the journal, read after the drain, has them all),
    # but wrk never counts their answers.
    taken, partial = divmod(daemon.journal.event_keys, EVENTS_PER_REQUEST)
    if partial or not result.ok <= taken <= result.ok + daemon.connections:
        found.append(
            f"{name}: {result.ok} requests answered 2xx (and at most {daemon.connections} in "
            f"flight), but the journal holds {daemon.journal.event_keys} redelivery keys "
            f"({EVENTS_PER_REQUEST} per request)"
        )
    if daemon.journal.assignments != taken * ASSIGNMENTS_PER_REQUEST:
        found.append(
            f"{name}: {taken} requests taken = {taken * ASSIGNMENTS_PER_REQUEST} assignments, "
            f"the journal holds {daemon.journal.assignments}"
        )
    counted = daemon.accepted
    if counted % ASSIGNMENTS_PER_REQUEST or not (
        result.ok * ASSIGNMENTS_PER_REQUEST <= counted <= daemon.journal.assignments
    ):
        found.append(
            f"{name}: the daemon counted {counted} assignments accepted; {result.ok} requests "
            f"answered 2xx carry {result.ok * ASSIGNMENTS_PER_REQUEST}, the journal holds "
            f"{daemon.journal.assignments}"
        )
    return found


def main() -> int:
    """Run the HubSpot benchmark and print its figures."""
    if shutil.which("wrk") is None:
        print(
            "hubspot: skipped: the native load generator `wrk` is not installed "
            "(Debian/Ubuntu: apt-get install -y wrk)"
        )
        return 0
    client_secret = new_client_secret()
    with workdir("hubspot") as tmp:
        root = Path(tmp)
        script = root / "hubspot.lua"
        script.write_text(LUA)
        emulator = start_emulator(root, {})  # CXone's default limits
        reference = reference_process(client_secret)
        try:
            reference_url = reference.start()
            daemon_runs: list[DaemonRun] = []
            reference_results: list[WrkResult] = []
            for run in range(RUNS):
                prefix = root / f"requests-{run}"
                write_pool(client_secret, prefix, run)
                reference_results.append(run_wrk(reference_url, script, prefix))
                daemon_runs.append(
                    daemon_run(emulator.url, client_secret, root, script, prefix, run)
                )
                remove_pool(prefix)
                print_run(run + 1, daemon_runs[-1], reference_results[-1])
            # Its own requests (run index RUNS): ids used in no other run.
            prefix = root / "requests-latency"
            write_pool(client_secret, prefix, RUNS)
            latency_run = daemon_run(
                emulator.url,
                client_secret,
                root,
                script,
                prefix,
                RUNS,
                HUBSPOT_CONNECTIONS,
                LATENCY_DURATION_S,
            )
            remove_pool(prefix)
        finally:
            reference.stop()
            emulator.stop()
    return report(daemon_runs, reference_results, latency_run)


def print_run(run: int, daemon: DaemonRun, reference: WrkResult) -> None:
    """One run's figures."""
    result = daemon.wrk
    print(
        f"  run {run}: daemon {result.rps:6.0f} req/s = {daemon.accepted_per_s:7.0f} "
        f"assignments/s (p50 {result.p50_ms:.0f} ms, p99 {result.p99_ms:.0f} ms, max "
        f"{result.max_ms:.0f} ms); reference {reference.rps:6.0f} req/s = "
        f"{assignments_per_s(reference):7.0f} assignments/s; "
        f"journal: {daemon.journal.assignments} assignments, {daemon.journal.event_keys} event "
        f"keys, drained in {daemon.drain_s:.1f} s",
        flush=True,
    )


def report(
    daemon_runs: list[DaemonRun], reference_results: list[WrkResult], latency_run: DaemonRun
) -> int:
    """Print the medians and the checks; 1 if any run was invalid or too slow for HubSpot."""
    daemon_rps = statistics.median(r.wrk.rps for r in daemon_runs)
    daemon_aps = statistics.median(r.accepted_per_s for r in daemon_runs)
    reference_rps = statistics.median(r.rps for r in reference_results)
    reference_aps = statistics.median(assignments_per_s(r) for r in reference_results)
    problems = [
        problem
        for run, (daemon, reference) in enumerate(
            zip(daemon_runs, reference_results, strict=True), 1
        )
        for problem in problems_of(f"run {run}", daemon, reference)
    ]
    problems += problems_of("latency run", latency_run, None)
    print(
        f"hubspot: wrk -t{THREADS} -c{CONNECTIONS} -d{DURATION_S}s, v3-signed HubSpot batches "
        f"({EVENTS_PER_REQUEST} contact.propertyChange x {len(SEGMENTS)} segments = "
        f"{ASSIGNMENTS_PER_REQUEST} assignments per request, unique eventIds), SQLite journal "
        f"synchronous=FULL; median of {RUNS} runs"
    )
    print(f"  daemon                   {daemon_rps:7.0f} req/s   {daemon_aps:8.0f} assignments/s")
    print(
        f"  signature + parse only   {reference_rps:7.0f} req/s   {reference_aps:8.0f} "
        "assignments/s   (reference, same run: the HubSpot adapter's authenticate and parse, "
        "then 200)"
    )
    print(f"  ratio                    {daemon_rps / reference_rps:.3f}")
    p99_ms = statistics.median(r.wrk.p99_ms for r in daemon_runs)
    worst_p99_ms = max(r.wrk.p99_ms for r in daemon_runs)
    worst_ms = max(r.wrk.max_ms for r in daemon_runs)
    print(
        f"  daemon latency, full     p99 {p99_ms:.0f} ms (worst run {worst_p99_ms:.0f} ms, slowest "
        f"answer {worst_ms:.0f} ms) at {CONNECTIONS} in flight: " + _against_limit(worst_ms)
    )
    latency = latency_run.wrk
    print(
        f"  daemon latency, HubSpot  p50 {latency.p50_ms:.0f} ms, p99 {latency.p99_ms:.0f} ms "
        f"(slowest {latency.max_ms:.0f} ms) at {HUBSPOT_CONNECTIONS} in flight, "
        f"{latency.rps:.0f} req/s = {latency_run.accepted_per_s:.0f} assignments/s: "
        + _against_limit(latency.max_ms)
    )
    within = max(worst_ms, latency.max_ms) < HUBSPOT_ANSWER_LIMIT_S * 1000
    print(
        "  journal check            "
        + ("every accepted assignment journaled" if not problems else "FAILED")
    )
    for problem in problems:
        print(f"    INVALID: {problem}")
    return 1 if problems or not within else 0


def _against_limit(slowest_ms: float) -> str:
    limit_ms = HUBSPOT_ANSWER_LIMIT_S * 1000
    if slowest_ms >= limit_ms:
        return f"BEYOND HubSpot's {HUBSPOT_ANSWER_LIMIT_S:.0f} s (HubSpot would retry these)"
    share = slowest_ms / limit_ms
    return (
        f"every answer within HubSpot's {HUBSPOT_ANSWER_LIMIT_S:.0f} s (at most {share:.0%} of it)"
    )


# ---- the reference server ------------------------------------------------------------------------


def _serve_reference(public_url: str) -> None:
    import os

    from aiohttp import web

    from bench._daemon import serve_webhooks
    from listeners.base import InboundRequest
    from listeners.hubspot import HubSpotAdapter, HubSpotSource

    adapter = HubSpotAdapter(
        HubSpotSource.model_validate(
            {
                "client_secret": os.environ[SECRET_ENV],
                "public_url": public_url,
                "segments_property": SEGMENTS_PROPERTY,
            }
        )
    )
    answer = orjson.dumps({"accepted": ASSIGNMENTS_PER_REQUEST, "duplicates": 0, "stale": 0})

    async def handle(request: web.Request) -> web.Response:
        inbound = InboundRequest(
            method=request.method,
            path_qs=request.path_qs,
            query_string=request.query_string,
            headers=request.headers,
            body=await request.read(),
            peer=request.remote,
            received_at=time.time(),
        )
        # A refused request raises, aiohttp answers 500, and wrk's non-2xx count voids the run.
        adapter.authenticate(inbound)
        parsed = adapter.parse(inbound)
        # A batch parsed into fewer assignments than sent would flatter the reference.
        if sum(len(event.change.segment_ids) for event in parsed.events) != (
            ASSIGNMENTS_PER_REQUEST
        ):
            return web.Response(status=500, text="not 300 assignments")
        return web.Response(body=answer, status=200, content_type="application/json")

    serve_webhooks(handle)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "reference":
        _serve_reference(sys.argv[2])
    else:
        raise SystemExit(main())
