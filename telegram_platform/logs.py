"""Logging: structlog everywhere, JSON lines in files, colour on a terminal, secrets never written.

The standard library's loggers (aiohttp, asyncpg, rq) are routed through the same processors, so
one redaction step covers every line the platform prints.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import msgspec
import structlog

# Keys whose values are secrets: replaced wholesale.
_SECRET_KEYS = frozenset({
    "password", "new_password", "code", "token", "access_token", "refresh_token", "authorization",
    "secret", "jwt_secret", "encryption_key", "database_key", "api_hash", "database_url", "redis_url",
})
# Keys that hold phone numbers: masked, keeping enough to tell accounts apart.
_PHONE_KEYS = frozenset({"phone", "phone_number"})
# Keys that may hold a phone among other things (a peer is a phone, a @username or a user id).
_MAYBE_PHONE_KEYS = frozenset({"peer", "recipient", "to", "sender"})
_PHONE_IN_TEXT = re.compile(r"\+?\d{7,15}")
_INTERNATIONAL_PHONE = re.compile(r"\+\d{7,15}")


def mask_phone(value: str) -> str:
    digits = value.lstrip("+")
    if len(digits) <= 4:
        return "***"
    return f"+{digits[:2]}{'*' * (len(digits) - 4)}{digits[-2:]}"


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        lowered = key.lower()
        value = event[key]
        if lowered in _SECRET_KEYS:
            event[key] = "[redacted]"
        elif not isinstance(value, str):
            continue
        elif lowered in _PHONE_KEYS or (lowered in _MAYBE_PHONE_KEYS and _PHONE_IN_TEXT.fullmatch(value)):
            event[key] = mask_phone(value)
        elif "+" in value:
            # Any other text (an error message, a reply) quoting a phone in international form.
            event[key] = _INTERNATIONAL_PHONE.sub(lambda m: mask_phone(m.group()), value)
    return event


def _mask_phones_in_text(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Free text (exception messages, third-party lines) may quote a phone number.
    message = event.get("event")
    if isinstance(message, str) and _PHONE_IN_TEXT.search(message):
        event["event"] = _PHONE_IN_TEXT.sub(lambda m: mask_phone(m.group()), message)
    return event


def _mask_phones_in_exception(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # A rendered traceback (format_exc_info runs after the redaction above) may quote a phone.
    text = event.get("exception")
    if isinstance(text, str) and _PHONE_IN_TEXT.search(text):
        event["exception"] = _PHONE_IN_TEXT.sub(lambda m: mask_phone(m.group()), text)
    return event


def configure_logging(*, level: str = "info", fmt: str = "auto", process: str | None = None) -> None:
    """Configure structlog and the standard library once, at process start."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        _add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        _mask_phones_in_text,
    ]
    if process:
        shared.insert(0, _bind_process(process))
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_json_line) if use_json
        else structlog.dev.ConsoleRenderer(colors=True)
    )
    numeric_level = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            _mask_phones_in_exception,
            renderer,
        ],
        # The platform's own lines skip the standard library (half the cost per line); third-party
        # loggers reach the same processors through the ProcessorFormatter below.
        logger_factory=_LineLoggerFactory(sys.stdout),
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _mask_phones_in_exception,
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


_json_encoder = msgspec.json.Encoder(enc_hook=str)


def _json_line(event: Any, **_: Any) -> str:
    return _json_encoder.encode(event).decode()


def _add_logger_name(logger: Any, _: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    record = event.get("_record")  # a standard-library record, for third-party loggers
    name = record.name if record is not None else getattr(logger, "name", None)
    if name:
        event["logger"] = name
    return event


class _LineLogger:
    """Writes each rendered line and flushes it, so supervisord's log files are never behind."""

    __slots__ = ("_file", "name")

    def __init__(self, name: str, file: TextIO) -> None:
        self.name = name
        self._file = file

    def msg(self, message: str) -> None:
        self._file.write(message + "\n")
        self._file.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _LineLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _LineLogger:
        return _LineLogger(str(args[0]) if args else "", self._file)


def _bind_process(name: str) -> Any:
    def add_process(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("process", name)
        return event

    return add_process
