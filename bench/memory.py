"""Memory benchmark: RSS of the real daemon with 1,000,000 pending assignments vs idle.

Method: the real intake path. A `segmapd run` process (SQLite journal, synchronous = FULL) is
started and its VmRSS read from /proc once it is ready and settled: the reference, measured in
the same run. Then 1,000,000 assignments (500,000 contacts x 2 segments) arrive through
`POST /v1/mappings` (admin token, 1000 events per request, a few requests in flight), and
nothing drains: the emulator's bulk endpoint hangs every request and the daemon's `write_rps`
is tiny with a long linger, so at most a couple of batches leave the buffer (still pending:
sending or retrying). The daemon's own `segmapd_pending_writes` gauge must read 1,000,000.
VmRSS is read again once intake is over and the process has settled; VmHWM (peak) is reported
too. One run: the figure is a size, not a rate, and a run takes tens of seconds.
Target (docs/architecture.md, "Performance targets"): RSS increase <= 300 MB.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson

from bench._daemon import (
    ADMIN_TOKEN,
    UNLIMITED,
    daemon_config,
    daemon_process,
    metric_total,
    new_secret,
    pid_of,
    rss_mb,
    start_emulator,
    wait_ready,
    workdir,
)

CONTACTS = 500_000
SEGMENTS_PER_CONTACT = 2
SEGMENT_POOL = 50
EVENTS_PER_REQUEST = 1000  # listeners.payload.MAX_EVENTS
IN_FLIGHT = 4
SETTLE_S = 3.0
TARGET_MB = 300.0


def bodies() -> list[bytes]:
    """The /v1/mappings bodies carrying every assignment."""
    out = []
    for start in range(0, CONTACTS, EVENTS_PER_REQUEST):
        events = [
            {
                "contactId": str(100_000_000_000 + i),
                "segmentIds": [
                    f"seg-{(i + 17 * k) % SEGMENT_POOL}" for k in range(SEGMENTS_PER_CONTACT)
                ],
            }
            for i in range(start, min(start + EVENTS_PER_REQUEST, CONTACTS))
        ]
        out.append(orjson.dumps(events))
    return out


async def load(url: str, payloads: list[bytes]) -> int:
    """Post every body (IN_FLIGHT at a time); returns the assignments the daemon accepted."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    accepted = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        while not queue.empty():
            payload = queue.get_nowait()
            async with session.post(url + "/v1/mappings", data=payload, headers=headers) as r:
                body = await r.read()
                if r.status != 202:
                    raise RuntimeError(f"/v1/mappings answered {r.status}: {body[:300]!r}")
                accepted += orjson.loads(body)["accepted"]

    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(IN_FLIGHT)))
    return accepted


def main() -> int:
    """Run the memory benchmark and print its figures."""
    total = CONTACTS * SEGMENTS_PER_CONTACT
    payloads = bodies()
    with workdir("memory") as tmp:
        root = Path(tmp)
        # Every bulk request hangs far past the client's timeout: nothing is ever written.
        emulator = start_emulator(
            root, {**UNLIMITED, "faults": {"bulk": {"hang_rate": 1.0, "hang_s": 3600}}}
        )
        config = root / "segmapd.toml"
        config.write_text(
            daemon_config(
                emulator.url,
                {
                    "server": {
                        "high_water": 4 * total,
                        "max_body_bytes": 4 * 1_048_576,
                        "drain_budget_s": 1.0,
                    },
                    "limits": {"write_rps": 0.001},
                    "batching": {"linger_ms": 60_000},
                    "store": {"url": f"sqlite://{root / 'journal.db'}", "synchronous": "FULL"},
                    "sources.crm": {"kind": "standard", "secret": new_secret()},
                },
            )
        )
        daemon = daemon_process(config)
        try:
            url = daemon.start()
            pid = pid_of(daemon)
            wait_ready(url)
            time.sleep(SETTLE_S)
            idle = rss_mb(pid)
            started = time.monotonic()
            accepted = asyncio.run(load(url, payloads))
            intake_s = time.monotonic() - started
            time.sleep(SETTLE_S)
            loaded = rss_mb(pid)
            peak = rss_mb(pid, "VmHWM")
            pending = int(metric_total(url, "segmapd_pending_writes"))
        finally:
            daemon.stop(timeout_s=30)
            emulator.stop()

    increase = loaded - idle
    print(
        f"memory: real daemon, {total:,} assignments ({CONTACTS:,} contacts x "
        f"{SEGMENTS_PER_CONTACT} segments) through POST /v1/mappings, nothing drains "
        "(bulk endpoint hangs); VmRSS from /proc; one run"
    )
    print(f"  idle daemon RSS          {idle:.0f} MB   (reference, same run)")
    print(
        f"  with pending RSS         {loaded:.0f} MB   (peak VmHWM {peak:.0f} MB; "
        f"{accepted:,} accepted in {intake_s:.1f} s, {pending:,} pending writes)"
    )
    print(
        f"  increase                 {increase:.0f} MB = {increase * 1_048_576 / total:.0f} "
        f"bytes/assignment   (target <= {TARGET_MB:.0f} MB)"
    )
    if accepted != total or pending != total:
        print(f"  INVALID: expected {total:,} accepted and pending")
        return 1
    if increase > TARGET_MB:
        print(f"  MISSED the target: {increase:.0f} MB > {TARGET_MB:.0f} MB")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
