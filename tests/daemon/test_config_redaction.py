"""The configuration's repr and str never show a URL's userinfo or query (they carry secrets)."""

from __future__ import annotations

import pytest

from daemon.config import Config, display_url

SECRET_URL = "https://hook-user:hook-pass@hooks.example.com:8443/segmapd/in?token=qs-secret#frag"
MINIMAL = {"cxone": {"client_id": "id", "client_secret": "s", "grant": "client_credentials"}}


def config_with(**sections: dict[str, object]) -> Config:
    return Config.model_validate({**MINIMAL, **sections})


@pytest.mark.parametrize("render", [repr, str])
def test_the_notify_url_is_shown_without_userinfo_or_query(render: object) -> None:
    config = config_with(notify={"url": SECRET_URL, "secret": "whsec_x"})
    for shown in (render(config), render(config.notify)):  # type: ignore[operator]
        assert "hook-pass" not in shown and "hook-user" not in shown
        assert "qs-secret" not in shown and "frag" not in shown
        assert "https://hooks.example.com:8443/…" in shown
        assert "segmapd/in" not in shown  # a path may hold a secret too (chat hooks)
    # The value itself is untouched: only its display is redacted.
    assert config.notify.url == SECRET_URL


def test_every_url_valued_key_is_redacted_alike() -> None:
    config = config_with(
        cxone={**MINIMAL["cxone"], "api_base": "https://u:p@api.example.com/base?k=v"},
        store={"url": "postgresql://segmapd:db-pass@db.internal:5432/segmapd"},
    )
    shown = repr(config)
    assert "db-pass" not in shown and ":p@" not in shown and "k=v" not in shown
    assert "https://api.example.com/…" in shown
    assert "postgresql://db.internal:5432/…" in shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("", ""),
        ("sqlite:///var/lib/segmapd/journal.db", "sqlite:///var/lib/segmapd/journal.db"),
        ("http://a:b@[::1]:9/x?y=z", "http://[::1]:9/…"),
        ("https://hooks.example.com/services/T0/B0/secret", "https://hooks.example.com/…"),
        ("https://cxone.example.com", "https://cxone.example.com"),
        ("not a url", "not a url"),
    ],
)
def test_display_url(url: str, shown: str) -> None:
    assert display_url(url) == shown


@pytest.mark.parametrize("render", [repr, str])
def test_no_source_kind_shows_its_secret(render: object) -> None:
    config = config_with(
        sources={
            "crm": {"secret": "whsec_c3RhbmRhcmQtc2VjcmV0LXZhbHVl"},
            "hs": {
                "kind": "hubspot",
                "client_secret": "hubspot-client-secret-value",
                "public_url": "https://segmapd.example.com/v1/webhooks/hs",
            },
            "sf": {"kind": "salesforce", "organization_id": "00D5e000000KQ2e"},
            "zd": {
                "kind": "json",
                "secret": "json-signing-secret-value",
                "signature_header": "X-Signature",
                "contact_id": "id",
                "set": "segments",
            },
        }
    )
    for shown in (render(config), *(render(s) for s in config.sources.values())):  # type: ignore[operator]
        assert "c3RhbmRhcmQtc2VjcmV0LXZhbHVl" not in shown
        assert "hubspot-client-secret-value" not in shown
        assert "json-signing-secret-value" not in shown
