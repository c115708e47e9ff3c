import pytest

from scheduler.idempotency import MAX_KEY_LENGTH, new_batch_key, new_single_key
from scheduler.model import Assignment, FailureReason, InvalidTransition, State


def test_happy_path_is_recorded_with_timestamps():
    a = Assignment("c1", "s1", history=[(State.QUEUED, 1.0)])
    for t, state in enumerate(
        [State.SENDING, State.WRITTEN, State.VERIFYING, State.ACTIVE], start=2
    ):
        a.transition(state, float(t))
    assert a.terminal
    assert [s for s, _ in a.history or []] == [
        "queued",
        "sending",
        "written",
        "verifying",
        "active",
    ]
    assert a.updated_at == 5.0


def test_failure_carries_reason_and_restart_is_allowed():
    a = Assignment("c1", "s1")
    a.transition(State.FAILED, 1.0, reason=FailureReason.CONTACT_NOT_FOUND, message="404")
    assert a.reason is FailureReason.CONTACT_NOT_FOUND
    a.transition(State.QUEUED, 2.0)
    assert a.reason is None


def test_illegal_transition_is_refused():
    a = Assignment("c1", "s1")
    with pytest.raises(InvalidTransition):
        a.transition(State.ACTIVE, 1.0)


def test_keys_are_unique_per_body_and_never_shared_across_segments():
    keys = {new_batch_key("seg-a") for _ in range(1000)}
    assert len(keys) == 1000
    assert all(k.startswith("seg-a:") for k in keys)
    assert new_batch_key("seg-a") != new_batch_key("seg-b")
    long_id = "s" * 128
    assert len(new_batch_key(long_id)) <= MAX_KEY_LENGTH
    single = new_single_key(long_id, "c" * 128)
    assert len(single) <= MAX_KEY_LENGTH
    assert all(33 <= ord(ch) < 127 for ch in single)


def test_storable_text_replaces_only_what_no_journal_keeps() -> None:
    from scheduler.model import storable

    assert storable("100000000123") == "100000000123"
    assert storable("Vérité") == "Vérité"
    assert storable("a\x00b") == "a\ufffdb"
    assert storable("lone \udcff surrogate") == "lone ? surrogate"
    assert storable("lone \udcff surrogate").encode("utf-8")
