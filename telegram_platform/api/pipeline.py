"""The path every request takes: request id, caller, role, validation, handler, errors as JSON,
then a record for the journal (its log line and metrics).

One coroutine per route instead of an aiohttp middleware: any middleware makes aiohttp wrap it
in another of its own (`_fix_request_current_app`), and with our endpoint wrapper and a
response-prepare signal that was three more coroutines per request, a sixth of a health check
(docs/performance.md). Routes that do not exist reach the same pipeline through a catch-all
route, so a 404 or 405 gets the same error shape, request id and log line. The error edge is here
and only here: PlatformError, aiohttp's HTTP errors and driver outages become the contract's shape.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
import structlog
from aiohttp import hdrs, web
from multidict import CIMultiDict, istr
from prometheus_client import Gauge

from ..errors import Forbidden, PlatformError, ServiceUnavailable, Unauthorized
from ..logs import ACCESS_LOGGER, REQUEST_CONTEXT
from ..outages import is_outage
from .endpoints import (
    JSON,
    NO_INPUT,
    Call,
    Endpoint,
    convert_path_params,
    json_encoder,
    json_response,
    query_params,
    read_body,
    validate,
)
from .journal import RequestJournal
from .security import Principal, TokenService

log = structlog.get_logger(ACCESS_LOGGER)

# An istr: aiohttp's case-insensitive headers take it without case-folding it on every response.
REQUEST_ID_HEADER = istr("X-Request-ID")
MAX_REQUEST_ID = 128
ID_BATCH = 256
# Set on a request whose token was refused: the reason its 401 gives.
REFUSAL = web.RequestKey("refusal", Unauthorized)
UNMATCHED = "<unmatched>"

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "validation_error", 429: "too_many_requests"}

_JSON_BODIES = (dict, list, msgspec.Struct)

RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# web.Response's own default, read from its signature rather than imported from aiohttp's internals.
_ZLIB_EXECUTOR_SIZE = int((getattr(web.Response.__init__, "__kwdefaults__", None) or {}).get("zlib_executor_size", 0))


class JsonAnswer(web.Response):
    """A handler's JSON result as a response: what `web.Response(body=<bytes>, status=, headers=)`
    builds, attribute for attribute, in a third of its time. aiohttp's constructor checks keyword
    combinations and body types that a JSON body never needs (its cost: docs/performance.md).
    It sets aiohttp's instance attributes itself, so `answer_factory` compares it with
    `web.Response` for each status the routes answer with, at start, and those routes use
    `web.Response` whenever the two differ (a new aiohttp): at worst slower, never different."""

    def __init__(self, body: bytes, status: int, reason: str, headers: Any) -> None:
        # No super().__init__(): this is its work, without the branches.
        self._state = {}
        self._headers = CIMultiDict(headers)
        self._status = status
        self._reason = reason
        self._body = body
        self._compressed_body = None
        self._zlib_executor_size = _ZLIB_EXECUTOR_SIZE
        self._zlib_executor = None


AnswerFactory = Callable[[bytes, int, str, Any], web.Response]


def _standard_answer(body: bytes, status: int, reason: str, headers: Any) -> web.Response:
    return web.Response(body=body, status=status, reason=reason, headers=headers)


def answer_factory(status: int, lean: type[JsonAnswer] = JsonAnswer) -> tuple[AnswerFactory, str]:
    """How a route with this status builds its JSON responses, and the status's reason phrase:
    `lean` when it builds what `web.Response` does, else `web.Response` itself, with a warning (a
    Pipeline asks once per status)."""
    reason = web.Response(status=status).reason

    # Compared through subclasses made for it: vars() on an instance of the classes themselves
    # left, on CPython 3.11, every later response of both with an instance dict, each attribute set
    # through the generic slow path (docs/performance.md).
    candidate_type, reference_type = type("Candidate", (lean,), {}), type("Reference", (web.Response,), {})
    headers = ((hdrs.CONTENT_TYPE, JSON), (REQUEST_ID_HEADER, "0" * 32))
    reference = reference_type(body=b'{"sample":true}', status=status, reason=reason, headers=headers)
    try:
        candidate = candidate_type(b'{"sample":true}', status, reason, headers)
        same = vars(candidate) == vars(reference) and candidate_type.__mro__[2:] == reference_type.__mro__[1:]
    except (AttributeError, TypeError):  # an aiohttp whose responses have no such attributes
        same = False
    if same:
        return lean, reason
    log.warning("aiohttp's Response differs from the pipeline's lean JSON response; using web.Response",
                status=status)
    return _standard_answer, reason


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


class Pipeline:
    """One per application (`create_app`); `handler(endpoint)` is what aiohttp's router calls."""

    def __init__(self, tokens: TokenService, journal: RequestJournal, websockets_open: Gauge) -> None:
        self._tokens = tokens
        self.journal = journal
        self._websockets_open = websockets_open
        # Set when the member starts draining (ops/member.py): answers then close their connection,
        # so keep-alive clients move to another member instead of finding theirs closed under them.
        self.draining = False
        self._fallback: web.AbstractResource | None = None
        # How each status's JSON responses are built (answer_factory), settled once per status.
        self._answers: dict[int, tuple[AnswerFactory, str]] = {}
        self._ids: list[str] = []

    def _more_ids(self) -> str:
        """A new request id, from a batch of ID_BATCH made at once: 128 random bits each, like
        uuid4().hex, with one getrandom() system call per batch instead of one per id. From the OS,
        not from `random`: turning getrandbits' integer into bytes cost more than the call."""
        text = os.urandom(16 * ID_BATCH).hex()
        self._ids.extend(text[i:i + 32] for i in range(0, len(text), 32))
        return self._ids.pop()

    def start_draining(self) -> None:
        self.draining = True

    def handler(self, endpoint: Endpoint) -> RouteHandler:
        """The coroutine aiohttp calls for `endpoint`: the whole request path in one frame (each
        coroutine layer costs about as much as the platform's own work on a health check)."""
        route, role, websocket = endpoint.path, endpoint.role, endpoint.websocket
        token_optional = endpoint.token_optional
        body_schema, query_schema, path_types = endpoint.body, endpoint.query, endpoint.path_params
        call_handler, status = endpoint.handler, endpoint.status
        waits = inspect.iscoroutinefunction(call_handler)  # else a plain function: no coroutine to make
        takes_input = body_schema is not None or query_schema is not None or bool(path_types)
        in_flight = 0 if websocket else 1  # the in-flight gauge leaves WebSockets out
        journal, caller, held, start_batch = self.journal, self._caller, self.journal.held, self.journal.start_batch
        # A route answers its own method only (aiohttp adds no HEAD to add_route's GET); the
        # catch-all's requests are logged and labelled with their own. A WebSocket's "duration" is
        # its lifetime, not a latency: counted, not timed.
        tally = (journal.tally(endpoint.method, route, timed=not websocket) if endpoint.method != "*"
                 else None)

        # Bound once here: the handler below runs per request, where each global and attribute
        # lookup saved is measurable (benchmarks/api_wrk.py).
        clock, bind_request, encode = time.perf_counter_ns, REQUEST_CONTEXT.set, json_encoder.encode
        if status not in self._answers:
            self._answers[status] = answer_factory(status)
        answer, reason = self._answers[status]
        content_type = (hdrs.CONTENT_TYPE, JSON)
        ids, more_ids = self._ids, self._more_ids

        async def handle(request: web.Request) -> web.StreamResponse:
            started = clock()
            headers = request.headers
            incoming = headers.get(REQUEST_ID_HEADER)
            request_id = (incoming if incoming and len(incoming) <= MAX_REQUEST_ID and incoming.isprintable()
                          else ids.pop() if ids else more_ids())
            authorization = headers.get(hdrs.AUTHORIZATION)  # an istr: not case-folded per request
            principal = caller(request, authorization, websocket) if authorization or websocket else None
            user = principal.username if principal is not None else None
            bind_request((request_id, user))
            journal.in_flight += in_flight
            response: web.StreamResponse
            try:
                if role is not None:
                    if principal is None:
                        raise self._refusal(request)
                    if not principal.may(role):
                        raise Forbidden(f"this action needs the {role} role", details={"role": principal.role})
                elif token_optional and authorization and principal is None:
                    raise self._refusal(request)
                if takes_input:
                    path = convert_path_params(request, path_types) if path_types else {}
                    body = await read_body(request, body_schema) if body_schema is not None else None
                    query = (validate(query_schema, query_params(request), "query") if query_schema is not None
                             else None)
                    call: Call[Any, Any] = Call(body, query, principal, path)
                else:
                    call = NO_INPUT if principal is None else Call(None, None, principal)
                result = await call_handler(request, call) if waits else call_handler(request, call)
                # dict/list/Struct first: isinstance against StreamResponse (an ABC) is slow when it fails.
                if isinstance(result, _JSON_BODIES) or not isinstance(result, web.StreamResponse):
                    # The headers given whole, as pairs: one multidict built at once, with no dict
                    # in between, costs less than content_type= and then the id through `headers`.
                    response = answer(encode(result), status, reason, (content_type, (REQUEST_ID_HEADER, request_id)))
                    status_sent = status
                else:
                    response = result
                    response.headers[REQUEST_ID_HEADER] = request_id
                    status_sent = response.status
            except Exception as exc:
                response = _error_response(exc, request, request_id)
                response.headers[REQUEST_ID_HEADER] = request_id
                status_sent = response.status
            finally:
                journal.in_flight -= in_flight
            if self.draining:
                response.force_close()
            # journal.record, inline.
            elapsed = clock() - started
            if not held:  # the first of a batch
                start_batch()
            held.append((tally or journal.tally(request.method, route), status_sent, elapsed, request_id, user))
            return response

        if not websocket:
            handle.__name__ = endpoint.handler.__name__
            return handle

        async def handle_websocket(request: web.Request) -> web.StreamResponse:
            self._websockets_open.inc()
            try:
                return await handle(request)
            finally:
                self._websockets_open.dec()

        handle_websocket.__name__ = endpoint.handler.__name__
        return handle_websocket

    def _caller(self, request: web.Request, authorization: str | None, websocket: bool) -> Principal | None:
        token = _token(request, authorization, websocket)
        if not token:
            return None
        try:
            return self._tokens.verify_access(token)
        except Unauthorized as exc:
            # Routes that need a caller answer 401 themselves (`_refusal`), saying why; routes that
            # do not serve an anonymous caller.
            request[REFUSAL] = exc
            return None

    @staticmethod
    def _refusal(request: web.Request) -> Unauthorized:
        """Why a route that needs a caller has none: the token's own error (expired, revoked, ...)
        tells a client whether to refresh or to sign in again."""
        return request.get(REFUSAL) or Unauthorized("missing or invalid Authorization: Bearer token")

    def install_fallback(self, app: web.Application) -> None:
        """After every route: a path no route matches still gets the error shape, a request id and
        a log line (route `<unmatched>`); a known path with another method gets 405 and Allow."""
        fallback = Endpoint("*", UNMATCHED, self._no_route, "No such route", None, None, None, None, 404, (), ())
        # [\s\S], not `.`: a path may hold a (percent-encoded) newline, which `.` does not match.
        self._fallback = app.router.add_route("*", r"/{tail:[\s\S]*}", self.handler(fallback)).resource

    async def _no_route(self, request: web.Request, call: Call[None, None]) -> web.StreamResponse:
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is self._fallback:
                continue
            match, methods = await resource.resolve(request)
            if match is None:
                allowed |= methods
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))
        raise web.HTTPNotFound()


