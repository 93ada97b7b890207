"""The platform's error hierarchy; the API translates it to HTTP in one place (api/pipeline.py)."""

from __future__ import annotations

from typing import Any


class PlatformError(Exception):
    """Base: `status` and `code` are what a client sees, `details` is JSON-safe context."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class ValidationFailed(PlatformError):
    status = 422
    code = "validation_error"

    def __init__(self, errors: list[dict[str, str]]) -> None:
        fields = ", ".join(e["field"] for e in errors)
        super().__init__(f"invalid request: {fields}", details={"errors": errors})


class BadRequest(PlatformError):
    status = 400
    code = "bad_request"


class Unauthorized(PlatformError):
    status = 401
    code = "unauthorized"


class Forbidden(PlatformError):
    status = 403
    code = "forbidden"


class NotFound(PlatformError):
    status = 404
    code = "not_found"


class Conflict(PlatformError):
    status = 409
    code = "conflict"


class PayloadTooLarge(PlatformError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(PlatformError):
    status = 415
    code = "unsupported_media_type"


class TooManyRequests(PlatformError):
    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, details={"retry_after": retry_after})
        self.retry_after = retry_after


class ServiceUnavailable(PlatformError):
    """A dependency (database, Redis, the worker) cannot answer now; clients should retry."""

    status = 503
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details={"retry_after": retry_after, **(details or {})})
        self.retry_after = retry_after


class GatewayTimeout(PlatformError):
    status = 504
    code = "gateway_timeout"
