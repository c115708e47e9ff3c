"""Every HTTP attempt the client makes is one the engine paid a gate token for.

aiohttp resends an idempotent request (GET, DELETE, ...) once, on its own, when a pooled
connection turns out to be broken (`ClientSession._request`, `retry_persistent_connection`).
Such a resend bypasses the rate gate: at `read_rps = 20` it produced 36 reads in one second and
14 read 429s. These tests count the requests the emulator received against the gate tokens taken.
"""

from __future__ import annotations

import pytest

from scheduler.ratelimit import RateGate
from scheduler.upstream import TransientError
from tests.cxone.conftest import MakeClient, Recorder
from tests.support.emulator import EmulatorControl

CALLS = 6


async def test_a_reset_read_is_one_request_per_gate_token(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    recorder = Recorder()
    client = await make_client(on_response=recorder)
    gate = RateGate("read", 100.0)
    tokens = 0
    # A first good read leaves a pooled keep-alive connection: the case aiohttp "retries".
    await gate.acquire()
    tokens += 1
    await client.is_member("seg_hidden", "c0")
    await emulator.configure({"faults": {"read": {"reset_rate": 1.0}}})
    for index in range(CALLS):
        await gate.acquire()
        tokens += 1
        with pytest.raises(TransientError):
            await client.is_member("seg_hidden", f"c{index}")
    counters = await emulator.counters()
    received = sum(counters["requests"]["read"].values())
    assert received == tokens, counters["requests"]["read"]
    assert recorder.statuses("read") == [200] + [0] * CALLS
