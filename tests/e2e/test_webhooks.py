"""Signed webhooks into the real daemon process, memberships out in the emulator process."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from standardwebhooks import Webhook

from tests.e2e.conftest import StartDaemon
from tests.support.emulator import EmulatorControl


class Receiver:
    """A notification endpoint that verifies every Standard Webhooks signature it gets."""

    def __init__(self) -> None:
        self.secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        self.events: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            Webhook(self.secret).verify(body, dict(request.headers))
        except Exception:
            self.bad_signatures += 1
            return web.Response(status=400)
        self.events.append(orjson.loads(body))
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def test_signed_webhooks_end_active_with_a_signed_notification(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    receiver = Receiver()
    await receiver.start()
    try:
        daemon = await start_daemon(notify={"url": receiver.url, "secret": receiver.secret})
        status, answer = await daemon.webhook(
            http,
            [
                {"contactId": 100000000123, "segmentIds": ["VIP", "Spanish", "ChurnRisk"]},
                {"contactId": "contact_8f3a9c2e-1b4d", "segmentIds": ["VIP", "VIP"]},
            ],
        )
        assert status == 202
        assert answer == {"accepted": 4, "duplicates": 0, "stale": 0}
        states = await daemon.wait_states(http, "100000000123", {"active", "failed"}, 30)
        assert {s: v["state"] for s, v in states.items()} == {
            "VIP": "active",
            "Spanish": "active",
            "ChurnRisk": "active",
        }
        states = await daemon.wait_states(http, "contact_8f3a9c2e-1b4d", {"active"}, 30)
        assert list(states) == ["VIP"]
        # CXone really has them.
        vip = {m["contactId"] for m in await emulator.members("VIP")}
        assert {"100000000123", "contact_8f3a9c2e-1b4d"} <= vip
        # And the dependent workflow heard about each, signed.
        deadline = time.monotonic() + 15
        while len(receiver.events) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert receiver.bad_signatures == 0
        assert sorted(
            (e["data"]["contactId"], e["data"]["segmentId"]) for e in receiver.events
        ) == [
            ("100000000123", "ChurnRisk"),
            ("100000000123", "Spanish"),
            ("100000000123", "VIP"),
            ("contact_8f3a9c2e-1b4d", "VIP"),
        ]
        assert {e["type"] for e in receiver.events} == {"mapping.active"}
    finally:
        await receiver.stop()


async def test_a_redelivery_gets_the_same_answer_and_adds_no_work(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start_daemon()
    event = {"contactId": "c-1", "segmentIds": ["S1", "S2"]}
    first = await daemon.webhook(http, event, msg_id="msg_fixed_1")
    assert first == (202, {"accepted": 2, "duplicates": 0, "stale": 0})
    again = await daemon.webhook(http, event, msg_id="msg_fixed_1")
    assert again == (200, {"accepted": 2, "duplicates": 0, "stale": 0})
    await daemon.wait_states(http, "c-1", {"active"}, 30)
    # The same event under a new delivery id: accepted again, but all of it is a duplicate.
    third = await daemon.webhook(http, event, msg_id="msg_fixed_2")
    assert third == (202, {"accepted": 2, "duplicates": 2, "stale": 0})
    counters = await emulator.counters()
    assert counters["bulk_ids"]["ids"] == 2  # each membership written once


async def test_every_error_status_names_the_problem(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start_daemon(server={"max_body_bytes": 2048})
    url = f"{daemon.url}/v1/webhooks/crm"
    good = orjson.dumps({"contactId": "c1", "segmentIds": ["S1"]})

    async def post(
        body: bytes, headers: dict[str, str], path: str = url
    ) -> tuple[int, dict[str, Any]]:
        async with http.post(path, data=body, headers=headers) as response:
            return response.status, await response.json(content_type=None)

    status, problem = await post(
        good, daemon.signed_headers(good), f"{daemon.url}/v1/webhooks/nope"
    )
    assert status == 404 and "nope" in problem["message"]
    # Unconfigured source names share one metrics series: the path cannot grow the label set.
    for name in ("nope-1", "nope-2"):
        await post(good, daemon.signed_headers(good), f"{daemon.url}/v1/webhooks/{name}")
    async with http.get(f"{daemon.url}/metrics") as response:
        exposition = await response.text()
    assert (
        'segmapd_webhooks_received_total{code="404",kind="_unconfigured",'
        'source="_unconfigured"} 3.0' in exposition
    )
    assert "nope" not in exposition

    headers = daemon.signed_headers(good)
    status, problem = await post(good + b" ", headers)  # body changed after signing
    assert status == 401

    headers = daemon.signed_headers(good)
    del headers["webhook-signature"]
    status, problem = await post(good, headers)
    assert status == 401 and "webhook-signature" in problem["message"]

    stale = daemon.signed_headers(good)
    from listeners import sign

    stale.update(sign(daemon.secret, "msg_old", int(time.time()) - 3600, good))
    status, problem = await post(good, stale)
    assert status == 401 and "tolerance" in problem["message"]

    bad_json = b'{"contactId": "c1", "segmentIds": ['
    status, problem = await post(bad_json, daemon.signed_headers(bad_json))
    assert status == 400

    wrong_shape = orjson.dumps({"contactId": "c1", "segments": ["S1"]})
    status, problem = await post(wrong_shape, daemon.signed_headers(wrong_shape))
    assert status == 400 and "segment" in problem["message"]

    bad_id = orjson.dumps(
        [{"contactId": "c1", "segmentIds": ["S1"]}, {"contactId": "c 2", "segmentIds": ["S1"]}]
    )
    status, problem = await post(bad_id, daemon.signed_headers(bad_id))
    assert status == 422 and "contactId" in problem["message"] and "1" in problem["message"]

    huge = orjson.dumps({"contactId": "c1", "segmentIds": ["S" * 100] * 40})
    status, problem = await post(huge, daemon.signed_headers(huge))
    assert status == 413 and "max_body_bytes" in problem["message"]

    # Nothing of the refused requests was taken on.
    assert (await daemon.contact(http, "c1"))[0] == 404

    # The admin API wants its token.
    async with http.get(f"{daemon.url}/v1/dead-letters") as response:
        assert response.status == 401
    async with http.get(
        f"{daemon.url}/v1/dead-letters", headers={"Authorization": "Bearer wrong"}
    ) as response:
        assert response.status == 401


async def test_above_the_high_water_mark_webhooks_get_503_with_retry_after(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    await emulator.configure({"faults": {"bulk": {"latency_ms": 3000}}})
    daemon = await start_daemon(server={"high_water": 5}, batching={"linger_ms": 5000})
    status, _ = await daemon.webhook(http, {"contactId": "c1", "segmentIds": ["A", "B", "C"]})
    assert status == 202
    status, problem = await daemon.webhook(http, {"contactId": "c2", "segmentIds": ["A", "B", "C"]})
    assert status == 503
    assert "high_water" in problem["message"]
    async with http.get(f"{daemon.url}/readyz") as response:
        assert response.status == 200  # 3 pending of 5: still ready


async def test_probes_metrics_and_openapi(start_daemon: StartDaemon, http: aiohttp.ClientSession):
    daemon = await start_daemon()
    async with http.get(f"{daemon.url}/healthz") as response:
        assert response.status == 200
    async with http.get(f"{daemon.url}/readyz") as response:
        body = await response.json()
        assert response.status == 200, body
        assert body["checks"]["cxone_token"] == "ok"
    await daemon.webhook(http, {"contactId": "c1", "segmentIds": ["S1"]})
    await daemon.wait_states(http, "c1", {"active"}, 30)
    async with http.get(f"{daemon.url}/metrics") as response:
        text = await response.text()
        assert response.status == 200
    assert "segmapd_" in text
    assert daemon.secret not in text and daemon.admin_token not in text
    async with http.get(f"{daemon.url}/openapi.json") as response:
        document = await response.json()
    assert document["openapi"].startswith("3.1")
    assert "/v1/webhooks/{source}" in document["paths"]
