"""The app factory: a QuartTrio app whose sessions run in a nursery the app owns."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, cast

import trio
from quart import Response, g, request
from quart.signals import (
    got_request_exception,
    request_finished,
    request_started,
    request_tearing_down,
)
from quart.utils import encode_headers
from quart.wrappers.response import DataBody
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers import TrioRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from ..config import ConfigError, Settings
from . import _hypercorn_fix
from ._errors import STATUS, UNEXPECTED, ApiError, dumps, error_response, json_head, json_response
from ._handlers import HandlerLoadError
from ._peers import OwnerGone, Peers
from ._plain_create import serve_plain_create
from ._receive_stamps import request_received_at
from ._routes import admin_refusal, check_admin, register
from ._service import ARRIVAL_KEY, Service, StartRefused

log = logging.getLogger("sessiongate.web")

#: How long an answer waits for the rest of a request body it did not need.
BODY_DRAIN_TIMEOUT = 5.0

_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
}


class _Connection(TrioASGIHTTPConnection):
    """Quart-Trio's HTTP connection, with three additions at the ASGI boundary.

    *The arrival stamp.* A ``POST`` (the only one is ``POST /sessions``) is stamped here,
    before Quart builds the request or reads the body, with the time its head reached
    the host (``_receive_stamps``; the time it reaches the app where there is no kernel
    stamp): that stamp fixes the session's FIFO place and starts its queue deadline.
    Under a burst every later step of the request waits for the whole burst to get that
    far (Trio runs the burst's tasks pass by pass), so stamping here rather than in the
    view keeps a burst's queue deadlines close to when its clients sent. The stamp
    reserves nothing until the body has been read and checked: a request that never
    becomes a session costs nothing.

    *A head over* :data:`MAX_HEAD` is refused with 431, however its bytes arrived.

    *A closing response's last ``send`` is shielded.* Quart-Trio cancels the request's
    nursery as soon as Hypercorn reports ``http.disconnect``. Hypercorn reports it from
    *inside* the app's last ``send`` when the connection is to close after the response
    (``Connection: close`` from either side, or HTTP/1.0): its close path then
    checkpoints, the cancellation lands there, and the socket is never closed (the
    client waits for EOF forever). Shielding that send lets the close finish. A send
    cannot block for long on its own: Hypercorn already shields its socket writes.
    Only closing exchanges are shielded: on a keep-alive connection the shield cost a
    third of a small request's throughput with many connections open (wrk, 50
    connections: ``GET /healthz`` 1.3-1.6k/s shielded, 2.0-2.3k/s not, like a bare
    Quart-Trio app), and it is not needed there.
    """

    async def __call__(self, receive, send) -> None:  # type: ignore[no-untyped-def]
        scope = self.scope
        refusal = _head_refusal(scope)
        if refusal is not None:
            await _refuse_closing(send, *refusal)
            return
        closing = _closes_after(scope.get("http_version"), scope.get("headers", ()))

        async def send_closing_shielded(message) -> None:  # type: ignore[no-untyped-def]
            nonlocal closing
            kind = message.get("type")
            if kind == "http.response.start":
                closing = closing or _closes_after(None, message.get("headers", ()))
            elif closing and kind == "http.response.body" and not message.get("more_body"):
                with trio.CancelScope(shield=True):
                    await send(message)
                return
            await send(message)

        try:
            if scope.get("method") == "POST":
                app = cast(SessionGateApp, self.app)
                service = app.service
                cast(dict[str, Any], scope)[ARRIVAL_KEY] = service.stamp(request_received_at())
                # The plain synchronous POST /sessions, served without Quart's request
                # machinery; any other form goes on to Quart (``_plain_create``).
                if app.serves_plain_create():
                    receive = await serve_plain_create(
                        service, cast(dict[str, Any], scope), receive, send_closing_shielded
                    )
                    if receive is None:
                        return
            # Quart-Trio's own __call__, except that the request is handled in this task
            # rather than in a second child: one task spawn less per request.
            request = self._create_request_from_scope(send_closing_shielded)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.handle_messages, nursery, request, receive)
                await self.handle_request(nursery, request, send_closing_shielded)
        except* OwnerGone as gone:
            # The answer stays unfinished: Hypercorn cuts the connection.
            log.warning("%s; cutting the client's connection", gone.exceptions[0])

    async def _send_response(self, send, response) -> None:  # type: ignore[no-untyped-def]
        """Quart's, with a body already in memory (every JSON answer here) sent as one
        message: Quart sends it and then an empty last one, each through Hypercorn's
        ``app_send`` (~3 % of an answer's step). Anything else is sent as Quart does."""
        body = response.response if isinstance(response, Response) else None
        if not isinstance(body, DataBody):
            await super()._send_response(send, response)
            return
        headers = encode_headers(response.headers)
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        await send({"type": "http.response.body", "body": body.data[body.begin : body.end]})


#: The largest request head (request line and headers) served. h11 refuses a head still
#: incomplete at this size (Hypercorn's ``h11_max_incomplete_size``, answered 431), but
#: serves one that arrived whole in a single read, up to 64 KiB (an outside review: a
#: 17 KB head in one segment was served, split into several it was refused). The same
#: limit here, however the bytes came.
MAX_HEAD = 16 * 1024


def _head_refusal(scope: Mapping[str, Any]) -> tuple[int, str] | None:
    """Why a request's head is refused (status, detail), if it is: a head over
    :data:`MAX_HEAD` as sent, near enough (the request line, each header line with its
    ": " and line end); or both ``Transfer-Encoding`` and ``Content-Length``, which h11
    serves (framed by the first) but a proxy in front may have framed by the second:
    the classic request smuggling. RFC 9112 section 6.3 has the server close the
    connection after such a request at least; it is refused here (an outside review saw
    a request pipelined behind one answered)."""
    size = 16 + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    framing = 0
    for name, value in scope.get("headers", ()):
        size += len(name) + len(value) + 4
        if name == b"transfer-encoding":
            framing |= 1
        elif name == b"content-length":
            framing |= 2
    if size > MAX_HEAD:
        return 431, "request head too large"
    if framing == 3:
        return 400, "both Transfer-Encoding and Content-Length (RFC 9112, section 6.3)"
    return None


async def _refuse_closing(send, status: int, detail: str) -> None:  # type: ignore[no-untyped-def]
    """Answer ``invalid_request`` and close the connection, the request unread."""
    body = dumps({"error": "invalid_request", "detail": detail})
    headers = json_head(body, {"Connection": "close"})
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _closes_after(http_version: str | None, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request's or a response's head closes the connection after the answer."""
    if http_version == "1.0":
        return True
    for name, value in headers:
        if name.lower() == b"connection" and b"close" in value.lower():
            return True
    return False


class _NoWebsockets:
    """The service has no WebSocket endpoint: a WebSocket handshake, on any path, is
    refused with a JSON 400 (Quart would route it, find nothing, and answer 500 from
    error handlers that expect an HTTP request; an outside review); on an ``/admin``
    path the admin token is checked first (401, 403), as for every request there."""

    def __init__(self, app: SessionGateApp, scope: Mapping[str, Any]) -> None:
        self.scope = scope
        self.token = app.service.settings.admin_token

    async def __call__(self, receive, send) -> None:  # type: ignore[no-untyped-def]
        status = 400
        error = ApiError("invalid_request", "this server does not speak WebSocket")
        path = self.scope.get("path", "")
        if path == "/admin" or path.startswith("/admin/"):
            authorization = [
                value.decode("latin-1")
                for name, value in self.scope.get("headers", ())
                if name.lower() == b"authorization"
            ]
            refusal = admin_refusal(self.token, authorization)
            if refusal is not None:
                error, status = refusal, STATUS[refusal.code]
        body = dumps({"error": error.code, "detail": error.detail})
        if "websocket.http.response" in self.scope.get("extensions", {}):
            headers = json_head(body, error.headers)
            await send(
                {"type": "websocket.http.response.start", "status": status, "headers": headers}
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # a server without the extension answers 403 to a close before accept
            await send({"type": "websocket.close", "code": 1003})


class _Request(TrioRequest):
    """Quart-Trio's request, knowing it belongs to no blueprint without an import.

    Quart asks a request for its blueprints four times per request (before and after
    it, its teardown, its error handlers), and the property imports a helper each time
    it is read (the import statement runs Python's import machinery, module cached or
    not: ~4 % of an expiry answer's step). This app has no blueprints."""

    @property
    def blueprints(self) -> list[str]:
        return [] if self.blueprint is None else super().blueprints


class SessionGateApp(QuartTrio):
    """The sessiongate service app; ``app.service`` holds the gate and its sessions."""

    request_class = _Request
    asgi_http_class = _Connection
    asgi_websocket_class = _NoWebsockets  # type: ignore[assignment]
    service: Service
    #: What Quart would do around a request beside the view, as the factory left it.
    own_extras: tuple[object, ...] = ()

    def request_extras(self) -> tuple[object, ...]:
        """What Quart runs around a request beside the view: the app's ``before``/
        ``after``/``teardown_request`` functions and URL value preprocessors, and its
        body limit."""
        return (
            tuple(self.before_request_funcs.get(None, ())),
            tuple(self.after_request_funcs.get(None, ())),
            tuple(self.teardown_request_funcs.get(None, ())),
            tuple(self.url_value_preprocessors.get(None, ())),
            self.config.get("MAX_CONTENT_LENGTH"),
        )

    def serves_plain_create(self) -> bool:
        """Whether the plain ``POST /sessions`` may skip Quart (``_plain_create``): only
        while what Quart does around a request is what the factory made (an embedder's
        own hooks, a receiver of Quart's request signals, connected before or after
        the app was made and for any app, or its own body limit apply to every
        request: such an app is served by Quart throughout)."""
        return self.request_extras() == self.own_extras and not (
            request_started.receivers
            or request_finished.receivers
            or request_tearing_down.receivers
            or got_request_exception.receivers
        )

    def log_exception(
        self,
        exception_info: tuple[type, BaseException, TracebackType] | tuple[None, None, None],
    ) -> None:
        # A start-up refused for a reason of one line (a setting to correct) is that
        # line, said by whoever runs the app (`sessiongate serve`, Hypercorn): no traceback.
        if not isinstance(exception_info[1], StartRefused):
            super().log_exception(exception_info)


def _hypercorn_workers() -> int | None:
    """How many worker processes the Hypercorn loading this app runs
    (``hypercorn -k trio -w N 'sessiongate.web:create_app()'``), read from the ``config``
    of Hypercorn's worker function up the call stack; None when no Hypercorn worker is
    loading it (``sessiongate serve``, tests, an app made in code)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name.endswith("_worker") and str(
            frame.f_globals.get("__name__", "")
        ).startswith("hypercorn."):
            workers = getattr(frame.f_locals.get("config"), "workers", None)
            return workers if isinstance(workers, int) else None
        frame = frame.f_back  # type: ignore[assignment]
    return None


def create_app(
    settings: Settings | None = None, *, environ: Mapping[str, str] | None = None
) -> SessionGateApp:
    """The service as an ASGI app (Quart-Trio), configured by ``settings``.

    Without ``settings``, they are read from ``SESSIONGATE_*`` variables, so
    ``hypercorn -k trio 'sessiongate.web:create_app()'`` serves it as configured.

    Raises:
        sessiongate.config.ConfigError: an invalid variable.
        sessiongate.web.HandlerLoadError: ``--handler`` cannot be imported.
    """
    workers = _hypercorn_workers()
    try:
        if settings is None:
            settings = Settings.from_environ(os.environ if environ is None else environ)
            if workers is not None and workers > 1 and not settings.redis:
                raise ConfigError(
                    "hypercorn --workers",
                    f"{workers} workers need a shared backend (SESSIONGATE_BACKEND="
                    "redis://...); with the in-memory backend each would have its own cap",
                )
        service = Service(settings)
    except (ConfigError, HandlerLoadError) as error:
        if workers is None:
            raise
        # Loaded by Hypercorn's worker: one line, as `sessiongate serve` says it, and
        # exit status 2, instead of a traceback.
        prefix = "invalid SESSIONGATE_HANDLER: " if isinstance(error, HandlerLoadError) else ""
        print(f"sessiongate: {prefix}{error}", file=sys.stderr)
        raise SystemExit(2) from None
    _hypercorn_fix.apply()
    service.peers = Peers.from_environ(os.environ)
    app = SessionGateApp("sessiongate.web", static_folder=None)
    app.service = service
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body,
        RESPONSE_TIMEOUT=None,  # sync sessions and event streams last as long as they last
        PROVIDE_AUTOMATIC_OPTIONS=False,
        # The owner task drains within the grace; never cut it short.
        BACKGROUND_TASK_SHUTDOWN_TIMEOUT=settings.shutdown_grace + 10.0,
    )
    app.url_map.strict_slashes = False
    # "/stats//" is no route (404 JSON), not a 308 redirect with an HTML body whose
    # Location is built from the client's Host header.
    app.url_map.merge_slashes = False

    @app.before_serving
    async def start_owner() -> None:
        await app.nursery.start(service.run)

    @app.after_serving
    async def stop_owner() -> None:
        await service.shutdown()
        if service.peers is not None:
            await service.peers.aclose()

    @app.before_request
    async def admin_before_routing() -> None:
        # Every /admin/... path, known or not, is checked before routing.
        path = request.path
        if path == "/admin" or path.startswith("/admin/"):
            check_admin(settings.admin_token)

    @app.after_request
    async def finish_request_body(response: Response) -> Response:
        # Never answer with an unread body on a keep-alive connection (Hypercorn would
        # leave it stuck): read the rest, within --max-body, or close the connection.
        if g.get("body_read") or (
            not request.content_length and "Transfer-Encoding" not in request.headers
        ):
            return response
        if response.status_code == 408:
            # The body's own time ran out (Quart's BODY_TIMEOUT): another wait for it
            # answered 5 s past the documented 60 s (an outside review).
            response.headers["Connection"] = "close"
            return response
        try:
            with trio.move_on_after(BODY_DRAIN_TIMEOUT) as scope:
                await request.get_data(cache=True)
            if scope.cancelled_caught:
                response.headers["Connection"] = "close"
        except (RequestEntityTooLarge, HTTPException):
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        return error_response(error, settings.refusal_status)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = _HTTP_CODES.get(status, "internal_error" if status >= 500 else "invalid_request")
        headers: dict[str, str] = {}
        detail = error.description or error.name
        if isinstance(error, MethodNotAllowed):
            methods = sorted(error.valid_methods or [])
            headers["Allow"] = ", ".join(methods)
            detail = f"{request.method} is not allowed here; allowed: {', '.join(methods)}"
        elif status == 404:
            detail = f"no route {request.path}"
        elif status == 413:
            headers["Connection"] = "close"
            detail = f"the body is larger than {settings.max_body} bytes"
        return json_response({"error": code, "detail": detail}, status, headers)

    @app.errorhandler(Exception)
    async def unexpected_error(error: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.path, exc_info=error)
        return json_response(UNEXPECTED, 500)

    register(app, service)
    app.own_extras = app.request_extras()
    if workers is not None:
        _drain_before_hypercorn_stops(app)
    return app


def _drain_before_hypercorn_stops(app: SessionGateApp) -> None:
    """Under plain Hypercorn, drain as ``sessiongate serve`` does before Hypercorn stops.

    Hypercorn's parent process turns SIGTERM/SIGINT into a shared event that its worker
    polls (``check_multiprocess_shutdown_event``); once it is set, the worker closed its
    listener, gave in-flight requests its graceful timeout (3 s by default) and only then
    shut the app's lifespan down, where the drain ran: queued synchronous callers lost
    their connections with no answer, active ones were cut at 3 s whatever the grace,
    and event streams ended with no terminal event (an outside review). The worker's
    trigger is wrapped here (it is looked up after the app is loaded) so that the app
    drains first, the listener still open: queued sessions end at once as
    ``shutting_down``, active ones get ``SESSIONGATE_SHUTDOWN_GRACE``, every caller is
    answered; then Hypercorn stops as before.

    A SIGTERM to the worker itself counts too: Hypercorn's runner sends one to every
    other worker as soon as one has exited (``-w N``), and a worker had no handler, so
    it died at once: its callers got no answer and its Redis slots waited out their
    leases (an outside review). The first starts the drain if it has not started; one
    during the drain ends its grace, as a second signal does under ``sessiongate serve``.
    With ``-w 0`` (no runner) the app listens for SIGTERM and SIGINT itself.
    """
    import signal

    import hypercorn.trio.run as hypercorn_run

    poll = hypercorn_run.check_multiprocess_shutdown_event  # type: ignore[attr-defined]
    if getattr(poll, "drains_first", False):
        return

    async def drain_on(signals: Any, runner_stops: Any) -> None:
        async with trio.open_nursery() as first:  # a signal, or the runner's event

            async def stop_on(wait: Any) -> None:
                await wait()
                first.cancel_scope.cancel()

            first.start_soon(stop_on, signals.__anext__)
            if runner_stops is not None:
                first.start_soon(stop_on, runner_stops)
        if not app.service.started:
            return
        log.info("Hypercorn is stopping: draining first")
        async with trio.open_nursery() as draining:

            async def cut_on_signal() -> None:
                said = "ending the grace now"
                async for signum in signals:
                    log.info("%s again: %s", signal.Signals(signum).name, said)
                    said = "the grace has ended already"
                    app.service.cut()

            draining.start_soon(cut_on_signal)
            await app.service.drain()
            draining.cancel_scope.cancel()

    async def drain_first(shutdown_event: Any, sleep: Any) -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            await drain_on(signals, lambda: poll(shutdown_event, sleep))

    async def drain_on_signals() -> None:
        # ``hypercorn -w 0``: one process and no runner, and Hypercorn listens for no
        # signal at all: SIGTERM killed the process outright (every caller dropped,
        # Redis slots left to their leases) and SIGINT raised KeyboardInterrupt in a
        # request (an outside review). The app listens for both itself.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await drain_on(signals, None)

    serve = hypercorn_run.worker_serve

    async def worker_serve(
        served: Any,
        config: Any,
        *,
        sockets: Any = None,
        shutdown_trigger: Any = None,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await serve(
                served,
                config,
                sockets=sockets,
                shutdown_trigger=shutdown_trigger or drain_on_signals,
                task_status=task_status,
            )
        except BaseException:
            refused = app.service.start_refused
            if refused is None:
                raise
            # One line, as for a bad setting (create_app), not Hypercorn's lifespan
            # error in exception groups around the app's own traceback.
            named = f"invalid SESSIONGATE_{refused.setting.upper()}: " if refused.setting else ""
            print(f"sessiongate: {named}{refused.reason}", file=sys.stderr)
            raise SystemExit(2 if refused.setting else 1) from None

    drain_first.drains_first = True  # type: ignore[attr-defined]
    hypercorn_run.check_multiprocess_shutdown_event = drain_first  # type: ignore[attr-defined]
    hypercorn_run.worker_serve = worker_serve  # type: ignore[assignment]
