"""The operator console at /ui/, driven in a real browser against the real daemon and emulator.

Playwright drives Debian's chromium (`/usr/bin/chromium`); Playwright's own browser download is
never used. Without chromium (or Playwright) these tests are skipped, and fail in CI. One
daemon, one emulator and one browser serve the whole module; each test signs in on a fresh
page and sets up the emulator's behaviour it needs. Screenshots at 1280 and 390 px go to
`test-artifacts/console/` (printed), where a failed CI run shows them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.sync_api import Browser, Locator, Page, Route, expect

from tests.e2e.conftest import daemon_config
from tests.support.browser import WIDE, ConsoleLog, chromium, screenshots
from tests.support.processes import ManagedProcess, emulator_process

JSON_SECRET = "console-test-secret"
# What a CRM may send as a contact id: the json kind dead-letters it as sent.
MARKUP_ID = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'

# ---- the daemon, the emulator and a small synchronous client -----------------------------------


def _request(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One blocking HTTP call: status, headers and body (an error status is an answer too)."""
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in request.headers:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@dataclass
class ConsoleDaemon:
    """The module's daemon and emulator, and the calls the tests make to them directly."""

    url: str
    emulator_url: str
    token: str

    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One admin API call with the token: the status and the JSON answer."""
        status, _, raw = _request(
            f"{self.url}{path}", method, body, {"Authorization": f"Bearer {self.token}"}
        )
        return status, json.loads(raw) if raw else None

    def emulator(self, method: str, path: str, body: Any) -> None:
        """One call of the emulator's control API, which must succeed."""
        status, _, raw = _request(f"{self.emulator_url}{path}", method, body)
        assert status < 400, (path, status, raw)

    def missing(self, contact_ids: list[str]) -> None:
        """Make these contact ids answer ContactNotFound (and every other one exist)."""
        self.emulator("PUT", "/_emulator/contacts/missing", {"contactIds": contact_ids})

    def mappings(self, events: Any, wait_s: float = 20.0) -> Any:
        """Send events through /v1/mappings and wait until every pair they name has ended."""
        status, body = self.admin("POST", f"/v1/mappings?wait={wait_s:g}", events)
        assert status == 200, (status, body)
        return body

    def states(self, contact_id: str) -> dict[str, str]:
        """The contact's state per segment, as the contact API says."""
        quoted = urllib.parse.quote(contact_id, safe="")
        status, body = self.admin("GET", f"/v1/contacts/{quoted}")
        assert status == 200, (status, body)
        return {s["segmentId"]: s["state"] for s in body["segments"]}

    def wait_states(self, contact_id: str, want: dict[str, str], timeout_s: float = 30.0) -> None:
        """Wait until the contact's segments are in the states `want` names."""
        deadline = time.monotonic() + timeout_s
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            seen = self.states(contact_id)
            if all(seen.get(segment) == state for segment, state in want.items()):
                return
            time.sleep(0.1)
        raise AssertionError(f"{contact_id}: wanted {want}, last {seen}")

    def json_webhook(self, events: Any) -> int:
        """Deliver events to the `json` source, signed: the status answered."""
        body = json.dumps(events).encode()
        signature = hmac.new(JSON_SECRET.encode(), body, hashlib.sha256).hexdigest()
        status, _, _ = _request(
            f"{self.url}/v1/webhooks/app",
            "POST",
            body,
            {"Content-Type": "application/json", "X-Signature": signature},
        )
        return int(status)


