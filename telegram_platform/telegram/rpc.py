"""Requests from API processes to the process that hosts an account's Telegram session.

API processes never load TDLib; they push a request on Redis and wait for the host's answer on a
reply key. Secrets in a request (codes, passwords) live only as long as the request does.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from ..errors import GatewayTimeout, PlatformError

REQUESTS_KEY = "tp:rpc:telegram"
REQUEST_TTL = 30


def reply_key(request_id: str) -> str:
    return f"tp:rpc:reply:{request_id}"


class HostError(PlatformError):
    """The host answered with an error; status and code come from it."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.status = status
        self.code = code


async def call_host(
    redis: aioredis.Redis, op: str, account_id: int, args: dict[str, Any] | None = None, *, timeout: float = 10.0
) -> dict[str, Any]:
    request_id = uuid.uuid4().hex
    payload = json.dumps({"id": request_id, "op": op, "account_id": account_id, "args": args or {},
                          "deadline": time.time() + timeout})
    async with redis.pipeline(transaction=False) as pipe:
        pipe.rpush(REQUESTS_KEY, payload)
        pipe.expire(REQUESTS_KEY, 3600)
        await pipe.execute()
    answer = await redis.blpop([reply_key(request_id)], timeout=timeout)
    if answer is None:
        raise GatewayTimeout("the worker did not answer in time (is tp-worker running?)",
                             details={"op": op, "timeout": timeout})
    reply: dict[str, Any] = json.loads(answer[1])
    if "error" in reply:
        error = reply["error"]
        raise HostError(int(error["status"]), str(error["code"]), str(error["message"]), error.get("details"))
    return reply["result"]  # type: ignore[no-any-return]
