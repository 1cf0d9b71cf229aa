"""The HTTP endpoints (see ``docs/http-api.md``)."""

from __future__ import annotations

import hmac
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

from quart import Quart, Response, request
from werkzeug.http import parse_list_header

from .._errors import AdmissionError
from .._gate import Ticket
from .._limits import MAX_CAPACITY
from ._body import read_json_object
from ._errors import ApiError, error_parts, json_response
from ._openapi import openapi_document
from ._receive_stamps import request_completed_at
from ._service import Service
from ._sessions import ACTIVE, COMPLETED, EXPIRED, QUEUED, EndedSession, Session, SessionRecord
from ._sse import session_events

MAX_LIST = 1000
_DIGITS = re.compile(r"[0-9]{1,4}")
DEFAULT_LIST = 100


def wants_async(prefer_headers: list[str]) -> bool:
    """``Prefer: respond-async`` (RFC 7240); other preferences are ignored, the text of
    their quoted values too (``note="a,respond-async"`` is no such preference)."""
    for header in prefer_headers:
        for preference in parse_list_header(header):  # commas in quoted strings kept
            token = preference.split(";", 1)[0].split("=", 1)[0].strip().lower()
            if token == "respond-async":
                return True
    return False


def check_admin(token: str | None) -> None:
    """Bearer-token check for admin operations, in constant time.

    Raises:
        ApiError: ``forbidden`` (no token configured) or ``unauthorized``.
    """
    refusal = admin_refusal(token, request.headers.getlist("Authorization"))
    if refusal is not None:
        raise refusal


def admin_refusal(token: str | None, authorization: list[str]) -> ApiError | None:
    """Why a request with these ``Authorization`` values (as HTTP decodes them, Latin-1)
    may not do admin operations; None if it may."""
    if token is None:
        return ApiError("forbidden", "admin operations are disabled: no admin token is configured")
    # Two Authorization headers are refused: which one a proxy or client meant is unknown.
    scheme, _, given = (authorization[0] if len(authorization) == 1 else "").partition(" ")
    # Compared as bytes: the header as the client sent it (HTTP decodes headers as
    # Latin-1), the token as UTF-8, so a non-ASCII token works from any client.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("latin-1"), token.encode("utf-8")
    ):
        return ApiError(
            "unauthorized",
            "a valid 'Authorization: Bearer <admin token>' is required",
            headers={"WWW-Authenticate": 'Bearer realm="sessiongate"'},
        )
    return None


def stats_json(service: Service) -> dict[str, Any]:
    stats = service.gate.stats()
    body: dict[str, Any] = {
        "capacity": stats.capacity,
        "active": stats.active,
        "queued": stats.queued,
        "max_wait_s": stats.max_wait,
        "max_queue": stats.max_queue,
        "admitted_total": stats.admitted,
        "completed_total": stats.completed,
        "failed_total": stats.failed,
        "expired_total": stats.expired,
        "rejected_total": stats.rejected,
        "cancelled_total": stats.cancelled,
        "wait_p50_s": stats.wait_p50,
        "wait_p90_s": stats.wait_p90,
        "wait_p99_s": stats.wait_p99,
    }
    if service.shared_backend:
        body["local_active"] = service.gate.local_active
        body["local_queued"] = service.gate.local_queued
    return body


async def _nothing() -> AsyncIterator[bytes]:
    """An empty body of unknown length."""
    return
    yield  # an async generator all the same


def arrival_of_whole_request(service: Service, scope: Mapping[str, Any]) -> Ticket | None:
    """A request's arrival stamp, taken as its head reached the host, or, if its body
    was still arriving then, a stamp of when the rest of it did: the client's upload is
    not time spent waiting for a slot, and a slow uploader queues in the place it
    completed."""
    stamp = service.stamp_of(scope)
    if stamp is not None:
        completed = request_completed_at(scope)
        if completed is not None and completed > stamp.arrived_at:
            return service.stamp(completed)
    return stamp


async def sync_answer(service: Service, record: SessionRecord) -> tuple[Any, int, dict[str, str]]:
    """Run a synchronous caller's session (checked, not started); its answer's JSON
    value (or encoded JSON), status and headers. A caller that goes away (cancelled
    here) cancels its session, queued or active."""
    try:
        await service.start_session(record)
        await service.wait_sync(record)
    finally:
        if not record.ended:  # the client went away: cancel its session, queued or active
            record.cancel("client_disconnected")
    if record.state == COMPLETED:
        return record.encode(service.gate), 200, {}
    # Returned, not raised: the same answer as the ApiError handler's, without
    # unwinding through Quart's error handling (~3 % of an expiry's instructions).
    return error_parts(service.refusal(record), service.settings.refusal_status)


