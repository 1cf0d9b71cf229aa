"""The OpenAPI document matches the app: every route and every status in it is real."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import jsonschema
import pytest
import trio
import trio.testing

from sessiongate import BackendUnavailable
from sessiongate.web import create_app
from sessiongate.web._openapi import openapi_document

from .conftest import port_of, raw_request, read_response, real_server, running

AUTH = {"Authorization": "Bearer t"}
ASYNC = {"Prefer": "respond-async"}
JSON = {"Content-Type": "application/json"}

Scenario = Callable[[Any, Any], Awaitable[Any]]


async def new_id(client: Any, duration: float = 100) -> str:
    response = await client.post("/sessions", json={"duration": duration}, headers=ASYNC)
    return str((await response.get_json())["id"])


async def ended_id(client: Any) -> str:
    response = await client.post("/sessions", json={"duration": 0})
    return str((await response.get_json())["id"])


async def sync_cancelled(client: Any, app: Any) -> Any:
    results: list[Any] = []

    async def caller() -> None:
        results.append(await client.post("/sessions", json={"duration": 100}))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        (record,) = app.service.registry.live.values()
        await client.delete(f"/sessions/{record.id}")
    return results[0]


async def refused(client: Any, app: Any) -> Any:
    await new_id(client)
    return await client.post("/sessions", json={})


async def draining_readyz(client: Any, app: Any) -> Any:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.service.drain)
        await trio.testing.wait_all_tasks_blocked()
        return await client.get("/readyz")


async def get_ended(client: Any, app: Any) -> Any:
    return await client.get(f"/sessions/{await ended_id(client)}")


async def delete_live(client: Any, app: Any) -> Any:
    return await client.delete(f"/sessions/{await new_id(client)}")


async def delete_unknown(client: Any, app: Any) -> Any:
    return await client.delete("/sessions/unknown")


async def delete_ended(client: Any, app: Any) -> Any:
    return await client.delete(f"/sessions/{await ended_id(client)}")


async def events_of_ended(client: Any, app: Any) -> Any:
    return await client.get(f"/sessions/{await ended_id(client)}/events")


def put(body: bytes, headers: dict[str, str] | None = None) -> Scenario:
    async def scenario(client: Any, app: Any) -> Any:
        return await client.put("/admin/capacity", data=body, headers={**AUTH, **(headers or JSON)})

    return scenario


async def put_backend_down(client: Any, app: Any) -> Any:
    async def unreachable(capacity: int) -> None:
        raise BackendUnavailable("Redis unreachable: the capacity was not changed")

    app.service.gate.resize = unreachable  # as the Redis backend does when Redis is down
    return await put(b'{"capacity": 3}')(client, app)


def stalled_body(method: str, path: str) -> Scenario:
    """A request whose body stops arriving: Quart's BODY_TIMEOUT (60 s) answers it."""

    async def scenario(client: Any, app: Any) -> Any:
        headers = {**AUTH, **JSON, "Content-Length": "100"}
        async with client.request(path, method=method, headers=headers) as connection:
            await connection.send(b'{"capacity": ')
            return await connection.as_response()

    return scenario


def post(body: bytes, headers: dict[str, str] | None = None) -> Scenario:
    async def scenario(client: Any, app: Any) -> Any:
        return await client.post("/sessions", data=body, headers=headers or JSON)

    return scenario


def get(path: str, headers: dict[str, str] | None = None) -> Scenario:
    async def scenario(client: Any, app: Any) -> Any:
        return await client.get(path, headers=headers)

    return scenario


BASE = {"capacity": 1, "max_wait": 0, "admin_token": "t"}
NO_TOKEN = {"capacity": 1}

