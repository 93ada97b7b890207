"""Users of the API and their refresh tokens.

A refresh token is 32 random bytes (URL-safe text) given to the client once and stored only as its
SHA-256. Each is spent by its use, and carries its family: the tokens descended from one login. A
spent token presented again means two parties hold that family (a stolen token, or the victim's
copy once the thief used it): the whole family is revoked, and both must sign in again.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog

from ..errors import Conflict
from .db import Queryable

log = structlog.get_logger(__name__)

ROLES = ("admin", "operator", "viewer")


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    role: str
    disabled: bool
    password_hash: str
    created_at: datetime
    # What this user's access tokens must carry to be accepted (migration 0004).
    token_version: int = 0


def _user(row: asyncpg.Record) -> User:
    return User(row["id"], row["username"], row["role"], row["disabled"], row["password_hash"], row["created_at"],
                row["token_version"])


async def create_user(conn: Queryable, username: str, password_hash: str, role: str) -> User:
    try:
        row = await conn.fetchrow(
            "INSERT INTO users (username, password_hash, role) VALUES ($1, $2, $3) RETURNING *",
            username, password_hash, role,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"user {username!r} already exists", details={"field": "username"}) from None
    return _user(row)


async def get_by_username(conn: Queryable, username: str) -> User | None:
    row = await conn.fetchrow("SELECT * FROM users WHERE username = $1", username)
    return _user(row) if row else None


async def get_user(conn: Queryable, user_id: int) -> User | None:
    row = await conn.fetchrow("SELECT * FROM users WHERE id = $1", user_id)
    return _user(row) if row else None


def refresh_token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def issue_refresh_token(conn: Queryable, user_id: int, ttl: int, family_id: uuid.UUID | None = None) -> str:
    """A new refresh token (the only time it exists in clear), of `family_id`, or of a new family
    for a login."""
    token = secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO refresh_tokens (id, user_id, expires_at, token_hash, family_id) VALUES ($1, $2, $3, $4, $5)",
        uuid.uuid4(), user_id, datetime.now(UTC) + timedelta(seconds=ttl), refresh_token_hash(token),
        family_id or uuid.uuid4(),
    )
    return token


async def consume_refresh_token(conn: asyncpg.Pool | asyncpg.Connection, token: str) -> tuple[int, uuid.UUID] | None:
    """Spend the token: (its user id, its family) if it was live, else None. Each works once; one
    already spent revokes its whole family (theft detection)."""
    async with _connection(conn) as connection, connection.transaction():
        row = await connection.fetchrow(
            """SELECT id, user_id, family_id, revoked_at, expires_at > now() AS live FROM refresh_tokens
               WHERE token_hash = $1 FOR UPDATE""",
            refresh_token_hash(token),
        )
        if row is None:
            return None
        if row["revoked_at"] is not None:
            revoked = await connection.fetchval(
                """WITH family AS (UPDATE refresh_tokens SET revoked_at = now()
                                   WHERE family_id = $1 AND revoked_at IS NULL RETURNING 1)
                   SELECT count(*) FROM family""", row["family_id"])
            if revoked:
                log.warning("a spent refresh token was used again: its family is revoked", user_id=row["user_id"],
                            revoked=revoked)
            return None
        if not row["live"]:
            return None
        await connection.execute("UPDATE refresh_tokens SET revoked_at = now() WHERE id = $1", row["id"])
        return int(row["user_id"]), row["family_id"]


@contextlib.asynccontextmanager
async def _connection(conn: asyncpg.Pool | asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the pool for one transaction, or the connection given."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as acquired:
            yield acquired
    else:
        yield conn


async def token_versions(conn: Queryable) -> dict[int, int]:
    """Every user whose access tokens were ever revoked, with the version their tokens need now."""
    return {row["id"]: row["token_version"]
            for row in await conn.fetch("SELECT id, token_version FROM users WHERE token_version > 0")}


async def list_users(conn: Queryable) -> list[User]:
    return [_user(row) for row in await conn.fetch("SELECT * FROM users ORDER BY id")]


async def revoke_refresh_tokens(conn: Queryable, user_id: int) -> None:
    """Sign the user out everywhere: no refresh token of theirs works again."""
    await conn.execute("UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
                       user_id)


async def update_user(
    pool: asyncpg.Pool, user_id: int, *, role: str | None = None, disabled: bool | None = None,
    password_hash: str | None = None,
) -> User | None:
    """Change a user's role, disabled flag or password; None if there is no such user.

    The last enabled admin can be neither demoted nor disabled (Conflict): someone must remain able
    to manage users. Every change revokes the user's refresh tokens. One that takes rights away (a
    lower role, disabling) also increments their token version, which their access tokens must
    match: they lose access at once (the caller announces the version: api/revocations.py). A new
    password or more rights leave current access tokens to their short life, so that an admin who
    changes their own password is not signed out of the session they did it from."""
    async with pool.acquire() as conn, conn.transaction():
        # Lock every enabled admin row: two concurrent demotions cannot both see "another admin".
        admins = {row["id"] for row in await conn.fetch(
            "SELECT id FROM users WHERE role = 'admin' AND NOT disabled ORDER BY id FOR UPDATE")}
        row = await conn.fetchrow("SELECT * FROM users WHERE id = $1 FOR UPDATE", user_id)
        if row is None:
            return None
        loses_admin = (role is not None and role != "admin") or disabled is True
        if user_id in admins and loses_admin and len(admins) == 1:
            raise Conflict("the last enabled admin cannot be demoted or disabled",
                           details={"field": "role" if role is not None and role != "admin" else "disabled"})
        loses_rights = ((role is not None and ROLES.index(role) > ROLES.index(row["role"]))
                        or (disabled is True and not row["disabled"]))
        updated = await conn.fetchrow(
            """UPDATE users SET role = coalesce($2, role), disabled = coalesce($3, disabled),
                      password_hash = coalesce($4, password_hash), token_version = token_version + $5,
                      updated_at = now()
               WHERE id = $1 RETURNING *""",
            user_id, role, disabled, password_hash, int(loses_rights),
        )
        await revoke_refresh_tokens(conn, user_id)
    return _user(updated)
