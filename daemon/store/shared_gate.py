"""One rate gate per endpoint class for every instance sharing a PostgreSQL database.

`scheduler.ratelimit.RateGate` paces one process: GCRA at CXone's rate with a tolerance much
smaller than CXone's, so that the jitter between our admission and CXone's count fits in the
difference. N instances each running their own RateGate would send N times the tenant's limit.
`SharedRateGate` is the same GCRA with the same tolerance, but its state, the theoretical
arrival time (TAT) and the end of the `Retry-After` pause, lives in one row per class of
`segmapd_gates`, so all instances together are paced as one.

Design:

- **The database's clock.** The TAT and the pause end are seconds since the epoch as the
  database sees them (`clock_timestamp()`). The reservation statement answers with a delay
  relative to the database's own now, and the instance sleeps that delay on its own monotonic
  clock. Instances on different hosts therefore need no clock agreement: only their clock
  *rates* must agree, over a delay of at most a pause.
- **One statement per admission.** Reading the TAT and writing it back in two round trips
  would let two instances read the same TAT and both take the same slot. One statement locks
  the row (`FOR UPDATE`), computes `admit_at = greatest(now, tat - tolerance, paused_until)`,
  moves the TAT on to `greatest(tat, admit_at) + 1 / rate` and returns `admit_at - now`: one
  round trip, and the row is locked only for the statement (autocommit), so instances queue on
  it for microseconds, not for their sleep. The statement reads the database clock only after
  the row lock is held, so a wait for the lock cannot make `now` stale.
- **A late reservation is void.** A reservation is a slot at one moment, granted knowing the
  TAT and the pause at that moment. An instance that wakes well after its slot (the process was
  stopped, the event loop stalled, the host was suspended) would send into slots since given to
  other instances, and past any pause another instance recorded meanwhile after a 429: so it is
  not admitted, and takes a new reservation that sees the row as it is now. The slot it held is
  lost, which errs on the side of the tenant's limit.
- **No admission without the database.** While the database is unreachable nothing of the class
  is sent: an instance that could not reserve cannot know what the others took. Reservation
  attempts are retried with capped backoff, and the time counts as waiting.

Within one instance callers are admitted one at a time, in the order they asked (a fair lock,
as in RateGate), so one instance holds at most one reservation at a time. A 429 pauses the
class in this instance at once and is recorded in the shared row from a background task, which
every other instance's next reservation honours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable

import asyncpg

from daemon.store.pg_common import UNAVAILABLE, describe
from scheduler.ratelimit import gcra_parameters

log = logging.getLogger(__name__)

#: The table of shared gate state, one row per endpoint class (added to the store's migrations).
GATES_DDL = (
    "CREATE TABLE segmapd_gates ("
    "name TEXT PRIMARY KEY, "
    "tat DOUBLE PRECISION NOT NULL DEFAULT 0, "
    "paused_until DOUBLE PRECISION NOT NULL DEFAULT 0)"
)

# A reservation slept past by more than this is void (see the module docstring). Well above the
# normal lateness of a wake-up (a timer tick, a busy event loop: milliseconds to tens of them),
# so that load alone does not throw slots away; well below a pause (seconds), so that a process
# stopped through another instance's 429 pause cannot send into it.
LATE_MARGIN_S = 0.25
# Backoff between attempts while the database cannot be reached or the store is not open: short
# at first (a lost connection is usually replaced at once), capped so that a recovered database
# is noticed within about a second.
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 1.0
# How long one connection checkout or one statement may take before it counts as an outage.
STATEMENT_TIMEOUT_S = 5.0


# The row lock is taken first; the database clock is read in a CTE that depends on the locked
# row, so it is read after any wait for the lock. MATERIALIZED keeps each step evaluated once.
_RESERVE = """
WITH locked AS MATERIALIZED (
    SELECT tat, paused_until FROM segmapd_gates WHERE name = $1 FOR UPDATE
), clock AS MATERIALIZED (
    SELECT tat, paused_until,
           extract(epoch FROM clock_timestamp())::double precision AS now
    FROM locked
), slot AS (
    SELECT tat, paused_until, now, greatest(now, tat - $3, paused_until) AS admit_at FROM clock
)
UPDATE segmapd_gates AS g
SET tat = greatest(slot.tat, slot.admit_at) + $2
FROM slot
WHERE g.name = $1
RETURNING slot.admit_at - slot.now, g.tat - slot.now, slot.paused_until - slot.now
"""

_CREATE_ROW = "INSERT INTO segmapd_gates (name) VALUES ($1) ON CONFLICT (name) DO NOTHING"

_RECORD_PAUSE = """
INSERT INTO segmapd_gates AS g (name, paused_until)
VALUES ($1, extract(epoch FROM clock_timestamp())::double precision + $2)
ON CONFLICT (name) DO UPDATE SET paused_until = greatest(g.paused_until, excluded.paused_until)
"""


class _PoolNotOpen(Exception):
    """The store has no pool yet (or any more): wait as for an outage."""

    def __str__(self) -> str:
        return "the store is not open"


class SharedRateGate:
    """One endpoint class's admission at `rate_per_s`, shared by every instance on the database.

    A drop-in for RateGate: the same pacing and the same pause on a 429, in every instance.

    `pool()` returns the store's connection pool, or None while the store is not open (the
    gate then waits, as during an outage). `rate_per_s` is the tenant's limit for the class:
    every instance must be given the same rate and tolerance. `late_reservations` counts the
    reservations voided because they were slept past (see the module docstring).
    """

    def __init__(
        self,
        name: str,
        rate_per_s: float,
        pool: Callable[[], asyncpg.Pool | None],
        *,
        tolerance_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self.rate_per_s = rate_per_s
        self.tolerance_s, self._interval = gcra_parameters(name, rate_per_s, tolerance_s)
        self._pool = pool
        self._clock = clock
        self._sleep = sleep
        self._turn = asyncio.Lock()
        # Local knowledge, on the local clock: the TAT and shared pause as of the last
        # reservation, and the pause this instance itself began.
        self._known_tat = -math.inf
        self._known_shared_pause = 0.0
        self._paused_until = 0.0
        self._pause_writer: asyncio.Task[None] | None = None
        self._pause_dirty = False
        self._outage_since: float | None = None
        self._closed = False
        self.waited_s = 0.0  # total time callers spent waiting here (for metrics)
        self.late_reservations = 0

    def __repr__(self) -> str:
        return f"SharedRateGate({self.name!r}, {self.rate_per_s}/s)"

    # ---- the Gate protocol ----------------------------------------------------------------------

    @property
    def paused_for(self) -> float:
        """Seconds left of the 429 pause as this instance knows it (0 when not paused)."""
        until = max(self._paused_until, self._known_shared_pause)
        return max(0.0, until - self._clock())

    def pause(self, seconds: float) -> None:
        """Hold every request of this class for `seconds` (a 429's Retry-After).

        Here at once; in every instance once the shared row has it (written in the background).
        """
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        if self._closed:
            return
        self._pause_dirty = True
        if self._pause_writer is None or self._pause_writer.done():
            self._pause_writer = asyncio.get_running_loop().create_task(
                self._write_pause(), name=f"gate {self.name}: record pause"
            )

    def has_capacity(self) -> bool:
        """Whether a request could probably go now without waiting.

        A local estimate from the last known TAT and pause, no round trip: another instance may
        have taken the slot since.
        """
        if self._turn.locked():
            return False
        now = self._clock()
        return (
            now >= self._known_tat - self.tolerance_s
            and now >= self._paused_until
            and now >= self._known_shared_pause
        )

    async def acquire(self) -> None:
        """Wait until a request of this class may be sent.

        That is: a slot reserved in the shared row, the local and the shared pause over, and
        the slot not slept past.
        """
        started = self._clock()
        try:
            async with self._turn:
                while True:
                    await self._wait_local_pause()
                    delay, tat_in, shared_pause_in = await self._reserve()
                    received = self._clock()
                    target = received + delay
                    self._known_tat = received + tat_in
                    self._known_shared_pause = received + shared_pause_in
                    pauses_before = self._paused_until
                    if delay > 0:
                        await self._sleep(delay)
                    now = self._clock()
                    if now - target > LATE_MARGIN_S:
                        self.late_reservations += 1
                        log.info(
                            "rate gate %s: woke %.3f s after its slot; the slot is void and a "
                            "new one is reserved",
                            self.name,
                            now - target,
                        )
                        continue
                    if self._paused_until > pauses_before and self._paused_until > now:
                        # A 429 of this class arrived while we slept: the slot predates it.
                        continue
                    return
        finally:
            self.waited_s += self._clock() - started

    async def close(self) -> None:
        """Stop the background pause writer (a pause not yet recorded is dropped); idempotent."""
        self._closed = True
        writer, self._pause_writer = self._pause_writer, None
        if writer is not None and not writer.done():
            writer.cancel()
        if writer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    # ---- internals ------------------------------------------------------------------------------

    async def _wait_local_pause(self) -> None:
        while (wait := self._paused_until - self._clock()) > 0:
            await self._sleep(wait)

    async def _reserve(self) -> tuple[float, float, float]:
        """One reservation: (delay, TAT, shared pause end), relative to the database's now.

        Retried until the database answers; never returns without a reservation.
        """
        backoff = BACKOFF_INITIAL_S
        while True:
            try:
                row = await self._fetch_reservation()
            except (_PoolNotOpen, *UNAVAILABLE) as exc:
                self._outage(exc)
                await self._sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                continue
            self._recovered()
            return row

    async def _fetch_reservation(self) -> tuple[float, float, float]:
        pool = self._pool()
        if pool is None:
            raise _PoolNotOpen
        async with pool.acquire(timeout=STATEMENT_TIMEOUT_S) as connection:
            for _ in range(2):
                row = await connection.fetchrow(
                    _RESERVE,
                    self.name,
                    self._interval,
                    self.tolerance_s,
                    timeout=STATEMENT_TIMEOUT_S,
                )
                if row is not None:
                    return float(row[0]), float(row[1]), float(row[2])
                # The class has no row yet: the first reservation of a new class makes it.
                await connection.execute(_CREATE_ROW, self.name, timeout=STATEMENT_TIMEOUT_S)
        raise RuntimeError(f"rate gate {self.name}: its row vanished while it was reserved")

    async def _write_pause(self) -> None:
        """Record the local pause in the shared row until it is recorded or over."""
        backoff = BACKOFF_INITIAL_S
        while self._pause_dirty:
            self._pause_dirty = False
            # The pause's end on the local clock, as seconds from now: recorded against the
            # database's now, so a write that was retried does not lengthen it.
            while (remaining := self._paused_until - self._clock()) > 0:
                try:
                    pool = self._pool()
                    if pool is None:
                        raise _PoolNotOpen
                    async with pool.acquire(timeout=STATEMENT_TIMEOUT_S) as connection:
                        await connection.execute(
                            _RECORD_PAUSE, self.name, remaining, timeout=STATEMENT_TIMEOUT_S
                        )
                except (_PoolNotOpen, *UNAVAILABLE) as exc:
                    self._outage(exc)
                    await self._sleep(backoff * random.uniform(0.5, 1.0))
                    backoff = min(BACKOFF_MAX_S, backoff * 2)
                    continue
                except Exception:
                    # Not an outage (a bug): other instances will not see this pause, but this
                    # one keeps it, and the next pause tries again.
                    log.exception("rate gate %s: could not record a pause", self.name)
                    return
                self._recovered()
                break

    def _outage(self, exc: BaseException) -> None:
        if self._outage_since is None:
            self._outage_since = self._clock()
            log.warning(
                "rate gate %s: cannot reach the database (%s); no request of the class is "
                "admitted until it answers",
                self.name,
                describe(exc),
            )

    def _recovered(self) -> None:
        if self._outage_since is not None:
            log.info(
                "rate gate %s: the database answers again after %.1f s",
                self.name,
                self._clock() - self._outage_since,
            )
            self._outage_since = None
