"""The OpenAPI 3 document of the service, built to match what the routes really answer.

``tests/web/test_openapi.py`` checks it against the app: every documented route and
method exists, every route is documented, and every documented status is produced.
"""

from __future__ import annotations

from typing import Any

from .._limits import MAX_CAPACITY

_ERROR = {"$ref": "#/components/schemas/Error"}
_SESSION = {"$ref": "#/components/schemas/Session"}
_STATS = {"$ref": "#/components/schemas/Stats"}
_NUM_OR_NULL = {"type": ["number", "null"]}
#: The whole-number fields of ``/stats`` (the last two in Redis mode only).
_STATS_COUNTS = (
    "capacity",
    "active",
    "queued",
    "max_queue",
    "admitted_total",
    "completed_total",
    "failed_total",
    "expired_total",
    "rejected_total",
    "cancelled_total",
    "local_active",
    "local_queued",
)
_STATS_QUANTILES = ("wait_p50_s", "wait_p90_s", "wait_p99_s")


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    response = _json(_ERROR, description)
    if retry_after:
        response["headers"] = {
            "Retry-After": {
                "description": "whole seconds (>= 1), estimated from the recent hand-off rate",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    return response


_ADMIN = {
    "401": {
        **_error("unauthorized: a wrong or missing admin token"),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    },
    "403": _error("forbidden: no admin token is configured"),
}
_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options"})
#: Every operation's ``default``: answers of the HTTP layer, before any route runs.
_HTTP_LAYER = _error(
    "invalid_request, from the HTTP layer before any route: 400 (a malformed request "
    "line or header, or both Transfer-Encoding and Content-Length), 431 (a head over "
    "16 KiB), 501 (a transfer coding other than chunked); the connection is then closed"
)
_BODY_ERRORS = {
    "400": _error(
        "invalid_json: the body is not JSON (or invalid_request from the HTTP layer: see default)"
    ),
    "408": _error(
        "request_timeout: the body did not arrive in whole within 60 s (the connection "
        "is then closed)"
    ),
    "413": _error("body_too_large: the body is over --max-body"),
    "415": _error("unsupported_media_type: a non-empty body that is not JSON"),
    "422": _error("invalid_request: JSON of the wrong shape, or a value out of range"),
}
_SESSION_ID = {
    "name": "session_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "the session's unguessable id",
}


def openapi_document(refusal_status: int = 503) -> dict[str, Any]:
    """The OpenAPI 3.1 document; ``refusal_status`` is ``--refusal-status``."""
    refusal = str(refusal_status)
    not_found = {"404": _error("not_found: unknown id, or ended and evicted")}
    post_responses: dict[str, Any] = {
        "200": _json(_SESSION, "the session ended completed (synchronous)"),
        "202": {
            **_json(_SESSION, "accepted (Prefer: respond-async); the session runs on"),
            "headers": {
                "Location": {"schema": {"type": "string"}, "description": "/sessions/{id}"},
                "Preference-Applied": {
                    "schema": {"type": "string"},
                    "description": "respond-async",
                },
            },
        },
        **_BODY_ERRORS,
        "409": _error("cancelled: the session was cancelled by DELETE (synchronous)"),
        "500": _error("session_failed: the handler raised (synchronous)"),
        refusal: _error(
            "queue_timeout (body adds waited_s), queue_full, shutting_down, "
            "backend_unavailable or lease_lost"
            + ("; or request_timeout (see 408 above)" if refusal == "408" else ""),
            retry_after=True,
        ),
    }
    paths: dict[str, Any] = {
        "/sessions": {
            "post": {
                "summary": "Create a session; its JSON body goes to the handler",
                "parameters": [
                    {
                        "name": "Prefer",
                        "in": "header",
                        "schema": {"type": "string"},
                        "description": "respond-async: answer 202 at once (RFC 7240)",
                    }
                ],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": post_responses,
            },
            "get": {
                "summary": "List this process's live sessions, oldest first (admin)",
                "security": [{"admin": []}],
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["queued", "active"]},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "sessions": {"type": "array", "items": _SESSION},
                                "count": {"type": "integer"},
                            },
                        },
                        "the live sessions",
                    ),
                    **_ADMIN,
                    "422": _error("invalid_request: a bad state or limit"),
                },
            },
        },
        "/sessions/{session_id}": {
            "parameters": [_SESSION_ID],
            "get": {
                "summary": "The session object",
                "responses": {"200": _json(_SESSION, "the session"), **not_found},
            },
            "delete": {
                "summary": "Cancel a queued or active session",
                "responses": {
                    "200": _json(_SESSION, "cancelled"),
                    **not_found,
                    "409": _error("already_ended: the session has ended"),
                },
            },
        },
        "/sessions/{session_id}/events": {
            "parameters": [_SESSION_ID],
            "get": {
                "summary": "Server-Sent Events: each state change, and queue position",
                "responses": {
                    "200": {
                        "description": "event: <state>, data: the session object; ends "
                        "after the terminal state",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **not_found,
                },
            },
        },
        "/admin/capacity": {
            "put": {
                "summary": "Live resize (admin)",
                "security": [{"admin": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["capacity"],
                                "properties": {
                                    "capacity": {
                                        "type": "integer",
                                        "minimum": 1,
                                        "maximum": MAX_CAPACITY,
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_STATS, "the new figures"),
                    **_ADMIN,
                    **_BODY_ERRORS,
                    refusal: _error(
                        "backend_unavailable: Redis mode, Redis did not answer in time; if "
                        "it was only slow, the change may still apply (read /stats)"
                        + ("; or request_timeout (see 408 above)" if refusal == "408" else ""),
                        retry_after=True,
                    ),
                },
            }
        },
        "/stats": {"get": {"responses": {"200": _json(_STATS, "the gate's figures")}}},
        "/metrics": {
            "get": {
                "responses": {
                    "200": {
                        "description": (
                            "Prometheus text format (0.0.4 unless Accept asks for text "
                            "1.0.0 or OpenMetrics)"
                        ),
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/openmetrics-text": {"schema": {"type": "string"}},
                        },
                    }
                }
            }
        },
        "/healthz": {
            "get": {
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status", "draining"],
                            "properties": {
                                "status": {"const": "ok"},
                                "draining": {"type": "boolean"},
                            },
                        },
                        "the process serves (draining included)",
                    )
                }
            }
        },
        "/readyz": {
            "get": {
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"const": "ready"}},
                        },
                        "ready for sessions",
                    ),
                    "503": _error(
                        "shutting_down (draining) or backend_unavailable", retry_after=True
                    ),
                }
            }
        },
        "/openapi.json": {
            "get": {"responses": {"200": _json({"type": "object"}, "this document")}}
        },
    }
    for item in paths.values():
        for method in _METHODS.intersection(item):
            item[method]["responses"]["default"] = _HTTP_LAYER
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sessiongate",
            "version": "0.1.0",
            "description": "A session admission gate: a cap, a FIFO queue, a deadline on "
            "waiting. Every error body is {error, detail}; unknown routes answer 404 "
            "not_found, wrong methods 405 method_not_allowed with an Allow header. On any "
            "route, a request that is not HTTP the server can parse (a malformed request "
            "line or header, a head over 16 KiB, a transfer coding other than chunked) is "
            "answered 400, 431 or 501 invalid_request, and its connection closed.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {
                        "error": {"type": "string"},
                        "detail": {"type": "string"},
                        "waited_s": {"type": "number"},
                    },
                },
                "Session": {
                    "type": "object",
                    "required": [
                        "id",
                        "state",
                        "position",
                        "eta_s",
                        "created_at",
                        "admitted_at",
                        "ended_at",
                        "queued_s",
                        "active_s",
                        "result",
                        "error",
                    ],
                    "properties": {
                        "id": {"type": "string"},
                        "state": {
                            "type": "string",
                            "enum": [
                                "queued",
                                "active",
                                "completed",
                                "failed",
                                "expired",
                                "cancelled",
                                "rejected",
                            ],
                        },
                        "position": {"type": ["integer", "null"]},
                        "eta_s": _NUM_OR_NULL,
                        "created_at": {"type": "number"},
                        "admitted_at": _NUM_OR_NULL,
                        "ended_at": _NUM_OR_NULL,
                        "queued_s": {"type": "number"},
                        "active_s": {"type": "number"},
                        "result": {},
                        "error": {"oneOf": [{"type": "null"}, _ERROR]},
                    },
                },
                "Stats": {
                    "type": "object",
                    "required": [*_STATS_COUNTS[:-2], "max_wait_s", *_STATS_QUANTILES],
                    "properties": {
                        **{name: {"type": "integer"} for name in _STATS_COUNTS},
                        "max_wait_s": {"type": "number"},
                        # None until a session has been admitted (no waits to rank).
                        **{name: _NUM_OR_NULL for name in _STATS_QUANTILES},
                    },
                },
            },
        },
    }
