"""A key repeated within one JSON object is refused with a 400 naming it, never last-one-wins."""

from __future__ import annotations

import pytest

from listeners import WebhookRejected, parse_events
from listeners.payload import loads_unique


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