@pytest.fixture(scope="module")
def console_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleDaemon]:
    """A daemon with a `standard` and a `json` source, on an emulator of its own."""
    directory = tmp_path_factory.mktemp("console")
    emulator = emulator_process()
    emulator.start()
    daemon: ManagedProcess | None = None
    try:
        token = secrets.token_urlsafe(16)
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        config = directory / "segmapd.toml"
        text = daemon_config(
            emulator.url,
            token,
            secret,
            {
                "store": {"url": f"sqlite://{directory}/journal.db"},
                "sources.app": {
                    "kind": "json",
                    "secret": JSON_SECRET,
                    "signature_header": "X-Signature",
                    "signature_encoding": "hex",
                    "contact_id": "contactId",
                    "add": "add",
                },
            },
        )
        config.write_text(text)
        daemon = ManagedProcess(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)]
        )
        url = daemon.start()
        yield ConsoleDaemon(url, emulator.url, token)
    finally:
        if daemon is not None:
            daemon.stop(timeout_s=20)
        emulator.stop()


@pytest.fixture(autouse=True)
def fast_indexing(console_daemon: ConsoleDaemon) -> None:
    """CXone indexes in a fraction of a second, and every contact exists, unless a test says."""
    console_daemon.emulator(
        "PATCH",
        "/_emulator/config",
        {"indexing": {"median_s": 0.3, "p99_s": 0.8, "stall_fraction": 0.0}},
    )
    console_daemon.missing([])


# ---- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless, for the whole module."""
    with chromium() as launched:
        yield launched


@dataclass
class Console:
    """A fresh tab on the console, signed out, and what it logged."""

    page: Page
    daemon: ConsoleDaemon
    log: ConsoleLog

    def open(self) -> None:
        """Load the console's page."""
        response = self.page.goto(f"{self.daemon.url}/ui/")
        assert response is not None and response.status == 200

    def sign_in(self, token: str | None = None) -> None:
        """Load the page and sign in (with the daemon's token unless another is given)."""
        self.open()
        self.page.get_by_label("Admin token").fill(token or self.daemon.token)
        self.page.get_by_role("button", name="Sign in").click()
        if token is None:
            expect(self.page.get_by_role("link", name="Overview", exact=True)).to_be_visible()

    def view(self, name: str) -> None:
        """Open a view by its navigation link and wait for its heading."""
        self.page.get_by_role("navigation").get_by_role("link", name=name, exact=True).click()
        expect(self.page.get_by_role("heading", level=1, name=name)).to_be_visible()

    def shoot(self, name: str) -> None:
        """Screenshots at 1280 and 390 px, under test-artifacts/console/."""
        screenshots(self.page, name)

    def ask_to_replay_all_matching(self, *says: str) -> Locator:
        """Click "Replay all matching": the confirmation dialog, checked to say each of `says`."""
        self.page.get_by_role("button", name="Replay all matching").click()
        dialog = self.page.get_by_role("dialog")
        for text in says:
            expect(dialog).to_contain_text(text)
        return dialog

    def confirm_replay(self, dialog: Locator, replayed: int) -> None:
        """Confirm in the dialog, and see the page say how many dead letters were replayed."""
        dialog.get_by_role("button", name="Confirm").click()
        expect(self.page.get_by_role("status")).to_contain_text(
            f"Replayed {replayed} matching dead letters"
        )


@pytest.fixture
def console(browser: Browser, console_daemon: ConsoleDaemon) -> Iterator[Console]:
    """A new browser context (its own sessionStorage) and page; no unexpected errors after."""
    context = browser.new_context(viewport=WIDE)
    page = context.new_page()
    page.set_default_timeout(20_000)
    log = ConsoleLog()
    log.watch(page)
    try:
        yield Console(page, console_daemon, log)
        assert not log.unexpected(), f"the page reported errors: {log.unexpected()}"
    finally:
        context.close()


def _number(text: str) -> int:
    return int("".join(c for c in text if c.isdigit()))


def _contact(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _segment(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3)}"


# ---- the tests ----------------------------------------------------------------------------------


