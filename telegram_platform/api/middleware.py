"""The one middleware every request passes: request id, caller, one log line, errors as JSON.

Kept to a single function with no I/O so it costs microseconds; the error edge is here and only
here, translating PlatformError, aiohttp's HTTP errors and driver outages to the contract's shape.
"""

from __future__ import annotations

import os
import time
from typing import Any

import asyncpg
import redis.exceptions
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from ..errors import PlatformError, ServiceUnavailable, Unauthorized
from .endpoints import PRINCIPAL, json_response
from .keys import METRICS, TOKENS

log = structlog.get_logger("telegram_platform.api.access")

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID = 128

# A dependency that is down must give 503 with Retry-After, never a hang or a stack trace.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    ConnectionRefusedError,
    TimeoutError,
)


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "validation_error", 429: "too_many_requests"}


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    # os.urandom(16).hex() is a 128-bit id like uuid4().hex at a third of the cost.
    request_id = incoming if 0 < len(incoming) <= MAX_REQUEST_ID and incoming.isprintable() else os.urandom(16).hex()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    user: str | None = None
    authorization = request.headers.get("Authorization")
    token = None
    if authorization is not None and authorization[:7].lower() == "bearer ":
        token = authorization[7:].strip()
    elif request.path == "/api/ws":
        token = request.query.get("token")
    if token:
        try:
            principal = request.app[TOKENS].verify_access(token)
            request[PRINCIPAL] = principal
            user = principal.username
            structlog.contextvars.bind_contextvars(user=user)
        except Unauthorized:
            pass  # routes that need a caller answer 401 themselves
    in_flight = request.app[METRICS].request_started(request)
    response: web.StreamResponse
    try:
        response = await handler(request)
    except PlatformError as exc:
        response = json_response(error_body(exc.code, exc.message, exc.details), status=exc.status)
        if isinstance(exc, ServiceUnavailable) or getattr(exc, "retry_after", None):
            response.headers["Retry-After"] = str(getattr(exc, "retry_after", 5))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason if exc.status != 404 else f"no route for {request.method} {request.path}"
        response = json_response(error_body(code, message), status=exc.status)
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "")
    except OUTAGE_ERRORS as exc:
        log.error("dependency unavailable", error=type(exc).__name__)
        response = json_response(error_body("service_unavailable", "a backing service is unavailable; retry",
                                            {"retry_after": 5}), status=503)
        response.headers["Retry-After"] = "5"
    except asyncpg.DataError as exc:
        # A value the schemas let through but PostgreSQL refuses: bad input, not a server fault.
        log.warning("value refused by the database", error=type(exc).__name__)
        response = json_response(error_body("validation_error", "a value is not acceptable",
                                            {"errors": [{"field": "body", "message": type(exc).__name__}]}),
                                 status=422)
    except Exception:
        log.exception("unhandled error")
        response = json_response(error_body("internal_error", "internal error", {"request_id": request_id}),
                                 status=500)
    finally:
        in_flight.dec()
    response.headers[REQUEST_ID_HEADER] = request_id
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "<unmatched>"
    elapsed = time.perf_counter() - started
    request.app[METRICS].request_finished(request.method, route, response.status, elapsed,
                                          websocket=isinstance(response, web.WebSocketResponse))
    log.info(
        "request", method=request.method, route=route, status=response.status, duration_ms=round(elapsed * 1000, 3))
    return response
