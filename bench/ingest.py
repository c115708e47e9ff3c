"""Ingest benchmark: signed webhooks accepted per second by the real daemon, journal on.

The daemon (`segmapd run`, SQLite journal with `synchronous = FULL`, a `[sources.crm]` standard
source, CXone = an emulator process with CXone's default limits, `server.high_water` far above
the run) and the reference, a bare aiohttp handler on uvloop answering 202 with a tiny JSON (also a
subprocess), take the same requests from the same native load generator, `wrk`, with the same
settings, in the same run. Each request is one event with 3 segments, carries a valid Standard
Webhooks signature and a webhook-id used nowhere else (a repeated id would be a cheap
redelivery): the requests are signed here beforehand and a Lua script makes wrk cycle through
them, each wrk thread through its own share.

A third server, measured the same way, shows how much of the gap no journal design can close:
the bare handler plus the Standard Webhooks signature check and the body parsing (segmapd's own
code for both), which any receiver must do before it answers, and nothing else. A fourth, the
journaled floor, adds to it only each delivery's rows (its answer and its 3 assignments, in
segmapd's schema, by segmapd's statements) committed at `synchronous = FULL` by a writer
thread, many deliveries a transaction, before the answer: what the durable journal alone costs
a receiver built this way. It is printed beside the daemon's figure, as information.

A run is valid only if wrk saw no non-2xx answer and no socket error, no request was sent twice,
and after the daemon drained, the journal holds every accepted delivery and the 3 assignments of
each one. Target (docs/architecture.md, "Performance targets"): daemon req/s >= 0.6 x the
signature + parse server's req/s, measured in the same run (signature and parse alone are about
0.75 of bare, so a ratio to bare above that is out of reach for any receiver that checks what it
takes; the ratio to bare is printed as information).

CXone's limits (10 bulk writes/s, 50 reads/s) bound what the daemon sends upstream, as they do
in production: a burst of webhooks is journaled and queued, and written at the tenant's pace.
With every limit lifted instead, the daemon would also write and poll tens of thousands of
assignments per second against an emulator sharing this machine's cores, a load no CXone tenant
accepts, and the figure would measure that rather than the intake.
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench import _wrk
from bench._daemon import (
    bare_process,
    checked_process,
    daemon_config,
    daemon_process,
    journaled_process,
    new_secret,
    start_emulator,
    wait_ready,
    workdir,
)
from bench._wrk import WrkResult, lua_script
from listeners import sign

RUNS = 3
THREADS = 2
CONNECTIONS = 64
DURATION_S = 5
# Requests signed per run; wrk must not get through them all against the daemon (the bare server
# may: it does not care about ids). The run reports a wrap-around, which makes it invalid.
POOL = 150_000
SEGMENTS_PER_EVENT = 3
SEGMENT_POOL = 30
TARGET = 0.6  # of the signature + parse server

LUA = lua_script("/v1/webhooks/crm", ("webhook-id", "webhook-timestamp", "webhook-signature"))


def contact_of(index: int) -> str:
    return str(100_000_000_000 + index)


def write_pool(secret: str, prefix: Path, run: int) -> None:
    """Sign POOL requests, split over one file per wrk thread (`prefix.0`, `prefix.1`, ...)."""
    stamp = int(time.time())
    files = [open(f"{prefix}.{t}", "w") for t in range(THREADS)]  # noqa: SIM115
    try:
        for i in range(POOL):
            index = run * POOL + i
            segments = [f"seg-{(index + 7 * k) % SEGMENT_POOL}" for k in range(SEGMENTS_PER_EVENT)]
            body = orjson.dumps({"contactId": contact_of(index), "segmentIds": segments})
            headers = sign(secret, f"bench-{index}", stamp, body)
            files[i % THREADS].write(
                f"{headers['webhook-id']}\t{headers['webhook-timestamp']}\t"
                f"{headers['webhook-signature']}\t{body.decode()}\n"
            )
    finally:
        for handle in files:
            handle.close()


def run_wrk(url: str, script: Path, prefix: Path) -> WrkResult:
    """One wrk run with this benchmark's settings."""
    return _wrk.run_wrk(
        url, script, prefix, threads=THREADS, connections=CONNECTIONS, duration_s=DURATION_S
    )


