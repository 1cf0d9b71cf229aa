"""``POST /sessions`` in its plain form, served without Quart's request machinery.

Nearly every request this service gets under load is the same one: a synchronous
``POST /sessions`` with a small JSON body that arrived with its head. Quart serves it
with a request object, a request context (its push and pop, URL matching, signals),
``before``/``after_request`` functions, a response object and a second task watching
for the client's disconnect: ~15-20 % of the server's CPU under the overload of
``benchmarks/bench_http.py``, where it is what sets how late a wave of expiry answers
is. Here such a request is served by the same code the view uses (``_routes``: the body
check, the session, the answer), straight on the ASGI interface.

Only the plain form is served here; anything else goes to Quart unchanged, with the
messages already taken handed back first (:func:`serve_plain_create` returns the
``receive`` to give it): another path or method, an app served under a ``root_path``,
``Prefer`` (an asynchronous session),
``Expect``, ``Transfer-Encoding`` or ``Content-Encoding``, a missing, repeated or too
large ``Content-Length``, a ``Content-Type`` that is not one JSON type, a body not yet
all there (nothing here waits for an upload), and any body the service would refuse
(invalid JSON, a bad ``duration``...): Quart then answers it exactly as before. So every
error answer still comes from one place, the app's error handlers. And an app given more
to do around its requests than the factory gave it (``SessionGateApp.serves_plain_create``:
an embedder's own hook, signal receiver or body limit) is served by Quart throughout.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

from ._body import is_json_media_type, parse_json_object
from ._errors import UNEXPECTED, ApiError, dumps, error_parts, json_head
from ._routes import arrival_of_whole_request, sync_answer
from ._service import Service

log = logging.getLogger("sessiongate.web")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: The request headers that send a ``POST /sessions`` to Quart.
_NOT_PLAIN = frozenset({b"transfer-encoding", b"expect", b"prefer", b"content-encoding"})


def _plain_length(scope: MutableMapping[str, Any], max_body: int) -> int | None:
    """The body's length if ``scope`` is a plain ``POST /sessions``; else None."""
    if scope.get("method") != "POST" or scope.get("path") != "/sessions":
        return None
    if scope.get("root_path"):  # served under a prefix: Quart routes it (a 404 here)
        return None
    length: bytes | None = None
    media_type: bytes | None = None
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            if length is not None:
                return None
            length = value
        elif name == b"content-type":
            if media_type is not None:
                return None
            media_type = value
        elif name in _NOT_PLAIN:
            return None
    if length is None or media_type is None or not length.isdigit() or len(length) > 12:
        return None
    size = int(length)
    if not 0 < size <= max_body or not is_json_media_type(media_type.decode("latin-1")):
        return None
    return size


def _replay(taken: list[dict[str, Any]], receive: Receive) -> Receive:
    """``receive``, giving the messages in ``taken`` first."""
    if not taken:
        return receive
    pending = list(taken)

    async def replaying() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        return await receive()

    return replaying


def _gone_already(take_now: Callable[[], dict[str, Any]]) -> bool:
    """Whether the server has already told of the client's going (after its body)."""
    try:
        return take_now().get("type") == "http.disconnect"
    except (trio.WouldBlock, trio.EndOfChannel):
        return False


async def serve_plain_create(
    service: Service, scope: MutableMapping[str, Any], receive: Receive, send: Send
) -> Receive | None:
    """Serve ``scope`` if it is a plain ``POST /sessions`` whose body is all there:
    None once answered. Otherwise the ``receive`` to hand Quart (module docstring)."""
    size = _plain_length(scope, service.settings.max_body)
    take_now = getattr(receive, "nowait", None)
    on_disconnect = getattr(receive, "on_disconnect", None)
    if size is None or take_now is None or on_disconnect is None:
        return receive
    taken: list[dict[str, Any]] = []
    while not taken or taken[-1].get("more_body", False):
        try:
            message = take_now()
        except (trio.WouldBlock, trio.EndOfChannel):
            return _replay(taken, receive)
        taken.append(message)
        if message.get("type") != "http.request":
            return _replay(taken, receive)
    raw = b"".join(message.get("body", b"") for message in taken)
    if len(raw) != size:  # the server frames by Content-Length: not expected
        return _replay(taken, receive)
    try:
        body = parse_json_object(raw)
        service.validate(body)
    except Exception:  # Quart answers it, as for any request it serves
        return _replay(taken, receive)
    record = service.new_session(service.arrive(arrival_of_whole_request(service, scope)), body)
    with trio.CancelScope() as request_scope:
        # The client going away cancels the request, and with it the session or the
        # sending of its answer (an HTTP/2 answer waits for the client's flow-control
        # window, for ever once the client has gone: an outside review). Quart-Trio has
        # a second task wait for that on ``receive``; here the server calls. The server
        # also says so once an answer is out, from inside its last send, after the
        # answer's last write: nothing there is left to cut short.
        on_disconnect(request_scope.cancel)
        if _gone_already(take_now):
            request_scope.cancel()
        value: Any
        try:
            value, status, headers = await sync_answer(service, record)
        except ApiError as error:  # as the app's handler of ApiError answers it
            value, status, headers = error_parts(error, service.settings.refusal_status)
        except Exception as error:  # as the app's handler of the unexpected answers it
            log.error("unexpected error on POST /sessions", exc_info=error)
            value, status, headers = UNEXPECTED, 500, {}
        # The answer json_response would make, without a response object.
        data: bytes = value if isinstance(value, bytes) else dumps(value)
        head = json_head(data, headers)
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": data})
    return None
