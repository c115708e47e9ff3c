"""The OpenAPI 3.1 document served at /openapi.json.

tests/e2e/test_openapi.py fuzzes the live daemon against the document it serves: every answer
must be a documented status with a documented content type, body and headers. Response schemas
are closed (`additionalProperties: false`) where the shape is ours, so a field added to a handler
but not here fails that test instead of drifting silently.
"""

from __future__ import annotations

from typing import Any

from scheduler.model import FailureReason

Schema = dict[str, Any]

# CONTRACT.md's id rule. A number id is taken as its decimal text, so it passes the rule too; the
# bounds are the JSON integers the parser keeps exact (larger ones would be rounded, so are
# refused with 422).
ID: Schema = {
    "type": "string",
    "pattern": "^[A-Za-z0-9_.:-]{1,128}$",
    "description": "1-128 characters of A-Z a-z 0-9 _ . : -",
}
NUMBER_ID: Schema = {
    "type": "integer",
    "minimum": -(2**63),
    "maximum": 2**64 - 1,
    "description": "A JSON integer, taken as its decimal text. It must be written as an "
    "integer: a number with a fraction or an exponent (`2.0`, `2e3`) is refused with 422 even "
    "when its value is whole, because ids beyond 2^53 do not survive as floats.",
}
ID_OR_NUMBER: Schema = {"oneOf": [ID, NUMBER_ID]}

SEGMENT_LIST: Schema = {
    "type": "array",
    "maxItems": 100,
    "items": ID_OR_NUMBER,
    "description": "Duplicates are dropped, keeping first occurrences in order. At most 100 "
    "entries in one event's lists together.",
}
NON_EMPTY_SEGMENT_LIST: Schema = {**SEGMENT_LIST, "minItems": 1}
OCCURRED_AT: Schema = {
    "description": "When the CRM made the change; per (contact, segment) the newest change "
    "wins, and an older one is counted as `stale` and ignored. Without it the change takes its "
    "arrival time. Accepted from 2000-01-01T00:00:00Z to 15 minutes past segmapd's clock (a "
    "sender's clock running ahead would make later changes stale); outside that, 422.",
    "oneOf": [
        {
            "type": "string",
            "format": "date-time",
            "description": "RFC 3339 with `Z` or an offset; fractional seconds allowed. A time "
            "without an offset is refused.",
            "examples": ["2026-12-01T10:00:00Z", "2026-12-01T11:00:00.250+01:00"],
        },
        {
            "type": "integer",
            "minimum": 946_684_800_000,
            "description": "Epoch milliseconds (not seconds).",
            "examples": [1796119200000],
        },
    ],
}
# Three forms, told apart by their keys (so exactly one matches). Limits the schema cannot say,
# each a 422 naming the field: one segment both in the adds and in `remove`; more than 100
# segment ids in one event's lists together; `occurredAt` out of range.
EVENT_ADD: Schema = {
    "title": "segmentIds (add, the original form)",
    "type": "object",
    "required": ["contactId", "segmentIds"],
    "additionalProperties": False,
    "properties": {
        "contactId": ID_OR_NUMBER,
        "segmentIds": {**SEGMENT_LIST, "description": "Segments to add (as `add`)."},
        "remove": {**SEGMENT_LIST, "description": "Segments to remove."},
        "occurredAt": OCCURRED_AT,
    },
    "anyOf": [
        {"properties": {"segmentIds": {"minItems": 1}}},
        {"required": ["remove"], "properties": {"remove": {"minItems": 1}}},
    ],
}
EVENT_CHANGE: Schema = {
    "title": "add and/or remove",
    "type": "object",
    "required": ["contactId"],
    "additionalProperties": False,
    "properties": {
        "contactId": ID_OR_NUMBER,
        "add": {**SEGMENT_LIST, "description": "Segments the contact is now in."},
        "remove": {
            **SEGMENT_LIST,
            "description": "Segments the contact is no longer in. A segment segmapd never "
            "added is removed too: the CRM said so.",
        },
        "occurredAt": OCCURRED_AT,
    },
    "description": "At least one segment id in `add` or `remove`; `segmentIds` and `add` are "
    "two spellings of the adds and cannot be combined.",
    "anyOf": [
        {"required": ["add"], "properties": {"add": {"minItems": 1}}},
        {"required": ["remove"], "properties": {"remove": {"minItems": 1}}},
    ],
}
EVENT_MIRROR: Schema = {
    "title": "set (mirror)",
    "type": "object",
    "required": ["contactId", "set"],
    "additionalProperties": False,
    "properties": {
        "contactId": ID_OR_NUMBER,
        "set": {
            **SEGMENT_LIST,
            "description": "The complete list of segments the contact should be in, among "
            "those segmapd tracks for it: tracked segments not listed are removed, a segment "
            "segmapd never added is never touched. `[]` removes every tracked one. Cannot be "
            "combined with `segmentIds`, `add` or `remove`.",
        },
        "occurredAt": OCCURRED_AT,
    },
}
EVENT: Schema = {"oneOf": [EVENT_ADD, EVENT_CHANGE, EVENT_MIRROR]}
EVENTS: Schema = {
    "oneOf": [EVENT, {"type": "array", "minItems": 1, "maxItems": 1000, "items": EVENT}],
}
EVENTS_EXAMPLES: Schema = {
    "one": {"value": {"contactId": 100000000123, "segmentIds": ["VIP", "Spanish"]}},
    "several": {
        "value": [
            {"contactId": "contact_8f3a9c2e-1b4d", "segmentIds": ["VIP"]},
            {"contactId": 100000000124, "segmentIds": ["ChurnRisk", "VIP"]},
        ]
    },
    "add and remove": {
        "value": {
            "contactId": 100000000125,
            "add": ["VIP"],
            "remove": ["ChurnRisk"],
            "occurredAt": "2026-12-01T10:00:00Z",
        }
    },
    "mirror": {
        "value": [
            {"contactId": 100000000126, "set": ["VIP", "Spanish"], "occurredAt": 1796119200000},
            {"contactId": 100000000127, "set": []},
        ]
    },
}

