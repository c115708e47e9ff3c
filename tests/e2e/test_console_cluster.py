"""The console's Cluster view on a PostgreSQL journal: two real daemons, and a real browser."""

from __future__ import annotations

import asyncio

import aiohttp
from playwright.sync_api import expect

from tests.e2e.conftest import Daemon, StartDaemon
from tests.e2e.test_cluster import start_cluster
from tests.support.browser import WIDE, ConsoleLog, chromium, screenshots
from tests.support.postgres import PostgresServer


def look_at_the_cluster_view(daemon: Daemon) -> list[str]:
    """Sign in, open the Cluster view, check it and take its screenshots; the page's errors."""
    with chromium() as browser:
        context = browser.new_context(viewport=WIDE)
        page = context.new_page()
        page.set_default_timeout(20_000)
        log = ConsoleLog()
        log.watch(page)
        page.goto(f"{daemon.url}/ui/#cluster")
        page.get_by_label("Admin token").fill(daemon.admin_token)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", level=1, name="Cluster")).to_be_visible()
        expect(page.get_by_role("heading", name="This instance")).to_be_visible()
        expect(page.get_by_text("Not fenced")).to_be_visible()
        expect(
            page.get_by_role("list", name="Shards and their owners").locator("li")
        ).to_have_count(64)
        instances = page.get_by_role("table", name="Instances").locator("tbody tr")
        expect(instances).to_have_count(2)
        expect(instances.filter(has_text="(this one)")).to_have_count(1)
        screenshots(page, "cluster")
        context.close()
        return log.unexpected()


async def test_the_cluster_view_shows_instances_shards_heartbeats_and_the_fence(
    start_daemon: StartDaemon,
    postgres: PostgresServer,
    postgres_url: str,
    http: aiohttp.ClientSession,
):
    daemons = await start_cluster(start_daemon, postgres, postgres_url, 2)
    first = daemons[0]
    async with http.get(f"{first.url}/v1/cluster", headers=first.admin) as response:
        assert response.status == 200
        cluster = await response.json()
    assert cluster["mode"] == "cluster" and cluster["store"] == "postgresql"
    instances = cluster["instances"]
    assert len(instances) == 2 and all(i["alive"] for i in instances)
    assert [i["self"] for i in instances].count(True) == 1
    me = next(i for i in instances if i["self"])
    assert cluster["self"]["id"] == me["id"] and not cluster["self"]["fenced"]
    assert cluster["self"]["owned"] == me["shards"]
    # Every shard is leased by a live instance, under an epoch, with time left on its lease.
    assert [s["shard"] for s in cluster["shards"]] == list(range(64))
    owners = {i["id"] for i in instances}
    for shard in cluster["shards"]:
        assert shard["owner"] in owners and shard["epoch"] >= 1 and shard["leaseLeftS"] > 0
    assert sorted(s for i in instances for s in i["shards"]) == list(range(64))
    errors = await asyncio.to_thread(look_at_the_cluster_view, first)
    assert not errors, errors
