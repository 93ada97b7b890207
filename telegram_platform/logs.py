"""Logging: structlog everywhere, JSON lines in files, colour on a terminal, secrets never written.

The standard library's loggers (aiohttp, asyncpg, rq) are routed through the same processors, so
one redaction step covers every line the platform prints. Every line goes out through one
`LineSink`, in order; the API's request lines (api/journal.py) are the one batch writer, rendered
by `RequestLines` with the keys and values of a structlog line, because a structlog call per
request cost the API a third of its throughput.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import re
import sys
import threading
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
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
# A phone inside other text, with or without `+`: a run of 7 to 15 digits standing alone (not part
# of a word, a dotted or dashed number such as an event id `1796535294094-0`).
_PHONE_WORD = re.compile(r"(?<![\w.\-])\+?\d{7,15}(?![\w.\-])")
# Seven digits in a row, looked for first: most values hold none, and this search is far cheaper
# than _PHONE_WORD's, whose look-behind is tried at every position.
_SEVEN_DIGITS = re.compile(r"\d{7}")
# The user information of a URL (`scheme://user:password@`), replaced by `***`.
_URL_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/\s@]*@")
# Fields that hold identifiers, never phones: left as they are.
_ID_KEYS = frozenset({"id", "request_id", "job_id", "event_id", "after", "up_to", "timestamp", "ts"})
# Fields the processors before the redaction add themselves (level, logger name, time): never data.
_OWN_KEYS = frozenset({"event", "level", "logger", "timestamp"})
# Nested values are redacted this deep; deeper ones are replaced whole.
_MAX_DEPTH = 8


def mask_phone(value: str) -> str:
    digits = value.lstrip("+")
    if len(digits) <= 4:
        return "***"
    return f"+{digits[:2]}{'*' * (len(digits) - 4)}{digits[-2:]}"


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Runs for every line written: text and numbers, nearly all a line holds, are judged here
    # directly, and a field is written back only when its value changed.
    for key, value in event.items():
        if key in _OWN_KEYS:  # the message itself: _mask_phones_in_text
            continue
        kind = value.__class__
        if kind is str:
            lowered = key.lower()
            cleaned = "[redacted]" if lowered in _SECRET_KEYS else _clean_text(lowered, value)
        elif kind is int or kind is float or value is None:
            cleaned = "[redacted]" if key.lower() in _SECRET_KEYS else value
        else:
            cleaned = _clean(key, value, 0)
        if cleaned is not value:
            event[key] = cleaned
    return event


def _clean(key: str, value: Any, depth: int) -> Any:
    """A field's value with its secrets redacted and phones masked, inside dicts and lists too (an
    item of a list is judged by the list's key)."""
    lowered = key.lower()
    if lowered in _SECRET_KEYS:
        return "[redacted]"
    if isinstance(value, str):
        return _clean_text(lowered, value)
    if isinstance(value, dict | list | tuple | set | frozenset):
        if depth >= _MAX_DEPTH:
            return "[nested too deeply]"
        if isinstance(value, dict):
            return {k: _clean(str(k), v, depth + 1) for k, v in value.items()}
        return [_clean(key, item, depth + 1) for item in value]
    return value


def _clean_text(lowered_key: str, value: str) -> str:
    if lowered_key in _PHONE_KEYS or (lowered_key in _MAYBE_PHONE_KEYS and _PHONE_IN_TEXT.fullmatch(value)):
        return mask_phone(value)
    if "://" in value:
        value = _URL_CREDENTIALS.sub(r"\1***@", value)
    if lowered_key in _ID_KEYS or lowered_key.endswith("_id"):
        # An identifier: its digits are no phone, but a `+` number (a client-chosen request id) is.
        return _INTERNATIONAL_PHONE.sub(lambda m: mask_phone(m.group()), value) if "+" in value else value
    # Any other text (an error message, a reply) quoting a phone, with or without `+`.
    if _SEVEN_DIGITS.search(value) is None:
        return value
    return _PHONE_WORD.sub(lambda m: mask_phone(m.group()), value)


