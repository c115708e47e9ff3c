"""Fixtures for the emulator contract tests: an authenticated API client and fresh segment ids."""

from __future__ import annotations

import aiohttp
import pytest

from tests.emulator.helpers import Api, fetch_token, new_segment
from tests.support.emulator import EmulatorControl
from tests.support.processes import ManagedProcess


@pytest.fixture
def base(emulator_proc: ManagedProcess) -> str:
    """The emulator's base URL."""
    return emulator_proc.url


@pytest.fixture
async def api(emulator: EmulatorControl, base: str, http: aiohttp.ClientSession) -> Api:
    """A client holding a fresh token of the (just reset) emulator."""
    token = await fetch_token(http, base)
    return Api(http, base, str(token["access_token"]))


@pytest.fixture
def seg() -> str:
    """A fresh segment id (auto-created by the emulator on first use)."""
    return new_segment()
