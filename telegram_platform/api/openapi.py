"""The OpenAPI 3.1 document and Swagger UI.

The document is generated from the endpoints installed on the application (every `Api.route` of
every route module, whoever added it), with msgspec's JSON Schema for bodies, queries and
responses: what is documented is what the endpoints validate. Every 4xx/5xx a route can give is
documented with the contract's one error shape.

Swagger UI is served from the assets bundled in the `swagger-ui-py` package (Swagger UI 5, which
renders OpenAPI 3.1): no CDN, so the page works on a server without internet.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from .. import __version__
from ..errors import NotFound
from .endpoints import ENDPOINTS, MAX_ID, Api, Call, Endpoint, RouteFactory


class _DocsApi(Api):
    def install(self, app: web.Application, pipeline: RouteFactory) -> None:
        # The document is built on first request, when every route module has been installed,
        # and kept per application.
        app[_CACHE] = {}
        super().install(app, pipeline)


_CACHE = web.AppKey("openapi_cache", dict)
api = _DocsApi()

OPENAPI_VERSION = "3.1.0"
_REF = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
_ERROR_DESCRIPTIONS = {
    400: "The body is not valid JSON",
    401: "Missing, invalid or expired access token",
    403: "The caller's role may not do this",
    404: "Not found",
    409: "Conflicts with the current state",
    413: "The body is larger than TP_MAX_BODY_BYTES (an upload: TP_MAX_UPLOAD_BYTES)",
    415: "The body is not of the media type the route takes",
    422: "Invalid input: `details.errors` names every bad field",
    426: "Not a WebSocket upgrade request",
    429: "Too many requests: retry after `Retry-After` seconds",
    500: "Internal error (the response names the request id)",
    503: "A backing service (database, Redis) is unavailable: retry after `Retry-After` seconds",
    504: "The worker did not answer in time",
}
_STATUS_DESCRIPTIONS = {101: "Switching Protocols: the WebSocket is open", 200: "OK", 201: "Created",
                        202: "Accepted", 204: "No Content"}

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "description": "The one error shape of every 4xx and 5xx response.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[a-z0-9_]+$", "description": "snake_case error code"},
                "message": {"type": "string"},
                "details": {"type": "object", "description": "context; `errors` lists bad fields on 422",
                            "properties": {"errors": {"type": "array", "items": {
                                "type": "object", "required": ["field", "message"],
                                "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}}}},
            },
            "required": ["code", "message", "details"],
        }
    },
    "required": ["error"],
}


def _schemas(types: list[Any], components: dict[str, Any]) -> list[dict[str, Any]]:
    """msgspec's JSON Schema for these types, their components merged into `components`; a Struct
    may add keywords msgspec cannot express (minProperties) with `__json_schema_extra__`."""
    schemas, found = msgspec.json.schema_components(types, ref_template=_REF)
    for kind in types:
        extra = getattr(kind, "__json_schema_extra__", None)
        if extra and isinstance(kind, type) and kind.__name__ in found:
            found[kind.__name__] = {**found[kind.__name__], **extra}
    components.update(found)
    return list(schemas)


def _path_param_schema(endpoint: Endpoint, name: str, components: dict[str, Any]) -> dict[str, Any]:
    if name in endpoint.path_params:
        return _schemas([endpoint.path_params[name]], components)[0]
    if name == "id" or name.endswith("_id"):
        return {"type": "integer", "minimum": 1, "maximum": MAX_ID}
    return {"type": "string"}


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional query parameter is absent, never `null`: drop the null branch."""
    options = schema.get("anyOf")
    if options:
        kept = [option for option in options if option != {"type": "null"}]
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
        if schema.get("default") is not None:
            rest["default"] = schema["default"]
        return {**kept[0], **rest} if len(kept) == 1 else {"anyOf": kept, **rest}
    return {k: v for k, v in schema.items() if not (k == "default" and v is None)}


