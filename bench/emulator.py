"""Emulator throughput: membership GETs and 200-id bulk writes per second, limits lifted.

The emulator runs as a real process (`python -m daemon.cli emulator --port 0`); this process
drives it over loopback with an aiohttp client at a fixed concurrency for a bounded time. The
in-run reference is a bare aiohttp + uvloop handler answering a tiny JSON body, started the same
way and driven by the same client, so the figures can be read against what this machine does.
Each figure is the median of 3 runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import uvloop
from aiohttp import web

from tests.support.processes import ManagedProcess, emulator_process

HOST = "127.0.0.1"
CONCURRENCY = 32
DURATION_S = 3.0
WARMUP_S = 0.5
REPEATS = 3
BULK_IDS = 200
PRELOADED_MEMBERS = 2_000
TARGET_GETS_PER_S = 2_000
TARGET_BULKS_PER_S = 300
JSON_HEADERS = {"Accept": "application/json", "Content-Type": "application/json"}


# --- processes --------------------------------------------------------------------------------


def emulator_server() -> ManagedProcess:
    return emulator_process(seed=1)


def reference_server() -> ManagedProcess:
    return ManagedProcess([sys.executable, "-m", "bench.emulator", "--reference-server"])


def serve_reference() -> None:
    """The reference: the barest aiohttp + uvloop app answering a tiny JSON body."""

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    async def run() -> None:
        app = web.Application()
        app.router.add_get("/ref", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        port = runner.addresses[0][1]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(json.dumps({"event": "listening", "url": f"http://{HOST}:{port}"}), flush=True)
        await stop.wait()
        await runner.cleanup()

    uvloop.run(run())


# --- load -------------------------------------------------------------------------------------


async def drive(
    session: aiohttp.ClientSession, call: Callable[[int], Awaitable[int]], duration_s: float
) -> float:
    """Run `call` from CONCURRENCY workers for `duration_s`; return successful calls per second."""
    counter = itertools.count()
    ok = 0
    errors = 0
    deadline = time.monotonic() + duration_s

    async def worker() -> None:
        nonlocal ok, errors
        while time.monotonic() < deadline:
            status = await call(next(counter))
            if status < 300:
                ok += 1
            else:
                errors += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.monotonic() - started
    if errors:
        print(f"  warning: {errors} non-2xx answers", flush=True)
    return ok / elapsed


async def measure(
    session: aiohttp.ClientSession,
    call: Callable[[int], Awaitable[int]],
    before_run: Callable[[], Awaitable[None]] | None = None,
) -> tuple[float, list[float]]:
    await drive(session, call, WARMUP_S)
    runs = []
    for _ in range(REPEATS):
        if before_run is not None:
            await before_run()
        runs.append(await drive(session, call, DURATION_S))
    return statistics.median(runs), runs


async def bench(emulator_url: str, reference_url: str) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        patch = {
            "limits": {cls: {"rate": 0} for cls in ("bulk", "single", "read", "token")},
            "indexing": {"median_s": 0.5, "p99_s": 1.0, "stall_fraction": 0.0},
        }
        async with session.patch(f"{emulator_url}/_emulator/config", json=patch) as response:
            assert response.status == 200, await response.text()
        headers = dict(JSON_HEADERS)

        async def authenticate() -> None:
            async with session.post(
                f"{emulator_url}/auth/token",
                data={"grant_type": "client_credentials"},
                headers={
                    "Authorization": "Basic " + base64.b64encode(b"segmapd:segmapd-secret").decode()
                },
            ) as response:
                assert response.status == 200, await response.text()
                headers["Authorization"] = f"Bearer {(await response.json())['access_token']}"

        async def forget_writes() -> None:
            # Each bulk run adds ~10^5-10^6 members; a reset keeps the emulator's memory bounded.
            async with session.post(f"{emulator_url}/_emulator/reset", json={}) as response:
                assert response.status == 200, await response.text()
            await authenticate()

        await authenticate()
        segment_url = f"{emulator_url}/api/v2/segments/bench_seg/contacts"

        # Members to read: written in 200-id batches, then made visible by the short indexing.
        for start in range(0, PRELOADED_MEMBERS, BULK_IDS):
            ids = [f"member_{n}" for n in range(start, start + BULK_IDS)]
            async with session.post(segment_url, data=orjson.dumps(ids), headers=headers) as r:
                assert r.status == 200, await r.text()
        await asyncio.sleep(1.5)

        async def get_member(n: int) -> int:
            url = f"{segment_url}/member_{n % PRELOADED_MEMBERS}"
            async with session.get(url, headers=headers) as response:
                await response.read()
                return response.status

        async def bulk_write(n: int) -> int:
            body = orjson.dumps([f"bulk_{n}_{i}" for i in range(BULK_IDS)])
            request_headers = {**headers, "Idempotency-Key": f"bench-{n}"}
            async with session.post(segment_url, data=body, headers=request_headers) as response:
                await response.read()
                return response.status

        async def reference(_n: int) -> int:
            async with session.get(f"{reference_url}/ref", headers=JSON_HEADERS) as response:
                await response.read()
                return response.status

        results: dict[str, float] = {}
        for name, call, before_run in (
            ("reference GET", reference, None),
            ("membership GET", get_member, None),
            ("bulk write (200 ids)", bulk_write, forget_writes),
        ):
            median, runs = await measure(session, call, before_run)
            shown = ", ".join(f"{run:,.0f}" for run in runs)
            print(f"  {name:<22} median {median:8,.0f} req/s   runs: {shown}", flush=True)
            results[name] = median
        return results


def main() -> int:
    print(
        f"emulator throughput: concurrency {CONCURRENCY}, {REPEATS} x {DURATION_S:.0f} s"
        f" per figure, limits lifted, no faults (client and servers on {HOST})",
        flush=True,
    )
    emulator = emulator_server()
    reference = reference_server()
    try:
        emulator_url = emulator.start()
        reference_url = reference.start()
        results = asyncio.run(bench(emulator_url, reference_url))
    finally:
        emulator.stop()
        reference.stop()
    gets = results["membership GET"]
    bulks = results["bulk write (200 ids)"]
    ref = results["reference GET"]
    print(f"  membership GET / reference GET: {gets / ref:.2f}")
    print(f"  bulk write ids/s: {bulks * BULK_IDS:,.0f}")
    ok = gets >= TARGET_GETS_PER_S and bulks >= TARGET_BULKS_PER_S
    verdict = "meets" if ok else "MISSES"
    print(
        f"  {verdict} the targets (>= {TARGET_GETS_PER_S:,} GETs/s, >= {TARGET_BULKS_PER_S} bulk"
        " writes/s)",
        flush=True,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference-server", action="store_true", help=argparse.SUPPRESS)
    if parser.parse_args().reference_server:
        serve_reference()
    else:
        sys.exit(main())
