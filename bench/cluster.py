"""Cluster benchmark: three segmapd instances on one PostgreSQL journal and one CXone write limit.

Each run starts afresh: a new database on a private PostgreSQL server this benchmark starts (as
`bench.ingest_postgres` does; never a machine's own server), the emulator's state reset (its
bulk limit R writes/s with a burst of R, as `bench.upstream` configures it for its reference),
and three `segmapd run` daemons on that database, each with `limits.write_rps = R` and a short
`[cluster] lease_s` (5 s), waited for until they lease the 64 shards between them, none more
than its fair share.

The backlog: S segments x N contacts (each contact in one segment, as in `bench.upstream`),
in signed Standard Webhooks deliveries of 1,000 events sent round-robin to the three instances'
webhook endpoints, so that two thirds of each segment's work reaches its owner through the
inbox. Once every delivery is acknowledged (the backlog exists), two figures:

1. **One shared write limit.** Over a steady window of W seconds the emulator counts the bulk
   writes of all instances together: accepted bulk requests/s / R (target >= 0.97), mean ids
   per request (>= 195), 429s (0). The window is valid only if backlog is left at its end.
2. **Failover.** Right after the window, the instance owning most of the unfinished segments
   (from `segmapd_shards` and `shard_of`) is SIGKILLed. Every 100 ms the emulator's written
   members of each of those segments are counted: the figure is the time from the kill until
   every one of them has grown again, i.e. all of the dead instance's work is moving (target
   <= lease_s + 2 s); the first of them is shown too. Beside it: when the victim's lease ran
   out (lease_s minus the age of its last heartbeat, read from the database just before the
   kill), when a survivor's /metrics counted one instance less, when the survivors held all
   64 shards, and what each survivor's log says it took, when, and how long loading took.

Check: when the backlog is written, every contact acknowledged (202) is a member of its segment
on the emulator's write side, and the emulator saw no reused idempotency key and nothing
applied twice. Figures are medians of `--runs` runs (default 3, about 45 s each). The daemons
log to files of the run (read back for the takeovers and for an instance that exits uncleanly),
not to the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import signal
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import asyncpg
import orjson

from bench._common import control
from bench._daemon import daemon_config, daemon_process, new_secret, start_emulator, workdir
from bench.ingest_postgres import server_settings
from daemon.store.shards import SHARDS, shard_of
from listeners import sign
from tests.support.postgres import PostgresMissing, PostgresServer, server_bindir
from tests.support.processes import ManagedProcess

RATE = 10.0
SEGMENTS = 12
CONTACTS = 6_000  # per segment: 72,000 assignments, 360 full requests, 36 s at 10/s
INSTANCES = 3
LEASE_S = 5.0
WINDOW_S = 20.0
RUNS = 3
EVENTS_PER_DELIVERY = 1_000
POLL_S = 0.1
# A request the victim had in flight when it was killed may still land: the written counts
# are taken as the baseline this long after the kill, far below any takeover.
BASELINE_AFTER_S = 0.3
FAILOVER_TIMEOUT_S = 60.0
RATIO_TARGET = 0.97
IDS_TARGET = 195.0
FAILOVER_MARGIN_S = 2.0
# daemon/cluster.py's log line for a takeover: shards taken, and the time loading their work.
TOOK = re.compile(r"cluster: took (?P<shards>\d+ shards) \(\d+ now\) in (?P<load>[\d.]+) s")


class Interrupted(Exception):
    """SIGTERM: unwind through every `finally`, so that no process this benchmark started stays."""


# ---- the processes ------------------------------------------------------------------------------


@dataclass
class Instance:
    """One `segmapd run` of the cluster, by its `[cluster] name`, logging to `log`."""

    name: str
    process: ManagedProcess
    log: Path
    url: str = ""
    killed: bool = False

    def records(self, *levels: str) -> list[dict[str, Any]]:
        """The JSON log records of the given levels (all of them without any)."""
        found: list[dict[str, Any]] = []
        if not self.log.exists():
            return found
        for line in self.log.read_bytes().splitlines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = {"level": "error", "msg": line.decode(errors="replace")}
            if isinstance(record, dict) and (not levels or record.get("level") in levels):
                found.append(record)
        return found


def logged(process: ManagedProcess, log: Path) -> ManagedProcess:
    """The same command with its stderr (the daemon's log) appended to `log`.

    Three daemons logging to the benchmark's terminal would bury its figures; the log is read
    back for what the survivors did on a takeover and shown when an instance exits uncleanly.
    `exec` keeps the pid the daemon's own, so a SIGKILL reaches the daemon itself.
    """
    script = 'exec "$0" "$@" 2>>"$BENCH_CLUSTER_LOG"'
    return ManagedProcess(["sh", "-c", script, *process.argv], env={"BENCH_CLUSTER_LOG": str(log)})


def write_config(
    directory: Path, name: str, emulator_url: str, store: dict[str, Any], args: argparse.Namespace
) -> Path:
    """The TOML of one instance (mode 0600 before anything is written: it holds the password)."""
    path = directory / f"{name}.toml"
    path.touch(mode=0o600)
    path.write_text(
        daemon_config(
            emulator_url,
            {
                "server": {"high_water": 10 * args.segments * args.contacts, "drain_budget_s": 5.0},
                "store": store,
                "cluster": {"lease_s": args.lease, "name": name},
                "log": {"level": "info"},  # the takeovers' own account of their time
                "limits": {"write_rps": args.rate},
                "sources.crm": {"kind": "standard", "secret": args.secret, "tolerance_s": 3600},
            },
        )
    )
    return path


def new_instances(
    directory: Path, emulator_url: str, store: dict[str, Any], args: argparse.Namespace
) -> list[Instance]:
    """The instances of one run, not started yet."""
    instances = []
    for name in (f"bench-{k}" for k in range(INSTANCES)):
        config = write_config(directory, name, emulator_url, store, args)
        log = directory / f"{name}.log"
        instances.append(Instance(name, logged(daemon_process(config), log), log))
    return instances


async def start_instances(instances: list[Instance]) -> None:
    """Start the instances at once (each start blocks on its `listening` line: in threads)."""
    results = await asyncio.gather(
        *(asyncio.to_thread(i.process.start, 60.0) for i in instances), return_exceptions=True
    )
    for instance, result in zip(instances, results, strict=True):
        if isinstance(result, BaseException):
            said = "; ".join(str(r.get("msg", r))[:300] for r in instance.records()[-5:])
            raise RuntimeError(f"{instance.name} did not start ({result}): {said}")
        instance.url = str(result)


def stop_instances(instances: list[Instance]) -> list[str]:
    """Stop every instance still running, all at once; the unclean exits, with their last words.

    Each gets one SIGTERM (a second would make it exit without draining) and 30 s to drain
    before a SIGKILL; in threads, so that three drains take the time of one.
    """
    stopping = time.time()
    with ThreadPoolExecutor(max_workers=max(1, len(instances))) as pool:
        statuses = list(pool.map(lambda i: i.process.stop(timeout_s=30.0), instances))
    problems = []
    for instance, status in zip(instances, statuses, strict=True):
        if not instance.killed and status not in (0, None):
            # When it said it (before or during the stop) tells a crash from a failed drain.
            said = "; ".join(
                f"{logged_at(r) - stopping:+.2f} s from the stop: {str(r.get('msg', r))[:300]}"
                for r in instance.records("error", "critical")[-5:]
            )
            problems.append(f"{instance.name} exited with {status}: {said or 'nothing logged'}")
    return problems


def logged_at(record: dict[str, Any]) -> float:
    """The wall-clock time of a daemon's JSON log record (0 if it has none)."""
    stamp = str(record.get("ts", ""))
    if not stamp:
        return 0.0
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# ---- reading the daemons, the emulator and the database ---------------------------------------


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Every sample of a daemon's /metrics, labelled samples summed under their metric name."""
    async with session.get(url + "/metrics") as response:
        response.raise_for_status()
        text = await response.text()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        found[name] = found.get(name, 0.0) + float(value)
    return found


async def ready(session: aiohttp.ClientSession, instances: list[Instance]) -> None:
    """Wait until every instance answers /readyz 200 and the 64 shards are fairly leased."""
    share = math.ceil(SHARDS / len(instances))
    deadline = time.monotonic() + 60.0
    owned: list[float] = []
    while time.monotonic() < deadline:
        try:
            statuses = []
            for instance in instances:
                async with session.get(instance.url + "/readyz") as response:
                    statuses.append(response.status)
            owned = [
                (await metrics(session, i.url))["segmapd_cluster_shards_owned"] for i in instances
            ]
        except aiohttp.ClientError:
            statuses = [0]
        if all(s == 200 for s in statuses) and sum(owned) == SHARDS and max(owned) <= share:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the instances never settled: shards owned {owned}")


async def written(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    """Members on the emulator's write side, per segment."""
    listing = await control(session, url, "GET", "/_emulator/segments")
    return {s["segmentId"]: int(s["members"]) for s in listing["segments"]}


async def heartbeat_age(server: PostgresServer, url: str, name: str) -> float:
    """Seconds since the instance's last heartbeat, on the database's clock."""
    connection = await asyncpg.connect(url, password=server.password)
    try:
        age = await connection.fetchval(
            "SELECT extract(epoch FROM now() - heartbeat_at) FROM segmapd_instances "
            "WHERE name = $1",
            name,
        )
    finally:
        await connection.close()
    return float(age)


async def owners(server: PostgresServer, url: str) -> dict[int, str]:
    """Each leased shard's owner, by instance name, as the journal's database has it."""
    connection = await asyncpg.connect(url, password=server.password)
    try:
        rows = await connection.fetch(
            "SELECT s.shard, i.name FROM segmapd_shards s JOIN segmapd_instances i "
            "ON i.id = s.owner"
        )
    finally:
        await connection.close()
    return {int(shard): str(name) for shard, name in rows}


# ---- the backlog --------------------------------------------------------------------------------


def segment_of(index: int, segments: int) -> str:
    return f"cl-{index % segments}"


def contact_of(run: int, index: int) -> str:
    # Contacts no other run used: the emulator is reset between runs, but a reused id would
    # hide a membership left over from an earlier run.
    return str(100_000_000_000 + run * 10_000_000 + index)


def deliveries(run: int, args: argparse.Namespace) -> Iterator[tuple[str, list[int]]]:
    """(webhook id, contact indexes) of each delivery of the backlog."""
    total = args.segments * args.contacts
    for number, start in enumerate(range(0, total, EVENTS_PER_DELIVERY)):
        yield (
            f"bench-cluster-{run}-{number}",
            list(range(start, min(total, start + EVENTS_PER_DELIVERY))),
        )


async def post(
    session: aiohttp.ClientSession, url: str, secret: str, msg_id: str, body: bytes
) -> int:
    """One signed delivery, resent under the same id while the instance answers 503."""
    for _ in range(30):
        headers = sign(secret, msg_id, int(time.time()), body)
        headers["Content-Type"] = "application/json"
        async with session.post(url + "/v1/webhooks/crm", data=body, headers=headers) as response:
            await response.read()
            if response.status != 503:
                return response.status
            retry_after = float(response.headers.get("Retry-After", "1"))
        await asyncio.sleep(retry_after)
    return 503


async def send_backlog(
    session: aiohttp.ClientSession, instances: list[Instance], run: int, args: argparse.Namespace
) -> tuple[set[int], list[str]]:
    """Send every delivery, round-robin; the contact indexes acknowledged, and what was refused."""
    queues: list[list[tuple[str, list[int]]]] = [[] for _ in instances]
    for number, delivery in enumerate(deliveries(run, args)):
        queues[number % len(instances)].append(delivery)
    acknowledged: set[int] = set()
    refused: list[str] = []

    async def sender(instance: Instance, queue: list[tuple[str, list[int]]]) -> None:
        for msg_id, indexes in queue:
            body = orjson.dumps(
                [
                    {
                        "contactId": contact_of(run, i),
                        "segmentIds": [segment_of(i, args.segments)],
                    }
                    for i in indexes
                ]
            )
            status = await post(session, instance.url, args.secret, msg_id, body)
            # 200 is a redelivery of one accepted before (a 503 answered after committing).
            if status in (200, 202):
                acknowledged.update(indexes)
            else:
                refused.append(f"{msg_id} to {instance.name}: {status}")

    await asyncio.gather(*(sender(i, q) for i, q in zip(instances, queues, strict=True)))
    return acknowledged, refused


# ---- one run ------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one run measured."""

    number: int
    ingest_s: float = 0.0
    window_s: float = 0.0
    requests: int = 0
    ids: int = 0
    rate_limited: int = 0
    per_instance: dict[str, float] = field(default_factory=dict)
    victim: str = ""
    victim_segments: int = 0
    victim_shards: int = 0
    heartbeat_age_s: float = 0.0
    takeovers: list[str] = field(default_factory=list)
    segment_times: dict[str, float | None] = field(default_factory=dict)
    seen_dead_s: float | None = None
    taken_s: float | None = None
    moving_s: float | None = None  # every unfinished segment of the victim written again
    first_s: float | None = None  # the first of them
    acknowledged: int = 0
    members: int = 0
    lost: int = 0
    forwarded: float = 0.0
    inbox_taken: float = 0.0
    problems: list[str] = field(default_factory=list)

    def ratio(self, rate: float) -> float:
        """Accepted bulk requests per second over the window, against the limit."""
        return self.requests / self.window_s / rate if self.window_s else 0.0

    def mean_ids(self) -> float:
        """Mean ids per accepted bulk request over the window."""
        return self.ids / self.requests if self.requests else 0.0


async def window(
    session: aiohttp.ClientSession,
    emulator_url: str,
    instances: list[Instance],
    measured: Run,
    args: argparse.Namespace,
) -> None:
    """Figure 1: the emulator's counters over a steady window of the backlog."""
    before = await control(session, emulator_url, "GET", "/_emulator/counters")
    sent_before = [await metrics(session, i.url) for i in instances]
    started = time.monotonic()
    await asyncio.sleep(args.window)
    after = await control(session, emulator_url, "GET", "/_emulator/counters")
    measured.window_s = time.monotonic() - started
    sent_after = [await metrics(session, i.url) for i in instances]
    measured.requests = after["bulk_ids"]["requests"] - before["bulk_ids"]["requests"]
    measured.ids = after["bulk_ids"]["ids"] - before["bulk_ids"]["ids"]
    measured.rate_limited = after["rate_limited"]["bulk"] - before["rate_limited"]["bulk"]
    # Before any kill, so that every instance's counts are there.
    measured.forwarded = sum(a["segmapd_cluster_forwarded_total"] for a in sent_after)
    measured.inbox_taken = sum(a["segmapd_cluster_inbox_taken_total"] for a in sent_after)
    measured.per_instance = {
        i.name: a["segmapd_bulk_requests_total"] - b["segmapd_bulk_requests_total"]
        for i, b, a in zip(instances, sent_before, sent_after, strict=True)
    }
    left = args.segments * args.contacts - sum((await written(session, emulator_url)).values())
    if left <= 0:
        measured.problems.append(
            f"run {measured.number}: the backlog was written before the window ended "
            "(raise --contacts or shorten --window)"
        )


async def failover(
    session: aiohttp.ClientSession,
    emulator_url: str,
    server: PostgresServer,
    database_url: str,
    instances: list[Instance],
    measured: Run,
    args: argparse.Namespace,
) -> None:
    """Figure 2: SIGKILL the owner of most unfinished segments; time until they are written."""
    counts = await written(session, emulator_url)
    unfinished = [
        segment
        for segment in (segment_of(k, args.segments) for k in range(args.segments))
        if counts.get(segment, 0) < args.contacts
    ]
    leased = await owners(server, database_url)
    by_owner = {
        i.name: [s for s in unfinished if leased.get(shard_of(s)) == i.name] for i in instances
    }
    victim = max(instances, key=lambda i: len(by_owner[i.name]))
    segments = by_owner[victim.name]
    measured.victim = victim.name
    measured.victim_segments = len(segments)
    measured.victim_shards = sum(1 for name in leased.values() if name == victim.name)
    if not segments:
        measured.problems.append(f"run {measured.number}: no instance owned unfinished segments")
        return
    survivors = [i for i in instances if i is not victim]

    measured.heartbeat_age_s = await heartbeat_age(server, database_url, victim.name)
    killed_at, killed_wall = time.monotonic(), time.time()
    victim.killed = True
    victim.process.kill()  # SIGKILL and reap: no drain, no leave, its leases just stop
    await asyncio.sleep(max(0.0, killed_at + BASELINE_AFTER_S - time.monotonic()))
    counts = await written(session, emulator_url)
    # A segment the victim finished before it died has nothing left to move.
    baseline = {s: counts.get(s, 0) for s in segments if counts.get(s, 0) < args.contacts}
    if not baseline:
        measured.problems.append(
            f"run {measured.number}: {victim.name} finished its segments before it died "
            "(raise --contacts or shorten --window)"
        )
        return

    marks: dict[str, float] = {}
    owned: dict[str, float] = {}

    def mark(what: str) -> None:
        marks.setdefault(what, time.monotonic() - killed_at)

    # Each watcher polls on its own, so that a survivor slow to answer /metrics while it adopts
    # shards delays no other observation; every time is taken when its answer came.
    async def watch_writes() -> None:
        while True:
            counts = await written(session, emulator_url)
            moved = [s for s, before in baseline.items() if counts.get(s, 0) > before]
            for segment in moved:
                mark(segment)
            if moved:
                mark("first")
            if len(moved) == len(baseline):
                mark("moving")
                return
            await asyncio.sleep(POLL_S)

    async def watch(instance: Instance) -> None:
        while "seen_dead" not in marks or "taken" not in marks:
            sample = await metrics(session, instance.url)
            if sample["segmapd_cluster_instances"] == len(survivors):
                mark("seen_dead")
            owned[instance.name] = sample["segmapd_cluster_shards_owned"]
            if sum(owned.values()) == SHARDS:
                mark("taken")
            await asyncio.sleep(POLL_S)

    try:
        await asyncio.wait_for(
            asyncio.gather(watch_writes(), *(watch(i) for i in survivors)), FAILOVER_TIMEOUT_S
        )
    except TimeoutError:
        measured.problems.append(
            f"run {measured.number}: {victim.name}'s segments not written again, or the "
            f"takeover not seen, within {FAILOVER_TIMEOUT_S:g} s of its kill"
        )
    measured.seen_dead_s = marks.get("seen_dead")
    measured.taken_s = marks.get("taken")
    measured.moving_s = marks.get("moving")
    measured.first_s = marks.get("first")
    measured.takeovers = takeovers(survivors, killed_wall)
    # Who took each of the victim's segments, and when it was written again.
    leased = await owners(server, database_url)
    measured.segment_times = {
        f"{s} ({leased.get(shard_of(s), '?')})": marks.get(s) for s in sorted(baseline)
    }


def takeovers(survivors: list[Instance], since: float) -> list[str]:
    """What each survivor's log says it took after `since` (wall clock), and when."""
    found = []
    for instance in survivors:
        for record in instance.records("info"):
            message = str(record.get("msg", ""))
            match = TOOK.match(message)
            if match is None:
                continue
            at = logged_at(record)
            if at >= since:
                found.append(
                    f"{instance.name} took {match['shards']} at {at - since:.1f} s "
                    f"(loaded in {match['load']} s)"
                )
    return found


async def check(
    session: aiohttp.ClientSession,
    emulator_url: str,
    run: int,
    acknowledged: set[int],
    measured: Run,
    args: argparse.Namespace,
) -> None:
    """Wait for the whole backlog to be written, then compare members with what was acknowledged."""
    total = args.segments * args.contacts
    # The limit bounds how fast the rest can go; allow twice that, plus a few lease times.
    deadline = time.monotonic() + 2 * total / 200 / args.rate + 6 * args.lease + 30
    while time.monotonic() < deadline:
        if sum((await written(session, emulator_url)).values()) >= total:
            break
        await asyncio.sleep(0.5)
    expected: dict[str, set[str]] = {}
    for index in acknowledged:
        expected.setdefault(segment_of(index, args.segments), set()).add(contact_of(run, index))
    lost = 0
    members = 0
    for segment, contacts in expected.items():
        listing = await control(
            session, emulator_url, "GET", f"/_emulator/segments/{segment}/members"
        )
        present = {m["contactId"] for m in listing["members"] if m["removal"] is None}
        members += len(present & contacts)
        lost += len(contacts - present)
    measured.acknowledged = len(acknowledged)
    measured.members = members
    measured.lost = lost
    if lost:
        measured.problems.append(
            f"run {run}: {lost} of {len(acknowledged)} acknowledged assignments are not members"
        )
    counters = await control(session, emulator_url, "GET", "/_emulator/counters")
    reused = counters["idempotency_conflicts"].get("IdempotencyKeyReused", 0)
    if reused or counters["applied_twice"]:
        measured.problems.append(
            f"run {run}: {reused} idempotency keys reused, {counters['applied_twice']} "
            "memberships applied twice"
        )


async def one_run(
    server: PostgresServer, emulator_url: str, root: Path, run: int, args: argparse.Namespace
) -> Run:
    """A fresh database, emulator state and cluster; the backlog; both figures; the check."""
    measured = Run(run)
    directory = root / f"run-{run}"
    directory.mkdir()
    database_url = await server.create_database()
    store = {"url": database_url, "password": server.password}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await control(session, emulator_url, "POST", "/_emulator/reset", {"config": True})
        instances = new_instances(directory, emulator_url, store, args)
        try:
            await start_instances(instances)
            await ready(session, instances)
            started = time.monotonic()
            acknowledged, refused = await send_backlog(session, instances, run, args)
            measured.ingest_s = time.monotonic() - started
            measured.problems += [f"run {run}: refused {what}" for what in refused]
            await window(session, emulator_url, instances, measured, args)
            await failover(session, emulator_url, server, database_url, instances, measured, args)
            await check(session, emulator_url, run, acknowledged, measured, args)
        finally:
            measured.problems += [f"run {run}: {p}" for p in stop_instances(instances)]
    return measured


# ---- the report ---------------------------------------------------------------------------------


def describe(measured: Run, args: argparse.Namespace) -> str:
    """A few lines for one run: what each figure was made of."""

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    shares = "/".join(f"{v:.0f}" for v in measured.per_instance.values())
    return (
        f"  run {measured.number}: backlog acknowledged in {measured.ingest_s:.1f} s "
        f"({measured.forwarded:,.0f} changes forwarded to their owner, "
        f"{measured.inbox_taken:,.0f} taken from the inbox)\n"
        f"    window {measured.window_s:.1f} s: {measured.requests} bulk requests "
        f"({measured.requests / max(measured.window_s, 1e-9):.2f}/s), "
        f"{measured.mean_ids():.1f} ids each, {measured.rate_limited} 429s; sent by instance "
        f"{shares}\n"
        f"    SIGKILL {measured.victim} ({measured.victim_segments} unfinished segments, "
        f"{measured.victim_shards} shards; its last heartbeat {measured.heartbeat_age_s:.2f} s "
        f"before, so its lease ran out at {args.lease - measured.heartbeat_age_s:.2f} s): a "
        f"survivor counted {INSTANCES - 1} instances at {seconds(measured.seen_dead_s)}; "
        + ("; ".join(measured.takeovers) or "no takeover logged")
        + f"; all {SHARDS} shards held at {seconds(measured.taken_s)}; its first segment "
        f"written again at {seconds(measured.first_s)}, all of them at "
        f"{seconds(measured.moving_s)} ("
        + ", ".join(f"{name} {seconds(at)}" for name, at in measured.segment_times.items())
        + ")\n"
        f"    check: {measured.members:,} of {measured.acknowledged:,} acknowledged assignments "
        "are members"
    )


def report(runs: list[Run], args: argparse.Namespace, settings: str) -> int:
    """Print the medians beside their references; 1 if a target was missed or a run invalid."""
    total = args.segments * args.contacts
    print(
        f"cluster: {INSTANCES} segmapd instances on one PostgreSQL journal ({settings}); "
        f"emulator bulk limit R = {args.rate:g} req/s, burst {args.rate:g} (every instance's "
        f"limits.write_rps = R); backlog {total:,} assignments ({args.segments} segments x "
        f"{args.contacts:,} contacts) in signed webhooks round-robin; lease_s = {args.lease:g}; "
        f"median of {len(runs)} runs"
    )

    def median(values: list[float | None]) -> float:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else math.inf

    def listed(values: list[float | None]) -> str:
        return ", ".join("-" if v is None else f"{v:.2f}" for v in values)

    ratio = statistics.median(r.ratio(args.rate) for r in runs)
    ids = statistics.median(r.mean_ids() for r in runs)
    limited = statistics.median(r.rate_limited for r in runs)
    failover_s = median([r.moving_s for r in runs])
    target_s = args.lease + FAILOVER_MARGIN_S
    print(f"  one shared write limit, steady window of {args.window:g} s")
    print(
        f"    bulk requests/s        {ratio * args.rate:.2f}   reference R = {args.rate:g}: "
        f"ratio {ratio:.3f}   (target >= {RATIO_TARGET})"
    )
    print(f"    mean ids per request   {ids:.1f}   (target >= {IDS_TARGET:g})")
    print(f"    429s                   {limited:.0f}   (target 0)")
    print("  failover: SIGKILL of the instance owning most unfinished segments")
    print(
        f"    kill -> all its segments written again  {failover_s:.2f} s   reference lease_s + "
        f"{FAILOVER_MARGIN_S:g} = {target_s:g} s   (target <=; runs: "
        f"{listed([r.moving_s for r in runs])})"
    )
    print(
        f"    kill -> its first segment written again {median([r.first_s for r in runs]):.2f} s"
        f"   (runs: {listed([r.first_s for r in runs])})"
    )
    print(
        f"    kill -> its lease ran out               "
        f"{median([args.lease - r.heartbeat_age_s for r in runs]):.2f} s   (lease_s minus the "
        "age of its last heartbeat; a survivor saw it dead at "
        f"{median([r.seen_dead_s for r in runs]):.2f} s, all {SHARDS} shards held at "
        f"{median([r.taken_s for r in runs]):.2f} s)"
    )
    acknowledged = sum(r.acknowledged for r in runs)
    lost = sum(r.lost for r in runs)
    print(
        f"  acknowledged assignments lost   {lost} of {acknowledged:,}   (each acknowledged "
        "contact checked as a member on the emulator's write side)"
    )
    problems = [p for r in runs for p in r.problems]
    for problem in problems:
        print(f"    INVALID: {problem}")
    met = ratio >= RATIO_TARGET and ids >= IDS_TARGET and limited == 0 and failover_s <= target_s
    if not met:
        print("  MISSED a target above")
    return 0 if met and not problems else 1


# ---- the benchmark ------------------------------------------------------------------------------


async def run_all(
    server: PostgresServer, emulator_url: str, root: Path, args: argparse.Namespace
) -> list[Run]:
    runs = []
    for run in range(1, args.runs + 1):
        measured = await one_run(server, emulator_url, root, run, args)
        print(describe(measured, args), flush=True)
        runs.append(measured)
    return runs


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the cluster benchmark and print its figures; 1 if a target was missed."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description="Three segmapd instances on one PostgreSQL journal.",
    )
    parser.add_argument("--runs", type=int, default=RUNS, help="runs, each on a fresh cluster")
    parser.add_argument("--rate", type=float, default=RATE, help="the bulk write limit, req/s")
    parser.add_argument("--segments", type=int, default=SEGMENTS, help="segments of the backlog")
    parser.add_argument("--contacts", type=int, default=CONTACTS, help="contacts per segment")
    parser.add_argument("--window", type=float, default=WINDOW_S, help="steady window, seconds")
    parser.add_argument("--lease", type=float, default=LEASE_S, help="[cluster] lease_s")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.segments < 1 or args.contacts < 1:
        parser.error("--runs, --segments and --contacts must be at least 1")
    try:
        bindir = server_bindir()
    except PostgresMissing as exc:
        print(f"cluster: skipped: {exc} (Debian/Ubuntu: apt-get install -y postgresql)")
        return 0
    args.secret = new_secret()
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        with workdir("cluster") as tmp:
            root = Path(tmp)
            server = PostgresServer(bindir)
            emulator = None
            try:
                server.create()
                settings = server_settings(server)
                emulator = start_emulator(
                    root, {"limits": {"bulk": {"rate": args.rate, "burst": args.rate}}}
                )
                runs = asyncio.run(run_all(server, emulator.url, root, args))
            finally:
                if emulator is not None:
                    emulator.stop()
                server.destroy()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return report(runs, args, settings)


if __name__ == "__main__":
    raise SystemExit(main())
