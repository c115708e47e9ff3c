"""parse_events: shapes, id rule, numbers, caps, dedup, unknown keys and where errors point."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest

from listeners import MAX_EVENTS, MAX_SEGMENTS_PER_EVENT, WebhookRejected, parse_events
from listeners.payload import (
    EVERY_SEGMENT,
    MAX_KEPT_CHARS,
    dead_event,
    id_problem,
    kept_as_sent,
)
from scheduler.model import FailureReason, MembershipChange

ID_RULE = "must be 1-128 characters of A-Z a-z 0-9 _ . : -"


def body(document: Any) -> bytes:
    return orjson.dumps(document)


def event(contact: Any = "c1", segments: Any = ("s1",)) -> dict[str, Any]:
    return {"contactId": contact, "segmentIds": list(segments)}


def refused(raw: bytes) -> WebhookRejected:
    with pytest.raises(WebhookRejected) as caught:
        parse_events(raw)
    error = caught.value
    assert error.field is not None
    assert error.message.startswith(error.field.split(".")[0])
    return error


def test_one_event() -> None:
    assert parse_events(b'{"contactId": "c1", "segmentIds": ["s1", "s2"]}') == [
        MembershipChange("c1", ("s1", "s2"))
    ]


def test_an_array_of_events_keeps_order_and_repeated_contacts() -> None:
    events = [event("c2", ["b"]), event("c1", ["a"]), event("c2", ["c"])]
    assert parse_events(body(events)) == [
        MembershipChange("c2", ("b",)),
        MembershipChange("c1", ("a",)),
        MembershipChange("c2", ("c",)),
    ]


def test_every_character_the_id_rule_allows() -> None:
    ident = "AZaz09_.:-"
    assert parse_events(body(event(ident, [ident]))) == [MembershipChange(ident, (ident,))]


def test_contact_uuid_style_ids() -> None:
    contact = "contact_3f2b9c1e-8d4a-4e7b-9a61-0c5d2e7f8a90"
    assert parse_events(body(event(contact)))[0].contact_id == contact


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (0, "0"),
        (42, "42"),
        (9_223_372_036_854_775_807, "9223372036854775807"),
        (18_446_744_073_709_551_615, "18446744073709551615"),  # the largest 64-bit integer
        (-7, "-7"),  # "-7" passes the id rule as text, so it does as a number
    ],
)
def test_integer_ids_become_their_decimal_text(number: int, text: str) -> None:
    [request] = parse_events(body(event(number, [number, "x"])))
    assert request == MembershipChange(text, (text, "x"))


def test_a_number_and_its_text_are_the_same_id() -> None:
    [request] = parse_events(body(event("c1", [5, "5", 6])))
    assert request.segment_ids == ("5", "6")


@pytest.mark.parametrize(
    ("raw", "field", "detail"),
    [
        (b'{"contactId": true, "segmentIds": ["s"]}', "body.contactId", "not a boolean"),
        (b'{"contactId": "c", "segmentIds": [false]}', "body.segmentIds[0]", "not a boolean"),
        (b'{"contactId": null, "segmentIds": ["s"]}', "body.contactId", "not null"),
        (b'{"contactId": "c", "segmentIds": ["s", ["t"]]}', "body.segmentIds[1]", "not an array"),
        (b'{"contactId": {"id": 1}, "segmentIds": ["s"]}', "body.contactId", "not an object"),
        (b'{"contactId": 1.0, "segmentIds": ["s"]}', "body.contactId", "not a fraction"),
        (b'{"contactId": "c", "segmentIds": [2.5]}', "body.segmentIds[0]", "not a fraction"),
        (b'{"contactId": 1e3, "segmentIds": ["s"]}', "body.contactId", "not a fraction"),
        # Beyond 64 bits the parser yields a float: refused rather than rounded to another id.
        (
            b'{"contactId": 18446744073709551616, "segmentIds": ["s"]}',
            "body.contactId",
            "send such ids as strings",
        ),
    ],
)
def test_ids_of_the_wrong_type_are_422(raw: bytes, field: str, detail: str) -> None:
    error = refused(raw)
    assert (error.status, error.field) == (422, field)
    assert error.message.startswith(f"{field}: must be a string or an integer")
    assert detail in error.message


def test_the_field_path_names_the_event_and_the_entry() -> None:
    events = [event(), event(), event("c3", ["ok", "bad id"])]
    error = refused(body(events))
    assert error.status == 422
    assert error.field == "body[2].segmentIds[1]"
    assert error.message == f"body[2].segmentIds[1]: {ID_RULE} (got ' ' at index 3)"


def test_the_briefs_example_message() -> None:
    events = [event(), event(), event("c3", ["x" * 129])]
    error = refused(body(events))
    assert error.message == f"body[2].segmentIds[0]: {ID_RULE} (got 129 characters)"


@pytest.mark.parametrize(
    ("ident", "detail"),
    [
        ("", "got an empty string"),
        ("x" * 129, "got 129 characters"),
        ("a/b", "got '/' at index 1"),
        ("contact 1", "got ' ' at index 7"),
        ("caf\u00e9", "got '\u00e9' at index 3"),
        ("c1\n", "got '\\n' at index 2"),  # a regex with `$` would let this through
        ("a\x00", "got '\\x00' at index 1"),
        ("a,b", "got ',' at index 1"),
        ("seg#1", "got '#' at index 3"),
        ("\u0661", "got '\u0661' at index 0"),  # a digit, but not an ASCII one
    ],
)
def test_ids_failing_the_rule_are_422_with_what_is_wrong(ident: str, detail: str) -> None:
    contact = refused(body(event(ident)))
    assert (contact.status, contact.field) == (422, "body.contactId")
    assert contact.message == f"body.contactId: {ID_RULE} ({detail})"
    segment = refused(body([event("c1", ["s0", "s1", ident])]))
    assert (segment.status, segment.field) == (422, "body[0].segmentIds[2]")
    assert segment.message == f"body[0].segmentIds[2]: {ID_RULE} ({detail})"


def test_a_128_character_id_is_accepted() -> None:
    ident = "x" * 128
    assert parse_events(body(event(ident, [ident]))) == [MembershipChange(ident, (ident,))]


def test_duplicate_segments_are_dropped_keeping_first_occurrences() -> None:
    [request] = parse_events(body(event("c1", ["b", "a", "b", "c", "a", "b"])))
    assert request.segment_ids == ("b", "a", "c")


def test_an_empty_segment_list_is_422() -> None:
    error = refused(body([event(), event("c2", [])]))
    assert (error.status, error.field) == (422, "body[1].segmentIds")
    assert error.message == "body[1].segmentIds: must list at least one segment id"


@pytest.mark.parametrize(
    ("segments", "shown"),
    [("s1", "a string"), ({"s1": True}, "an object"), (None, "null"), (3, "a number")],
)
def test_segment_ids_that_are_not_an_array_are_400(segments: Any, shown: str) -> None:
    error = refused(body({"contactId": "c1", "segmentIds": segments}))
    assert (error.status, error.field) == (400, "body.segmentIds")
    assert error.message == f"body.segmentIds: must be an array of segment ids, not {shown}"


@pytest.mark.parametrize("missing", ["contactId", "segmentIds"])
def test_a_missing_key_is_400(missing: str) -> None:
    document = event()
    del document[missing]
    error = refused(body([event(), document]))
    assert (error.status, error.field) == (400, f"body[1].{missing}")
    assert error.message.startswith(f"body[1].{missing}: required")


def test_an_empty_object_names_the_first_missing_key() -> None:
    error = refused(b"{}")
    assert (error.status, error.field, error.message) == (
        400,
        "body.contactId",
        "body.contactId: required",
    )


def test_a_case_typo_key_is_400_with_a_suggestion() -> None:
    error = refused(b'{"contactId": "c1", "segmentIDs": ["s1"]}')
    assert (error.status, error.field) == (400, "body.segmentIDs")
    assert error.message == (
        "body: unknown key 'segmentIDs' (did you mean 'segmentIds'?); "
        "an event has only contactId, segmentIds, add, remove, set and occurredAt"
    )


def test_an_extra_key_beside_valid_ones_is_400() -> None:
    document = {**event(), "priority": "high"}
    error = refused(body([document]))
    assert (error.status, error.field) == (400, "body[0].priority")
    assert "unknown key 'priority'" in error.message


def test_many_long_unknown_keys_are_quoted_briefly() -> None:
    document = {**event(), **{f"{'k' * 100}{n}": n for n in range(8)}}
    error = refused(body(document))
    assert error.status == 400
    assert "unknown keys" in error.message
    assert "and 3 more" in error.message
    assert "k" * 41 not in error.message
    assert len(error.message) < 400


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"contactId": "c1",}',
        b"nul",
        b"[1e400]",
        b"{'contactId': 'c1'}",
        b"\xef\xbb\xbf{}",
    ],
)
def test_malformed_json_is_400(raw: bytes) -> None:
    error = refused(raw)
    assert (error.status, error.field) == (400, "body")
    assert error.message.startswith("body: not valid")


def test_a_non_utf8_body_is_400_pointing_at_the_byte() -> None:
    error = refused(b'{"contactId": "caf\xe9", "segmentIds": ["s1"]}')
    assert (error.status, error.field) == (400, "body")
    assert error.message == "body: not valid UTF-8 (byte 18); JSON must be UTF-8"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [(b'"c1"', "a string"), (b"42", "a number"), (b"null", "null"), (b"true", "a boolean")],
)
def test_a_body_that_is_neither_object_nor_array_is_400(raw: bytes, shown: str) -> None:
    error = refused(raw)
    assert (error.status, error.field) == (400, "body")
    assert error.message == (
        f"body: must be an event object or an array of event objects, not {shown}"
    )


@pytest.mark.parametrize(("element", "shown"), [("c1", "a string"), ([], "an array")])
def test_an_array_element_that_is_not_an_object_is_400(element: Any, shown: str) -> None:
    error = refused(body([event(), element]))
    assert (error.status, error.field) == (400, "body[1]")
    assert error.message == f"body[1]: must be an event object, not {shown}"


def test_an_empty_array_is_400() -> None:
    error = refused(b"[]")
    assert (error.status, error.field, error.message) == (
        400,
        "body",
        "body: empty array; send at least one event",
    )


def test_the_event_cap_is_inclusive() -> None:
    events = [event(f"c{n}") for n in range(MAX_EVENTS)]
    assert len(parse_events(body(events))) == MAX_EVENTS == 1000


def test_one_event_over_the_cap_refuses_the_delivery() -> None:
    events = [event(f"c{n}") for n in range(MAX_EVENTS + 1)]
    error = refused(body(events))
    assert (error.status, error.field) == (422, "body")
    assert error.message == "body: 1001 events; at most 1000 per delivery"


def test_the_segment_cap_is_inclusive() -> None:
    segments = [f"s{n}" for n in range(MAX_SEGMENTS_PER_EVENT)]
    [request] = parse_events(body(event("c1", segments)))
    assert len(request.segment_ids) == MAX_SEGMENTS_PER_EVENT == 100


def test_one_segment_over_the_cap_refuses_the_delivery() -> None:
    segments = [f"s{n}" for n in range(MAX_SEGMENTS_PER_EVENT + 1)]
    error = refused(body([event(), event("c2", segments)]))
    assert (error.status, error.field) == (422, "body[1].segmentIds")
    assert error.message == "body[1].segmentIds: 101 segment ids; at most 100 per event"


def test_the_segment_cap_counts_entries_before_dedup() -> None:
    # Documented: the cap bounds the work of reading the list, so duplicates count.
    error = refused(body(event("c1", ["s1"] * (MAX_SEGMENTS_PER_EVENT + 1))))
    assert (error.status, error.field) == (422, "body.segmentIds")


def test_the_first_problem_refuses_everything() -> None:
    # All or nothing: a valid first event is not returned beside the error.
    with pytest.raises(WebhookRejected):
        parse_events(body([event("c1"), event("bad id")]))


def test_rejection_statuses_are_limited() -> None:
    with pytest.raises(ValueError, match="status"):
        WebhookRejected(500, "internal")
    error = WebhookRejected(413, "body: too large", "body")
    assert (error.status, str(error), error.field) == (413, "body: too large", "body")
    assert repr(error) == "WebhookRejected(413, 'body: too large', field='body')"


# --- add, remove, set (mirror) and occurredAt -----------------------------------------------

NOW_MS = int(time.time() * 1000)


def one(document: Any) -> MembershipChange:
    [change] = parse_events(body(document))
    return change


def test_segment_ids_stay_adds_with_nothing_else() -> None:
    change = one(event("c1", ["a", "b"]))
    assert (change.add, change.remove, change.mirror, change.occurred_at) == (
        ("a", "b"),
        (),
        None,
        None,
    )


@pytest.mark.parametrize(
    ("document", "add", "remove"),
    [
        ({"contactId": "c1", "add": ["a", "b"]}, ("a", "b"), ()),
        ({"contactId": "c1", "remove": ["a"]}, (), ("a",)),
        ({"contactId": "c1", "add": ["a"], "remove": ["b", 7]}, ("a",), ("b", "7")),
        # segmentIds is the add list, so it combines with remove as add does.
        ({"contactId": "c1", "segmentIds": ["a"], "remove": ["b"]}, ("a",), ("b",)),
        # An empty list beside a non-empty one: the event still changes something.
        ({"contactId": "c1", "add": [], "remove": ["b"]}, (), ("b",)),
        ({"contactId": "c1", "add": ["a"], "remove": []}, ("a",), ()),
        ({"contactId": 5, "add": ["a", "a", "b", "a"], "remove": ["c", "c"]}, ("a", "b"), ("c",)),
    ],
)
def test_add_and_remove(document: dict[str, Any], add: tuple[str, ...], remove: tuple[str, ...]):
    change = one(document)
    assert (change.add, change.remove, change.mirror) == (add, remove, None)


@pytest.mark.parametrize(
    ("listed", "mirror"),
    [(["a", "b", "a"], ("a", "b")), ([], ()), ([3, "3"], ("3",))],
)
def test_set_is_the_mirror_and_may_be_empty(listed: list[Any], mirror: tuple[str, ...]) -> None:
    change = one({"contactId": "c1", "set": listed})
    assert (change.add, change.remove, change.mirror) == ((), (), mirror)


def test_new_forms_mix_with_old_ones_in_one_array() -> None:
    events = [
        event("c1", ["a"]),
        {"contactId": "c2", "remove": ["a"], "occurredAt": NOW_MS},
        {"contactId": "c3", "set": []},
    ]
    assert parse_events(body(events)) == [
        MembershipChange("c1", ("a",)),
        MembershipChange("c2", remove=("a",), occurred_at=NOW_MS / 1000),
        MembershipChange("c3", mirror=()),
    ]


@pytest.mark.parametrize(
    ("document", "field", "words"),
    [
        ({"contactId": "c", "set": ["a"], "add": ["b"]}, "body[0].set", "combined with add"),
        ({"contactId": "c", "set": [], "remove": ["b"]}, "body[0].set", "combined with remove"),
        (
            {"contactId": "c", "segmentIds": ["a"], "set": ["b"]},
            "body[0].set",
            "combined with segmentIds",
        ),
        (
            {"contactId": "c", "set": ["a"], "add": [], "remove": []},
            "body[0].set",
            "combined with add and remove",
        ),
        ({"contactId": "c", "segmentIds": ["a"], "add": ["b"]}, "body[0].add", "one of the two"),
        # The overlap names the entry of `remove` (after ids become text: 5 is "5").
        (
            {"contactId": "c", "add": ["a", "5"], "remove": ["x", 5]},
            "body[0].remove[1]",
            "'5' is also in add",
        ),
        (
            {"contactId": "c", "segmentIds": ["a"], "remove": ["a"]},
            "body[0].remove[0]",
            "'a' is also in segmentIds",
        ),
        ({"contactId": "c", "add": []}, "body[0].add", "must list at least one segment id"),
        ({"contactId": "c", "remove": []}, "body[0].remove", "must list at least one segment id"),
        (
            {"contactId": "c", "add": [], "remove": []},
            "body[0].add",
            "add and remove are both empty",
        ),
    ],
)
def test_contradictions_and_empty_changes_are_422(
    document: dict[str, Any], field: str, words: str
) -> None:
    error = refused(body([document]))
    assert (error.status, error.field) == (422, field)
    assert error.message.startswith(f"{field}: ")
    assert words in error.message


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"contactId": "c"}, "body.segmentIds"),
        ({"contactId": "c", "occurredAt": NOW_MS}, "body.segmentIds"),
        ({"add": ["a"]}, "body.contactId"),
        ({"set": []}, "body.contactId"),
        ({"contactId": "c", "add": "a"}, "body.add"),
        ({"contactId": "c", "remove": {"a": 1}}, "body.remove"),
        ({"contactId": "c", "set": None}, "body.set"),
        ({"contactId": "c", "remove": ["a"], "Remove": ["b"]}, "body.Remove"),
    ],
)
def test_missing_keys_wrong_shapes_and_unknown_keys_stay_400(
    document: dict[str, Any], field: str
) -> None:
    error = refused(body(document))
    assert (error.status, error.field) == (400, field)


def test_a_case_typo_of_a_new_key_gets_a_suggestion() -> None:
    error = refused(body({"contactId": "c", "remove": ["a"], "occurredat": NOW_MS}))
    assert (error.status, error.field) == (400, "body.occurredat")
    assert "did you mean 'occurredAt'?" in error.message


@pytest.mark.parametrize("key", ["add", "remove", "set"])
def test_ids_in_new_lists_follow_the_id_rule(key: str) -> None:
    error = refused(body([{"contactId": "c", key: ["ok", "bad id"]}]))
    assert (error.status, error.field) == (422, f"body[0].{key}[1]")
    assert error.message == f"body[0].{key}[1]: {ID_RULE} (got ' ' at index 3)"


@pytest.mark.parametrize("key", ["add", "remove", "set"])
def test_the_segment_cap_applies_to_each_new_list(key: str) -> None:
    ok = [f"s{n}" for n in range(MAX_SEGMENTS_PER_EVENT)]
    assert len(one({"contactId": "c", key: ok}).segment_ids) == MAX_SEGMENTS_PER_EVENT
    error = refused(body({"contactId": "c", key: [*ok, "one-more"]}))
    assert (error.status, error.field) == (422, f"body.{key}")
    assert error.message == f"body.{key}: 101 segment ids; at most 100 per event"


def test_the_segment_cap_counts_all_lists_of_an_event_together() -> None:
    adds = [f"a{n}" for n in range(60)]
    removes = [f"r{n}" for n in range(40)]
    change = one({"contactId": "c", "add": adds, "remove": removes})
    assert len(change.segment_ids) == MAX_SEGMENTS_PER_EVENT
    error = refused(body({"contactId": "c", "add": adds, "remove": [*removes, "r-extra"]}))
    assert (error.status, error.field) == (422, "body.remove")
    assert error.message == (
        "body.remove: 41 segment ids, 101 in this event's lists together; at most 100 per event"
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2026-01-01T10:00:00Z", 1767261600.0),
        ("2026-01-01t10:00:00z", 1767261600.0),  # RFC 3339 lets T and Z be lower case
        ("2026-01-01T10:00:00.5Z", 1767261600.5),
        ("2026-01-01T10:00:00.123456789Z", 1767261600.123456),  # microseconds are kept
        ("2026-01-01T11:30:00+01:30", 1767261600.0),
        ("2026-01-01T05:00:00-05:00", 1767261600.0),
        ("2026-01-01T10:00:00-00:00", 1767261600.0),  # "offset unknown", the time is UTC
        ("2000-01-01T00:00:00Z", 946684800.0),  # the earliest accepted
    ],
)
def test_occurred_at_as_rfc3339(text: str, seconds: float) -> None:
    change = one({"contactId": "c", "remove": ["a"], "occurredAt": text})
    assert change.occurred_at == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize("key", ["segmentIds", "add", "set"])
def test_occurred_at_goes_with_every_form(key: str) -> None:
    assert one({"contactId": "c", key: ["a"], "occurredAt": 1767261600250}).occurred_at == (
        1767261600.25
    )


def test_occurred_at_as_epoch_milliseconds_up_to_the_clock_margin() -> None:
    assert one({"contactId": "c", "add": ["a"], "occurredAt": 946684800000}).occurred_at == (
        946684800.0
    )
    soon = NOW_MS + 60_000  # a minute of clock skew is fine
    assert one({"contactId": "c", "add": ["a"], "occurredAt": soon}).occurred_at == soon / 1000


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("2026-01-01T10:00:00", "has no UTC offset; add Z or +HH:MM"),
        ("2026-01-01T10:00:00.250", "has no UTC offset"),
        ("2026-01-01", "must be an RFC 3339 time"),
        ("2026-01-01 10:00:00Z", "must be an RFC 3339 time"),  # ISO 8601 allows it; we do not
        ("20260101T100000Z", "must be an RFC 3339 time"),
        ("2026-W01-1T10:00:00Z", "must be an RFC 3339 time"),
        ("2026-01-01T10:00Z", "must be an RFC 3339 time"),
        ("2026-01-01T10:00:00+0100", "must be an RFC 3339 time"),
        ("\u0662026-01-01T10:00:00Z", "must be an RFC 3339 time"),  # a non-ASCII digit
        ("1767261600000", "or integer epoch milliseconds"),  # a number in a string
        ("", "must be an RFC 3339 time"),
        ("2026-02-30T10:00:00Z", "is not a valid time"),
        ("2026-01-01T24:00:00Z", "is not a valid time"),
        ("2026-01-01T10:00:00+24:00", "is not a valid time"),
        ("1999-12-31T23:59:59Z", "is before 2000-01-01T00:00:00Z"),
        ("2999-01-01T00:00:00Z", "ahead of segmapd's clock"),
        (1767261600, "before 2000-01-01T00:00:00Z (epoch seconds? send milliseconds)"),
        (0, "before 2000"),
        (-1, "before 2000"),
        # The id is fixed: test ids must not depend on when they are collected (each parallel
        # test worker collects them on its own).
        pytest.param(NOW_MS + 3_600_000, "ahead of segmapd's clock", id="an-hour-ahead"),
        (1767261600000.0, "not a fraction"),
        (1.5e12, "not a fraction"),
        (True, "not a boolean"),
        (None, "not null"),
        ([1767261600000], "not an array"),
        ({"ms": 1}, "not an object"),
        (2**64, "not a fraction"),  # beyond 64 bits the parser yields a float
    ],
)
def test_unacceptable_occurred_at_is_422_naming_it(value: Any, words: str) -> None:
    events = [event(), event(), {"contactId": "c", "remove": ["a"], "occurredAt": value}]
    # The stdlib writes integers orjson cannot (2**64) exactly as the sender would.
    error = refused(json.dumps(events).encode())
    assert (error.status, error.field) == (422, "body[2].occurredAt")
    assert error.message.startswith("body[2].occurredAt: ")
    assert words in error.message


def test_a_long_occurred_at_is_quoted_briefly() -> None:
    error = refused(body({"contactId": "c", "add": ["a"], "occurredAt": "9" * 10_000}))
    assert (error.status, error.field) == (422, "body.occurredAt")
    assert len(error.message) < 300


# ---- what dead letters keep ------------------------------------------------------------------


def test_a_value_within_the_bound_is_kept_whole_and_a_longer_one_visibly_shortened() -> None:
    assert kept_as_sent("") == ""
    assert kept_as_sent("x" * MAX_KEPT_CHARS) == "x" * MAX_KEPT_CHARS
    shortened = kept_as_sent("y" * 900_000)
    assert len(shortened) == MAX_KEPT_CHARS
    assert shortened.endswith("…[shortened from 900000 characters]")
    assert shortened.startswith("y" * 900)
    # A shortened value can never pass for an id.
    assert id_problem(shortened) is not None


def test_id_problem_says_what_is_wrong_without_quoting_the_value() -> None:
    assert id_problem("VIP") is None
    assert id_problem("") == "got an empty string"
    assert id_problem("a" * 5000) == "got 5000 characters"
    assert id_problem("Gold Tier") == "got ' ' at index 4"


def test_a_dead_event_bounds_ids_values_and_lists_and_says_so() -> None:
    many = tuple(f"s{i}" for i in range(MAX_SEGMENTS_PER_EVENT + 20))
    change = MembershipChange("c" * 2000, mirror=(*many, "v" * 3000), occurred_at=1.5e9)
    dead = dead_event(change, FailureReason.SEGMENT_NOT_FOUND, "why", "key-1")
    assert dead.change.contact_id == kept_as_sent("c" * 2000)
    assert dead.change.mirror == many[:MAX_SEGMENTS_PER_EVENT]
    assert dead.change.occurred_at == 1.5e9
    assert dead.message == (
        f"why (this dead letter keeps the first {MAX_SEGMENTS_PER_EVENT} of the event's "
        f"{MAX_SEGMENTS_PER_EVENT + 21} segment values)"
    )
    assert (dead.reason, dead.key) == (FailureReason.SEGMENT_NOT_FOUND, "key-1")
    small = dead_event(
        MembershipChange("c", add=("a", "v" * 3000, "a")), FailureReason.SEGMENT_NOT_FOUND, "m"
    )
    assert small.change.add == ("a", kept_as_sent("v" * 3000))
    assert (small.message, small.key) == ("m", None)


@pytest.mark.parametrize(
    "change",
    [MembershipChange("bad id", mirror=()), MembershipChange("bad id", occurred_at=1.5e9)],
)
def test_a_dead_event_naming_no_segment_is_a_removal_from_every_segment(
    change: MembershipChange,
) -> None:
    dead = dead_event(change, FailureReason.INVALID_CONTACT_ID, "m")
    assert dead.change == MembershipChange(
        "bad id", remove=(EVERY_SEGMENT,), occurred_at=change.occurred_at
    )
    assert EVERY_SEGMENT == "*"
    assert id_problem(EVERY_SEGMENT) is not None
