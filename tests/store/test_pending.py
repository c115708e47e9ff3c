"""The queue of a durable journal's next transaction (`PendingWork`), on its own."""

from __future__ import annotations

from daemon.store.pending import AssignmentRow, PendingWork


def row(state: str, source: str, at: float) -> AssignmentRow:
    return ("c", "s", state, None, "", 0, 1.0, at, "add", 0.0, "live", source)


def test_a_failed_transaction_retried_keeps_the_source_of_the_start_it_held():
    # The start of a pair failed to commit; its next transition was queued meanwhile. The
    # retry commits them as one row, which must still name the start's source.
    failed = PendingWork()
    failed.assignments[("c", "s")] = row("queued", "crm", 1.0)
    later = PendingWork()
    later.assignments[("c", "s")] = row("sending", "", 2.0)
    failed.absorb(later)
    assert failed.assignments[("c", "s")] == row("sending", "crm", 2.0)
    # A later start names its own source, which wins.
    restart = PendingWork()
    restart.assignments[("c", "s")] = row("queued", "hubspot", 3.0)
    failed.absorb(restart)
    assert failed.assignments[("c", "s")][11] == "hubspot"
