"""Running out of file descriptors never turns accepted work into dead letters.

The daemon runs with a lowered RLIMIT_NOFILE while far more connections than it may hold are
opened to it; the work it accepted just before must still become active, none of it
`retries_exhausted` (18 assignments were, when outbound connects failed with EMFILE).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import sys
from pathlib import Path

import aiohttp
import orjson

from tests.e2e.conftest import Daemon, daemon_config
from tests.support.emulator import EmulatorControl
from tests.support.processes import ManagedProcess

DESCRIPTOR_LIMIT = 1400
FLOOD = 1600
SEGMENTS = 30


async def test_a_connection_flood_under_a_low_descriptor_limit_loses_no_work(
    emulator: EmulatorControl, http: aiohttp.ClientSession, tmp_path: Path
):
    await emulator.configure(
        {
            "indexing": {"median_s": 0.3, "p99_s": 0.8, "stall_fraction": 0.0},
            # Slow answers keep several requests in flight, so the daemon needs new connections.
            "faults": {"bulk": {"latency_ms": 400}, "read": {"latency_ms": 200}},
        }
    )
    admin_token = secrets.token_urlsafe(16)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    config = tmp_path / "segmapd.toml"
    config.write_text(
        daemon_config(
            emulator.url,
            admin_token,
            secret,
            {
                "store": {"url": f"sqlite://{tmp_path}/journal.db"},
                "server": {"header_timeout_s": 60.0},
            },
        )
    )
    limit = f"--nofile={DESCRIPTOR_LIMIT}:{DESCRIPTOR_LIMIT}"
    process = ManagedProcess(
        ["prlimit", limit, sys.executable, "-m", "daemon.cli", "run", "--config", str(config)]
    )
    flood: list[asyncio.StreamWriter] = []
    try:
        url = process.start()
        daemon = Daemon(process, url, admin_token, secret, config)
        # One keep-alive connection opened before the flood carries the webhooks through it.
        async with http.get(f"{url}/readyz") as response:
            assert (await response.json())["checks"]["fds"] == "ok"
        host, port = url.removeprefix("http://").rsplit(":", 1)
        for _ in range(FLOOD):
            with contextlib.suppress(OSError):
                flood.append((await asyncio.open_connection(host, int(port)))[1])
        events = [{"contactId": f"c{i}", "segmentIds": [f"seg_fd_{i}"]} for i in range(SEGMENTS)]
        body = orjson.dumps(events)
        async with http.post(
            f"{url}/v1/webhooks/crm", data=body, headers=daemon.signed_headers(body)
        ) as response:
            assert response.status == 202, await response.text()
        await asyncio.sleep(5.0)  # the flood stays while every write and read is attempted
        for writer in flood:
            writer.close()
        flood.clear()
        for i in range(SEGMENTS):
            states = await daemon.wait_states(http, f"c{i}", {"active", "failed"}, 30.0)
            assert states[f"seg_fd_{i}"]["state"] == "active", states
    finally:
        for writer in flood:
            writer.close()
        process.stop(timeout_s=20)
