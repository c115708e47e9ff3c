"""make_verifier: one verifier per `[sources.NAME]`, refusing what it cannot verify."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from daemon.config import SourceConfig
from listeners import StandardWebhookVerifier, make_verifier
from tests.listeners.test_signing import VECTOR_BODY, VECTOR_SECRET, VECTOR_TIMESTAMP


def test_standard_sources_get_a_standard_verifier_with_their_tolerance() -> None:
    source = SourceConfig(kind="standard", secret=SecretStr(VECTOR_SECRET), tolerance_s=60)
    verifier = make_verifier(source)
    assert isinstance(verifier, StandardWebhookVerifier)
    assert verifier.tolerance_s == 60
    headers = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": str(VECTOR_TIMESTAMP),
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    assert verifier.verify(headers, VECTOR_BODY, now=VECTOR_TIMESTAMP + 60)


@pytest.mark.parametrize("kind", ["hubspot", "salesforce"])
def test_other_kinds_are_not_implemented_yet(kind: str) -> None:
    source = SourceConfig(kind=kind, secret=SecretStr(VECTOR_SECRET))  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match=f'kind "{kind}" is not implemented yet'):
        make_verifier(source)


def test_a_bad_secret_fails_at_start_up_without_quoting_it() -> None:
    source = SourceConfig(kind="standard", secret=SecretStr("whsec_paste error here"))
    with pytest.raises(ValueError, match="not valid base64") as caught:
        make_verifier(source)
    assert "paste error" not in str(caught.value)
