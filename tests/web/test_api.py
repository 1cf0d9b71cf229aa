"""HTTP semantics through Quart's test client, on Trio's MockClock (autojump)."""

from __future__ import annotations

import json
import sys
from contextlib import aclosing
from typing import Any

import pytest
import trio
import trio.testing
from werkzeug.datastructures import Headers

import sessiongate
from sessiongate.web._errors import dumps
from sessiongate.web._sessions import SessionRecord
from sessiongate.web._sse import session_events

from .conftest import running

ASYNC = {"Prefer": "respond-async"}
AUTH = {"Authorization": "Bearer t"}
SESSION_KEYS = [
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
]


async def post(client: Any, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    response = await client.post(
        "/sessions", json=body if body is not None else {}, headers=headers
    )
    return response, await response.get_json()


async def session_ended(app: Any, session_id: str) -> None:
    """Wait until a session has ended (its record then leaves the live sessions)."""
    found = app.service.registry.get(session_id)
    if isinstance(found, SessionRecord):
        await found.done.wait()


async def stats(client: Any) -> dict[str, Any]:
    return await (await client.get("/stats")).get_json()  # type: ignore[no-any-return]


async def test_sync_session_completes_with_the_session_object(autojump_clock: Any) -> None:
    async with running(capacity=2) as app:
        client = app.test_client()
        start = trio.current_time()
        response, body = await post(client, {"duration": 2, "x": [1, 2]})
        assert response.status_code == 200
        assert list(body) == SESSION_KEYS
        assert body["state"] == "completed"
        assert body["result"] == {"data": {"duration": 2, "x": [1, 2]}}
        assert body["error"] is None and body["position"] is None and body["eta_s"] is None
        assert body["queued_s"] == 0.0 and body["active_s"] == 2.0
        assert body["ended_at"] - body["admitted_at"] == pytest.approx(2.0)
        assert trio.current_time() - start == 2.0
        assert len(body["id"]) >= 22  # 128 random bits, url-safe base64


async def test_default_duration_is_five_seconds(autojump_clock: Any) -> None:
    async with running() as app:
        start = trio.current_time()
        response, body = await post(app.test_client())
        assert response.status_code == 200
        assert body["result"] == {"data": {}}
        assert trio.current_time() - start == 5.0


async def test_cap_holds_and_admission_is_fifo(autojump_clock: Any) -> None:
    async with running(capacity=2) as app:
        client = app.test_client()
        start = trio.current_time()
        ids = []
        for _ in range(6):
            response, body = await post(client, {"duration": 10}, ASYNC)
            assert response.status_code == 202
            assert response.headers["Location"] == f"/sessions/{body['id']}"
            ids.append(body["id"])
        states = [(await (await client.get(f"/sessions/{i}")).get_json()) for i in ids]
        assert [s["state"] for s in states] == ["active"] * 2 + ["queued"] * 4
        assert [s["position"] for s in states] == [None, None, 1, 2, 3, 4]
        assert (await stats(client))["active"] == 2
        await trio.sleep(40)
        done = [(await (await client.get(f"/sessions/{i}")).get_json()) for i in ids]
        assert all(s["state"] == "completed" for s in done)
        admitted = [round(s["admitted_at"] - done[0]["admitted_at"], 6) for s in done]
        assert admitted == [0, 0, 10, 10, 20, 20]
        # Each hand-off: the successor is admitted at the instant its predecessor gave
        # the slot back, never before (stamps never show more than 2 at once).
        ends = sorted(s["ended_at"] for s in done[:4])
        assert [s["admitted_at"] for s in done[2:]] == pytest.approx(ends, abs=1e-6)
        assert all(
            b["admitted_at"] >= a["ended_at"] for a, b in zip(done[:4], done[2:], strict=True)
        )
        assert trio.current_time() - start == 40
        figures = await stats(client)
        assert (figures["active"], figures["queued"], figures["completed_total"]) == (0, 0, 6)


async def test_queued_session_expires_exactly_at_the_deadline(autojump_clock: Any) -> None:
    async with running(capacity=1, max_wait=3) as app:
        client = app.test_client()
        await post(client, {"duration": 100}, ASYNC)
        start = trio.current_time()
        response, body = await post(client, {"duration": 1})
        assert trio.current_time() - start == 3.0
        assert response.status_code == 503
        assert body == {"error": "queue_timeout", "detail": body["detail"], "waited_s": 3.0}
        assert response.headers["Retry-After"] == "1"  # no hand-off seen yet
        figures = await stats(client)
        assert figures["expired_total"] == 1 and figures["queued"] == 0


async def test_expired_async_session_is_readable(autojump_clock: Any) -> None:
    async with running(capacity=1, max_wait=2) as app:
        client = app.test_client()
        await post(client, {"duration": 100}, ASYNC)
        _, queued = await post(client, {}, ASYNC)
        assert queued["state"] == "queued" and queued["position"] == 1
        await trio.sleep(5)
        body = await (await client.get(f"/sessions/{queued['id']}")).get_json()
        assert body["state"] == "expired"
        assert body["error"]["error"] == "queue_timeout"
        assert body["queued_s"] == 2.0 and body["admitted_at"] is None
        assert body["ended_at"] - body["created_at"] == pytest.approx(2.0)


@pytest.mark.parametrize("headers", [None, ASYNC])
async def test_max_wait_zero_answers_queue_timeout_at_once(
    autojump_clock: Any, headers: dict[str, str] | None
) -> None:
    # Asynchronous too: a session that expired before it could be answered gets the
    # refusal, not a 202 for a session that will never run.
    async with running(capacity=1, max_wait=0) as app:
        client = app.test_client()
        await post(client, {"duration": 100}, ASYNC)
        start = trio.current_time()
        response, body = await post(client, {}, headers)
        assert response.status_code == 503 and body["error"] == "queue_timeout"
        assert body["waited_s"] == 0.0 and int(response.headers["Retry-After"]) >= 1
        assert trio.current_time() == start
        assert (await stats(client))["expired_total"] == 1


@pytest.mark.parametrize("settings", [{"max_queue": 0}, {"max_wait": 0}])
async def test_retry_after_where_nobody_queues_follows_the_slots_coming_back(
    autojump_clock: Any, settings: dict[str, Any]
) -> None:
    """With no queue (or no waiting) no slot is ever handed on: Retry-After said 1 for
    ever, and a client that honoured it was refused 3-4 times while a 4 s session held
    the slot (an outside review). It follows how fast a full gate's slots come back."""
    async with running(capacity=1, **settings) as app:
        client = app.test_client()

        async def retry_after() -> str:
            refused, _ = await post(client, {})
            assert refused.status_code == 503
            return str(refused.headers["Retry-After"])

        for round_ in range(3):
            response, body = await post(client, {"duration": 4}, ASYNC)
            assert response.status_code == 202 and body["state"] == "active"
            # 1 before any slot came back; then the pace of the sessions: one per 4 s,
            # counting down while the slot is held.
            assert await retry_after() == ("1" if round_ == 0 else "4")
            await trio.sleep(2)
            assert await retry_after() == ("1" if round_ == 0 else "2")
            await trio.sleep(2)
        # A slot held far longer than the sessions' pace: the estimate slows with it.
        await post(client, {"duration": 60}, ASYNC)
        assert await retry_after() == "4"
        await trio.sleep(30)
        assert int(await retry_after()) > 4


@pytest.mark.parametrize("refusal_status", [408, 429, 503])
async def test_a_408_refusal_closes_its_connection(
    autojump_clock: Any, refusal_status: int
) -> None:
    """RFC 9110 (15.5.9): a server sending 408 SHOULD close the connection; clients read
    it as "the connection timed out" (an outside review: the article's status kept it
    open). The other refusal statuses keep it."""
    async with running(capacity=1, max_wait=0, refusal_status=refusal_status) as app:
        client = app.test_client()
        await post(client, {"duration": 100}, ASYNC)
        response, body = await post(client, {})
        assert response.status_code == refusal_status and body["error"] == "queue_timeout"
        closes = response.headers.get("Connection") == "close"
        assert closes == (refusal_status == 408)


@pytest.mark.parametrize("headers", [None, ASYNC])
async def test_full_queue_is_refused_and_keeps_no_session(
    autojump_clock: Any, headers: dict[str, str] | None
) -> None:
    async with running(capacity=1, max_queue=1, refusal_status=429, admin_token="t") as app:
        client = app.test_client()
        await post(client, {"duration": 100}, ASYNC)
        await post(client, {"duration": 100}, ASYNC)
        response, body = await post(client, {}, headers)
        assert response.status_code == 429
        assert body["error"] == "queue_full" and set(body) == {"error", "detail"}
        assert int(response.headers["Retry-After"]) >= 1
        figures = await stats(client)
        assert (figures["rejected_total"], figures["queued"], figures["active"]) == (1, 1, 1)
        listed = await (
            await client.get("/sessions", headers={"Authorization": "Bearer t"})
        ).get_json()
        assert listed["count"] == 2


@pytest.mark.parametrize(
    "prefer",
    [
        "respond-async",
        "RESPOND-ASYNC",
        "wait=10, respond-async",
        "handling=lenient; x, respond-async",
    ],
)
async def test_prefer_respond_async_variants(autojump_clock: Any, prefer: str) -> None:
    async with running() as app:
        response, body = await post(app.test_client(), {"duration": 1}, {"Prefer": prefer})
        assert response.status_code == 202
        assert response.headers["Location"] == "/sessions/" + body["id"]


@pytest.mark.parametrize(
    "prefer",
    [
        'handling=lenient; note="a,respond-async;b"',  # inside another's quoted value
        "respond-asynchronously",
        "return=minimal",
    ],
)
async def test_no_respond_async_preference_is_synchronous(autojump_clock: Any, prefer: str) -> None:
    async with running() as app:
        response, body = await post(app.test_client(), {"duration": 1}, {"Prefer": prefer})
        assert response.status_code == 200 and body["state"] == "completed"


async def test_async_session_outlives_its_request(autojump_clock: Any) -> None:
    async with running() as app:
        client = app.test_client()
        response, body = await post(client, {"duration": 3, "k": "v"}, ASYNC)
        assert body["state"] == "active"  # a free slot: admitted before the answer
        await trio.sleep(3)
        final = await (await client.get(response.headers["Location"])).get_json()
        assert final["state"] == "completed" and final["result"] == {
            "data": {"duration": 3, "k": "v"}
        }


async def test_delete_queued_and_active_sessions(autojump_clock: Any) -> None:
    async with running(capacity=1) as app:
        client = app.test_client()
        _, active = await post(client, {"duration": 100}, ASYNC)
        _, queued = await post(client, {"duration": 100}, ASYNC)
        _, behind = await post(client, {"duration": 100}, ASYNC)
        response = await client.delete(f"/sessions/{queued['id']}")
        body = await response.get_json()
        assert response.status_code == 200
        assert body["state"] == "cancelled" and body["error"]["error"] == "cancelled"
        moved = await (await client.get(f"/sessions/{behind['id']}")).get_json()
        assert moved["position"] == 1
        start = trio.current_time()
        response = await client.delete(f"/sessions/{active['id']}")
        assert (await response.get_json())["state"] == "cancelled"
        assert trio.current_time() == start  # the slot is freed at once
        admitted = await (await client.get(f"/sessions/{behind['id']}")).get_json()
        assert admitted["state"] == "active"
        again = await client.delete(f"/sessions/{active['id']}")
        assert again.status_code == 409
        assert (await again.get_json())["error"] == "already_ended"
        unknown = await client.delete("/sessions/nope")
        assert unknown.status_code == 404 and (await unknown.get_json())["error"] == "not_found"
        figures = await stats(client)
        assert figures["cancelled_total"] == 2 and figures["active"] == 1


@pytest.mark.parametrize("holds_on", [False, True])
async def test_sync_caller_of_a_deleted_session_gets_409_cancelled(
    autojump_clock: Any, sample_handlers: str, holds_on: bool
) -> None:
    """Also when the handler holds on through its cancellation (it answered 409
    already_ended, completed, once the handler returned: an outside review)."""
    handler = f"{sample_handlers}:ignores_cancellation" if holds_on else "sleep"
    async with running(capacity=1, admin_token="t", handler=handler) as app:
        client = app.test_client()
        results: list[Any] = []

        async def caller() -> None:
            results.append(await post(client, {"duration": 1 if holds_on else 100}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            listed = await (
                await client.get("/sessions", headers={"Authorization": "Bearer t"})
            ).get_json()
            (session,) = listed["sessions"]
            await client.delete(f"/sessions/{session['id']}")
        response, body = results[0]
        assert response.status_code == 409 and body["error"] == "cancelled"


async def test_resize_grows_and_shrinks_live(autojump_clock: Any) -> None:
    auth = {"Authorization": "Bearer secret"}
    async with running(capacity=1, admin_token="secret") as app:
        client = app.test_client()
        ids = [(await post(client, {"duration": 10}, ASYNC))[1]["id"] for _ in range(3)]
        response = await client.put("/admin/capacity", json={"capacity": 3}, headers=auth)
        assert response.status_code == 200
        figures = await response.get_json()
        assert figures["capacity"] == 3
        await trio.testing.wait_all_tasks_blocked()
        states = [(await (await client.get(f"/sessions/{i}")).get_json())["state"] for i in ids]
        assert states == ["active"] * 3
        response = await client.put("/admin/capacity", json={"capacity": 1}, headers=auth)
        figures = await response.get_json()
        assert (figures["capacity"], figures["active"]) == (1, 3)  # nobody is killed
        # Out of range too: past 10**9 (a 400-digit capacity once broke /metrics).
        bad_values: list[Any] = [0, "2", True, 10**9 + 1, 10**400, 2.5]
        for bad in [*({"capacity": v} for v in bad_values), {}]:
            response = await client.put("/admin/capacity", json=bad, headers=auth)
            assert response.status_code == 422
            assert (await response.get_json())["error"] == "invalid_request"
        assert (await stats(client))["capacity"] == 1
        assert (await client.get("/metrics")).status_code == 200


BAD_INPUT = [
    (b"{", "application/json", 400, "invalid_json"),
    # JSON must be UTF-8 (RFC 8259 8.1): json.loads would guess UTF-16 and UTF-32.
    ('{"duration": 0}'.encode("utf-16"), "application/json", 400, "invalid_json"),
    ('{"duration": 0}'.encode("utf-32-le"), "application/json", 400, "invalid_json"),
    (b"NaN", "application/json", 400, "invalid_json"),
    (b'{"a": Infinity}', "application/json", 400, "invalid_json"),
    (b'{"a": -Infinity}', "application/json", 400, "invalid_json"),
    (b"\xff\xfe{}", "application/json", 400, "invalid_json"),
    (b"[1, 2]", "application/json", 422, "invalid_request"),
    (b'"text"', "application/json", 422, "invalid_request"),
    (b"null", "application/json", 422, "invalid_request"),
    (b'{"duration": -1}', "application/json", 422, "invalid_request"),
    (b'{"duration": 3601}', "application/json", 422, "invalid_request"),
    (b'{"duration": "5"}', "application/json", 422, "invalid_request"),
    (b'{"duration": true}', "application/json", 422, "invalid_request"),
    (b'{"duration": 1e400}', "application/json", 422, "invalid_request"),
    # Valid JSON that Python will not take: out of range, not malformed.
    (b'{"n": ' + b"9" * 5000 + b"}", "application/json", 422, "invalid_request"),
    (b"[" * 5000 + b"]" * 5000, "application/json", 422, "invalid_request"),
    (b"{}", "text/plain", 415, "unsupported_media_type"),
    (b"{}", "", 415, "unsupported_media_type"),
    (b"{}", "application/jsonx", 415, "unsupported_media_type"),
    (b"x" * 70_000, "application/json", 413, "body_too_large"),
]


@pytest.mark.parametrize(("data", "content_type", "status", "code"), BAD_INPUT)
async def test_bad_input_never_creates_a_session(
    autojump_clock: Any, data: bytes, content_type: str, status: int, code: str
) -> None:
    async with running(capacity=1, admin_token="t") as app:
        client = app.test_client()
        before = await stats(client)
        headers = {"Content-Type": content_type} if content_type else {}
        response = await client.post("/sessions", data=data, headers=headers)
        body = await response.get_json()
        assert response.status_code == status
        assert body == {"error": code, "detail": body["detail"]}
        assert await stats(client) == before
        listed = await (
            await client.get("/sessions", headers={"Authorization": "Bearer t"})
        ).get_json()
        assert listed == {"sessions": [], "count": 0}


@pytest.mark.parametrize(
    "headers",
    [
        # Two Content-Types: the first read decided (200 one way round, 415 the other).
        [("Content-Type", "application/json"), ("Content-Type", "text/plain")],
        [("Content-Type", "text/plain"), ("Content-Type", "application/json")],
        # A content coding is not decoded: a gzip body was answered invalid_json, and
        # plain JSON labelled br was taken (outside review).
        [("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
        [("Content-Type", "application/json"), ("Content-Encoding", "identity, br")],
    ],
)
async def test_two_media_types_or_an_encoded_body_are_415(
    autojump_clock: Any, headers: list[tuple[str, str]]
) -> None:
    async with running(capacity=1) as app:
        client = app.test_client()
        before = await stats(client)
        response = await client.post("/sessions", data=b"{}", headers=Headers(headers))
        assert response.status_code == 415
        assert (await response.get_json())["error"] == "unsupported_media_type"
        assert await stats(client) == before
        plain = Headers([("Content-Type", "application/json"), ("Content-Encoding", "identity")])
        accepted = await client.post("/sessions", data=b'{"duration": 0}', headers=plain)
        assert accepted.status_code == 200


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/merge-patch+json",
        "Application/JSON",
    ],
)
async def test_json_media_types_are_accepted(autojump_clock: Any, content_type: str) -> None:
    async with running() as app:
        response = await app.test_client().post(
            "/sessions", data=b'{"duration": 0}', headers={"Content-Type": content_type}
        )
        assert response.status_code == 200


@pytest.mark.parametrize(
    "content_type",
    # No name before the +json suffix, a wildcard, no type: no media types at all.
    ["application/+json", "*/+json", "*/json", "/json", "application/json/x", "text/json"],
)
async def test_malformed_json_media_types_are_415(autojump_clock: Any, content_type: str) -> None:
    async with running() as app:
        response = await app.test_client().post(
            "/sessions", data=b'{"duration": 0}', headers={"Content-Type": content_type}
        )
        assert response.status_code == 415
        assert (await response.get_json())["error"] == "unsupported_media_type"


async def test_any_json_string_is_echoed_even_one_utf8_cannot_carry(autojump_clock: Any) -> None:
    # A lone surrogate is valid JSON (RFC 8259 §8.2) but not UTF-8: answers are ASCII
    # JSON, so it comes back as the escape it came in as, never as a 500.
    async with running() as app:
        client = app.test_client()
        data = '{"lone": "\\ud800", "accent": "é", "duration": 0}'.encode()
        headers = {"Content-Type": "application/json"}
        response = await client.post("/sessions", data=data, headers=headers)
        assert response.status_code == 200
        raw = await response.get_data()
        assert b"\\ud800" in raw and b"\\u00e9" in raw
        result = (await response.get_json())["result"]["data"]
        assert result == {"lone": "\ud800", "accent": "é", "duration": 0}
        response = await client.post("/sessions", data=data, headers={**headers, **ASYNC})
        session_id = (await response.get_json())["id"]
        await session_ended(app, session_id)
        response = await client.get(f"/sessions/{session_id}")
        assert response.status_code == 200
        assert (await response.get_json())["result"]["data"]["lone"] == "\ud800"


async def test_a_service_that_stopped_serving_is_not_ready(autojump_clock: Any) -> None:
    async with running() as app:
        client = app.test_client()
        assert (await client.get("/readyz")).status_code == 200
        app.service._closed = True  # as when its sessions nursery is gone
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert (await response.get_json())["error"] == "shutting_down"
        app.service._closed = False


async def test_empty_body_is_an_empty_object_whatever_its_type(autojump_clock: Any) -> None:
    async with running() as app:
        response = await app.test_client().post(
            "/sessions", data=b"", headers={"Content-Type": "text/plain"}
        )
        body = await response.get_json()
        assert response.status_code == 200 and body["result"] == {"data": {}}


async def test_max_duration_bounds_the_sleep(autojump_clock: Any) -> None:
    async with running(max_duration=10) as app:
        response, _ = await post(app.test_client(), {"duration": 10.5})
        assert response.status_code == 422
        response, _ = await post(app.test_client(), {"duration": 10})
        assert response.status_code == 200

    async with running(max_duration=1) as app:
        start = trio.current_time()
        response, body = await post(app.test_client(), {})  # the default 5 s, lowered
        assert response.status_code == 200
        assert body["active_s"] == pytest.approx(1.0, abs=0.01)
        assert trio.current_time() - start == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/sessions"),
        ("PUT", "/admin/capacity"),
        ("GET", "/admin/nothing-here"),
        ("POST", "/admin"),
    ],
)
async def test_admin_paths_without_a_configured_token_are_forbidden(
    autojump_clock: Any, method: str, path: str
) -> None:
    async with running() as app:
        client = app.test_client()
        for headers in ({}, {"Authorization": "Bearer anything"}):
            response = await client.open(path, method=method, headers=headers, json={})
            assert response.status_code == 403
            assert (await response.get_json())["error"] == "forbidden"


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/sessions", 200),
        ("PUT", "/admin/capacity", 200),
        ("GET", "/admin/x", 404),
        ("GET", "/admin/capacity", 405),
    ],
)
async def test_admin_token_is_checked_before_routing(
    autojump_clock: Any, method: str, path: str, expected: int
) -> None:
    async with running(admin_token="s3cret") as app:
        client = app.test_client()
        body = {"capacity": 2}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic s3cret"},
            {"Authorization": "Bearer s3cret-and-more"},
        ):
            response = await client.open(path, method=method, headers=headers, json=body)
            assert response.status_code == 401, headers
            assert (await response.get_json())["error"] == "unauthorized"
        good = {"Authorization": "Bearer s3cret"}
        response = await client.open(path, method=method, headers=good, json=body)
        assert response.status_code == expected
        # Two Authorization headers, whichever comes first: which one was meant is unknown.
        for pair in (["Bearer s3cret", "Bearer wrong"], ["Bearer wrong", "Bearer s3cret"]):
            twice = Headers([("Authorization", value) for value in pair])
            response = await client.open(path, method=method, headers=twice, json=body)
            assert response.status_code == 401, pair