def test_every_console_response_carries_the_security_headers(console_daemon: ConsoleDaemon):
    for path in ("/ui/", "/ui/app.js", "/ui/style.css", "/ui/views/overview.js", "/ui/nothing.js"):
        status, headers, _ = _request(f"{console_daemon.url}{path}")
        assert status == (404 if "nothing" in path else 200), path
        policy = headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
    _, headers, _ = _request(f"{console_daemon.url}/ui/app.js")
    assert headers["Content-Type"].startswith("text/javascript")
    # The admin endpoints the views read want the token like every admin endpoint.
    for path in ("/v1/overview", "/v1/segments", "/v1/cluster"):
        assert _request(f"{console_daemon.url}{path}")[0] == 401, path


def test_sign_in_says_clearly_when_the_token_is_wrong(console: Console):
    console.log.allow(401)  # the refused sign-in's request, as the browser logs it
    console.open()
    # The page is served with its policy, and asks for the token in a labelled field.
    response = console.page.request.get(f"{console.daemon.url}/ui/")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    console.shoot("sign-in")
    console.sign_in("not-the-token")
    alert = console.page.get_by_role("alert")
    expect(alert).to_contain_text("admin token was not accepted")
    expect(console.page.get_by_role("navigation")).to_be_hidden()
    console.shoot("sign-in-refused")
    console.page.get_by_label("Admin token").fill(console.daemon.token)
    console.page.get_by_role("button", name="Sign in").click()
    expect(console.page.get_by_role("heading", level=1, name="Overview")).to_be_visible()
    # The token lives in this tab's sessionStorage only: no cookie is set.
    assert console.page.context.cookies() == []
    stored = console.page.evaluate("sessionStorage.getItem('segmapd.adminToken')")
    assert stored == console.daemon.token
    # Nowhere else: not in the address, not in storage that outlives the tab.
    assert console.daemon.token not in console.page.url
    assert console.page.evaluate("localStorage.length") == 0
    console.page.get_by_role("button", name="Sign out").click()
    expect(console.page.get_by_label("Admin token")).to_be_visible()
    assert console.page.evaluate("sessionStorage.getItem('segmapd.adminToken')") is None


def test_the_overview_updates_as_work_is_done(console: Console):
    console.sign_in()
    page = console.page
    expect(page.get_by_text("Ready", exact=True)).to_be_visible()
    updated = page.locator("[data-updated]")
    expect(updated).to_contain_text("Updated")
    first = updated.get_attribute("data-updated")
    active = page.locator('[data-state="active"] td')
    expect(active).not_to_have_text("\u2013")  # a dash: not counted yet
    before = _number(active.inner_text())
    contact = _contact("ov")
    console.daemon.mappings({"contactId": contact, "segmentIds": ["OvA", "OvB", "OvC"]})
    # The journal census counts in the background; the page shows each new count. It waits
    # 200 times a count's cost between counts (2 s at least): on a loaded machine a count of
    # 150 ms puts the next 30 s away, so the page is given a minute and a half.
    page.wait_for_function(
        "want => Number(document.querySelector('[data-state=\"active\"] td')"
        ".textContent.replace(/[^0-9]/g, '')) >= want",
        arg=before + 3,
        timeout=90_000,
    )
    assert updated.get_attribute("data-updated") != first
    # The charts are the daemon's own samples, drawn as inline SVG.
    expect(page.locator("figure.chart svg polyline").first).to_be_attached()
    expect(page.get_by_role("img", name="Bulk writes/s, the last 10 minutes")).to_be_visible()
    console.shoot("overview")


def test_a_contact_lookup_shows_each_segment_and_its_history(console: Console):
    contact = _contact("look")
    console.daemon.mappings({"contactId": contact, "segmentIds": ["LookVIP", "LookGold"]})
    console.sign_in()
    console.view("Contact")
    page = console.page
    page.get_by_label("Contact id").fill(contact)
    page.get_by_role("button", name="Look up").click()
    table = page.get_by_role("table", name=f"Segments of contact {contact}")
    expect(table.locator('[data-segment="LookVIP"]')).to_contain_text("active")
    expect(table.locator('[data-segment="LookGold"]')).to_contain_text("live")
    history = page.locator("details.history-item", has_text="LookVIP")
    history.locator("summary").click()
    for state in ("queued", "sending", "written", "active"):
        expect(history.locator("ol.history")).to_contain_text(state)
    console.shoot("contact")