PROBLEM: Schema = {
    "type": "object",
    "required": ["error", "message"],
    "additionalProperties": False,
    "properties": {
        "error": {"type": "string", "description": "The status's reason, e.g. `BadRequest`."},
        "message": {"type": "string", "description": "What is wrong and where."},
        "field": {
            "type": ["string", "null"],
            "description": "The location alone: a header name or a JSON path such as "
            "`body[2].segmentIds[0]`.",
        },
        "retryAfter": {
            "type": "number",
            "description": "On 503: seconds to wait, as in the Retry-After header.",
        },
    },
}
RETRY_AFTER: Schema = {
    "Retry-After": {
        "required": True,
        "description": "Whole seconds to wait before sending again.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}

COUNT: Schema = {"type": "integer", "minimum": 0}
ACCEPTED_PROPERTIES: Schema = {
    "accepted": {**COUNT, "description": "Assignments (contact, segment) in the request."},
    "duplicates": {
        **COUNT,
        "description": "Of those, how many were already pending or confirmed: no new work.",
    },
    "stale": {
        **COUNT,
        "description": "Of those, how many were older (by `occurredAt`, then arrival) than what "
        "segmapd already works towards or has confirmed for that pair: ignored.",
    },
}


ACCEPTED: Schema = {
    "type": "object",
    "required": list(ACCEPTED_PROPERTIES),
    "additionalProperties": False,
    "properties": ACCEPTED_PROPERTIES,
}

TIMESTAMP: Schema = {"type": "string", "format": "date-time"}
FAILURE_REASONS = [str(reason) for reason in FailureReason]
ASSIGNMENT_PROPERTIES: Schema = {
    "segmentId": {"type": "string"},
    "intent": {
        "enum": ["add", "remove"],
        "description": "What it works towards: the contact in the segment, or out of it.",
    },
    "state": {
        "enum": [
            "queued",
            "sending",
            "retrying",
            "written",
            "verifying",
            "active",
            "removed",
            "failed",
        ],
        "description": "`active` (an add CXone shows), `removed` (a removal CXone shows) and "
        "`failed` are final.",
    },
    "reason": {
        "enum": [None, *FAILURE_REASONS],
        "description": "Why it failed; null unless `state` is `failed`.",
    },
    "message": {"type": ["string", "null"]},
    "attempts": COUNT,
    "lane": {
        "enum": ["live", "bulk"],
        "description": "Which work goes first: `live` (webhooks, `/v1/mappings`, a replay of "
        "named contacts) is written and read ahead of `bulk` (`segmapd import`, "
        "`?lane=bulk`, a replay of every dead letter), which keeps a minimum share of reads "
        "(`[limits] bulk_read_share_min`).",
    },
    "receivedAt": TIMESTAMP,
    "updatedAt": TIMESTAMP,
}
NULLABLE_TIMESTAMP: Schema = {"type": ["string", "null"], "format": "date-time"}
VALIDATION_PROGRESS: Schema = {
    "type": "object",
    "description": "While the membership is being confirmed: what the reads have shown so far.",
    "required": ["reads", "lastReadAt", "nextReadAt", "awaitingRefresh"],
    "additionalProperties": False,
    "properties": {
        "reads": {**COUNT, "description": "Answered reads that did not show the membership."},
        "lastReadAt": NULLABLE_TIMESTAMP,
        "nextReadAt": {
            **NULLABLE_TIMESTAMP,
            "description": "When its next read is due; later when the read queue is long.",
        },
        "awaitingRefresh": {"type": "boolean"},
    },
}
READ_BACKLOG: Schema = {
    "type": "object",
    "description": "How far confirmation lags behind the read limit (waiting is not a failure).",
    "required": ["readsWaiting", "oldestWaitS", "awaitingRefresh", "estimatedDrainS"],
    "additionalProperties": False,
    "properties": {
        "readsWaiting": COUNT,
        "oldestWaitS": {"type": "number", "minimum": 0},
        "awaitingRefresh": COUNT,
        "estimatedDrainS": {
            "type": ["number", "null"],
            "minimum": 0,
            "description": "Seconds of reads, at the read limit, ahead of the contact's pairs "
            "being validated (for the slowest of their lanes).",
        },
        "lanes": {
            "type": "object",
            "description": "The reads waiting per lane: live reads go first, bulk ones keep a "
            "minimum share (`[limits] bulk_read_share_min`).",
            "additionalProperties": False,
            "properties": {
                lane: {
                    "type": "object",
                    "required": ["readsWaiting", "oldestWaitS", "estimatedDrainS"],
                    "additionalProperties": False,
                    "properties": {
                        "readsWaiting": COUNT,
                        "oldestWaitS": {"type": "number", "minimum": 0},
                        "estimatedDrainS": {
                            "type": ["number", "null"],
                            "minimum": 0,
                            "description": "Seconds of reads ahead of a pair of this lane: "
                            "the live queue for live, both queues at most for bulk.",
                        },
                    },
                }
                for lane in ("live", "bulk")
            },
        },
    },
}
HISTORY: Schema = {
    "type": "array",
    "description": "On `GET /v1/contacts/{contactId}`: the pair's transitions since its newest "
    "change began, oldest first, as the journal has committed them (the newest may follow a "
    "moment later).",
    "items": {
        "type": "object",
        "required": ["state", "at"],
        "additionalProperties": False,
        "properties": {"state": ASSIGNMENT_PROPERTIES["state"], "at": TIMESTAMP},
    },
}
ASSIGNMENT: Schema = {
    "type": "object",
    "required": list(ASSIGNMENT_PROPERTIES),
    "additionalProperties": False,
    "properties": {
        **ASSIGNMENT_PROPERTIES,
        "validation": VALIDATION_PROGRESS,
        "history": HISTORY,
    },
}
DRIFT: Schema = {
    "type": "object",
    "description": "A drift a reconcile pass found: CXone held the pair otherwise than segmapd.",
    "required": ["segmentId", "intent", "passId", "foundAt", "requeued"],
    "additionalProperties": False,
    "properties": {
        "segmentId": {"type": "string"},
        "intent": {"enum": ["add", "remove"], "description": "What segmapd held."},
        "passId": {"type": "string"},
        "foundAt": TIMESTAMP,
        "requeued": {
            "type": "boolean",
            "description": "Queued again in the bulk lane (false: a dry run, or newer work).",
        },
    },
}
CONTACT: Schema = {
    "type": "object",
    "required": ["contactId", "segments"],
    "additionalProperties": False,
    "properties": {
        "contactId": {"type": "string"},
        "segments": {"type": "array", "items": ASSIGNMENT},
        "validation": READ_BACKLOG,
        "drift": {
            "type": "array",
            "items": DRIFT,
            "description": "Drift found against the contact's pairs, oldest first (only when "
            "there is some).",
        },
    },
}
RECONCILE_PASS: Schema = {
    "type": "object",
    "required": [
        "id",
        "state",
        "dryRun",
        "segmentIds",
        "scheduled",
        "total",
        "read",
        "inStep",
        "drifted",
        "requeued",
        "skipped",
        "startedAt",
        "finishedAt",
        "message",
    ],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"},
        "state": {"enum": ["running", "done", "failed"]},
        "dryRun": {"type": "boolean", "description": "Only reports drift, repairs nothing."},
        "segmentIds": {
            "type": "array",
            "items": {"type": "string"},
            "description": "The segments the pass covers; empty: every segment.",
        },
        "scheduled": {"type": "boolean", "description": "Started by `reconcile.interval_s`."},
        "total": {
            "type": ["integer", "null"],
            "minimum": 0,
            "description": "Tracked memberships when the pass began (null for some segments).",
        },
        "read": {**COUNT, "description": "Memberships read and compared."},
        "inStep": {**COUNT, "description": "Read as segmapd holds them."},
        "drifted": {**COUNT, "description": "Read otherwise: drift, journaled and counted."},
        "requeued": {**COUNT, "description": "Drifted pairs queued again in the bulk lane."},
        "skipped": {
            **COUNT,
            "description": "Pairs with newer work in progress, or not read (an error).",
        },
        "startedAt": TIMESTAMP,
        "finishedAt": NULLABLE_TIMESTAMP,
        "message": {"type": ["string", "null"], "description": "Why a pass failed."},
    },
}
RECONCILE_PROBLEM: Schema = {
    **PROBLEM,
    "properties": {
        **PROBLEM["properties"],
        "running": {**RECONCILE_PASS, "description": "The pass running (on 409)."},
    },
}
SOURCE: Schema = {
    "type": ["string", "null"],
    "description": "Where the change that started the pair came from: the webhook source's "
    "name (`/v1/webhooks/{source}`), or `mappings` for the admin API (`POST /v1/mappings`, "
    "either lane, so `segmapd import` too); a replay or a drift repair keeps it. Null for a "
    "dead letter journaled before segmapd recorded sources.",
}
DEAD_LETTER: Schema = {
    "type": "object",
    "required": ["contactId", *ASSIGNMENT_PROPERTIES, "source"],
    "additionalProperties": False,
    "properties": {"contactId": {"type": "string"}, **ASSIGNMENT_PROPERTIES, "source": SOURCE},
}


CURSOR: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": 11000,
    "description": "A dead letter's place in the list, as this API gave it (opaque). Its "
    "length follows the ids': a cursor past a dead letter whose ids were kept as sent at their "
    "longest may not fit in a request line (414).",
}


