"""Drift reconcile on real processes: the daemon, the emulator, SQLite (PostgreSQL in the cluster
test).

Memberships are changed directly in the emulator (an edit behind segmapd's back, as someone in
CXone's UI would), then a pass is started through the API or the CLI: drift is found, journaled,
counted and repaired through the bulk lane; what segmapd never made is never read or written;
a dry run changes nothing; the pass keeps to its read share; a restart resumes the pass.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import aiohttp

from tests.e2e.conftest import Daemon, StartDaemon
from tests.e2e.test_cluster import start_cluster
from tests.support.emulator import EmulatorControl
from tests.support.postgres import PostgresServer
from tests.support.waits import until

SEGMENT = "RC_VIP"
OTHER = "RC_OTHER"


async def api(
    http: aiohttp.ClientSession, daemon: Daemon, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(
        method, f"{daemon.url}{path}", json=body, headers=daemon.admin
    ) as response:
        return response.status, await response.json(content_type=None)


async def settle(http: aiohttp.ClientSession, daemon: Daemon, events: list[dict[str, Any]]) -> None:
    """Send the events and wait until every pair they name is confirmed."""
    status, body = await api(http, daemon, "POST", "/v1/mappings?wait=60", events)
    assert status == 200, body
    states = {s["state"] for r in body["results"] for s in r["segments"]}
    assert states <= {"active", "removed"}, body


async def finished(
    http: aiohttp.ClientSession, daemon: Daemon, pass_id: str, timeout_s: float = 60.0
) -> dict[str, Any]:
    async def probe() -> dict[str, Any]:
        status, body = await api(http, daemon, "GET", f"/v1/reconcile/{pass_id}")
        assert status == 200, body
        return dict(body)

    return await until(
        probe, lambda p: p["state"] != "running", timeout_s=timeout_s, what=f"pass {pass_id}"
    )


async def member(
    emulator: EmulatorControl, segment_id: str, contact_id: str
) -> dict[str, Any] | None:
    for entry in await emulator.members(segment_id):
        if entry["contactId"] == contact_id and entry["isMember"]:
            return entry
    return None


async def metric(http: aiohttp.ClientSession, daemon: Daemon, sample: str) -> float:
    async with http.get(f"{daemon.url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not exposed")


async def test_drift_is_found_journaled_and_repaired_and_untracked_memberships_are_untouched(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start_daemon(reconcile={"interval_s": 0})
    adds = [f"rc-a{i}" for i in range(6)]
    await settle(http, daemon, [{"contactId": c, "segmentIds": [SEGMENT]} for c in adds])
    # A removal segmapd confirmed: tracked as "not a member".
    await settle(
        http,
        daemon,
        [{"contactId": "rc-gone", "add": [SEGMENT]}, {"contactId": "rc-gone", "remove": [SEGMENT]}],
    )
    # Behind segmapd's back: one add undone, the removal undone, and memberships segmapd never
    # made (in a tracked segment and in another one).
    await emulator.edit_member(SEGMENT, "rc-a0", member=False)
    await emulator.edit_member(SEGMENT, "rc-gone", member=True)
    await emulator.edit_member(SEGMENT, "rc-stranger", member=True)
    await emulator.edit_member(OTHER, "rc-a1", member=True)
    await emulator.reset_counters()

    status, started = await api(http, daemon, "POST", "/v1/reconcile", {})
    assert status == 202, started
    assert started["state"] == "running" and started["dryRun"] is False
    done = await finished(http, daemon, started["id"])
    assert done["state"] == "done", done
    assert (done["read"], done["inStep"], done["drifted"], done["requeued"]) == (7, 5, 2, 2), done
    assert done["skipped"] == 0 and done["finishedAt"] is not None

    # Repaired through the normal path: written again, confirmed by reads.
    states = await daemon.wait_states(http, "rc-a0", {"active"}, timeout_s=30)
    assert states[SEGMENT]["lane"] == "bulk", states
    await daemon.wait_states(http, "rc-gone", {"removed"}, timeout_s=30)
    assert await member(emulator, SEGMENT, "rc-a0") is not None
    assert await member(emulator, SEGMENT, "rc-gone") is None
    # Never written: the stranger was added once (by the edit) and is still a member, and the
    # membership segmapd did not make in the other segment stays.
    stranger = await member(emulator, SEGMENT, "rc-stranger")
    assert stranger is not None and stranger["applied"] == 1, stranger
    assert await member(emulator, OTHER, "rc-a1") is not None
    counters = await emulator.counters()
    # One write per repair (an add, a removal), and the pass's 7 reads plus validation's.
    assert counters["bulk_ids"]["ids"] + counters["requests"]["single"].get("200", 0) <= 1
    assert counters["bulk_remove_ids"]["ids"] <= 1

    # Journaled against the pair, and counted.
    status, contact = await daemon.contact(http, "rc-a0")
    assert status == 200
    [drift] = contact["drift"]
    assert (drift["segmentId"], drift["intent"], drift["passId"], drift["requeued"]) == (
        SEGMENT,
        "add",
        started["id"],
        True,
    )
    assert await metric(http, daemon, 'segmapd_reconcile_drift_total{intent="add"}') == 1
    assert await metric(http, daemon, 'segmapd_reconcile_drift_total{intent="remove"}') == 1
    assert await metric(http, daemon, 'segmapd_reconcile_passes_total{state="done"}') == 1

    status, listing = await api(http, daemon, "GET", "/v1/reconcile")
    assert status == 200
    assert [p["id"] for p in listing["passes"]] == [started["id"]]


async def test_a_dry_run_reports_drift_and_changes_nothing(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start_daemon(reconcile={"interval_s": 0})
    await settle(
        http, daemon, [{"contactId": f"dr-{i}", "segmentIds": [SEGMENT]} for i in range(3)]
    )
    await emulator.edit_member(SEGMENT, "dr-1", member=False)
    await emulator.reset_counters()

    status, started = await api(http, daemon, "POST", "/v1/reconcile", {"dryRun": True})
    assert status == 202, started
    done = await finished(http, daemon, started["id"])
    assert (done["state"], done["dryRun"]) == ("done", True), done
    assert (done["read"], done["drifted"], done["requeued"]) == (3, 1, 0), done

    # Nothing written, nothing changed: CXone still lacks the membership, segmapd still says
    # what it said (the drift is on record).
    counters = await emulator.counters()
    assert counters["bulk_ids"]["ids"] == 0 and not counters["requests"]["single"], counters
    assert await member(emulator, SEGMENT, "dr-1") is None
    status, contact = await daemon.contact(http, "dr-1")
    assert contact["segments"][0]["state"] == "active"
    assert contact["drift"][0]["requeued"] is False


async def test_a_second_pass_is_refused_while_one_runs_and_segments_narrow_a_pass(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    # 0.05 of 20 reads/s: one read a second, so the first pass is still running.
    daemon = await start_daemon(
        limits={"read_rps": 20}, reconcile={"interval_s": 0, "read_share": 0.05}
    )
    await settle(
        http,
        daemon,
        [{"contactId": f"nr-{i}", "segmentIds": [SEGMENT, OTHER]} for i in range(4)],
    )
    status, first = await api(http, daemon, "POST", "/v1/reconcile", {"segmentIds": [OTHER]})
    assert status == 202, first
    assert first["segmentIds"] == [OTHER] and first["total"] is None
    status, refused = await api(http, daemon, "POST", "/v1/reconcile", {})
    assert status == 409, refused
    assert refused["running"]["id"] == first["id"] and first["id"] in refused["message"]
    done = await finished(http, daemon, first["id"])
    # Only the other segment's four memberships were read.
    assert (done["read"], done["inStep"]) == (4, 4), done

    for bad, field in (
        ({"dryRun": "yes"}, "dryRun"),
        ({"segmentIds": "VIP"}, "segmentIds"),
        ({"segmentIds": [7]}, "segmentIds"),
    ):
        status, problem = await api(http, daemon, "POST", "/v1/reconcile", bad)
        assert (status, problem.get("field")) == (400, field), problem
    status, problem = await api(http, daemon, "POST", "/v1/reconcile", {"segments": []})
    assert status == 400 and "segmentIds" in problem["message"], problem
    for unknown in ("nope", "a%00b", "x" * 65):
        status, problem = await api(http, daemon, "GET", f"/v1/reconcile/{unknown}")
        assert status == 404, problem


async def test_a_pass_keeps_to_its_share_of_the_read_budget(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    read_rps, share = 40, 0.125  # 5 reads a second
    daemon = await start_daemon(
        limits={"read_rps": read_rps}, reconcile={"interval_s": 0, "read_share": share}
    )
    await settle(
        http, daemon, [{"contactId": f"sh-{i}", "segmentIds": [SEGMENT]} for i in range(40)]
    )
    await emulator.reset_counters()
    status, started = await api(http, daemon, "POST", "/v1/reconcile", {})
    assert status == 202, started
    done = await finished(http, daemon, started["id"])
    assert done["read"] == 40, done
    counters = await emulator.counters()
    reads = sum(counters["requests"]["read"].values())
    assert reads == 40, counters["requests"]["read"]  # no validation read was due
    # Counted by the emulator: never more than the share's 5 reads in any second (one more at
    # a window's edge).
    assert counters["peak_rps"]["read"] <= read_rps * share + 1, counters["peak_rps"]


async def test_a_restart_resumes_the_pass_where_it_stood(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    # Two reads a second: the pass is still running when the daemon is killed.
    daemon = await start_daemon(
        limits={"read_rps": 20}, reconcile={"interval_s": 0, "read_share": 0.1}
    )
    await settle(
        http, daemon, [{"contactId": f"rs-{i}", "segmentIds": [SEGMENT]} for i in range(16)]
    )
    await emulator.reset_counters()
    status, started = await api(http, daemon, "POST", "/v1/reconcile", {})
    assert status == 202, started

    async def progress() -> dict[str, Any]:
        return dict((await api(http, daemon, "GET", f"/v1/reconcile/{started['id']}"))[1])

    await until(progress, lambda p: p["read"] >= 4, timeout_s=30, what="four reads")
    daemon.process.kill()
    daemon.restart()
    done = await finished(http, daemon, started["id"])
    assert done["state"] == "done", done
    assert done["read"] == 16 and done["inStep"] == 16, done
    # Resumed from its cursor: at most the reads of the moment of the kill were made twice.
    reads = sum((await emulator.counters())["requests"]["read"].values())
    assert 16 <= reads <= 18, reads
    status, listing = await api(http, daemon, "GET", "/v1/reconcile")
    assert [p["id"] for p in listing["passes"]] == [started["id"]]


async def test_passes_start_on_schedule(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start_daemon(reconcile={"interval_s": 2})
    await settle(http, daemon, [{"contactId": "sc-1", "segmentIds": [SEGMENT]}])

    async def passes() -> list[dict[str, Any]]:
        return list((await api(http, daemon, "GET", "/v1/reconcile"))[1]["passes"])

    found = await until(
        passes,
        lambda ps: len([p for p in ps if p["state"] == "done"]) >= 2,
        timeout_s=30,
        what="two scheduled passes",
    )
    assert all(p["scheduled"] for p in found), found
    assert found[0]["startedAt"] > found[1]["startedAt"]


async def test_the_cli_starts_a_pass_and_prints_its_summary(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    cli_env: dict[str, str],
):
    daemon = await start_daemon(reconcile={"interval_s": 0})
    await settle(
        http, daemon, [{"contactId": f"cl-{i}", "segmentIds": [SEGMENT]} for i in range(2)]
    )
    await emulator.edit_member(SEGMENT, "cl-0", member=False)
    token = daemon.admin["Authorization"].removeprefix("Bearer ")
    command = [sys.executable, "-m", "daemon.cli", "reconcile", "--url", daemon.url]
    result = await asyncio.to_thread(
        subprocess.run,
        [*command, "--token", token, "--dry-run", "--segment", SEGMENT],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "2 read, 1 in step, 1 drifted, 0 requeued" in result.stdout, result.stdout
    assert "(dry run)" in result.stdout and "started reconcile pass" in result.stderr
    # No token: a usage error, no traceback.
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, env=cli_env, timeout=60
    )
    assert result.returncode == 2 and "admin token" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


async def test_one_instance_runs_a_pass_every_instance_sees_it_and_a_survivor_finishes_it(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    postgres: PostgresServer,
    postgres_url: str,
):
    # Two reads a second: the pass is still running when its instance is killed.
    daemons = await start_cluster(
        start_daemon,
        postgres,
        postgres_url,
        3,
        limits={"read_rps": 20},
        reconcile={"interval_s": 0, "read_share": 0.1},
    )
    segments = [f"CR{i}" for i in range(6)]
    contacts = [f"cr-{i}" for i in range(3)]
    await settle(http, daemons[0], [{"contactId": c, "segmentIds": segments} for c in contacts])
    # Drift in two segments, most likely owned by two different instances.
    await emulator.edit_member("CR1", "cr-0", member=False)
    await emulator.edit_member("CR4", "cr-2", member=False)

    status, started = await api(http, daemons[2], "POST", "/v1/reconcile", {})
    assert status == 202, started
    # Visible from every instance; refused on every instance while it runs.
    for daemon in daemons:
        status, seen = await api(http, daemon, "GET", f"/v1/reconcile/{started['id']}")
        assert status == 200 and seen["state"] == "running", seen
    status, refused = await api(http, daemons[1], "POST", "/v1/reconcile", {})
    assert status == 409 and refused["running"]["id"] == started["id"], refused

    async def runners() -> list[Daemon]:
        return [d for d in daemons if await metric(http, d, "segmapd_reconcile_running") == 1]

    [runner] = await until(runners, lambda r: len(r) == 1, timeout_s=10, what="one runner")

    async def progress() -> dict[str, Any]:
        return dict((await api(http, runner, "GET", f"/v1/reconcile/{started['id']}"))[1])

    await until(progress, lambda p: p["read"] >= 4, timeout_s=30, what="four reads")
    runner.process.kill()
    survivors = [d for d in daemons if d is not runner]
    done = await finished(http, survivors[0], started["id"], timeout_s=90)
    assert done["state"] == "done", done
    assert (done["read"], done["drifted"], done["requeued"]) == (18, 2, 2), done
    # Ended by exactly one survivor.
    ended = [
        await metric(http, d, 'segmapd_reconcile_passes_total{state="done"}') for d in survivors
    ]
    assert sorted(ended) == [0, 1], ended
    # Repaired by each segment's owner, whichever instance found the drift.
    for segment, contact in (("CR1", "cr-0"), ("CR4", "cr-2")):

        async def present(segment: str = segment, contact: str = contact) -> bool:
            return await member(emulator, segment, contact) is not None

        await until(present, bool, timeout_s=30, what=f"{contact} back in {segment}")
    states = await survivors[1].wait_states(http, "cr-0", {"active"}, timeout_s=30)
    assert states["CR1"]["lane"] == "bulk", states