def test_dead_letters_are_filtered_and_the_selected_one_replayed_ends_active(console: Console):
    daemon = console.daemon
    segment, other = _segment("DlA"), _segment("DlB")
    first, second = _contact("dl"), _contact("dl")
    daemon.missing([first, second])
    daemon.mappings(
        [
            {"contactId": first, "segmentIds": [segment, other]},
            {"contactId": second, "segmentIds": [segment]},
        ]
    )
    assert daemon.states(first) == {segment: "failed", other: "failed"}
    console.sign_in()
    console.view("Dead letters")
    page = console.page
    page.get_by_label("Segment").fill(segment)
    page.get_by_role("button", name="Filter").click()
    summary = page.locator("[data-matching]")
    expect(summary).to_have_attribute("data-matching", "2")
    rows = page.locator("tbody tr[data-contact]")
    expect(rows).to_have_count(2)
    for index in range(2):
        expect(rows.nth(index)).to_contain_text("contact not found")
        expect(rows.nth(index)).to_contain_text("ContactNotFound")
    console.shoot("dead-letters")
    # CXone knows the contact now: the replay of the one selected succeeds.
    daemon.missing([second])
    page.get_by_role("checkbox", name=f"Select {first} in {segment}").check()
    expect(page.get_by_text("1 selected")).to_be_visible()
    page.get_by_role("button", name="Replay", exact=True).click()
    expect(page.get_by_role("status")).to_contain_text("Replayed 1 dead letter")
    daemon.wait_states(first, {segment: "active"})
    # Only that one: the same contact's other segment, and the other contact, stay dead.
    assert daemon.states(first)[other] == "failed"
    assert daemon.states(second) == {segment: "failed"}
    expect(summary).to_have_attribute("data-matching", "1")


def test_replay_all_matching_replays_exactly_the_filtered_set(console: Console):
    daemon = console.daemon
    chosen, left = _segment("AllA"), _segment("AllB")
    contacts = [_contact("all") for _ in range(3)]
    daemon.missing(contacts)
    daemon.mappings(
        [{"contactId": c, "segmentIds": [chosen]} for c in contacts]
        + [{"contactId": c, "segmentIds": [left]} for c in contacts[:2]]
    )
    console.sign_in()
    console.view("Dead letters")
    page = console.page
    page.get_by_label("Segment").fill(chosen)
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("[data-matching]")).to_have_attribute("data-matching", "3")
    daemon.missing([])
    # Every replay the page asks for, seen as it is sent (a state read after Cancel could come
    # before a replay sent by mistake had landed).
    replays: list[str] = []
    page.on(
        "request",
        lambda request: (
            replays.append(request.url)
            if request.method == "POST" and "/v1/dead-letters/replay" in request.url
            else None
        ),
    )
    dialog = console.ask_to_replay_all_matching("all 3 dead letters matching segment")
    console.shoot("replay-all-confirm")
    # Cancelling replays nothing.
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    assert daemon.states(contacts[0])[chosen] == "failed"
    dialog = console.ask_to_replay_all_matching()
    assert not replays, replays
    console.confirm_replay(dialog, 3)
    for contact in contacts:
        daemon.wait_states(contact, {chosen: "active"})
    # The other segment's dead letters were not in the filter: still dead.
    for contact in contacts[:2]:
        assert daemon.states(contact)[left] == "failed"
    status, listed = daemon.admin("GET", f"/v1/dead-letters?segment={left}&count=true")
    assert status == 200 and listed["matching"] == 2


