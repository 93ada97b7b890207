"""Outbound webhooks and their deliveries.

Signing keys are stored sealed (AES-GCM, with a key derived from ENCRYPTION_KEY by HKDF): a copy of
the database alone cannot forge deliveries. The API shows a secret once, when it is created.

Each webhook carries its circuit breaker (migration 0011): the row is the truth, each transition is
one transaction here, and its caller publishes the event (`webhook.paused`, `webhook.resumed`) once
it is committed, as the outbox does for messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import Conflict, NotFound
from ..states import WebhookBreakerState, WebhookDeliveryStatus
from .db import Queryable

WEBHOOK_COLUMNS = ("id, url, events, description, active, created_at, updated_at, breaker_state, "
                   "consecutive_failures, failing_since, paused_at, paused_until")
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


def _webhook(row: Any) -> dict[str, Any]:
    """A webhook as the API shows it: its breaker's fields gathered under `breaker`."""
    out = dict(row)
    out["breaker"] = {"state": out.pop("breaker_state"), "consecutive_failures": out.pop("consecutive_failures"),
                      "failing_since": out.pop("failing_since"), "paused_at": out.pop("paused_at"),
                      "probe_at": out.pop("paused_until")}
    return out


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
    return _webhook(row)


async def list_webhooks(conn: Queryable) -> list[dict[str, Any]]:
    return [_webhook(r) for r in await conn.fetch(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY id")]


async def get_webhook(conn: Queryable, webhook_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1", webhook_id)
    if row is None:
        raise NotFound(f"webhook {webhook_id} not found")
    return _webhook(row)


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
    return _webhook(row)


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
    """A pending delivery with its webhook's URL, sealed secret, state and breaker; None if none is
    pending."""
    row = await conn.fetchrow(
        """SELECT d.id, d.webhook_id, d.event_type, d.payload, d.attempts, d.created_at,
                  w.url, w.secret_sealed, w.active, w.breaker_state
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


# -- the circuit breaker ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Breaker:
    """When a webhook is paused: after `failures` failed attempts in a row spanning at least
    `failing_seconds`; probed `cooldown_seconds` after it was paused (and after a failed probe)."""

    failures: int
    failing_seconds: float
    cooldown_seconds: float


async def claim_probe(conn: Queryable, webhook_id: int, delivery_id: int) -> bool:
    """A half-open webhook's one probe: True if this delivery is it (it was free, or is this one)."""
    return await conn.fetchval(
        """UPDATE webhooks SET probe_delivery_id = $2
           WHERE id = $1 AND breaker_state = 'half_open' AND (probe_delivery_id IS NULL OR probe_delivery_id = $2)
           RETURNING true""",
        webhook_id, delivery_id) is not None


async def record_outcome(pool: asyncpg.Pool, delivery_id: int, webhook_id: int, *, status: WebhookDeliveryStatus,
                         response_status: int | None, error: str | None, retry_in: float | None,
                         breaker: Breaker) -> dict[str, Any] | None:
    """Record an attempt and what it means for the webhook's breaker, in one transaction. A success
    closes the breaker (its held deliveries are released); a failure adds to the failures in a row,
    and opens the breaker past `breaker`'s bounds, or again after a failed probe. Returns the
    webhook's breaker when this attempt paused or resumed it (`transition` says which), for the
    caller to publish once committed; else None."""
    async with pool.acquire() as conn, conn.transaction():
        await record_attempt(conn, delivery_id, status=status, response_status=response_status, error=error,
                             retry_in=retry_in)
        hook = await conn.fetchrow(
            """SELECT breaker_state, consecutive_failures, failing_since, probe_delivery_id,
                      extract(epoch FROM now() - failing_since) AS failing_for
               FROM webhooks WHERE id = $1 FOR UPDATE""", webhook_id)
        if hook is None:
            return None
        state = hook["breaker_state"]
        if error is None:
            if state == WebhookBreakerState.CLOSED and hook["consecutive_failures"] == 0:
                return None  # nothing to reset: a healthy webhook's row is not rewritten per delivery
            row = await conn.fetchrow(
                """UPDATE webhooks SET consecutive_failures = 0, failing_since = NULL,
                          breaker_state = 'closed', paused_at = NULL, paused_until = NULL, probe_delivery_id = NULL,
                          release_held = release_held OR breaker_state <> 'closed'
                   WHERE id = $1 RETURNING id, consecutive_failures, failing_since""", webhook_id)
            return {**dict(row), "transition": "resumed"} if state != WebhookBreakerState.CLOSED else None
        failures = hook["consecutive_failures"] + 1
        failing_for = float(hook["failing_for"] or 0.0)
        trips = (state == WebhookBreakerState.CLOSED and failures >= breaker.failures
                 and failing_for >= breaker.failing_seconds)
        probe_failed = state == WebhookBreakerState.HALF_OPEN and hook["probe_delivery_id"] == delivery_id
        row = await conn.fetchrow(
            """UPDATE webhooks SET consecutive_failures = consecutive_failures + 1,
                      failing_since = coalesce(failing_since, now()),
                      breaker_state = CASE WHEN $2 THEN 'open' ELSE breaker_state END,
                      paused_at = CASE WHEN $2 AND breaker_state = 'closed' THEN now() ELSE paused_at END,
                      paused_until = CASE WHEN $2 THEN now() + make_interval(secs => $3::float8)
                                          ELSE paused_until END,
                      probe_delivery_id = CASE WHEN $2 THEN NULL ELSE probe_delivery_id END
               WHERE id = $1 RETURNING id, consecutive_failures, failing_since, paused_until""",
            webhook_id, trips or probe_failed, breaker.cooldown_seconds)
        return {**dict(row), "transition": "paused"} if trips else None


async def resume(pool: asyncpg.Pool, webhook_id: int) -> dict[str, Any]:
    """An admin closes a webhook's breaker: its held deliveries are released. Conflict if it is not
    paused (open or half-open)."""
    async with pool.acquire() as conn, conn.transaction():
        state = await conn.fetchval("SELECT breaker_state FROM webhooks WHERE id = $1 FOR UPDATE", webhook_id)
        if state is None:
            raise NotFound(f"webhook {webhook_id} not found")
        if state == WebhookBreakerState.CLOSED:
            raise Conflict(f"webhook {webhook_id} is not paused", details={"breaker_state": state})
        row = await conn.fetchrow(
            f"""UPDATE webhooks SET breaker_state = 'closed', consecutive_failures = 0, failing_since = NULL,
                       paused_at = NULL, paused_until = NULL, probe_delivery_id = NULL, release_held = true
                WHERE id = $1 RETURNING {WEBHOOK_COLUMNS}""", webhook_id)
    return _webhook(row)


async def probes_due(conn: Queryable, window_seconds: float) -> list[int]:
    """Paused webhooks whose cool-down is over (or whose probe was not heard of within its window)
    become half-open with no probe yet, for `window_seconds`; returns their ids. Each webhook is
    returned to one caller only, however many run this at once."""
    rows = await conn.fetch(
        """UPDATE webhooks SET breaker_state = 'half_open', probe_delivery_id = NULL,
                  paused_until = now() + make_interval(secs => $1::float8)
           WHERE breaker_state IN ('open', 'half_open') AND paused_until <= now() RETURNING id""",
        window_seconds)
    return [r["id"] for r in rows]


async def take_releases(conn: Queryable) -> list[int]:
    """Webhooks whose breaker closed with deliveries held: each returned to one caller only."""
    rows = await conn.fetch("UPDATE webhooks SET release_held = false WHERE release_held RETURNING id")
    return [r["id"] for r in rows]


async def pending_ids(conn: Queryable, webhook_id: int, *, after_id: int, limit: int) -> list[int]:
    """A webhook's pending deliveries after `after_id`, oldest first."""
    rows = await conn.fetch(
        """SELECT id FROM webhook_deliveries WHERE webhook_id = $1 AND status = 'pending' AND id > $2
           ORDER BY id LIMIT $3""", webhook_id, after_id, limit)
    return [r["id"] for r in rows]