WAITED_CONTACT: Schema = {
    "type": "object",
    "required": ["contactId", "segments", "stale"],
    "additionalProperties": False,
    "properties": {
        **CONTACT["properties"],
        "stale": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Segments for which the event was older than what segmapd already "
            "had: nothing will happen to them, and the wait does not wait for them.",
        },
    },
}


def _waited(complete: Schema) -> Schema:
    """A /v1/mappings answer after waiting: the counts, whether all ended, and where each is."""
    return {
        "type": "object",
        "required": [*ACCEPTED_PROPERTIES, "complete", "results"],
        "additionalProperties": False,
        "properties": {
            **ACCEPTED_PROPERTIES,
            "complete": complete,
            "results": {
                "type": "array",
                "description": "One entry per event, in request order.",
                "items": WAITED_CONTACT,
            },
        },
    }


def _readiness(*, ready: bool) -> Schema:
    """A /readyz answer: the verdict and each check, `ok` (or `no` for draining) or why not."""
    checks = ["draining", "queue", "store", "cxone_token", "fds", "validation"]
    return {
        "type": "object",
        "required": ["ready", "checks"],
        "additionalProperties": False,
        "properties": {
            "ready": {"const": ready},
            "checks": {
                "type": "object",
                "required": checks,
                "additionalProperties": False,
                "properties": {
                    **{name: {"type": "string"} for name in checks},
                    "cluster": {
                        "type": "string",
                        "description": "On a PostgreSQL journal only: `ok`, or `fenced: ...` "
                        "while the instance rejoins the cluster.",
                    },
                },
            },
        },
    }


