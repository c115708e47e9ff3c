"""Fixtures for the CXone client tests: real clients against the session's emulator process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from daemon.cxone import HttpCXoneClient
from daemon.cxone.settings import CXoneSettings
from tests.support.cxone import emulator_settings as support_settings
from tests.support.emulator import EmulatorControl
from tests.support.processes import ManagedProcess

MakeClient = Callable[..., Awaitable[HttpCXoneClient]]


def emulator_settings(url: str, **overrides: Any) -> CXoneSettings:
    """Settings for the emulator's default credentials, with configured URLs (no discovery)."""
    values: dict[str, Any] = {
        "api_base": url,
        "token_url": f"{url}/auth/token",
        "grant": "client_credentials",
    }
    values.update(overrides)
    return support_settings(url, **values)


class Recorder:
    """An `on_response` hook that keeps every (endpoint_class, status)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float]] = []

    def __call__(self, endpoint: str, status: int, elapsed_s: float) -> None:
        self.calls.append((endpoint, status, elapsed_s))

    def statuses(self, endpoint: str) -> list[int]:
        return [status for name, status, _ in self.calls if name == endpoint]


@pytest.fixture
async def make_client(
    emulator: EmulatorControl, emulator_proc: ManagedProcess
) -> AsyncIterator[MakeClient]:
    """Build started clients for the emulator (settings overrides as keywords); closes them."""
    clients: list[HttpCXoneClient] = []

    async def factory(*, on_response: Recorder | None = None, **overrides: Any) -> HttpCXoneClient:
        client = HttpCXoneClient(
            emulator_settings(emulator_proc.url, **overrides), on_response=on_response
        )
        await client.start()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()
