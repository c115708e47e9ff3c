"""Shared helpers for the emulator contract tests: credentials, tokens, API calls, polling."""

from __future__ import annotations

import asyncio
import base64
import enum
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from tests.support.emulator import EmulatorControl

T = TypeVar("T")

# The emulator's default credentials (docs/emulator.md, "Default credentials").
TENANT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_ID = "segmapd"
CLIENT_SECRET = "segmapd-secret"
ACCESS_KEY_ID = "emulator-key"
ACCESS_KEY_SECRET = "emulator-secret="
SCOPES = "customerdb:write segments:write customerdb:read segments:read"

# Injected 5xx statuses and the error code each one carries.
FAULT_ERRORS = {
    500: "InternalError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


class _Own(enum.Enum):
    """Marker: use the client's own token."""

    TOKEN = 0


OWN_TOKEN = _Own.TOKEN


@dataclass(frozen=True)
class Reply:
    """One HTTP answer, fully read."""

    status: int
    headers: Mapping[str, str]
    text: str

    @property
    def json(self) -> Any:
        """The body parsed as JSON (fails the test if it is not JSON)."""
        try:
            return json.loads(self.text)
        except ValueError as exc:
            raise AssertionError(f"not JSON ({self.status}): {self.text[:200]!r}") from exc

    def is_json(self) -> bool:
        """Whether the body parses as JSON."""
        try:
            json.loads(self.text)
        except ValueError:
            return False
        return True

    @property
    def error(self) -> str | None:
        """The `error` code of a JSON error body, if any."""
        body = self.json
        return body.get("error") if isinstance(body, dict) else None

    @property
    def replayed(self) -> bool:
        """Whether the answer is marked as an idempotent replay."""
        return self.headers.get("Idempotent-Replayed", "").lower() == "true"

    def retry_after(self) -> int:
        """The Retry-After header as whole seconds (fails if absent or not an integer)."""
        value = self.headers.get("Retry-After")
        assert value is not None, f"no Retry-After on {self.status}"
        assert value.strip().isdigit(), f"Retry-After is not whole seconds: {value!r}"
        return int(value)


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    data: bytes | str | Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    skip_auto_headers: tuple[str, ...] = (),
) -> Reply:
    """Send one request and read the whole answer."""
    options: dict[str, Any] = {"headers": dict(headers or {}), "data": data}
    if timeout_s is not None:
        options["timeout"] = aiohttp.ClientTimeout(total=timeout_s)
    if skip_auto_headers:
        options["skip_auto_headers"] = skip_auto_headers
    async with session.request(method, url, **options) as response:
        text = await response.text()
        return Reply(response.status, response.headers, text)


def basic_auth(client_id: str = CLIENT_ID, client_secret: str = CLIENT_SECRET) -> str:
    """An `Authorization: Basic` value for the client credentials."""
    raw = f"{client_id}:{client_secret}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


async def discover_token_endpoint(session: aiohttp.ClientSession, base: str) -> str:
    """The token endpoint named by OpenID discovery."""
    reply = await send(session, "GET", base + "/.well-known/openid-configuration")
    assert reply.status == 200, reply
    endpoint: str = reply.json["token_endpoint"]
    return endpoint


async def token_request(
    session: aiohttp.ClientSession,
    base: str,
    form: Mapping[str, str],
    *,
    client_id: str = CLIENT_ID,
    client_secret: str = CLIENT_SECRET,
    basic: bool = True,
) -> Reply:
    """POST a form (URL-encoded by aiohttp, so `=` in secrets becomes %3D) to the token endpoint."""
    headers = {"Accept": "application/json"}
    if basic:
        headers["Authorization"] = basic_auth(client_id, client_secret)
    return await send(session, "POST", base + "/auth/token", headers=headers, data=dict(form))


def password_form(
    key_id: str = ACCESS_KEY_ID, key_secret: str = ACCESS_KEY_SECRET, **extra: str
) -> dict[str, str]:
    """A `password` grant form for an access key."""
    return {"grant_type": "password", "username": key_id, "password": key_secret, **extra}