async def test_list_sessions_filters_limits_and_orders(autojump_clock: Any) -> None:
    auth = {"Authorization": "Bearer t"}
    async with running(capacity=2, admin_token="t") as app:
        client = app.test_client()
        ids = [(await post(client, {"duration": 50}, ASYNC))[1]["id"] for _ in range(5)]

        async def listing(query: str) -> Any:
            response = await client.get("/sessions" + query, headers=auth)
            return response.status_code, await response.get_json()

        status, body = await listing("")
        assert status == 200 and body["count"] == 5
        assert [s["id"] for s in body["sessions"]] == ids
        _, body = await listing("?state=active")
        assert [s["id"] for s in body["sessions"]] == ids[:2]
        _, body = await listing("?state=queued&limit=2")
        assert [s["id"] for s in body["sessions"]] == ids[2:4] and body["count"] == 2
        for query in (
            "?state=completed",
            "?state=",
            "?limit=0",
            "?limit=1001",
            "?limit=x",
            "?limit=%2B5",
            "?limit=%205",
            "?limit=5_0",
            "?limit=%D9%A5",  # an Arabic-Indic five
            "?state=queued&state=bogus",  # given twice: the second is not ignored
            "?limit=1&limit=5000",
        ):
            status, body = await listing(query)
            assert status == 422 and body["error"] == "invalid_request", query
        status, body = await listing("?limit=1000")
        assert status == 200
        # Leading zeros are read as the number, whatever their count (an outside review:
        # "0001" was taken and "00001" refused, by length).
        for query in ("?limit=0001", "?limit=00001", "?limit=" + "0" * 5000 + "2"):
            status, body = await listing(query)
            assert status == 200 and body["count"] == min(5, int(query[7:].lstrip("0"))), query
        for query in ("?limit=01001", "?limit=00000", "?limit=" + "0" * 5000 + "7" * 5000):
            status, body = await listing(query)
            assert status == 422, query


