"""The console's routes: its static files at /ui/, and the admin JSON only its views needed.

The views read the public admin API and nothing else: `/readyz`, `/v1/contacts/{id}`,
`/v1/dead-letters` (paged, counted, replayed by filter), `/v1/reconcile`, and these three,
documented in /openapi.json like the rest:

- `GET /v1/overview`: the journal census, the work in progress, the rate gates, the validation
  backlog, the refresh budget, the ring of recent samples (`Figures`), and the sources a dead
  letter can name (the Dead letters view's source filter).
- `GET /v1/segments`: per segment, what is queued, in flight, being confirmed and dead, its
  last write and its refresh budget: reads of memory, never of the journal.
- `GET /v1/cluster`: on PostgreSQL, every instance, its shards, heartbeats and the fence.

Every /ui/ response carries a strict Content-Security-Policy (no inline script or style,
nothing from elsewhere, no framing), `nosniff` and `no-referrer`. The page keeps the admin
token in sessionStorage and sends it as a bearer token: no cookie, so nothing to forge.
"""

from __future__ import annotations

import hashlib
import heapq
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon.config import MAPPINGS_SOURCE
from daemon.http import SERVICE, json_response, limit_param, once, problem, require_admin
from daemon.service import Service
from daemon.store.base import RefreshBudgetStore
from scheduler.validation import SegmentValidation

STATIC_DIR = Path(__file__).resolve().parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # A new segmapd's files are fetched again at once; an unchanged one answers 304.
    "Cache-Control": "no-cache",
}
# Asset names are the files' own: lowercase words, one extension, in a folder at most.
ASSET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*(?:/[a-z0-9][a-z0-9_-]*)?\.(?:js|css|svg|html)")
CONTENT_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".html": "text/html",
}
SINCE_FORMAT = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,6})?", re.ASCII)
# How far back the overview's rates look ("now"), and its count of 429s.
RATE_WINDOW_S = 10.0
RATE_LIMITED_WINDOW_S = 60.0
#: The longest `find` of /v1/segments (no segment id is longer).
MAX_FIND_CHARS = 1024
DEFAULT_SEGMENTS = 200
MAX_SEGMENTS = 1000


@dataclass(frozen=True, slots=True)
class Asset:
    """A static file of the console, read once: its bytes, type and validator."""

    body: bytes
    content_type: str
    etag: str


ASSETS: web.AppKey[dict[str, Asset]] = web.AppKey("console_assets", dict)


def load_assets(directory: Path = STATIC_DIR) -> dict[str, Asset]:
    """Every file of the console by its name under /ui/ (the files are small: kept in memory)."""
    assets: dict[str, Asset] = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if not path.is_file() or ASSET_NAME.fullmatch(name) is None:
            continue
        body = path.read_bytes()
        kind = CONTENT_TYPES[path.suffix]
        charset = "; charset=utf-8" if path.suffix != ".svg" else ""
        digest = hashlib.sha256(body).hexdigest()[:32]
        assets[name] = Asset(body, f"{kind}{charset}", f'"{digest}"')
    return assets


def add_routes(app: web.Application) -> None:
    """Register the console's routes on the daemon's app (its only entry point)."""
    app[ASSETS] = load_assets()
    app.router.add_get("/ui", to_console)
    app.router.add_get("/ui/", index)
    app.router.add_get("/ui/{name:.+}", asset)
    app.router.add_get("/v1/overview", overview)
    app.router.add_get("/v1/segments", segments)
    app.router.add_get("/v1/cluster", cluster)


# ---- the page --------------------------------------------------------------------------------


def _serve(request: web.Request, name: str) -> web.Response:
    found = request.app[ASSETS].get(name)
    if found is None:
        return web.Response(
            status=404, text="not found\n", content_type="text/plain", headers=SECURITY_HEADERS
        )
    headers = {**SECURITY_HEADERS, "ETag": found.etag}
    if found.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=found.body, headers={**headers, "Content-Type": found.content_type})


async def to_console(request: web.Request) -> web.Response:
    """GET /ui: the console lives at /ui/ (its files' relative names need the slash)."""
    raise web.HTTPPermanentRedirect("/ui/", headers=SECURITY_HEADERS)


async def index(request: web.Request) -> web.Response:
    """GET /ui/: the console's page."""
    return _serve(request, "index.html")


async def asset(request: web.Request) -> web.Response:
    """GET /ui/{name}: one of the console's scripts, styles or images."""
    return _serve(request, request.match_info["name"])


# ---- GET /v1/overview ------------------------------------------------------------------------


def _rounded(value: float, digits: int = 2) -> float:
    return round(value, digits)


