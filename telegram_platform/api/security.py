"""Passwords (Argon2id) and tokens (HS256 JWT access tokens, revocable opaque refresh tokens).

An access token names the user's token version it was issued at (`ver`); a demotion or disabling
increments the version (storage/users.py), and `TokenService.revoke` makes this process refuse every
token of that user issued before (api/revocations.py tells every process)."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

import argon2
import jwt

from ..errors import Unauthorized

ALGORITHM = "HS256"
# Seconds a token's times (`exp`, `iat`, `nbf`) may be off, for hosts whose clocks differ a little.
CLOCK_LEEWAY = 30
ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: int
    username: str
    role: str
    token_version: int = 0
    # When the token this caller showed expires (Unix seconds): a WebSocket it opened closes then.
    expires_at: float = field(default=math.inf, compare=False)

    def may(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


# Argon2 computations a process runs at once; more wait their turn, so a flood of logins costs a
# bounded share of the CPU and memory instead of all the default thread pool.
MAX_CONCURRENT_HASHES = 4


class Passwords:
    """Argon2id hashing, run off the event loop: one hash costs tens of milliseconds by design."""

    def __init__(self, *, max_concurrent: int = MAX_CONCURRENT_HASHES) -> None:
        self._hasher = argon2.PasswordHasher()
        # Verifying against this keeps an unknown username as slow as a wrong password.
        self._dummy = self._hasher.hash("not-a-real-password")
        self._slots = asyncio.Semaphore(max_concurrent)

    def hash_sync(self, password: str) -> str:
        return self._hasher.hash(password)

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        def check() -> bool:
            try:
                return self._hasher.verify(password_hash or self._dummy, password) and password_hash is not None
            except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
                return False

        async with self._slots:
            return await asyncio.to_thread(check)


# Verified access tokens kept per process: clients send the same token many times, and an HMAC
# check plus JSON decoding costs more than the rest of the request pipeline. Expiry is still checked.
VERIFIED_CACHE_SIZE = 4096


class TokenService:
    def __init__(self, secret: str, access_ttl: int) -> None:
        self._secret = secret
        self.access_ttl = access_ttl
        self._verified: dict[str, tuple[Principal, float]] = {}
        # user id -> the lowest token version still accepted; users never changed are absent.
        self._versions: dict[int, int] = {}

    def issue_access(self, principal: Principal) -> str:
        now = int(time.time())
        claims = {"sub": str(principal.user_id), "name": principal.username, "role": principal.role,
                  "ver": principal.token_version, "typ": "access", "iat": now, "exp": now + self.access_ttl}
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def revoke(self, user_id: int, version: int) -> bool:
        """Refuse the user's tokens of versions below `version` from now on; False if already so.
        Verified tokens are forgotten here, so the per-request path (the cache) needs no check."""
        if self.version_of(user_id) >= version:
            return False
        self._versions[user_id] = version
        for token, (principal, _) in list(self._verified.items()):
            if principal.user_id == user_id and principal.token_version < version:
                del self._verified[token]
        return True

    def version_of(self, user_id: int) -> int:
        """The lowest token version this process accepts for the user (0: never revoked)."""
        return self._versions.get(user_id, 0)

    def verify_access(self, token: str) -> Principal:
        cached = self._verified.get(token)
        if cached is not None:
            if cached[1] > time.time():
                return cached[0]
            del self._verified[token]
        principal, expires = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (principal, expires)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            # An explicit allow-list: `alg: none` and every other algorithm are refused.
            claims: dict[str, Any] = jwt.decode(token, self._secret, algorithms=[ALGORITHM],
                                                options={"require": ["exp", "sub", "role"]}, leeway=CLOCK_LEEWAY)
        except jwt.ExpiredSignatureError:
            raise Unauthorized("access token expired") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("invalid access token") from None
        version = claims.get("ver", 0)  # tokens issued before versions existed carry none: version 0
        if claims.get("typ") != "access" or claims.get("role") not in ROLE_RANK or type(version) is not int:
            raise Unauthorized("invalid access token")
        user_id = int(claims["sub"])
        if version < self._versions.get(user_id, 0):
            raise Unauthorized("access token revoked: sign in again")
        expires = float(claims["exp"])
        # The principal expires at `exp` (a WebSocket is told and closed then); the verification,
        # cached, holds until the leeway is past too.
        principal = Principal(user_id, str(claims.get("name", "")), str(claims["role"]), version, expires)
        return principal, expires + CLOCK_LEEWAY
