"""Every answer that is not 200/202: JSON ``{"error", "detail"}`` with the SPEC's status.

A view raises :class:`ApiError`; the app's error handlers turn it, and every werkzeug
``HTTPException`` (404, 405, 413...) and any unexpected exception, into the same JSON
shape. No traceback ever reaches a client: unexpected errors are logged and answered
with a fixed text.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs
from quart import Response

#: Codes answered with the configurable refusal status (503 by default).
REFUSAL_CODES = frozenset(
    {"queue_timeout", "queue_full", "shutting_down", "backend_unavailable", "lease_lost"}
)

#: Fixed statuses of the other codes.
STATUS = {
    "invalid_json": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "cancelled": 409,
    "already_ended": 409,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_request": 422,
    "session_failed": 500,
    "internal_error": 500,
}

#: The answer to an unexpected error (its details go to the server log only).
UNEXPECTED = {"error": "internal_error", "detail": "an unexpected error; see the server log"}

#: Upper bound for Retry-After (a day): past it the estimate says nothing useful.
MAX_RETRY_AFTER = 86_400


# One encoder for every answer: json.dumps with options builds a new one per call.
# ASCII output: non-ASCII text is escaped (\u00e9), so that a string no UTF-8 can carry
# (a lone surrogate, which a JSON body may well contain as "\ud800") is echoed as the
# escape it came in as, instead of failing the answer.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def dumps(value: Any) -> bytes:
    """Strict JSON (no NaN or Infinity), compact, ASCII."""
    return _ENCODER.encode(value).encode("ascii")


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer of ``value``, or of ``value`` already encoded (bytes)."""
    data = value if isinstance(value, bytes) else dumps(value)
    return Response(data, status=status, headers=headers, mimetype="application/json")


@attrs.define
class ApiError(Exception):
    """An answer with an error code; raised by views, rendered by the app."""

    code: str
    detail: str
    #: Set for refusals: the status comes from ``--refusal-status``.
    status: int | None = None
    headers: dict[str, str] = attrs.field(factory=dict)
    extra: dict[str, Any] = attrs.field(factory=dict)

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


def retry_after(estimate: float | None) -> str:
    """A whole number of seconds >= 1 from an estimate (1 when there is none)."""
    if estimate is None or not math.isfinite(estimate):
        return "1"
    return str(min(MAX_RETRY_AFTER, max(1, math.ceil(estimate))))


def json_head(body: bytes, headers: dict[str, str] | None = None) -> list[tuple[bytes, bytes]]:
    """The ASGI headers of :func:`json_response`'s answer with ``body``, made without a
    response object (``_plain_create``, the answers given before or outside Quart)."""
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if headers:
        head += [
            (name.lower().encode("latin-1"), v.encode("latin-1")) for name, v in headers.items()
        ]
    return head


def error_response(error: ApiError, refusal_status: int) -> Response:
    return json_response(*error_parts(error, refusal_status))


def error_parts(error: ApiError, refusal_status: int) -> tuple[dict[str, Any], int, dict[str, str]]:
    """The answer to ``error``: its JSON value, status and headers."""
    if error.status is not None:
        status = error.status
    elif error.code in REFUSAL_CODES:
        status = refusal_status
    else:
        # An unknown code is a server fault: 500, never a KeyError in the error path.
        status = STATUS.get(error.code, 500)
    body = {"error": error.code, "detail": error.detail, **error.extra}
    headers = dict(error.headers)
    if status == 408:
        # RFC 9110, 15.5.9: a server sending 408 SHOULD close the connection (clients
        # read it as "the connection timed out"); so with --refusal-status 408 too.
        headers["Connection"] = "close"
    return body, status, headers
