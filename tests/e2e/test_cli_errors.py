"""Errors a person can act on: the real `segmapd` command as a subprocess.

Configuration problems all at once, a missing optional driver named with its fix, client
commands that fail fast and say where they tried, ids that survive being put in a URL, and
dead letters whose CRM-supplied text cannot forge the listing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from yarl import URL

from tests.e2e.conftest import Daemon, StartDaemon, daemon_config
from tests.e2e.test_cli import WHSEC, admin_args, segmapd
from tests.support.emulator import EmulatorControl
from tests.support.toml import render_toml

EXTRA_HINT = "pip install 'cxone-segmap[postgres]'"


async def test_a_postgresql_journal_without_its_driver_is_one_line_naming_the_extra(
    tmp_path: Path, cli_env: dict[str, str]
):
    # The driver as it is when the extra was not installed: importing it fails.
    missing = tmp_path / "without-asyncpg" / "asyncpg"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'asyncpg'\", name='asyncpg')\n"
    )
    env = {**cli_env, "PYTHONPATH": str(missing.parent)}
    probe = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import asyncpg", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    assert await probe.wait() != 0  # the stand-in really hides the installed driver
    config = tmp_path / "segmapd.toml"
    store = {"store": {"url": "postgresql://segmapd@127.0.0.1:9/segmapd"}}
    config.write_text(daemon_config("http://127.0.0.1:9", "token", WHSEC, store))
    for command in ("check-config", "run"):
        code, _, err = await segmapd(command, "--config", str(config), env=env)
        assert code == 2, (command, err)
        assert err.splitlines() == [
            "segmapd: configuration error: store.url: postgresql:// needs the PostgreSQL "
            "driver, which cannot be loaded (No module named 'asyncpg'); install it with: "
            f"{EXTRA_HINT}"
        ], err


def broken_config(tmp_path: Path) -> Path:
    """A config with one mistake of every kind the checks find, at every stage."""
    sections: dict[str, dict[str, Any]] = {
        "server": {"listen": "127.0.0.1:99999", "admin_tokens": ["token"]},
        "cxone": {
            "issuer": "http://127.0.0.1:9",
            "client_id": "segmapd",
            "client_secret_file": "cxone_client_secret",  # not in $CREDENTIALS_DIRECTORY
            "access_key_id": "key",
            "access_key_secret": "key-secret",
            "paths": {"member": "/api/v2/segments/{segmentId}/contacts"},
        },
        "batching": {"min_size": 50, "max_size": 20, "max_sise": 3},
        "store": {"url": "sqlite://"},
        "notify": {"url": "ftp://127.0.0.1:9/hook", "secret": "whsec_!!!"},
        "sources.crm": {"kind": "standard", "secret": "whsec_c2hvcnQ="},
        "sources.hubspot": {
            "kind": "hubspot",
            "client_secret_file": "/nonexistent/hubspot_client_secret",
            "public_url": "https://segmapd.example.com/v1/webhooks/hubspot",
        },
        "sources.marketo": {"kind": "marketo"},
        "sources.zendesk": {
            "kind": "json",
            "secret": "zendesk-signing-secret",
            "signature_header": "X-Zendesk-Webhook-Signature",
            "contact_id": "detail.[",
            "set": "event.current",
        },
    }
    config = tmp_path / "broken.toml"
    config.write_text(render_toml(sections))
    return config


async def test_every_configuration_problem_is_reported_in_one_pass(
    tmp_path: Path, cli_env: dict[str, str]
):
    config = broken_config(tmp_path)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    expected = [
        f"cxone.client_secret_file: cannot read {credentials}/cxone_client_secret "
        f"('cxone_client_secret' in $CREDENTIALS_DIRECTORY={credentials}): "
        "No such file or directory",
        "sources.hubspot.client_secret_file: cannot read /nonexistent/hubspot_client_secret: "
        "No such file or directory",
        "server.listen: must be HOST:PORT",
        "batching.max_sise: unknown key",
        "sources.marketo.kind: must be one of standard, hubspot, salesforce, json",
        "sources.zendesk.contact_id: contact_id: not a valid JMESPath expression",
        "batching.min_size: must not exceed batching.max_size",
        "cxone.paths.member must contain {contactId}",
        "store.url: sqlite:// needs a file path",
        # The URL and the secret each on its own: one does not hide the other.
        "notify.url: notify url must be an absolute http:// or https:// URL",
        "notify.secret: webhook secret is not valid base64",
        "sources.crm: webhook secret is too short",
    ]
    env = {**cli_env, "CREDENTIALS_DIRECTORY": str(credentials)}
    for command in ("check-config", "run"):
        code, _, err = await segmapd(command, "--config", str(config), env=env)
        assert code == 2, err
        lines = err.splitlines()
        assert len(lines) == len(expected), err
        for line, problem in zip(lines, expected, strict=True):
            assert line.startswith(f"segmapd: configuration error: {problem}"), (line, problem)
        # A file that cannot be read is not also a secret that is "required".
        assert "required (or" not in err and "Traceback" not in err
        assert "zendesk-signing-secret" not in err and "key-secret" not in err

    # Outside systemd a relative name is read from the working directory, and said so.
    code, _, err = await segmapd("check-config", "--config", str(config), env=cli_env)
    assert code == 2
    assert (
        f"cxone.client_secret_file: cannot read {Path.cwd() / 'cxone_client_secret'} "
        "('cxone_client_secret' in the working directory: $CREDENTIALS_DIRECTORY is not set)"
    ) in err


async def test_an_empty_configuration_names_each_missing_key_once(
    tmp_path: Path, cli_env: dict[str, str]
):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    code, _, err = await segmapd("check-config", "--config", str(empty), env=cli_env)
    assert code == 2
    assert err.count("cxone.client_id") == 1, err
    assert err.count("cxone.access_key_id") == 1, err


async def test_a_config_file_that_cannot_be_read_is_one_line(
    tmp_path: Path, cli_env: dict[str, str]
):
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes(b'[server]\nlisten = "caf\xe9"\n')
    for path, problem in [
        (not_utf8, "not UTF-8 text"),
        (tmp_path, "cannot read it: Is a directory"),
        (tmp_path / "absent.toml", "no such file"),
    ]:
        for command in ("check-config", "run"):
            code, _, err = await segmapd(command, "--config", str(path), env=cli_env)
            assert code == 2, err
            assert err.splitlines() == [f"segmapd: configuration error: {path}: {problem}"] or (
                problem in err and len(err.splitlines()) == 1
            ), err


# ---- client commands ---------------------------------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_client_commands_fail_at_once_on_a_refused_connection_and_at_their_timeout(
    silent_port: int, tmp_path: Path, cli_env: dict[str, str]
):
    csv_file = tmp_path / "one.csv"
    csv_file.write_text("100000000123,VIP\n")
    commands = [
        ["status", "100000000123", "--token", "t"],
        ["dlq", "list", "--token", "t"],
        ["dlq", "replay", "--token", "t"],
        ["import", str(csv_file), "--token", "t"],
        ["send-example", "--secret", WHSEC],
    ]
    refused = f"http://127.0.0.1:{closed_port()}"
    for command in commands:
        code, _, err = await segmapd(*command, "--url", refused, env=cli_env)
        assert code == 1, (command, err)
        assert f"cannot connect to {refused}: connection refused" in err, err
        assert "Traceback" not in err
    silent = f"http://127.0.0.1:{silent_port}"
    for command in commands:
        code, _, err = await segmapd(*command, "--url", silent, "--timeout", "0.5", env=cli_env)
        assert code == 1, (command, err)
        assert f"no answer from {silent} within 0.5 s (--timeout)" in err, err
    code, _, err = await segmapd("healthcheck", "--url", silent, "--timeout", "0.5", env=cli_env)
    assert code == 1 and f"not reachable: no answer from {silent} within 0.5 s" in err, err
    code, _, err = await segmapd("status", "x", "--url", "ftp://host", "--token", "t", env=cli_env)
    assert code == 2 and "must be http(s)://HOST[:PORT]" in err, err


# ---- ids in URLs, and CRM-supplied text in the output ---------------------------------------

FEED_SECRET = "feed-signing-secret"
FEED: dict[str, Any] = {
    "kind": "json",
    "secret": FEED_SECRET,
    "signature_header": "X-Signature",
    "contact_id": "id",
    "add": "segments",
}


async def post_feed(http: aiohttp.ClientSession, daemon: Daemon, events: Any) -> None:
    """A signed delivery to the `feed` source (kind json): the signature computed here."""
    body = orjson.dumps(events)
    signature = hmac.new(FEED_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-Signature": signature, "Content-Type": "application/json"}
    async with http.post(f"{daemon.url}/v1/webhooks/feed", data=body, headers=headers) as r:
        assert r.status == 202, await r.text()


async def test_status_finds_contacts_whose_ids_are_dot_segments_or_url_delimiters(
    start_daemon: StartDaemon, http: aiohttp.ClientSession, cli_env: dict[str, str]
):
    daemon = await start_daemon(**{"sources.feed": FEED})
    for contact in (".", "..", "..."):
        status, _ = await daemon.webhook(http, {"contactId": contact, "segmentIds": ["DOTS"]})
        assert status == 202
    # An id as the CRM sent it, kept as a dead letter: every URL delimiter in it.
    odd = "a/b?c#d%2F e"
    await post_feed(http, daemon, {"id": odd, "segments": ["ODD"]})
    for contact in (".", "..", "..."):
        await wait_states(http, daemon, contact, "active")
        code, out, err = await segmapd("status", contact, *admin_args(daemon), env=cli_env)
        assert code == 0, (contact, err)
        assert out.splitlines()[0] == f"contact {contact}"
        assert "DOTS" in out and "active" in out
    code, out, err = await segmapd("status", odd, *admin_args(daemon), env=cli_env)
    assert code == 0, err
    assert out.splitlines()[0] == f"contact {odd}" and "invalid_contact_id" in out
    code, out, _ = await segmapd("status", "..", "--json", *admin_args(daemon), env=cli_env)
    assert code == 0 and orjson.loads(out)["contactId"] == ".."


FORGED_ROW = "810000000009  DLA  add  contact_not_found  1  2026-01-01T00:00:00.000Z  forged"


async def wait_states(
    http: aiohttp.ClientSession, daemon: Daemon, contact: str, want: str
) -> dict[str, Any]:
    """The contact's assignments once all are in state `want`; its id sent percent-encoded."""
    url = URL(
        f"{daemon.url}/v1/contacts/{quote(contact, safe='').replace('.', '%2E')}", encoded=True
    )
    last: Any = None
    for _ in range(300):
        async with http.get(url, headers=daemon.admin) as response:
            last = await response.json()
            if response.status == 200 and all(s["state"] == want for s in last["segments"]):
                return {s["segmentId"]: s for s in last["segments"]}
        await asyncio.sleep(0.1)
    raise AssertionError(f"{contact!r} did not reach {want}: {last}")


