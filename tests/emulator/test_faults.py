"""CONTRACT.md §5 fault injection: 5xx, resets, hangs, latency, before/after the write applies."""

from __future__ import annotations

import time
import uuid
from typing import Any

import aiohttp
import pytest

from tests.emulator.helpers import (
    FAULT_ERRORS,
    Api,
    Reply,
    applied,
    members_by_id,
    new_contact,
    new_contacts,
    password_form,
    token_request,
)
from tests.support.emulator import EmulatorControl


def check_5xx(reply: Reply) -> None:
    """An injected server error: one of 500/502/503/504 with the matching error code."""
    assert reply.status in FAULT_ERRORS, (reply.status, reply.text)
    assert reply.error == FAULT_ERRORS[reply.status], reply.text


def faults(cls: str, **values: Any) -> dict[str, Any]:
    """A config patch setting fault knobs of one class."""
    return {"faults": {cls: values}}


async def test_error_rate_on_reads_gives_5xx(api: Api, emulator: EmulatorControl, seg: str) -> None:
    await emulator.configure(faults("read", error_rate=1.0))
    for _ in range(8):
        check_5xx(await api.membership(seg, new_contact()))
    counters = await emulator.counters()
    assert counters["faults"]["error"] == 8
    assert sum(counters["requests"]["read"].get(str(s), 0) for s in FAULT_ERRORS) == 8


async def test_error_rate_on_refresh_and_token(
    api: Api, emulator: EmulatorControl, http: aiohttp.ClientSession, base: str, seg: str
) -> None:
    await emulator.configure(
        {
            "faults": {"refresh": {"error_rate": 1.0}, "token": {"error_rate": 1.0}},
            "limits": {"token": {"rate": 0}},  # the fixture's token used the burst of 1
        }
    )
    check_5xx(await api.refresh(seg))
    check_5xx(await token_request(http, base, password_form()))


async def test_faults_are_per_class(api: Api, emulator: EmulatorControl, seg: str) -> None:
    await emulator.configure(faults("bulk", error_rate=1.0, after_apply_fraction=0.0))
    check_5xx(await api.bulk(seg, [new_contact()]))
    assert (await api.membership(seg, new_contact())).status == 200


