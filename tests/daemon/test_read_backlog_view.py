"""The read backlog beside a contact's pairs: estimates per lane (review of issue 21, 6)."""

from __future__ import annotations

from daemon.http import read_backlog_view
from scheduler.model import Lane
from scheduler.validation import LaneBacklog, ReadBacklog


def backlog(live: int, bulk: int) -> ReadBacklog:
    lanes = {
        Lane.LIVE: LaneBacklog(waiting=live, oldest_wait_s=1.0, awaiting_refresh=0, reading=0),
        Lane.BULK: LaneBacklog(waiting=bulk, oldest_wait_s=9.0, awaiting_refresh=0, reading=0),
    }
    return ReadBacklog(
        waiting=live + bulk, oldest_wait_s=9.0, awaiting_refresh=0, reading=0, lanes=lanes
    )


def test_a_live_pair_is_told_the_live_queue_only_during_a_backfill():
    view = read_backlog_view(backlog(live=100, bulk=3_000_000), 50.0, {Lane.LIVE})
    assert view["estimatedDrainS"] == 2.0
    assert view["lanes"]["live"]["estimatedDrainS"] == 2.0
    assert view["lanes"]["bulk"]["estimatedDrainS"] == 60_002.0


def test_a_bulk_pair_or_no_lane_given_is_told_the_whole_backlog():
    for lanes in ({Lane.BULK}, {Lane.LIVE, Lane.BULK}, set()):
        view = read_backlog_view(backlog(live=100, bulk=400), 50.0, lanes)
        assert view["estimatedDrainS"] == 10.0, lanes