def register(app: Quart, service: Service) -> None:
    settings = service.settings

    async def on_its_worker(session_id: str, events: bool = False) -> Response | None:
        """Another sibling worker's session: its answer, as that worker gives it."""
        owner = service.owner_of(session_id)
        if owner is None:
            return None
        assert service.peers is not None
        path = f"/sessions/{session_id}" + ("/events" if events else "")
        answer = await service.peers.forward(owner, path, stream=events)
        if answer is None:
            raise ApiError("not_found", "no session with this id (its worker is gone)")
        return answer

    def find(session_id: str) -> Session:
        record = service.registry.get(session_id)
        if record is None:
            raise ApiError("not_found", "no session with this id (unknown, or ended and evicted)")
        return record

    @app.post("/sessions")
    async def create_session() -> Response:
        body = await read_json_object(settings.max_body)
        service.validate(body)
        respond_async = wants_async(request.headers.getlist("Prefer"))
        # The arrival stamp, when the request's head reached the host, fixes this
        # session's FIFO place and starts its queue deadline. It is reserved only now
        # that the body has been read and checked (a slow upload holds nobody back),
        # until the session's task enters the gate, so no later arrival gets ahead.
        arrival = arrival_of_whole_request(service, request.scope)
        record = service.new_session(service.arrive(arrival), body)
        if respond_async:
            # The session lives on in the sessions nursery, whatever this request does.
            await service.start_session(record, answer_now=True)
            # Refused at once, or expired at once (--max-wait 0 and a full gate): the
            # answer is the refusal, as for a synchronous caller.
            if record.refused_at_once or record.state == EXPIRED:
                raise service.refusal(record)
            return json_response(
                record.encode(service.gate),
                202,
                {"Location": f"/sessions/{record.id}", "Preference-Applied": "respond-async"},
            )
        return json_response(*await sync_answer(service, record))

    @app.get("/sessions")
    async def list_sessions() -> Response:
        check_admin(settings.admin_token)
        if len(request.args.getlist("state")) > 1 or len(request.args.getlist("limit")) > 1:
            raise ApiError("invalid_request", "'state' and 'limit' may each be given once")
        state = request.args.get("state")
        if state is not None and state not in (QUEUED, ACTIVE):
            raise ApiError("invalid_request", "'state' must be 'queued' or 'active'")
        text = request.args.get("limit")
        limit = DEFAULT_LIST
        if text is not None:
            # Plain ASCII digits only (int() would also take "+5", " 5", "5_0", "٥").
            # Leading zeros are no digits of the value ("0001" and "00001" alike), and
            # only the rest is converted (int() refuses over 4300 digits: a 500).
            digits = text.lstrip("0") or "0"
            limit = int(digits) if _DIGITS.fullmatch(digits) else 0
            if not 1 <= limit <= MAX_LIST:
                raise ApiError("invalid_request", f"'limit' must be a whole number 1-{MAX_LIST}")
        records = service.registry.list_live(state, limit)
        sessions = [r.to_json(service.gate) for r in records]
        return json_response({"sessions": sessions, "count": len(sessions)})

    @app.get("/sessions/<session_id>")
    async def get_session(session_id: str) -> Response:
        if (forwarded := await on_its_worker(session_id)) is not None:
            return forwarded
        record = find(session_id)
        if isinstance(record, SessionRecord) and record.settling:
            await service.settled(record)  # not "queued" with no position
            # Looked up again: one refused at once meanwhile keeps no object (404).
            record = find(session_id)
        return json_response(record.encode(service.gate))

    @app.delete("/sessions/<session_id>")
    async def delete_session(session_id: str) -> Response:
        if (forwarded := await on_its_worker(session_id)) is not None:
            return forwarded
        record = find(session_id)
        if isinstance(record, EndedSession) or not await service.cancel(record):
            raise ApiError("already_ended", f"the session has already ended ({record.state})")
        return json_response(record.encode(service.gate))

    @app.get("/sessions/<session_id>/events")
    async def session_event_stream(session_id: str) -> Response:
        if (forwarded := await on_its_worker(session_id, events=True)) is not None:
            return forwarded
        record = find(session_id)
        # HEAD: the headers a GET would have (no Content-Length: a stream's length is
        # not known; it said 0, an outside review), and never follow the session.
        events = _nothing() if request.method == "HEAD" else session_events(service, record)
        response = Response(
            events,
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        response.timeout = None
        return response

    @app.put("/admin/capacity")
    async def put_capacity() -> Response:
        body = await read_json_object(settings.max_body)
        capacity = body.get("capacity")
        if isinstance(capacity, float) and capacity.is_integer():
            capacity = int(capacity)  # JSON has one number type: 3.0 is the integer 3
        if (
            isinstance(capacity, bool)
            or not isinstance(capacity, int)
            or not 1 <= capacity <= MAX_CAPACITY
        ):
            raise ApiError(
                "invalid_request", f"'capacity' must be a whole number from 1 to {MAX_CAPACITY}"
            )
        try:
            await service.gate.resize(capacity)
        except AdmissionError as error:  # Redis unreachable: nothing was changed
            raise ApiError(
                error.code, str(error), headers={"Retry-After": service.retry_after()}
            ) from None
        return json_response(stats_json(service))

    @app.get("/stats")
    async def stats() -> Response:
        return json_response(stats_json(service))

    @app.get("/metrics")
    async def metrics() -> Response:
        gate = service.gate
        data, content_type = service.metrics.render(
            gate.stats(),
            local_active=gate.local_active,
            local_queued=gate.local_queued,
            accept=request.accept_mimetypes,
        )
        return Response(data, status=200, content_type=content_type)

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok", "draining": service.draining})

    @app.get("/readyz")
    async def readyz() -> Response:
        retry = {"Retry-After": service.retry_after() if service.started else "1"}
        if service.draining or not service.serving:
            raise ApiError("shutting_down", "the server is draining", status=503, headers=retry)
        if not service.backend_healthy:
            raise ApiError(
                "backend_unavailable",
                "the gate's backend is unreachable",
                status=503,
                headers=retry,
            )
        return json_response({"status": "ready"})

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(openapi_document(settings.refusal_status))
