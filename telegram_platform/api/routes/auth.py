"""Login and token refresh."""

from __future__ import annotations

import uuid
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from ...errors import TooManyRequests, Unauthorized
from ...redis_keys import login_attempts
from ...storage import users
from ..endpoints import Api, Call
from ..keys import DB, PASSWORDS, REDIS, SETTINGS, TOKENS
from ..proxies import client_address
from ..schemas.auth import LoginRequest, RefreshRequest, TokenPair
from ..security import Principal

api = Api()

# Failures allowed per (username, client address) before each attempt must wait; the wait starts at
# a second and doubles after each further failure, up to MAX_WAIT_MS. Per pair, so an attacker holds
# back only their own address, never the user (an admin included) everywhere else.
FREE_FAILURES = 5
FIRST_WAIT_MS = 1000
MAX_WAIT_MS = 15 * 60 * 1000
# Failures are forgotten after this long without one (or at once on a success).
FAILURE_MEMORY = 86_400
# Failed logins per address across usernames (fixed window): credential stuffing from one address.
LOGIN_WINDOW = 300
MAX_FAILURES_PER_ADDRESS = 50

# Reserve an attempt before its password is checked, so that concurrent attempts cannot all pass
# the check before the first failure is counted: each counts as a failure until it succeeds.
# KEYS: the pair's failures, the pair's wait, the address's failures.
# ARGV: free failures, first wait (ms), max wait (ms), failure memory (s), address window (s),
# address limit. Returns {1, 0} when reserved, else {0, milliseconds to wait}.
_RESERVE = """
local wait = redis.call('PTTL', KEYS[2])
if wait > 0 then return {0, wait} end
local per_address = tonumber(redis.call('GET', KEYS[3]) or '0')
if per_address >= tonumber(ARGV[6]) then return {0, math.max(1000, redis.call('PTTL', KEYS[3]))} end
local failures = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[5], 'NX')
local free = tonumber(ARGV[1])
if failures >= free then
  local ms = math.min(tonumber(ARGV[3]), tonumber(ARGV[2]) * 2 ^ math.min(failures - free, 30))
  redis.call('SET', KEYS[2], '1', 'PX', math.floor(ms))
end
return {1, 0}
"""
# A success: forget the pair's failures, and take the reserved attempt off the address's count
# (never below zero, never reviving a window that has ended). KEYS: as _RESERVE's.
_FORGIVE = """
redis.call('DEL', KEYS[1], KEYS[2])
if tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then redis.call('DECR', KEYS[3]) end
return 1
"""


async def _reserve_attempt(redis: aioredis.Redis, keys: list[str]) -> None:
    """Count this attempt as a failure now, or refuse it (429) while its pair or address must wait:
    even the right password waits (shared by every API process, in Redis)."""
    reserved, wait_ms = await redis.eval(_RESERVE, 3, *keys, FREE_FAILURES, FIRST_WAIT_MS, MAX_WAIT_MS,
                                         FAILURE_MEMORY, LOGIN_WINDOW, MAX_FAILURES_PER_ADDRESS)
    if not reserved:
        raise TooManyRequests("too many failed logins; try again later", retry_after=max(1, -(-int(wait_ms) // 1000)))


async def _forgive(redis: aioredis.Redis, keys: list[str]) -> None:
    """A success: the pair starts afresh, and the reserved attempt was no failure of the address."""
    await redis.eval(_FORGIVE, 3, *keys)


async def _issue(request: web.Request, principal: Principal, family_id: uuid.UUID | None = None) -> TokenPair:
    """Tokens for the principal; the refresh token joins `family_id` (a refresh), else starts a
    family (a login)."""
    settings = request.app[SETTINGS]
    refresh = await users.issue_refresh_token(request.app[DB], principal.user_id, settings.auth.refresh_token_ttl,
                                              family_id)
    tokens = request.app[TOKENS]
    return TokenPair(access_token=tokens.issue_access(principal), refresh_token=str(refresh),
                     expires_in=tokens.access_ttl)


@api.route("POST", "/api/auth/login", summary="Exchange a username and password for tokens", role=None,
           body=LoginRequest, response=TokenPair, tags=("auth",), errors=(401, 429))
async def login(request: web.Request, call: Call[LoginRequest, None]) -> Any:
    """Limited per (username, client address), the address read through TP_TRUSTED_PROXIES: after
    five failures each attempt waits (429, `Retry-After`), from a second doubling to 15 minutes."""
    redis = request.app[REDIS]
    keys = login_attempts(call.body.username, client_address(request, request.app[SETTINGS].api.trusted_proxies))
    await _reserve_attempt(redis, keys)
    user = await users.get_by_username(request.app[DB], call.body.username)
    valid = await request.app[PASSWORDS].verify(user.password_hash if user else None, call.body.password)
    if user is None or not valid or user.disabled:
        raise Unauthorized("invalid username or password")  # counted already, by the reservation
    await _forgive(redis, keys)
    return await _issue(request, Principal(user.id, user.username, user.role, user.token_version))


@api.route("POST", "/api/auth/refresh", summary="Exchange a refresh token (used once) for new tokens",
           role=None, body=RefreshRequest, response=TokenPair, tags=("auth",), errors=(401,))
async def refresh(request: web.Request, call: Call[RefreshRequest, None]) -> Any:
    """A refresh token works once; one presented again after it was spent revokes every token of its
    login (storage/users.py), so a stolen copy ends the session for thief and victim alike."""
    spent = await users.consume_refresh_token(request.app[DB], call.body.refresh_token)
    user = await users.get_user(request.app[DB], spent[0]) if spent is not None else None
    if spent is None or user is None or user.disabled:
        raise Unauthorized("invalid refresh token")
    return await _issue(request, Principal(user.id, user.username, user.role, user.token_version), spent[1])
