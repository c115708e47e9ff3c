"""Intake hardening against the real daemon process: slow clients, floods, malformed requests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from tests.e2e.conftest import Daemon, StartDaemon
from tests.support.emulator import EmulatorControl


def address(daemon: Daemon) -> tuple[str, int]:
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@contextlib.asynccontextmanager
async def raw_connections(
    daemon: Daemon, count: int
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    """`count` plain TCP connections to the daemon, closed on the way out whatever happens."""
    host, port = address(daemon)
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(count):
            opened.append(await asyncio.open_connection(host, port))
        yield opened
    finally:
        for _, writer in opened:
            writer.close()
        for _, writer in opened:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def closed_by_peer(reader: asyncio.StreamReader, within_s: float) -> bool:
    """Whether the daemon closed the connection (EOF or reset) within `within_s`."""
    try:
        async with asyncio.timeout(within_s):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


async def exchange(daemon: Daemon, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes as one request; return the status, headers and body of the answer."""
    host, port = address(daemon)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def error_lines(stderr: str) -> list[str]:
    return [
        line
        for line in stderr.splitlines()
        if '"level":"error"' in line or '"level":"critical"' in line or "Traceback" in line
    ]


async def test_clients_sending_headers_slowly_are_disconnected(start_daemon: StartDaemon):
    daemon = await start_daemon(server={"header_timeout_s": 1.0, "keepalive_timeout_s": 60.0})
    async with raw_connections(daemon, 50) as connections:

        async def trickle(writer: asyncio.StreamWriter) -> None:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
                writer.write(bytes([byte]))
                with contextlib.suppress(OSError):
                    await writer.drain()
                await asyncio.sleep(0.25)

        trickling = [asyncio.create_task(trickle(writer)) for _, writer in connections]
        try:
            verdicts = await asyncio.gather(
                *(closed_by_peer(reader, within_s=6.0) for reader, _ in connections)
            )
        finally:
            for task in trickling:
                task.cancel()
            await asyncio.gather(*trickling, return_exceptions=True)
    assert all(verdicts), f"{verdicts.count(False)} of 50 slow connections still open"


async def test_an_idle_keep_alive_connection_is_closed(start_daemon: StartDaemon):
    daemon = await start_daemon(server={"keepalive_timeout_s": 1.0})
    async with raw_connections(daemon, 1) as [(reader, writer)]:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert await closed_by_peer(reader, within_s=8.0)


async def test_a_trickled_body_is_answered_408(start_daemon: StartDaemon):
    daemon = await start_daemon(server={"body_timeout_s": 1.0})
    host, port = address(daemon)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"POST /v1/mappings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + daemon.admin_token.encode() + b"\r\n"
            b"Content-Length: 100\r\n\r\n[{"
        )
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_connections_over_the_cap_are_answered_503_then_served_again(
    start_daemon: StartDaemon, http: aiohttp.ClientSession
):
    daemon = await start_daemon(server={"max_connections": 10, "header_timeout_s": 60.0})
    async with raw_connections(daemon, 10):
        await asyncio.sleep(0.2)  # let the daemon register every one of them
        status, headers, body = await exchange(daemon, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503
        assert int(headers["retry-after"]) >= 1
        problem = orjson.loads(body)
        assert problem["error"] == "ServiceUnavailable"
        assert "server.max_connections" in problem["message"]
    for _ in range(50):
        async with http.get(f"{daemon.url}/healthz") as response:
            if response.status == 200:
                break
        await asyncio.sleep(0.1)
    assert response.status == 200


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /healthz HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
        (b"NOT-HTTP\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
        (
            b"POST /v1/webhooks/crm HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n",
            400,
        ),
    ],
    ids=["long-header", "long-target", "bad-request-line", "not-http", "bad-header", "chunks"],
)
async def test_requests_refused_by_the_parser_get_a_json_problem_and_no_error_log(
    start_daemon: StartDaemon, capfd: pytest.CaptureFixture[str], raw: bytes, status: int
):
    daemon = await start_daemon()
    got, headers, body = await exchange(daemon, raw)
    assert got == status
    assert headers["content-type"].startswith("application/json")
    problem: dict[str, Any] = orjson.loads(body)
    assert set(problem) >= {"error", "message"}
    assert "aaaa" not in problem["message"]  # the request is never echoed
    daemon.process.stop()
    assert error_lines(capfd.readouterr().err) == []


async def test_a_duplicate_key_in_a_webhook_body_is_refused_naming_it(
    start_daemon: StartDaemon, emulator: EmulatorControl, http: aiohttp.ClientSession
):
    daemon = await start_daemon()
    body = (
        b'[{"contactId": "c1", "segmentIds": ["a"]},'
        b' {"contactId": "c2", "segmentIds": ["a"], "contactId": "c3"}]'
    )
    async with http.post(
        f"{daemon.url}/v1/webhooks/crm", data=body, headers=daemon.signed_headers(body)
    ) as response:
        assert response.status == 400
        problem = await response.json()
    assert problem["field"] == "body[1].contactId"
    assert "contactId" in problem["message"]
    async with http.post(
        f"{daemon.url}/v1/dead-letters/replay",
        data=b'{"contactIds": ["c1"], "contactIds": ["c2"]}',
        headers=daemon.admin,
    ) as response:
        assert response.status == 400
        problem = await response.json()
    assert problem["field"] == "body.contactIds"
