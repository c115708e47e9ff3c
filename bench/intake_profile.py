"""Where a webhook's time goes in the intake: microseconds per webhook, by part, in one process.

The real intake (`daemon.intake.receive`) of a real `Service` (SQLite journal with
`synchronous = FULL`, a standard source, CXone = an emulator process with CXone's default limits)
takes signed webhooks of one event with three segments, as `bench.ingest` sends them, from 64
concurrent callers (as wrk's 64 connections), without the HTTP server: what is measured is
segmapd's own work per webhook, on the event loop's thread and on the journal's writer thread,
as CPU time (so the figure does not move with the machine's other load as wall time would).

A second pass runs the same load under cProfile and splits the event loop's time into the parts
the issue names: the signature check, the body parse, the redelivery claims, the engine (changes
and ledger), the journal (queueing rows, and the commit's own work on the loop), and the rest
(the event loop, the sender, validation). The split's shares are applied to the first pass's
total, since the profiler inflates what it measures. Not a pass/fail benchmark: it prints the
table that says where to look.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from bench._daemon import daemon_config, new_secret, start_emulator, workdir
from daemon.config import load_config
from daemon.intake import receive
from daemon.service import Service
from listeners import InboundRequest, sign

WEBHOOKS = 20_000
CALLERS = 64
SEGMENTS_PER_EVENT = 3
SEGMENT_POOL = 30

# (part, what a profiled function's file and name must contain): the first match wins.
PARTS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("signature", lambda file, name: "authenticate" in name or "verify" in name),
    ("parse", lambda file, name: "listeners" in file and "sign" not in file),
    ("claim", lambda file, name: file.endswith(("claims.py", "delivery_filter.py"))),
    ("engine", lambda file, name: file.startswith("scheduler/") and "sender" not in file),
    ("journal", lambda file, name: "daemon/store" in file),
    ("intake", lambda file, name: file.endswith("intake.py")),
]


def thread_cpu_s(thread_id: int) -> float:
    """A thread of this process's CPU time (user + system), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/self/task/{thread_id}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks


def writer_thread_id() -> int | None:
    """The journal writer thread's native id, if it runs."""
    for thread in threading.enumerate():
        if thread.name == "journal-writer" and thread.native_id is not None:
            return thread.native_id
    return None


def requests(secret: str, count: int, start: int) -> list[InboundRequest]:
    """Signed deliveries, each with its own webhook-id."""
    stamp = int(time.time())
    made = []
    for index in range(start, start + count):
        segments = [f"seg-{(index + 7 * k) % SEGMENT_POOL}" for k in range(SEGMENTS_PER_EVENT)]
        body = orjson.dumps({"contactId": str(100_000_000_000 + index), "segmentIds": segments})
        headers = sign(secret, f"bench-{index}", stamp, body)
        headers["Content-Type"] = "application/json"
        made.append(
            InboundRequest(
                method="POST",
                path_qs="/v1/webhooks/crm",
                query_string="",
                headers={k.lower(): v for k, v in headers.items()},
                body=body,
                peer="127.0.0.1",
                received_at=time.time(),
            )
        )
    return made


async def drive(service: Service, batch: list[InboundRequest]) -> None:
    """Every request through the intake, from CALLERS concurrent callers."""
    adapter = service.sources["crm"]
    queue = iter(batch)

    async def caller() -> None:
        for request in queue:
            reply = await receive(service, "crm", adapter, request)
            if reply.status != 202:
                raise RuntimeError(f"intake answered {reply.status}: {reply.body!r}")

    await asyncio.gather(*(caller() for _ in range(CALLERS)))


def split(stats: pstats.Stats) -> dict[str, float]:
    """The profile's own time per part, in seconds."""
    parts: dict[str, float] = {name: 0.0 for name, _ in PARTS}
    parts["rest"] = 0.0
    root = str(Path(__file__).resolve().parents[1]) + "/"
    for (path, _, name), row in stats.stats.items():  # type: ignore[attr-defined]
        own = row[2]
        file = path.removeprefix(root)
        for part, matches in PARTS:
            if matches(file, name):
                parts[part] += own
                break
        else:
            parts["rest"] += own
    return parts


async def measure(config_path: Path, secret: str) -> None:
    service = Service(load_config(config_path, environ={}))
    await service.start()
    try:
        # Warm up: the first calls pay for imports, caches and the token.
        await drive(service, requests(secret, 2_000, 0))
        batch = requests(secret, WEBHOOKS, 10_000)
        main_id = threading.get_native_id()
        writer = writer_thread_id()
        main_before = thread_cpu_s(main_id)
        writer_before = thread_cpu_s(writer) if writer else 0.0
        wall = time.perf_counter()
        await drive(service, batch)
        wall = time.perf_counter() - wall
        main_us = (thread_cpu_s(main_id) - main_before) / WEBHOOKS * 1e6
        writer_us = ((thread_cpu_s(writer) - writer_before) if writer else 0.0) / WEBHOOKS * 1e6
        profiler = cProfile.Profile()
        profiled = requests(secret, WEBHOOKS // 2, 100_000)
        profiler.enable()
        await drive(service, profiled)
        profiler.disable()
        stats = pstats.Stats(profiler)
        parts = split(stats)
        if os.environ.get("INTAKE_PROFILE_TOP"):
            stats.sort_stats("tottime").print_stats(int(os.environ["INTAKE_PROFILE_TOP"]))
    finally:
        await service.drain()
    total = sum(parts.values()) or 1.0
    print(
        f"intake_profile: {WEBHOOKS} signed webhooks (1 event x {SEGMENTS_PER_EVENT} segments) "
        f"through daemon.intake.receive, {CALLERS} concurrent callers, SQLite synchronous=FULL"
    )
    print(f"  event loop thread  {main_us:7.1f} us CPU per webhook   ({WEBHOOKS / wall:.0f}/s)")
    print(f"  journal writer     {writer_us:7.1f} us CPU per webhook")
    print("  event loop's time by part (cProfile's shares of the figure above):")
    for part, seconds in parts.items():
        print(f"    {part:10s} {seconds / total * main_us:7.1f} us   ({seconds / total:5.1%})")


def main() -> int:
    """Run the intake profile and print its table."""
    secret = new_secret()
    with workdir("intake-profile") as tmp:
        root = Path(tmp)
        emulator = start_emulator(root, {})  # CXone's default limits
        try:
            config = root / "segmapd.toml"
            config.write_text(
                daemon_config(
                    emulator.url,
                    {
                        "server": {"high_water": 50_000_000, "drain_budget_s": 3.0},
                        "store": {"url": f"sqlite://{root}/journal.db", "synchronous": "FULL"},
                        "sources.crm": {"kind": "standard", "secret": secret, "tolerance_s": 3600},
                    },
                )
            )
            import uvloop

            uvloop.run(measure(config, secret))
        finally:
            emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