def _problem(description: str, headers: Schema | None = None) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": PROBLEM}},
    }
    if headers is not None:
        response["headers"] = headers
    return response


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _busy(description: str) -> Schema:
    return _problem(description, RETRY_AFTER)


ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]
UNAUTHORIZED = _problem("No or wrong admin token")


# ---- the operator console (daemon/console/): its page and the admin JSON its views read ----


def _closed(properties: Schema, required: list[str] | None = None) -> Schema:
    """An object of exactly these properties (all required unless `required` says)."""
    return {
        "type": "object",
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        "properties": properties,
    }


NUMBER: Schema = {"type": "number"}
UNIX_TIME: Schema = {"type": "number", "description": "Unix time, seconds."}
NULLABLE_UNIX_TIME: Schema = {"type": ["number", "null"], "description": "Unix time, seconds."}
STATE_NAMES = [
    "queued",
    "sending",
    "retrying",
    "written",
    "verifying",
    "active",
    "removed",
    "failed",
]
SAMPLE: Schema = _closed(
    {
        "at": UNIX_TIME,
        "webhooksPerS": NUMBER,
        "writesPerS": {**NUMBER, "description": "Bulk requests to CXone per second."},
        "singleWritesPerS": NUMBER,
        "readsPerS": {**NUMBER, "description": "Membership reads per second."},
        "rateLimited": {**COUNT, "description": "429 answers in the interval."},
        "waitedS": {**NUMBER, "description": "Seconds callers waited at the rate gates."},
        "pendingWrites": COUNT,
        "verifying": COUNT,
        "readsWaiting": COUNT,
    }
)
GATE: Schema = _closed(
    {
        "limitPerS": NUMBER,
        "pausedForS": {**NUMBER, "description": "Seconds left of a 429's pause (0: none)."},
        "waitedS": {**NUMBER, "description": "Seconds callers have waited here in all."},
    }
)
OVERVIEW: Schema = _closed(
    {
        "at": UNIX_TIME,
        "census": _closed(
            {
                "countedAt": NULLABLE_UNIX_TIME,
                "states": {
                    "type": ["object", "null"],
                    "description": "The journal's assignments by state as last counted in the "
                    "background (null: not counted yet); journal-wide.",
                    "additionalProperties": False,
                    "properties": {state: COUNT for state in STATE_NAMES},
                },
            }
        ),
        "work": _closed(
            {
                "pendingWrites": COUNT,
                "buffered": _closed({"live": COUNT, "bulk": COUNT}),
                "parked": COUNT,
                "verifying": COUNT,
                "highWater": COUNT,
                "overloaded": {"type": "boolean"},
            }
        ),
        "rates": _closed(
            {
                "windowS": NUMBER,
                "webhooksPerS": NUMBER,
                "writesPerS": NUMBER,
                "writeLimitPerS": NUMBER,
                "singleWritesPerS": NUMBER,
                "readsPerS": NUMBER,
                "readLimitPerS": NUMBER,
                "rateLimitedLastMinute": COUNT,
            }
        ),
        "gates": _closed({"bulk": GATE, "single": GATE, "read": GATE}),
        "validation": _closed(
            {
                "readsWaiting": COUNT,
                "oldestWaitS": NUMBER,
                "awaitingRefresh": COUNT,
                "reading": COUNT,
            }
        ),
        "refresh": _closed(
            {
                "minIntervalS": NUMBER,
                "refreshesLastHour": COUNT,
                "segmentsRefreshing": COUNT,
                "segmentsWaitingForBudget": COUNT,
            }
        ),
        "sampleIntervalS": NUMBER,
        "samples": {"type": "array", "items": SAMPLE, "description": "Oldest first."},
        "sources": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Every source a dead letter can name (its `source` filter): the "
            "configured webhook sources by name, then `mappings` (the admin API).",
        },
    }
)
SEGMENT_ROW: Schema = _closed(
    {
        "segmentId": {"type": "string"},
        "queued": {**COUNT, "description": "Ids in the segment's batches (this instance)."},
        "inFlight": {**COUNT, "description": "Ids being sent or waiting to retry."},
        "verifying": {**COUNT, "description": "Written ids being confirmed by reads."},
        "failed": {**COUNT, "description": "Dead letters (journal-wide, as last counted)."},
        "lastWrite": {
            "oneOf": [
                {"type": "null"},
                _closed(
                    {
                        "at": UNIX_TIME,
                        "ids": COUNT,
                        "attempt": COUNT,
                        "outcomes": {
                            "type": "object",
                            "description": "What became of the segment's ids sent since "
                            "(written, uncertain, retrying, failed).",
                            "additionalProperties": False,
                            "properties": {
                                name: COUNT
                                for name in ("written", "uncertain", "retrying", "failed")
                            },
                        },
                    }
                ),
            ]
        },
        "refresh": _closed(
            {
                "lastAt": NULLABLE_UNIX_TIME,
                "nextAllowedAt": NULLABLE_UNIX_TIME,
                "refreshing": {"type": "boolean"},
                "waitingForBudget": {"type": "boolean"},
            }
        ),
    }
)
SEGMENTS: Schema = _closed(
    {
        "segments": {"type": "array", "items": SEGMENT_ROW, "description": "Busiest first."},
        "total": {**COUNT, "description": "Segments known, whatever `find` keeps."},
        "matching": {**COUNT, "description": "Segments `find` keeps (all without it)."},
        "parked": {
            **COUNT,
            "description": "Ids waiting for their contact's in-flight limit (all segments).",
        },
        "failedCountedAt": NULLABLE_UNIX_TIME,
        "refreshMinIntervalS": NUMBER,
        "shared": {
            "type": "boolean",
            "description": "Several instances share the journal: the work counts are this "
            "instance's segments'.",
        },
    }
)
CLUSTER: Schema = {
    "oneOf": [
        _closed({"mode": {"const": "single"}, "store": {"type": "string"}}),
        _closed(
            {
                "mode": {"const": "cluster"},
                "store": {"type": "string"},
                "leaseS": NUMBER,
                "self": _closed(
                    {
                        "id": {"type": ["integer", "null"]},
                        "name": {"type": "string"},
                        "fenced": {"type": "boolean"},
                        "fenceReason": {"type": ["string", "null"]},
                        "owned": {"type": "array", "items": COUNT},
                        "releasing": {"type": "array", "items": COUNT},
                        "liveInstances": COUNT,
                    }
                ),
                "instances": {
                    "type": "array",
                    "items": _closed(
                        {
                            "id": COUNT,
                            "name": {"type": "string"},
                            "self": {"type": "boolean"},
                            "startedAt": UNIX_TIME,
                            "heartbeatAt": UNIX_TIME,
                            "heartbeatAgeS": NUMBER,
                            "alive": {"type": "boolean"},
                            "shards": {"type": "array", "items": COUNT},
                        }
                    ),
                },
                "shards": {
                    "type": "array",
                    "items": _closed(
                        {
                            "shard": COUNT,
                            "owner": {"type": ["integer", "null"]},
                            "epoch": COUNT,
                            "leaseLeftS": {"type": ["number", "null"]},
                        }
                    ),
                },
            }
        ),
    ]
}