async def test_ended_sessions_expire_after_the_result_ttl(autojump_clock: Any) -> None:
    async with running(result_ttl=10) as app:
        client = app.test_client()
        _, body = await post(client, {"duration": 1})
        await trio.sleep(9.5)
        assert (await client.get(f"/sessions/{body['id']}")).status_code == 200
        await trio.sleep(1)
        response = await client.get(f"/sessions/{body['id']}")
        assert response.status_code == 404


async def test_ended_sessions_are_forgotten_on_a_quiet_server_too(autojump_clock: Any) -> None:
    """Past --result-ttl an ended session's result is freed though nothing reads or ends
    any more: it went only at the next read or session end, so a server gone quiet held up
    to --result-max results for ever (an outside soak test)."""
    async with running(result_ttl=10) as app:
        client = app.test_client()
        for duration in (1, 3):
            await post(client, {"duration": duration}, ASYNC)
        ended = app.service.registry.ended
        await trio.sleep(3.5)
        assert len(ended) == 2
        # Freed within a second of its time (the sweeper batches its wakes).
        await trio.sleep(8.75)  # t=12.25: the first one's time is up, not the second's
        assert len(ended) == 1
        await trio.sleep(2)  # t=14.25
        assert not ended
        await post(client, {"duration": 0})  # kept again after the store was empty
        assert len(ended) == 1
        await trio.sleep(10.5)
        assert len(ended) == 1  # its time is up; the sweeper's second is not
        await trio.sleep(1)
        assert not ended


