"""Drift reconcile: re-read the memberships segmapd holds, and repair what CXone no longer shows.

`active` is true the moment CXone confirms it; months later someone may have edited the segment
in CXone's UI, another integration removed the contact, or CXone lost an index entry. A **pass**
re-reads every tracked membership (an add confirmed `active`, a removal confirmed `removed`,
as the journal holds them) and compares CXone's answer with the intent segmapd holds. A
mismatch is **drift**: journaled against the pair, logged, counted, and (unless the pass is a
dry run) the pair is queued again in the bulk lane with the intent segmapd holds, through the
same path as any change (`Repairs.repair`), so that CXone converges. A membership segmapd never
made is never read; a pair with newer work in progress is skipped (the newer change wins).

Reads are the scarce budget, and validation's come first: a pass reads at most `read_share` of
`read_rps`, evenly (an aiolimiter bucket of one read), and each of its reads takes a slot of the
read gate only when validation has none due (`SpareReads.spare_read`), so a pass never delays a
confirmation. A scheduled pass is spread over its interval (never faster than the share).

At most one pass runs, in one process: the one that `leads` (a single process always does; of
several on one PostgreSQL, the holder of shard 0, whose lease survives its holder's death). The
journal keeps each pass with its figures and a cursor, saved after every pair, so that a restart
or a survivor resumes where the pass stood (`claim_pass` makes the resumer its runner; the
journal saves progress only from the runner). A pass can be started from any process
(`begin`); the journal refuses a second running pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aiolimiter import AsyncLimiter

from scheduler.logthrottle import ThrottledLog
from scheduler.model import Assignment, AssignmentKey, Intent, State
from scheduler.store import StoreUnavailable
from scheduler.upstream import CXoneClient, RateLimited, SegmentNotFound, UpstreamError
from scheduler.validation import ReadsStopped

log = logging.getLogger(__name__)

#: Tracked memberships read from the journal at a time.
PAGE_SIZE = 500
#: How often a process that leads looks for a pass to run or resume, and one due.
LEAD_CHECK_S = 1.0
#: Attempts at one pair's read that failed without an answer before the pass goes on without it.
READ_ATTEMPTS = 3
#: Memberships in a row not read (CXone away, or refusing) after which a pass ends `failed`.
UNREAD_LIMIT = 10
#: The slowest a scheduled pass reads, so that a handful of memberships is not spread thinner.
MIN_SCHEDULED_RATE = 1.0 / 60.0


class PassState(enum.StrEnum):
    """Where a pass stands."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(slots=True)
class ReconcilePass:
    """One pass over the tracked memberships, with its figures (journaled as it goes).

    `segment_ids` empty: every segment. `total` is the number of tracked memberships when the
    pass began (None when it covers some segments only). `cursor` is the key of the last pair
    the pass is done with (pairs go in key order). `runner` names the process running it ("":
    none has taken it yet).
    """

    id: str
    started_at: float
    dry_run: bool = False
    segment_ids: tuple[str, ...] = ()
    scheduled: bool = False
    state: PassState = PassState.RUNNING
    total: int | None = None
    read: int = 0
    in_step: int = 0
    drifted: int = 0
    requeued: int = 0
    skipped: int = 0
    finished_at: float | None = None
    cursor: AssignmentKey = ("", "")
    runner: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class ReconcilePolicy:
    """How often passes run and how much of the read budget they may use."""

    interval_s: float = 86400.0  # 0: no scheduled pass (a pass may still be started)
    read_share: float = 0.1
    read_rps: float = 50.0

    @property
    def share_rate(self) -> float:
        """Reads per second a pass may make at most."""
        return self.read_share * self.read_rps

    def rate(self, total: int | None, *, scheduled: bool) -> float:
        """Reads per second of a pass: the share, or for a scheduled one its interval's pace."""
        share = self.share_rate
        if not scheduled or not total or self.interval_s <= 0:
            return share
        return min(share, max(total / self.interval_s, MIN_SCHEDULED_RATE))


