"""The plain ``POST /sessions``, served without Quart's request machinery
(``web/_plain_create.py``), and every other form, served by Quart as before.

Quart's test client has no way to take a message without waiting, so the tests through
it all go to Quart; these run Hypercorn on 127.0.0.1, where the plain form does not."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from sessiongate.web import _plain_create
from sessiongate.web._plain_create import _plain_length

from .conftest import jbody, port_of, raw_request, read_response, real_server, request_bytes
from .test_real import h2_post, wait_for

JSON = {"Content-Type": "application/json"}


def counting_quart_requests(app: Any) -> list[str]:
    """The requests Quart serves from now on (each goes through ``app.handle_request``;
    a hook of the app's own would send every request to Quart)."""
    served: list[str] = []
    handle = app.handle_request

    async def noting(request: Any) -> Any:
        served.append(f"{request.method} {request.path}")
        return await handle(request)

    app.handle_request = noting
    return served


async def exchange(base: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await raw_request(port_of(base), data)
    try:
        return await read_response(stream)
    finally:
        await stream.aclose()


async def test_a_plain_post_is_served_without_quart_and_answered_as_quart_answers() -> None:
    import json

    with trio.fail_after(10):
        async with real_server() as (app, base):
            served = counting_quart_requests(app)
            plain = await exchange(
                base, request_bytes("POST", "/sessions", jbody({"duration": 0}), JSON)
            )
            assert served == []
            # An unrelated preference sends the same request to Quart.
            headers = {**JSON, "Prefer": "handling=lenient"}
            quart = await exchange(
                base, request_bytes("POST", "/sessions", jbody({"duration": 0}), headers)
            )
            assert served == ["POST /sessions"]
    for status, _, body in (plain, quart):
        assert status == 200
        assert json.loads(body)["state"] == "completed"
    # The same head but for the date and the length (of a document with other times);
    # the same document but for the session's own values.
    assert {**plain[1], "date": "", "content-length": ""} == {
        **quart[1],
        "date": "",
        "content-length": "",
    }
    assert plain[1]["content-type"] == "application/json"
    assert int(plain[1]["content-length"]) == len(plain[2])
    assert sorted(json.loads(plain[2])) == sorted(json.loads(quart[2]))


async def test_a_plain_refusal_is_answered_as_quart_answers_it() -> None:
    """Capacity 1 held and nobody may wait: 503 ``queue_timeout`` with ``Retry-After``,
    from the plain path."""
    import json

    with trio.fail_after(10):
        async with real_server(capacity=1, max_wait=0.0) as (app, base):
            holder = app.service.new_session(app.service.arrive(None), {"duration": 60})
            await app.service.start_session(holder, answer_now=True)
            served = counting_quart_requests(app)
            status, headers, body = await exchange(
                base, request_bytes("POST", "/sessions", jbody({"duration": 1}), JSON)
            )
            assert served == []
            # The same request through Quart (an unrelated preference sends it there).
            quart = await exchange(
                base,
                request_bytes(
                    "POST", "/sessions", jbody({"duration": 1}), {**JSON, "Prefer": "x=y"}
                ),
            )
            assert served == ["POST /sessions"]
            holder.cancel("cancelled")
    assert quart[0] == status == 503
    assert {**quart[1], "date": "", "content-length": ""} == {
        **headers,
        "date": "",
        "content-length": "",
    }
    assert int(headers["content-length"]) == len(body)
    assert json.loads(quart[2]).keys() == json.loads(body).keys()
    assert int(headers["retry-after"]) >= 1
    assert json.loads(body)["error"] == "queue_timeout"


@pytest.mark.parametrize(
    ("body", "headers", "status", "error"),
    [
        (b"{not json", JSON, 400, "invalid_json"),
        (jbody({"duration": -1}), JSON, 422, "invalid_request"),
        (jbody([1, 2]), JSON, 422, "invalid_request"),
        (jbody({"duration": 0}), {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        (jbody({"duration": 0}), {**JSON, "Content-Encoding": "gzip"}, 415, None),
        (jbody({"duration": 0}), {**JSON, "Prefer": "respond-async"}, 202, None),
    ],
    ids=["bad-json", "bad-duration", "not-an-object", "text", "encoded", "async"],
)
async def test_every_other_form_goes_to_quart(
    body: bytes, headers: dict[str, str], status: int, error: str | None
) -> None:
    import json

    with trio.fail_after(10):
        async with real_server() as (app, base):
            served = counting_quart_requests(app)
            got, _, answer = await exchange(base, request_bytes("POST", "/sessions", body, headers))
            assert served == ["POST /sessions"]
            assert app.service.gate.stats().active <= 1
    assert got == status
    if error is not None:
        assert json.loads(answer)["error"] == error


async def test_a_body_still_arriving_goes_to_quart_with_what_had_come() -> None:
    """Half the body with the head, the rest a moment later: nothing waits for it on the
    plain path; Quart gets the part already taken, then the rest, and serves it."""
    import json

    with trio.fail_after(10):
        async with real_server() as (app, base):
            served = counting_quart_requests(app)
            data = request_bytes("POST", "/sessions", jbody({"duration": 0}), JSON)
            stream = await raw_request(port_of(base), data[:-5])
            await trio.sleep(0.2)
            await stream.send_all(data[-5:])
            status, _, answer = await read_response(stream)
            await stream.aclose()
            assert served == ["POST /sessions"]
    assert status == 200
    assert json.loads(answer)["state"] == "completed"


async def test_an_unexpected_error_on_the_plain_path_is_a_json_500(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    async def broken(*_: Any) -> Any:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(_plain_create, "sync_answer", broken)
    with trio.fail_after(10), caplog.at_level(logging.ERROR, "sessiongate.web"):
        async with real_server() as (_, base):
            status, _, answer = await exchange(
                base, request_bytes("POST", "/sessions", jbody({"duration": 0}), JSON)
            )
    assert status == 500
    assert json.loads(answer) == {
        "error": "internal_error",
        "detail": "an unexpected error; see the server log",
    }
    assert "broken on purpose" in caplog.text
    assert "broken on purpose" not in answer.decode()


@pytest.mark.parametrize(
    "extra",
    ["before_request", "swapped_after_request", "signal", "early_signal", "max_content_length"],
)
async def test_an_app_given_more_to_do_around_requests_serves_them_all_through_quart(
    extra: str,
) -> None:
    """An embedder's own hook (added, or one of the factory's swapped), a receiver of
    Quart's request signals (connected even before the app was made) or its own body
    limit applies to every request: the plain form then goes to Quart too."""
    from quart.signals import request_started

    seen: list[str] = []

    async def note(*_: Any, **__: Any) -> Any:
        seen.append(extra)
        return __.get("response", _[0] if _ else None)

    if extra == "early_signal":
        request_started.connect(note)
    with trio.fail_after(10):
        async with real_server() as (app, base):
            served = counting_quart_requests(app)
            if extra == "before_request":
                app.before_request(note)
            elif extra == "swapped_after_request":
                app.after_request_funcs[None] = [note]
            elif extra == "signal":
                request_started.connect(note, app)
            elif extra == "max_content_length":
                app.config["MAX_CONTENT_LENGTH"] = 1000
            try:
                status, _, _ = await exchange(
                    base, request_bytes("POST", "/sessions", jbody({"duration": 0}), JSON)
                )
            finally:
                request_started.disconnect(note)
                request_started.disconnect(note, app)
            assert served == ["POST /sessions"]
    assert status == 200
    assert seen == ([] if extra == "max_content_length" else [extra])


def _scope(headers: list[tuple[bytes, bytes]], path: str = "/sessions") -> dict[str, Any]:
    return {"method": "POST", "path": path, "headers": headers}


CT = (b"content-type", b"application/json")


@pytest.mark.parametrize(
    ("scope", "length"),
    [
        (_scope([CT, (b"content-length", b"15")]), 15),
        (
            _scope(
                [
                    (b"content-type", b"application/vnd.x+json; charset=utf-8"),
                    (b"content-length", b"2"),
                ]
            ),
            2,
        ),
        (_scope([CT, (b"content-length", b"15")], path="/sessions/"), None),
        ({**_scope([CT, (b"content-length", b"15")]), "root_path": "/api"}, None),
        ({**_scope([CT, (b"content-length", b"15")]), "method": "PUT"}, None),
        (_scope([CT, (b"content-length", b"0")]), None),
        (_scope([CT, (b"content-length", b"65537")]), None),
        (_scope([CT, (b"content-length", b"99999999999999999999")]), None),
        (_scope([CT, (b"content-length", b"+15")]), None),
        (_scope([CT, (b"content-length", b"15"), (b"content-length", b"15")]), None),
        (_scope([CT, CT, (b"content-length", b"15")]), None),
        (_scope([(b"content-length", b"15")]), None),
        (_scope([(b"content-type", b"text/plain"), (b"content-length", b"15")]), None),
        (_scope([CT, (b"content-length", b"15"), (b"expect", b"100-continue")]), None),
        (_scope([CT, (b"content-length", b"15"), (b"prefer", b"respond-async")]), None),
        (_scope([CT, (b"content-length", b"15"), (b"content-encoding", b"identity")]), None),
        (_scope([CT, (b"transfer-encoding", b"chunked")]), None),
    ],
)
def test_what_counts_as_plain(scope: dict[str, Any], length: int | None) -> None:
    assert _plain_length(scope, 64 * 1024) == length


async def test_a_client_gone_before_its_request_was_served_cancels_its_session() -> None:
    """A client that sends a plain request and closes at once: by the time the app
    serves it, the server has already said the client is gone (before the plain path
    could listen for it); the session is cancelled all the same, its slot freed."""
    with trio.fail_after(10):
        async with real_server(capacity=1) as (app, base):
            stream = await raw_request(
                port_of(base),
                request_bytes("POST", "/sessions", jbody({"duration": 60}), JSON),
            )
            await stream.aclose()

            def ended() -> list[Any]:
                return [s for s in app.service.registry.ended.values()]

            await wait_for(app, ended)
            (record,) = ended()
            assert record.state == "cancelled"
            assert app.service.gate.stats().active == 0


async def test_an_http2_client_gone_while_its_answer_waits_for_its_window_is_let_go() -> None:
    """An HTTP/2 client that grants no flow-control window and then leaves: its answer
    can never be sent; the request is cancelled as the server reports the client gone,
    and the server closes the connection (it stayed open for good, its task waiting on
    the window: an outside review)."""
    import h2.config
    import h2.connection
    import h2.settings

    body = jbody({"duration": 0})
    with trio.fail_after(10):
        async with real_server() as (app, base):
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            client.initiate_connection()
            client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            h2_post(client, 1, body)
            stream = await raw_request(port_of(base), client.data_to_send())
            await wait_for(app, lambda: len(app.service.registry.ended) == 1)
            await stream.send_eof()  # gone, as far as the server can tell
            while await stream.receive_some():  # until the server closes its side
                pass
            await stream.aclose()
