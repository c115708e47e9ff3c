"""Signing: the Standard Webhooks test vector, the reference library, and secret decoding."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook

from listeners.signing import MIN_SECRET_BYTES, SigningKey, decode_secret, sign

# The specification's published vector (standard-webhooks libraries/python/tests/test_webhooks.py
# `test_sign_function`), recomputed independently with hmac/hashlib before being written here.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_sign_reproduces_the_specification_vector() -> None:
    assert sign(VECTOR_SECRET, VECTOR_MSG_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == {
        "webhook-id": VECTOR_MSG_ID,
        "webhook-timestamp": "1614265330",
        "webhook-signature": VECTOR_SIGNATURE,
    }


def test_the_whsec_prefix_is_optional_as_in_the_reference() -> None:
    bare = VECTOR_SECRET.removeprefix("whsec_")
    headers = sign(bare, VECTOR_MSG_ID, VECTOR_TIMESTAMP, VECTOR_BODY)
    assert headers["webhook-signature"] == VECTOR_SIGNATURE


@pytest.mark.parametrize(
    ("msg_id", "timestamp", "body"),
    [
        (VECTOR_MSG_ID, VECTOR_TIMESTAMP, VECTOR_BODY),
        ("msg_1", 0, b""),
        ("evt:2024.03-15_x", 1_700_000_000, b'[{"contactId": "c1", "segmentIds": ["s1"]}]'),
        ("m", 4_102_444_800, '{"name": "Zoë ✓"}'.encode()),
    ],
)
def test_sign_agrees_with_the_reference_library(msg_id: str, timestamp: int, body: bytes) -> None:
    reference = Webhook(VECTOR_SECRET).sign(
        msg_id=msg_id, timestamp=datetime.fromtimestamp(timestamp, tz=UTC), data=body.decode()
    )
    assert sign(VECTOR_SECRET, msg_id, timestamp, body)["webhook-signature"] == reference


def test_the_reference_library_verifies_what_sign_produces() -> None:
    now = int(datetime.now(tz=UTC).timestamp())
    headers = sign(VECTOR_SECRET, "msg_interop", now, b'{"contactId": "c1"}')
    assert Webhook(VECTOR_SECRET).verify(b'{"contactId": "c1"}', headers) == {"contactId": "c1"}


def test_decode_secret_gives_the_key() -> None:
    assert decode_secret(VECTOR_SECRET) == base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")


def test_decode_secret_accepts_unpadded_base64() -> None:
    key = bytes(range(17))  # 17 bytes: base64 needs padding
    padded = base64.b64encode(key).decode()
    assert padded.endswith("=")
    assert decode_secret("whsec_" + padded.rstrip("=")) == key
    assert decode_secret("whsec_" + padded) == key


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("", "empty"),
        ("whsec_", "empty"),
        ("whsec_not base64!", "not valid base64"),
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw ", "not valid base64"),
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa-w", "not valid base64"),  # url-safe alphabet
        ("whsec_Mf\u00e9Q9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "not valid base64"),
        ("whsec_Q", "not valid base64"),  # one character is never base64
        ("whsec_c2VjcmV0", "too short"),  # "secret": a placeholder, not a key
    ],
)
def test_unusable_secrets_raise_value_error_without_quoting_them(secret: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        decode_secret(secret)
    body = secret.removeprefix("whsec_")
    if body:
        assert body not in str(caught.value)
    # Nor by way of a chained decoding error that a traceback would print.
    assert caught.value.__context__ is None or caught.value.__suppress_context__


def test_the_shortest_accepted_secret() -> None:
    key = b"k" * MIN_SECRET_BYTES
    assert decode_secret("whsec_" + base64.b64encode(key).decode()) == key
    with pytest.raises(ValueError, match="too short"):
        decode_secret("whsec_" + base64.b64encode(key[:-1]).decode())


@pytest.mark.parametrize("msg_id", ["", "msg 1", "msg_\u00e9", "x" * 257, "a\nb"])
def test_sign_refuses_ids_a_verifier_would_refuse(msg_id: str) -> None:
    with pytest.raises(ValueError, match="msg_id"):
        sign(VECTOR_SECRET, msg_id, VECTOR_TIMESTAMP, b"{}")


@pytest.mark.parametrize("timestamp", [-1, True, 1.5])
def test_sign_refuses_timestamps_that_are_not_unix_seconds(timestamp: object) -> None:
    with pytest.raises(ValueError, match="timestamp"):
        sign(VECTOR_SECRET, "msg_1", timestamp, b"{}")  # type: ignore[arg-type]


def test_sign_refuses_a_bad_secret() -> None:
    with pytest.raises(ValueError, match="base64"):
        sign("whsec_???", "msg_1", VECTOR_TIMESTAMP, b"{}")


def test_a_signing_key_reused_for_many_messages_signs_each_as_a_fresh_hmac() -> None:
    key = secrets.token_bytes(32)
    signing_key = SigningKey(key)
    # Copies of one keyed HMAC must not carry one message's bytes into the next signature.
    for body in (b"", b"{}", b"x" * 5000, b"{}"):
        expected = hmac.new(key, b"id-1.1700000000." + body, hashlib.sha256).digest()
        assert signing_key.signature("id-1", "1700000000", body) == expected
    assert key.hex() not in repr(signing_key)
    assert repr(key) not in repr(signing_key)
