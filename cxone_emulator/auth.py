"""Authentication as CXone does it: OpenID discovery, the token endpoint, bearer tokens."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import orjson

from cxone_emulator.config import EmulatorConfig

DEFAULT_SCOPE = "customerdb:write segments:write customerdb:read segments:read"
GRANT_TYPES = ("password", "client_credentials", "refresh_token")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def openid_configuration(base: str) -> dict[str, Any]:
    """The OpenID discovery document of an issuer served at `base`."""
    return {
        "issuer": base,
        "token_endpoint": f"{base}/auth/token",
        "authorization_endpoint": f"{base}/auth/authorize",
        "jwks_uri": f"{base}/auth/jwks",
        "grant_types_supported": list(GRANT_TYPES),
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "response_types_supported": ["code", "token", "id_token"],
        "id_token_signing_alg_values_supported": ["HS256"],
        "scopes_supported": ["openid", *DEFAULT_SCOPE.split()],
    }


def cxone_configuration(config: EmulatorConfig, base: str, tenant_id: str) -> dict[str, Any] | None:
    """The tenant's API discovery document, or None for an unknown tenant."""
    if tenant_id != config.tenant_id:
        return None
    host = base.split("://", 1)[-1]
    return {"tenantId": tenant_id, "api_endpoint": base, "area": "na1", "domain": host}


class TokenError(Exception):
    """A refused token request: HTTP status and OAuth error code."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description

    def body(self) -> dict[str, str]:
        """The OAuth error body."""
        return {"error": self.error, "error_description": self.description}


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class Tokens:
    """Issued access and refresh tokens; access tokens expire, refresh tokens work once."""

    def __init__(self) -> None:
        # Emulator-private signing key: clients only decode id_tokens, they never verify them.
        self._key = secrets.token_bytes(32)
        self._access: dict[str, float] = {}
        self._refresh: dict[str, str] = {}

    def reset(self) -> None:
        """Forget every token."""
        self._access.clear()
        self._refresh.clear()

    def expire_all(self) -> int:
        """Make every issued access token expired now; return how many there were."""
        for token in self._access:
            self._access[token] = 0.0
        return len(self._access)

    def authorized(self, header: str | None, now: float) -> bool:
        """Whether an `Authorization` header carries a live bearer token."""
        if header is None or not header.startswith("Bearer "):
            return False
        expiry = self._access.get(header[7:].strip())
        return expiry is not None and now < expiry

    def _id_token(self, config: EmulatorConfig, issuer: str, subject: str, ttl: int) -> str:
        issued = int(time.time())
        header = _b64url(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
        payload = _b64url(
            orjson.dumps(
                {
                    "iss": issuer,
                    "sub": subject,
                    "aud": config.client_id,
                    "iat": issued,
                    "exp": issued + ttl,
                    "tenantId": config.tenant_id,
                }
            )
        )
        signing_input = f"{header}.{payload}".encode("ascii")
        signature = hmac.new(self._key, signing_input, hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64url(signature)}"

    def _issue(
        self, config: EmulatorConfig, issuer: str, subject: str, scope: str, now: float
    ) -> dict[str, Any]:
        ttl = max(1, round(config.token_ttl_s))
        # Drop long-dead tokens so a long run does not accumulate them.
        if len(self._access) > 10_000:
            self._access = {t: e for t, e in self._access.items() if e > now}
        access = secrets.token_urlsafe(32)
        refresh = secrets.token_urlsafe(32)
        self._access[access] = now + config.token_ttl_s
        self._refresh[refresh] = subject
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ttl,
            "refresh_token": refresh,
            "id_token": self._id_token(config, issuer, subject, ttl),
            "scope": scope,
        }

    def grant(
        self,
        config: EmulatorConfig,
        issuer: str,
        authorization: str | None,
        form_body: bytes,
        now: float,
    ) -> dict[str, Any]:
        """Answer a token request (form body, optional Basic header) or raise `TokenError`."""
        try:
            form = {
                name: values[0]
                for name, values in parse_qs(
                    form_body.decode("ascii"), keep_blank_values=True, strict_parsing=False
                ).items()
            }
        except UnicodeDecodeError:
            raise TokenError(400, "invalid_request", "form body is not URL-encoded") from None
        self._authenticate_client(config, authorization, form)
        grant_type = form.get("grant_type", "")
        scope = form.get("scope") or DEFAULT_SCOPE
        if grant_type == "password":
            username = form.get("username", "")
            password = form.get("password", "")
            if not (
                _same(username, config.access_key_id) and _same(password, config.access_key_secret)
            ):
                raise TokenError(401, "invalid_grant", "wrong access key id or secret")
            return self._issue(config, issuer, username, scope, now)
        if grant_type == "client_credentials":
            return self._issue(config, issuer, config.client_id, scope, now)
        if grant_type == "refresh_token":
            subject = self._refresh.pop(form.get("refresh_token", ""), None)
            if subject is None:
                raise TokenError(400, "invalid_grant", "unknown or already used refresh token")
            return self._issue(config, issuer, subject, scope, now)
        raise TokenError(400, "unsupported_grant_type", "grant_type is not supported")

    @staticmethod
    def _authenticate_client(
        config: EmulatorConfig, authorization: str | None, form: dict[str, str]
    ) -> None:
        if authorization is not None and authorization[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise TokenError(401, "invalid_client", "malformed Basic credentials") from None
            client_id, _, client_secret = decoded.partition(":")
            # RFC 6749 §2.3.1 form-encodes both parts before base64; most clients do not.
            candidates: tuple[tuple[str, str], ...] = (
                (client_id, client_secret),
                (unquote_plus(client_id), unquote_plus(client_secret)),
            )
        else:
            candidates = ((form.get("client_id", ""), form.get("client_secret", "")),)
        for given_id, given_secret in candidates:
            if _same(given_id, config.client_id) and _same(given_secret, config.client_secret):
                return
        raise TokenError(401, "invalid_client", "wrong client id or secret")