def test_dead_letters_are_filtered_by_source_and_only_that_sources_replayed(console: Console):
    daemon = console.daemon
    segment = _segment("Src")
    from_app = [_contact("app") for _ in range(2)]
    from_api = [_contact("api") for _ in range(2)]
    daemon.missing(from_app + from_api)
    for contact in from_app:
        assert daemon.json_webhook({"contactId": contact, "add": [segment]}) == 202
    daemon.mappings([{"contactId": c, "segmentIds": [segment]} for c in from_api])
    for contact in from_app:
        daemon.wait_states(contact, {segment: "failed"})
    console.sign_in()
    console.view("Dead letters")
    page = console.page
    summary = page.locator("[data-matching]")
    rows = page.locator("tbody tr[data-contact]")
    page.get_by_label("Segment").fill(segment)
    page.get_by_role("button", name="Filter").click()
    # Every source at first, each row naming its own.
    expect(summary).to_have_attribute("data-matching", "4")
    expect(rows.locator('[data-source="app"]')).to_have_count(2)
    expect(rows.locator('[data-source="mappings"]')).to_have_count(2)
    expect(rows.locator('[data-source="mappings"]').first).to_have_text("mappings (admin API)")
    # The select offers the configured sources, and the admin API's.
    page.get_by_label("Source").select_option("app")
    page.get_by_role("button", name="Filter").click()
    expect(summary).to_have_attribute("data-matching", "2")
    expect(rows).to_have_count(2)
    expect(rows.locator('[data-source="app"]')).to_have_count(2)
    console.shoot("dead-letters-by-source")
    daemon.missing([])
    dialog = console.ask_to_replay_all_matching(
        "all 2 dead letters matching segment", "and source app"
    )
    console.confirm_replay(dialog, 2)
    for contact in from_app:
        daemon.wait_states(contact, {segment: "active"})
    # The admin API's dead letters of the same segment were not in the filter: still dead.
    for contact in from_api:
        assert daemon.states(contact)[segment] == "failed"
    status, listed = daemon.admin(
        "GET", f"/v1/dead-letters?segment={segment}&source=mappings&count=true"
    )
    assert status == 200 and listed["matching"] == 2
    assert {d["source"] for d in listed["deadLetters"]} == {"mappings"}


def test_replay_all_matching_replays_the_filter_on_screen_when_an_older_answer_comes_late(
    console: Console,
):
    daemon = console.daemon
    first, second = _segment("LateA"), _segment("LateB")
    in_first = [_contact("late") for _ in range(3)]
    in_second = [_contact("late") for _ in range(2)]
    daemon.missing(in_first + in_second)
    daemon.mappings(
        [{"contactId": c, "segmentIds": [first]} for c in in_first]
        + [{"contactId": c, "segmentIds": [second]} for c in in_second]
    )
    console.sign_in()
    console.view("Dead letters")
    page = console.page
    # The first filter's answer is held back until the second filter's has been shown.
    held: list[Route] = []

    def hold(route: Route) -> None:
        held.append(route)

    page.route(f"**/v1/dead-letters?*segment={first}*", hold)
    page.get_by_label("Segment").fill(first)
    page.get_by_role("button", name="Filter").click()
    page.get_by_label("Segment").fill(second)
    page.get_by_role("button", name="Filter").click()
    summary = page.locator("[data-matching]")
    expect(summary).to_have_attribute("data-matching", "2")
    assert held, "the first filter's listing was not asked for"
    with page.expect_response(lambda response: f"segment={first}" in response.url):
        for route in held:
            route.continue_()
    page.unroute(f"**/v1/dead-letters?*segment={first}*")
    # The late answer of the older filter changes nothing on screen, nor what is replayed.
    expect(summary).to_have_attribute("data-matching", "2")
    expect(summary).to_contain_text(second)
    daemon.missing([])
    dialog = console.ask_to_replay_all_matching(f"all 2 dead letters matching segment {second}")
    console.confirm_replay(dialog, 2)
    for contact in in_second:
        daemon.wait_states(contact, {second: "active"})
    for contact in in_first:
        assert daemon.states(contact)[first] == "failed"


