"""Readiness: the checks `/readyz` answers with, and the `segmapd_ready` gauge's view of them.

Most checks are answered from memory: draining, the high-water mark, the writer's health, file
descriptors, the cluster's fence. Two wait on something outside the process: the journal (on
PostgreSQL a round trip to the server) and a CXone token (a token request when one is due).
`/readyz` awaits all of them. A scrape must not: it would take as long as the slowest check,
and a scrape that times out loses every metric, not only this one. So the gauge combines the
checks answered from memory, evaluated at the scrape, with the last answers of the two outside
checks; a scrape that finds those answers older than `OUTSIDE_REFRESH_S` asks again in the
background, for the next scrape to see. Every `/readyz` request refreshes them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from daemon.cluster import Cluster
from daemon.store import JournalStore
from scheduler.engine import Engine
from scheduler.validation import MembershipPoller

log = logging.getLogger(__name__)

FD_LOW_WATER = 32
"""Readiness fails when fewer descriptors than this are left (see daemon/connections.py)."""

OUTSIDE_REFRESH_S = 5.0
"""A scrape asks the journal and token checks again once their answers are this old."""


def fd_usage() -> tuple[int, int] | None:
    """(descriptors open, soft limit) of this process, or None where /proc is not available."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return limit, limit  # reading /proc needs a descriptor itself: none is left
        return None
    return in_use, limit


def fd_check(usage: tuple[int, int] | None) -> str:
    """The readiness verdict on descriptors: "ok", "unknown", or "exhausted: N of M in use"."""
    if usage is None:
        return "unknown"
    in_use, limit = usage
    if limit - in_use < FD_LOW_WATER:
        return f"exhausted: {in_use} of {limit} in use"
    return "ok"


class Subject(Protocol):
    """What readiness looks at: the parts of the service (daemon/service.py) it checks."""

    @property
    def draining(self) -> bool:
        """Whether the drain has begun (intake refused)."""
        ...

    @property
    def engine(self) -> Engine:
        """The engine: its high-water mark and the health of its writer."""
        ...

    @property
    def store(self) -> JournalStore:
        """The journal, which must be writable."""
        ...

    @property
    def poller(self) -> MembershipPoller:
        """Validation, whose read backlog is reported for information."""
        ...

    @property
    def cluster(self) -> Cluster | None:
        """The cluster on PostgreSQL (None with one instance): a fenced instance is not ready."""
        ...

    async def token_ready(self) -> tuple[bool, str]:
        """Whether a CXone token can be had, and CXone's refusal if not."""
        ...


@dataclass(frozen=True)
class Report:
    """One evaluation of every check: the verdict and each check's word, in `/readyz` order."""

    ready: bool
    checks: dict[str, str]


@dataclass(frozen=True)
class _OutsideAnswers:
    """The last answers of the checks that wait on the journal and on CXone."""

    store_ok: bool
    token_ok: bool
    at: float


class Readiness:
    """Evaluates the readiness checks for `/readyz`, and for the gauge without waiting."""

    def __init__(self, subject: Subject, clock: Callable[[], float] = time.monotonic) -> None:
        self._subject = subject
        self._clock = clock
        self._outside: _OutsideAnswers | None = None
        self._refresh: asyncio.Task[Report] | None = None

    async def evaluate(self) -> Report:
        """Every check now, the journal and the token awaited (the `/readyz` answer)."""
        subject = self._subject
        engine = subject.engine
        checks: dict[str, str] = {}
        checks["draining"] = "yes" if subject.draining else "no"
        checks["queue"] = (
            f"above high-water mark ({engine.pending_writes})" if engine.overloaded else "ok"
        )
        try:
            await subject.store.check_writable()
            checks["store"] = "ok"
        except Exception as exc:  # any failure is a not-ready reason, reported as such
            checks["store"] = f"not writable: {exc}"
        token_ok, token_error = await subject.token_ready()
        checks["cxone_token"] = "ok" if token_ok else token_error
        checks["fds"] = fd_check(fd_usage())
        cluster = subject.cluster
        if cluster is not None:
            checks["cluster"] = f"fenced: {cluster.fence_reason}" if cluster.fenced else "ok"
        # Informational only: a read backlog delays confirmation but is no reason to stop traffic.
        backlog = subject.poller.backlog()
        checks["validation"] = (
            f"{backlog.waiting} reads waiting, the oldest due {backlog.oldest_wait_s:.0f} s ago"
            if backlog.waiting
            else "ok"
        )
        store_ok = checks["store"] == "ok"
        self._outside = _OutsideAnswers(store_ok, token_ok, self._clock())
        ready = self._local_ok(checks["fds"]) and store_ok and token_ok
        return Report(ready, checks)

    def at_scrape(self) -> float:
        """1.0 ready, 0.0 not, NaN while the journal and token checks have never answered.

        Never waits: the checks answered from memory are evaluated now, the journal and the
        token as last answered (asked again in the background when that answer is old).
        """
        outside = self._outside
        if outside is None or self._clock() - outside.at >= OUTSIDE_REFRESH_S:
            self._refresh_soon()
        if not self._local_ok(fd_check(fd_usage())):
            return 0.0
        if outside is None:
            return math.nan
        return 1.0 if outside.store_ok and outside.token_ok else 0.0

    async def stop(self) -> None:
        """Cancel a background refresh still running (the drain, before the journal closes)."""
        task, self._refresh = self._refresh, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _local_ok(self, fds: str) -> bool:
        """The checks answered from memory: draining, high water, writer, descriptors, fence."""
        subject = self._subject
        engine = subject.engine
        cluster = subject.cluster
        return (
            not fds.startswith("exhausted")
            and not subject.draining
            and not engine.overloaded
            and engine.healthy
            and (cluster is None or not cluster.fenced)
        )

    def _refresh_soon(self) -> None:
        """Start one background evaluation, unless one runs (or no event loop runs here)."""
        if self._refresh is not None and not self._refresh.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # rendered outside the event loop (a test): nothing to refresh with
        self._refresh = loop.create_task(self.evaluate())
        self._refresh.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[Report]) -> None:
    """A background evaluation that raised is logged (its checks catch their own failures)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("readiness evaluation failed", exc_info=task.exception())
