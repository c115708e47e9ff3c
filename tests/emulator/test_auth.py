"""CONTRACT.md §1: discovery, token grants, refresh rotation, tenant discovery, API auth."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.emulator.helpers import (
    ACCESS_KEY_ID,
    ACCESS_KEY_SECRET,
    CLIENT_ID,
    CLIENT_SECRET,
    SCOPES,
    TENANT_ID,
    Api,
    basic_auth,
    decode_jwt,
    discover_token_endpoint,
    fetch_token,
    members_by_id,
    new_contact,
    password_form,
    send,
    token_request,
    unlimited,
)
from tests.support.emulator import EmulatorControl


@pytest.fixture
async def tokens_unlimited(emulator: EmulatorControl) -> EmulatorControl:
    """The emulator with the token endpoint's rate limit lifted (these tests fetch many)."""
    await unlimited(emulator, "token")
    return emulator


async def test_openid_discovery_names_the_token_endpoint(
    emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    reply = await send(http, "GET", base + "/.well-known/openid-configuration")
    assert reply.status == 200
    body = reply.json
    assert body["token_endpoint"] == base + "/auth/token"
    assert "issuer" in body
    # The discovered endpoint is the one that issues tokens.
    endpoint = await discover_token_endpoint(http, base)
    issued = await send(
        http,
        "POST",
        endpoint,
        headers={"Authorization": basic_auth(), "Accept": "application/json"},
        data=password_form(),
    )
    assert issued.status == 200, issued.text


async def test_password_grant_with_basic_auth_and_url_encoded_secret(
    emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    assert "=" in ACCESS_KEY_SECRET  # the form encoder must turn it into %3D
    reply = await token_request(http, base, password_form())
    assert reply.status == 200, reply.text
    body = reply.json
    assert body["token_type"] == "Bearer"
    assert isinstance(body["access_token"], str) and body["access_token"]
    assert isinstance(body["refresh_token"], str) and body["refresh_token"]
    assert isinstance(body["id_token"], str) and body["id_token"]
    assert 3500 <= body["expires_in"] <= 3600
    assert "scope" in body
    api = Api(http, base, body["access_token"])
    assert (await api.membership("seg_auth", new_contact())).status == 200


async def test_password_grant_accepts_client_credentials_in_the_form(
    tokens_unlimited: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    form = password_form(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    reply = await token_request(http, base, form, basic=False)
    assert reply.status == 200, reply.text
    assert reply.json["token_type"] == "Bearer"


async def test_scope_parameter_is_accepted(
    emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    reply = await token_request(http, base, password_form(scope=SCOPES))
    assert reply.status == 200, reply.text
    assert isinstance(reply.json["scope"], str)
    api = Api(http, base, reply.json["access_token"])
    assert (await api.membership("seg_scope", new_contact())).status == 200


@pytest.mark.parametrize(
    ("client_secret", "key_id", "key_secret", "error"),
    [
        ("wrong-secret", ACCESS_KEY_ID, ACCESS_KEY_SECRET, "invalid_client"),
        (CLIENT_SECRET, ACCESS_KEY_ID, "emulator-secret", "invalid_grant"),
        (CLIENT_SECRET, "other-key", ACCESS_KEY_SECRET, "invalid_grant"),
    ],
    ids=["wrong-client-secret", "wrong-access-key-secret", "wrong-access-key-id"],
)
async def test_wrong_credentials_get_401(
    tokens_unlimited: EmulatorControl,
    http: aiohttp.ClientSession,
    base: str,
    client_secret: str,
    key_id: str,
    key_secret: str,
    error: str,
) -> None:
    reply = await token_request(
        http, base, password_form(key_id, key_secret), client_secret=client_secret
    )
    assert reply.status == 401, reply.text
    assert reply.error == error
    assert "access_token" not in reply.json
    # Secrets are never echoed back in errors.
    for secret in (client_secret, key_secret):
        assert secret not in reply.text


async def test_missing_client_auth_gets_401(
    tokens_unlimited: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    reply = await token_request(http, base, password_form(), basic=False)
    assert reply.status == 401, reply.text
    assert reply.error == "invalid_client"


async def test_client_credentials_grant_gives_a_working_token(
    emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    reply = await token_request(http, base, {"grant_type": "client_credentials"})
    assert reply.status == 200, reply.text
    assert reply.json["token_type"] == "Bearer"
    api = Api(http, base, reply.json["access_token"])
    write = await api.bulk("seg_cc", [new_contact()])
    assert write.status == 200, write.text


async def test_client_credentials_with_wrong_secret_get_401(
    emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    reply = await token_request(
        http, base, {"grant_type": "client_credentials"}, client_secret="nope"
    )
    assert reply.status == 401
    assert reply.error == "invalid_client"


async def test_unsupported_grant_type_gets_400(
    emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    reply = await token_request(http, base, {"grant_type": "authorization_code", "code": "x"})
    assert reply.status == 400
    assert reply.error == "unsupported_grant_type"


async def test_refresh_token_grant_rotates(
    tokens_unlimited: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    first = await fetch_token(http, base)
    refreshed = await token_request(
        http, base, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert refreshed.status == 200, refreshed.text
    second = refreshed.json
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert second["token_type"] == "Bearer"
    api = Api(http, base, second["access_token"])
    assert (await api.membership("seg_refresh", new_contact())).status == 200

    # The used refresh token is spent.
    again = await token_request(
        http, base, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert again.status == 400, again.text
    assert again.error == "invalid_grant"

    # The new one works, once.
    third = await token_request(
        http, base, {"grant_type": "refresh_token", "refresh_token": second["refresh_token"]}
    )
    assert third.status == 200, third.text


async def test_unknown_refresh_token_gets_invalid_grant(
    emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    reply = await token_request(
        http, base, {"grant_type": "refresh_token", "refresh_token": "not-a-refresh-token"}
    )
    assert reply.status == 400
    assert reply.error == "invalid_grant"


async def test_refresh_token_needs_client_auth(
    tokens_unlimited: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    first = await fetch_token(http, base)
    reply = await token_request(
        http,
        base,
        {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
        client_secret="wrong",
    )
    assert reply.status == 401
    assert reply.error == "invalid_client"


async def test_id_token_carries_tenant_and_tenant_discovery_gives_a_working_api_endpoint(
    emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    token = await fetch_token(http, base)
    header, payload = decode_jwt(token["id_token"])
    assert header.get("alg") == "HS256"
    assert payload["tenantId"] == TENANT_ID
    for claim in ("iss", "sub", "aud", "iat", "exp"):
        assert claim in payload, claim
    assert payload["exp"] > payload["iat"]

    reply = await send(
        http,
        "GET",
        f"{base}/.well-known/cxone-configuration?tenantId={payload['tenantId']}",
        headers={"Accept": "application/json"},
    )
    assert reply.status == 200, reply.text
    config = reply.json
    assert config["tenantId"] == TENANT_ID
    assert config["api_endpoint"].startswith("http")
    for field in ("area", "domain"):
        assert field in config

    api = Api(http, config["api_endpoint"].rstrip("/"), token["access_token"])
    contact = new_contact()
    assert (await api.bulk("seg_discovered", [contact])).status == 200
    check = await api.membership("seg_discovered", contact)
    assert check.status == 200
    assert check.json["contactId"] == contact


async def test_tenant_discovery_of_unknown_tenant_is_404(
    emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    reply = await send(
        http,
        "GET",
        f"{base}/.well-known/cxone-configuration?tenantId=00000000-0000-0000-0000-000000000000",
    )
    assert reply.status == 404


async def test_api_call_without_token_is_401(api: Api) -> None:
    reply = await api.membership("seg_noauth", new_contact(), token=None)
    assert reply.status == 401
    assert reply.error == "Unauthorized"
    assert reply.headers.get("WWW-Authenticate", "").startswith("Bearer")


async def test_write_without_token_is_401_and_not_applied(
    api: Api, emulator: EmulatorControl
) -> None:
    contact = new_contact()
    reply = await api.bulk("seg_noauth_w", [contact], token=None)
    assert reply.status == 401
    assert reply.error == "Unauthorized"
    assert contact not in await members_by_id(emulator, "seg_noauth_w")


async def test_api_call_with_garbage_token_is_401(api: Api) -> None:
    reply = await api.membership("seg_garbage", new_contact(), token="garbage.token.value")
    assert reply.status == 401
    assert reply.error == "Unauthorized"


async def test_expired_token_via_control_api_is_401_then_new_token_works(
    api: Api, emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    contact = new_contact()
    assert (await api.membership("seg_exp", contact)).status == 200
    await emulator.expire_tokens()
    reply = await api.membership("seg_exp", contact)
    assert reply.status == 401
    assert reply.error == "Unauthorized"
    await unlimited(emulator, "token")
    fresh = await fetch_token(http, base)
    assert (await api.membership("seg_exp", contact, token=fresh["access_token"])).status == 200


async def test_refresh_token_still_works_after_access_tokens_expire(
    api: Api, emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    await unlimited(emulator, "token")
    token = await fetch_token(http, base)
    await emulator.expire_tokens()
    assert (await api.membership("seg_x", new_contact(), token=token["access_token"])).status == 401
    reply = await token_request(
        http, base, {"grant_type": "refresh_token", "refresh_token": token["refresh_token"]}
    )
    assert reply.status == 200, reply.text
    new = reply.json["access_token"]
    assert (await api.membership("seg_x", new_contact(), token=new)).status == 200


async def test_short_token_ttl_expires(
    emulator: EmulatorControl, http: aiohttp.ClientSession, base: str
) -> None:
    await emulator.configure({"token_ttl_s": 1})
    token = await fetch_token(http, base)
    assert token["expires_in"] <= 1
    api = Api(http, base, token["access_token"])
    contact = new_contact()
    assert (await api.membership("seg_ttl", contact)).status == 200
    started = time.monotonic()
    while time.monotonic() - started < 5:
        await asyncio.sleep(0.25)
        reply = await api.membership("seg_ttl", contact)
        if reply.status == 401:
            break
    assert reply.status == 401, "a 1 s token still worked after 5 s"
    assert time.monotonic() - started >= 0.5


@pytest.mark.parametrize("accept", ["application/json", "application/*", "*/*"])
async def test_accept_admitting_json_is_served(api: Api, accept: str) -> None:
    reply = await api.membership("seg_accept", new_contact(), accept=accept)
    assert reply.status == 200
    assert reply.headers.get("Content-Type", "").startswith("application/json")


async def test_accept_not_admitting_json_gets_a_non_json_error(api: Api) -> None:
    reply = await api.membership("seg_accept", new_contact(), accept="text/html")
    assert reply.status == 406
    assert not reply.is_json()
    assert not reply.headers.get("Content-Type", "").startswith("application/json")


async def test_missing_accept_gets_a_non_json_error(api: Api) -> None:
    # CONTRACT §1: every API call must send `Accept: application/json`; CXone answers otherwise
    # with a non-JSON error. docs/emulator.md: "They need an Accept header that admits JSON".
    reply = await api.membership("seg_accept", new_contact(), accept=None)
    assert reply.status == 406, reply.text
    assert not reply.is_json()


async def test_write_without_accept_json_is_406_and_not_applied(
    api: Api, emulator: EmulatorControl
) -> None:
    contact = new_contact()
    reply = await api.bulk("seg_accept_w", [contact], accept="text/plain")
    assert reply.status == 406
    assert not reply.is_json()
    assert contact not in await members_by_id(emulator, "seg_accept_w")