def _token(request: web.Request, authorization: str | None, websocket: bool) -> str | None:
    if authorization is not None and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    if websocket:
        return request.query.get("token")  # browsers cannot set headers on a WebSocket
    return None


def _error_response(exc: Exception, request: web.Request, request_id: str) -> web.Response:
    """The contract's error shape for what a handler raised (the API's one error edge)."""
    if isinstance(exc, PlatformError):
        response = json_response(error_body(exc.code, exc.message, exc.details), status=exc.status)
        if isinstance(exc, ServiceUnavailable) or getattr(exc, "retry_after", None):
            response.headers["Retry-After"] = str(getattr(exc, "retry_after", 5))
        return response
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc  # a redirect is an answer, not an error
        code = _HTTP_CODES.get(exc.status, "http_error")
        if exc.status == 405:  # the methods the path has, in the body too: a client may not see headers
            allowed = exc.headers.get("Allow", "")
            response = json_response(error_body(code, f"{request.method} is not allowed on {request.path}",
                                                {"allowed": allowed.split(",") if allowed else []}), status=405)
            response.headers["Allow"] = allowed
            return response
        message = exc.reason if exc.status != 404 else f"no route for {request.method} {request.path}"
        return json_response(error_body(code, message), status=exc.status)
    if is_outage(exc):  # 503 with Retry-After, never a hang or a trace
        log.error("dependency unavailable", error=type(exc).__name__)
        response = json_response(error_body("service_unavailable", "a backing service is unavailable; retry",
                                            {"retry_after": 5}), status=503)
        response.headers["Retry-After"] = "5"
        return response
    if isinstance(exc, asyncpg.DataError):
        # A value the schemas let through but PostgreSQL refuses: bad input, not a server fault.
        log.warning("value refused by the database", error=type(exc).__name__)
        return json_response(error_body("validation_error", "a value is not acceptable",
                                        {"errors": [{"field": "body", "message": type(exc).__name__}]}), status=422)
    log.exception("unhandled error", exc_info=exc)
    return json_response(error_body("internal_error", "internal error", {"request_id": request_id}), status=500)