class PassJournal(Protocol):
    """What a pass reads and writes in the journal (`daemon/store/base.py`'s `ReconcileJournal`)."""

    async def tracked_page(self, after: AssignmentKey, limit: int) -> list[Assignment]:
        """Tracked memberships (`active` adds, `removed` removals) after `after`, in key order."""
        ...

    async def tracked_count(self) -> int:
        """How many memberships are tracked."""
        ...

    async def contact(self, contact_id: str) -> list[Assignment]:
        """The contact's assignments as recorded, committed or not."""
        ...

    def start_pass(self, reconcile_pass: ReconcilePass) -> None:
        """Queue a new pass; not written if another is running."""
        ...

    def claim_pass(self, pass_id: str, runner: str) -> None:
        """Queue taking the pass over: only `runner`'s progress is saved from then on."""
        ...

    def save_pass(self, reconcile_pass: ReconcilePass) -> None:
        """Queue the pass's figures, state and cursor (saved only if it is still its runner's)."""
        ...

    def record_drift(
        self, held: Assignment, reconcile_pass: ReconcilePass, found_at: float, requeued: bool
    ) -> None:
        """Queue a drift found against the pair `held`, with the pass's progress past it.

        One call, so that both go in one transaction: a pass resumed after a crash neither
        misses the finding in its figures nor counts it twice.
        """
        ...

    async def flush(self) -> None:
        """Return once everything queued is durable."""
        ...

    async def running_pass(self) -> ReconcilePass | None:
        """The pass running, if any."""
        ...

    async def get_pass(self, pass_id: str) -> ReconcilePass | None:
        """One pass."""
        ...

    async def passes(self, limit: int) -> list[ReconcilePass]:
        """Recent passes, newest first."""
        ...

    async def last_scheduled_pass(self) -> ReconcilePass | None:
        """The newest pass the schedule started (kept past retention: the schedule's anchor)."""
        ...

    async def journal_created_at(self) -> float | None:
        """When the journal was created (the first pass is due an interval later), if known."""
        ...


class SpareReads(Protocol):
    """The read gate as a pass uses it: validation first."""

    async def spare_read(self) -> None:
        """Wait for a slot of the read gate that validation has no read due for."""
        ...

    def pause_reads(self, seconds: float) -> None:
        """CXone answered 429: pause every read for `seconds`."""
        ...


class Repairs(Protocol):
    """The engine as a pass uses it."""

    def busy(self, key: AssignmentKey) -> bool:
        """Whether a change to the pair is in progress in this process."""
        ...

    def repair(self, held: Assignment) -> bool:
        """Queue the pair again, in the bulk lane, with the intent and time `held` has.

        False when nothing was queued (newer work in progress, which wins).
        """
        ...


class ReconcileObserver(Protocol):
    """Where a pass's figures go besides the journal (the metrics)."""

    def record_reconcile_read(self, result: str) -> None:
        """One pair done: `in_step`, `drift`, `skipped` or `error`."""
        ...

    def record_drift(self, intent: Intent, requeued: bool) -> None:
        """A drift found (and queued again, unless a dry run)."""
        ...

    def record_pass(self, state: str, running: bool, at: float) -> None:
        """A pass began running here, or ended in `state`."""
        ...


class PassRunning(Exception):
    """A pass is running already; `running` is it."""

    def __init__(self, running: ReconcilePass) -> None:
        super().__init__(f"reconcile pass {running.id} is running")
        self.running = running


class CXoneAway(Exception):
    """A pass could read nothing for a while: it ends `failed`, saying why."""


class _LostLead(Exception):
    """The process no longer leads: the pass is left to the one that does."""


@dataclass(slots=True)
class _Run:
    """The pass this process runs, and its task."""

    reconcile_pass: ReconcilePass
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _Found:
    """What one pair's read found: its membership, or why there is none."""

    is_member: bool | None = None
    problem: str = ""
    tried: int = field(default=0)


