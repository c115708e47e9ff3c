"""Shared fixtures: one real emulator process per session, reset before every test.

And one private PostgreSQL server per session (started only by tests that ask for it), with a
fresh database per test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.support.emulator import EmulatorControl
from tests.support.postgres import PostgresServer, start_server
from tests.support.processes import ManagedProcess, emulator_process


@pytest.fixture(scope="session")
def emulator_proc() -> Iterator[ManagedProcess]:
    """The emulator, running as a real process on a free loopback port for the whole session."""
    process = emulator_process()
    process.start()
    yield process
    process.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client session for the test."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def emulator(
    emulator_proc: ManagedProcess, http: aiohttp.ClientSession
) -> AsyncIterator[EmulatorControl]:
    """The session's emulator, reset to its start-up state and config before the test."""
    control = EmulatorControl(emulator_proc.url, http)
    await control.reset(config=True)
    yield control


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the session; skipped (failed in CI) when not installed."""
    server = start_server()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def postgres_url(postgres: PostgresServer) -> str:
    """A new, empty database on the session's server: its URL (password: postgres.password)."""
    return await postgres.create_database()
