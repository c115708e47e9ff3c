"""Authentication against the real emulator process: discovery, grants, refresh, 401 handling."""

from __future__ import annotations

import asyncio
import logging

import pytest

from daemon.secrets import Secret
from scheduler.upstream import AuthError, RateLimited
from tests.cxone.conftest import MakeClient, Recorder
from tests.support.emulator import EmulatorControl
from tests.support.processes import ManagedProcess
from tests.support.waits import until

AUTH_LOGGER = "daemon.cxone.auth"


def grants_used(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        str(record.args[0])  # type: ignore[index]
        for record in caplog.records
        if record.name == AUTH_LOGGER and record.msg.startswith("token obtained via")
    ]


async def test_password_grant_with_openid_and_api_base_discovery(
    make_client: MakeClient,
    emulator: EmulatorControl,
    emulator_proc: ManagedProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="daemon.cxone")
    recorder = Recorder()
    client = await make_client(grant="password", token_url="", api_base="", on_response=recorder)
    assert await client.authenticate() == emulator_proc.url
    result = await client.bulk_add("seg_pw", ["c1", "c2"], "key-pw-1")
    assert (result.success_count, result.failure_count) == (2, 0)

    counters = await emulator.counters()
    assert counters["requests"]["token"] == {"200": 1}
    # openid-configuration, then cxone-configuration for the id_token's tenant.
    assert sum(counters["requests"]["discovery"].values()) == 2
    assert recorder.statuses("discovery") == [200, 200]
    assert recorder.statuses("token") == [200]
    assert recorder.statuses("bulk") == [200]
    assert grants_used(caplog) == ["password"]
    # Neither secret nor token material reaches the logs.
    for secret in ("segmapd-secret", "emulator-secret"):
        assert secret not in caplog.text


async def test_client_credentials_with_configured_urls(
    make_client: MakeClient, emulator: EmulatorControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="daemon.cxone")
    client = await make_client(grant="client_credentials")
    member = await client.is_member("seg_cc", "c1")
    assert member.is_member is False
    counters = await emulator.counters()
    assert counters["requests"]["token"] == {"200": 1}
    assert sum(counters["requests"].get("discovery", {}).values()) == 0
    assert grants_used(caplog) == ["client_credentials"]


async def test_scopes_are_accepted(make_client: MakeClient) -> None:
    client = await make_client(
        scopes=("customerdb:write", "segments:write", "customerdb:read", "segments:read")
    )
    assert (await client.is_member("seg_scopes", "c1")).is_member is False


