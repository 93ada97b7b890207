"""Telegram accounts as the platform records them (the live session lives in the worker).

A proxy's password and MTProto secret are write-only: stored sealed (AES-GCM, the scheme of webhook
secrets with a key of their own derived from ENCRYPTION_KEY), read back as `has_password` /
`has_secret` only, and unsealed for the worker's session alone (`session_proxy`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import asyncpg
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import Conflict, NotFound
from . import campaigns as campaign_store
from .db import Queryable

ACCOUNT_COLUMNS = (
    "id, phone, auth_state, connection_state, proxy, telegram_user_id, paused_until, "
    "peer_flood_until, last_error, created_at, updated_at"
)


PROXY_CREDENTIALS = ("password", "secret")
_PROXY_AAD = b"telegram-platform proxy credentials"


def _proxy_sealing_key(encryption_key: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"telegram-platform/proxy-credentials/v1")
    return AESGCM(hkdf.derive(encryption_key))


def _seal_credentials(encryption_key: bytes, credentials: dict[str, str]) -> bytes:
    nonce = os.urandom(12)
    return nonce + _proxy_sealing_key(encryption_key).encrypt(nonce, json.dumps(credentials).encode(), _PROXY_AAD)


def _open_credentials(encryption_key: bytes, sealed: bytes) -> dict[str, str]:
    opened: dict[str, str] = json.loads(
        _proxy_sealing_key(encryption_key).decrypt(sealed[:12], sealed[12:], _PROXY_AAD))
    return opened


def split_proxy(proxy: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The proxy as anyone may read it (flags for the credentials) and its credentials."""
    credentials = {name: str(proxy[name]) for name in PROXY_CREDENTIALS if proxy.get(name)}
    readable = {key: value for key, value in proxy.items() if key not in PROXY_CREDENTIALS}
    readable["has_password"] = "password" in credentials
    readable["has_secret"] = "secret" in credentials
    return readable, credentials


def account_dict(row: asyncpg.Record) -> dict[str, Any]:
    data = dict(row)
    if isinstance(data.get("proxy"), str):
        data["proxy"] = json.loads(data["proxy"])
    return data


