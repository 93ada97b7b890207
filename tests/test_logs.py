"""The log pipeline: JSON lines, stdlib loggers routed through it, secrets redacted, phones masked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
