"""CXone authentication: OpenID discovery, token grants, refresh ahead of expiry, API base.

One `TokenManager` serves every call of a client. Concurrent callers share a single token fetch
(a lock plus a re-check), a token is refreshed before it expires, and a token that drew a 401 is
dropped so that the next caller fetches a new one. Tokens and secrets are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson

from daemon.cxone.settings import CXoneSettings
from daemon.cxone.transport import Response, ResponseHook, parse_retry_after, send
from scheduler.ratelimit import AdmissionGate
from scheduler.upstream import AuthError, PermanentError, RateLimited, TransientError

logger = logging.getLogger(__name__)

DEFAULT_EXPIRES_IN_S = 3600.0
# Refresh 60 s before expiry; a token shorter-lived than 5 min at 80 % of its lifetime instead.
REFRESH_MARGIN_S = 60.0
REFRESH_FRACTION = 0.8
# After a failed refresh while the old token is still good, wait this long before trying again.
REFRESH_BACKOFF_S = 5.0
# A still-valid token is used through a failed refresh only if it has this much life left.
MIN_REMAINING_S = 1.0

FORM = "application/x-www-form-urlencoded"


@dataclass(slots=True)
class _Token:
    """An access token and when to stop using it; `repr` shows no token material."""

    access: str = field(repr=False)
    refresh: str | None = field(repr=False)
    tenant_id: str | None
    expires_at: float
    refresh_at: float


def _tenant_from_id_token(id_token: str) -> str | None:
    """Return the `tenantId` claim of a JWT, read without verifying it.

    The id_token arrives over TLS straight from the token endpoint we chose, and we only use the
    claim to find our own API base, so verification adds nothing here.
    """
    parts = id_token.split(".")
    if len(parts) < 2:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    tenant = claims.get("tenantId") if isinstance(claims, dict) else None
    return tenant if isinstance(tenant, str) and tenant else None


def _error_code(response: Response) -> str:
    payload = response.json()
    if isinstance(payload, dict):
        code = payload.get("error")
        if isinstance(code, str):
            return code
    return ""


class TokenManager:
    """Gets, caches and refreshes the bearer token and discovers the API base.

    `session` is the client's shared session; the manager never closes it.
    """

    def __init__(
        self,
        settings: CXoneSettings,
        session: aiohttp.ClientSession,
        *,
        on_response: ResponseHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        gate: AdmissionGate | None = None,
    ) -> None:
        self._settings = settings
        # The token endpoint's own budget (shared by instances on one journal): a fetch waits
        # for it rather than drawing a 429 when several instances start at once.
        self._gate = gate
        self._session = session
        self._hook = on_response
        self._clock = clock
        self._token: _Token | None = None
        self._token_url = settings.token_url
        self._api_base = settings.api_base
        self._lock = asyncio.Lock()
        self._discovery_lock = asyncio.Lock()
        # No token request before this time: the token endpoint answered 429 with Retry-After.
        self._not_before = 0.0
        # No early refresh before this time, after one failed while the current token is good.
        self._soft_retry_at = 0.0
        # A refresh of a token still good, under way without holding any request.
        self._refresh_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "none" if self._token is None else "held"
        return f"TokenManager(grant={self._settings.grant!r}, token={state})"

    async def access_token(self) -> str:
        """Return a bearer token that is good for a while, fetching or refreshing one when needed.

        Raises `AuthError` when credentials are refused, `RateLimited` when the token endpoint
        says 429 and no usable token is held, `TransientError` when it cannot be reached.
        """
        token = self._token
        if token is not None:
            now = self._clock()
            if now < token.refresh_at:
                return token.access
            if now < token.expires_at - MIN_REMAINING_S:
                # Due for a refresh but still good: refreshed in the background. A request
                # holding here would go out after its rate gate admitted it, with every other
                # one admitted meanwhile, at once (the token endpoint may make it wait).
                self._refresh_behind()
                return token.access
        return await self._refresh_under_lock()

    async def _refresh_under_lock(self) -> str:
        """`access_token`'s fetch: one at a time, re-checked once the lock is held."""
        async with self._lock:
            # Another caller may have fetched a token while this one waited for the lock.
            token = self._token
            now = self._clock()
            if token is not None and now < token.refresh_at:
                return token.access
            usable = token is not None and now < token.expires_at - MIN_REMAINING_S
            if token is not None and usable and now < self._soft_retry_at:
                return token.access
            if now < self._not_before:
                if token is not None and usable:
                    return token.access
                raise RateLimited(
                    "token endpoint asked to wait",
                    status=429,
                    error="TooManyRequests",
                    retry_after_s=self._not_before - now,
                    details={"endpoint": "token"},
                )
            try:
                if self._gate is not None:
                    await self._gate.acquire()
                self._token = await self._obtain(token)
            except (TransientError, RateLimited) as exc:
                if token is None or not usable:
                    raise
                # Refreshing early is a courtesy: keep the current token while it lasts.
                self._soft_retry_at = now + REFRESH_BACKOFF_S
                logger.warning("token refresh failed (%s); using the current token meanwhile", exc)
                return token.access
            return self._token.access

    def _refresh_behind(self) -> None:
        """Start one background refresh of a token that is still good (unless one runs)."""
        task = self._refresh_task
        if task is not None and not task.done():
            return
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        """Refresh now, holding no request; the current token serves until it is replaced."""
        try:
            await self._refresh_under_lock()
        except Exception as exc:  # refused, or unreachable: the next request past refresh tries
            logger.warning("token refresh failed (%s); using the current token meanwhile", exc)

    def invalidate(self, access_token: str) -> None:
        """Drop `access_token` after a 401, unless a newer token has already replaced it."""
        token = self._token
        if token is not None and token.access == access_token:
            token.refresh_at = float("-inf")
            token.expires_at = float("-inf")

    async def api_base(self) -> str:
        """Return the API base URL: configured, or discovered from the id_token's `tenantId`."""
        if self._api_base:
            return self._api_base
        async with self._discovery_lock:
            if self._api_base:
                return self._api_base
            await self.access_token()
            tenant = self._token.tenant_id if self._token is not None else None
            if not tenant:
                raise PermanentError(
                    "cannot discover the API base: the id_token has no tenantId claim; "
                    "set cxone.api_base",
                    error="DiscoveryFailed",
                    details={"endpoint": "discovery"},
                )
            url = (
                f"{self._settings.issuer}/.well-known/cxone-configuration"
                f"?tenantId={quote(tenant, safe='')}"
            )
            payload = await self._discover(url)
            endpoint = payload.get("api_endpoint")
            if not isinstance(endpoint, str) or not endpoint:
                raise PermanentError(
                    "cxone-configuration has no api_endpoint",
                    error="DiscoveryFailed",
                    details={"endpoint": "discovery"},
                )
            self._api_base = endpoint.rstrip("/")
            logger.info("discovered CXone API base %s for tenant %s", self._api_base, tenant)
            return self._api_base

    async def _token_endpoint(self) -> str:
        if self._token_url:
            return self._token_url
        # Called only under self._lock, so discovery runs once.
        url = f"{self._settings.issuer}/.well-known/openid-configuration"
        payload = await self._discover(url)
        endpoint = payload.get("token_endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise PermanentError(
                "openid-configuration has no token_endpoint",
                error="DiscoveryFailed",
                details={"endpoint": "discovery"},
            )
        self._token_url = endpoint
        logger.info("discovered CXone token endpoint %s", endpoint)
        return endpoint

    async def _discover(self, url: str) -> dict[str, Any]:
        response = await send(
            self._session,
            "discovery",
            "GET",
            url,
            headers={"Accept": "application/json"},
            timeout_s=self._settings.timeout_s,
            hook=self._hook,
        )
        payload = response.json()
        if response.status == 200 and isinstance(payload, dict):
            return payload
        retryable = response.status >= 500 or response.status == 429
        kind = TransientError if retryable else PermanentError
        raise kind(
            "discovery request failed",
            status=response.status,
            error=_error_code(response) or "DiscoveryFailed",
            retry_after_s=parse_retry_after(response.headers.get("Retry-After"), 0.0),
            details={"endpoint": "discovery"},
        )

    async def _obtain(self, current: _Token | None) -> _Token:
        if current is not None and current.refresh:
            try:
                return await self._grant("refresh_token", {"refresh_token": current.refresh})
            except AuthError as exc:
                # Refresh tokens are single-use and may be revoked; the primary grant still works.
                logger.info(
                    "refresh token refused (%s); using the %s grant",
                    exc.error,
                    self._settings.grant,
                )
        settings = self._settings
        form: dict[str, str] = {}
        if settings.grant == "password":
            form = {
                "username": settings.access_key_id,
                "password": settings.access_key_secret.reveal(),
            }
        return await self._grant(settings.grant, form)

    async def _grant(self, grant_type: str, form: dict[str, str]) -> _Token:
        settings = self._settings
        fields = {"grant_type": grant_type, **form}
        if settings.scopes and grant_type != "refresh_token":
            fields["scope"] = " ".join(settings.scopes)
        credentials = f"{settings.client_id}:{settings.client_secret.reveal()}"
        headers = {
            "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode("ascii"),
            "Accept": "application/json",
            "Content-Type": FORM,
        }
        url = await self._token_endpoint()
        started = self._clock()
        # urlencode quotes '=' and '+' in access keys, which the form body needs.
        response = await send(
            self._session,
            "token",
            "POST",
            url,
            headers=headers,
            data=urlencode(fields).encode("ascii"),
            timeout_s=settings.timeout_s,
            hook=self._hook,
        )
        code = _error_code(response)
        status = response.status
        if status == 429:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            self._not_before = self._clock() + retry_after
            raise RateLimited(
                "token endpoint rate limit",
                status=429,
                error=code or "TooManyRequests",
                retry_after_s=retry_after,
                details={"endpoint": "token"},
            )
        if status >= 500:
            raise TransientError(
                "token endpoint failed",
                status=status,
                error=code,
                details={"endpoint": "token"},
            )
        payload = response.json()
        if status != 200:
            logger.warning("token request (%s grant) refused: %d %s", grant_type, status, code)
            raise AuthError(
                f"token request ({grant_type} grant) refused",
                status=status,
                error=code,
                details={"endpoint": "token"},
            )
        access = payload.get("access_token") if isinstance(payload, dict) else None
        if not isinstance(payload, dict) or not isinstance(access, str) or not access:
            raise AuthError(
                "token endpoint answered without an access_token",
                status=status,
                error="InvalidTokenResponse",
                details={"endpoint": "token"},
            )
        expires_in = payload.get("expires_in", DEFAULT_EXPIRES_IN_S)
        if not isinstance(expires_in, int | float) or expires_in <= 0:
            expires_in = DEFAULT_EXPIRES_IN_S
        refresh = payload.get("refresh_token")
        id_token = payload.get("id_token")
        tenant = _tenant_from_id_token(id_token) if isinstance(id_token, str) else None
        if tenant is None and self._token is not None:
            tenant = self._token.tenant_id  # refresh answers may omit the id_token
        lifetime = float(expires_in)
        logger.debug("token obtained via %s grant, expires in %.0f s", grant_type, lifetime)
        return _Token(
            access=access,
            refresh=refresh if isinstance(refresh, str) and refresh else None,
            tenant_id=tenant,
            # Measured from the request start: the token was minted no earlier than that.
            expires_at=started + lifetime,
            refresh_at=started + max(REFRESH_FRACTION * lifetime, lifetime - REFRESH_MARGIN_S),
        )