def _error_statuses(endpoint: Endpoint) -> list[int]:
    statuses = set(endpoint.errors) | {500, 503}
    if endpoint.role is not None or endpoint.token_optional:
        statuses.add(401)
        if endpoint.role != "viewer":  # every caller is at least a viewer
            statuses.add(403)
    if endpoint.body is not None:
        statuses |= {400, 413, 422}
    if endpoint.query is not None or _PATH_PARAM.search(endpoint.path):
        statuses.add(422)
    return sorted(statuses)


def _operation(endpoint: Endpoint, components: dict[str, Any], used_ids: set[str]) -> dict[str, Any]:
    operation_id = endpoint.handler.__name__
    while operation_id in used_ids:
        operation_id += "_"
    used_ids.add(operation_id)
    description = endpoint.handler.__doc__ or ""
    if endpoint.role is not None:
        description = f"Requires the `{endpoint.role}` role (or higher).\n\n{description}".strip()
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": endpoint.summary,
        "tags": list(endpoint.tags),
        # An optional token: `{}` is the anonymous alternative.
        "security": ([{"bearer": []}] if endpoint.role is not None
                     else [{}, {"bearer": []}] if endpoint.token_optional else []),
    }
    if description:
        operation["description"] = description
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _path_param_schema(endpoint, name, components)}
        for name in _PATH_PARAM.findall(endpoint.path)
    ]
    if endpoint.query is not None:
        _, found = msgspec.json.schema_components([endpoint.query], ref_template=_REF)
        query_schema = found.pop(endpoint.query.__name__)
        components.update(found)
        required = set(query_schema.get("required", []))
        for name, schema in query_schema["properties"].items():
            parameter = {"name": name, "in": "query", "required": name in required, "schema": _without_null(schema)}
            if "description" in schema:
                parameter["description"] = schema["description"]
            parameters.append(parameter)
    if parameters:
        operation["parameters"] = parameters
    if endpoint.body is not None:
        (body_schema,) = _schemas([endpoint.body], components)
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_schema}}}
    elif endpoint.raw_body:
        operation["requestBody"] = {"required": True,
                                    "content": {media_type: {"schema": dict(endpoint.raw_body_schema or
                                                                            {"type": "string"})}
                                                for media_type in endpoint.raw_body}}

    headers = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    responses: dict[str, Any] = {}
    success: dict[str, Any] = {"description": _STATUS_DESCRIPTIONS.get(endpoint.status, "Success"),
                               "headers": headers}
    if endpoint.status not in (101, 204):
        if endpoint.content_type == "application/json":
            if endpoint.response is not None:
                (schema,) = _schemas([endpoint.response], components)
            else:
                schema = {}
            success["content"] = {"application/json": {"schema": schema}}
        else:
            types = (endpoint.content_type,) if isinstance(endpoint.content_type, str) else endpoint.content_type
            success["content"] = {media_type: {"schema": {"type": "string"}} for media_type in types}
    responses[str(endpoint.status)] = success
    for status in _error_statuses(endpoint):
        if status in endpoint.responses:
            continue
        response: dict[str, Any] = {"$ref": f"#/components/responses/E{status}"}
        responses[str(status)] = response
    for status, kind in endpoint.responses.items():
        (schema,) = _schemas([kind], components)
        responses[str(status)] = {"description": _ERROR_DESCRIPTIONS.get(status, "See the schema"),
                                  "headers": headers, "content": {"application/json": {"schema": schema}}}
    operation["responses"] = responses
    return operation