def test_a_contact_id_sent_as_markup_is_shown_as_text(console: Console):
    daemon = console.daemon
    segment = _segment("Xss")
    # The json kind dead-letters a contact id that is no CXone id, as it was sent.
    assert daemon.json_webhook({"contactId": MARKUP_ID, "add": [segment]}) == 202
    console.sign_in()
    console.view("Dead letters")
    page = console.page
    page.get_by_label("Segment").fill(segment)
    page.get_by_role("button", name="Filter").click()
    row = page.locator("tbody tr[data-contact]")
    expect(row).to_have_count(1)
    cell = row.locator("td.id").first
    expect(cell).to_have_text(MARKUP_ID)
    # Text, not markup: no element came of it, no script ran.
    assert row.locator("script, img").count() == 0
    assert page.evaluate("window.__pwned") is None
    console.shoot("dead-letters-markup")
    # And the Contact view shows it the same way.
    cell.get_by_role("link").click()
    expect(page.locator("[data-contact-id]")).to_have_text(MARKUP_ID)
    expect(page.get_by_role("table", name=f"Segments of contact {MARKUP_ID}")).to_contain_text(
        "invalid contact id"
    )
    assert page.locator("main script, main img").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_segments_and_cluster_views(console: Console):
    daemon = console.daemon
    segment = _segment("Seg")
    dead = _contact("seg")
    daemon.missing([dead])
    daemon.mappings(
        [
            {"contactId": _contact("seg"), "segmentIds": [segment]},
            {"contactId": dead, "segmentIds": [segment]},
        ]
    )
    console.sign_in()
    console.view("Segments")
    page = console.page
    row = page.locator(f'tr[data-segment="{segment}"]')
    # Dead letters per segment are counted in the background: the row shows the next count.
    expect(row.locator("td").nth(3)).to_have_text("1", timeout=30_000)
    expect(row).to_contain_text("written")
    console.shoot("segments")
    # Found by the daemon among every segment, in any case: not only among the busiest shown.
    for find in (segment.lower(), segment.upper()):
        status, found = daemon.admin("GET", f"/v1/segments?limit=1&find={find}")
        assert status == 200 and [s["segmentId"] for s in found["segments"]] == [segment], found
        assert found["matching"] == 1 and found["total"] >= 1
    page.get_by_label("Find a segment").fill(segment.lower())
    expect(page.locator("tbody tr[data-segment]")).to_have_count(1)
    expect(page.locator("tbody tr[data-segment]").first).to_have_attribute("data-segment", segment)
    console.view("Cluster")
    expect(page.locator("[data-mode=single]")).to_contain_text("runs alone on its SQLite journal")
    console.shoot("cluster-single")


def test_the_reconcile_view_starts_a_dry_run_and_shows_what_it_found(console: Console):
    daemon = console.daemon
    segment = _segment("Rc")
    contacts = [_contact("rc") for _ in range(3)]
    daemon.mappings([{"contactId": c, "segmentIds": [segment]} for c in contacts])
    # Behind segmapd's back: one membership is gone from CXone.
    daemon.emulator("DELETE", f"/_emulator/segments/{segment}/members/{contacts[0]}", None)
    console.sign_in()
    console.view("Reconcile")
    page = console.page
    page.get_by_label("Segments (comma-separated, optional)").fill(segment)
    page.get_by_role("button", name="Start dry run").click()
    expect(page.get_by_role("status")).to_contain_text("1 drifted, 0 requeued", timeout=30_000)
    passes = page.get_by_role("table", name="Recent passes")
    expect(passes.locator("tbody tr").first).to_contain_text("dry run")
    expect(passes.locator("tbody tr").first).to_contain_text("done")
    expect(passes.locator("tbody tr").first).to_contain_text(segment)
    console.shoot("reconcile")
