"""The log pipeline: JSON lines, stdlib loggers routed through it, secrets redacted, phones masked."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import subprocess
import sys
import textwrap

import structlog

from telegram_platform.logs import REQUEST_CONTEXT, detached_context

_SCRIPT = textwrap.dedent("""
    import logging
    import structlog
    from telegram_platform.logs import configure_logging
    configure_logging(level="info", fmt="json", process="test")
    log = structlog.get_logger("t")
    structlog.contextvars.bind_contextvars(request_id="r-1")
    log.info("login", password="pw-SECRET-1", code="55555", token="tok-SECRET-2", phone="+9996651234")
    log.info("send", peer="+9996651234", other_peer="@alice", to="9996651234")
    log.warning("failed", error="PHONE_NUMBER_INVALID for +9996651234", reply="call +44 20 7946")
    logging.getLogger("aiohttp.server").error("stdlib says +9996651234 token=abc")
    try:
        raise ValueError("cannot log in +9996651234")
    except ValueError:
        log.exception("crashed")
""")


def test_secrets_redacted_and_phones_masked_in_every_kind_of_line() -> None:
    """structlog and stdlib lines come out as JSON with ids bound; secrets and phone numbers never do."""
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, timeout=60, check=True)
    out = result.stdout.decode()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["event"] for line in lines][:3] == ["login", "send", "failed"]
    assert all(line["process"] == "test" for line in lines)
    assert lines[0]["request_id"] == "r-1" and lines[0]["password"] == "[redacted]"
    assert lines[0]["code"] == "[redacted]" and lines[0]["token"] == "[redacted]"
    assert lines[0]["phone"] == "+99******34"
    assert lines[1]["peer"] == "+99******34" and lines[1]["other_peer"] == "@alice"
    assert lines[1]["to"] == "+99******34"
    assert lines[2]["error"] == "PHONE_NUMBER_INVALID for +99******34"
    assert lines[3]["logger"] == "aiohttp.server" and "+99******34" in lines[3]["event"]
    assert "+99******34" in lines[4]["exception"]
    for secret in ("pw-SECRET-1", "55555", "tok-SECRET-2", "9996651234"):
        assert secret not in out, secret


# isoformat() leaves out a fraction of exactly zero (one moment in a million).
_ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")
_REQUEST_LINES = textwrap.dedent("""
    import asyncio, json, sys
    import structlog
    from telegram_platform.logs import ACCESS_LOGGER, configure_logging, current_sink
    from telegram_platform.api.journal import RequestJournal
    from telegram_platform.metrics.definitions import create_metrics
    configure_logging(level="info", fmt="json", process="test")
    cases = [("GET", "/api/health", 200, 123_456, "0123456789abcdef0123456789abcdef", None),
             ("POST", "/api/messages", 202, 1_500_000_001, 'client "id" \\\\ é', "admin"),
             ("GET", "<unmatched>", 404, 20_000_000, "+9996651234", "+9996651234")]
    log = structlog.get_logger(ACCESS_LOGGER)
    for method, route, status, nanoseconds, request_id, user in cases:
        extra = {"user": user} if user is not None else {}
        log.info("request", method=method, route=route, status=status, duration_ms=nanoseconds / 1e6,
                 request_id=request_id, **extra)
    sys.stdout.flush()
    # Through the journal, as the API writes them: a batch with no "+" (written as encoded), then
    # one where a line needs redacting.
    journal = RequestJournal(create_metrics(None), current_sink())
    for batch in (cases[:1], cases[1:]):
        for case in batch:
            journal.record(case)
        journal.write_lines()
    sys.stdout.flush()

    async def held_then_warning():
        journal = RequestJournal(create_metrics(None), current_sink())
        async with journal.running():
            journal.record(("GET", "/api/health", 200, 1_000_000, "held-1", None))
            structlog.get_logger("t").warning("after the request")
    asyncio.run(held_then_warning())
