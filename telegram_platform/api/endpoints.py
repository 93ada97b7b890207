"""Declared endpoints: one definition validates requests, checks roles and documents the route.

Bodies and query strings are msgspec Structs; the same Structs produce the OpenAPI schema, so the
documentation cannot drift from what is enforced. Validation reports every bad field at once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, get_type_hints

import msgspec
from aiohttp import web

from ..errors import BadRequest, Forbidden, Unauthorized, ValidationFailed
from .security import Principal

B = TypeVar("B")
Q = TypeVar("Q")

PRINCIPAL = web.RequestKey("principal", Principal)


def _enc_hook(value: Any) -> Any:
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    raise NotImplementedError(type(value))


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encoder.encode(data), status=status, content_type="application/json",
                        headers=headers)


@dataclass(slots=True)
class Call(Generic[B, Q]):
    """What a handler receives besides the request: the validated body and query, and the caller."""

    body: B
    query: Q
    principal: Principal | None

    @property
    def user(self) -> Principal:
        assert self.principal is not None, "route declared without a role"
        return self.principal


Handler = Callable[[web.Request, Call[Any, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    role: str | None
    body: type[Any] | None
    query: type[Any] | None
    response: Any
    status: int
    tags: tuple[str, ...]
    errors: tuple[int, ...]


@dataclass
class Api:
    endpoints: list[Endpoint] = field(default_factory=list)

    def route(
        self, method: str, path: str, *, summary: str, role: str | None = "viewer", body: type[Any] | None = None,
        query: type[Any] | None = None, response: Any = None, status: int = 200, tags: tuple[str, ...] = (),
        errors: tuple[int, ...] = (),
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.endpoints.append(Endpoint(method, path, handler, summary, role, body, query, response, status,
                                           tags, errors))
            return handler

        return register

    def install(self, app: web.Application) -> None:
        for endpoint in self.endpoints:
            app.router.add_route(endpoint.method, endpoint.path, _wrap(endpoint))


def _wrap(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        principal = request.get(PRINCIPAL)
        if endpoint.role is not None:
            if principal is None:
                raise Unauthorized("missing or invalid Authorization: Bearer token")
            if not principal.may(endpoint.role):
                raise Forbidden(f"this action needs the {endpoint.role} role", details={"role": principal.role})
        body = await _read_body(request, endpoint.body) if endpoint.body is not None else None
        query = _validate(endpoint.query, dict(request.query), "query") if endpoint.query is not None else None
        result = await endpoint.handler(request, Call(body, query, principal))
        if isinstance(result, web.StreamResponse):
            return result
        return json_response(result, status=endpoint.status)

    handle.__name__ = endpoint.handler.__name__
    return handle


async def _read_body(request: web.Request, schema: type[Any]) -> Any:
    raw = await request.read()
    if not raw:
        raise ValidationFailed([{"field": "body", "message": "a JSON body is required"}])
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", details={"field": "body"}) from None
    if not isinstance(data, dict):
        raise ValidationFailed([{"field": "body", "message": "must be a JSON object"}])
    return _validate(schema, data, "body")


def _validate(schema: type[Any], data: dict[str, Any], where: str) -> Any:
    """Check each field on its own so that every problem is reported, then build the Struct."""
    errors: list[dict[str, str]] = []
    hints = get_type_hints(schema, include_extras=True)
    info = msgspec.structs.fields(schema)
    from_query = where == "query"
    for f in info:
        name = f.encode_name
        if name not in data:
            if f.required:
                errors.append({"field": name, "message": "is required"})
            continue
        try:
            msgspec.convert(data[name], hints[f.name], strict=not from_query)
        except msgspec.ValidationError as exc:
            errors.append({"field": name, "message": _plain(str(exc))})
    if not errors:
        try:
            return msgspec.convert(data, schema, strict=not from_query)
        except msgspec.ValidationError as exc:
            # Constraints that span fields (or unknown fields) surface here.
            errors.append({"field": _field_of(str(exc)) or where, "message": _plain(str(exc))})
    raise ValidationFailed(errors)


def _plain(message: str) -> str:
    return message.split(" - at `", 1)[0]


def _field_of(message: str) -> str | None:
    if " - at `$." in message:
        return message.split(" - at `$.", 1)[1].rstrip("`").split("[", 1)[0].split(".", 1)[0]
    return None


def path_id(request: web.Request, name: str = "id") -> int:
    """A positive integer id from the path, or a validation error naming it."""
    raw = request.match_info[name]
    if not raw.isdigit() or len(raw) > 18 or int(raw) == 0:
        raise ValidationFailed([{"field": name, "message": "must be a positive integer"}])
    return int(raw)
