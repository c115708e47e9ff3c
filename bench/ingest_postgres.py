"""Ingest on PostgreSQL vs SQLite: one daemon's accepted webhooks/s on each journal, same run.

The same `segmapd run` daemon as `bench.ingest` (a `[sources.crm]` standard source, CXone = an
emulator process with CXone's default limits, `server.high_water` far above the run) takes the
same load from `wrk` (same settings, same Lua script, request pools signed the same way) twice
per round: once with `store.url = "sqlite://..."` (`synchronous = "FULL"`) and once with
`store.url = "postgresql://..."` on a private PostgreSQL server this benchmark starts (fsync on,
`synchronous_commit` left at its default), never a machine's own server. The two alternate
within the run (SQLite first in odd rounds, PostgreSQL first in even ones) so that neither
always gets the warmer machine; figures are medians over the rounds.

Every daemon run gets a fresh journal (a new SQLite file, a new PostgreSQL database) and a
request pool of its own: webhook ids and contacts used by no other run, so that no request is a
cheap redelivery. A run is valid only if wrk saw no non-2xx answer and no socket error, did not
go through its whole pool, the daemon exited cleanly after draining, and the journal then holds
every accepted delivery and the 3 assignments of each one.

For PostgreSQL the run also shows where the time goes: transactions and WAL fsyncs the server
counted per accepted webhook (group commit shares one fsync between many webhooks), and the
CPU the daemon and the server's processes used during the load, as a share of one core.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench._daemon import (
    daemon_config,
    daemon_process,
    new_secret,
    pid_of,
    start_emulator,
    wait_ready,
    workdir,
)
from bench._wrk import WrkResult
from bench.ingest import (
    CONNECTIONS,
    DURATION_S,
    LUA,
    POOL,
    RUNS,
    SEGMENTS_PER_EVENT,
    THREADS,
    Journal,
    contact_of,
    read_journal,
    run_wrk,
    write_pool,
)
from tests.support.postgres import PostgresMissing, PostgresServer, server_bindir

SQLITE = "SQLite"
POSTGRES = "PostgreSQL"
BACKENDS = (SQLITE, POSTGRES)
# Far above what a 5 s run journals: admission control must never answer 503 here.
HIGH_WATER = 50_000_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class ServerLoad:
    """What the PostgreSQL server counted and spent while one daemon run was loaded."""

    transactions: int  # committed transactions in the run's database (reads included)
    wal_syncs: int  # WAL fsyncs of the whole cluster
    server_cpu_s: float  # CPU of every server process during wrk


@dataclass
class Measured:
    """One daemon run on one backend: wrk's view, the journal's, and where the time went."""

    backend: str
    result: WrkResult
    journal: Journal
    drain_s: float
    daemon_cpu_s: float
    server: ServerLoad | None = None

    @property
    def accepted_per_s(self) -> float:
        """Webhooks answered 2xx per second of load."""
        return self.result.ok / self.result.duration_s


# ---- CPU accounting -----------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far; 0 once it has gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # The command name is in parentheses and may contain spaces: split after the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _children(parent: int) -> list[int]:
    """The pids whose parent is `parent` (the server's backends and helpers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == parent:
            found.append(int(entry.name))
    return found


def server_cpu_s(server: PostgresServer) -> dict[int, float]:
    """CPU seconds so far of the postmaster and each of its children, by pid."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    return {pid: _cpu_s(pid) for pid in [postmaster, *_children(postmaster)]}


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two samples; a process started in between counts from zero."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


# ---- the PostgreSQL side ------------------------------------------------------------------------


async def _query(server: PostgresServer, url: str, sql: str, *arguments: Any) -> list[Any]:
    connection = await asyncpg.connect(url, password=server.password)
    try:
        return list(await connection.fetch(sql, *arguments))
    finally:
        await connection.close()


def server_counters(server: PostgresServer, database: str) -> tuple[int, int]:
    """(committed transactions in `database`, WAL fsyncs of the cluster) as counted so far."""

    async def read() -> tuple[int, int]:
        connection = await asyncpg.connect(server.url("postgres"), password=server.password)
        try:
            # Statistics are cached per transaction: drop the cache so that each read is fresh.
            await connection.execute("SELECT pg_stat_clear_snapshot()")
            transactions = await connection.fetchval(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", database
            )
            syncs = await connection.fetchval("SELECT wal_sync FROM pg_stat_wal")
        finally:
            await connection.close()
        return int(transactions or 0), int(syncs or 0)

    return asyncio.run(read())


def server_settings(server: PostgresServer) -> str:
    """The durability settings the server actually runs with, as `name=value` text."""
    rows = asyncio.run(
        _query(
            server,
            server.url("postgres"),
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('fsync', 'synchronous_commit', 'wal_sync_method', 'server_version') ORDER BY name",
        )
    )
    return ", ".join(f"{name}={setting}" for name, setting in rows)


def read_postgres_journal(server: PostgresServer, url: str) -> Journal:
    """What the run's database held after the daemon drained (the tables of daemon.store)."""

    async def read() -> tuple[list[Any], list[Any]]:
        connection = await asyncpg.connect(url, password=server.password)
        try:
            ids = await connection.fetch("SELECT delivery_id FROM deliveries")
            per_contact = await connection.fetch(
                "SELECT contact_id, count(*) FROM assignments GROUP BY contact_id"
            )
        finally:
            await connection.close()
        return list(ids), list(per_contact)

    id_rows, count_rows = asyncio.run(read())
    ids = [str(row[0]) for row in id_rows]
    counts = {str(row[0]): int(row[1]) for row in count_rows}
    # The same rule as bench.ingest.read_journal: each delivery's contact has all its segments.
    incomplete = sum(
        1
        for delivery_id in ids
        if counts.get(contact_of(int(delivery_id.removeprefix("bench-"))), 0) != SEGMENTS_PER_EVENT
    )
    return Journal(len(ids), sum(counts.values()), incomplete)


# ---- one daemon run -----------------------------------------------------------------------------


def daemon_run(
    store: dict[str, Any],
    emulator_url: str,
    secret: str,
    directory: Path,
    script: Path,
    prefix: Path,
    during_load: Callable[[], dict[int, float]] | None = None,
) -> tuple[WrkResult, float, float, dict[int, float], dict[int, float]]:
    """Start a daemon with `store`, load it with wrk, drain it.

    Returns wrk's result, the drain time, the daemon's CPU seconds during wrk, and what
    `during_load` returned right before and right after wrk (empty without one).
    """
    config = directory / "segmapd.toml"
    config.touch(mode=0o600)  # it may hold the database password
    config.write_text(
        daemon_config(
            emulator_url,
            {
                "server": {"high_water": HIGH_WATER, "drain_budget_s": 3.0},
                "store": store,
                "sources.crm": {"kind": "standard", "secret": secret, "tolerance_s": 3600},
            },
        )
    )
    daemon = daemon_process(config)
    url = daemon.start()
    try:
        wait_ready(url)
        pid = pid_of(daemon)
        sample_before = during_load() if during_load is not None else {}
        cpu_before = _cpu_s(pid)
        result = run_wrk(url, script, prefix)
        cpu_after = _cpu_s(pid)
        sample_after = during_load() if during_load is not None else {}
    finally:
        stopped = time.monotonic()
        status = daemon.stop(timeout_s=60)
        drain_s = time.monotonic() - stopped
    if status != 0:
        raise RuntimeError(f"the daemon exited with {status} after the load")
    return result, drain_s, cpu_after - cpu_before, sample_before, sample_after


def sqlite_run(
    emulator_url: str, secret: str, directory: Path, script: Path, prefix: Path
) -> Measured:
    """One daemon run on a fresh SQLite journal (synchronous = FULL)."""
    journal = directory / "journal.db"
    store = {"url": f"sqlite://{journal}", "synchronous": "FULL"}
    result, drain_s, cpu_s, _, _ = daemon_run(
        store, emulator_url, secret, directory, script, prefix
    )
    return Measured(SQLITE, result, read_journal(journal), drain_s, cpu_s)


def postgres_run(
    server: PostgresServer,
    emulator_url: str,
    secret: str,
    directory: Path,
    script: Path,
    prefix: Path,
) -> Measured:
    """One daemon run on a fresh database of the private server."""
    url = asyncio.run(server.create_database())
    database = url.rsplit("/", 1)[1]
    store = {"url": url, "password": server.password}
    counters_before = server_counters(server, database)
    result, drain_s, cpu_s, cpu_before, cpu_after = daemon_run(
        store, emulator_url, secret, directory, script, prefix, lambda: server_cpu_s(server)
    )
    # Counted from before the daemon started to after its drain: its backends have exited by
    # then and so flushed their statistics (live ones flush at most once a second). The
    # migration's few transactions are included; against thousands of webhooks they do not show.
    time.sleep(0.5)
    counters_after = server_counters(server, database)
    load = ServerLoad(
        transactions=counters_after[0] - counters_before[0],
        wal_syncs=counters_after[1] - counters_before[1],
        server_cpu_s=cpu_spent(cpu_before, cpu_after),
    )
    return Measured(
        POSTGRES, result, read_postgres_journal(server, url), drain_s, cpu_s, server=load
    )


# ---- the benchmark ------------------------------------------------------------------------------


def problems_of(run: int, measured: Measured) -> list[str]:
    """Why a run is invalid (nothing if it is valid)."""
    result, journal, name = measured.result, measured.journal, measured.backend
    found = []
    if result.non2xx or result.socket_errors:
        found.append(
            f"run {run} {name}: {result.non2xx} non-2xx, {result.socket_errors} socket errors"
        )
    if result.wraps:
        found.append(f"run {run} {name}: wrk went through all {POOL} signed requests (raise POOL)")
    if journal.deliveries < result.ok:
        found.append(
            f"run {run} {name}: {result.ok} webhooks answered 2xx, only "
            f"{journal.deliveries} deliveries journaled"
        )
    if journal.incomplete:
        found.append(f"run {run} {name}: {journal.incomplete} deliveries lack assignments")
    return found


def describe(run: int, measured: Measured) -> str:
    """One line for one daemon run."""
    result, journal = measured.result, measured.journal
    line = (
        f"  run {run} {measured.backend:<10} {measured.accepted_per_s:8.0f} webhooks/s "
        f"(p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms), daemon CPU "
        f"{measured.daemon_cpu_s / result.duration_s:.0%}; journal: {journal.deliveries} "
        f"deliveries, {journal.assignments} assignments, drained in {measured.drain_s:.1f} s"
    )
    if measured.server is not None:
        accepted = max(result.ok, 1)
        line += (
            f"; server: {measured.server.transactions / accepted:.2f} transactions and "
            f"{measured.server.wal_syncs / accepted:.3f} WAL fsyncs per webhook, CPU "
            f"{measured.server.server_cpu_s / result.duration_s:.0%}"
        )
    return line


def report(results: list[Measured], settings: str) -> int:
    """Print the medians and the checks; 1 if any run was invalid."""
    problems = []
    for index, measured in enumerate(results):
        problems += problems_of(index // len(BACKENDS) + 1, measured)
    by_backend = {name: [m for m in results if m.backend == name] for name in BACKENDS}
    rate = {
        name: statistics.median(m.accepted_per_s for m in runs) for name, runs in by_backend.items()
    }
    print(
        f"ingest_postgres: wrk -t{THREADS} -c{CONNECTIONS} -d{DURATION_S}s, signed webhooks "
        f"(1 event x {SEGMENTS_PER_EVENT} segments, unique webhook-id), one daemon, "
        f"SQLite and PostgreSQL alternated; median of {RUNS} runs each"
    )
    print(f"  PostgreSQL server: {settings}")
    labels = {SQLITE: "SQLite (synchronous=FULL)", POSTGRES: "PostgreSQL (private server)"}
    for name, runs in by_backend.items():
        p50 = statistics.median(m.result.p50_ms for m in runs)
        p99 = statistics.median(m.result.p99_ms for m in runs)
        print(
            f"  {labels[name]:<28} {rate[name]:8.0f} webhooks/s   "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )
    print(f"  ratio PostgreSQL / SQLite    {rate[POSTGRES] / rate[SQLITE]:.3f}")
    postgres_runs = by_backend[POSTGRES]
    per_webhook = [
        (m.server.transactions / max(m.result.ok, 1), m.server.wal_syncs / max(m.result.ok, 1))
        for m in postgres_runs
        if m.server is not None
    ]
    if per_webhook:
        print(
            "  PostgreSQL per webhook       "
            f"{statistics.median(t for t, _ in per_webhook):.2f} transactions, "
            f"{statistics.median(s for _, s in per_webhook):.3f} WAL fsyncs   (median)"
        )
    print(
        "  journal check                "
        + ("every accepted delivery and its assignments journaled" if not problems else "FAILED")
    )
    for problem in problems:
        print(f"    INVALID: {problem}")
    return 1 if problems else 0


def main() -> int:
    """Run the PostgreSQL-vs-SQLite ingest benchmark and print its figures."""
    if shutil.which("wrk") is None:
        print(
            "ingest_postgres: skipped: the native load generator `wrk` is not installed "
            "(Debian/Ubuntu: apt-get install -y wrk)"
        )
        return 0
    try:
        bindir = server_bindir()
    except PostgresMissing as exc:
        print(f"ingest_postgres: skipped: {exc} (Debian/Ubuntu: apt-get install -y postgresql)")
        return 0
    secret = new_secret()
    results: list[Measured] = []
    settings = ""
    with workdir("ingest-postgres") as tmp:
        root = Path(tmp)
        script = root / "webhooks.lua"
        script.write_text(LUA)
        server = PostgresServer(bindir)
        emulator = None
        try:
            server.create()
            settings = server_settings(server)
            emulator = start_emulator(root, {})  # CXone's default limits
            for run in range(RUNS):
                # Alternate which backend goes first, so that neither always has the warmer box.
                order = BACKENDS if run % 2 == 0 else BACKENDS[::-1]
                prefixes = {}
                for name in order:
                    # A pool per daemon run: ids and contacts no other run has used.
                    number = run * len(BACKENDS) + BACKENDS.index(name)
                    prefixes[name] = root / f"requests-{number}"
                    write_pool(secret, prefixes[name], number)
                for name in order:
                    directory = root / f"run-{run}-{name.lower()}"
                    directory.mkdir()
                    if name == SQLITE:
                        measured = sqlite_run(
                            emulator.url, secret, directory, script, prefixes[name]
                        )
                    else:
                        measured = postgres_run(
                            server, emulator.url, secret, directory, script, prefixes[name]
                        )
                    results.append(measured)
                    print(describe(run + 1, measured), flush=True)
        finally:
            if emulator is not None:
                emulator.stop()
            server.destroy()
    return report(results, settings)


if __name__ == "__main__":
    raise SystemExit(main())