class Reconciler:
    """Starts, runs, resumes and schedules passes (see the module docstring)."""

    def __init__(
        self,
        *,
        journal: PassJournal,
        client: CXoneClient,
        reads: SpareReads,
        repairs: Repairs,
        observer: ReconcileObserver,
        policy: ReconcilePolicy,
        runner_name: str,
        leads: Callable[[], bool] = lambda: True,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self._journal = journal
        self._client = client
        self._reads = reads
        self._repairs = repairs
        self._observer = observer
        self._name = runner_name
        self._leads = leads
        self._wall = wall_clock
        self._run: _Run | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._started_at = wall_clock()
        self._drift_log = ThrottledLog(log, 60.0)
        self._unread = 0  # memberships in a row the running pass could not read

    # ---- what the API asks ------------------------------------------------------------------

    async def begin(
        self, segment_ids: Sequence[str] = (), *, dry_run: bool = False, scheduled: bool = False
    ) -> ReconcilePass:
        """Start a pass now (in whichever process leads); `PassRunning` if one runs.

        The journal decides: a pass queued while another runs is not written.
        """
        running = await self._journal.running_pass()
        if running is not None:
            raise PassRunning(self.current(running))
        segments = tuple(dict.fromkeys(segment_ids))
        now = self._wall()
        total = None if segments else await self._journal.tracked_count()
        started = ReconcilePass(
            id=_new_id(now),
            started_at=now,
            dry_run=dry_run,
            segment_ids=segments,
            scheduled=scheduled,
            total=total,
        )
        self._journal.start_pass(started)
        await self._journal.flush()
        stored = await self._journal.get_pass(started.id)
        if stored is None:
            running = await self._journal.running_pass()
            if running is not None:
                raise PassRunning(self.current(running))
            raise StoreUnavailable("the pass was not written; try again")
        log.info(
            "reconcile pass %s started%s%s",
            started.id,
            " (dry run)" if dry_run else "",
            f" for {len(segments)} segment(s)" if segments else "",
        )
        self._wake.set()
        return stored

    def current(self, reconcile_pass: ReconcilePass) -> ReconcilePass:
        """The pass with the figures of this process's run of it, when it runs here.

        The journal's copy is at most one commit behind; this one is up to the pair.
        """
        run = self._running_here()
        if run is not None and run.reconcile_pass.id == reconcile_pass.id:
            return run.reconcile_pass
        return reconcile_pass

    def _running_here(self) -> _Run | None:
        """The run of a pass whose task is under way in this process, if any."""
        run = self._run
        return run if run is not None and run.task is not None and not run.task.done() else None

    async def get(self, pass_id: str) -> ReconcilePass | None:
        """One pass, as fresh as this process knows it."""
        found = await self._journal.get_pass(pass_id)
        return self.current(found) if found is not None else None

    async def recent(self, limit: int = 20) -> list[ReconcilePass]:
        """Recent passes, newest first."""
        return [self.current(p) for p in await self._journal.passes(limit)]

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start looking for passes to run, resume and schedule."""
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._lead_loop(), name="reconcile")

    async def stop(self) -> None:
        """Stop; a pass running here stays `running` in the journal, resumed at the next start."""
        tasks = [t for t in (self._loop_task, self._run.task if self._run else None) if t]
        self._loop_task = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._run = None
        self._drift_log.flush()

    # ---- leading ----------------------------------------------------------------------------

    async def _lead_loop(self) -> None:
        while True:
            try:
                await self._lead_once()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                log.info("reconcile: the journal is unavailable (%s); trying again", exc)
            except Exception:
                log.exception("reconcile: looking for a pass failed; going on")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), LEAD_CHECK_S)

    async def _lead_once(self) -> None:
        run = self._running_here()
        if not self._leads():
            if run is not None and run.task is not None:
                log.info(
                    "reconcile pass %s: left to the process that leads now", run.reconcile_pass.id
                )
                run.task.cancel()
            return
        if run is not None:
            return
        # What this process queued (a pass's last progress, its end) is committed before the
        # journal is asked what runs: never resume from behind, never reopen an ended pass.
        await self._journal.flush()
        running = await self._journal.running_pass()
        if running is not None:
            if run is not None and run.reconcile_pass.id == running.id:
                # Paused here (the journal or reading was away): the further of the two copies.
                mine = run.reconcile_pass
                if mine.state is PassState.RUNNING and mine.cursor > running.cursor:
                    running = mine
            self._resume(running)
            return
        if self.policy.interval_s > 0 and self._wall() >= await self._next_due():
            with contextlib.suppress(PassRunning):
                await self.begin(scheduled=True)

    async def _next_due(self) -> float:
        """When the next scheduled pass is due: an interval after the last scheduled one began.

        A pass started by hand does not move the schedule. With none yet, an interval after the
        journal was created (or this process started), so that restarts never postpone it.
        """
        newest = await self._journal.last_scheduled_pass()
        if newest is not None:
            return newest.started_at + self.policy.interval_s
        created = await self._journal.journal_created_at()
        return (created if created is not None else self._started_at) + self.policy.interval_s

    def _resume(self, reconcile_pass: ReconcilePass) -> None:
        if reconcile_pass.runner and reconcile_pass.runner != self._name:
            log.info(
                "reconcile pass %s: taken over from %s at %d read",
                reconcile_pass.id,
                reconcile_pass.runner,
                reconcile_pass.read,
            )
        elif reconcile_pass.read or reconcile_pass.skipped:
            log.info(
                "reconcile pass %s: resumed at %d read", reconcile_pass.id, reconcile_pass.read
            )
        reconcile_pass.runner = self._name
        self._journal.claim_pass(reconcile_pass.id, self._name)
        run = _Run(reconcile_pass)
        run.task = asyncio.create_task(self._execute(run), name=f"reconcile {reconcile_pass.id}")
        self._run = run

    # ---- running a pass ----------------------------------------------------------------------

    async def _execute(self, run: _Run) -> None:
        reconcile_pass = run.reconcile_pass
        self._observer.record_pass("running", True, self._wall())
        try:
            await self._walk(reconcile_pass)
        except asyncio.CancelledError:
            # Left running in the journal, resumed by whoever leads (this process after a
            # restart).
            self._observer.record_pass("running", False, self._wall())
            raise
        except _LostLead:
            self._observer.record_pass("running", False, self._wall())
            return
        except CXoneAway as exc:
            log.error("reconcile pass %s failed: %s", reconcile_pass.id, exc)
            self._finish(reconcile_pass, PassState.FAILED, str(exc))
        except (StoreUnavailable, ReadsStopped) as exc:
            # Resumed from its cursor once the journal (or reading) is back.
            log.warning("reconcile pass %s paused: %s", reconcile_pass.id, exc)
            self._observer.record_pass("running", False, self._wall())
            return
        except Exception as exc:
            log.exception("reconcile pass %s failed", reconcile_pass.id)
            self._finish(reconcile_pass, PassState.FAILED, f"{type(exc).__name__}: {exc}")
        else:
            self._finish(reconcile_pass, PassState.DONE, "")
        with contextlib.suppress(StoreUnavailable):
            await self._journal.flush()

    def _finish(self, reconcile_pass: ReconcilePass, state: PassState, message: str) -> None:
        reconcile_pass.state = state
        reconcile_pass.finished_at = self._wall()
        reconcile_pass.message = message
        self._journal.save_pass(reconcile_pass)
        self._observer.record_pass(str(state), False, reconcile_pass.finished_at)
        log.info(
            "reconcile pass %s %s: %d read, %d in step, %d drifted, %d requeued, %d skipped",
            reconcile_pass.id,
            state,
            reconcile_pass.read,
            reconcile_pass.in_step,
            reconcile_pass.drifted,
            reconcile_pass.requeued,
            reconcile_pass.skipped,
        )

    async def _walk(self, reconcile_pass: ReconcilePass) -> None:
        """Read every tracked pair after the cursor, paced, and settle each."""
        self._unread = 0
        rate = self.policy.rate(reconcile_pass.total, scheduled=reconcile_pass.scheduled)
        # One read per 1/rate seconds, evenly: a bucket of one, so nothing bunches.
        pace = AsyncLimiter(1, 1.0 / rate)
        wanted = frozenset(reconcile_pass.segment_ids)
        while True:
            page = await self._journal.tracked_page(reconcile_pass.cursor, PAGE_SIZE)
            if not page:
                return
            for held in page:
                if not self._leads():
                    raise _LostLead
                if (not wanted or held.segment_id in wanted) and held.state in _TRACKED:
                    await self._settle(reconcile_pass, held, pace)
                reconcile_pass.cursor = held.key
            self._journal.save_pass(reconcile_pass)

    async def _settle(
        self, reconcile_pass: ReconcilePass, held: Assignment, pace: AsyncLimiter
    ) -> None:
        """Read one pair, act on what CXone says, and save the pass's progress past it."""
        if self._repairs.busy(held.key):
            self._skip(reconcile_pass)
        else:
            found = await self._read(held, pace)
            if found.is_member is None:
                self._unread_pair(reconcile_pass, held, found.problem)
            elif found.is_member is (held.intent is Intent.ADD):
                self._unread = 0
                reconcile_pass.read += 1
                reconcile_pass.in_step += 1
                self._observer.record_reconcile_read("in_step")
            else:
                self._unread = 0
                if await self._drifted(reconcile_pass, held, found.is_member):
                    return  # its progress went with the finding
        reconcile_pass.cursor = held.key
        self._journal.save_pass(reconcile_pass)

    def _unread_pair(self, reconcile_pass: ReconcilePass, held: Assignment, problem: str) -> None:
        """A pair CXone did not answer for: left for the next pass, unless CXone is away."""
        reconcile_pass.skipped += 1
        self._observer.record_reconcile_read("error")
        log.info(
            "reconcile pass %s: %s/%s not read (%s); left for the next pass",
            reconcile_pass.id,
            held.segment_id,
            held.contact_id,
            problem,
        )
        self._unread += 1
        if self._unread >= UNREAD_LIMIT:
            # CXone is away, or refuses us: a pass that reads nothing is no pass.
            raise CXoneAway(f"{self._unread} memberships in a row not read; the last: {problem}")

    def _skip(self, reconcile_pass: ReconcilePass) -> None:
        reconcile_pass.skipped += 1
        self._observer.record_reconcile_read("skipped")

    async def _read(self, held: Assignment, pace: AsyncLimiter) -> _Found:
        """The pair's membership as CXone reads it, within the pass's pace and validation's lead."""
        found = _Found()
        while found.tried < READ_ATTEMPTS:
            await pace.acquire()
            await self._reads.spare_read()
            try:
                result = await self._client.is_member(held.segment_id, held.contact_id)
            except RateLimited as exc:
                # Costs no attempt: the whole read class waits, this pair with it.
                self._reads.pause_reads(exc.retry_after_s)
                continue
            except SegmentNotFound as exc:
                found.problem = str(exc)
                return found
            except UpstreamError as exc:
                found.tried += 1
                found.problem = str(exc)
                continue
            found.is_member = result.is_member
            return found
        return found

    async def _drifted(
        self, reconcile_pass: ReconcilePass, held: Assignment, is_member: bool
    ) -> bool:
        """CXone disagrees with the pair: unless newer work began meanwhile, drift.

        True if a drift was recorded (with the pass's progress); False if the pair was skipped.
        """
        contact_id, segment_id = held.key
        now_held = {a.segment_id: a for a in await self._journal.contact(contact_id)}.get(
            segment_id
        )
        if (
            self._repairs.busy(held.key)
            or now_held is None
            or now_held.state is not held.state
            or now_held.intent is not held.intent
            or now_held.version != held.version
        ):
            # A newer change arrived while the read was out: it wins, as always.
            self._skip(reconcile_pass)
            return False
        reconcile_pass.read += 1
        reconcile_pass.drifted += 1
        requeued = not reconcile_pass.dry_run and self._repairs.repair(now_held)
        if requeued:
            reconcile_pass.requeued += 1
        reconcile_pass.cursor = held.key
        self._journal.record_drift(held, reconcile_pass, self._wall(), requeued)
        self._observer.record_reconcile_read("drift")
        self._observer.record_drift(held.intent, requeued)
        shows = "is a member" if is_member else "is not a member"
        self._drift_log.warning(
            f"drift:{reconcile_pass.id}",
            "reconcile pass %s: drift: segmapd holds %s of %s to %s, CXone says it %s; %s",
            reconcile_pass.id,
            "the add" if held.intent is Intent.ADD else "the removal",
            contact_id,
            segment_id,
            shows,
            "queued again in the bulk lane"
            if requeued
            else "not repaired (dry run)"
            if reconcile_pass.dry_run
            else "not repaired (newer work, or segmapd stopping)",
        )
        return True


_TRACKED = frozenset({State.ACTIVE, State.REMOVED})


def _new_id(now: float) -> str:
    """A pass id that sorts by time and is unique across processes."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(3)