async def test_dead_letters_are_listed_whole_escaped_and_filtered_by_reason_and_segment(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    cli_env: dict[str, str],
):
    await emulator.set_missing_contacts(["810000000001", "810000000002"])
    daemon = await start_daemon(**{"sources.feed": FEED})
    await daemon.webhook(
        http,
        [
            {"contactId": "810000000001", "segmentIds": ["DLA", "DLB"]},
            {"contactId": "810000000002", "segmentIds": ["DLA"]},
        ],
    )
    # A contact id that, printed raw, would end its row, forge another and clear the screen.
    forged = f"x\n{FORGED_ROW}\x1b[2J"
    await post_feed(http, daemon, {"id": forged, "segments": ["DLB"]})
    for contact in ("810000000001", "810000000002", forged):
        await wait_states(http, daemon, contact, "failed")
    admin = admin_args(daemon)

    code, out, _ = await segmapd("dlq", "list", *admin, env=cli_env)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1 + 4, out  # the header and one line per dead letter
    assert "\x1b" not in out
    assert not any(line.startswith("810000000009") for line in lines)
    assert f"x\\n{FORGED_ROW}\\x1b[2J" in out
    _, listed = await daemon.dead_letters(http)
    [message] = [d["message"] for d in listed["deadLetters"] if d["contactId"] == forged]
    assert len(message) > 80 and message.endswith("(from contact_id = 'id')")
    assert "(from contact_id = 'id')" in out  # the message's end: printed whole, not cut

    code, out, _ = await segmapd("dlq", "list", "--json", *admin, env=cli_env)
    assert code == 0 and orjson.loads(out) == listed

    async def contacts(*filters: str) -> list[tuple[str, str]]:
        code, out, err = await segmapd("dlq", "list", "--json", *filters, *admin, env=cli_env)
        assert code == 0, err
        return [(d["contactId"], d["segmentId"]) for d in orjson.loads(out)["deadLetters"]]

    assert await contacts("--reason", "invalid_contact_id") == [(forged, "DLB")]
    assert sorted(await contacts("--segment", "DLA")) == [
        ("810000000001", "DLA"),
        ("810000000002", "DLA"),
    ]
    assert await contacts("--reason", "contact_not_found", "--segment", "DLB") == [
        ("810000000001", "DLB")
    ]
    # The forged id came through the `feed` source, the others through `crm`.
    assert await contacts("--source", "feed") == [(forged, "DLB")]
    assert len(await contacts("--source", "crm", "--segment", "DLA")) == 2
    code, out, _ = await segmapd("dlq", "list", "--segment", "NONE", *admin, env=cli_env)
    assert code == 0 and "no dead letters" in out
    code, out, err = await segmapd("dlq", "list", "--limit", "1", *admin, env=cli_env)
    assert code == 0 and len(out.splitlines()) == 2 and "--limit" in err

    # The API checks its filters, naming the parameter; nothing of it is a 500.
    for query, field in [
        ("?reason=nope", "reason"),
        ("?reason=not_indexed&reason=not_indexed", "reason"),
        ("?segment=", "segment"),
        ("?segment=" + "S" * 1025, "segment"),
    ]:
        status, problem = await daemon.dead_letters(http, query)
        assert (status, problem["field"]) == (400, field), (query, problem)
    status, _ = await daemon.dead_letters(http, "?segment=%ED%B3%BF%FF")
    assert status in (200, 400)
    status, found = await daemon.dead_letters(http, "?reason=contact_not_found&segment=DLA")
    assert status == 200 and len(found["deadLetters"]) == 2
