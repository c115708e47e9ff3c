"""Settings, secrets, path templates and Retry-After parsing (no network)."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from daemon.cxone.settings import CXonePaths, CXoneSettings, quote_id
from daemon.cxone.transport import parse_retry_after
from daemon.secrets import Secret


def test_secret_hides_its_value() -> None:
    secret = Secret("hunter2=")
    assert repr(secret) == "***"
    assert str(secret) == "***"
    assert f"{secret}" == "***"
    assert "hunter2" not in repr([secret, {"k": secret}])
    assert secret.reveal() == "hunter2="
    assert secret == Secret("hunter2=")
    assert secret != Secret("other")
    assert bool(secret)
    assert not Secret("")
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_settings_repr_hides_secrets() -> None:
    settings = CXoneSettings(
        client_id="cid",
        client_secret=Secret("client-secret-value"),
        access_key_id="key-id",
        access_key_secret=Secret("access-key-secret-value"),
        scopes=["segments:write"],  # type: ignore[arg-type]
    )
    text = repr(settings) + str(settings)
    assert "client-secret-value" not in text
    assert "access-key-secret-value" not in text
    assert "***" in text
    assert settings.scopes == ("segments:write",)
    assert settings.issuer == "https://cxone.niceincontact.com"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"grant": "implicit"}, "cxone.grant"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"client_id": ""}, "client_id"),
        ({"access_key_secret": Secret("")}, "access_key"),
        ({"issuer": "", "token_url": "http://x/token"}, "api_base"),
    ],
)
def test_settings_validation(overrides: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "client_id": "cid",
        "client_secret": Secret("s"),
        "access_key_id": "k",
        "access_key_secret": Secret("ks"),
        **overrides,
    }
    with pytest.raises(ValueError, match=message):
        CXoneSettings(**values)  # type: ignore[arg-type]


def test_settings_require_secret_wrappers() -> None:
    with pytest.raises(TypeError):
        CXoneSettings(client_id="cid", grant="client_credentials", client_secret="plain")  # type: ignore[arg-type]


def test_default_paths() -> None:
    paths = CXonePaths()
    assert paths.bulk_path("seg_1") == "/api/v2/segments/seg_1/contacts"
    assert paths.member_path("seg_1", "c:1") == "/api/v2/segments/seg_1/contacts/c%3A1"
    assert paths.refresh_path("seg_1") == "/api/v2/segments/seg_1/refresh"
    assert paths.bulk_remove_path("seg_1") == "/api/v2/segments/seg_1/contacts"
    assert paths.member_remove_path("seg_1", "c:1") == "/api/v2/segments/seg_1/contacts/c%3A1"


def test_ids_are_quoted_as_one_path_segment() -> None:
    paths = CXonePaths()
    assert paths.bulk_path("a/b?c#d") == "/api/v2/segments/a%2Fb%3Fc%23d/contacts"
    assert paths.member_path("..", ".") == "/api/v2/segments/%2E%2E/contacts/%2E"
    # An id that looks like a placeholder is not substituted again.
    assert paths.member_path("{contactId}", "{segmentId}") == (
        "/api/v2/segments/%7BcontactId%7D/contacts/%7BsegmentId%7D"
    )
    assert quote_id("contact_0f8e-1.2") == "contact_0f8e-1.2"


def test_custom_paths_and_validation() -> None:
    paths = CXonePaths(
        bulk="/v9/{segmentId}/members",
        member="/v9/{segmentId}/members/{contactId}/state",
        refresh="/v9/{segmentId}:refresh",
    )
    assert paths.bulk_path("s") == "/v9/s/members"
    assert paths.member_path("s", "c") == "/v9/s/members/c/state"
    assert paths.refresh_path("s") == "/v9/s:refresh"
    with pytest.raises(ValueError, match="member"):
        CXonePaths(member="/api/{segmentId}")
    with pytest.raises(ValueError, match="start with"):
        CXonePaths(bulk="api/{segmentId}")
    with pytest.raises(ValueError, match="member_remove must contain"):
        CXonePaths(member_remove="/api/{segmentId}/contacts")
    with pytest.raises(ValueError, match="bulk_remove must contain"):
        CXonePaths(bulk_remove="/api/contacts")
    # An id that looks like a placeholder is not substituted again on the removal path either.
    assert CXonePaths().member_remove_path("{contactId}", "x") == (
        "/api/v2/segments/%7BcontactId%7D/contacts/x"
    )


def test_parse_retry_after() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after(None) == 1.0
    assert parse_retry_after("") == 1.0
    assert parse_retry_after("soon") == 1.0
    assert parse_retry_after("-3") == 1.0
    assert parse_retry_after(None, 0.0) == 0.0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25.0 <= parse_retry_after(later) <= 30.0
    earlier = format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(earlier) == 0.0
