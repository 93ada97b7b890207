"""Logging: structlog everywhere, JSON lines in files, colour on a terminal, secrets never written.

The standard library's loggers (aiohttp, asyncpg, rq) are routed through the same processors, so
one redaction step covers every line the platform prints.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Keys whose values are secrets: replaced wholesale.
_SECRET_KEYS = frozenset({
    "password", "new_password", "code", "token", "access_token", "refresh_token", "authorization",
    "secret", "jwt_secret", "encryption_key", "database_key", "api_hash", "database_url", "redis_url",
})
# Keys that hold phone numbers: masked, keeping enough to tell accounts apart.
_PHONE_KEYS = frozenset({"phone", "phone_number"})
_PHONE_IN_TEXT = re.compile(r"\+?\d{7,15}")


def mask_phone(value: str) -> str:
    digits = value.lstrip("+")
    if len(digits) <= 4:
        return "***"
    return f"+{digits[:2]}{'*' * (len(digits) - 4)}{digits[-2:]}"


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        lowered = key.lower()
        if lowered in _SECRET_KEYS:
            event[key] = "[redacted]"
        elif lowered in _PHONE_KEYS and isinstance(event[key], str):
            event[key] = mask_phone(event[key])
    return event


def _mask_phones_in_text(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Free text (exception messages, third-party lines) may quote a phone number.
    message = event.get("event")
    if isinstance(message, str) and _PHONE_IN_TEXT.search(message):
        event["event"] = _PHONE_IN_TEXT.sub(lambda m: mask_phone(m.group()), message)
    return event


def configure_logging(*, level: str = "info", fmt: str = "auto", process: str | None = None) -> None:
    """Configure structlog and the standard library once, at process start."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        _mask_phones_in_text,
    ]
    if process:
        shared.insert(0, _bind_process(process))
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=True)
    )
    numeric_level = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # aiohttp's access log duplicates our one-line-per-request summary.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("rq.worker").setLevel(max(numeric_level, logging.INFO))


def _bind_process(name: str) -> Any:
    def add_process(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("process", name)
        return event

    return add_process