def overview_view(service: Service, since: float | None) -> dict[str, Any]:
    """The overview's figures now, and the samples taken after `since` (all without it)."""
    figures = service.figures
    engine = service.engine
    poller = service.poller
    config = service.config
    samples = list(figures.samples)
    now = time.time()
    recent = [s for s in samples if s.at > now - RATE_WINDOW_S - 0.5] or samples[-1:]

    def mean(values: list[float]) -> float:
        return _rounded(sum(values) / len(values)) if values else 0.0

    latest = service.census.latest
    census: dict[str, Any] = {"countedAt": None, "states": None}
    if latest is not None:
        census = {
            "countedAt": _rounded(latest.counted_at, 3),
            "states": {str(state): count for state, count in latest.counts.items()},
        }
    backlog = poller.backlog()
    validating = poller.by_segment().values()
    buffered = engine.buffered_by_lane()
    gates = {
        name: {
            "limitPerS": gate.rate_per_s,
            "pausedForS": _rounded(gate.paused_for, 1),
            "waitedS": _rounded(gate.waited_s, 1),
        }
        for name, gate in figures.gates.items()
    }
    return {
        "at": _rounded(now, 3),
        "census": census,
        "work": {
            "pendingWrites": engine.pending_writes,
            "buffered": {str(lane): count for lane, count in buffered.items()},
            "parked": engine.parked,
            "verifying": poller.pending,
            "highWater": config.server.high_water,
            "overloaded": engine.overloaded,
        },
        "rates": {
            "windowS": RATE_WINDOW_S,
            "webhooksPerS": mean([s.webhooks_per_s for s in recent]),
            "writesPerS": mean([s.writes_per_s for s in recent]),
            "writeLimitPerS": config.limits.write_rps,
            "singleWritesPerS": mean([s.single_writes_per_s for s in recent]),
            "readsPerS": mean([s.reads_per_s for s in recent]),
            "readLimitPerS": config.limits.read_rps,
            "rateLimitedLastMinute": sum(
                s.rate_limited for s in samples if s.at > now - RATE_LIMITED_WINDOW_S
            ),
        },
        "gates": gates,
        "validation": {
            "readsWaiting": backlog.waiting,
            "oldestWaitS": _rounded(backlog.oldest_wait_s, 1),
            "awaitingRefresh": backlog.awaiting_refresh,
            "reading": backlog.reading,
        },
        "refresh": {
            "minIntervalS": config.validation.refresh_min_interval_s,
            "refreshesLastHour": service.activity.refreshes_last_hour(),
            # A refresh waiting for its budget is counted as waiting, not as refreshing.
            "segmentsRefreshing": sum(
                v.refreshing and not v.waiting_for_budget for v in validating
            ),
            "segmentsWaitingForBudget": sum(v.waiting_for_budget for v in validating),
        },
        "sampleIntervalS": figures.sample_interval_s,
        # Compared as shown (`at` is rounded to the millisecond): a client passing back the last
        # `at` it got never gets that sample again.
        "samples": [s.view() for s in samples if since is None or round(s.at, 3) > since],
        # What the dead letters' source filter can name.
        "sources": [*sorted(config.sources), MAPPINGS_SOURCE],
    }


async def overview(request: web.Request) -> web.Response:
    """GET /v1/overview[?since=T]: the overview's figures, and its samples after Unix time T."""
    denied = require_admin(request)
    if denied is not None:
        return denied
    refused = once(request, ("since",))
    if refused is not None:
        return refused
    given = request.query.get("since")
    since: float | None = None
    if given is not None:
        if SINCE_FORMAT.fullmatch(given) is None:
            return problem(400, "since: must be a Unix time in seconds", field="since")
        since = float(given)
    return json_response(overview_view(request.app[SERVICE], since))


# ---- GET /v1/segments ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentPage:
    """The rows `/v1/segments` shows, and how many segments there are and `find` keeps."""

    rows: list[dict[str, Any]]
    total: int
    matching: int


def segment_page(service: Service, find: str, limit: int) -> SegmentPage:
    """The busiest `limit` segments whose id holds `find` (in any case; every one without it).

    Every segment this instance has work, dead letters or a recent write of is ranked, from
    reads of memory only (the buffer per batch key, the poller's watches, the write-path counts,
    the dead letters per segment as last counted); only the rows shown are built.
    """
    activity = service.activity
    queued = service.engine.buffered_by_segment()
    validating = service.poller.by_segment()
    tally = service.figures.tally
    failed = tally.counts if tally is not None else {}
    in_flight = activity.in_flight
    segment_ids = {*queued, *validating, *failed, *in_flight, *activity.last_write}
    # Among every segment, not only the busiest shown: a quiet one is found too.
    wanted = find.casefold()
    matching = [s for s in segment_ids if wanted in s.casefold()] if wanted else list(segment_ids)

    def busy(segment_id: str) -> int:
        watch = validating.get(segment_id)
        pairs = watch.pairs if watch is not None else 0
        return queued.get(segment_id, 0) + in_flight.get(segment_id, 0) + pairs

    # The busiest first, then the most dead letters: what an operator looks for.
    shown = heapq.nsmallest(limit, matching, key=lambda s: (-busy(s), -failed.get(s, 0), s))
    rows = [_segment_row(service, segment_id, queued, validating, failed) for segment_id in shown]
    return SegmentPage(rows, len(segment_ids), len(matching))


