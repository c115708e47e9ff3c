from scheduler.buffer import CoalescingBuffer, ContactGate
from scheduler.model import Lane


def make(min_size=3, max_size=5, linger_s=1.0):
    return CoalescingBuffer(min_size=min_size, max_size=max_size, linger_s=linger_s)


def test_same_contact_twice_in_a_segment_is_sent_once():
    buffer = make()
    assert buffer.add("seg", "c1", 0.0)
    assert not buffer.add("seg", "c1", 0.1)
    assert buffer.add("other", "c1", 0.1)
    assert len(buffer) == 2
    assert buffer.take("seg") == ["c1"]


def test_full_batch_is_due_at_once_and_capped_at_max_size():
    buffer = make()
    for i in range(7):
        buffer.add("seg", f"c{i}", 0.0)
    assert buffer.pick(0.0, spare_capacity=False) == "seg"
    assert buffer.take("seg") == [f"c{i}" for i in range(5)]
    # Two left: not due until the linger passes.
    assert buffer.pick(0.5, spare_capacity=False) is None
    assert buffer.pick(1.0, spare_capacity=False) == "seg"
    assert buffer.take("seg") == ["c5", "c6"]
    assert len(buffer) == 0


def test_small_batch_waits_for_linger_unless_capacity_is_spare():
    buffer = make()
    for i in range(3):
        buffer.add("seg", f"c{i}", 0.0)
    assert buffer.pick(0.1, spare_capacity=False) is None
    assert buffer.pick(0.1, spare_capacity=True) == "seg"  # min_size reached, writer idle
    buffer.take("seg")
    buffer.add("seg", "x", 0.2)
    assert buffer.pick(0.3, spare_capacity=True) is None  # below min_size: linger applies
    assert buffer.next_deadline() == 1.2
    assert buffer.pick(1.2, spare_capacity=False) == "seg"


def test_oldest_segment_goes_first_so_a_hot_segment_cannot_starve_others():
    buffer = make()
    buffer.add("quiet", "q1", 0.0)
    for i in range(20):
        buffer.add("hot", f"h{i}", 0.5)
    assert buffer.pick(0.6, spare_capacity=False) == "hot"  # only hot is due (full)
    assert buffer.pick(1.0, spare_capacity=False) == "quiet"  # quiet's linger expired: older


def test_retry_ids_are_due_at_once_and_go_before_fresh_ids():
    buffer = make()
    buffer.add("seg", "fresh", 10.0)
    buffer.add_retry("seg", ["r1", "r2", "fresh"])
    assert len(buffer) == 3
    assert buffer.pick(10.0, spare_capacity=False) == "seg"
    assert buffer.take("seg") == ["r1", "r2", "fresh"]


def test_contact_gate_limits_in_flight_segments_per_contact():
    gate: ContactGate[str] = ContactGate(3)
    assert [gate.admit("c", s) for s in ("s1", "s2", "s3", "s4", "s5")] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert gate.admit("other", "s1")
    assert gate.inflight("c") == 3
    assert gate.parked == 2
    assert gate.is_parked("c", "s4") and not gate.is_parked("c", "s1")
    assert gate.release("c") == ("s4", 0.0, Lane.LIVE)
    assert gate.inflight("c") == 3
    assert gate.release("c") == ("s5", 0.0, Lane.LIVE)
    assert gate.release("c") is None
    assert gate.inflight("c") == 2
    assert gate.release("c") is None
    assert gate.release("c") is None
    assert gate.inflight("c") == 0


def test_draining_makes_every_segment_due():
    buffer = make(linger_s=60.0)
    buffer.add("seg", "c1", 0.0)
    assert buffer.pick(1.0, spare_capacity=True) is None
    assert buffer.pick(1.0, spare_capacity=False, draining=True) == "seg"


def test_fresh_ids_keep_their_time_and_retries_have_none():
    buffer = make()
    buffer.add("seg", "a", 5.0)
    buffer.add("seg", "b", 6.0)
    buffer.add_retry("seg", ["r"])
    assert buffer.take_entries("seg") == [
        ("r", None, None),
        ("a", 5.0, Lane.LIVE),
        ("b", 6.0, Lane.LIVE),
    ]


def test_queued_bulk_finds_a_contacts_bulk_id_after_any_sequence_of_operations():
    """`queued_bulk` keeps a count per contact to skip its scan: the count must follow every
    way an id enters or leaves the bulk lane (add, set_lane, discard, take, drop)."""
    import random

    rng = random.Random(20)
    buffer: CoalescingBuffer[str] = CoalescingBuffer(min_size=1, max_size=3, linger_s=0.0)
    contacts = [f"c{i}" for i in range(4)]
    segments = [f"s{i}" for i in range(4)]
    for step in range(3_000):
        contact, segment = rng.choice(contacts), rng.choice(segments)
        lane = rng.choice([Lane.LIVE, Lane.BULK])
        operation = rng.randrange(5)
        if operation == 0:
            buffer.add(segment, contact, float(step), lane)
        elif operation == 1:
            buffer.set_lane(segment, contact, lane)
        elif operation == 2:
            buffer.discard(segment, contact)
        elif operation == 3:
            buffer.take_entries(segment)
        elif rng.random() < 0.2:
            buffer.drop_batch_key(segment)
        for each in contacts:
            expected = [s for s in segments if buffer.lane_of(s, each) is Lane.BULK]
            found = buffer.queued_bulk(each)
            # The count itself: one too many only costs a scan, and would go unnoticed above.
            assert buffer._bulk_ids.get(each, 0) == len(expected), (step, each)
            if expected:
                assert found is not None and found[0] in expected, (step, each)
            else:
                assert found is None, (step, each)
