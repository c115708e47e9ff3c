"""Drift reconcile: the reads per second a pass uses against its share, and what it costs live
changes.

The daemon (`segmapd run`, SQLite journal, CXone's default read limit of 50 reads/s, the
daemon's `[limits] read_rps` the same, `[reconcile] read_share` its default 0.1: 5 reads/s)
runs against an emulator process. TRACKED memberships are made and confirmed first; DRIFTED of
them are then removed in the emulator behind the daemon's back. Two phases, in one run:

1. **Reference: no pass.** One live change a second (`POST /v1/mappings?wait=...`); received ->
   active is the time until the answer says complete.
2. **During a pass.** `POST /v1/reconcile`, and meanwhile one live change a second. The pass's
   reads per second are its `read` over its own `startedAt` .. `finishedAt`; the emulator counts
   every read (the pass's and validation's) and the 429s.

Targets (issue "Stay true for months"):
- the pass reads at most its share (`read_share x read_rps`, 2 % for timer granularity), and at
  least 90 % of it while validation leaves room;
- every drift found and queued again (`drifted` = `requeued` = DRIFTED);
- no 429 from CXone;
- live received -> active p50 during the pass <= the reference p50 + 0.5 s (validation first;
  live changes as bench.live_under_backfill makes them).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench._common import percentile
from bench._daemon import (
    ADMIN_TOKEN,
    daemon_config,
    daemon_process,
    start_emulator,
    wait_ready,
    workdir,
)
from bench.live_under_backfill import live_changes

READ_RPS = 50.0
READ_SHARE = 0.1
TRACKED = 300
DRIFTED = 10
SEGMENT = "RECONCILED"
REFERENCE_CHANGES = 20
HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def call(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    """One admin API call: status and JSON."""
    async with session.request(method, url, json=body, headers=HEADERS) as response:
        return response.status, await response.json(content_type=None)


async def emulator_counters(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """The emulator's counters."""
    async with session.get(url + "/_emulator/counters") as response:
        counters: dict[str, Any] = await response.json()
    return counters


def epoch(text: str) -> float:
    """Epoch seconds of an RFC 3339 time."""
    return datetime.fromisoformat(text).timestamp()


async def run_once(root: Path) -> dict[str, float]:
    """Track, drift, then one reference phase and one phase during a pass; their figures."""
    emulator = start_emulator(
        root,
        {
            "limits": {"read": {"rate": READ_RPS, "burst": READ_RPS}},
            "indexing": {"median_s": 1.0, "p99_s": 1.8, "stall_fraction": 0.0},
        },
    )
    config = root / "segmapd.toml"
    config.write_text(
        daemon_config(
            emulator.url,
            {
                "store": {"url": f"sqlite://{root / 'journal.db'}"},
                "limits": {"read_rps": READ_RPS},
                "reconcile": {"interval_s": 0, "read_share": READ_SHARE},
                "server": {"drain_budget_s": 2.0},
            },
        )
    )
    daemon = daemon_process(config)
    url = daemon.start()
    try:
        wait_ready(url)
        async with aiohttp.ClientSession() as session:
            events = [{"contactId": f"rc{i}", "add": [SEGMENT]} for i in range(TRACKED)]
            status, answer = await call(session, "POST", f"{url}/v1/mappings?wait=120", events)
            if status != 200:
                raise RuntimeError(f"tracked memberships not confirmed: {status} {answer}")
            for i in range(DRIFTED):
                async with session.delete(
                    f"{emulator.url}/_emulator/segments/{SEGMENT}/members/rc{i * 7}"
                ) as response:
                    response.raise_for_status()
            reference = await live_changes(session, url, "ref", REFERENCE_CHANGES)

            before = await emulator_counters(session, emulator.url)
            status, started = await call(session, "POST", f"{url}/v1/reconcile", {})
            if status != 202:
                raise RuntimeError(f"the pass did not start: {status} {started}")
            live_task = asyncio.create_task(live_changes(session, url, "live", 40))
            while True:
                status, done = await call(session, "GET", f"{url}/v1/reconcile/{started['id']}")
                if done["state"] != "running":
                    break
                await asyncio.sleep(0.5)
            during = await live_task
            after = await emulator_counters(session, emulator.url)
    finally:
        daemon.stop(timeout_s=60)
        emulator.stop()

    took = epoch(done["finishedAt"]) - epoch(done["startedAt"])
    reference_done = [t for _, t in reference if t is not None]
    during_done = [t for _, t in during if t is not None]
    limited = sum(after["rate_limited"].values()) - sum(before["rate_limited"].values())
    return {
        "pass_state_done": float(done["state"] == "done"),
        "read": float(done["read"]),
        "drifted": float(done["drifted"]),
        "requeued": float(done["requeued"]),
        "pass_reads_per_s": done["read"] / took if took > 0 else float("inf"),
        "peak_reads_per_s": float(after["peak_rps"]["read"]),
        "rate_limited": float(limited),
        "reference_p50": percentile(reference_done, 0.5) if reference_done else float("inf"),
        "live_p50": percentile(during_done, 0.5) if during_done else float("inf"),
        "live_active": float(len(during_done)),
        "live_sent": float(len(during)),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark `--runs` times and print the medians against the targets."""
    parser = argparse.ArgumentParser(prog="python -m bench.reconcile")
    parser.add_argument("--runs", type=int, default=1, help="runs (about 2 minutes each)")
    args = parser.parse_args(argv)
    runs: list[dict[str, float]] = []
    for run in range(args.runs):
        with workdir("reconcile") as tmp:
            figures = asyncio.run(run_once(Path(tmp)))
        runs.append(figures)
        print(
            f"  run {run + 1}: pass {figures['pass_reads_per_s']:.2f} reads/s "
            f"({figures['read']:.0f} read, {figures['drifted']:.0f} drifted, "
            f"{figures['requeued']:.0f} requeued); peak reads {figures['peak_reads_per_s']:.0f}/s; "
            f"429s {figures['rate_limited']:.0f}; live p50 {figures['live_p50']:.2f} s "
            f"(reference {figures['reference_p50']:.2f} s, {figures['live_active']:.0f} of "
            f"{figures['live_sent']:.0f} active)",
            flush=True,
        )

    def median(name: str) -> float:
        return statistics.median(figures[name] for figures in runs)

    share = READ_SHARE * READ_RPS
    rate = median("pass_reads_per_s")
    live_p50, reference_p50 = median("live_p50"), median("reference_p50")
    print(
        f"reconcile: {TRACKED} tracked memberships ({DRIFTED} drifted), reads limited to "
        f"{READ_RPS:.0f}/s, read_share {READ_SHARE}; median of {len(runs)} run(s)"
    )
    checks = [
        (
            f"pass reads/s {rate:.2f} (its share: {share:.2f}; >= 90 % and <= 102 % of it)",
            0.9 * share <= rate <= 1.02 * share,
        ),
        (
            f"drift found and queued again: {median('drifted'):.0f} / {median('requeued'):.0f} "
            f"of {DRIFTED}",
            median("drifted") == DRIFTED == median("requeued"),
        ),
        (f"429s from CXone: {median('rate_limited'):.0f} (target 0)", median("rate_limited") == 0),
        (
            f"live received -> active p50 during the pass {live_p50:.2f} s (reference without a "
            f"pass {reference_p50:.2f} s; target <= reference + 0.5 s)",
            live_p50 <= reference_p50 + 0.5,
        ),
    ]
    missed = 0
    for text, met in checks:
        print(f"  {text}{'' if met else '  MISSED'}")
        missed += not met
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