def _scrub_text(text: str) -> str:
    """Free text: credentials in URLs removed, phone numbers masked."""
    if "://" in text:
        text = _URL_CREDENTIALS.sub(r"\1***@", text)
    if _PHONE_IN_TEXT.search(text):
        text = _PHONE_IN_TEXT.sub(lambda m: mask_phone(m.group()), text)
    return text


def _mask_phones_in_text(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Free text (exception messages, third-party lines) may quote a phone number or a URL's password.
    message = event.get("event")
    if isinstance(message, str):
        event["event"] = _scrub_text(message)
    return event


def _mask_phones_in_exception(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # A rendered traceback (format_exc_info runs after the redaction above) may quote a phone.
    text = event.get("exception")
    if isinstance(text, str):
        event["exception"] = _scrub_text(text)
    return event


# The request an API task is answering: (request id, user or None). Set once per request by the
# pipeline (one ContextVar.set, overwritten by the next request, so nothing leaks between requests
# however aiohttp schedules them); every line logged while answering it carries both.
REQUEST_CONTEXT: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "tp_request", default=None)
ACCESS_LOGGER = "telegram_platform.api.access"


def _merge_request(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    bound = REQUEST_CONTEXT.get()
    if bound is not None:
        event.setdefault("request_id", bound[0])
        if bound[1] is not None:
            event.setdefault("user", bound[1])
    return event


# Bindings that describe the process, not the work in hand (worker/child.py binds them at start).
PROCESS_BINDINGS = frozenset({"worker"})


def detached_context() -> contextvars.Context:
    """The context for a task that outlives the request or job that starts it (a session's update
    loop): a copy of this one without that work's bindings (op, job_id, ...), which its lines would
    otherwise carry for the rest of the process's life."""
    context = contextvars.copy_context()

    def forget_the_work() -> None:
        bound = structlog.contextvars.get_contextvars()
        structlog.contextvars.unbind_contextvars(*(key for key in bound if key not in PROCESS_BINDINGS))
        REQUEST_CONTEXT.set(None)

    context.run(forget_the_work)
    return context


def configure_logging(*, level: str = "info", fmt: str = "auto", process: str | None = None) -> None:
    """Configure structlog and the standard library once, at process start."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _merge_request,
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
    sink = LineSink(sys.stdout, json=use_json, level=numeric_level, process=process)
    atexit.register(sink.write_held)  # a batch still held when the interpreter exits
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            _mask_phones_in_exception,
            renderer,
        ],
        # The platform's own lines skip the standard library (half the cost per line); third-party
        # loggers reach the same processors through the ProcessorFormatter below.
        logger_factory=_LineLoggerFactory(sink),
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
    handler = _SinkHandler(sink)
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


class LineSink:
    """Where every line of this process goes, in order, each written and flushed as it comes (so
    supervisord's log files are never behind), except a batch writer's held lines.

    A batch writer (the API's request journal) keeps its lines for a few milliseconds and installs
    a hook with `before_each_line`; every other line first runs it, so the file's order is the order
    things happened in, and a warning is never written before the requests that preceded it.
    """

    def __init__(self, stream: TextIO, *, json: bool, level: int, process: str | None) -> None:
        self._stream = stream
        self.json = json
        self.level = level
        self.process = process
        self._hooks: list[tuple[int, Callable[[], None]]] = []

    def write(self, line: str) -> None:
        if self._hooks:
            self.write_held()
        self._stream.write(line + "\n")
        self._stream.flush()

    def write_lines(self, data: bytes) -> None:
        """Pre-rendered newline-terminated lines (the batch writer's), written as one."""
        buffer = getattr(self._stream, "buffer", None)
        if buffer is None:
            self._stream.write(data.decode())
            self._stream.flush()
            return
        self._stream.flush()  # whatever else was printed goes first (no system call when empty)
        buffer.write(data)
        buffer.flush()

    def before_each_line(self, hook: Callable[[], None]) -> None:
        """Run `hook` (which writes held lines) before each line written from this thread only: the
        batch belongs to this thread (the event loop's), and a line from another thread (a
        to_thread helper) is not worth a race over the order."""
        self._hooks.append((threading.get_ident(), hook))

    def remove_hook(self, hook: Callable[[], None]) -> None:
        self._hooks = [entry for entry in self._hooks if entry[1] != hook]

    def write_held(self) -> None:
        me = threading.get_ident()
        for thread, hook in self._hooks:
            if thread == me:
                hook()


def current_sink() -> LineSink | None:
    """The sink `configure_logging` set up, or None where logging is structlog's default (tests)."""
    factory = structlog.get_config().get("logger_factory")
    return factory.sink if isinstance(factory, _LineLoggerFactory) else None


def utc_stamp() -> str:
    """Now, as structlog's `TimeStamper(fmt="iso", utc=True)` writes it."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class RequestLine(msgspec.Struct, gc=False):
    """An answered request's access line, made by the API's journal when it writes a batch
    (api/journal.py), with the keys and values the access logger's structlog `info("request", ...)`
    call would print. Not tracked by the garbage collector (`gc=False`): it holds only strings,
    numbers and bytes, so it can be in no cycle."""

    method: str
    route: str  # the template
    status: int
    # Nanoseconds / 1e6: the float nearest the exact figure, which JSON writes in at most 6 decimals.
    duration_ms: float
    request_id: str
    user: str | msgspec.UnsetType  # UNSET: left out of the line
    # The key "timestamp" and, pre-encoded, its value and then the keys every line of a batch shares
    # ("process", "event", "level", "logger"): msgspec copies a Raw as it is, so the batch's
    # `RequestLines.shared_keys` goes into each line as one copy instead of five strings encoded.
    timestamp: msgspec.Raw


class RequestLines:
    """Renders a batch of `RequestLine`s as JSON lines, at a fraction of a structlog call's cost per
    line: no processors, msgspec encoding the batch at once. A batch whose client-chosen text
    (methods, request ids, users) could hold a phone number sends those lines through the redaction
    every other line gets (`+` is what it looks for)."""

    def __init__(self, process: str | None) -> None:
        self._shared: dict[str, str] = {"process": process} if process else {}
        self._shared.update(event="request", level="info", logger=ACCESS_LOGGER)

    def shared_keys(self, timestamp: str) -> msgspec.Raw:
        """A batch's `RequestLine.timestamp`: `"<timestamp>","process":...,"logger":"..."`, valid
        JSON once it follows the key "timestamp" and precedes the line's closing brace. The journal
        takes one per batch, from `utc_stamp()` when the batch's first request ends (structlog
        stamps a line when it is written; a batch is written FLUSH_INTERVAL later)."""
        return msgspec.Raw(_json_encoder.encode({"timestamp": timestamp, **self._shared})[len(b'{"timestamp":'):-1])

    def render(self, lines: list[RequestLine]) -> bytes:
        data = _json_encoder.encode_lines(lines)
        # JSON never escapes "+", so a batch without one holds no international phone number: one
        # memchr over the batch, far cheaper than looking at the client-chosen fields (methods,
        # request ids, users) line by line (docs/performance.md). With one, those lines are
        # rendered again redacted.
        if b"+" not in data:
            return data
        unset = msgspec.UNSET
        return _json_encoder.encode_lines([
            _redacted(line) if "+" in line.method or "+" in line.request_id or
            (line.user is not unset and "+" in line.user) else line for line in lines])


def _redacted(line: RequestLine) -> dict[str, Any]:
    event = {key: value for key, value in msgspec.structs.asdict(line).items() if value is not msgspec.UNSET}
    return dict(_redact(None, "info", event))


class _SinkHandler(logging.Handler):
    """The standard library's lines (aiohttp, asyncpg, rq) through the same sink, in order."""

    def __init__(self, sink: LineSink) -> None:
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sink.write(self.format(record))
        except Exception:
            self.handleError(record)


class _LineLogger:
    """structlog's logger: hands each rendered line to the sink."""

    __slots__ = ("_sink", "name")

    def __init__(self, name: str, sink: LineSink) -> None:
        self.name = name
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.write(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _LineLoggerFactory:
    def __init__(self, sink: LineSink) -> None:
        self.sink = sink

    def __call__(self, *args: Any) -> _LineLogger:
        return _LineLogger(str(args[0]) if args else "", self.sink)


def _bind_process(name: str) -> Any:
    def add_process(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("process", name)
        return event

    return add_process
