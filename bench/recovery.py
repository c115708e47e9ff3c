"""Recovery benchmark: start-up with 1,000,000 journaled pending assignments until ready.

The journal is built directly in the schema of `daemon.store.sqlite` (its `connect()` creates
and migrates the file; 1,000,000 `queued` rows, 500,000 contacts x 2 segments, each with its
`queued:<time>;` history, and the 500,000 webhook deliveries that brought them, are inserted in
one transaction), then copied afresh for each start, since a started daemon begins to work the
queue off. Each start times `segmapd run` from process
start to the first 200 from `/readyz` (which also obtains a CXone token: the emulator). The
daemon is then stopped with a short drain budget; the copy is thrown away. Reference in the same
run: the same daemon starting on an empty journal. Median of 3 starts each.
Target (docs/architecture.md, "Performance targets"): ready in <= 5 s.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from bench._daemon import (
    QUEUED_COLUMNS,
    UNLIMITED,
    daemon_config,
    daemon_process,
    metric_total,
    new_secret,
    queued_rows,
    start_emulator,
    wait_ready,
    workdir,
)
from daemon.store.sqlite import connect

CONTACTS = 500_000
SEGMENTS_PER_CONTACT = 2
SEGMENT_POOL = 50
RUNS = 3
TARGET_S = 5.0


def build_journal(path: Path) -> int:
    """A journal file holding CONTACTS x SEGMENTS_PER_CONTACT queued assignments."""
    connection = connect(str(path), "OFF")
    now = time.time()

    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            f"INSERT INTO assignments ({QUEUED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            queued_rows(now, CONTACTS, SEGMENTS_PER_CONTACT, SEGMENT_POOL),
        )
        # The deliveries that brought them: the daemon builds its delivery filter from these.
        connection.executemany(
            "INSERT INTO deliveries (source, delivery_id, answer, received_at) VALUES (?, ?, ?, ?)",
            (
                ("crm", f"msg_{i}", b'{"accepted":2,"duplicates":0}', now - 60)
                for i in range(CONTACTS)
            ),
        )
        connection.execute("COMMIT")
        count = int(connection.execute("SELECT count(*) FROM assignments").fetchone()[0])
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()
    return count


def start_once(emulator_url: str, root: Path, pristine: Path | None, run: str) -> tuple[float, int]:
    """Seconds from `segmapd run` starting to /readyz answering 200, on a copy of `pristine`;
    and how many assignments the ready daemon knows (in any state, or finished since)."""
    directory = root / run
    directory.mkdir()
    journal = directory / "journal.db"
    if pristine is not None:
        shutil.copyfile(pristine, journal)
    config = directory / "segmapd.toml"
    config.write_text(
        daemon_config(
            emulator_url,
            {
                "server": {
                    "high_water": 4 * CONTACTS * SEGMENTS_PER_CONTACT,
                    "drain_budget_s": 1.0,
                },
                "store": {"url": f"sqlite://{journal}", "synchronous": "FULL"},
                "sources.crm": {"kind": "standard", "secret": new_secret()},
            },
        )
    )
    daemon = daemon_process(config)
    started = time.monotonic()
    try:
        url = daemon.start(timeout_s=120)
        ready = wait_ready(url, timeout_s=120)
        known = metric_total(url, "segmapd_assignments") + metric_total(
            url, "segmapd_assignments_finished_total"
        )
    finally:
        daemon.stop(timeout_s=30)
    shutil.rmtree(directory, ignore_errors=True)
    return ready - started, int(known)


def main() -> int:
    """Run the recovery benchmark and print its figures."""
    with workdir("recovery") as tmp:
        root = Path(tmp)
        pristine = root / "pristine.db"
        built = time.monotonic()
        count = build_journal(pristine)
        build_s = time.monotonic() - built
        size_mb = pristine.stat().st_size / 1_048_576
        emulator = start_emulator(root, UNLIMITED)
        try:
            empty_runs = [start_once(emulator.url, root, None, f"empty-{i}") for i in range(RUNS)]
            full_runs = [start_once(emulator.url, root, pristine, f"full-{i}") for i in range(RUNS)]
        finally:
            emulator.stop()
    empty = [seconds for seconds, _ in empty_runs]
    full = [seconds for seconds, _ in full_runs]
    print(
        f"recovery: segmapd run on a journal of {count:,} queued assignments ({size_mb:.0f} MB, "
        f"built in {build_s:.1f} s), process start -> first /readyz 200; median of {RUNS}"
    )
    print(
        f"  empty journal            {statistics.median(empty):.2f} s   (reference, same run; "
        + ", ".join(f"{s:.2f}" for s in empty)
        + ")"
    )
    print(
        f"  1M pending journal       {statistics.median(full):.2f} s   (target <= {TARGET_S:g} s; "
        + ", ".join(f"{s:.2f}" for s in full)
        + ")"
    )
    # A start that did not load the journal would be fast for the wrong reason.
    loaded = [known for _, known in full_runs]
    if any(known != count for known in loaded):
        print(f"  INVALID: the ready daemon knew {loaded} assignments, the journal holds {count:,}")
        return 1
    print(f"  journal check            all {count:,} assignments known to each ready daemon")
    if statistics.median(full) > TARGET_S:
        print(f"  MISSED the target: {statistics.median(full):.2f} s > {TARGET_S:g} s")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