async def fetch_token(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    """A fresh token response from the default password grant (must succeed)."""
    reply = await token_request(session, base, password_form())
    assert reply.status == 200, f"token request failed: {reply.status} {reply.text}"
    body: dict[str, Any] = reply.json
    return body


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and payload of a JWT (signature not checked)."""
    parts = token.split(".")
    assert len(parts) == 3, f"not a JWT: {token[:40]!r}"

    def part(segment: str) -> dict[str, Any]:
        padded = segment + "=" * (-len(segment) % 4)
        decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
        return decoded

    return part(parts[0]), part(parts[1])


def new_segment() -> str:
    """A segment id not used by any other test."""
    return f"seg_{uuid.uuid4().hex[:16]}"


def new_contact() -> str:
    """A contact id in the guide's `contact_<uuid>` form."""
    return f"contact_{uuid.uuid4()}"


def new_contacts(count: int) -> list[str]:
    """`count` distinct contact ids."""
    return [new_contact() for _ in range(count)]


class Api:
    """An authenticated client of the emulator's CXone API (`/api/v2/...`)."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        self.session = session
        self.base = base
        self.token = token

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        raw: bytes | None = None,
        content_type: str | None = "application/json",
        accept: str | None = "application/json",
        token: str | _Own | None = OWN_TOKEN,
        key: str | None = None,
        timeout_s: float | None = None,
        base: str | None = None,
    ) -> Reply:
        """Send one API call; `body` is JSON-encoded, `raw` is sent as is."""
        headers: dict[str, str] = {}
        skip: tuple[str, ...] = ()
        if accept is None:
            skip = ("Accept",)
        else:
            headers["Accept"] = accept
        bearer = self.token if token is OWN_TOKEN else token
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        if key is not None:
            headers["Idempotency-Key"] = key
        data: bytes | None = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None and content_type is not None:
            headers["Content-Type"] = content_type
        elif content_type is None:
            # Otherwise aiohttp adds application/octet-stream to a bytes body.
            skip = (*skip, "Content-Type")
        return await send(
            self.session,
            method,
            (base or self.base) + path,
            headers=headers,
            data=data,
            timeout_s=timeout_s,
            skip_auto_headers=skip,
        )

    async def write(self, segment: str, body: Any, **kwargs: Any) -> Reply:
        """POST a body (array = bulk, object = single) to a segment's contacts."""
        return await self.call("POST", f"/api/v2/segments/{segment}/contacts", body=body, **kwargs)

    async def bulk(self, segment: str, ids: list[str], **kwargs: Any) -> Reply:
        """A bulk write of these ids."""
        return await self.write(segment, ids, **kwargs)

    async def single(self, segment: str, contact_id: str, **kwargs: Any) -> Reply:
        """A single-contact write."""
        return await self.write(segment, {"contactId": contact_id}, **kwargs)

    async def remove_bulk(self, segment: str, ids: Any, **kwargs: Any) -> Reply:
        """DELETE a body (normally an array of ids) from a segment's contacts."""
        return await self.call("DELETE", f"/api/v2/segments/{segment}/contacts", body=ids, **kwargs)

    async def remove_single(self, segment: str, contact_id: str, **kwargs: Any) -> Reply:
        """DELETE one contact from a segment (the member path)."""
        return await self.call(
            "DELETE", f"/api/v2/segments/{segment}/contacts/{contact_id}", **kwargs
        )

    async def membership(self, segment: str, contact_id: str, **kwargs: Any) -> Reply:
        """The membership check of one contact."""
        return await self.call("GET", f"/api/v2/segments/{segment}/contacts/{contact_id}", **kwargs)

    async def refresh(self, segment: str, **kwargs: Any) -> Reply:
        """Ask for a segment refresh."""
        return await self.call("POST", f"/api/v2/segments/{segment}/refresh", **kwargs)

    async def is_member(self, segment: str, contact_id: str) -> bool:
        """Whether the membership check says the contact is a member (must answer 200)."""
        reply = await self.membership(segment, contact_id)
        assert reply.status == 200, f"membership check: {reply.status} {reply.text}"
        return bool(reply.json["isMember"])

    async def wait_member(
        self, segment: str, contact_id: str, timeout_s: float, interval_s: float = 0.05
    ) -> float:
        """Poll until the contact is a visible member; return the seconds it took."""
        started = time.monotonic()

        async def check() -> bool:
            return await self.is_member(segment, contact_id)

        await poll_until(check, timeout_s, interval_s, what=f"{contact_id} visible in {segment}")
        return time.monotonic() - started

    async def wait_absent(
        self, segment: str, contact_id: str, timeout_s: float, interval_s: float = 0.05
    ) -> float:
        """Poll until reads say the contact is not a member; return the seconds it took."""
        started = time.monotonic()

        async def check() -> bool:
            return not await self.is_member(segment, contact_id)

        await poll_until(check, timeout_s, interval_s, what=f"{contact_id} gone from {segment}")
        return time.monotonic() - started


async def poll_until(
    probe: Callable[[], Awaitable[T]],
    timeout_s: float,
    interval_s: float = 0.05,
    *,
    what: str = "condition",
) -> T:
    """Call `probe` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(interval_s)


async def members_by_id(control: EmulatorControl, segment: str) -> dict[str, dict[str, Any]]:
    """A segment's members keyed by contact id; empty if the emulator does not know the segment."""
    url = f"{control.url}/_emulator/segments/{segment}/members"
    async with control.session.get(url) as response:
        if response.status == 404:
            return {}
        payload = await response.json()
        assert response.status == 200, f"members of {segment}: {response.status} {payload}"
    return {member["contactId"]: member for member in payload["members"]}


async def list_segments(control: EmulatorControl) -> list[dict[str, Any]]:
    """The emulator's segments listing."""
    async with control.session.get(f"{control.url}/_emulator/segments") as response:
        payload = await response.json()
        assert response.status == 200, payload
    segments: list[dict[str, Any]] = payload["segments"]
    return segments


async def applied(control: EmulatorControl, segment: str) -> dict[str, int]:
    """How often each member of a segment was applied by a non-replayed request."""
    return {cid: int(m["applied"]) for cid, m in (await members_by_id(control, segment)).items()}


async def fast_indexing(
    control: EmulatorControl, median_s: float = 0.05, p99_s: float = 0.2, stall: float = 0.0
) -> None:
    """Make writes visible quickly (and never stall unless asked)."""
    await control.configure(
        {"indexing": {"median_s": median_s, "p99_s": p99_s, "stall_fraction": stall}}
    )


async def unlimited(control: EmulatorControl, *classes: str) -> None:
    """Lift the rate limit of these classes (`rate = 0`)."""
    await control.configure({"limits": {name: {"rate": 0} for name in classes}})