def _segment_row(
    service: Service,
    segment_id: str,
    queued: Mapping[str, int],
    validating: Mapping[str, SegmentValidation],
    failed: Mapping[str, int],
) -> dict[str, Any]:
    activity = service.activity
    budget: RefreshBudgetStore = service.store
    watch = validating.get(segment_id)
    last = activity.last_write.get(segment_id)
    next_allowed = budget.next_allowed(segment_id)
    last_refresh = activity.last_refresh.get(segment_id)
    return {
        "segmentId": segment_id,
        "queued": queued.get(segment_id, 0),
        "inFlight": activity.in_flight.get(segment_id, 0),
        "verifying": watch.pairs if watch is not None else 0,
        "failed": failed.get(segment_id, 0),
        "lastWrite": None
        if last is None
        else {
            "at": _rounded(last.at, 3),
            "ids": last.ids,
            "attempt": last.attempt,
            "outcomes": dict(last.outcomes),
        },
        "refresh": {
            "lastAt": _rounded(last_refresh, 3) if last_refresh is not None else None,
            "nextAllowedAt": _rounded(next_allowed, 3) if next_allowed > time.time() else None,
            "refreshing": watch.refreshing if watch is not None else False,
            "waitingForBudget": watch.waiting_for_budget if watch is not None else False,
        },
    }


async def segments(request: web.Request) -> web.Response:
    """GET /v1/segments[?limit=N][&find=TEXT]: the busiest N segments (default 200).

    With `find`, among the segments whose id holds TEXT (in any case): a quiet segment is found
    too. With how many there are, and how many `find` keeps.
    """
    denied = require_admin(request)
    if denied is not None:
        return denied
    refused = once(request, ("find",))
    if refused is not None:
        return refused
    find = request.query.get("find", "").casefold()
    if len(find) > MAX_FIND_CHARS:
        return problem(400, f"find: at most {MAX_FIND_CHARS} characters", field="find")
    limit = limit_param(request, DEFAULT_SEGMENTS, MAX_SEGMENTS)
    if isinstance(limit, web.Response):
        return limit
    service = request.app[SERVICE]
    page = segment_page(service, find, limit)
    tally = service.figures.tally
    return json_response(
        {
            "segments": page.rows,
            "total": page.total,
            "matching": page.matching,
            "parked": service.engine.parked,
            "failedCountedAt": _rounded(tally.counted_at, 3) if tally is not None else None,
            "refreshMinIntervalS": service.config.validation.refresh_min_interval_s,
            "shared": service.cluster is not None,
        }
    )


# ---- GET /v1/cluster -------------------------------------------------------------------------


async def cluster(request: web.Request) -> web.Response:
    """GET /v1/cluster: the instances sharing the journal, their shards, heartbeats and fence."""
    denied = require_admin(request)
    if denied is not None:
        return denied
    service = request.app[SERVICE]
    store_kind = service.config.store.url.partition("://")[0]
    member = service.cluster
    shared = service.store.as_shared()
    if member is None or shared is None:
        return json_response({"mode": "single", "store": store_kind})
    status = await shared.cluster_status()
    me = member.leases.instance_id
    owners: dict[int, list[int]] = {}
    for shard in status.shards:
        if shard.owner is not None:
            owners.setdefault(shard.owner, []).append(shard.shard)
    return json_response(
        {
            "mode": "cluster",
            "store": store_kind,
            "leaseS": member.lease_s,
            "self": {
                "id": me,
                "name": member.leases.name,
                "fenced": member.fenced,
                "fenceReason": member.fence_reason or None,
                "owned": sorted(member.owned_shards),
                "releasing": sorted(member.releasing_shards),
                "liveInstances": member.live_instances,
            },
            "instances": [
                {
                    "id": i.id,
                    "name": i.name,
                    "self": i.id == me,
                    "startedAt": _rounded(i.started_at, 3),
                    "heartbeatAt": _rounded(i.heartbeat_at, 3),
                    "heartbeatAgeS": _rounded(max(0.0, i.heartbeat_age_s), 2),
                    "alive": i.heartbeat_age_s < member.lease_s,
                    "shards": owners.get(i.id, []),
                }
                for i in status.instances
            ],
            "shards": [
                {
                    "shard": s.shard,
                    "owner": s.owner,
                    "epoch": s.epoch,
                    "leaseLeftS": _rounded(s.lease_left_s, 2)
                    if s.lease_left_s is not None
                    else None,
                }
                for s in status.shards
            ],
        }
    )