@dataclass
class Journal:
    """What the journal file held after the daemon drained."""

    deliveries: int
    assignments: int
    incomplete: int  # deliveries whose contact has not all of its assignments journaled


def read_journal(path: Path) -> Journal:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        ids = [row[0] for row in connection.execute("SELECT delivery_id FROM deliveries")]
        per_contact = dict(
            connection.execute("SELECT contact_id, count(*) FROM assignments GROUP BY contact_id")
        )
        assignments = sum(per_contact.values())
    finally:
        connection.close()
    incomplete = sum(
        1
        for delivery_id in ids
        if per_contact.get(contact_of(int(delivery_id.removeprefix("bench-"))), 0)
        != SEGMENTS_PER_EVENT
    )
    return Journal(len(ids), assignments, incomplete)


def daemon_run(
    emulator_url: str, secret: str, root: Path, script: Path, prefix: Path, run: int
) -> tuple[WrkResult, Journal, float]:
    """Start a daemon on a fresh journal, load it, drain it; wrk's and the journal's view."""
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
                "sources.crm": {"kind": "standard", "secret": secret, "tolerance_s": 3600},
            },
        )
    )
    daemon = daemon_process(config)
    url = daemon.start()
    try:
        wait_ready(url)
        result = run_wrk(url, script, prefix)
    finally:
        stopped = time.monotonic()
        status = daemon.stop(timeout_s=60)
        drain_s = time.monotonic() - stopped
    if status != 0:
        raise RuntimeError(f"the daemon exited with {status} after the load")
    return result, read_journal(journal), drain_s


def floor_run(
    secret: str, root: Path, script: Path, prefix: Path, run: int
) -> tuple[WrkResult, Journal]:
    """The journaled reference server on a fresh journal, loaded like the daemon."""
    journal = root / f"floor-{run}.db"
    floor = journaled_process(secret, journal)
    url = floor.start()
    try:
        result = run_wrk(url, script, prefix)
    finally:
        floor.stop()
    return result, read_journal(journal)


