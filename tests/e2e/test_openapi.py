"""/openapi.json is kept true by fuzzing the live daemon with schemathesis against it.

The schema is fetched from the running daemon (not imported), so what is checked is what clients
get. Every operation runs its documented examples, then positive and negative generated data:
the daemon must never answer 5xx, and every answer must be a documented status with a documented
content type, body and headers. Webhook deliveries are also sent signed with the source's secret,
so the accepted path (202) is covered, not only the 401s and 404s.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import jsonschema_rs
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import CheckFunction
from schemathesis.core.result import Ok
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi import checks as openapi_checks

from daemon.openapi import EVENTS_EXAMPLES, OPENAPI_DOCUMENT
from listeners import WebhookRejected, parse_events
from tests.e2e.conftest import Daemon, StartDaemon

EXAMPLES_PER_RUN = 25
WEBHOOK = "/v1/webhooks/{source}"
MAPPINGS = "/v1/mappings"
# `wait` may be up to 300 s; a fuzzed request must not hold the test that long. The documented
# examples may wait long enough for their (known) contacts to end, so the 200 answer is seen.
MAX_WAIT_S = 0.2
MAX_EXAMPLE_WAIT_S = 5.0
OPERATIONS = {
    "POST /v1/webhooks/{source}",
    "POST /v1/mappings",
    "GET /v1/contacts/{contactId}",
    "GET /v1/dead-letters",
    "POST /v1/dead-letters/replay",
    "POST /v1/reconcile",
    "GET /v1/reconcile",
    "GET /v1/reconcile/{id}",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /openapi.json",
    # The operator console's page and the admin JSON its views read.
    "GET /ui/",
    "GET /v1/overview",
    "GET /v1/segments",
    "GET /v1/cluster",
}
CHECKS: list[CheckFunction] = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
]

AnyCase = Case[Any]


class StandardWebhooksAuth(requests.auth.AuthBase):
    """Signs the prepared body, byte for byte as sent, with the daemon's source secret."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        assert isinstance(body, bytes), f"cannot sign a streamed body: {type(body)}"
        headers = self.daemon.signed_headers(body)
        # Keep the Content-Type schemathesis chose: negative cases vary it.
        del headers["Content-Type"]
        request.headers.update(headers)
        return request


