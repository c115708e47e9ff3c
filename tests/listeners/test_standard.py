"""StandardWebhookVerifier: vectors, rotation, tampering, tolerance, malformed headers, secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import time
from collections.abc import Mapping

import pytest
from multidict import CIMultiDict

from listeners import StandardWebhookVerifier, WebhookRejected, parse_events
from listeners.signing import sign
from tests.listeners.test_signing import (
    VECTOR_BODY,
    VECTOR_MSG_ID,
    VECTOR_SECRET,
    VECTOR_SIGNATURE,
    VECTOR_TIMESTAMP,
)

OTHER_SECRET = "whsec_" + base64.b64encode(b"another endpoint's 32-byte key!!").decode()
# From the reference's tests: a wrong v1 signature and the same value under another version.
REFERENCE_WRONG_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="
REFERENCE_DECOYS = (
    "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
    "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
)
TOLERANCE_S = 300
NOW = float(VECTOR_TIMESTAMP)


@pytest.fixture
def verifier() -> StandardWebhookVerifier:
    return StandardWebhookVerifier(VECTOR_SECRET, TOLERANCE_S)


def vector_headers(**changes: str) -> dict[str, str]:
    headers = {
        "webhook-id": VECTOR_MSG_ID,
        "webhook-timestamp": str(VECTOR_TIMESTAMP),
        "webhook-signature": VECTOR_SIGNATURE,
    }
    headers.update({name.replace("_", "-"): value for name, value in changes.items()})
    return headers


def rejected(
    verifier: StandardWebhookVerifier,
    headers: Mapping[str, str],
    body: bytes = VECTOR_BODY,
    now: float = NOW,
) -> WebhookRejected:
    with pytest.raises(WebhookRejected) as caught:
        verifier.verify(headers, body, now=now)
    error = caught.value
    # Nothing secret leaks: not the secret (with or without prefix), not a signature offered.
    text = f"{error.message} {error!r} {error.field}"
    assert VECTOR_SECRET.removeprefix("whsec_") not in text
    assert OTHER_SECRET.removeprefix("whsec_") not in text
    for entry in headers.get("webhook-signature", "").split():
        encoded = entry.partition(",")[2]
        if len(encoded) >= 8:
            assert encoded not in text
    assert VECTOR_SIGNATURE.partition(",")[2] not in text
    return error


def test_the_specification_vector_verifies(verifier: StandardWebhookVerifier) -> None:
    assert verifier.verify(vector_headers(), VECTOR_BODY, now=NOW) == VECTOR_MSG_ID


def test_the_vector_verifies_with_an_unprefixed_secret() -> None:
    bare = StandardWebhookVerifier(VECTOR_SECRET.removeprefix("whsec_"), TOLERANCE_S)
    assert bare.verify(vector_headers(), VECTOR_BODY, now=NOW) == VECTOR_MSG_ID


def test_the_references_wrong_signature_is_refused(verifier: StandardWebhookVerifier) -> None:
    error = rejected(verifier, vector_headers(webhook_signature=REFERENCE_WRONG_SIGNATURE))
    assert error.status == 401
    assert error.field == "webhook-signature"
    assert error.message == "header webhook-signature: no v1 signature matches this delivery"


def test_the_references_multi_signature_header_verifies(
    verifier: StandardWebhookVerifier,
) -> None:
    offered = " ".join([*REFERENCE_DECOYS, VECTOR_SIGNATURE, REFERENCE_DECOYS[0]])
    headers = vector_headers(webhook_signature=offered)
    assert verifier.verify(headers, VECTOR_BODY, now=NOW) == VECTOR_MSG_ID


def test_rotation_two_signatures_only_the_second_valid() -> None:
    # The sender signs with the old and the new secret; this receiver has the new one.
    old = sign(OTHER_SECRET, "msg_rot", VECTOR_TIMESTAMP, b"{}")["webhook-signature"]
    new = sign(VECTOR_SECRET, "msg_rot", VECTOR_TIMESTAMP, b"{}")["webhook-signature"]
    headers = vector_headers(webhook_id="msg_rot", webhook_signature=f"{old} {new}")
    assert StandardWebhookVerifier(VECTOR_SECRET, TOLERANCE_S).verify(headers, b"{}", now=NOW)
    # A receiver that still has neither secret refuses it.
    third = "whsec_" + base64.b64encode(b"a third secret, neither of them").decode()
    error = rejected(StandardWebhookVerifier(third, TOLERANCE_S), headers, b"{}")
    assert error.status == 401


def test_rotation_order_does_not_matter(verifier: StandardWebhookVerifier) -> None:
    old = sign(OTHER_SECRET, VECTOR_MSG_ID, VECTOR_TIMESTAMP, VECTOR_BODY)["webhook-signature"]
    headers = vector_headers(webhook_signature=f"{VECTOR_SIGNATURE} {old}")
    assert verifier.verify(headers, VECTOR_BODY, now=NOW) == VECTOR_MSG_ID


@pytest.mark.parametrize(
    "body",
    [
        b'{"test": 2432232315}',
        b'{"test": 2432232314} ',
        b'{"test":2432232314}',
        b"",
        VECTOR_BODY + b"\x00",
    ],
)
def test_a_tampered_body_is_refused(verifier: StandardWebhookVerifier, body: bytes) -> None:
    assert rejected(verifier, vector_headers(), body).field == "webhook-signature"


def test_a_signature_moved_to_another_id_is_refused(verifier: StandardWebhookVerifier) -> None:
    assert rejected(verifier, vector_headers(webhook_id="msg_other")).status == 401


def test_a_signature_moved_to_another_timestamp_is_refused(
    verifier: StandardWebhookVerifier,
) -> None:
    headers = vector_headers(webhook_timestamp=str(VECTOR_TIMESTAMP + 1))
    assert rejected(verifier, headers).field == "webhook-signature"


def test_the_timestamp_is_signed_exactly_as_sent(verifier: StandardWebhookVerifier) -> None:
    # Leading zeros denote the same instant but are different signed content.
    headers = vector_headers(webhook_timestamp="0" + str(VECTOR_TIMESTAMP))
    assert rejected(verifier, headers).field == "webhook-signature"


def test_a_wrong_secret_is_refused() -> None:
    verifier = StandardWebhookVerifier(OTHER_SECRET, TOLERANCE_S)
    assert rejected(verifier, vector_headers()).status == 401


@pytest.mark.parametrize("offset", [0, 1, TOLERANCE_S - 1, TOLERANCE_S, -1, -TOLERANCE_S])
def test_timestamps_within_tolerance_are_accepted(
    verifier: StandardWebhookVerifier, offset: int
) -> None:
    # `offset` is how far the receiver's clock is past the sender's timestamp.
    assert verifier.verify(vector_headers(), VECTOR_BODY, now=NOW + offset) == VECTOR_MSG_ID


@pytest.mark.parametrize(
    ("offset", "shown"),
    [
        (TOLERANCE_S + 0.5, "-300 s"),
        (TOLERANCE_S + 1, "-301 s"),
        (-TOLERANCE_S - 1, "+301 s"),
        (86_400, "-86400 s"),
        (-86_400, "+86400 s"),
        (-NOW, "+1614265330 s"),
    ],
)
def test_timestamps_beyond_tolerance_are_refused(
    verifier: StandardWebhookVerifier, offset: float, shown: str
) -> None:
    error = rejected(verifier, vector_headers(), now=NOW + offset)
    assert error.status == 401
    assert error.field == "webhook-timestamp"
    assert "timestamp outside tolerance" in error.message
    assert shown in error.message
    assert "±300 s" in error.message


def test_the_tolerance_is_the_configured_one_not_five_minutes() -> None:
    tight = StandardWebhookVerifier(VECTOR_SECRET, 5)
    assert tight.verify(vector_headers(), VECTOR_BODY, now=NOW + 5) == VECTOR_MSG_ID
    assert rejected(tight, vector_headers(), now=NOW + 6).field == "webhook-timestamp"
    loose = StandardWebhookVerifier(VECTOR_SECRET, 3600)
    assert loose.verify(vector_headers(), VECTOR_BODY, now=NOW + 3600) == VECTOR_MSG_ID


def test_now_defaults_to_the_clock() -> None:
    verifier = StandardWebhookVerifier(VECTOR_SECRET, TOLERANCE_S)
    headers = sign(VECTOR_SECRET, "msg_now", int(time.time()), b"[]")
    assert verifier.verify(headers, b"[]") == "msg_now"
    stale = sign(VECTOR_SECRET, "msg_old", int(time.time()) - 3 * TOLERANCE_S, b"[]")
    assert rejected(verifier, stale, b"[]", now=time.time()).field == "webhook-timestamp"


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_each_missing_header_is_named(verifier: StandardWebhookVerifier, header: str) -> None:
    headers = vector_headers()
    del headers[header]
    error = rejected(verifier, headers)
    assert (error.status, error.field, error.message) == (401, header, f"header {header}: missing")


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_each_empty_header_counts_as_missing(
    verifier: StandardWebhookVerifier, header: str
) -> None:
    error = rejected(verifier, {**vector_headers(), header: ""})
    assert (error.status, error.field) == (401, header)
    assert "missing" in error.message


def test_header_names_are_case_insensitive(verifier: StandardWebhookVerifier) -> None:
    titled = {name.title(): value for name, value in vector_headers().items()}
    assert verifier.verify(titled, VECTOR_BODY, now=NOW) == VECTOR_MSG_ID
    upper = CIMultiDict((name.upper(), value) for name, value in vector_headers().items())
    assert verifier.verify(upper, VECTOR_BODY, now=NOW) == VECTOR_MSG_ID


@pytest.mark.parametrize(
    "offered",
    [
        "v1",
        "v1,",
        ",",
        ",,,",
        "v1,,",
        "garbage",
        "v1,!!!!",
        "v1,abc",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE",  # padding removed
        "v1,\u00e9\u00e9\u00e9\u00e9",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=,extra",
        "v1 g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "V1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",  # right MAC, unknown version
        "v1a,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "v1,Z0hNOVNzRQ==",  # valid base64, wrong length
        "v1," + "A" * 4000,
        " ".join(["v1,"] * 500),
        "\t\n ",
    ],
)
def test_malformed_signature_entries_are_401_never_another_exception(
    verifier: StandardWebhookVerifier, offered: str
) -> None:
    error = rejected(verifier, vector_headers(webhook_signature=offered))
    assert error.status == 401
    assert error.field == "webhook-signature"


def test_malformed_entries_do_not_hide_a_valid_one(verifier: StandardWebhookVerifier) -> None:
    offered = f"v1 v1, ,, v1,!!!! v2,x \u00e9 {VECTOR_SIGNATURE} v1,abc"
    headers = vector_headers(webhook_signature=offered)
    assert verifier.verify(headers, VECTOR_BODY, now=NOW) == VECTOR_MSG_ID


@pytest.mark.parametrize(
    "stamp",
    [
        "hello",
        "1614265330.0",
        "1614265330.5",
        "-1614265330",
        "+1614265330",
        " 1614265330",
        "1614265330 ",
        "1_614_265_330",
        "1.6e9",
        "\u0661\u0666\u0661\u0664\u0662\u0666\u0665\u0663\u0663\u0660",  # Arabic-Indic digits
        "9" * 40,
        "2021-02-25T15:02:10Z",
    ],
)
def test_malformed_timestamps_are_401(verifier: StandardWebhookVerifier, stamp: str) -> None:
    error = rejected(verifier, vector_headers(webhook_timestamp=stamp))
    assert (error.status, error.field) == (401, "webhook-timestamp")
    assert error.message == "header webhook-timestamp: must be Unix time in whole seconds"


def test_a_millisecond_timestamp_is_outside_tolerance(verifier: StandardWebhookVerifier) -> None:
    error = rejected(verifier, vector_headers(webhook_timestamp=f"{VECTOR_TIMESTAMP}000"))
    assert "timestamp outside tolerance" in error.message


@pytest.mark.parametrize("msg_id", ["msg 1", "msg_\u00e9", "x" * 257, "a\tb", "a\x00b"])
def test_malformed_ids_are_401(verifier: StandardWebhookVerifier, msg_id: str) -> None:
    error = rejected(verifier, vector_headers(webhook_id=msg_id))
    assert (error.status, error.field) == (401, "webhook-id")
    assert "1-256 visible ASCII" in error.message


def test_the_longest_id_verifies(verifier: StandardWebhookVerifier) -> None:
    msg_id = "m" * 256
    headers = sign(VECTOR_SECRET, msg_id, VECTOR_TIMESTAMP, b"{}")
    assert verifier.verify(headers, b"{}", now=NOW) == msg_id


NON_UTF8_BODY = b'{"contactId": "c\xff", "segmentIds": ["s1"]}'


def test_a_non_utf8_body_signed_byte_for_byte_verifies_then_parsing_refuses_it(
    verifier: StandardWebhookVerifier,
) -> None:
    # The signature covers bytes, not text: the verifier must not decode the body, and the
    # payload parser then gives the sender a 400, not a crash.
    headers = sign(VECTOR_SECRET, "msg_bytes", VECTOR_TIMESTAMP, NON_UTF8_BODY)
    assert verifier.verify(headers, NON_UTF8_BODY, now=NOW) == "msg_bytes"
    with pytest.raises(WebhookRejected) as caught:
        parse_events(NON_UTF8_BODY)
    assert caught.value.status == 400
    assert "UTF-8" in caught.value.message


def test_a_non_utf8_body_with_a_wrong_signature_is_401(verifier: StandardWebhookVerifier) -> None:
    assert rejected(verifier, vector_headers(), NON_UTF8_BODY).status == 401


def test_the_comparison_is_constant_time(
    verifier: StandardWebhookVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    verifier.verify(vector_headers(), VECTOR_BODY, now=NOW)
    assert len(calls) == 1
    assert all(len(a) == hashlib.sha256().digest_size for a, _ in calls)


def test_random_mutations_only_ever_raise_webhook_rejected(
    verifier: StandardWebhookVerifier,
) -> None:
    rng = random.Random(20240315)
    alphabet = "v1,=+/ \u00e9\x00\n" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789"
    for _ in range(2000):
        headers = vector_headers()
        name = rng.choice(list(headers))
        value = list(headers[name])
        for _ in range(rng.randint(1, 4)):
            spot = rng.randrange(len(value) + 1)
            if value and rng.random() < 0.5:
                del value[min(spot, len(value) - 1)]
            else:
                value.insert(spot, rng.choice(alphabet))
        headers[name] = "".join(value)
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(8))) + VECTOR_BODY
        try:
            verifier.verify(headers, body, now=NOW)
        except WebhookRejected as error:
            assert error.status == 401


@pytest.mark.parametrize("tolerance_s", [0, -1])
def test_a_non_positive_tolerance_is_refused(tolerance_s: int) -> None:
    with pytest.raises(ValueError, match="tolerance_s"):
        StandardWebhookVerifier(VECTOR_SECRET, tolerance_s)


def test_a_bad_secret_fails_at_construction_without_quoting_it() -> None:
    with pytest.raises(ValueError, match="not valid base64") as caught:
        StandardWebhookVerifier("whsec_this is not base64 at all", TOLERANCE_S)
    assert "this is not base64" not in str(caught.value)


def test_the_key_stays_out_of_repr(verifier: StandardWebhookVerifier) -> None:
    shown = repr(verifier)
    assert shown == "StandardWebhookVerifier(tolerance_s=300)"
    assert verifier.tolerance_s == TOLERANCE_S
    assert not hasattr(verifier, "__dict__")  # no accidental vars() dump of the key
