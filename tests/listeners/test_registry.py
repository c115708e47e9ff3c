"""make_adapter and the `[sources.NAME]` union: each kind validates its own keys."""

from __future__ import annotations

import typing

import pytest
from pydantic import SecretStr, TypeAdapter, ValidationError

from listeners import (
    SOURCE_KINDS,
    InboundRequest,
    SourceConfig,
    StandardAdapter,
    StandardSource,
    make_adapter,
)
from tests.listeners.test_signing import VECTOR_BODY, VECTOR_SECRET, VECTOR_TIMESTAMP

SOURCES: TypeAdapter[dict[str, SourceConfig]] = TypeAdapter(dict[str, SourceConfig])


def test_standard_sources_get_a_standard_adapter_with_their_tolerance() -> None:
    source = StandardSource(kind="standard", secret=SecretStr(VECTOR_SECRET), tolerance_s=60)
    adapter = make_adapter(source)
    assert isinstance(adapter, StandardAdapter)
    assert adapter.verifier.tolerance_s == 60
    headers = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": str(VECTOR_TIMESTAMP),
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    request = InboundRequest(
        method="POST",
        path_qs="/v1/webhooks/crm",
        query_string="",
        headers=headers,
        body=VECTOR_BODY,
        peer="127.0.0.1",
        received_at=VECTOR_TIMESTAMP + 60,
    )
    assert adapter.authenticate(request) == "msg_p5jXN8AQM9LWM0D4loKWxJek"


def test_a_table_without_kind_is_a_standard_source() -> None:
    parsed = SOURCES.validate_python({"crm": {"secret": VECTOR_SECRET}})
    assert isinstance(parsed["crm"], StandardSource)


def test_an_unknown_kind_is_refused_naming_the_kinds() -> None:
    with pytest.raises(ValidationError) as caught:
        SOURCES.validate_python({"crm": {"kind": "marketo", "secret": VECTOR_SECRET}})
    assert caught.value.errors()[0]["type"] == "union_tag_invalid"
    for kind in SOURCE_KINDS:
        assert kind in str(caught.value)


def test_each_kind_refuses_keys_of_its_own_it_does_not_have() -> None:
    with pytest.raises(ValidationError) as caught:
        SOURCES.validate_python({"crm": {"kind": "standard", "secret": "x", "public_url": "u"}})
    (error,) = caught.value.errors()
    assert error["type"] == "extra_forbidden"
    assert error["loc"] == ("crm", "standard", "public_url")


def test_a_bad_secret_fails_at_start_up_without_quoting_it() -> None:
    source = StandardSource(kind="standard", secret=SecretStr("whsec_paste error here"))
    with pytest.raises(ValueError, match="not valid base64") as caught:
        make_adapter(source)
    assert "paste error" not in str(caught.value)


def test_the_union_takes_every_registered_kind_and_nothing_else() -> None:
    args = typing.get_args(typing.get_args(SourceConfig)[0])
    assert set(args) == {model for model, _ in SOURCE_KINDS.values()}
    for kind, (model, adapter) in SOURCE_KINDS.items():
        assert model.model_fields["kind"].default == kind
        assert adapter.kind == kind
