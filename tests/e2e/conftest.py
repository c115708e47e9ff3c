"""The real daemon as a process on loopback, against the session's emulator process."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from daemon.config import Config, load_config
from listeners import sign
from tests.support.emulator import EmulatorControl
from tests.support.processes import ManagedProcess
from tests.support.toml import render_toml


class Daemon:
    """A running segmapd process and what a test needs to talk to it."""

    def __init__(
        self,
        process: ManagedProcess,
        url: str,
        admin_token: str,
        secret: str,
        config: Path,
        env: dict[str, str] | None = None,
        on_restart: Callable[[ManagedProcess], None] = lambda _: None,
    ) -> None:
        self._env = env
        self._on_restart = on_restart
        self.process = process
        self.url = url
        self.admin_token = admin_token
        self.secret = secret
        self.config = config
        self._sequence = 0

    def restart(self) -> None:
        """Start the process again on the same port with the same config (after a crash)."""
        port = self.url.rsplit(":", 1)[1]
        text = self.config.read_text().replace(
            'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'
        )
        self.config.write_text(text)
        self.process = ManagedProcess(self.process.argv, env=self._env)
        self.process.start()
        self._on_restart(self.process)

    def signed_headers(self, body: bytes, *, msg_id: str | None = None) -> dict[str, str]:
        self._sequence += 1
        msg_id = msg_id or f"msg_{secrets.token_hex(8)}_{self._sequence}"
        headers = sign(self.secret, msg_id, int(time.time()), body)
        headers["Content-Type"] = "application/json"
        return headers

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    async def webhook(
        self,
        http: aiohttp.ClientSession,
        events: Any,
        *,
        source: str = "crm",
        msg_id: str | None = None,
    ) -> tuple[int, Any]:
        body = orjson.dumps(events)
        async with http.post(
            f"{self.url}/v1/webhooks/{source}",
            data=body,
            headers=self.signed_headers(body, msg_id=msg_id),
        ) as response:
            return response.status, await response.json(content_type=None)

    async def contact(self, http: aiohttp.ClientSession, contact_id: str) -> tuple[int, Any]:
        async with http.get(f"{self.url}/v1/contacts/{contact_id}", headers=self.admin) as r:
            return r.status, await r.json(content_type=None)

    async def dead_letters(self, http: aiohttp.ClientSession, query: str = "") -> tuple[int, Any]:
        """GET /v1/dead-letters{query} with the admin token: its status and JSON body."""
        async with http.get(f"{self.url}/v1/dead-letters{query}", headers=self.admin) as r:
            return r.status, await r.json(content_type=None)

    async def replay_dead_letters(self, http: aiohttp.ClientSession, body: Any) -> tuple[int, Any]:
        """POST /v1/dead-letters/replay with `body` and the admin token: status and JSON body."""
        async with http.post(
            f"{self.url}/v1/dead-letters/replay", json=body, headers=self.admin
        ) as r:
            return r.status, await r.json(content_type=None)

    async def mappings(
        self, http: aiohttp.ClientSession, events: Any, query: str = ""
    ) -> tuple[int, Any]:
        """POST /v1/mappings{query} with `events` and the admin token: status and JSON body."""
        async with http.post(
            f"{self.url}/v1/mappings{query}", json=events, headers=self.admin
        ) as r:
            return r.status, await r.json(content_type=None)

    async def wait_states(
        self, http: aiohttp.ClientSession, contact_id: str, want: set[str], timeout_s: float
    ) -> dict[str, Any]:
        """Poll the status API until every segment of the contact is in one of `want`."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            status, last = await self.contact(http, contact_id)
            if status == 200 and all(s["state"] in want for s in last["segments"]):
                return {s["segmentId"]: s for s in last["segments"]}
            await asyncio.sleep(0.1)
        raise AssertionError(f"{contact_id} did not reach {want}: {last}")


def daemon_config(
    emulator_url: str, admin_token: str, secret: str, overrides: dict[str, dict[str, Any]]
) -> str:
    sections: dict[str, dict[str, Any]] = {
        "server": {"listen": "127.0.0.1:0", "admin_tokens": [admin_token], "drain_budget_s": 10.0},
        "cxone": {
            "issuer": emulator_url,
            "grant": "password",
            "client_id": "segmapd",
            "client_secret": "segmapd-secret",
            "access_key_id": "emulator-key",
            "access_key_secret": "emulator-secret=",
            "timeout_s": 2.0,
        },
        "limits": {"write_rps": 10.0, "read_rps": 50.0},
        "batching": {"linger_ms": 100},
        "retry": {"initial_s": 0.2, "max_s": 1.0, "jitter_ms": 100},
        "validation": {
            "interval_s": 0.3,
            "window_s": 3.0,
            "refresh_min_interval_s": 2.0,
            "deadline_s": 20.0,
        },
        "sources.crm": {"kind": "standard", "secret": secret},
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return render_toml(sections)


def in_process_config(
    emulator: EmulatorControl,
    tmp_path: Path,
    listen: str = "127.0.0.1:0",
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """The config of a service run in the test's own process (SQLite journal in `tmp_path`)."""
    config_path = tmp_path / "segmapd.toml"
    sections: dict[str, dict[str, Any]] = {
        "store": {"url": f"sqlite://{tmp_path}/journal.db"},
        "server": {"listen": listen},
    }
    for name, values in (overrides or {}).items():
        sections.setdefault(name, {}).update(values)
    config_path.write_text(
        daemon_config(
            emulator.url,
            "admin-token-in-process",
            "whsec_" + base64.b64encode(b"x" * 24).decode(),
            sections,
        )
    )
    return load_config(config_path, environ={})


StartDaemon = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def start_daemon(emulator: EmulatorControl, tmp_path: Path) -> AsyncIterator[StartDaemon]:
    """Start segmapd processes (config overrides per section as keywords); stops them after."""
    started: list[ManagedProcess] = []
    # Indexing in a fraction of a second keeps end-to-end tests quick.
    await emulator.configure({"indexing": {"median_s": 0.3, "p99_s": 0.8, "stall_fraction": 0.0}})

    async def factory(env: dict[str, str] | None = None, **overrides: dict[str, Any]) -> Daemon:
        admin_token = secrets.token_urlsafe(16)
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        config = tmp_path / f"segmapd-{len(started)}.toml"
        # The production default: a SQLite journal, one per daemon (a restart reuses it).
        overrides.setdefault("store", {"url": f"sqlite://{tmp_path}/journal-{len(started)}.db"})
        config.write_text(daemon_config(emulator.url, admin_token, secret, overrides))
        process = ManagedProcess(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
            env=env,
        )
        url = process.start()
        started.append(process)
        return Daemon(process, url, admin_token, secret, config, env, started.append)

    yield factory
    for process in started:
        process.stop(timeout_s=20)


@pytest.fixture
def cli_env() -> Iterator[dict[str, str]]:
    """Environment for CLI subprocesses (no inherited SEGMAPD_ settings)."""
    yield {k: v for k, v in os.environ.items() if not k.startswith("SEGMAPD_")}
