"""Reading a request's JSON body: size limit, media type, strict JSON, object shape.

The order is fixed: the body is read first (within ``--max-body``: ``413``), so that an
error answer never leaves an unread body on a keep-alive connection; then the media
type and coding (``415``), the syntax (``400``; RFC 8259 has no ``NaN`` or ``Infinity``) and the
shape (``422``). An empty body is ``{}`` whatever its media type.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from quart import g, request
from werkzeug.exceptions import RequestEntityTooLarge

from ._errors import ApiError


class _NotJson(ValueError):
    pass


class _OutOfRange(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _OutOfRange(f"the number {text} is out of range")
    return value


#: A media type as RFC 6838 names them (``restricted-name``), lower-cased: a structured
#: syntax suffix needs a name before it (``application/+json`` and ``*/+json`` are none).
_MEDIA_TYPE = re.compile(r"([a-z0-9][a-z0-9!#$&^_.+-]{0,126})/([a-z0-9][a-z0-9!#$&^_.+-]{0,126})")


def is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` or any ``+json`` type, parameters allowed."""
    if not content_type:
        return False
    media = _MEDIA_TYPE.fullmatch(content_type.split(";", 1)[0].strip().lower())
    if media is None:
        return False
    subtype = media.group(2)
    return (subtype == "json" and media.group(1) == "application") or (
        subtype.endswith("+json") and len(subtype) > len("+json")
    )


async def read_body(max_body: int) -> bytes:
    """The whole body, at most ``max_body`` bytes.

    Raises:
        ApiError: ``body_too_large`` (the connection is closed after the answer).
    """
    try:
        data = await request.get_data(True, False, False)
    except RequestEntityTooLarge:
        raise ApiError(
            "body_too_large",
            f"the body is larger than {max_body} bytes",
            headers={"Connection": "close"},
        ) from None
    g.body_read = True
    return data


async def read_json_object(max_body: int) -> dict[str, Any]:
    """The body as a JSON object (``{}`` when empty).

    Raises:
        ApiError: ``body_too_large``, ``unsupported_media_type``, ``invalid_json`` or
            ``invalid_request``.
    """
    raw = await read_body(max_body)
    if not raw:
        return {}
    headers = request.headers
    media_types = headers.getlist("Content-Type")
    # One Content-Type (a singleton field: with two, whichever was read first decided).
    if len(media_types) != 1 or not is_json_media_type(media_types[0]):
        raise ApiError(
            "unsupported_media_type",
            "the body must be JSON: one Content-Type, application/json or a +json type",
        )
    codings = [c.strip().lower() for v in headers.getlist("Content-Encoding") for c in v.split(",")]
    if any(coding not in ("", "identity") for coding in codings):
        # RFC 9110 section 15.5.16: a content coding the server does not decode is 415
        # (a gzip body was read as text and answered invalid_json).
        raise ApiError(
            "unsupported_media_type",
            "the body must not be encoded (Content-Encoding is not supported)",
        )
    return parse_json_object(raw)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` (a JSON body, not empty) as a JSON object.

    Raises:
        ApiError: ``invalid_json`` or ``invalid_request``.
    """
    try:
        # UTF-8 only (RFC 8259 8.1; a leading BOM may be ignored, and is): json.loads
        # would also guess UTF-16 and UTF-32 from bytes.
        text = raw.decode("utf-8-sig")
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except _OutOfRange as error:
        raise ApiError("invalid_request", str(error)) from None
    except (json.JSONDecodeError, _NotJson, UnicodeDecodeError):
        raise ApiError("invalid_json", "the body is not valid JSON (RFC 8259)") from None
    except ValueError:  # valid JSON: an integer longer than Python converts (4300 digits)
        raise ApiError("invalid_request", "a number in the body is out of range") from None
    except RecursionError:  # valid JSON, nested deeper than the parser goes
        raise ApiError("invalid_request", "the body is nested too deeply") from None
    if not isinstance(value, dict):
        raise ApiError("invalid_request", "the body must be a JSON object")
    return value
