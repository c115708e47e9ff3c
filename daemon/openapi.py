"""The OpenAPI 3.1 document served at /openapi.json (a test keeps it true to the live API)."""

from __future__ import annotations

from typing import Any

ID = {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"}
ID_OR_NUMBER = {"oneOf": [ID, {"type": "integer", "minimum": 0}]}

EVENT = {
    "type": "object",
    "required": ["contactId", "segmentIds"],
    "additionalProperties": False,
    "properties": {
        "contactId": ID_OR_NUMBER,
        "segmentIds": {"type": "array", "minItems": 1, "maxItems": 100, "items": ID_OR_NUMBER},
    },
}
EVENTS = {
    "oneOf": [EVENT, {"type": "array", "minItems": 1, "maxItems": 1000, "items": EVENT}],
}

PROBLEM = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "field": {"type": ["string", "null"]},
        "retryAfter": {"type": "number"},
    },
}

ACCEPTED = {
    "type": "object",
    "required": ["accepted", "duplicates"],
    "properties": {
        "accepted": {
            "type": "integer",
            "description": "Assignments (contact, segment) in the request.",
        },
        "duplicates": {
            "type": "integer",
            "description": "Of those, how many were already pending or confirmed: no new work.",
        },
    },
}

ASSIGNMENT = {
    "type": "object",
    "required": ["segmentId", "state", "reason", "attempts", "updatedAt"],
    "properties": {
        "segmentId": {"type": "string"},
        "state": {
            "enum": ["queued", "sending", "retrying", "written", "verifying", "active", "failed"]
        },
        "reason": {
            "enum": [
                None,
                "contact_not_found",
                "invalid_contact_id",
                "segment_not_found",
                "retries_exhausted",
                "not_indexed",
            ]
        },
        "message": {"type": ["string", "null"]},
        "attempts": {"type": "integer"},
        "receivedAt": {"type": "string", "format": "date-time"},
        "updatedAt": {"type": "string", "format": "date-time"},
    },
}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": PROBLEM}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]

OPENAPI_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "segmapd",
        "version": "0.1.0",
        "description": "Keeps NICE CXone static-segment memberships in step with a CRM.",
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
                "summary": "A signed delivery of one event or an array of events",
                "security": [{"standardWebhooks": []}],
                "parameters": [
                    {"name": "source", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": EVENTS}},
                },
                "responses": {
                    "200": _json("A redelivery: the answer given the first time", ACCEPTED),
                    "202": _json("Accepted and journaled", ACCEPTED),
                    "400": _problem("Malformed JSON or wrong shape; `field` names it"),
                    "401": _problem("Missing or bad signature, or timestamp out of tolerance"),
                    "404": _problem("Unknown source"),
                    "413": _problem("Body larger than server.max_body_bytes"),
                    "422": _problem("An invalid id; `field` names it"),
                    "503": _problem("Draining or above the high-water mark; see Retry-After"),
                },
            }
        },
        "/v1/mappings": {
            "post": {
                "summary": "Queue mappings (admin); optionally wait for them to finish",
                "security": ADMIN,
                "parameters": [
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "number", "minimum": 0, "maximum": 300},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": EVENTS}},
                },
                "responses": {
                    "200": _json(
                        "Every assignment ended (active or failed) within the wait",
                        {
                            **ACCEPTED,
                            "properties": {
                                **ACCEPTED["properties"],  # type: ignore[dict-item]
                                "complete": {"type": "boolean"},
                                "results": {"type": "array"},
                            },
                        },
                    ),
                    "202": _json("Queued (or still in progress when the wait ended)", ACCEPTED),
                    "400": _problem("Malformed body or bad `wait`"),
                    "401": _problem("No or wrong admin token"),
                    "413": _problem("Body too large"),
                    "422": _problem("An invalid id"),
                    "503": _problem("Draining or above the high-water mark"),
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
                    "200": _json(
                        "The contact's assignments",
                        {
                            "type": "object",
                            "required": ["contactId", "segments"],
                            "properties": {
                                "contactId": {"type": "string"},
                                "segments": {"type": "array", "items": ASSIGNMENT},
                            },
                        },
                    ),
                    "401": _problem("No or wrong admin token"),
                    "404": _problem("No assignments for that contact"),
                },
            }
        },
        "/v1/dead-letters": {
            "get": {
                "summary": "Failed assignments, oldest first",
                "security": ADMIN,
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100000},
                    }
                ],
                "responses": {
                    "200": _json(
                        "Dead letters",
                        {
                            "type": "object",
                            "required": ["deadLetters"],
                            "properties": {"deadLetters": {"type": "array"}},
                        },
                    ),
                    "400": _problem("Bad limit"),
                    "401": _problem("No or wrong admin token"),
                },
            }
        },
        "/v1/dead-letters/replay": {
            "post": {
                "summary": "Queue failed assignments again (all, or only some contacts')",
                "security": ADMIN,
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "contactIds": {"type": "array", "items": {"type": "string"}}
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
                            "required": ["replayed"],
                            "properties": {"replayed": {"type": "integer"}},
                        },
                    ),
                    "400": _problem("Malformed body"),
                    "401": _problem("No or wrong admin token"),
                    "503": _problem("Draining or above the high-water mark"),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "responses": {
                    "200": _json("Alive", {"type": "object"}),
                    "503": _json("The writer died", {"type": "object"}),
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: store writable, CXone token obtainable, not draining",
                "responses": {
                    "200": _json("Ready", {"type": "object"}),
                    "503": _json("Not ready; `checks` says why", {"type": "object"}),
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
                "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
            }
        },
    },
}