async def test_wrong_client_secret_is_auth_error_without_the_secret(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client(client_secret=Secret("very-wrong-secret-42"))
    with pytest.raises(AuthError) as caught:
        await client.bulk_add("seg", ["c1"], "key-1")
    error = caught.value
    assert error.status == 401
    assert error.error == "invalid_client"
    for text in (str(error), repr(error), repr(error.details), caplog.text, repr(client)):
        assert "very-wrong-secret-42" not in text
        assert "segmapd-secret" not in text


async def test_wrong_access_key_secret_is_auth_error(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client(grant="password", access_key_secret=Secret("nope=nope"))
    with pytest.raises(AuthError) as caught:
        await client.is_member("seg", "c1")
    assert caught.value.status == 401
    assert caught.value.error == "invalid_grant"
    assert "nope=nope" not in str(caught.value) + repr(caught.value) + caplog.text


async def test_refresh_ahead_of_expiry_uses_refresh_token_grant(
    make_client: MakeClient, emulator: EmulatorControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="daemon.cxone")
    await emulator.configure({"token_ttl_s": 3})
    client = await make_client(grant="password")
    await client.is_member("seg_ttl", "c1")
    # Refresh is due at 80 % of a short lifetime (2.4 s), before the token expires at 3 s.
    await asyncio.sleep(2.6)
    await client.is_member("seg_ttl", "c1")

    # The refresh goes on behind the read (which used the token still good).
    counters = await until(
        emulator.counters,
        lambda c: c["requests"]["token"] == {"200": 2},
        timeout_s=5,
        what="the refresh",
    )
    assert counters["requests"]["read"] == {"200": 2}  # never a 401
    assert grants_used(caplog) == ["password", "refresh_token"]


async def test_a_request_past_its_tokens_refresh_time_never_waits_for_the_refresh(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    await emulator.configure({"token_ttl_s": 10})
    client = await make_client(grant="password")
    await client.is_member("seg_behind", "c1")
    # From now on the token endpoint never answers (within a minute).
    await emulator.configure({"faults": {"token": {"hang_rate": 1.0, "hang_s": 60.0}}})
    # Past the refresh time (80 % of 10 s), well before the token's last usable second.
    await asyncio.sleep(8.3)
    # Requests admitted by a rate gate go out at once with the token still good: held behind a
    # refresh, they would all go out together when it ends, past CXone's limit.
    for _ in range(3):
        result = await asyncio.wait_for(client.is_member("seg_behind", "c1"), timeout=5.0)
        assert result.is_member is False
    assert (await emulator.counters())["requests"]["read"] == {"200": 4}


async def test_expired_token_gets_401_then_one_new_token_and_one_resend(
    make_client: MakeClient, emulator: EmulatorControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="daemon.cxone")
    recorder = Recorder()
    client = await make_client(on_response=recorder)
    await client.bulk_add("seg_401", ["c1"], "key-401-1")
    await emulator.expire_tokens()
    await asyncio.sleep(1.1)  # the token endpoint allows 1 request per second
    result = await client.bulk_add("seg_401", ["c2"], "key-401-2")
    assert result.success_count == 1

    counters = await emulator.counters()
    assert counters["requests"]["bulk"] == {"200": 2, "401": 1}
    assert counters["requests"]["token"] == {"200": 2}
    assert recorder.statuses("bulk") == [200, 401, 200]
    assert grants_used(caplog) == ["client_credentials", "refresh_token"]


async def test_token_endpoint_429_is_rate_limited_and_honoured(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    client = await make_client()
    await client.is_member("seg_t429", "c1")
    await emulator.expire_tokens()
    # The token bucket (1/s) is still empty: the new token request is refused with 429.
    with pytest.raises(RateLimited) as caught:
        await client.is_member("seg_t429", "c1")
    assert caught.value.retry_after_s >= 1.0
    assert caught.value.details["endpoint"] == "token"
    # Within Retry-After the client does not ask again.
    with pytest.raises(RateLimited):
        await client.is_member("seg_t429", "c1")
    assert (await emulator.counters())["requests"]["token"] == {"200": 1, "429": 1}

    await asyncio.sleep(caught.value.retry_after_s + 0.1)
    assert (await client.is_member("seg_t429", "c1")).is_member is False


async def test_refresh_token_refused_falls_back_to_primary_grant(
    make_client: MakeClient, emulator: EmulatorControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="daemon.cxone")
    client = await make_client(grant="password")
    await client.is_member("seg_fb", "c1")
    # Forget every token (access and refresh); lift the token limit for the two grants in a row.
    await emulator.reset(config=False)
    await emulator.configure({"limits": {"token": {"rate": 0, "burst": 1}}})
    assert (await client.is_member("seg_fb", "c1")).is_member is False

    counters = await emulator.counters()
    assert counters["requests"]["token"] == {"400": 1, "200": 1}
    assert grants_used(caplog) == ["password", "password"]


async def test_concurrent_callers_share_one_token_fetch(
    make_client: MakeClient, emulator: EmulatorControl
) -> None:
    client = await make_client()
    results = await asyncio.gather(*(client.is_member("seg_sf", f"c{i}") for i in range(20)))
    assert all(not result.is_member for result in results)
    counters = await emulator.counters()
    assert counters["requests"]["token"] == {"200": 1}
    assert counters["requests"]["read"] == {"200": 20}
