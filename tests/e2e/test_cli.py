"""The segmapd command line against the real daemon process."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.e2e.conftest import Daemon, StartDaemon, daemon_config
from tests.support.emulator import EmulatorControl


async def segmapd(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


WHSEC = "whsec_" + "A" * 32


def admin_args(daemon: Daemon) -> list[str]:
    return ["--url", daemon.url, "--token", daemon.admin_token]


async def test_status_dead_letters_and_replay(
    start_daemon: StartDaemon,
    emulator: EmulatorControl,
    http: aiohttp.ClientSession,
    cli_env: dict[str, str],
):
    await emulator.set_missing_contacts(["ghost"])
    daemon = await start_daemon()
    await daemon.webhook(
        http,
        [
            {"contactId": "100000000123", "segmentIds": ["VIP", "Spanish"]},
            {"contactId": "ghost", "segmentIds": ["VIP"]},
        ],
    )
    await daemon.wait_states(http, "100000000123", {"active"}, 30)
    await daemon.wait_states(http, "ghost", {"failed"}, 30)

    code, out, _ = await segmapd("status", "100000000123", *admin_args(daemon), env=cli_env)
    assert code == 0
    assert "VIP" in out and "Spanish" in out and out.count("active") == 2
    assert "LANE" in out and out.count(" live ") == 2

    code, out, _ = await segmapd("dlq", "list", *admin_args(daemon), env=cli_env)
    assert code == 0 and "ghost" in out and "contact_not_found" in out

    # The CRM fixes the contact; a replay then succeeds.
    await emulator.set_missing_contacts([])
    code, out, _ = await segmapd("dlq", "replay", "ghost", *admin_args(daemon), env=cli_env)
    assert code == 0 and "replayed 1" in out
    await daemon.wait_states(http, "ghost", {"active"}, 30)
    code, out, _ = await segmapd("dlq", "list", *admin_args(daemon), env=cli_env)
    assert "no dead letters" in out

    code, _, err = await segmapd(
        "status", "100000000123", "--url", daemon.url, "--token", "no", env=cli_env
    )
    assert code == 1 and "401" in err


async def test_import_backfills_a_csv_and_reports_bad_rows(
    start_daemon: StartDaemon,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    cli_env: dict[str, str],
):
    daemon = await start_daemon()
    rows = ["contactId,segmentId"]
    rows += [f"{300000000000 + i},IMP1,IMP2" for i in range(120)]
    rows.insert(50, "bad id!,IMP1")
    rows.insert(70, "lonely")
    csv_file = tmp_path / "backfill.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    code, out, err = await segmapd(
        "import", str(csv_file), "--batch", "25", *admin_args(daemon), env=cli_env
    )
    assert code == 1  # some rows were rejected
    assert "imported 120 of 122 rows: 240 assignments accepted" in out
    assert "line 51" in out and "line 71" in out
    assert "120/121" in err or "121/121" in err  # the progress bar reached the end
    done = await daemon.wait_states(http, "300000000119", {"active"}, 30)
    # A backfill: every imported assignment went in the bulk lane.
    assert {segment["lane"] for segment in done.values()} == {"bulk"}


async def test_healthcheck_answers_a_not_ready_daemon_at_once_without_asking_again(
    start_daemon: StartDaemon, cli_env: dict[str, str]
):
    # CXone refuses the credentials: /readyz answers 503, which is the probe's answer.
    daemon = await start_daemon(cxone={"client_secret": "wrong"})
    code, _, err = await segmapd("healthcheck", "--url", daemon.url, "--timeout", "5", env=cli_env)
    assert code == 1
    assert err.count("not ready") == 1, err
    assert "busy" not in err and "asking again" not in err, err


async def test_healthcheck_and_check_config(
    start_daemon: StartDaemon, tmp_path: Path, cli_env: dict[str, str]
):
    daemon = await start_daemon()
    code, _, _ = await segmapd("healthcheck", "--url", daemon.url, env=cli_env)
    assert code == 0
    code, _, _ = await segmapd("healthcheck", "--live", "--url", daemon.url, env=cli_env)
    assert code == 0
    code, _, err = await segmapd("healthcheck", "--url", "http://127.0.0.1:9", env=cli_env)
    assert code == 1 and "not reachable" in err

    code, out, _ = await segmapd("check-config", "--config", str(daemon.config), env=cli_env)
    assert code == 0 and "configuration OK" in out
    broken = tmp_path / "broken.toml"
    broken.write_text(daemon.config.read_text() + "\n[batching]\nmax_sise = 10\n")
    code, _, err = await segmapd("check-config", "--config", str(broken), env=cli_env)
    assert code == 2
    # The duplicate [batching] table is a TOML error; either way the message names the problem.
    assert "batching" in err
    env = {**cli_env, "SEGMAPD_LIMITS__WRITE_RPSS": "5"}
    code, _, err = await segmapd("check-config", "--config", str(daemon.config), env=env)
    assert code == 2 and "SEGMAPD_LIMITS__WRITE_RPSS" in err
    assert daemon.secret not in err and daemon.admin_token not in err
    # A malformed notification secret is a configuration error, not a traceback.
    env = {
        **cli_env,
        "SEGMAPD_NOTIFY__URL": "http://127.0.0.1:9/hook",
        "SEGMAPD_NOTIFY__SECRET": "whsec_!!!",
    }
    code, _, err = await segmapd("check-config", "--config", str(daemon.config), env=env)
    assert code == 2 and "base64" in err and "Traceback" not in err


async def test_import_reads_excel_csv_with_a_bom_and_multiline_fields(
    start_daemon: StartDaemon,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    cli_env: dict[str, str],
):
    daemon = await start_daemon()
    csv_file = tmp_path / "excel.csv"
    # Excel's "CSV UTF-8": a byte order mark, CRLF line ends, a quoted cell with a line break.
    lines = [
        "contactId,segmentId",
        "310000000001,BOM1",
        '"bad\nid",BOM1',  # starts on line 3, ends on line 4
        "lonely",  # line 5
        "310000000002,BOM1",
    ]
    csv_file.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    code, out, err = await segmapd("import", str(csv_file), *admin_args(daemon), env=cli_env)
    assert code == 1, err
    # The header is recognised despite the BOM, so it is neither imported nor rejected.
    assert "imported 2 of 4 rows: 2 assignments accepted" in out
    assert "line 3:" in out and "line 5:" in out
    assert "line 1" not in out and "line 4" not in out
    await daemon.wait_states(http, "310000000002", {"active"}, 30)


async def test_import_splits_a_chunk_the_daemon_finds_too_large(
    start_daemon: StartDaemon,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    cli_env: dict[str, str],
):
    daemon = await start_daemon(server={"max_body_bytes": 4096})
    segments = ",".join(f"SPLIT{n}" for n in range(4))
    rows = [f"{320000000000 + i},{segments}" for i in range(100)]
    # One row too large for any request on its own (but within the csv module's field limit).
    rows.insert(40, f"320000009999,{'S' * 5000}")
    csv_file = tmp_path / "large.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    code, out, err = await segmapd(
        "import", str(csv_file), "--batch", "100", *admin_args(daemon), env=cli_env
    )
    assert code == 1, err
    assert "imported 100 of 101 rows: 400 assignments accepted" in out
    assert "line 41:" in out and "max_body_bytes" in out
    assert "Traceback" not in err
    await daemon.wait_states(http, "320000000099", {"active"}, 30)


async def test_import_rejects_an_oversized_field_and_a_bad_batch_without_a_traceback(
    start_daemon: StartDaemon,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    cli_env: dict[str, str],
):
    daemon = await start_daemon()
    csv_file = tmp_path / "huge.csv"
    rows = ["330000000001,HUGE1", f"330000000002,{'H' * 200_000}", "330000000003,HUGE1"]
    csv_file.write_text("\n".join(rows) + "\n")
    code, out, err = await segmapd("import", str(csv_file), *admin_args(daemon), env=cli_env)
    assert code == 1, err
    assert "imported 2 of 3 rows: 2 assignments accepted" in out
    assert "line 2: unreadable CSV (field larger than field limit" in out
    assert "Traceback" not in err
    await daemon.wait_states(http, "330000000003", {"active"}, 30)

    for batch in ("0", "-1", "many"):
        code, _, err = await segmapd(
            "import", str(csv_file), "--batch", batch, *admin_args(daemon), env=cli_env
        )
        assert code == 2
        assert "argument --batch" in err and "Traceback" not in err


async def test_an_admin_token_starting_with_a_dash_is_taken_as_the_token(
    start_daemon: StartDaemon, tmp_path: Path, cli_env: dict[str, str]
):
    # The fixture's tokens are random URL-safe text: one in 64 starts with "-", which argparse
    # took for an option (exit 2): that was the import test's occasional failure.
    token = "-dash-" + "t" * 16
    daemon = await start_daemon(server={"admin_tokens": [token]})
    csv_file = tmp_path / "one.csv"
    csv_file.write_text("340000000001,DASH1\n")
    code, out, err = await segmapd(
        "import", str(csv_file), "--url", daemon.url, "--token", token, env=cli_env
    )
    assert code == 0 and "imported 1 of 1 rows" in out, err
    # A wrong token that looks like an option is still a token, refused by the daemon.
    code, _, err = await segmapd(
        "status", "340000000001", "--url", daemon.url, "--token", "--nope", env=cli_env
    )
    assert code == 1 and "401" in err, err


async def test_check_config_validates_each_source_kind_by_its_own_keys(
    tmp_path: Path, cli_env: dict[str, str]
):
    hubspot = {
        "kind": "hubspot",
        "client_secret": "hubspot-app-secret-value",
        "public_url": "https://segmapd.example.com/v1/webhooks/hubspot",
    }
    salesforce = {"kind": "salesforce", "organization_id": "00D5e000000KQ2e"}
    zendesk = {
        "kind": "json",
        "secret": "zendesk-signing-secret",
        "signature_header": "X-Zendesk-Webhook-Signature",
        "contact_id": "detail.external_id",
        "set": "event.current",
    }

    async def check(**sources: dict[str, Any]) -> tuple[int, str, str]:
        overrides = {f"sources.{name}": table for name, table in sources.items()}
        config = tmp_path / "segmapd.toml"
        config.write_text(daemon_config("http://127.0.0.1:9", "token", WHSEC, overrides))
        return await segmapd("check-config", "--config", str(config), env=cli_env)

    code, out, err = await check(hubspot=hubspot, salesforce=salesforce, zendesk=zendesk)
    assert code == 0, err
    assert "crm (standard), hubspot (hubspot), salesforce (salesforce), zendesk (json)" in out
    cases: dict[str, dict[str, dict[str, Any]]] = {
        "sources.hubspot.segment_property: unknown key": {
            "hubspot": {**hubspot, "segment_property": "x"}
        },
        "sources.hubspot.client_secret: required (or client_secret_file)": {
            "hubspot": {k: v for k, v in hubspot.items() if k != "client_secret"}
        },
        "sources.hubspot.public_url": {"hubspot": {**hubspot, "public_url": "segmapd/hook"}},
        # A key of another kind is unknown here.
        "sources.salesforce.public_url: unknown key": {
            "salesforce": {**salesforce, "public_url": "https://x.example"}
        },
        "sources.salesforce.organization_id": {
            "salesforce": {**salesforce, "organization_id": "00D5e000"}
        },
        "sources.salesforce.allowed_networks": {
            "salesforce": {**salesforce, "allowed_networks": ["10.0.0.300/8"]}
        },
        "sources.zendesk.contact_id": {"zendesk": {**zendesk, "contact_id": "detail.["}},
        "sources.marketo.kind: must be one of standard, hubspot, salesforce, json": {
            "marketo": {"kind": "marketo"}
        },
    }
    for expected, sources in cases.items():
        code, _, err = await check(**sources)
        assert code == 2, expected
        assert expected in err, err
        assert "Traceback" not in err
        assert "hubspot-app-secret-value" not in err and "zendesk-signing-secret" not in err
