"""Users of the API and their refresh tokens."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from ..errors import Conflict
from .db import Queryable

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


async def issue_refresh_token(conn: Queryable, user_id: int, ttl: int) -> uuid.UUID:
    token_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO refresh_tokens (id, user_id, expires_at) VALUES ($1, $2, $3)",
        token_id, user_id, datetime.now(UTC) + timedelta(seconds=ttl),
    )
    return token_id


async def consume_refresh_token(conn: Queryable, token_id: uuid.UUID) -> int | None:
    """Revoke the token and return its user id, if it was live: each refresh token works once."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        """UPDATE refresh_tokens SET revoked_at = now()
           WHERE id = $1 AND revoked_at IS NULL AND expires_at > now()
           RETURNING user_id""",
        token_id,
    )


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
