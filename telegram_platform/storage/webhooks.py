"""Outbound webhooks and their deliveries.

Signing keys are stored sealed (AES-GCM, with a key derived from ENCRYPTION_KEY by HKDF): a copy of
the database alone cannot forge deliveries. The API shows a secret once, when it is created.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import NotFound
from ..states import WebhookDeliveryStatus
from .db import Queryable

WEBHOOK_COLUMNS = "id, url, events, description, active, created_at, updated_at"
DELIVERY_COLUMNS = ("id, webhook_id, event_type, payload, status, attempts, response_status, error, "
                    "next_attempt_at, delivered_at, created_at")
_AAD = b"telegram-platform webhook secret"


def _sealing_key(encryption_key: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"telegram-platform/webhook-secrets/v1")
    return AESGCM(hkdf.derive(encryption_key))


def seal_secret(encryption_key: bytes, secret: str) -> bytes:
    nonce = os.urandom(12)
    return nonce + _sealing_key(encryption_key).encrypt(nonce, secret.encode(), _AAD)


def open_secret(encryption_key: bytes, sealed: bytes) -> str:
    return _sealing_key(encryption_key).decrypt(sealed[:12], sealed[12:], _AAD).decode()


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def event_key(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def matches(patterns: list[str], event_type: str) -> bool:
    """`*` matches everything, `message.*` every `message.` type, anything else exactly."""
    for pattern in patterns:
        if pattern == "*" or pattern == event_type:
            return True
        if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
            return True
    return False


def _delivery(row: Any) -> dict[str, Any]:
    out = dict(row)
    if isinstance(out.get("payload"), str):
        out["payload"] = json.loads(out["payload"])
    return out


async def create_webhook(conn: Queryable, *, url: str, events: list[str], sealed_secret: bytes, description: str,
                         active: bool, created_by: int | None) -> dict[str, Any]:
    row = await conn.fetchrow(
        f"""INSERT INTO webhooks (url, events, secret_sealed, description, active, created_by)
            VALUES ($1, $2, $3, $4, $5, $6) RETURNING {WEBHOOK_COLUMNS}""",
        url, events, sealed_secret, description, active, created_by,
    )
    return dict(row)


async def list_webhooks(conn: Queryable) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY id")]


async def get_webhook(conn: Queryable, webhook_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1", webhook_id)
    if row is None:
        raise NotFound(f"webhook {webhook_id} not found")
    return dict(row)


async def update_webhook(conn: Queryable, webhook_id: int, *, url: str | None, events: list[str] | None,
                         sealed_secret: bytes | None, description: str | None, active: bool | None) -> dict[str, Any]:
    row = await conn.fetchrow(
        f"""UPDATE webhooks SET url = coalesce($2, url), events = coalesce($3, events),
                   secret_sealed = coalesce($4, secret_sealed), description = coalesce($5, description),
                   active = coalesce($6, active), updated_at = now()
            WHERE id = $1 RETURNING {WEBHOOK_COLUMNS}""",
        webhook_id, url, events, sealed_secret, description, active,
    )
    if row is None:
        raise NotFound(f"webhook {webhook_id} not found")
    return dict(row)


async def delete_webhook(conn: Queryable, webhook_id: int) -> None:
    if await conn.fetchval("DELETE FROM webhooks WHERE id = $1 RETURNING id", webhook_id) is None:
        raise NotFound(f"webhook {webhook_id} not found")


async def active_webhooks(conn: Queryable) -> list[dict[str, Any]]:
    """What the dispatcher matches events against (secrets stay sealed here)."""
    return [dict(r) for r in await conn.fetch("SELECT id, events FROM webhooks WHERE active ORDER BY id")]


async def add_delivery(conn: Queryable, webhook_id: int, key: bytes, event_type: str,
                       payload: dict[str, Any]) -> int | None:
    """Record a delivery to make; None if this event was already recorded for this webhook."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        """INSERT INTO webhook_deliveries (webhook_id, event_key, event_type, payload, next_attempt_at)
           VALUES ($1, $2, $3, $4::jsonb, now())
           ON CONFLICT (webhook_id, event_key) DO NOTHING RETURNING id""",
        webhook_id, key, event_type, json.dumps(payload, default=str),
    )


async def delivery_for_attempt(conn: Queryable, delivery_id: int) -> dict[str, Any] | None:
    """A pending delivery with its webhook's URL, sealed secret and state; None if none is pending."""
    row = await conn.fetchrow(
        """SELECT d.id, d.webhook_id, d.event_type, d.payload, d.attempts, d.created_at,
                  w.url, w.secret_sealed, w.active
           FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
           WHERE d.id = $1 AND d.status = 'pending'""",
        delivery_id,
    )
    return _delivery(row) if row is not None else None


async def record_attempt(conn: Queryable, delivery_id: int, *, status: WebhookDeliveryStatus,
                         response_status: int | None, error: str | None, retry_in: float | None) -> None:
    await conn.execute(
        """UPDATE webhook_deliveries SET status = $2, attempts = attempts + 1, response_status = $3, error = $4,
                  next_attempt_at = CASE WHEN $5::float8 IS NULL THEN NULL
                                         ELSE now() + make_interval(secs => $5::float8) END,
                  delivered_at = CASE WHEN $2 = 'delivered' THEN now() ELSE delivered_at END
           WHERE id = $1""",
        delivery_id, status, response_status, error, retry_in,
    )


async def list_deliveries(conn: Queryable, webhook_id: int, *, status: str | None, before_id: int | None,
                          limit: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"""SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries
            WHERE webhook_id = $1 AND ($2::text IS NULL OR status = $2) AND ($3::bigint IS NULL OR id < $3)
            ORDER BY id DESC LIMIT $4""",
        webhook_id, status, before_id, limit,
    )
    return [_delivery(r) for r in rows]


async def get_delivery(conn: Queryable, delivery_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1", delivery_id)
    if row is None:
        raise NotFound(f"delivery {delivery_id} not found")
    return _delivery(row)