async def test_rate_limit_comes_before_faults(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure(
        {
            "limits": {"bulk": {"rate": 1, "burst": 1}},
            **faults("bulk", error_rate=1.0, after_apply_fraction=0.0),
        }
    )
    check_5xx(await api.bulk(seg, [new_contact()]))
    limited = await api.bulk(seg, [new_contact()])
    assert limited.status == 429


async def test_error_before_apply_applies_nothing_and_key_runs_again(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure(faults("bulk", error_rate=1.0, after_apply_fraction=0.0))
    key = f"k-{uuid.uuid4()}"
    ids = new_contacts(3)
    check_5xx(await api.bulk(seg, ids, key=key))
    assert not await members_by_id(emulator, seg)

    await emulator.configure(faults("bulk", error_rate=0.0))
    again = await api.bulk(seg, ids, key=key)
    assert again.status == 200, again.text
    assert not again.replayed
    assert again.json["successCount"] == 3
    assert await applied(emulator, seg) == dict.fromkeys(ids, 1)


async def test_error_after_apply_stores_the_success_under_the_key(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure(faults("bulk", error_rate=1.0, after_apply_fraction=1.0))
    key = f"k-{uuid.uuid4()}"
    ids = new_contacts(3)
    check_5xx(await api.bulk(seg, ids, key=key))
    # The write went through although the client saw a server error.
    assert await applied(emulator, seg) == dict.fromkeys(ids, 1)

    await emulator.configure(faults("bulk", error_rate=0.0))
    resend = await api.bulk(seg, ids, key=key)
    assert resend.status == 200, resend.text
    assert resend.replayed
    assert resend.json == {
        "segmentId": seg,
        "successCount": 3,
        "failureCount": 0,
        "failedContacts": [],
    }
    assert await applied(emulator, seg) == dict.fromkeys(ids, 1)

    # Without the key the same ids are written twice (and the counter says so).
    no_key = await api.bulk(seg, ids)
    assert no_key.json["failureCount"] == 3
    assert {f["error"] for f in no_key.json["failedContacts"]} == {"ContactAlreadyInSegment"}
    assert (await emulator.counters())["applied_twice"] == 3


async def test_single_error_after_apply_is_replayed_as_201(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure(faults("single", error_rate=1.0, after_apply_fraction=1.0))
    key = f"k-{uuid.uuid4()}"
    contact = new_contact()
    check_5xx(await api.single(seg, contact, key=key))
    assert await applied(emulator, seg) == {contact: 1}
    await emulator.configure(
        {"faults": {"single": {"error_rate": 0.0}}, "limits": {"single": {"rate": 0}}}
    )
    resend = await api.single(seg, contact, key=key)
    assert resend.status == 201, resend.text
    assert resend.replayed
    assert resend.json == {"contactId": contact, "segmentId": seg, "status": "added"}


async def test_reset_rate_gives_a_connection_error(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure(faults("read", reset_rate=1.0))
    for _ in range(2):
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.membership(seg, new_contact(), timeout_s=10)
    assert (await emulator.counters())["faults"]["reset"] >= 2


async def test_reset_before_apply_on_a_write_applies_nothing(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure(faults("bulk", reset_rate=1.0, after_apply_fraction=0.0))
    ids = new_contacts(2)
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.bulk(seg, ids, timeout_s=10)
    assert not await members_by_id(emulator, seg)


async def test_reset_after_apply_on_a_write_applies(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure(faults("bulk", reset_rate=1.0, after_apply_fraction=1.0))
    key = f"k-{uuid.uuid4()}"
    ids = new_contacts(2)
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.bulk(seg, ids, key=key, timeout_s=10)
    assert await applied(emulator, seg) == dict.fromkeys(ids, 1)
    await emulator.configure(faults("bulk", reset_rate=0.0))
    resend = await api.bulk(seg, ids, key=key)
    assert resend.status == 200
    assert resend.replayed


async def test_hang_outlasts_the_client_timeout(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure(faults("read", hang_rate=1.0, hang_s=1.5))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await api.membership(seg, new_contact(), timeout_s=0.4)
    assert time.monotonic() - started >= 0.35
    assert (await emulator.counters())["faults"]["hang"] >= 1


async def test_hang_ends_with_the_connection_closed(
    api: Api, emulator: EmulatorControl, seg: str
) -> None:
    await emulator.configure(faults("bulk", hang_rate=1.0, hang_s=0.8, after_apply_fraction=0.0))
    ids = new_contacts(2)
    started = time.monotonic()
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.bulk(seg, ids, timeout_s=10)
    assert time.monotonic() - started >= 0.7
    assert not await members_by_id(emulator, seg)  # hung before applying


async def test_latency_is_added(api: Api, emulator: EmulatorControl, seg: str) -> None:
    await emulator.configure(faults("read", latency_ms=400))
    started = time.monotonic()
    reply = await api.membership(seg, new_contact())
    elapsed = time.monotonic() - started
    assert reply.status == 200
    assert elapsed >= 0.38, elapsed


async def test_latency_on_writes(api: Api, emulator: EmulatorControl, seg: str) -> None:
    await emulator.configure(faults("bulk", latency_ms=300))
    started = time.monotonic()
    reply = await api.bulk(seg, [new_contact()])
    assert reply.status == 200
    assert time.monotonic() - started >= 0.28


async def test_no_faults_by_default(api: Api, emulator: EmulatorControl, seg: str) -> None:
    replies = [await api.membership(seg, new_contact()) for _ in range(20)]
    assert [r.status for r in replies] == [200] * 20
    assert (await emulator.counters())["faults"] == {"error": 0, "reset": 0, "hang": 0}
