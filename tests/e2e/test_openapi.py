"""/openapi.json is kept true by fuzzing the live daemon with schemathesis against it.

The schema is loaded from the running daemon (not imported), so what is checked is what clients
get. Every operation is exercised with positive and negative data: the daemon must never answer
5xx, and every answer must be a documented status with a documented content type, body and
headers. Webhook deliveries are additionally signed with the source's secret, so the accepted
path (202, then a 200 redelivery answer) is covered, not only the 401s.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import CheckFunction

from tests.e2e.conftest import Daemon, StartDaemon

EXAMPLES_PER_RUN = 25
WEBHOOK = "/v1/webhooks/{source}"
MAPPINGS = "/v1/mappings"
# `wait` may be up to 300 s; a fuzzed request must not hold the test that long.
MAX_FUZZED_WAIT_S = 0.5


def _checks() -> list[CheckFunction]:
    from schemathesis.specs.openapi import checks

    return [
        schemathesis.checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_schema_conformance,
        checks.response_headers_conformance,
    ]


class StandardWebhooksAuth(requests.auth.AuthBase):
    """Signs the prepared body, byte for byte as sent, with the daemon's source secret."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        headers = self.daemon.signed_headers(body)
        # Keep whatever Content-Type schemathesis chose (negative cases vary it).
        headers.pop("Content-Type")
        request.headers.update(headers)
        return request


def _short_wait(case: Case) -> Case:
    """Clamp a valid fuzzed `wait` so a request never blocks for minutes."""
    if case.operation.path == MAPPINGS and case.query and "wait" in case.query:
        value = case.query["wait"]
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            case.query["wait"] = min(float(value), MAX_FUZZED_WAIT_S)
    return case


def _run(
    strategy: st.SearchStrategy[Case],
    call: Callable[[Case], None],
) -> None:
    @settings(
        max_examples=EXAMPLES_PER_RUN,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy.map(_short_wait))
    def run(case: Case) -> None:
        call(case)

    run()


def fuzz(daemon: Daemon) -> list[str]:
    """Run every operation in both generation modes; the failures, one entry per run."""
    loaded = schemathesis.openapi.from_url(f"{daemon.url}/openapi.json")
    # Schemathesis leaves out the operation that served the schema unless a filter names it.
    schema = loaded.include(path=list(loaded.raw_schema["paths"]))
    checks = _checks()
    admin = {"Authorization": f"Bearer {daemon.admin_token}"}
    signer = StandardWebhooksAuth(daemon)
    failures: list[str] = []
    statuses: dict[str, Counter[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == {
        "POST /v1/webhooks/{source}",
        "POST /v1/mappings",
        "GET /v1/contacts/{contactId}",
        "GET /v1/dead-letters",
        "POST /v1/dead-letters/replay",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /openapi.json",
    }

    def attempt(label: str, strategy: st.SearchStrategy[Case], **kwargs: Any) -> None:
        def call(case: Case) -> None:
            response = case.call_and_validate(checks=checks, **kwargs)
            statuses.setdefault(label, Counter())[response.status_code] += 1
            if response.status_code == 422 and "positive" in label:
                print(label, repr(case.body)[:300], response.text[:300])

        try:
            _run(strategy, call)
        except Exception as exc:
            failures.append(f"{label}:\n{exc}")

    for operation in operations:
        modes = [GenerationMode.POSITIVE]
        if operation.body or any(True for _ in operation.iter_parameters()):
            # Negative data needs something to corrupt: an operation without input has none.
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            is_admin = {"adminToken": []} in operation.definition.raw.get("security", [])
            headers = admin if is_admin else {}
            attempt(
                f"{operation.label} [{mode.value}]", operation.as_strategy(mode), headers=headers
            )
        if operation.path == WEBHOOK:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                attempt(
                    f"{operation.label} [{mode.value}, signed for source crm]",
                    operation.as_strategy(mode, path_parameters={"source": "crm"}),
                    auth=signer,
                )
    for k, v in statuses.items():
        print(k, dict(v))
    return failures


async def test_openapi_document_matches_the_live_daemon(start_daemon: StartDaemon):
    daemon = await start_daemon()
    failures = await asyncio.to_thread(fuzz, daemon)
    assert not failures, "\n\n".join(failures)
