"""A key repeated within one JSON object is refused with a 400 naming it, never last-one-wins."""

from __future__ import annotations

import orjson
import pytest

from listeners import WebhookRejected, parse_events
from listeners.payload import loads_unique, may_repeat_keys


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"contactId": "c1", "segmentIds": ["a"], "contactId": "c2"}', "body.contactId"),
        (b'{"contactId": "c1", "segmentIds": ["a"], "segmentIds": ["b"]}', "body.segmentIds"),
        (
            b'[{"contactId": "c1", "segmentIds": ["a"]},'
            b' {"segmentIds": ["a"], "contactId": "c2", "segmentIds": []}]',
            "body[1].segmentIds",
        ),
        # Spelled with an escape, the key is the same key once decoded.
        (b'{"contactId": "c1", "segmentIds": ["a"], "contact\\u0049d": "c2"}', "body.contactId"),
    ],
)
def test_a_repeated_event_key_is_refused_naming_it(body: bytes, field: str) -> None:
    with pytest.raises(WebhookRejected) as caught:
        parse_events(body)
    assert caught.value.status == 400
    assert caught.value.field == field
    assert field.rsplit(".", 1)[1] in caught.value.message


def test_a_value_spelled_like_a_key_is_not_a_repeat() -> None:
    events = parse_events(b'{"contactId": "contactId", "segmentIds": ["segmentIds"]}')
    assert (events[0].contact_id, events[0].segment_ids) == ("contactId", ("segmentIds",))


def test_loads_unique_finds_a_repeat_at_any_depth() -> None:
    with pytest.raises(WebhookRejected) as caught:
        loads_unique(b'{"a": [1, {"b": {"c": 1, "c": 2}}]}')
    assert caught.value.field == "body.a[1].b.c"
    assert loads_unique(b'{"contactIds": ["x"]}') == {"contactIds": ["x"]}


def test_a_document_too_deep_for_the_exact_check_is_a_400() -> None:
    with pytest.raises(WebhookRejected) as caught:
        loads_unique(b"[" * 100_000 + b"]" * 100_000)
    assert caught.value.status == 400


# Every key an event may have, repeated in each position the pre-check has to see through: alone,
# in the second event of an array while another event lacks the key (so a count per key equal to
# the number of events proves nothing), spelled with a \u escape, and with colons in values that
# the pre-check credits back (RFC 3339 times, ids such as urn:crm:1).
@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"contactId": "c", "add": ["a"], "add": ["b"]}', "body.add"),
        (b'{"contactId": "c", "remove": ["a"], "remove": []}', "body.remove"),
        (b'{"contactId": "c", "set": ["a"], "set": []}', "body.set"),
        (
            b'{"contactId": "c", "add": ["a"], "occurredAt": 1767261600000,'
            b' "occurredAt": 1767261600001}',
            "body.occurredAt",
        ),
        (
            b'[{"contactId": "c1", "segmentIds": ["a"]},'
            b' {"contactId": "c2", "add": ["a"], "add": ["b"]}]',
            "body[1].add",
        ),
        (
            b'[{"contactId": "c1", "remove": ["a"], "remove": ["b"]},'
            b' {"contactId": "c2", "add": ["a"]}]',
            "body[0].remove",
        ),
        (
            b'[{"contactId": "c1", "set": []}, {"contactId": "c2", "set": [], "set": ["x"]},'
            b' {"contactId": "c3", "segmentIds": ["a"]}]',
            "body[1].set",
        ),
        (b'{"contactId": "c", "add": ["a"], "\\u0061dd": ["b"]}', "body.add"),
        (b'{"contactId": "c", "set": ["a"], "s\\u0065t": []}', "body.set"),
        (
            b'{"contactId": "c", "add": ["a"], "occurredAt": "2026-01-01T10:00:00Z",'
            b' "occurred\\u0041t": "2026-01-01T10:00:01Z"}',
            "body.occurredAt",
        ),
        (
            b'{"contactId": "urn:crm:1", "remove": ["seg:a"], "occurredAt":'
            b' "2026-01-01T10:00:00+01:00", "occurredAt": "2026-01-01T10:00:00Z"}',
            "body.occurredAt",
        ),
        (
            b'[{"contactId": "c1", "add": ["a:b:c:d:e"]},'
            b' {"contactId": "c2", "remove": ["x"], "remove": ["y"]}]',
            "body[1].remove",
        ),
        # An escaped colon decodes to one without being a colon byte: it must not be credited.
        (b'{"contactId": "c", "add": ["a"], "add": ["x\\u003ay"]}', "body.add"),
        # A repeat inside something nested in an event is found and named too.
        (b'{"contactId": "c", "add": [{"id": "a", "id": "b"}]}', "body.add[0].id"),
        (
            b'[{"contactId": "c", "set": [], "occurredAt": {"t": 1, "t": 2}}]',
            "body[0].occurredAt.t",
        ),
    ],
)
def test_a_repeated_key_of_the_new_forms_is_refused_naming_it(raw: bytes, field: str) -> None:
    with pytest.raises(WebhookRejected) as caught:
        parse_events(raw)
    assert caught.value.status == 400
    assert caught.value.field == field
    assert "appears more than once" in caught.value.message


def test_a_repeat_is_reported_before_a_refusal_of_the_copy_that_was_kept() -> None:
    # orjson keeps the second `add`, which overlaps `remove` (a 422); the repeat comes first.
    raw = b'{"contactId": "c", "add": ["a"], "remove": ["b"], "add": ["b"]}'
    with pytest.raises(WebhookRejected) as caught:
        parse_events(raw)
    assert (caught.value.status, caught.value.field) == (400, "body.add")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"contactId": "add", "add": ["remove", "set", "occurredAt", "segmentIds"]}',
        b'{"contactId": "urn:crm:1", "add": ["a:b", "c:d"], "occurredAt": "2026-01-01T10:00:00Z"}',
        b'[{"contactId": "c1", "set": []}, {"contactId": "c:2", "remove": ["x:y"]}]',
        b'{"contactId": "c\\u0031", "remove": ["a"]}',
    ],
)
def test_values_spelled_like_keys_or_holding_colons_are_not_repeats(raw: bytes) -> None:
    document = orjson.loads(raw)
    assert len(parse_events(raw)) == (len(document) if isinstance(document, list) else 1)


@pytest.mark.parametrize(
    ("raw", "may_repeat"),
    [
        # No colon beyond the keys: no repeat possible, nothing more is looked at.
        (b'[{"contactId": "c1", "add": ["a"]}]', False),
        # Colons in values and nested keys are matched by orjson's rewrite of the document.
        (b'[{"id": "urn:a:1", "at": "10:00:00", "more": {"x": {"y": "z:z"}}}]', False),
        (b'[{"id": "urn:a:1", "more": {"x": 1, "x": 2}}]', True),
        (b'[{"id": "urn:a:1", "id": "urn:a:2"}]', True),
        # A backslash may spell a colon that is no colon in the body: the exact check decides.
        (b'[{"id": "urn:a:1", "v": "\\u003a"}]', True),
        # Deeper than orjson writes: the exact check decides.
        (b'[{"d": ' + b'{"k": ' * 300 + b"1" + b"}" * 300 + b"}]", True),
    ],
)
def test_the_cheap_scan_never_misses_a_repeat_and_rarely_asks_for_the_exact_check(
    raw: bytes, may_repeat: bool
) -> None:
    document = orjson.loads(raw)
    assert may_repeat_keys(raw, document) is may_repeat
