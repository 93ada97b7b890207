"""Declared endpoints: one definition validates requests, checks roles and documents the route.

Bodies and query strings are msgspec Structs; the same Structs produce the OpenAPI schema, so the
documentation cannot drift from what is enforced. Validation reports every bad field at once.
"""

from __future__ import annotations

import datetime as dt
import types
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, Union, get_args, get_origin, get_type_hints

import msgspec
from aiohttp import web

from ..errors import BadRequest, ValidationFailed
from .security import Principal

B = TypeVar("B")
Q = TypeVar("Q")

# Every endpoint installed on an application, in order: what the OpenAPI document is generated from.
ENDPOINTS = web.AppKey("endpoints", list)
MAX_ID = 2**63 - 1


def _enc_hook(value: Any) -> Any:
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    raise NotImplementedError(type(value))


json_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
JSON = "application/json"


def _integral_float(text: str) -> float | int:
    # JSON Schema counts 1.0 as an integer: so does the API (any other float stays a float).
    value = float(text)
    return int(value) if value.is_integer() else value


_decoder = msgspec.json.Decoder(float_hook=_integral_float)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json_encoder.encode(data), status=status, content_type=JSON, headers=headers)


class Call(msgspec.Struct, Generic[B, Q], frozen=True):
    """What a handler receives besides the request: the validated body and query, and the caller.
    (A Struct rather than a dataclass: one is built per request, in a third of the time. Frozen,
    so that requests with no input and no caller can share `NO_INPUT` instead.)"""

    body: B
    query: Q
    principal: Principal | None
    # Path parameters declared with `path_params=`, converted to their types.
    path: Mapping[str, Any] = types.MappingProxyType({})

    @property
    def user(self) -> Principal:
        assert self.principal is not None, "route declared without a role"
        return self.principal


# What a route that reads no body, query or path parameters passes a request without a caller.
NO_INPUT: Call[None, None] = Call(None, None, None)

# A coroutine function, or a plain function for a handler that never waits (no coroutine to make).
Handler = Callable[[web.Request, Call[Any, Any]], Any]


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
    # Extra documented responses with a body other than the error shape (status -> type).
    responses: Mapping[int, Any] = field(default_factory=dict)
    # Types of path parameters; by default `id` and `*_id` are positive integers, others strings.
    path_params: Mapping[str, Any] = field(default_factory=dict)
    # Media type(s) of a successful response (documentation only; handlers return web.Response).
    content_type: str | tuple[str, ...] = "application/json"
    # Media types of a body the handler reads itself (a CSV import), documented as a string.
    raw_body: tuple[str, ...] = ()
    # Left out of the OpenAPI document (static assets).
    hidden: bool = False
    # A WebSocket: the token may come as ?token= and its lifetime is not timed as a latency.
    websocket: bool = False
    # With role=None: a caller may still sign in for more (the handler reads `call.principal`); a
    # token that is given but invalid is a 401, never a quiet downgrade to the anonymous answer.
    token_optional: bool = False
    # The JSON Schema of a `raw_body` (a multipart upload's parts), instead of a plain string.
    raw_body_schema: Mapping[str, Any] | None = None


