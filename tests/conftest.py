"""Shared fixtures: one real emulator process per session, reset before every test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.support.emulator import EmulatorControl
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
