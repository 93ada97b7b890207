"""Requests from API processes to the process that hosts an account's Telegram session.

API processes never load TDLib; they push a request on Redis and wait for the host's answer on a
reply key. Requests and replies are sealed (redis_auth.py): a code or a password is never in Redis in
clear, a request nobody holding ENCRYPTION_KEY made is refused, and a reply is opened only as the
answer to its own request. A request carries its deadline inside the seal (an expired one is
dropped) and is taken once (`claim`), so one captured and pushed again does nothing.

Routing: a request for an account whose lease is held by a live host (its worker heartbeat exists)
goes to that host's own list; any other request goes to the shared list, where any host may take
it (and, by taking the lease, become the account's owner). A host that finds an account owned by
another live host forwards the request there once; if the owner is not a live host, the caller gets
409 `owned_elsewhere`, never a second client.

Moves: a `move` request reaches the account's owner as any other; the owner closes the account and
hands the request over (`hand_over`) to a live worker child of the target host, which opens it
there and answers (worker/account_requests.py). A hand-over is taken once, like a forwarded copy.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Final

import redis.asyncio as aioredis

from ..errors import GatewayTimeout, PlatformError
from ..redis_auth import RedisAuth
from ..redis_keys import (
    HOST_REQUESTS_PREFIX,
    TELEGRAM_REQUESTS,
    WORKER_HEARTBEAT_PREFIX,
    account_lease,
    host_requests,
    request_claim,
    request_reply,
)

REQUEST_TTL: Final = 30
# The account request that downloads a received message's file (GET /api/incoming/{id}/file).
DOWNLOAD_INCOMING_FILE: Final = "download_incoming_file"
REPLY_WAIT_SLICE: Final = 10.0
REQUESTS_LIST_TTL: Final = 3600
# The additional data of a sealed request; a reply's names its request id (`reply_purpose`).
REQUEST_PURPOSE: Final = b"telegram-platform account request"

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


def reply_purpose(request_id: str) -> bytes:
    return b"telegram-platform account reply " + request_id.encode()


def open_request(auth: RedisAuth, blob: bytes | str) -> dict[str, Any] | None:
    """A request as `submit` sealed it; None (refused: logged, counted) when it is not one."""
    request = auth.open(blob, purpose=REQUEST_PURPOSE)
    if request is None or not isinstance(request.get("id"), str) or not isinstance(request.get("deadline"),
                                                                                     (int, float)):
        auth.refused("request", "an account request without a valid seal was refused", size=len(blob))
        return None
    return request


async def claim(redis: aioredis.Redis, auth: RedisAuth, request: dict[str, Any]) -> bool:
    """Take a request once: the first host to take it (or its forwarded copy) answers it; the same
    request pushed again before its deadline is refused (logged, counted). After its deadline no host
    acts on it at all, so the mark need not outlive it."""
    ttl = max(1, math.ceil(float(request["deadline"]) - time.time()) + 1)
    # A hand-over (a move) is its own hop: the request may have been forwarded to its owner first.
    marked = request.get("forwarded")
    hop = marked if isinstance(marked, str) else ("forwarded" if marked else "first")
    if await redis.set(request_claim(str(request["id"]), hop), b"1", nx=True, ex=ttl):
        return True
    auth.refused("request", "an account request taken before was refused (a replay)", op=request.get("op"))
    return False


async def submit(redis: aioredis.Redis, auth: RedisAuth, request: dict[str, Any]) -> str:
    """Push a request, sealed, to the host that owns its account (or the shared list); returns the
    list used."""
    target = await redis.eval(_ROUTE, 2, account_lease(int(request["account_id"])), TELEGRAM_REQUESTS,
                              auth.seal(request, purpose=REQUEST_PURPOSE), WORKER_HEARTBEAT_PREFIX,
                              HOST_REQUESTS_PREFIX, REQUESTS_LIST_TTL)
    return target.decode() if isinstance(target, bytes) else str(target)


async def forward(redis: aioredis.Redis, auth: RedisAuth, request: dict[str, Any], owner: str) -> None:
    """Hand a request to the host `owner`, marked so that it is not forwarded again."""
    key = host_requests(owner)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.rpush(key, auth.seal({**request, "forwarded": True}, purpose=REQUEST_PURPOSE))
        pipe.expire(key, REQUESTS_LIST_TTL)
        await pipe.execute()


HANDED_OVER: Final = "moved"
# A move is answered within this: the owner's close and snapshot, then the target's open.
MOVE_SECONDS: Final = 30.0


async def hand_over(redis: aioredis.Redis, auth: RedisAuth, request: dict[str, Any], worker: str) -> None:
    """Hand a move request to `worker`, a child of the target host, which opens the account."""
    key = host_requests(worker)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.rpush(key, auth.seal({**request, "forwarded": HANDED_OVER}, purpose=REQUEST_PURPOSE))
        pipe.expire(key, REQUESTS_LIST_TTL)
        await pipe.execute()


async def live_workers(redis: aioredis.Redis, host_id: str) -> list[str]:
    """The identities of the host's live worker children (`<host>/<slot>-<pid>`, heartbeat present)."""
    prefix = WORKER_HEARTBEAT_PREFIX + host_id + "/"
    keys = [key async for key in redis.scan_iter(match=prefix + "*", count=200)]
    return sorted((k.decode() if isinstance(k, bytes) else str(k))[len(WORKER_HEARTBEAT_PREFIX):] for k in keys)


