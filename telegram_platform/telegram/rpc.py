"""Requests from API processes to the process that hosts an account's Telegram session.

API processes never load TDLib; they push a request on Redis and wait for the host's answer on a
reply key. Secrets in a request (codes, passwords) live only as long as the request does.

Routing: a request for an account whose lease is held by a live host (its worker heartbeat exists)
goes to that host's own list; any other request goes to the shared list, where any host may take
it (and, by taking the lease, become the account's owner). A host that finds an account owned by
another live host forwards the request there once; if the owner is not a live host, the caller gets
409 `owned_elsewhere`, never a second client.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Final

import redis.asyncio as aioredis

from ..errors import GatewayTimeout, PlatformError
from ..redis_keys import (
    HOST_REQUESTS_PREFIX,
    TELEGRAM_REQUESTS,
    WORKER_HEARTBEAT_PREFIX,
    account_lease,
    host_requests,
    request_reply,
)

REQUEST_TTL: Final = 30
# The account request that downloads a received message's file (GET /api/incoming/{id}/file).
DOWNLOAD_INCOMING_FILE: Final = "download_incoming_file"
REPLY_WAIT_SLICE: Final = 10.0
REQUESTS_LIST_TTL: Final = 3600

# KEYS: lease, shared list. ARGV: payload, heartbeat prefix, host list prefix, list ttl.
# Returns the list the request went to.
_ROUTE = """
local target = KEYS[2]
local lease = redis.call('GET', KEYS[1])
if lease then
  local owner = string.sub(lease, 1, string.find(lease, '|', 1, true) - 1)
  if redis.call('EXISTS', ARGV[2] .. owner) == 1 then target = ARGV[3] .. owner end
end
redis.call('RPUSH', target, ARGV[1])
redis.call('EXPIRE', target, tonumber(ARGV[4]))
return target
"""


class HostError(PlatformError):
    """The host answered with an error; status and code come from it."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.status = status
        self.code = code


async def submit(redis: aioredis.Redis, request: dict[str, Any]) -> str:
    """Push a request to the host that owns its account (or the shared list); returns the list used."""
    target = await redis.eval(_ROUTE, 2, account_lease(int(request["account_id"])), TELEGRAM_REQUESTS,
                              json.dumps(request), WORKER_HEARTBEAT_PREFIX, HOST_REQUESTS_PREFIX,
                              REQUESTS_LIST_TTL)
    return target.decode() if isinstance(target, bytes) else str(target)


async def forward(redis: aioredis.Redis, request: dict[str, Any], owner: str) -> None:
    """Hand a request to the host `owner`, marked so that it is not forwarded again."""
    key = host_requests(owner)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.rpush(key, json.dumps({**request, "forwarded": True}))
        pipe.expire(key, REQUESTS_LIST_TTL)
        await pipe.execute()


async def is_live_host(redis: aioredis.Redis, owner: str) -> bool:
    return bool(await redis.exists(WORKER_HEARTBEAT_PREFIX + owner))


async def call_host(
    redis: aioredis.Redis, op: str, account_id: int, args: dict[str, Any] | None = None, *, timeout: float = 10.0
) -> dict[str, Any]:
    request_id = uuid.uuid4().hex
    await submit(redis, {"id": request_id, "op": op, "account_id": account_id, "args": args or {},
                         "deadline": time.time() + timeout})
    # Waited in slices no longer than a Redis command may take (the API's client times out a
    # longer BLPOP), so a request that takes minutes (a download) is waited for as long as it says.
    deadline = time.monotonic() + timeout
    answer = None
    while answer is None and (remaining := deadline - time.monotonic()) > 0:
        answer = await redis.blpop([request_reply(request_id)], timeout=min(REPLY_WAIT_SLICE, max(remaining, 0.01)))
    if answer is None:
        raise GatewayTimeout("the worker did not answer in time (is tp-worker running?)",
                             details={"op": op, "timeout": timeout})
    reply: dict[str, Any] = json.loads(answer[1])
    if "error" in reply:
        error = reply["error"]
        raise HostError(int(error["status"]), str(error["code"]), str(error["message"]), error.get("details"))
    return reply["result"]  # type: ignore[no-any-return]
