"""The request pipeline: unknown routes through the same edge, and each request's journal entry."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import free_port
from support import ApiClient, samples, total

from telegram_platform.api.app import ROUTE_MODULES
from telegram_platform.api.endpoints import Api, Call
from telegram_platform.api.journal import FLUSH_INTERVAL, METRICS_INTERVAL, RequestJournal
from telegram_platform.api.keys import JOURNAL, METRICS
from telegram_platform.api.pipeline import ID_BATCH, JsonAnswer, Pipeline, answer_factory
from telegram_platform.api.security import TokenService
from telegram_platform.errors import Conflict
from telegram_platform.metrics.definitions import create_metrics


async def test_known_path_with_another_method_is_405_with_allow(api: ApiClient) -> None:
    """DELETE on a GET-only path answers 405 in the error shape, with Allow, the allowed methods in
    its details and a request id; a path with two methods names both."""
    async with api.client.delete("/api/health") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET"
        assert response.headers["X-Request-ID"]
        error = (await response.json())["error"]
        assert error["code"] == "method_not_allowed" and error["details"] == {"allowed": ["GET"]}, error
        assert error["message"] == "DELETE is not allowed on /api/health"
    async with api.client.patch("/api/messages") as response:
        assert response.status == 405
        assert (await response.json())["error"]["details"] == {"allowed": ["GET", "POST"]}
        assert response.headers["Allow"] == "GET,POST"


async def test_requests_without_an_id_get_a_new_one_each(api: ApiClient) -> None:
    """Ids the API makes (in batches) are 128-bit hex, and none repeats, across more than one batch."""
    ids = []
    for _ in range(ID_BATCH + 3):
        async with api.client.get("/api/health") as response:
            assert response.status == 200
            ids.append(response.headers["X-Request-ID"])
    assert all(len(request_id) == 32 and set(request_id) <= set("0123456789abcdef") for request_id in ids)
    assert len(set(ids)) == len(ids)


async def test_each_request_is_counted_and_logged_exactly_once(api: ApiClient) -> None:
    """N requests give N on the counter and the histogram at the next scrape, and N request lines
    carrying each request's id, the route template and the status (unknown routes as <unmatched>)."""
    with structlog.testing.capture_logs() as lines:
        for i in range(7):
            async with api.client.get("/api/health", headers={"X-Request-ID": f"pipe-{i}"}) as response:
                assert response.status == 200
        async with api.client.get("/api/nothing", headers={"X-Request-ID": "pipe-404"}) as response:
            assert response.status == 404
        status, text = await api.call("GET", "/metrics")  # a scrape writes this process's batch first
        assert status == 200
        api.app[JOURNAL].flush()
    values = samples(text)
    assert total(values, "tp_http_requests_total", route="/api/health", method="GET", status="200") == 7
    assert total(values, "tp_http_request_duration_seconds_count", route="/api/health") == 7
    assert total(values, "tp_http_requests_total", route="<unmatched>", status="404") == 1
    requests = [line for line in lines if line["event"] == "request"]
    assert [line["request_id"] for line in requests[:8]] == [f"pipe-{i}" for i in range(7)] + ["pipe-404"]
    assert {(line["route"], line["status"]) for line in requests[:8]} == {("/api/health", 200),
                                                                          ("<unmatched>", 404)}
    assert all(line["duration_ms"] >= 0 for line in requests)


async def test_the_journal_flushes_on_its_own(api: ApiClient) -> None:
    """Without a scrape, a request is in the metrics within METRICS_INTERVAL, and in flight is 0."""
    registry = api.app[METRICS].registry
    assert registry is not None
    before = registry.get_sample_value("tp_http_requests_total",
                                       {"method": "GET", "route": "/api/health", "status": "200"}) or 0.0
    assert (await api.call("GET", "/api/health"))[0] == 200
    await asyncio.sleep(METRICS_INTERVAL + FLUSH_INTERVAL * 4)
    after = registry.get_sample_value("tp_http_requests_total",
                                      {"method": "GET", "route": "/api/health", "status": "200"})
    assert after == before + 1
    assert registry.get_sample_value("tp_http_requests_in_flight") == 0