CONSOLE_PATHS: Schema = {
    "/ui/": {
        "get": {
            "summary": "The operator console (sign in with an admin token)",
            "description": "Static HTML, CSS and JavaScript from the package, served under a "
            "strict Content-Security-Policy; the page uses the admin API below with the token "
            "it is given (kept in the tab's sessionStorage, sent as a bearer token).",
            "responses": {
                "200": {
                    "description": "The console's page",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/v1/overview": {
        "get": {
            "summary": "The console's overview: census, work, rates, gates, backlog, samples",
            "description": "Read from memory (the journal census counts in the background); "
            "samples are taken every `sampleIntervalS` and kept for ten minutes.",
            "security": ADMIN,
            "parameters": [
                {
                    "name": "since",
                    "in": "query",
                    "required": False,
                    "description": "Only samples taken after this Unix time (seconds).",
                    "schema": {"type": "number", "minimum": 0, "maximum": 999999999999},
                }
            ],
            "responses": {
                "200": _json("The figures now, and the samples", OVERVIEW),
                "400": _problem("Bad `since`"),
                "401": UNAUTHORIZED,
            },
        }
    },
    "/v1/segments": {
        "get": {
            "summary": "Per segment: queued, in flight, verifying, failed, last write, refresh",
            "description": "Read from memory: the buffer, the poller and the write path of this "
            "instance, and the dead letters per segment counted in the background.",
            "security": ADMIN,
            "parameters": [
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "description": "At most this many segments, busiest first (default 200).",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                },
                {
                    "name": "find",
                    "in": "query",
                    "required": False,
                    "description": "Only segments whose id holds this text, in any case.",
                    "schema": {"type": "string", "maxLength": 1024},
                },
            ],
            "responses": {
                "200": _json("The segments", SEGMENTS),
                "400": _problem("Bad `limit` or `find`"),
                # 1,024 characters of `find` may take 12 bytes each in the request line.
                "414": _problem(
                    "The request line is longer than the server reads (8190 bytes): a very "
                    "long `find` (percent-encoded)"
                ),
                "401": UNAUTHORIZED,
            },
        }
    },
    "/v1/cluster": {
        "get": {
            "summary": "The instances sharing the journal, their shards, heartbeats and fence",
            "description": "On a PostgreSQL journal; on any other `mode` is `single`.",
            "security": ADMIN,
            "responses": {
                "200": _json("The cluster", CLUSTER),
                "401": UNAUTHORIZED,
                "503": _busy("The journal cannot be read now"),
            },
        }
    },
}

OPENAPI_DOCUMENT: Schema = {
    "openapi": "3.1.0",
    "info": {
        "title": "segmapd",
        "version": "0.1.0",
        "description": "Keeps NICE CXone static-segment memberships in step with a CRM. Bad "
        "input always gets a specific 4xx naming the problem; a 5xx other than a documented 503 "
        "is a bug in segmapd. Any request may also be answered 503 with Retry-After when more "
        "than server.max_connections connections are open, 408 when its body does not arrive "
        "within server.body_timeout_s, and 400/414/431 when it is not well-formed HTTP.",
    },
    "components": {
        "securitySchemes": {
            "adminToken": {"type": "http", "scheme": "bearer"},
            "standardWebhooks": {
                "type": "apiKey",
                "in": "header",
                "name": "webhook-signature",
                "description": "Standard Webhooks: webhook-id, webhook-timestamp and "
                "webhook-signature headers, HMAC-SHA256 with the source's whsec_ secret.",
            },
        },
    },
    "paths": {
        "/v1/webhooks/{source}": {
            "post": {
                "summary": "A delivery in the source kind's own format",
                "description": "For `standard` sources (described here): a body of segmapd's "
                "events signed per Standard Webhooks, validated all or nothing; a redelivery "
                "(same webhook-id) gets the first answer again, with 200. Other kinds take their "
                "sender's own format and answer in its protocol: `hubspot` a JSON array of "
                "HubSpot webhook events signed with X-HubSpot-Signature-v3 (200 with the counts; "
                "events already taken count as nothing new); `salesforce` a SOAP 1.1 Outbound "
                "Message (`text/xml`; 200 with `notificationsResponse`/`Ack`, or a SOAP Fault "
                "with the status below); `json` any JSON mapped by the source's JMESPath "
                "expressions and signed by its HMAC settings. Events a kind deliberately "
                "ignores, and events that can never succeed (dead-lettered), are answered as "
                "taken so that the sender does not retry them.",
                "security": [{"standardWebhooks": []}],
                "parameters": [
                    {
                        "name": "source",
                        "in": "path",
                        "required": True,
                        "description": "A configured `[sources.NAME]`.",
                        "schema": {"type": "string"},
                        "example": "crm",
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": EVENTS, "examples": EVENTS_EXAMPLES}
                    },
                },
                "responses": {
                    "200": _json("A redelivery: the answer given the first time", ACCEPTED),
                    "202": _json("Accepted and journaled", ACCEPTED),
                    "400": _problem("Malformed JSON or wrong shape; `field` names it"),
                    "401": _problem("Missing or bad signature, or timestamp out of tolerance"),
                    "403": _problem(
                        "Authenticated as, or sent from, a sender the source does not accept "
                        "(salesforce: another organization, or outside allowed_networks)"
                    ),
                    "404": _problem("Unknown source"),
                    "413": _problem("Body larger than server.max_body_bytes"),
                    "422": _problem(
                        "An invalid id or `occurredAt`, contradictory lists, an event that "
                        "changes nothing, or a cap exceeded; `field` names it"
                    ),
                    "503": _busy("Draining or above the high-water mark; see Retry-After"),
                },
            }
        },
        "/v1/mappings": {
            "post": {
                "summary": "Queue mappings (admin); optionally wait for them to finish",
                "description": "The body is a webhook body; the admin token replaces the "
                "signature. With `wait`, answers once every assignment ended or the wait ran out.",
                "security": ADMIN,
                "parameters": [
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "description": "Seconds to wait for the assignments to end.",
                        "schema": {"type": "number", "minimum": 0, "maximum": 300},
                        "example": 5,
                    },
                    {
                        "name": "lane",
                        "in": "query",
                        "required": False,
                        "description": "`live` (the default) or `bulk`: bulk work (a backfill; "
                        "`segmapd import` sends it) is written and read behind live work, with "
                        "a minimum share of reads (`[limits] bulk_read_share_min`).",
                        "schema": {"enum": ["live", "bulk"], "default": "live"},
                        "example": "bulk",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": EVENTS, "examples": EVENTS_EXAMPLES}
                    },
                },
                "responses": {
                    "200": _json(
                        "Waited, and every assignment ended (active, removed or failed)",
                        _waited({"const": True}),
                    ),
                    "202": _json(
                        "Queued; with `wait`, some assignments had not ended when it ran out",
                        {"oneOf": [ACCEPTED, _waited({"const": False})]},
                    ),
                    "400": _problem("Malformed body, bad `wait` or `lane`; `field` names it"),
                    "401": UNAUTHORIZED,
                    "413": _problem("Body larger than server.max_body_bytes"),
                    "422": _problem(
                        "An invalid id or `occurredAt`, contradictory lists, an event that "
                        "changes nothing, or a cap exceeded; `field` names it"
                    ),
                    "503": _busy("Draining or above the high-water mark; see Retry-After"),
                },
            }
        },
        "/v1/contacts/{contactId}": {
            "get": {
                "summary": "Every retained assignment of one contact",
                "security": ADMIN,
                "parameters": [
                    {
                        "name": "contactId",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json("The contact's assignments", CONTACT),
                    "401": UNAUTHORIZED,
                    "404": _problem("No assignments for that contact"),
                },
            }
        },
        "/v1/dead-letters": {
            "get": {
                "summary": "Failed assignments, oldest first, a page at a time",
                "description": "`reason`, `segment` and `source` narrow the list (together: "
                "dead letters matching each); `limit` applies after them. A full page "
                "has a `next` cursor: pass it as `after` for the page that follows (same "
                "filter). `count=true` adds `matching` (how many the filter keeps) and "
                "`newest` (the newest one's cursor: the `through` of a replay of exactly "
                "those). Every filter is answered from an index of dead letters, however "
                "many there are.",
                "security": ADMIN,
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "description": "At most this many (default 1000).",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100000},
                    },
                    {
                        "name": "reason",
                        "in": "query",
                        "required": False,
                        "description": "Only dead letters that failed for this reason.",
                        "schema": {"enum": FAILURE_REASONS},
                    },
                    {
                        "name": "segment",
                        "in": "query",
                        "required": False,
                        "description": "Only dead letters of this segment id (exact match).",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 1024},
                    },
                    {
                        "name": "source",
                        "in": "query",
                        "required": False,
                        "description": "Only dead letters from this source (exact match): a "
                        "webhook source's name, or `mappings` for the admin API.",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 1024},
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "description": "A previous page's `next`: the page after it.",
                        "schema": CURSOR,
                    },
                    {
                        "name": "count",
                        "in": "query",
                        "required": False,
                        "description": "`true` adds `matching` and `newest`.",
                        "schema": {"type": "boolean", "default": False},
                    },
                ],
                "responses": {
                    "200": _json(
                        "Dead letters",
                        {
                            "type": "object",
                            "required": ["deadLetters", "next"],
                            "additionalProperties": False,
                            "properties": {
                                "deadLetters": {"type": "array", "items": DEAD_LETTER},
                                "next": {
                                    "type": ["string", "null"],
                                    "description": "The cursor of the page after this one; "
                                    "null when this page was the last.",
                                },
                                "matching": {
                                    **COUNT,
                                    "description": "With `count=true`: how many dead letters "
                                    "the filter keeps, on every page.",
                                },
                                "newest": {
                                    "type": ["string", "null"],
                                    "description": "With `count=true`: the newest of them, as "
                                    "a cursor (null: none).",
                                },
                            },
                        },
                    ),
                    "400": _problem(
                        "Bad `limit`, `reason`, `segment`, `source`, `after` or `count`"
                    ),
                    "414": _problem(
                        "The request line is longer than the server reads (8190 bytes): a "
                        "very long `segment`, `source` or `after`"
                    ),
                    "401": UNAUTHORIZED,
                },
            }
        },
        "/v1/dead-letters/replay": {
            "post": {
                "summary": "Queue failed assignments again (all, some contacts', some pairs, "
                "or a filter's)",
                "description": "An empty body or `{}` replays every dead letter, each with its "
                "intent (a failed removal is replayed as a removal). `contactIds` keeps those "
                "contacts' dead letters, `deadLetters` exactly those pairs; `reason`, `segment`, "
                "`source` and `through` keep those of that reason, segment and source up to "
                "that cursor (the `newest` of a count with the same filter: dead letters that "
                "failed since are left out), alone or with either list. Each is replayed from "
                "its own source. Dead letters of events nobody could act "
                "on (their values were invalid when they arrived: `attempts` 0) are skipped and "
                "counted in `skipped`. Answered once the replay is committed; a large set is "
                "replayed and committed a page at a time, so a 503 part-way leaves the pages "
                "before it replayed (asking again replays the rest). A replay of named contacts "
                "or dead letters goes in the live lane, any other in the bulk lane; `lane` "
                "chooses.",
                "security": ADMIN,
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "contactIds": {"type": "array", "items": {"type": "string"}},
                                    "deadLetters": {
                                        "type": "array",
                                        "minItems": 1,
                                        "maxItems": 1000,
                                        "description": "Exactly these dead letters; cannot be "
                                        "combined with `contactIds`.",
                                        "items": {
                                            "type": "object",
                                            "required": ["contactId", "segmentId"],
                                            "additionalProperties": False,
                                            "properties": {
                                                "contactId": {"type": "string"},
                                                "segmentId": {"type": "string"},
                                            },
                                        },
                                    },
                                    "reason": {
                                        "enum": FAILURE_REASONS,
                                        "description": "Only dead letters of this reason.",
                                    },
                                    "segment": {
                                        "type": "string",
                                        "minLength": 1,
                                        "maxLength": 1024,
                                        "description": "Only dead letters of this segment.",
                                    },
                                    "source": {
                                        "type": "string",
                                        "minLength": 1,
                                        "maxLength": 1024,
                                        "description": "Only dead letters from this source.",
                                    },
                                    "through": {
                                        **CURSOR,
                                        "description": "Only dead letters up to this one (a "
                                        "count's `newest`).",
                                    },
                                    "lane": {
                                        "enum": ["live", "bulk"],
                                        "description": "Default: `live` with `contactIds` or "
                                        "`deadLetters`, else `bulk`.",
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "202": _json(
                        "Replayed",
                        {
                            "type": "object",
                            "required": ["replayed", "skipped"],
                            "additionalProperties": False,
                            "properties": {"replayed": COUNT, "skipped": COUNT},
                        },
                    ),
                    "400": _problem(
                        "Malformed body, or a bad `contactIds`, `deadLetters`, `reason`, "
                        "`segment`, `source`, `through` or `lane`"
                    ),
                    "401": UNAUTHORIZED,
                    "413": _problem("Body larger than server.max_body_bytes"),
                    "503": _busy("Draining or above the high-water mark; see Retry-After"),
                },
            }
        },
        "/v1/reconcile": {
            "post": {
                "summary": "Start a drift reconcile pass now",
                "description": "Re-reads every tracked membership (each add segmapd made and "
                "holds, each removal it confirmed) at `reconcile.read_share` of the read budget, "
                "after validation's reads; drift is journaled, counted and queued again in the "
                "bulk lane (not in a dry run). One pass runs at a time, in one instance.",
                "security": ADMIN,
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "segmentIds": {
                                        "type": "array",
                                        "maxItems": 10000,
                                        "items": {
                                            "type": "string",
                                            "minLength": 1,
                                            "maxLength": 1024,
                                        },
                                        "description": "Only these segments (default: all).",
                                    },
                                    "dryRun": {"type": "boolean"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "202": _json("The pass, started", RECONCILE_PASS),
                    "400": _problem("Malformed body, or a bad `segmentIds` or `dryRun`"),
                    "401": UNAUTHORIZED,
                    "409": {
                        "description": "A pass is running: `running` is it",
                        "content": {"application/json": {"schema": RECONCILE_PROBLEM}},
                    },
                    "413": _problem("Body larger than server.max_body_bytes"),
                    "503": _busy("The journal is unavailable; see Retry-After"),
                },
            },
            "get": {
                "summary": "Recent reconcile passes, newest first",
                "security": ADMIN,
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "description": "At most this many (default 20).",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    }
                ],
                "responses": {
                    "200": _json(
                        "Passes",
                        {
                            "type": "object",
                            "required": ["passes"],
                            "additionalProperties": False,
                            "properties": {"passes": {"type": "array", "items": RECONCILE_PASS}},
                        },
                    ),
                    "400": _problem("Bad `limit`"),
                    "401": UNAUTHORIZED,
                    "503": _busy("The journal is unavailable; see Retry-After"),
                },
            },
        },
        "/v1/reconcile/{id}": {
            "get": {
                "summary": "One reconcile pass, with its figures so far",
                "security": ADMIN,
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _json("The pass", RECONCILE_PASS),
                    "401": UNAUTHORIZED,
                    "404": _problem("No such pass"),
                    "503": _busy("The journal is unavailable; see Retry-After"),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness: the event loop answers and the writer task is alive",
                "responses": {
                    "200": _json(
                        "Alive",
                        {
                            "type": "object",
                            "required": ["status"],
                            "additionalProperties": False,
                            "properties": {"status": {"const": "ok"}},
                        },
                    ),
                    "503": _json(
                        "The writer died",
                        {
                            "type": "object",
                            "required": ["status", "reason"],
                            "additionalProperties": False,
                            "properties": {
                                "status": {"const": "failing"},
                                "reason": {"type": "string"},
                            },
                        },
                    ),
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: store writable, CXone token obtainable, not draining",
                "responses": {
                    "200": _json("Ready", _readiness(ready=True)),
                    "503": _json("Not ready; `checks` says why", _readiness(ready=False)),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": _json(
                        "OpenAPI 3.1",
                        {
                            "type": "object",
                            "required": ["openapi", "info", "paths"],
                            "properties": {"openapi": {"const": "3.1.0"}},
                        },
                    )
                },
            }
        },
        **CONSOLE_PATHS,
    },
}