async def reply(redis: aioredis.Redis, auth: RedisAuth, request_id: str, answer: dict[str, Any]) -> None:
    """Answer a request on its reply key, sealed for that request alone."""
    key = request_reply(request_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.rpush(key, auth.seal(answer, purpose=reply_purpose(request_id)))
        pipe.expire(key, REQUEST_TTL)
        await pipe.execute()


async def is_live_host(redis: aioredis.Redis, owner: str) -> bool:
    return bool(await redis.exists(WORKER_HEARTBEAT_PREFIX + owner))


async def call_host(redis: aioredis.Redis, auth: RedisAuth, op: str, account_id: int,
                    args: dict[str, Any] | None = None, *, timeout: float = 10.0) -> dict[str, Any]:
    """Ask the account's host to do `op` and wait for its answer (a forged answer is refused and the
    wait goes on)."""
    request_id = uuid.uuid4().hex
    deadline = time.time() + timeout
    await submit(redis, auth, {"id": request_id, "op": op, "account_id": account_id, "args": args or {},
                               "deadline": deadline})
    return await wait_reply(redis, auth, request_id, deadline, op=op, timeout=timeout)


async def wait_reply(redis: aioredis.Redis, auth: RedisAuth, request_id: str, deadline: float, *,
                     op: str, timeout: float) -> dict[str, Any]:
    """The answer to request `request_id`, waited for until `deadline` (time.time()): its result, or
    the host's error raised as HostError; GatewayTimeout (naming `timeout`, the wait asked for) when
    none came."""
    while True:
        # Waited in slices no longer than a Redis command may take (the API's client times out a
        # longer BLPOP), so a request that takes minutes (a download) is waited for as long as it says.
        left = deadline - time.time()
        answer = (await redis.blpop([request_reply(request_id)], timeout=min(REPLY_WAIT_SLICE, left))
                  if left > 0.01 else None)
        if answer is None:
            if deadline - time.time() > 0.01:
                continue  # a slice ended, the deadline has not
            raise GatewayTimeout("the worker did not answer in time (is tp-worker running?)",
                                 details={"op": op, "timeout": timeout})
        opened = auth.open(answer[1], purpose=reply_purpose(request_id))
        if opened is not None:
            break
        auth.refused("reply", "an account reply without a valid seal was refused", op=op)
    if "error" in opened:
        error = opened["error"]
        raise HostError(int(error["status"]), str(error["code"]), str(error["message"]), error.get("details"))
    result: dict[str, Any] = opened["result"]
    return result