async def create_account(conn: Queryable, phone: str, proxy: dict[str, Any] | None, *,
                         encryption_key: bytes | None = None) -> dict[str, Any]:
    """`proxy` as given; its credentials, if any, are sealed with `encryption_key` (required then)."""
    readable, sealed = None, None
    if proxy:
        readable, credentials = split_proxy(proxy)
        if credentials:
            if encryption_key is None:
                raise ValueError("a proxy with credentials needs the encryption key to seal them")
            sealed = _seal_credentials(encryption_key, credentials)
    try:
        row = await conn.fetchrow(
            "INSERT INTO accounts (phone, proxy, proxy_credentials_sealed) VALUES ($1, $2::jsonb, $3) "
            f"RETURNING {ACCOUNT_COLUMNS}",
            phone, json.dumps(readable) if readable else None, sealed,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict("an account with this phone already exists", details={"field": "phone"}) from None
    return account_dict(row)


async def get_account(conn: Queryable, account_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1", account_id)
    if row is None:
        raise NotFound(f"account {account_id} not found")
    return account_dict(row)


async def list_accounts(conn: Queryable) -> list[dict[str, Any]]:
    rows = await conn.fetch(f"SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY id")
    return [account_dict(r) for r in rows]


async def seal_clear_proxy_credentials(conn: Queryable, encryption_key: bytes) -> int:
    """Seal the proxy credentials migration 0010 moved out of the readable proxy (stored in clear
    before it); the number of accounts sealed. Idempotent, and cheap when there are none."""
    rows = await conn.fetch(
        "SELECT id, proxy_credentials_clear FROM accounts WHERE proxy_credentials_clear IS NOT NULL")
    for row in rows:
        clear = row["proxy_credentials_clear"]
        credentials = json.loads(clear) if isinstance(clear, str) else dict(clear)
        await conn.execute(
            "UPDATE accounts SET proxy_credentials_sealed = $2, proxy_credentials_clear = NULL "
            "WHERE id = $1 AND proxy_credentials_clear IS NOT NULL",
            row["id"], _seal_credentials(encryption_key, credentials))
    return len(rows)


async def session_proxy(conn: Queryable, encryption_key: bytes, account_id: int) -> dict[str, Any] | None:
    """The account's proxy with its credentials unsealed, for the worker's session only (never an
    answer, never a log line); None without a proxy."""
    row = await conn.fetchrow("SELECT proxy, proxy_credentials_sealed, proxy_credentials_clear FROM accounts "
                              "WHERE id = $1", account_id)
    if row is None:
        raise NotFound(f"account {account_id} not found")
    if row["proxy"] is None:
        return None
    if row["proxy_credentials_clear"] is not None:  # left in clear by migration 0010: seal them now
        await seal_clear_proxy_credentials(conn, encryption_key)
        return await session_proxy(conn, encryption_key, account_id)
    proxy = row["proxy"]
    proxy = json.loads(proxy) if isinstance(proxy, str) else dict(proxy)
    proxy.pop("has_password", None)
    proxy.pop("has_secret", None)
    sealed = row["proxy_credentials_sealed"]
    if sealed is not None:
        proxy.update(_open_credentials(encryption_key, sealed))
    return proxy


async def take_ownership(conn: Queryable, account_id: int, host_id: str) -> int:
    """The account's next owner token, for a host that has just taken its lease: from now on the
    state writes of every earlier owner are refused (migration 0006), and the account is counted as
    `host_id`'s (migration 0014)."""
    token = await conn.fetchval(
        "UPDATE accounts SET owner_token = owner_token + 1, owner_host = $2 WHERE id = $1 RETURNING owner_token",
        account_id, host_id)
    if token is None:
        raise NotFound(f"account {account_id} not found")
    return int(token)


async def let_go(conn: Queryable, owned: dict[int, int]) -> None:
    """The owners of these accounts (id -> owner token) closed them and let their leases go: no host
    owns them now. An account another owner took since keeps that owner."""
    if owned:
        await conn.execute(
            """UPDATE accounts a SET owner_host = NULL FROM unnest($1::bigint[], $2::bigint[]) AS t(id, token)
               WHERE a.id = t.id AND a.owner_token = t.token""",
            list(owned), list(owned.values()))


async def owner_token_of(conn: Queryable, account_id: int) -> int | None:
    """The token of the account's latest owner (None: the account is gone)."""
    token = await conn.fetchval("SELECT owner_token FROM accounts WHERE id = $1", account_id)
    return None if token is None else int(token)


async def set_auth_state(conn: Queryable, account_id: int, state: str, *, owner_token: int,
                         only_from: str | None = None) -> bool:
    """Write the account's auth state as its owner `owner_token` saw it (only over `only_from`, when
    given); False when another host owns the account now."""
    status = await conn.execute(
        """UPDATE accounts SET updated_at = now(),
                  auth_state = CASE WHEN $4::text IS NULL OR auth_state = $4 THEN $2 ELSE auth_state END
           WHERE id = $1 AND owner_token = $3""",
        account_id, state, owner_token, only_from,
    )
    return bool(status != "UPDATE 0")


async def set_connection_state(conn: Queryable, account_id: int, state: str, *, owner_token: int) -> bool:
    """Like `set_auth_state`, for the connection state."""
    status = await conn.execute(
        "UPDATE accounts SET connection_state = $2, updated_at = now() WHERE id = $1 AND owner_token = $3",
        account_id, state, owner_token,
    )
    return bool(status != "UPDATE 0")


async def set_telegram_user_id(conn: Queryable, account_id: int, user_id: int, *, owner_token: int) -> bool:
    """Record the account's Telegram user id as its owner `owner_token` learned it; True when that
    changed what was recorded."""
    status = await conn.execute(
        """UPDATE accounts SET telegram_user_id = $2, updated_at = now()
           WHERE id = $1 AND owner_token = $3 AND telegram_user_id IS DISTINCT FROM $2""",
        account_id, user_id, owner_token,
    )
    return bool(status != "UPDATE 0")


async def set_last_error(conn: Queryable, account_id: int, error: str | None, *, owner_token: int) -> bool:
    """Record why the account's session changed without being asked to (None: it is well again), as
    its owner `owner_token` saw it; True when that changed what was recorded."""
    status = await conn.execute(
        """UPDATE accounts SET last_error = $2, updated_at = now()
           WHERE id = $1 AND owner_token = $3 AND last_error IS DISTINCT FROM $2""",
        account_id, error, owner_token,
    )
    return bool(status != "UPDATE 0")


async def note_login_not_started(conn: Queryable, account_id: int, reason: str) -> None:
    """A new account whose login no worker took (Redis away, no worker answering): kept, with why,
    for the operator to start it again (`POST /api/accounts/{id}/auth/login`). Only while nothing
    has happened to it since: an owner that did take the login writes its own state."""
    await conn.execute(
        """UPDATE accounts SET last_error = $2, updated_at = now()
           WHERE id = $1 AND auth_state = 'wait_phone' AND owner_token = 0""",
        account_id, reason)


async def delete_account(pool: asyncpg.Pool, account_id: int) -> None:
    """Remove the account. Its messages stay as the record of what it sent (account_id NULL), so
    its campaigns' progress does not change. What could still go out is settled first: its
    campaign messages go back to their campaigns' other accounts (failed as unknown where only this
    account could re-send them), its other queued messages are cancelled, and a send caught in
    flight is recorded as an unknown outcome. The account's row is locked first: a message being
    assigned to it meanwhile waits, then finds the account gone."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account_id)
        for row in await conn.fetch("""SELECT DISTINCT campaign_id FROM messages
                                       WHERE account_id = $1 AND status = 'queued' AND campaign_id IS NOT NULL""",
                                    account_id):
            await campaign_store.release_account(conn, row["campaign_id"], account_id)
            await campaign_store.fail_stranded(conn, row["campaign_id"], account_id, "the account was removed")
        await conn.execute(
            """UPDATE messages SET status = 'cancelled', error = 'account removed', updated_at = now()
               WHERE account_id = $1 AND status = 'queued'""", account_id)
        await conn.execute(
            """UPDATE messages SET status = 'failed', error_class = 'unknown', delivery_unknown = true,
                      error = 'outcome unknown: the account was removed during the send', updated_at = now()
               WHERE account_id = $1 AND status = 'sending'""", account_id)
        await conn.execute("DELETE FROM accounts WHERE id = $1", account_id)