async def test_plain_function_handlers_answer_like_coroutines() -> None:
    """A handler may be a plain function: its result, a response it returns and an error it raises
    come out as a coroutine handler's would, each with the request id."""
    api = Api()

    @api.route("GET", "/plain", summary="plain", role=None)
    def plain(request: web.Request, call: Call[None, None]) -> Any:
        return {"kind": "plain"}

    @api.route("GET", "/plain/response", summary="plain response", role=None)
    def plain_response(request: web.Request, call: Call[None, None]) -> Any:
        return web.Response(text="made by hand", status=203)

    @api.route("GET", "/plain/error", summary="plain error", role=None)
    def plain_error(request: web.Request, call: Call[None, None]) -> Any:
        raise Conflict("already there", details={"field": "name"})

    @api.route("GET", "/coroutine", summary="coroutine", role=None)
    async def coroutine(request: web.Request, call: Call[None, None]) -> Any:
        await asyncio.sleep(0)
        return {"kind": "coroutine"}

    app = web.Application()
    metrics = create_metrics(None)
    pipeline = Pipeline(TokenService("pipeline-test-secret-0123456789abcdef", 60), RequestJournal(metrics, None),
                        metrics.websocket_connections)
    api.install(app, pipeline)
    async with TestServer(app, port=free_port()) as server, TestClient(server) as client:
        answers = {}
        for path in ("/plain", "/plain/response", "/plain/error", "/coroutine"):
            async with client.get(path, headers={"X-Request-ID": f"id{path}"}) as response:
                answers[path] = (response.status, response.content_type, await response.text(),
                                 response.headers["X-Request-ID"])
    assert answers["/plain"] == (200, "application/json", '{"kind":"plain"}', "id/plain")
    assert answers["/plain/response"] == (203, "text/plain", "made by hand", "id/plain/response")
    status, content_type, body, request_id = answers["/plain/error"]
    assert (status, content_type, request_id) == (409, "application/json", "id/plain/error")
    assert json.loads(body) == {"error": {"code": "conflict", "message": "already there",
                                          "details": {"field": "name"}}}
    assert answers["/coroutine"] == (200, "application/json", '{"kind":"coroutine"}', "id/coroutine")


def test_every_route_answers_with_the_lean_json_response_that_aiohttp_would_build() -> None:
    """On the installed aiohttp, the pipeline's own JSON response is attribute for attribute what
    web.Response builds, for every status a route answers with (this fails when an aiohttp upgrade
    makes the routes fall back to the slower web.Response)."""
    statuses = {endpoint.status for module in ROUTE_MODULES for endpoint in module.api.endpoints}
    assert 200 in statuses and 201 in statuses, statuses
    for status in sorted(statuses):
        answer, reason = answer_factory(status)
        assert answer is JsonAnswer, status
        assert reason == web.Response(status=status).reason
        built = answer(b'{"a":1}', status, reason, (("Content-Type", "application/json"), ("X-Request-ID", "r-1")))
        standard = web.Response(body=b'{"a":1}', status=status, headers={"Content-Type": "application/json",
                                                                          "X-Request-ID": "r-1"})
        assert vars(built) == vars(standard)


def test_a_lean_response_that_differs_from_aiohttps_is_not_used() -> None:
    """A lean response that leaves out an attribute web.Response sets (as a new aiohttp could make
    it) is refused at start, with a warning, and the route builds web.Response instead."""

    class Stale(JsonAnswer):
        def __init__(self, body: bytes, status: int, reason: str, headers: Any) -> None:
            super().__init__(body, status, reason, headers)
            del self._compressed_body

    with structlog.testing.capture_logs() as logs:
        answer, reason = answer_factory(201, lean=Stale)
    assert answer is not Stale and reason == "Created"
    response = answer(b"{}", 201, reason, (("Content-Type", "application/json"),))
    assert type(response) is web.Response and response.status == 201 and response.body == b"{}"
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == [
        "aiohttp's Response differs from the pipeline's lean JSON response; using web.Response"]
