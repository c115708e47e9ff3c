"""`segmapd send-example` for every source kind, against the real daemon and emulator.

The example is built from the source's configuration, as `run` reads it (`*_file` secrets in
`$CREDENTIALS_DIRECTORY` included), so a source can be tried before its CRM is wired up: the
daemon must take it as that CRM's delivery and the contact's memberships must become active.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.e2e.conftest import StartDaemon
from tests.e2e.test_cli import segmapd
from tests.e2e.test_crm_sources import HUBSPOT_SECRET, SOURCES

# A mapping no example can be written for: the contact id is computed by a function.
CUSTOM: dict[str, Any] = {
    "kind": "json",
    "secret": "custom-signing-secret",
    "signature_header": "X-Signature",
    "contact_id": "join('', ['c', to_string(id)])",
    "add": "segments",
}


async def test_send_example_speaks_every_source_kind_from_its_configuration(
    start_daemon: StartDaemon,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    cli_env: dict[str, str],
):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "hubspot_client_secret").write_text(HUBSPOT_SECRET + "\n")
    sections: dict[str, dict[str, Any]] = {name: dict(values) for name, values in SOURCES.items()}
    del sections["sources.hubspot"]["client_secret"]
    sections["sources.hubspot"]["client_secret_file"] = "hubspot_client_secret"
    sections["sources.custom"] = CUSTOM
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    daemon = await start_daemon(env=env, **sections)
    config = str(daemon.config)
    cli = {**cli_env, **env}

    answers = {"crm": 202, "hubspot": 200, "salesforce": 200, "github": 202, "zendesk": 202}
    for number, (source, status) in enumerate(answers.items(), 1):
        contact = f"91000000000{number}"
        segments = [f"{source.upper()}_A", f"{source.upper()}_B"]
        code, out, err = await segmapd(
            "send-example",
            "--config",
            config,
            "--source",
            source,
            "--url",
            daemon.url,
            "--contact",
            contact,
            *segments,
            env=cli,
        )
        assert code == 0, (source, out, err)
        assert f"HTTP {status} " in out, out
        if source == "salesforce":
            assert "<Ack>true</Ack>" in out
        # What the source's adapter reads in the example is shown before it is sent.
        assert f"contact {contact}: " in out and ", ".join(segments) in out
        view = await daemon.wait_states(http, contact, {"active"}, 30)
        assert sorted(view) == segments, (source, view)

    # A captured delivery is sent as it is, signed as its sender signs.
    body = tmp_path / "delivery.json"
    body.write_bytes(
        orjson.dumps(
            {"changes": [{"contact": {"cxone_id": "910000000010"}, "segments_added": "BODY_A"}]}
        )
    )
    code, out, err = await segmapd(
        "send-example",
        "--config",
        config,
        "--source",
        "github",
        "--url",
        daemon.url,
        "--body",
        str(body),
        env=cli,
    )
    assert code == 0 and "HTTP 202 " in out, (out, err)
    await daemon.wait_states(http, "910000000010", {"active"}, 30)

    # Today's form: a standard source's secret, no config.
    code, out, err = await segmapd(
        "send-example",
        "--url",
        daemon.url,
        "--source",
        "crm",
        "--secret",
        daemon.secret,
        "--contact",
        "910000000011",
        "SECRET_A",
        env=cli_env,
    )
    assert code == 0 and "HTTP 202 " in out, (out, err)
    await daemon.wait_states(http, "910000000011", {"active"}, 30)


async def test_send_example_explains_what_it_cannot_do_without_a_traceback(
    start_daemon: StartDaemon, tmp_path: Path, cli_env: dict[str, str]
):
    sections: dict[str, dict[str, Any]] = {name: dict(values) for name, values in SOURCES.items()}
    sections["sources.custom"] = CUSTOM
    daemon = await start_daemon(**sections)
    config = str(daemon.config)
    url = ["--url", daemon.url]

    # A HubSpot secret is no Standard Webhooks secret: the way to send HubSpot's format is named.
    code, _, err = await segmapd(
        "send-example", "--source", "hubspot", "--secret", HUBSPOT_SECRET, *url, env=cli_env
    )
    assert code == 2 and "--config FILE --source NAME" in err, err
    assert "Traceback" not in err and HUBSPOT_SECRET not in err

    problems = {
        # An expression no example can be written for asks for a captured delivery.
        ("--source", "custom"): "--body FILE",
        ("--source", "nowhere"): "has no source nowhere (configured: crm, custom, github,",
        (): "which source of",
        ("--source", "hubspot", "--contact", "not-a-number"): "a whole number",
        ("--source", "crm", "--secret", "whsec_x"): "--config FILE or --secret, not both",
        ("--source", "crm", "--body", str(tmp_path / "missing.json")): "cannot read",
    }
    for arguments, expected in problems.items():
        code, _, err = await segmapd(
            "send-example", "--config", config, *arguments, *url, env=cli_env
        )
        assert code == 2, (arguments, err)
        assert expected in err, (arguments, err)
        assert "Traceback" not in err
