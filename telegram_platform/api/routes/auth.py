"""Login and token refresh."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from ...errors import TooManyRequests, Unauthorized
from ...storage import users
from ..endpoints import Api, Call
from ..keys import DB, PASSWORDS, REDIS, SETTINGS, TOKENS
from ..schemas import LoginRequest, RefreshRequest, TokenPair
from ..security import Principal

api = Api()

LOGIN_WINDOW = 300
MAX_FAILURES_PER_USERNAME = 10
MAX_FAILURES_PER_ADDRESS = 50


def _attempt_keys(request: web.Request, username: str) -> tuple[str, str]:
    return f"tp:login:user:{username.lower()}", f"tp:login:addr:{request.remote or 'unknown'}"


async def _refuse_if_limited(request: web.Request, username: str) -> None:
    """Failed logins are counted per username and per address (fixed windows shared by every API
    process); past the limit, even the right password waits for the window to end."""
    redis = request.app[REDIS]
    user_key, addr_key = _attempt_keys(request, username)
    per_user, per_addr = await redis.mget([user_key, addr_key])
    for key, count, limit in ((user_key, per_user, MAX_FAILURES_PER_USERNAME),
                              (addr_key, per_addr, MAX_FAILURES_PER_ADDRESS)):
        if count is not None and int(count) >= limit:
            ttl = await redis.ttl(key)
            raise TooManyRequests("too many failed logins; try again later", retry_after=max(1, ttl))


async def _count_failure(request: web.Request, username: str) -> None:
    async with request.app[REDIS].pipeline(transaction=False) as pipe:
        for key in _attempt_keys(request, username):
            pipe.incr(key)
            pipe.expire(key, LOGIN_WINDOW, nx=True)
        await pipe.execute()


async def _issue(request: web.Request, principal: Principal) -> TokenPair:
    settings = request.app[SETTINGS]
    refresh = await users.issue_refresh_token(request.app[DB], principal.user_id, settings.refresh_token_ttl)
    tokens = request.app[TOKENS]
    return TokenPair(access_token=tokens.issue_access(principal), refresh_token=str(refresh),
                     expires_in=tokens.access_ttl)


@api.route("POST", "/api/auth/login", summary="Exchange a username and password for tokens", role=None,
           body=LoginRequest, response=TokenPair, tags=("auth",), errors=(401, 429))
async def login(request: web.Request, call: Call[LoginRequest, None]) -> Any:
    await _refuse_if_limited(request, call.body.username)
    user = await users.get_by_username(request.app[DB], call.body.username)
    valid = await request.app[PASSWORDS].verify(user.password_hash if user else None, call.body.password)
    if user is None or not valid or user.disabled:
        await _count_failure(request, call.body.username)
        raise Unauthorized("invalid username or password")
    return await _issue(request, Principal(user.id, user.username, user.role, user.token_version))


@api.route("POST", "/api/auth/refresh", summary="Exchange a refresh token (used once) for new tokens",
           role=None, body=RefreshRequest, response=TokenPair, tags=("auth",), errors=(401,))
async def refresh(request: web.Request, call: Call[RefreshRequest, None]) -> Any:
    try:
        token_id = uuid.UUID(call.body.refresh_token)
    except ValueError:
        raise Unauthorized("invalid refresh token") from None
    user_id = await users.consume_refresh_token(request.app[DB], token_id)
    user = await users.get_user(request.app[DB], user_id) if user_id is not None else None
    if user is None or user.disabled:
        raise Unauthorized("invalid refresh token")
    return await _issue(request, Principal(user.id, user.username, user.role, user.token_version))
