"""The console on a PostgreSQL journal: two real daemons, and a real browser.

The Cluster view, and every other view on this journal: a dead letter listed, a dry run of
drift reconcile started and ended.
"""

from __future__ import annotations

import asyncio

import aiohttp
from playwright.sync_api import expect

from tests.e2e.conftest import Daemon, StartDaemon
from tests.e2e.test_cluster import start_cluster
from tests.support.browser import WIDE, ConsoleLog, chromium, screenshots
from tests.support.emulator import EmulatorControl
from tests.support.postgres import PostgresServer


def look_at_the_views(daemon: Daemon, dead: str) -> list[str]:
    """Sign in, check the Cluster view (screenshots) and the others; the page's errors.

    `dead` is a contact with a dead letter.
    """
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
        nav = page.get_by_role("navigation")
        for name in ("Overview", "Segments"):
            nav.get_by_role("link", name=name, exact=True).click()
            expect(page.get_by_role("heading", level=1, name=name)).to_be_visible()
        nav.get_by_role("link", name="Dead letters", exact=True).click()
        expect(page.locator(f'tbody tr[data-contact="{dead}"]')).to_contain_text(
            "contact not found"
        )
        nav.get_by_role("link", name="Contact", exact=True).click()
        page.get_by_label("Contact id").fill(dead)
        page.get_by_role("button", name="Look up").click()
        expect(page.get_by_role("table", name=f"Segments of contact {dead}")).to_contain_text(
            "failed"
        )
        nav.get_by_role("link", name="Reconcile", exact=True).click()
        page.get_by_role("button", name="Start dry run").click()
        expect(page.get_by_role("status")).to_contain_text("done", timeout=30_000)
        context.close()
        return log.unexpected()


async def test_the_cluster_view_shows_instances_shards_heartbeats_and_the_fence(
    start_daemon: StartDaemon,
    postgres: PostgresServer,
    postgres_url: str,
    http: aiohttp.ClientSession,
    emulator: EmulatorControl,
):
    daemons = await start_cluster(start_daemon, postgres, postgres_url, 2)
    first = daemons[0]
    dead = "console-pg-dead"
    await emulator.set_missing_contacts([dead])
    status, answer = await first.mappings(
        http, {"contactId": dead, "segmentIds": ["CONSOLE_PG"]}, "?wait=30"
    )
    assert status == 200, answer
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
    errors = await asyncio.to_thread(look_at_the_views, first, dead)
    assert not errors, errors