def _integers_as_integers(value: Any) -> Any:
    """`2.0` as `2`, all through a JSON value.

    For JSON Schema `2.0` is an integer, so schemathesis sends whole floats for integer ids. The
    daemon refuses them (422, as the document says) because ids past 2**53 do not survive as
    floats; left alone, most generated positive bodies would test only that refusal.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integers_as_integers(item) for item in value]
    if isinstance(value, dict):
        return {key: _integers_as_integers(item) for key, item in value.items()}
    return value


def _bounded(case: AnyCase, max_wait_s: float = MAX_WAIT_S) -> AnyCase:
    """Clamp a valid `wait` so a request never blocks for minutes."""
    if case.operation.path == MAPPINGS and case.query and "wait" in case.query:
        value = case.query["wait"]
        if isinstance(value, int | float) and not isinstance(value, bool) and value > max_wait_s:
            case.query["wait"] = max_wait_s
    return case


def _example(case: AnyCase) -> AnyCase:
    return _bounded(case, MAX_EXAMPLE_WAIT_S)


def _positive(case: AnyCase) -> AnyCase:
    if case.body is not None:
        case.body = _integers_as_integers(case.body)
    return _bounded(case)


def _run(
    strategy: st.SearchStrategy[AnyCase], call: Callable[[AnyCase], None], max_examples: int
) -> None:
    # Deterministic and bounded: a fixed derivation of examples, no example database, no
    # shrinking (a failure reports the case schemathesis drew, which is reproducible anyway).
    @settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(case: AnyCase) -> None:
        call(case)

    run()


def _describe(exc: BaseException) -> str:
    # A FailureGroup's message lists each failure and a curl command reproducing it.
    if isinstance(exc, FailureGroup):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def _has_input(operation: APIOperation[Any, Any, Any, Any]) -> bool:
    return bool(operation.body) or any(True for _ in operation.iter_parameters())


def fuzz(daemon: Daemon) -> tuple[list[str], dict[str, Counter[int]]]:
    """Every operation, every way; the failures (one entry per run) and statuses seen per run."""
    loaded = schemathesis.openapi.from_url(f"{daemon.url}/openapi.json")
    # Schemathesis leaves out the operation that served the schema unless a filter names it.
    schema = loaded.include(path=list(loaded.raw_schema["paths"]))
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the document does not parse: {result.err()}"
        operations.append(result.ok())
    assert {operation.label for operation in operations} == OPERATIONS

    admin = {"Authorization": f"Bearer {daemon.admin_token}"}
    signer = StandardWebhooksAuth(daemon)
    failures: list[str] = []
    statuses: dict[str, Counter[int]] = {}

    def attempt(
        label: str,
        strategy: st.SearchStrategy[AnyCase],
        max_examples: int = EXAMPLES_PER_RUN,
        **kwargs: Any,
    ) -> None:
        seen = statuses.setdefault(label, Counter())

        def call(case: AnyCase) -> None:
            response = case.call_and_validate(checks=CHECKS, **kwargs)
            seen[response.status_code] += 1

        try:
            _run(strategy, call, max_examples)
        # Schemathesis raises its check failures as a FailureGroup, a BaseExceptionGroup.
        except (Exception, FailureGroup) as exc:
            failures.append(f"{label}:\n{_describe(exc)}")

    for operation in operations:
        label = operation.label
        kwargs: dict[str, Any] = {}
        if {"adminToken": []} in operation.definition.raw.get("security", []):
            kwargs["headers"] = admin
        if operation.path == WEBHOOK:
            # The documented examples name source `crm`: sent signed, they must be accepted.
            kwargs["auth"] = signer
        for number, example in enumerate(schema.get_strategies_from_examples(operation)):
            attempt(f"{label} [example {number}]", example.map(_example), 1, **kwargs)
        if operation.path == WEBHOOK:
            # Generated sources are unknown (404), and these unsigned deliveries are 401s.
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                attempt(f"{label} [{mode.value}, unsigned]", operation.as_strategy(mode))
            crm = {"source": "crm"}
            positive = operation.as_strategy(path_parameters=crm).map(_positive)
            negative = operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=crm)
            attempt(f"{label} [positive, signed]", positive, **kwargs)
            attempt(f"{label} [negative, signed]", negative, **kwargs)
            continue
        attempt(f"{label} [positive]", operation.as_strategy().map(_positive), **kwargs)
        if _has_input(operation):
            # Negative data needs something to corrupt: an operation without input has none.
            negative = operation.as_strategy(GenerationMode.NEGATIVE).map(_bounded)
            attempt(f"{label} [negative]", negative, **kwargs)
    return failures, statuses


async def test_openapi_document_matches_the_live_daemon(start_daemon: StartDaemon):
    # The fuzzing leaves thousands of writes queued; draining them is not what is tested here.
    daemon = await start_daemon(server={"drain_budget_s": 1.0})
    # Schemathesis is synchronous (requests); the daemon is another process, so the loop idles.
    failures, statuses = await asyncio.to_thread(fuzz, daemon)
    assert not failures, "\n\n".join(failures)
    seen = {label: dict(counts) for label, counts in statuses.items()}
    assert all(seen.values()), f"a run sent nothing: {seen}"
    # The signing works: generated valid deliveries get through to the accepted path.
    assert seen["POST /v1/webhooks/{source} [positive, signed]"].get(202), seen


# The request body schema says what parse_events accepts. Checked directly (no daemon) over every
# form, because fuzzing only samples it. Three limits are beyond the schema and documented there
# instead: one segment both added and removed, 100 segment ids across an event's lists, and the
# accepted range of occurredAt.
BODIES_BOTH_ACCEPT: list[Any] = [
    {"contactId": "c", "segmentIds": ["a", "b"]},
    {"contactId": 7, "segmentIds": [1, "b"], "remove": ["c"]},
    {"contactId": "c", "segmentIds": [], "remove": ["c"]},
    {"contactId": "c", "add": ["a"]},
    {"contactId": "c", "remove": ["a"]},
    {"contactId": "c", "add": [], "remove": ["a"]},
    {"contactId": "c", "add": ["a"], "remove": ["b"], "occurredAt": "2026-01-01T10:00:00Z"},
    {"contactId": "c", "set": ["a"], "occurredAt": "2026-01-01T11:00:00.25+01:00"},
    {"contactId": "c", "set": []},
    {"contactId": "c", "add": ["a"], "occurredAt": 1767261600000},
    [{"contactId": "c", "set": []}, {"contactId": "d", "segmentIds": ["a"]}],
]
BODIES_BOTH_REFUSE: list[Any] = [
    {"contactId": "c"},
    {"contactId": "c", "occurredAt": 1767261600000},
    {"add": ["a"]},
    {"contactId": "c", "segmentIds": []},
    {"contactId": "c", "add": []},
    {"contactId": "c", "add": [], "remove": []},
    {"contactId": "c", "set": ["a"], "add": ["b"]},
    {"contactId": "c", "set": [], "remove": ["b"]},
    {"contactId": "c", "set": [], "segmentIds": ["b"]},
    {"contactId": "c", "segmentIds": ["a"], "add": ["b"]},
    {"contactId": "c", "add": ["a"], "priority": 1},
    {"contactId": "c", "add": "a"},
    {"contactId": "c", "add": ["bad id"]},
    {"contactId": "c", "add": ["a"], "occurredAt": "2026-01-01T10:00:00"},
    {"contactId": "c", "add": ["a"], "occurredAt": "yesterday"},
    {"contactId": "c", "add": ["a"], "occurredAt": True},
    {"contactId": "c", "add": ["a"], "occurredAt": 1767261600000.5},
    {"contactId": "c", "add": ["a"], "occurredAt": 1767261600},
    {"contactId": "c", "set": [f"s{n}" for n in range(101)]},
    [],
]


def _request_validator() -> Any:
    operation = OPENAPI_DOCUMENT["paths"][WEBHOOK]["post"]
    mappings = OPENAPI_DOCUMENT["paths"][MAPPINGS]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert mappings["requestBody"]["content"]["application/json"]["schema"] is schema
    return jsonschema_rs.Draft202012Validator(schema, validate_formats=True)


def _parses(document: Any) -> bool:
    try:
        parse_events(json.dumps(document).encode())
    except WebhookRejected:
        return False
    return True


def test_the_request_schema_accepts_what_the_parser_accepts() -> None:
    validator = _request_validator()
    for document in BODIES_BOTH_ACCEPT:
        assert _parses(document), document
        assert validator.is_valid(document), document
    for document in BODIES_BOTH_REFUSE:
        assert not _parses(document), document
        assert not validator.is_valid(document), document


def test_every_documented_example_is_accepted_by_the_parser() -> None:
    validator = _request_validator()
    for name, example in EVENTS_EXAMPLES.items():
        assert validator.is_valid(example["value"]), name
        assert _parses(example["value"]), name
