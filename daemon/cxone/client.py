"""`HttpCXoneClient`: the engine's `CXoneClient` over HTTP, one attempt per call.

Every call makes one request (plus one resend with a new token after a 401) and turns the answer
into a result or a classified `UpstreamError`; retries and rate limiting belong to the engine.
"""

from __future__ import annotations

import logging
import math
from types import TracebackType
from typing import Any, Self

import aiohttp
import orjson

from daemon.cxone.auth import TokenManager
from daemon.cxone.settings import CXoneSettings
from daemon.cxone.transport import Response, ResponseHook, parse_retry_after, send
from scheduler.ratelimit import AdmissionGate
from scheduler.upstream import (
    AuthError,
    BulkResult,
    ItemFailure,
    MembershipResult,
    PermanentError,
    RateLimited,
    RefreshResult,
    SegmentNotFound,
    SingleResult,
    TransientError,
    UpstreamError,
)

__all__ = ["ITEM_ERRORS", "HttpCXoneClient", "ResponseHook"]

logger = logging.getLogger(__name__)

JSON = "application/json"
# Per-item error codes: on a single write they come back as the whole response status, and only
# the `error` code tells them apart from a whole-request error with the same status.
ITEM_ERRORS = frozenset(
    {
        "ContactAlreadyInSegment",
        "ContactNotInSegment",
        "ContactNotFound",
        "InvalidContactId",
        "DuplicateContactInBatch",
        "IndexBusy",
    }
)
_MAX_MESSAGE = 300


def _fields(response: Response) -> tuple[Any, str, str]:
    """Return the decoded body, its `error` code and its `message` (both "" when absent)."""
    payload = response.json()
    if not isinstance(payload, dict):
        return payload, "", ""
    error = payload.get("error")
    message = payload.get("message")
    return (
        payload,
        error if isinstance(error, str) else "",
        message[:_MAX_MESSAGE] if isinstance(message, str) else "",
    )


def _replayed(response: Response, header: str) -> bool:
    return response.headers.get(header, "").strip().lower() == "true"


def classify(endpoint: str, response: Response) -> UpstreamError:
    """Return the error for an answer that carries no result (a status the caller did not take)."""
    payload, error, message = _fields(response)
    status = response.status
    details: dict[str, object] = {"endpoint": endpoint}
    if payload is None and response.body:
        error = error or "NonJSONResponse"
        message = message or f"non-JSON answer ({response.headers.get('Content-Type', '?')})"
    message = message or f"HTTP {status}"
    if status == 429:
        return RateLimited(
            message,
            status=status,
            error=error or "TooManyRequests",
            retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            details=details,
        )
    if status >= 500 or status == 408:
        # A gateway may ask for a pause on 503 too; 0 lets the engine's backoff decide.
        return TransientError(
            message,
            status=status,
            error=error,
            retry_after_s=parse_retry_after(response.headers.get("Retry-After"), 0.0),
            details=details,
        )
    if status == 409 and error == "IdempotencyKeyInProgress":
        return TransientError(message, status=status, error=error, details=details)
    if status == 404 and error == "SegmentNotFound":
        return SegmentNotFound(message, status=status, error=error, details=details)
    if status == 401:
        return AuthError(message, status=status, error=error or "Unauthorized", details=details)
    # 400, 403, 404 (other), 406, 409 IdempotencyKeyReused, 413, 415, an unexpected 2xx/3xx.
    return PermanentError(message, status=status, error=error, details=details)


def _shape_error(endpoint: str, response: Response, what: str) -> PermanentError:
    _, error, _ = _fields(response)
    non_json = response.json() is None
    return PermanentError(
        f"non-JSON {what} answer" if non_json else f"unexpected {what} answer shape",
        status=response.status,
        error=error or ("NonJSONResponse" if non_json else "UnexpectedResponse"),
        details={"endpoint": endpoint},
    )


# The most connections the client opens, whatever the limits say (well under the systemd unit's
# file-descriptor limit), and the fewest (token, discovery and refresh calls beside the rest).
MAX_CONNECTIONS = 1024
MIN_CONNECTIONS = 32


def pool_size(requests_per_s: float, timeout_s: float) -> int:
    """Connections CXone calls may hold at once, within [MIN_CONNECTIONS, MAX_CONNECTIONS].

    Every request the rate limits allow within one timeout (the longest a request can hold its
    connection), plus a few for token, discovery and refresh calls.
    """
    in_flight = math.ceil(requests_per_s * timeout_s) + 8
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, in_flight))