async def test_at_most_result_max_ended_sessions_are_kept(autojump_clock: Any) -> None:
    async with running(result_max=2) as app:
        client = app.test_client()
        ids = [(await post(client, {"duration": 0}))[1]["id"] for _ in range(3)]
        codes = [(await client.get(f"/sessions/{i}")).status_code for i in ids]
        assert codes == [404, 200, 200]
        assert len(app.service.registry.ended) == 2


async def test_an_expired_sessions_document_is_encoded_when_the_loop_is_idle(
    autojump_clock: Any,
) -> None:
    """A session that ended without a result keeps its final document, encoded when the
    loop is next idle, not as it ends (under overload a few hundred expire at once and
    each is answered with its error); one read before that is encoded then, the same."""
    async with running(capacity=1, max_wait=1) as app:
        service = app.service
        registry = service.registry
        first = service.new_session(service.arrive(), {"duration": 60})
        second = service.new_session(service.arrive(), {"duration": 0})
        for record in (first, second):
            registry.add(record)
            service._end(record, "expired", error={"error": "queue_timeout", "detail": "x"})
            kept = registry.ended[record.id]
            assert kept._document is None and record.document is None  # not yet
            assert record.body == {}  # held until then, but not its request body
        # Read before the loop was idle: encoded now, as it would have been at its end.
        assert registry.get(first.id).encode(service.gate) == dumps(first.to_json(service.gate))
        await trio.sleep(0.001)  # the loop is idle for a moment
        for record in (first, second):
            kept = registry.ended[record.id]
            assert kept._encode is None  # the live record is no longer held
            document = json.loads(kept.document)
            assert (document["id"], document["state"]) == (record.id, "expired")
            assert document["error"] == {"error": "queue_timeout", "detail": "x"}
        response = await app.test_client().get(f"/sessions/{second.id}")
        assert (await response.get_json())["state"] == "expired"


async def test_a_completed_sessions_document_is_encoded_as_it_ends(autojump_clock: Any) -> None:
    """A completed session's document is its synchronous caller's answer, and holds the
    handler's result as it was returned: encoded at once."""
    async with running() as app:
        service = app.service
        record = service.new_session(service.arrive(), {"duration": 0})
        service.registry.add(record)
        result = {"data": [1]}
        service._end(record, "completed", result=result)
        result["data"].append(2)  # changed after the end: not in the document
        kept = service.registry.ended[record.id]
        assert kept._document is not None and kept._document == record.document
        assert json.loads(kept.document)["result"] == {"data": [1]}