""")


def test_request_lines_are_what_structlog_would_print() -> None:
    """The batch renderer's lines have exactly the keys and values of the access logger's structlog
    lines (escaping, redaction and phone masking included); a later line waits for held ones."""
    result = subprocess.run([sys.executable, "-c", _REQUEST_LINES], capture_output=True, timeout=60, check=True)
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    by_structlog, by_batch, ordered = lines[:3], lines[3:6], lines[6:]
    for expected, rendered in zip(by_structlog, by_batch, strict=True):
        stamps = [expected.pop("timestamp"), rendered.pop("timestamp")]
        assert all(_ISO_UTC.fullmatch(stamp) for stamp in stamps), stamps
        moments = [dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")) for stamp in stamps]
        assert abs((moments[1] - moments[0]).total_seconds()) < 5
        assert rendered == expected
    assert by_batch[2]["request_id"] == by_batch[2]["user"] == "+99******34"
    assert [line["event"] for line in ordered] == ["request", "after the request"]
    assert ordered[0]["request_id"] == "held-1"


async def test_a_detached_task_keeps_the_process_bindings_and_drops_the_works() -> None:
    """A task started with `detached_context()` (a session's update loop) logs with `worker` but
    without the op or job that started it, which keeps its own bindings."""
    seen: dict[str, dict[str, object]] = {}

    async def loop_body(name: str) -> None:
        seen[name] = {**structlog.contextvars.get_contextvars(), "request": REQUEST_CONTEXT.get()}

    with (structlog.contextvars.bound_contextvars(worker="w0-1"),
          structlog.contextvars.bound_contextvars(op="code", job_id="j-1", account_id=7)):
        token = REQUEST_CONTEXT.set(("r-1", "alice"))
        try:
            await asyncio.get_running_loop().create_task(loop_body("detached"), context=detached_context())
            await asyncio.create_task(loop_body("inherited"))
            still = structlog.contextvars.get_contextvars()
        finally:
            REQUEST_CONTEXT.reset(token)
    assert seen["detached"] == {"worker": "w0-1", "request": None}
    assert seen["inherited"] == {"worker": "w0-1", "op": "code", "job_id": "j-1", "account_id": 7,
                                 "request": ("r-1", "alice")}
    assert still == {"worker": "w0-1", "op": "code", "job_id": "j-1", "account_id": 7}


_NESTED = textwrap.dedent("""
    import structlog
    from telegram_platform.logs import configure_logging
    configure_logging(level="info", fmt="json", process="test")
    log = structlog.get_logger("t")
    log.info("nested", proxy={"server": "p.example", "password": "pw-NESTED-1", "peers": ["+9996651234"]},
             steps=[{"token": "tok-NESTED-2"}, ("9996651234",)], account={"phone": "9996651234"})
    log.warning("connect failed", url="redis://:pw-URL-3@redis.local:6379/0",
                error="could not reach postgresql://tp:pw-URL-4@db.local/tp from 9996651234")
    log.info("reached postgresql://tp:pw-URL-5@db.local/tp; peer 9996651234")
    log.info("ids stay", request_id="0123456789abcdef", after="1796535294094-0", job_id="in-1-2-3145728")
""")


def test_nested_values_urls_and_bare_phones_are_redacted() -> None:
    """Secrets inside nested dicts and lists, credentials in URLs, and phone numbers written without
    `+` are redacted or masked in every field and in the message; ids that are not phones stay."""
    result = subprocess.run([sys.executable, "-c", _NESTED], capture_output=True, timeout=60, check=True)
    out = result.stdout.decode()
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["proxy"] == {"server": "p.example", "password": "[redacted]", "peers": ["+99******34"]}
    assert lines[0]["steps"] == [{"token": "[redacted]"}, ["+99******34"]]
    assert lines[0]["account"] == {"phone": "+99******34"}
    assert lines[1]["url"] == "redis://***@redis.local:6379/0"
    assert lines[1]["error"] == "could not reach postgresql://***@db.local/tp from +99******34"
    assert lines[2]["event"] == "reached postgresql://***@db.local/tp; peer +99******34"
    assert (lines[3]["request_id"], lines[3]["after"], lines[3]["job_id"]) == (
        "0123456789abcdef", "1796535294094-0", "in-1-2-3145728")
    for secret in ("pw-NESTED-1", "tok-NESTED-2", "pw-URL-3", "pw-URL-4", "pw-URL-5", "9996651234"):
        assert secret not in out, secret