class HttpCXoneClient:
    """The CXone segment API over one shared `aiohttp.ClientSession`.

    Use `async with HttpCXoneClient(settings) as client:` or `start()` / `close()`. A `session`
    passed in is used as it is and left open by `close()`; otherwise the client makes its own.
    `on_response(endpoint_class, status, elapsed_s)` is called after every HTTP exchange,
    token and discovery requests included (`status` 0 when no answer came).
    """

    def __init__(
        self,
        settings: CXoneSettings,
        *,
        session: aiohttp.ClientSession | None = None,
        on_response: ResponseHook | None = None,
        max_connections: int = MAX_CONNECTIONS,
        token_gate: AdmissionGate | None = None,
    ) -> None:
        self._settings = settings
        self._token_gate = token_gate
        self._max_connections = max_connections
        self._session = session
        self._owns_session = session is None
        self._hook = on_response
        self._tokens: TokenManager | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("started" if self._tokens else "new")
        return f"HttpCXoneClient(api_base={self._settings.api_base!r}, state={state})"

    @property
    def settings(self) -> CXoneSettings:
        """The settings the client was made with."""
        return self._settings

    async def start(self) -> None:
        """Create the session (unless one was given). Idempotent; makes no request."""
        if self._closed:
            raise RuntimeError("HttpCXoneClient is closed")
        if self._tokens is not None:
            return
        if self._session is None:
            # The rate gates, not the pool, bound the request rate. aiohttp's default pool of
            # 100 connections would add a hidden queue in front of them (and its wait counts
            # against each request's timeout) once answers slow down or writes hang.
            self._session = aiohttp.ClientSession(
                raise_for_status=False,
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
            )
        self._tokens = TokenManager(
            self._settings, self._session, on_response=self._hook, gate=self._token_gate
        )

    async def close(self) -> None:
        """Close the session if the client made it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._tokens = None
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def authenticate(self) -> str:
        """Fetch a token and resolve the API base now (a start-up check); return the base."""
        tokens = self._require()
        await tokens.access_token()
        return await tokens.api_base()

    async def bulk_add(
        self, segment_id: str, contact_ids: list[str], idempotency_key: str
    ) -> BulkResult:
        """POST a JSON array of ids; per-item failures are in the result, not raised."""
        path = self._settings.paths.bulk_path(segment_id)
        return await self._bulk("POST", path, segment_id, contact_ids, idempotency_key)

    async def bulk_remove(
        self, segment_id: str, contact_ids: list[str], idempotency_key: str
    ) -> BulkResult:
        """DELETE a JSON array of ids; per-item failures (`ContactNotInSegment` too) are results."""
        path = self._settings.paths.bulk_remove_path(segment_id)
        return await self._bulk("DELETE", path, segment_id, contact_ids, idempotency_key)

    async def single_add(
        self, segment_id: str, contact_id: str, idempotency_key: str
    ) -> SingleResult:
        """POST one `{"contactId"}`; item errors (409, 404, 400, 503 by code) are results."""
        path = self._settings.paths.bulk_path(segment_id)
        body = orjson.dumps({"contactId": contact_id})
        return await self._single("POST", path, body, idempotency_key)

    async def single_remove(
        self, segment_id: str, contact_id: str, idempotency_key: str
    ) -> SingleResult:
        """DELETE one member; item errors (409 `ContactNotInSegment` too) are results."""
        path = self._settings.paths.member_remove_path(segment_id, contact_id)
        return await self._single("DELETE", path, None, idempotency_key)

    async def _bulk(
        self,
        method: str,
        path: str,
        segment_id: str,
        contact_ids: list[str],
        idempotency_key: str,
    ) -> BulkResult:
        """Send one bulk write or removal and parse the shared answer shape."""
        response = await self._call(
            "bulk", method, path, orjson.dumps(contact_ids), idempotency_key
        )
        if response.status != 200:
            raise classify("bulk", response)
        payload = response.json()
        if not isinstance(payload, dict):
            raise _shape_error("bulk", response, "bulk")
        success = payload.get("successCount")
        failure = payload.get("failureCount")
        raw_failed = payload.get("failedContacts", [])
        if not isinstance(success, int) or not isinstance(failure, int):
            raise _shape_error("bulk", response, "bulk")
        if not isinstance(raw_failed, list):
            raise _shape_error("bulk", response, "bulk")
        failed = []
        for item in raw_failed:
            if not isinstance(item, dict):
                raise _shape_error("bulk", response, "bulk")
            code = item.get("code")
            failed.append(
                ItemFailure(
                    contact_id=str(item.get("contactId", "")),
                    code=code if isinstance(code, int) else 0,
                    error=str(item.get("error", "")),
                    message=str(item.get("message", "")),
                )
            )
        if len(failed) < failure:
            # CXone lists only the first 200-id chunk's failures; the engine never sends more.
            logger.warning(
                "bulk %s %s: failureCount %d but %d failures listed",
                method,
                segment_id,
                failure,
                len(failed),
            )
        returned_segment = payload.get("segmentId")
        return BulkResult(
            segment_id=returned_segment if isinstance(returned_segment, str) else segment_id,
            success_count=success,
            failure_count=failure,
            failed=tuple(failed),
            replayed=_replayed(response, self._settings.replayed_header),
        )

    async def _single(
        self, method: str, path: str, body: bytes | None, idempotency_key: str
    ) -> SingleResult:
        """Send one single-contact write or removal; an item error as the status is a result."""
        response = await self._call("single", method, path, body, idempotency_key)
        replayed = _replayed(response, self._settings.replayed_header)
        what = "single write" if method == "POST" else "single removal"
        if 200 <= response.status < 300:
            if response.json() is None and response.body:
                raise _shape_error("single", response, what)
            return SingleResult(status=response.status, replayed=replayed)
        _, error, message = _fields(response)
        if error in ITEM_ERRORS:
            return SingleResult(
                status=response.status, error=error, message=message, replayed=replayed
            )
        raise classify("single", response)

    async def is_member(self, segment_id: str, contact_id: str) -> MembershipResult:
        """GET one membership; `is_member` is true only once the write is indexed."""
        path = self._settings.paths.member_path(segment_id, contact_id)
        response = await self._call("read", "GET", path, None, "")
        if response.status != 200:
            raise classify("read", response)
        payload = response.json()
        is_member = payload.get("isMember") if isinstance(payload, dict) else None
        if not isinstance(payload, dict) or not isinstance(is_member, bool):
            raise _shape_error("read", response, "membership")
        added_at = payload.get("addedAt")
        return MembershipResult(
            is_member=is_member, added_at=added_at if isinstance(added_at, str) else None
        )

    async def refresh(self, segment_id: str) -> RefreshResult:
        """POST a segment refresh; a 429 (once per hour) is `accepted=False`, not raised."""
        path = self._settings.paths.refresh_path(segment_id)
        response = await self._call("refresh", "POST", path, None, "")
        if 200 <= response.status < 300:
            return RefreshResult(accepted=True)
        if response.status == 429:
            return RefreshResult(
                accepted=False,
                retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            )
        raise classify("refresh", response)

    def _require(self) -> TokenManager:
        if self._tokens is None:
            raise RuntimeError(
                "HttpCXoneClient is closed" if self._closed else "call HttpCXoneClient.start()"
            )
        return self._tokens

    async def _call(
        self, endpoint: str, method: str, path: str, body: bytes | None, idempotency_key: str
    ) -> Response:
        """One request, resent once with a new token if the first answer is 401."""
        tokens = self._require()
        session = self._session
        assert session is not None  # set together with self._tokens
        base = await tokens.api_base()
        url = base + path
        token = await tokens.access_token()
        response = await self._send(
            session, endpoint, method, url, token=token, body=body, key=idempotency_key
        )
        if response.status != 401:
            return response
        # The token died early (revoked, clock skew): one new token, one resend, as CXone says.
        logger.info("%s %s: 401, resending once with a new token", endpoint, method)
        tokens.invalidate(token)
        token = await tokens.access_token()
        response = await self._send(
            session, endpoint, method, url, token=token, body=body, key=idempotency_key
        )
        if response.status == 401:
            _, error, _ = _fields(response)
            raise AuthError(
                "a new token was refused too",
                status=401,
                error=error or "Unauthorized",
                details={"endpoint": endpoint},
            )
        return response

    async def _send(
        self,
        session: aiohttp.ClientSession,
        endpoint: str,
        method: str,
        url: str,
        *,
        token: str,
        body: bytes | None,
        key: str,
    ) -> Response:
        # Built in one go per request: reads are the hot path, thousands a second.
        headers = {"Accept": JSON, "Authorization": f"Bearer {token}"}
        if body is not None:
            headers["Content-Type"] = JSON
        if key:
            headers[self._settings.idempotency_header] = key
        return await send(
            session,
            endpoint,
            method,
            url,
            headers=headers,
            data=body,
            timeout_s=self._settings.timeout_s,
            hook=self._hook,
        )
