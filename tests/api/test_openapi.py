"""The OpenAPI document and Swagger UI: generated from every declared route, served without a CDN."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from support import ApiClient

from telegram_platform.api.endpoints import ENDPOINTS, Api, Call
from telegram_platform.api.openapi import build_document

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


async def _document(api: ApiClient) -> dict[str, Any]:
    status, document = await api.call("GET", "/api/openapi.json")
    assert status == 200
    return document  # type: ignore[no-any-return]


async def test_every_declared_route_is_documented(api: ApiClient) -> None:
    """Each installed endpoint (whatever module declared it) has an operation in the document."""
    document = await _document(api)
    assert document["openapi"] == "3.1.0"
    for endpoint in api.app[ENDPOINTS]:
        if endpoint.hidden:
            continue
        path = re.sub(r"\{([^}:]+)(:[^}]*)?\}", r"{\1}", endpoint.path)
        operation = document["paths"][path][endpoint.method.lower()]
        assert operation["summary"] == endpoint.summary
        assert str(endpoint.status) in operation["responses"]
    for path in ("/api/messages", "/api/users", "/api/users/{id}", "/api/webhooks", "/api/queues", "/api/docs"):
        assert path in document["paths"], path
    assert "/api/ws" not in document["paths"]  # a WebSocket: described in info.description


async def test_errors_use_the_one_error_shape(api: ApiClient) -> None:
    """Every documented 4xx/5xx of a route refers to the Error schema; protected routes say bearer."""
    document = await _document(api)
    responses = document["components"]["responses"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and "$ref" in response:
                    name = response["$ref"].rsplit("/", 1)[1]
                    schema = responses[name]["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, status)
            if operation["security"]:
                assert "401" in operation["responses"], (path, method)
    send = document["paths"]["/api/messages"]["post"]
    assert {"400", "401", "403", "413", "422", "503"} <= set(send["responses"])
    assert send["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SendMessage"}
    listing = document["paths"]["/api/messages"]["get"]
    limit = next(p for p in listing["parameters"] if p["name"] == "limit")
    assert limit["in"] == "query" and limit["schema"]["maximum"] == 500


async def test_a_route_added_later_appears() -> None:
    """A module that declares a route with Api shows up in a document built from the endpoints."""
    extra = Api()

    @extra.route("GET", "/api/things/{id}", summary="A thing", role="operator", tags=("things",))
    async def get_thing(request: Any, call: Call[None, None]) -> Any:
        return {}

    document = build_document(extra.endpoints)
    operation = document["paths"]["/api/things/{id}"]["get"]
    assert operation["parameters"][0]["schema"]["type"] == "integer"
    assert "403" in operation["responses"]


async def test_swagger_ui_is_served_from_the_package(api: ApiClient) -> None:
    """/api/docs loads only same-origin assets, which this server serves from the bundled package."""
    async with api.client.get("/api/docs") as response:
        assert response.status == 200
        page = await response.text()
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert "http://" not in page and "https://" not in page
    for asset in re.findall(r'(?:src|href)="(/api/docs/[^"]+)"', page):
        async with api.client.get(asset) as response:
            assert response.status == 200, asset
            assert len(await response.read()) > 0
    async with api.client.get("/api/docs/swagger-ui-bundle.js") as response:
        assert "SwaggerUIBundle" in (await response.text())[:2000]
    status, _ = await api.call("GET", "/api/docs/../../etc/passwd")
    assert status == 404


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
async def test_swagger_ui_renders_in_a_browser_without_network(api: ApiClient, tmp_path: Path) -> None:
    """Headless Chromium, able to reach 127.0.0.1 only, renders /api/docs with every operation listed."""
    document = await _document(api)
    expected = sorted((method.upper(), path) for path, item in document["paths"].items()
                      for method in item if method in {"get", "put", "post", "patch", "delete"})
    # Every name resolves to nothing and every other request goes to a closed port: a page that
    # needed a CDN (or anything off this machine) would render no operations at all.
    assert CHROMIUM is not None
    browser = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1", "--virtual-time-budget=15000",
        "--dump-dom", str(api.client.make_url("/api/docs")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    dom, _ = await asyncio.wait_for(browser.communicate(), timeout=90)
    page = dom.decode()
    assert browser.returncode == 0
    assert re.search(r'<h2 class="title">' + re.escape(document["info"]["title"]), page), page[-3000:]
    rendered = sorted(re.findall(r'class="opblock-summary-method">(\w+)</span>.*?data-path="([^"]+)"', page,
                                 flags=re.DOTALL))
    assert rendered == expected