# (path, method, status) -> (settings, scenario)
SCENARIOS: dict[tuple[str, str, str], tuple[dict[str, Any], Scenario]] = {
    ("/sessions", "post", "200"): (BASE, post(b'{"duration": 0}')),
    ("/sessions", "post", "202"): (BASE, post(b"{}", {**JSON, **ASYNC})),
    ("/sessions", "post", "400"): (BASE, post(b"{nope")),
    ("/sessions", "post", "408"): (BASE, stalled_body("POST", "/sessions")),
    ("/sessions", "post", "409"): ({"capacity": 1}, sync_cancelled),
    ("/sessions", "post", "413"): (BASE, post(b"[" * 70_000)),
    ("/sessions", "post", "415"): (BASE, post(b"{}", {"Content-Type": "text/plain"})),
    ("/sessions", "post", "422"): (BASE, post(b"[]")),
    ("/sessions", "post", "500"): (BASE, post(b'{"duration": 0}')),  # handler swapped below
    ("/sessions", "post", "503"): (BASE, refused),
    ("/sessions", "get", "200"): (BASE, get("/sessions", AUTH)),
    ("/sessions", "get", "401"): (BASE, get("/sessions")),
    ("/sessions", "get", "403"): (NO_TOKEN, get("/sessions", AUTH)),
    ("/sessions", "get", "422"): (BASE, get("/sessions?limit=0", AUTH)),
    ("/sessions/{session_id}", "get", "200"): (BASE, get_ended),
    ("/sessions/{session_id}", "get", "404"): (BASE, get("/sessions/unknown")),
    ("/sessions/{session_id}", "delete", "200"): (BASE, delete_live),
    ("/sessions/{session_id}", "delete", "404"): (BASE, delete_unknown),
    ("/sessions/{session_id}", "delete", "409"): (BASE, delete_ended),
    ("/sessions/{session_id}/events", "get", "200"): (BASE, events_of_ended),
    ("/sessions/{session_id}/events", "get", "404"): (BASE, get("/sessions/x/events")),
    ("/admin/capacity", "put", "200"): (BASE, put(b'{"capacity": 3}')),
    ("/admin/capacity", "put", "400"): (BASE, put(b"{")),
    ("/admin/capacity", "put", "408"): (BASE, stalled_body("PUT", "/admin/capacity")),
    ("/admin/capacity", "put", "401"): (BASE, put(b"{}", {"Authorization": "Bearer no"})),
    ("/admin/capacity", "put", "403"): (NO_TOKEN, put(b'{"capacity": 3}')),
    ("/admin/capacity", "put", "413"): (BASE, put(b" " * 70_000)),
    ("/admin/capacity", "put", "415"): (BASE, put(b"{}", {**AUTH, "Content-Type": "text/csv"})),
    ("/admin/capacity", "put", "422"): (BASE, put(b'{"capacity": 0}')),
    ("/admin/capacity", "put", "503"): (BASE, put_backend_down),
    ("/stats", "get", "200"): (BASE, get("/stats")),
    ("/metrics", "get", "200"): (BASE, get("/metrics")),
    ("/healthz", "get", "200"): (BASE, get("/healthz")),
    ("/readyz", "get", "200"): (BASE, get("/readyz")),
    ("/readyz", "get", "503"): (BASE, draining_readyz),
    ("/openapi.json", "get", "200"): (BASE, get("/openapi.json")),
}
METHODS = {"get", "post", "put", "delete", "patch"}


def documented() -> list[tuple[str, str, str]]:
    document = openapi_document()
    return [
        (path, method, status)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
        for status in operation["responses"]
        if status != "default"  # the HTTP layer's answers: test_the_http_layers_answers...
    ]


def test_every_route_of_the_app_is_documented_and_back() -> None:
    app = create_app()
    routes = {
        (re.sub(r"<(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    assert routes == {(path, method) for path, method, _ in documented()}


def test_every_documented_status_has_a_scenario() -> None:
    assert set(documented()) == set(SCENARIOS)


@pytest.mark.parametrize(("path", "method", "status"), sorted(SCENARIOS))
async def test_documented_status_is_what_the_app_answers(
    autojump_clock: Any, sample_handlers: str, path: str, method: str, status: str
) -> None:
    settings, scenario = SCENARIOS[(path, method, status)]
    if status == "500":
        settings = {**settings, "handler": f"{sample_handlers}:boom"}
    async with running(**settings) as app:
        response = await scenario(app.test_client(), app)
        assert str(response.status_code) == status
        document = await (await app.test_client().get("/openapi.json")).get_json()
        assert status in document["paths"][path][method]["responses"]
        documented_answer = document["paths"][path][method]["responses"][status]
        # Every header the document names is sent.
        for header in documented_answer.get("headers", {}):
            assert header in response.headers, header
        # The body is what the document says it is (a fresh gate's /stats included).
        content = documented_answer.get("content", {})
        if "application/json" in content and method != "head":
            schema = {**content["application/json"]["schema"], "components": document["components"]}
            jsonschema.Draft202012Validator(schema).validate(await response.get_json())


async def test_the_refusal_status_is_documented_as_configured(autojump_clock: Any) -> None:
    async with running(refusal_status=429) as app:
        document = await (await app.test_client().get("/openapi.json")).get_json()
        responses = document["paths"]["/sessions"]["post"]["responses"]
        assert "429" in responses and "503" not in responses
        assert document["openapi"].startswith("3.")


def test_every_operation_documents_the_http_layers_answers() -> None:
    """400, 431 and 501 come from the HTTP layer on any route (an outside review found
    them in the prose only, so a schema-driven client read them as undocumented)."""
    for item in openapi_document()["paths"].values():
        for method in METHODS.intersection(item):
            default = item[method]["responses"]["default"]
            assert default["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"
            }
            assert all(code in default["description"] for code in ("400", "431", "501"))


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /sessions/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 431),
        (b"POST /sessions HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n{}", 400),
        (b"POST /sessions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n{}", 501),
        (b"NOT HTTP\r\n\r\n", 400),
    ],
)  # fmt: skip
async def test_the_http_layers_answers_are_as_documented(head: bytes, status: int) -> None:
    document = openapi_document()
    schema = {"$ref": "#/components/schemas/Error", "components": document["components"]}
    with trio.fail_after(10):
        async with real_server(capacity=1) as (app, base):
            async with await raw_request(port_of(base), head) as stream:
                answered, headers, body = await read_response(stream)
                assert answered == status
                assert headers["content-type"] == "application/json"
                assert headers["connection"] == "close"
                jsonschema.Draft202012Validator(schema).validate(json.loads(body))
                assert json.loads(body)["error"] == "invalid_request"
            stats = app.service.gate.stats()
            assert (stats.admitted, stats.rejected) == (0, 0)