def main() -> int:
    """Run the ingest benchmark and print its figures."""
    if shutil.which("wrk") is None:
        print(
            "ingest: skipped: the native load generator `wrk` is not installed "
            "(Debian/Ubuntu: apt-get install -y wrk)"
        )
        return 0
    secret = new_secret()
    with workdir("ingest") as tmp:
        root = Path(tmp)
        script = root / "webhooks.lua"
        script.write_text(LUA)
        emulator = start_emulator(root, {})  # CXone's default limits
        bare = bare_process()
        checked = checked_process(secret)
        try:
            bare_url = bare.start()
            checked_url = checked.start()
            daemon_results: list[WrkResult] = []
            bare_results: list[WrkResult] = []
            checked_results: list[WrkResult] = []
            floor_results: list[WrkResult] = []
            floor_journals: list[Journal] = []
            journals: list[Journal] = []
            for run in range(RUNS):
                prefix = root / f"requests-{run}"
                write_pool(secret, prefix, run)
                bare_results.append(run_wrk(bare_url, script, prefix))
                checked_results.append(run_wrk(checked_url, script, prefix))
                floor, floor_journal = floor_run(secret, root, script, prefix, run)
                floor_results.append(floor)
                floor_journals.append(floor_journal)
                result, journal, drain_s = daemon_run(
                    emulator.url, secret, root, script, prefix, run
                )
                daemon_results.append(result)
                journals.append(journal)
                print(
                    f"  run {run + 1}: daemon {result.rps:8.0f} req/s "
                    f"(p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms), "
                    f"bare {bare_results[-1].rps:8.0f} req/s, "
                    f"checked {checked_results[-1].rps:8.0f} req/s, "
                    f"journaled {floor_results[-1].rps:8.0f} req/s; journal: "
                    f"{journal.deliveries} deliveries, {journal.assignments} assignments, "
                    f"drained in {drain_s:.1f} s",
                    flush=True,
                )
        finally:
            bare.stop()
            checked.stop()
            emulator.stop()

    daemon_rps = statistics.median(r.rps for r in daemon_results)
    bare_rps = statistics.median(r.rps for r in bare_results)
    checked_rps = statistics.median(r.rps for r in checked_results)
    floor_rps = statistics.median(r.rps for r in floor_results)
    ratio = daemon_rps / checked_rps
    total = sum(r.requests for r in daemon_results)
    non2xx = sum(r.non2xx for r in daemon_results)
    problems = []
    for run, (result, journal) in enumerate(zip(daemon_results, journals, strict=True), 1):
        if result.non2xx or result.socket_errors:
            problems.append(f"run {run}: {result.non2xx} non-2xx, {result.socket_errors} errors")
        if checked_results[run - 1].non2xx or checked_results[run - 1].socket_errors:
            problems.append(f"run {run}: the signature + parse server refused requests")
        if result.wraps:
            problems.append(f"run {run}: wrk went through all {POOL} signed requests (raise POOL)")
        if journal.deliveries < result.ok:
            problems.append(
                f"run {run}: {result.ok} webhooks answered 2xx, only "
                f"{journal.deliveries} deliveries journaled"
            )
        if journal.incomplete:
            problems.append(f"run {run}: {journal.incomplete} deliveries lack assignments")
        floor, floor_journal = floor_results[run - 1], floor_journals[run - 1]
        if floor.non2xx or floor.socket_errors or floor.wraps:
            problems.append(
                f"run {run}: the journaled floor: {floor.non2xx} non-2xx, "
                f"{floor.socket_errors} errors, {'wrapped' if floor.wraps else 'no wrap'}"
            )
        if floor_journal.deliveries < floor.ok or floor_journal.incomplete:
            problems.append(
                f"run {run}: the journaled floor answered {floor.ok}, journaled "
                f"{floor_journal.deliveries} deliveries ({floor_journal.incomplete} incomplete)"
            )
    print(
        f"ingest: wrk -t{THREADS} -c{CONNECTIONS} -d{DURATION_S}s, signed webhooks "
        f"(1 event x {SEGMENTS_PER_EVENT} segments, unique webhook-id), SQLite journal "
        f"synchronous=FULL; median of {RUNS} runs"
    )
    print(f"  daemon                   {daemon_rps:.0f} req/s")
    print(
        f"  signature + parse only   {checked_rps:.0f} req/s   (reference, same run: the same "
        "handler checking the signature and parsing the body, no journal)"
    )
    print(f"  ratio                    {ratio:.3f}   (target >= {TARGET})")
    print(
        f"  journaled floor          {floor_rps:.0f} req/s   (reference, same run: signature, "
        f"parse and each delivery's rows committed before the answer, nothing else; "
        f"{floor_rps / checked_rps:.3f} of signature + parse; daemon {daemon_rps / floor_rps:.3f} "
        "of it)"
    )
    print(
        f"  bare aiohttp + uvloop    {bare_rps:.0f} req/s   (information: daemon "
        f"{daemon_rps / bare_rps:.3f} of bare, signature + parse {checked_rps / bare_rps:.3f})"
    )
    print(f"  non-2xx answers          {non2xx / max(total, 1):.2%} of {total}   (must be 0)")
    print(
        "  journal check            "
        + ("every accepted delivery and its assignments journaled" if not problems else "FAILED")
    )
    for problem in problems:
        print(f"    INVALID: {problem}")
    if ratio < TARGET:
        print(f"  MISSED the target: {ratio:.3f} < {TARGET}")
    return 1 if problems or ratio < TARGET else 0


if __name__ == "__main__":
    raise SystemExit(main())