@dataclass
class Api:
    endpoints: list[Endpoint] = field(default_factory=list)

    def route(
        self, method: str, path: str, *, summary: str, role: str | None = "viewer", body: type[Any] | None = None,
        query: type[Any] | None = None, response: Any = None, status: int = 200, tags: tuple[str, ...] = (),
        errors: tuple[int, ...] = (), responses: Mapping[int, Any] | None = None,
        path_params: Mapping[str, Any] | None = None, content_type: str | tuple[str, ...] = "application/json",
        raw_body: tuple[str, ...] = (), hidden: bool = False, websocket: bool = False, token_optional: bool = False,
        raw_body_schema: Mapping[str, Any] | None = None,
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.endpoints.append(Endpoint(method, path, handler, summary, role, body, query, response, status,
                                           tags, errors, dict(responses or {}), dict(path_params or {}),
                                           content_type, raw_body, hidden, websocket, token_optional,
                                           raw_body_schema))
            return handler

        return register

    def install(self, app: web.Application, pipeline: RouteFactory) -> None:
        """Route each endpoint through `pipeline` (api/pipeline.py), which checks and calls it."""
        installed = app.setdefault(ENDPOINTS, [])
        for endpoint in self.endpoints:
            app.router.add_route(endpoint.method, endpoint.path, pipeline.handler(endpoint))
            installed.append(endpoint)


class RouteFactory(Protocol):
    def handler(self, endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]: ...


async def read_body(request: web.Request, schema: type[Any]) -> Any:
    raw = await request.read()
    if not raw:
        raise ValidationFailed([{"field": "body", "message": "a JSON body is required"}])
    try:
        data = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", details={"field": "body"}) from None
    except RecursionError:  # the parser's depth limit: a body no schema here could want
        raise BadRequest("body is not acceptable JSON: nested too deeply", details={"field": "body"}) from None
    if not isinstance(data, dict):
        raise ValidationFailed([{"field": "body", "message": "must be a JSON object"}])
    return validate(schema, data, "body")


def validate(schema: type[Any], data: dict[str, Any], where: str) -> Any:
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
        if from_query and isinstance(data[name], list):
            errors.append({"field": name, "message": "is given more than once"})
            continue
        # In a query string `null` is a string like any other, never None.
        hint = _without_none(hints[f.name]) if from_query else hints[f.name]
        try:
            msgspec.convert(data[name], hint, strict=not from_query)
        except msgspec.ValidationError as exc:
            errors.append({"field": name, "message": _plain(str(exc))})
    if schema.__struct_config__.forbid_unknown_fields:
        known = {f.encode_name for f in info}
        kind = "query parameter" if from_query else "field"
        errors += [{"field": str(name), "message": f"is not a known {kind}"} for name in data if name not in known]
    if not errors:
        try:
            return msgspec.convert(data, schema, strict=not from_query)
        except msgspec.ValidationError as exc:
            # Constraints that span fields (or unknown fields) surface here.
            errors.append({"field": _field_of(str(exc)) or where, "message": _plain(str(exc))})
    raise ValidationFailed(errors)


def _without_none(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        kept = tuple(arg for arg in get_args(hint) if arg is not type(None))
        if len(kept) == 1:
            return kept[0]
        return Union[kept]  # noqa: UP007 - built from a tuple
    return hint


def _plain(message: str) -> str:
    return message.split(" - at `", 1)[0]


def _field_of(message: str) -> str | None:
    if " - at `$." in message:
        return message.split(" - at `$.", 1)[1].rstrip("`").split("[", 1)[0].split(".", 1)[0]
    return None


def query_params(request: web.Request) -> dict[str, str | list[str]]:
    """The query string as `validate` takes it. A parameter given more than once becomes a list,
    which every parameter refuses: `?limit=5&limit=500` must not quietly mean one of the two."""
    query = request.query
    return {key: values[0] if len(values := query.getall(key)) == 1 else values for key in query}


def convert_path_params(request: web.Request, types: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    errors: list[dict[str, str]] = []
    for name, kind in types.items():
        try:
            values[name] = msgspec.convert(request.match_info[name], kind, strict=False)
        except msgspec.ValidationError as exc:
            errors.append({"field": name, "message": _plain(str(exc))})
    if errors:
        raise ValidationFailed(errors)
    return values


def path_id(request: web.Request, name: str = "id") -> int:
    """A positive integer id from the path, or a validation error naming it."""
    raw = request.match_info[name]
    if raw.endswith(".0"):  # JSON Schema's integers include 1.0, and some clients write it so
        raw = raw[:-2]
    # isascii: str.isdigit() also accepts digits such as '²' that int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not 0 < int(raw) <= MAX_ID:
        raise ValidationFailed([{"field": name, "message": "must be a positive integer"}])
    return int(raw)