async def test_retry_after_and_eta_come_from_the_hand_off_rate(autojump_clock: Any) -> None:
    async with running(capacity=1, max_queue=3) as app:
        client = app.test_client()
        for _ in range(4):  # one active, three queued; a hand-off every 2 s
            await post(client, {"duration": 2}, ASYNC)
        await trio.sleep(4.5)  # two hand-offs, at t=2 and t=4
        gate = app.service.gate
        assert gate.handoff_rate() is not None
        listed = [s for s in app.service.registry.list_live("queued", 10)]
        (queued,) = listed
        body = await (await client.get(f"/sessions/{queued.id}")).get_json()
        assert body["position"] == 1
        assert body["eta_s"] == pytest.approx(gate.estimate_wait(1))
        await post(client, {"duration": 2}, ASYNC)
        await post(client, {"duration": 2}, ASYNC)
        response, refusal = await post(client, {"duration": 2})
        assert refusal["error"] == "queue_full"
        expected = gate.estimate_wait(gate.queued + 1)
        assert expected is not None and expected > 1
        assert int(response.headers["Retry-After"]) == int(-(-expected // 1))


async def test_handler_errors_fail_the_session_cleanly(
    autojump_clock: Any, sample_handlers: str
) -> None:
    # Any BaseException from a handler (SystemExit, KeyboardInterrupt, GeneratorExit, a
    # subclass of its own, a group of them) is its own failure too: it must not take the
    # sessions nursery (and with it the service) down.
    names = ("boom", "sync_boom", "not_json", "nan", "exits", "sync_interrupt")
    names += ("generator_exit", "sync_odd_base", "odd_base_group")
    # A trio.Cancelled that no cancellation delivered (outside review: it stopped the
    # service for good, every later session refused as shutting_down).
    names += ("raises_cancelled", "sync_raises_cancelled", "raises_cancelled_group")
    # A handler's own gate refusing it (QueueFull, QueueTimeout...) is its failure too:
    # it was reported as this gate's refusal, an async one forgotten (404) after its 202.
    names += ("own_queue_full", "own_queue_timeout", "own_gate_closed")
    names += ("own_admission_error", "sync_own_lease_lost")
    for name in names:
        async with running(handler=f"{sample_handlers}:{name}", capacity=1) as app:
            client = app.test_client()
            response, body = await post(client, {})
            assert response.status_code == 500
            assert body["error"] == "session_failed"
            assert "secret" not in body["detail"] and "Traceback" not in body["detail"]
            _, second = await post(client, {}, ASYNC)
            await session_ended(app, second["id"])
            record = await (await client.get(f"/sessions/{second['id']}")).get_json()
            assert record["state"] == "failed" and record["error"]["error"] == "session_failed"
            figures = await stats(client)
            assert (figures["failed_total"], figures["active"]) == (2, 0), name


async def test_user_handlers_async_and_threaded(autojump_clock: Any, sample_handlers: str) -> None:
    async with running(handler=f"{sample_handlers}:echo") as app:
        response, body = await post(app.test_client(), {"a": 1})
        assert body["result"] == {"echo": {"a": 1}, "id": body["id"], "waited": 0.0}
    async with running(handler=f"{sample_handlers}:sync_echo", thread_limit=1) as app:
        response, body = await post(app.test_client(), {"b": 2})
        assert response.status_code == 200
        assert body["result"] == {"thread": True, "body": {"b": 2}}


async def test_handler_lifespan_is_entered_once(autojump_clock: Any, sample_handlers: str) -> None:
    import importlib

    async with running(handler=f"{sample_handlers}:with_resource") as app:
        module = importlib.import_module(sample_handlers)
        client = app.test_client()
        for _ in range(3):
            _, body = await post(client, {})
            assert body["result"] == {"resource": "pool"}
        assert module.RESOURCE["opened"] == 1
    assert module.RESOURCE["value"] is None


async def test_unknown_routes_and_methods_answer_json(autojump_clock: Any) -> None:
    async with running() as app:
        client = app.test_client()
        response = await client.get("/nowhere")
        assert response.status_code == 404
        assert (await response.get_json())["error"] == "not_found"
        response = await client.patch("/sessions")
        assert response.status_code == 405
        assert (await response.get_json())["error"] == "method_not_allowed"
        assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
        response = await client.post("/stats")
        assert response.status_code == 405 and "GET" in response.headers["Allow"]
        response = await client.get("/sessions/unknown-id")
        assert response.status_code == 404
        response = await client.get("/sessions/unknown-id/events")
        assert response.status_code == 404


async def test_stats_and_metrics(autojump_clock: Any) -> None:
    async with running(capacity=3, max_wait=7, max_queue=9) as app:
        client = app.test_client()
        figures = await stats(client)
        assert figures == {
            "capacity": 3,
            "active": 0,
            "queued": 0,
            "max_wait_s": 7.0,
            "max_queue": 9,
            "admitted_total": 0,
            "completed_total": 0,
            "failed_total": 0,
            "expired_total": 0,
            "rejected_total": 0,
            "cancelled_total": 0,
            "wait_p50_s": None,
            "wait_p90_s": None,
            "wait_p99_s": None,
        }
        await post(client, {"duration": 1})
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = (await response.get_data()).decode()
        assert "sessiongate_capacity 3.0" in text
        assert 'sessiongate_sessions_total{outcome="completed"} 1.0' in text
        assert "sessiongate_queue_wait_seconds_count 1.0" in text
        assert "sessiongate_session_run_seconds_sum 1.0" in text
        assert 'sessiongate_refusals_total{reason="queue_full"} 0.0' in text
        # No prometheus-client "_created" series: gauges of a Unix time under the
        # counters' help text, read as counts (outside review).
        assert "_created" not in text
        # The format the scraper asks for: the classic text format unless it asks for
        # another (every answer said version=1.0.0, one asking for 0.0.4 included).
        for accept, kind in [
            ("", "text/plain; version=0.0.4"),
            ("text/plain;version=0.0.4", "text/plain; version=0.0.4"),
            ("application/openmetrics-text;version=1.0.0", "application/openmetrics-text"),
            # Refused (q=0), or liked less: the classic format (it took the OpenMetrics).
            ("application/openmetrics-text;q=0, text/plain", "text/plain; version=0.0.4"),
            (
                "text/plain;version=0.0.4;q=1, application/openmetrics-text;version=1.0.0;q=0.1",
                "text/plain; version=0.0.4",
            ),
            # A version that is no number: the classic format, not a 500 (it raised).
            ("application/openmetrics-text; version=abc", "text/plain; version=0.0.4"),
            ("text/plain; version=1.x", "text/plain; version=0.0.4"),
        ]:
            answer = await client.get("/metrics", headers={"Accept": accept} if accept else {})
            assert answer.headers["Content-Type"].startswith(kind), accept
            body = (await answer.get_data()).decode()
            assert "sessiongate_capacity 3" in body
            assert body.endswith("# EOF\n") == kind.startswith("application/openmetrics")
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        # The queue wait is observed at admission, as /stats counts it: a session still
        # running is in it already.
        _, running_session = await post(client, {"duration": 30}, ASYNC)
        text = (await (await client.get("/metrics")).get_data()).decode()
        assert "sessiongate_queue_wait_seconds_count 2.0" in text
        # This process's share, beside the gauges that are global in Redis mode.
        assert "sessiongate_local_active_sessions 1.0" in text
        assert "sessiongate_local_queued_sessions 0.0" in text
        assert (await stats(client))["admitted_total"] == 2
        assert running_session["state"] == "active"


async def test_drain_rejects_queued_and_cuts_active_at_the_grace(autojump_clock: Any) -> None:
    async with running(capacity=2, shutdown_grace=10) as app:
        client = app.test_client()
        _, short = await post(client, {"duration": 5}, ASYNC)
        results: list[Any] = []

        async def sync_long() -> None:
            results.append(await post(client, {"duration": 100}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync_long)
            await trio.testing.wait_all_tasks_blocked()
            _, queued = await post(client, {"duration": 1}, ASYNC)
            start = trio.current_time()
            nursery.start_soon(app.service.drain)
            await trio.testing.wait_all_tasks_blocked()
            body = await (await client.get(f"/sessions/{queued['id']}")).get_json()
            assert body["state"] == "rejected" and body["error"]["error"] == "shutting_down"
            response, refusal = await post(client, {})
            assert response.status_code == 503 and refusal["error"] == "shutting_down"
            assert response.headers["Retry-After"]
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert (await ready.get_json())["error"] == "shutting_down"
            assert int(ready.headers["Retry-After"]) >= 1  # as every shutting_down answer
            assert (await client.get("/healthz")).status_code == 200
        assert trio.current_time() - start == 10.0
        response, body = results[0]
        assert response.status_code == 503 and body["error"] == "shutting_down"
        done = await (await client.get(f"/sessions/{short['id']}")).get_json()
        assert done["state"] == "completed"
        figures = await stats(client)
        assert (figures["active"], figures["queued"]) == (0, 0)
        assert figures["rejected_total"] == 2 and figures["cancelled_total"] == 1


async def test_one_log_line_per_session_end(
    autojump_clock: Any, sample_handlers: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="sessiongate.web")
    async with running(capacity=1, max_wait=1) as app:
        client = app.test_client()
        _, done = await post(client, {"duration": 2})
        await post(client, {"duration": 5}, ASYNC)
        await post(client, {})  # expires after 1 s
    ends = [r for r in caplog.records if r.getMessage().startswith("session ")]
    assert len(ends) == 3
    assert ends[0].getMessage() == f"session {done['id']} completed waited=0.000s ran=2.000s"
    assert "expired (queue_timeout) waited=1.000s ran=0.000s" in ends[1].getMessage()
    caplog.clear()
    async with running(handler=f"{sample_handlers}:boom") as app:
        response, body = await post(app.test_client(), {})
        assert response.status_code == 500 and "secret" not in str(body)
    (failed,) = [r for r in caplog.records if r.getMessage().startswith("session ")]
    assert failed.levelname == "ERROR" and "failed (session_failed)" in failed.getMessage()
    assert failed.exc_info is not None and "secret internal detail" in str(failed.exc_info[1])


async def test_threads_are_limited_and_a_cancelled_thread_frees_its_slot(
    sample_handlers: str,
) -> None:
    import importlib

    module = importlib.import_module(sample_handlers)
    module.STARTED.clear()
    module.RELEASE.clear()
    with trio.fail_after(10):
        async with running(
            handler=f"{sample_handlers}:blocking", capacity=2, thread_limit=1
        ) as app:
            client = app.test_client()
            _, first = await post(client, {}, ASYNC)
            _, second = await post(client, {}, ASYNC)
            await trio.to_thread.run_sync(module.STARTED.wait)
            assert app.service.gate.stats().active == 2  # the second waits for a thread
            response = await client.delete(f"/sessions/{first['id']}")
            assert (await response.get_json())["state"] == "cancelled"
            assert app.service.gate.stats().active == 1  # freed while its thread still runs
            module.RELEASE.set()
            await session_ended(app, second["id"])
            done = await (await client.get(f"/sessions/{second['id']}")).get_json()
            assert done["state"] == "completed" and done["result"] == "released"


@pytest.mark.parametrize("hold", [1.0, 3.0])
async def test_delete_of_a_session_that_ignores_cancellation(
    autojump_clock: Any, sample_handlers: str, hold: float
) -> None:
    """DELETE of an active session whose handler holds on (a shielded wait, an
    uninterruptible thread): it waited for the handler and answered 409 already_ended
    (completed) once it returned (an outside review). Now the DELETE wins: answered 200
    cancelled within 1.5 s at most; the slot stays taken until the handler returns, so
    the cap holds."""
    async with running(handler=f"{sample_handlers}:ignores_cancellation", capacity=1) as app:
        client = app.test_client()
        _, body = await post(client, {"duration": hold}, ASYNC)
        _, waiting = await post(client, {"duration": 0}, ASYNC)
        start = trio.current_time()
        response = await client.delete(f"/sessions/{body['id']}")
        deleted = await response.get_json()
        assert response.status_code == 200 and deleted["state"] == "cancelled"
        assert deleted["error"]["error"] == "cancelled" and deleted["result"] is None
        assert trio.current_time() - start == pytest.approx(min(hold, 1.5))
        # Until the handler returns, its slot is taken: the next one still waits.
        waited = await (await client.get(f"/sessions/{waiting['id']}")).get_json()
        assert waited["state"] == ("queued" if hold > 1.5 else "completed")
        await session_ended(app, waiting["id"])
        assert trio.current_time() - start == pytest.approx(hold)
        again = await (await client.get(f"/sessions/{body['id']}")).get_json()
        assert again["state"] == "cancelled" and again["result"] is None  # not overwritten
        figures = await stats(client)
        assert figures["cancelled_total"] == 1 and figures["completed_total"] == 1
        assert figures["active"] == 0


async def test_head_of_an_event_stream_does_not_follow_the_session(autojump_clock: Any) -> None:
    async with running() as app:
        client = app.test_client()
        _, body = await post(client, {"duration": 100}, ASYNC)
        start = trio.current_time()
        response = await client.head(f"/sessions/{body['id']}/events")
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert trio.current_time() == start
        # The headers a GET has (over a real socket, no Content-Length either: see
        # test_real); the test client adds one of its own.
        assert response.headers["Cache-Control"] == "no-cache"
        assert await response.get_data() == b""


async def test_a_lost_lease_fails_the_session_with_lease_lost(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backend that could not keep the slot's lease (Redis: tests/redis) raises
    # LeaseLost out of the session's exit; simulated here on the in-memory one.
    from sessiongate.backends import memory

    release = memory._Hold.__aexit__

    async def lose_the_lease(self: Any, *exc_info: Any) -> None:
        await release(self, *exc_info)
        raise sessiongate.LeaseLost("the lease lapsed")

    monkeypatch.setattr(memory._Hold, "__aexit__", lose_the_lease)
    async with running(refusal_status=429) as app:
        client = app.test_client()
        response, body = await post(client, {})
        assert response.status_code == 429 and body["error"] == "lease_lost"
        assert int(response.headers["Retry-After"]) >= 1
        _, queued = await post(client, {}, ASYNC)
        await session_ended(app, queued["id"])
        record = await (await client.get(f"/sessions/{queued['id']}")).get_json()
        assert record["state"] == "failed" and record["error"]["error"] == "lease_lost"


async def test_concurrent_arrivals_are_admitted_in_arrival_order(autojump_clock: Any) -> None:
    async with running(capacity=1, max_wait=1000) as app:
        client = app.test_client()
        await post(client, {"duration": 1}, ASYNC)
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(post, client, {"duration": 1})
            await trio.testing.wait_all_tasks_blocked()
            records = sorted(app.service.registry.live.values(), key=lambda r: r.arrival.seq)
        assert len(records) == 21 and all(r.state == "completed" for r in records)
        admitted = [r.admitted_at for r in records]
        assert admitted == sorted(admitted) and len(set(admitted)) == 21
        assert admitted[-1] - admitted[0] == 20.0  # no slot ever idle


async def test_a_session_cancelled_before_its_task_ran_never_runs(autojump_clock: Any) -> None:
    async with running() as app:
        service = app.service
        record = service.new_session(service.arrive(), {"duration": 100})
        assert record.cancel("client_disconnected")
        start = trio.current_time()
        await service.start_session(record)
        await record.done.wait()
        assert trio.current_time() == start
        assert record.state == "cancelled" and record.error_code == "client_disconnected"
        assert record.admitted_at is None
        stats = service.gate.stats()
        assert (stats.active, stats.queued, stats.admitted, stats.cancelled) == (0, 0, 0, 1)


async def post_uploading_slowly(
    client: Any, body: bytes, delay: float, headers: dict[str, str]
) -> tuple[Any, Any]:
    """POST /sessions whose head arrives now and whose body arrives ``delay`` s later."""
    async with client.request(
        "/sessions", method="POST", headers={"Content-Type": "application/json", **headers}
    ) as connection:
        await trio.sleep(delay)
        await connection.send(body)
        await connection.send_complete()
        response = await connection.as_response()
    return response, await response.get_json()


async def test_place_and_deadline_count_from_the_requests_head(autojump_clock: Any) -> None:
    # SPEC: "a session's place is fixed by an arrival stamp taken when its request
    # reaches the app". A request whose head came first is ahead of one that came while
    # its body was on the way, and its queue deadline started with its head.
    async with running(capacity=1, max_wait=10) as app:
        client = app.test_client()
        await post(client, {"duration": 100}, ASYNC)  # holds the only slot
        start = trio.current_time()
        answers: dict[str, Any] = {}

        async def slow() -> None:
            answers["slow"] = await post_uploading_slowly(client, b'{"duration": 1}', 4, ASYNC)

        async def quick() -> None:
            await trio.sleep(2)
            answers["quick"] = await post(client, {"duration": 1}, ASYNC)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            nursery.start_soon(quick)
        slow_id, quick_id = answers["slow"][1]["id"], answers["quick"][1]["id"]
        assert answers["slow"][1]["position"] == 1
        assert (await (await client.get(f"/sessions/{quick_id}")).get_json())["position"] == 2
        await trio.sleep_until(start + 10.5)
        slow_now = await (await client.get(f"/sessions/{slow_id}")).get_json()
        assert slow_now["state"] == "expired"
        assert slow_now["ended_at"] - slow_now["created_at"] == pytest.approx(10.0)
        quick_now = await (await client.get(f"/sessions/{quick_id}")).get_json()
        assert quick_now["state"] == "queued" and quick_now["position"] == 1
        await trio.sleep_until(start + 12.5)
        quick_now = await (await client.get(f"/sessions/{quick_id}")).get_json()
        assert quick_now["state"] == "expired"


async def test_a_slow_upload_holds_nobody_back(autojump_clock: Any) -> None:
    # The stamp reserves nothing until the body has been read and checked: a later
    # arrival takes a free slot while an earlier one is still uploading.
    async with running(capacity=1, max_wait=10) as app:
        client = app.test_client()
        answers: dict[str, Any] = {}

        async def slow() -> None:
            answers["slow"] = await post_uploading_slowly(client, b'{"duration": 5}', 4, ASYNC)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await trio.sleep(1)
            _, quick = await post(client, {"duration": 5}, ASYNC)
            assert quick["state"] == "active"
        assert answers["slow"][1]["state"] == "queued" and answers["slow"][1]["position"] == 1
        stats_now = await stats(client)
        assert (stats_now["active"], stats_now["queued"]) == (1, 1)


async def test_a_refused_request_costs_its_stamp_nothing(autojump_clock: Any) -> None:
    # Bad input after the stamp: no reservation is left behind to hold others back.
    async with running(capacity=1, max_wait=10) as app:
        client = app.test_client()
        response = await client.post(
            "/sessions", data=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400
        _, session = await post(client, {"duration": 1}, ASYNC)
        assert session["state"] == "active"
        assert app.service.gate.stats().rejected == 0


async def test_a_resize_the_backend_cannot_make_is_a_refusal(autojump_clock: Any) -> None:
    # Redis mode with Redis down: the resize is refused as backend_unavailable (the
    # refusal status, with Retry-After), never a 500; nothing changed.
    from sessiongate import BackendUnavailable

    async with running(capacity=2, admin_token="t", refusal_status=429) as app:

        async def unreachable(capacity: int) -> None:
            raise BackendUnavailable("Redis unreachable: the capacity was not changed")

        app.service.gate.resize = unreachable  # type: ignore[method-assign]
        response = await app.test_client().put(
            "/admin/capacity", json={"capacity": 5}, headers={"Authorization": "Bearer t"}
        )
        body = await response.get_json()
        assert response.status_code == 429 and body["error"] == "backend_unavailable"
        assert int(response.headers["Retry-After"]) >= 1
        assert app.service.gate.capacity == 2


async def test_a_session_handed_a_slot_shows_as_active_at_once(autojump_clock: Any) -> None:
    """A releaser hands the head its slot at once; the session's task starts it a pass
    later. In between, the session object must not say "queued" with no position and
    an admitted_at (outside review: 79 of 335 admin lists under fast turnover), and its
    event stream must not send "active" twice."""
    async with running(capacity=1, admin_token="t") as app:
        client = app.test_client()
        service = app.service
        _, first = await post(client, {"duration": 100}, ASYNC)
        _, second = await post(client, {"duration": 100}, ASYNC)
        record = service.registry.get(second["id"])
        assert isinstance(record, SessionRecord)
        events = session_events(service, record)
        assert (await anext(events)).startswith(b"event: queued\n")
        # A resize hands the new slot over synchronously: look before any task runs.
        service.gate.capacity = 2
        shown = record.to_json(service.gate)
        assert shown["state"] == "active" and shown["position"] is None
        assert shown["admitted_at"] is not None
        assert [r.id for r in service.registry.list_live("active", 10)] == [
            first["id"],
            second["id"],
        ]
        assert service.registry.list_live("queued", 10) == []
        await trio.testing.wait_all_tasks_blocked()  # the task starts the session
        assert record.state == "active"
        assert (await anext(events)).startswith(b"event: active\n")
        await client.delete(f"/sessions/{second['id']}")
        # The transition to "active" recorded by the task is not sent a second time.
        assert (await anext(events)).startswith(b"event: cancelled\n")
        await events.aclose()


async def test_an_integral_float_capacity_is_that_integer(autojump_clock: Any) -> None:
    """JSON has one number type; the OpenAPI schema says integer, which takes 3.0."""
    async with running(capacity=1, admin_token="t") as app:
        client = app.test_client()
        auth = {"Authorization": "Bearer t"}
        response = await client.put("/admin/capacity", json={"capacity": 3.0}, headers=auth)
        assert response.status_code == 200 and (await response.get_json())["capacity"] == 3
        response = await client.put("/admin/capacity", json={"capacity": 3.5}, headers=auth)
        assert response.status_code == 422


@pytest.mark.parametrize("path", ["/stats//", "/sessions//x", "/healthz//", "/sessions/x//events"])
async def test_empty_path_segments_are_no_route_not_a_redirect(
    autojump_clock: Any, path: str
) -> None:
    """werkzeug merged them with a 308 and an HTML body whose Location came from the
    client's Host header (outside review); every error is JSON."""
    async with running() as app:
        response = await app.test_client().get(path, headers={"Host": "evil.example"})
        assert response.status_code == 404
        assert (await response.get_json())["error"] == "not_found"
        assert "Location" not in response.headers


async def test_a_silent_event_stream_sends_a_comment_every_15_seconds(autojump_clock: Any) -> None:
    """A session can stay queued or active for minutes with nothing to send; a comment
    line (which clients ignore) keeps proxies from closing the stream as idle (outside
    review: 20 s of silence)."""
    async with running(capacity=1) as app:
        client = app.test_client()
        service = app.service
        _, active = await post(client, {"duration": 100}, ASYNC)
        record = service.registry.get(active["id"])
        assert isinstance(record, SessionRecord)
        events = session_events(service, record)
        assert (await anext(events)).startswith(b"event: active\n")
        start = trio.current_time()
        assert await anext(events) == b": keep-alive\n\n"
        assert trio.current_time() - start == pytest.approx(15)
        assert await anext(events) == b": keep-alive\n\n"
        assert trio.current_time() - start == pytest.approx(30)
        await client.delete(f"/sessions/{active['id']}")
        assert (await anext(events)).startswith(b"event: cancelled\n")
        await events.aclose()


async def test_an_async_session_started_by_a_cancelled_request_still_runs(
    autojump_clock: Any,
) -> None:
    """The request that starts an asynchronous session is cancelled as it starts it
    (its client closed at once): the session runs in the sessions nursery all the same.
    Trio left it in the cancelled request, where it never ran and never ended."""
    async with running(capacity=1) as app:
        service = app.service
        record = service.new_session(service.arrive(), {"duration": 2})
        with trio.CancelScope() as request:
            request.cancel()
            await service.start_session(record, answer_now=True)
        with trio.fail_after(30):
            await record.done.wait()
        assert record.state == "completed"
        stats = service.gate.stats()
        assert (stats.completed, stats.cancelled, stats.active) == (1, 0, 0)


async def test_a_session_task_cancelled_from_outside_its_scope_still_ends(
    autojump_clock: Any,
) -> None:
    """A session's task cancelled by an enclosing scope, not its own, ends its record
    once (cancelled, shutting_down): nothing stays "live" for good."""
    async with running(capacity=1) as app:
        service = app.service
        record = service.new_session(service.arrive(), {"duration": 60})
        service.registry.add(record)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(service._session_task, record)
                while record.state != "active":
                    await service.registry.pulse.wait()
                nursery.cancel_scope.cancel()
        assert record.done.is_set()
        assert (record.state, record.error["error"]) == ("cancelled", "shutting_down")
        assert record.id not in service.registry.live
        assert service.gate.stats().active == 0


async def test_a_session_between_two_states_is_not_shown_queued_without_a_place(
    autojump_clock: Any,
) -> None:
    """A session registered but not yet in the queue (its task has not run; one about
    to be refused queue_full is such) is not listed as queued, and a GET of it answers
    once it has its place: it said "queued" with position null (outside chaos test)."""
    async with running(capacity=1, max_queue=5, admin_token="t") as app:
        client, service = app.test_client(), app.service
        await post(client, {"duration": 100}, ASYNC)  # the slot
        _, queued = await post(client, {"duration": 1}, ASYNC)  # a real place
        record = service.new_session(service.arrive(), {"duration": 1})
        service.registry.add(record)  # registered; its task not started yet
        assert record.settling
        listed = await (await client.get("/sessions?state=queued", headers=AUTH)).get_json()
        assert [s["id"] for s in listed["sessions"]] == [queued["id"]]
        answers: list[Any] = []

        async def get_it() -> None:
            answers.append(await (await client.get(f"/sessions/{record.id}")).get_json())

        async def first_event() -> None:
            async with aclosing(session_events(service, record)) as events:
                async for event in events:
                    answers.append(json.loads(event.split(b"data: ", 1)[1]))
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get_it)
            nursery.start_soon(first_event)
            await trio.testing.wait_all_tasks_blocked()
            assert not answers  # both wait for the session to settle
            await service.start_session(record)
        assert [(seen["state"], seen["position"]) for seen in answers] == [("queued", 2)] * 2


async def test_a_get_waiting_on_an_arrival_then_refused_at_once_is_404(
    autojump_clock: Any,
) -> None:
    """A GET waiting for a session to settle whose arrival is then refused at once
    (queue_full) answers 404: no object is kept for such an arrival (SPEC). It answered
    200 with the refused object (an outside review)."""
    async with running(capacity=1, max_queue=1) as app:
        client, service = app.test_client(), app.service
        await post(client, {"duration": 100}, ASYNC)  # the slot
        await post(client, {"duration": 1}, ASYNC)  # the one queue place
        record = service.new_session(service.arrive(), {"duration": 1})
        service.registry.add(record)  # registered, its task not started yet
        statuses: list[int] = []

        async def get_it() -> None:
            statuses.append((await client.get(f"/sessions/{record.id}")).status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get_it)
            await trio.testing.wait_all_tasks_blocked()
            await service.start_session(record)  # refused at once: queue_full
        assert record.refused_at_once
        assert statuses == [404]


async def test_a_request_runs_no_import_statement(autojump_clock: Any) -> None:
    """Nothing on a request's path imports (an import statement runs Python's import
    machinery even for a module already loaded): Quart's ``blueprints`` property did,
    four times per request."""
    import builtins

    imports: list[str] = []
    real_import = builtins.__import__

    def counting_import(name: str, *args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_code
        imports.append(f"{name} (from {caller.co_name} in {caller.co_filename})")
        return real_import(name, *args, **kwargs)

    async with running(capacity=1, max_wait=1) as app:
        client = app.test_client()
        await post(client, {"duration": 0})  # warm: anything imported once, lazily
        await post(client, {"duration": 0})
        builtins.__import__ = counting_import
        try:
            response, _ = await post(client, {"duration": 0})
        finally:
            builtins.__import__ = real_import
    assert response.status_code == 200
    assert imports == [], imports


async def test_an_answer_in_memory_is_sent_as_one_body_message() -> None:
    """A JSON answer goes to the server as its start and one body message (Quart sent
    the body and then an empty last message, each through Hypercorn's ``app_send``)."""
    async with running() as app:
        sent: list[dict[str, Any]] = []
        calls = 0

        async def receive() -> dict[str, Any]:
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": b"", "more_body": False}
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/healthz",
            "raw_path": b"/healthz",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"test")],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
            "extensions": {},
        }
        await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200 and not sent[1].get("more_body", False)
    assert json.loads(sent[1]["body"]) == {"status": "ok", "draining": False}
