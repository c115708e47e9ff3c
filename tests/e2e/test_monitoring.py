"""What the alerts and the dashboard read is what a real daemon exposes, from its first scrape.

A rule over a series that does not exist yet sees nothing, and a counter that appears with its
first event cannot show that event as an increase: so every series the rules and the dashboard
name must be on /metrics before any work, with no webhook taken and no write made.
"""

from __future__ import annotations

import math

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Daemon, StartDaemon
from tests.support.emulator import EmulatorControl
from tests.support.monitoring import (
    alerts,
    dashboard,
    dashboard_queries,
    metric_names,
    recorded,
    variable_metrics,
)
from tests.support.waits import until

# The sample suffixes of each family type (prometheus_client names counters without `_total`).
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}


async def scrape(http: aiohttp.ClientSession, daemon: Daemon) -> str:
    async with http.get(f"{daemon.url}/metrics") as response:
        assert response.status == 200
        return await response.text()


def single(text: str, name: str) -> float:
    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def exposed_series(text: str) -> dict[str, str]:
    """Series name as PromQL reads it -> the type of its family, for families with samples."""
    found: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        names = {sample.name for sample in family.samples}
        for suffix in SUFFIXES.get(family.type, ()):
            if family.name + suffix in names:
                found[family.name + suffix] = family.type
    return found


def referenced() -> tuple[set[str], set[str]]:
    """(series names, recorded names) read by the alerts, the recording rules and the dashboard."""
    names: set[str] = set()
    for alert in alerts():
        names |= metric_names(alert["expr"])
    for expr in recorded().values():
        names |= metric_names(expr)
    board = dashboard()
    for query in dashboard_queries(board):
        names |= metric_names(query)
    names |= variable_metrics(board)
    return {n for n in names if ":" not in n}, {n for n in names if ":" in n}


async def test_every_series_the_rules_and_the_dashboard_read_is_exposed_before_any_work(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
) -> None:
    daemon = await start_daemon(
        server={"high_water": 5000},
        # A standard source never skips events: a kind that can shows the skipped series.
        **{
            "sources.sf": {
                "kind": "salesforce",
                "organization_id": "00D000000000001",
                "contact_id_field": "Id",
                "segments_field": "CXone_Segments__c",
            }
        },
    )

    def settled(text: str) -> bool:
        # The journal is counted a moment after start; readiness once a scrape has asked for
        # the journal and token checks (the scrape before that says NaN).
        return (
            "\nsegmapd_journal_counted_timestamp_seconds " in text
            and single(text, "segmapd_ready") == 1.0
        )

    text = await until(
        lambda: scrape(http, daemon), settled, timeout_s=30, what="ready and counted"
    )
    series, records = referenced()
    assert len(series) > 40  # the parse found the queries' names
    assert records <= set(recorded()), f"not recorded by segmapd-rules.yml: {records}"
    exposed = exposed_series(text)
    missing = sorted(series - set(exposed))
    assert missing == [], f"read by rules or dashboard, absent from /metrics: {missing}"
    # The alerts' inputs that are labelled counters: each labelled series is there at zero.
    for name in (
        'segmapd_upstream_rate_limited_total{endpoint="bulk"}',
        'segmapd_upstream_outcomes_total{endpoint="bulk",outcome="ok"}',
        'segmapd_notifications_total{outcome="retry"}',
        'segmapd_assignments_finished_total{intent="add",outcome="failed",reason="not_indexed"}',
        'segmapd_reconcile_drift_total{intent="remove"}',
        'segmapd_reconcile_passes_total{state="failed"}',
        'segmapd_events_accepted_total{kind="standard",source="crm"}',
        'segmapd_events_skipped_total{kind="salesforce",reason="missing_field",source="sf"}',
        'segmapd_webhooks_received_total{code="202",kind="standard",source="crm"}',
        'segmapd_webhooks_received_total{code="200",kind="salesforce",source="sf"}',
    ):
        assert f"\n{name} 0.0\n" in text, name
    assert single(text, "segmapd_high_water") == 5000
    assert single(text, "segmapd_pending_writes") == 0


async def test_segmapd_ready_says_what_readyz_says(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    # No token can be had: every token request gets a 5xx.
    await emulator.configure({"faults": {"token": {"error_rate": 1.0}}})
    daemon = await start_daemon()

    async def readiness() -> tuple[float, int]:
        text = await scrape(http, daemon)
        async with http.get(f"{daemon.url}/readyz") as response:
            return single(text, "segmapd_ready"), response.status

    # The first scrape may come before any check has answered (NaN); then 0, as /readyz.
    gauge, status = await until(
        readiness, lambda r: not math.isnan(r[0]), timeout_s=30, what="a readiness verdict"
    )
    assert (gauge, status) == (0.0, 503)
    text = await scrape(http, daemon)
    failed_token_requests = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "segmapd_upstream_requests_total"
        and sample.labels["endpoint"] == "token"
        and sample.labels["code"].startswith("5")
    ]
    assert failed_token_requests, "SegmapdTokenRefreshFailing reads these"

    await emulator.configure({"faults": {"token": {"error_rate": 0.0}}})
    # The token check is asked at most every 10 s: the gauge follows once it is asked again.
    await until(readiness, lambda r: r == (1.0, 200), timeout_s=60, what="ready again")
