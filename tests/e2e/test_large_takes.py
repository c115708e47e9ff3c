"""Large deliveries taken at once share the event loop: one slice per turn between them."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

from daemon.intake import take_mappings
from daemon.service import Service
from tests.e2e.conftest import in_process_config
from tests.support.emulator import EmulatorControl


async def test_two_large_deliveries_taken_at_once_run_one_slice_per_turn_of_the_loop(
    emulator: EmulatorControl, tmp_path: Path
) -> None:
    # Two bodies of 1,000 events x 40 segments (40,000 assignments each), taken at once by a
    # real service (SQLite journal, the emulator as CXone): each is taken in many slices, and
    # no turn of the event loop runs a slice of both, so that a request arriving meanwhile
    # waits for one slice at most.
    config = in_process_config(emulator, tmp_path, overrides={"server": {"high_water": 1_000_000}})
    service = Service(config)
    await service.start()
    loop = asyncio.get_running_loop()
    turn = 0
    counting = True

    def next_turn() -> None:
        # Scheduled again from within a turn, it runs once in each turn after it.
        nonlocal turn
        turn += 1
        if counting:
            loop.call_soon(next_turn)

    takes_in_turn: dict[int, set[str]] = defaultdict(set)
    submit = service.engine.submit

    def recording_submit(change: Any, *args: Any, **kwargs: Any) -> Any:
        takes_in_turn[turn].add(change.contact_id[0])
        return submit(change, *args, **kwargs)

    try:
        service.engine.submit = recording_submit  # type: ignore[method-assign]
        bodies = [
            orjson.dumps(
                [
                    {"contactId": f"{body}{i:05d}", "add": [f"S{k:02d}" for k in range(40)]}
                    for i in range(1_000)
                ]
            )
            for body in "AB"
        ]
        loop.call_soon(next_turn)
        taken = await asyncio.gather(*(take_mappings(service, body) for body in bodies))
        counting = False
    finally:
        counting = False
        await service.stop()
    assert [mapped.total.queued for mapped in taken] == [40_000, 40_000]
    turns_of = {body: [t for t, takes in takes_in_turn.items() if body in takes] for body in "AB"}
    assert len(turns_of["A"]) > 3 and len(turns_of["B"]) > 3, turns_of
    both = [t for t, takes in takes_in_turn.items() if len(takes) > 1]
    assert not both, f"turns running a slice of both deliveries: {both[:10]}"
