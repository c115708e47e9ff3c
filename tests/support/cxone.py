"""Client settings for the emulator's default credentials."""

from __future__ import annotations

from typing import Any

from daemon.cxone.settings import CXoneSettings
from daemon.secrets import Secret

CLIENT_SECRET = "segmapd-secret"
ACCESS_KEY_SECRET = "emulator-secret="
TENANT_ID = "11111111-2222-3333-4444-555555555555"


def emulator_settings(url: str, **overrides: Any) -> CXoneSettings:
    """Password-grant settings that discover everything from the emulator, as against CXone."""
    values: dict[str, Any] = {
        "issuer": url,
        "grant": "password",
        "client_id": "segmapd",
        "client_secret": Secret(CLIENT_SECRET),
        "access_key_id": "emulator-key",
        "access_key_secret": Secret(ACCESS_KEY_SECRET),
        "timeout_s": 5.0,
    }
    values.update(overrides)
    return CXoneSettings(**values)