def build_document(endpoints: list[Endpoint]) -> dict[str, Any]:
    """The OpenAPI 3.1 document for these endpoints."""
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}
    used_ids: set[str] = set()
    statuses: set[int] = set()
    for endpoint in endpoints:
        if endpoint.hidden:
            continue
        path = _PATH_PARAM.sub(lambda m: "{" + m.group(1) + "}", endpoint.path)
        paths.setdefault(path, {})[endpoint.method.lower()] = _operation(endpoint, components, used_ids)
        statuses.update(_error_statuses(endpoint))
    request_id = {"description": "The request id (echoed when the client sent one); every log line of the "
                                 "request carries it", "schema": {"type": "string"}, "required": True}
    retry_after = {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}
    error_responses: dict[str, Any] = {}
    for status in sorted(statuses):
        headers: dict[str, Any] = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
        if status in (429, 503):
            headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
        error_responses[f"E{status}"] = {
            "description": _ERROR_DESCRIPTIONS.get(status, "Error"), "headers": headers,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "telegram-platform API",
            "version": __version__,
            "description": "Run many Telegram accounts: logins, sends, campaigns, events. Log in at "
                           "`POST /api/auth/login`, then send `Authorization: Bearer <access_token>`. Roles: "
                           "a viewer reads, an operator sends and runs campaigns, an admin manages users, "
                           "processes and settings.\n\n"
                           "**Events**: `GET /api/ws` is a WebSocket (token in `Authorization: Bearer` or "
                           "`?token=`; `?topics=all|account:<id>|campaign:<id>|message:<id>`, comma-separated; "
                           "`?types=` event types). It sends `{\"type\", \"data\", \"ts\"}` events: "
                           "`message.status`, `account.state`, `campaign.progress`, `message.incoming`.\n\n"
                           "**Webhooks** are POSTed with `X-TP-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "
                           "\"<t>.\" + body)>`, `X-TP-Event` and `X-TP-Delivery`.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "responses": error_responses,
            "headers": {"X-Request-ID": request_id, "Retry-After": retry_after},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


# -- routes -----------------------------------------------------------------------------------------

def _document_bytes(app: web.Application) -> bytes:
    cache = app.get(_CACHE)
    if cache is None:  # installed without install(); build every time
        return msgspec.json.encode(build_document(app[ENDPOINTS]))
    if "document" not in cache:
        cache["document"] = msgspec.json.encode(build_document(app[ENDPOINTS]))
    return cache["document"]  # type: ignore[no-any-return]


@api.route("GET", "/api/openapi.json", summary="This document (OpenAPI 3.1)", role=None, response=dict[str, Any],
           tags=("docs",))
async def openapi_document(request: web.Request, call: Call[None, None]) -> Any:
    return web.Response(body=_document_bytes(request.app), content_type="application/json")


def swagger_assets() -> Path:
    """Swagger UI's files, as the `swagger-ui-py` package ships them (no import needed)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


_ASSETS = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "application/javascript",
           "favicon-32x32.png": "image/png", "favicon-16x16.png": "image/png"}

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>telegram-platform API</title>
  <link rel="stylesheet" href="/api/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/api/docs/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/api/docs/swagger-ui-bundle.js"></script>
  <script src="/api/docs/init.js"></script>
</body>
</html>
"""

# validatorUrl: null, or Swagger UI asks an online validator for a badge.
_INIT = """window.ui = SwaggerUIBundle({
  url: "/api/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout"
});
"""

# Everything from this server: a browser refuses any other origin, so a CDN could not sneak in.
_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
        "connect-src 'self'")


@api.route("GET", "/api/docs", summary="Swagger UI for this API", role=None, content_type="text/html",
           tags=("docs",))
async def swagger_ui(request: web.Request, call: Call[None, None]) -> Any:
    return web.Response(text=_PAGE, content_type="text/html", headers={"Content-Security-Policy": _CSP})


@api.route("GET", "/api/docs/{asset}", summary="Swagger UI's assets", role=None, hidden=True)
async def swagger_asset(request: web.Request, call: Call[None, None]) -> Any:
    name = request.match_info["asset"]
    if name == "init.js":
        return web.Response(text=_INIT, content_type="application/javascript",
                            headers={"Cache-Control": "no-cache"})
    if name not in _ASSETS:
        raise NotFound(f"no asset {name!r}")
    return web.FileResponse(swagger_assets() / name,
                            headers={"Content-Type": _ASSETS[name], "Cache-Control": "public, max-age=86400"})

