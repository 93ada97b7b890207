"""Sends whose outcome is unknown: what the platform may do about them, per backend.

Telegram recognises a re-sent message by its `random_id` (MTProto's messages.sendMessage: "unique
client message ID required to prevent message resending"): a second message with a random_id it
already accepted from the same account is not delivered again. The platform chooses one random_id
per message (messages.random_id) and keeps it for every attempt, so where the backend puts *our*
random_id on the wire, re-sending a message whose outcome is unknown is safe: "keyed" backends.

- The emulator backend is keyed (it speaks an MTProto-like protocol and passes random_id through);
  the emulator drops a repeated random_id from the same account as Telegram does, and nothing else:
  two messages of the platform with different random_ids are two deliveries there too.
- TDLib is not keyed: it chooses each message's random_id itself. It persists a pending message in
  its message database and re-sends it itself after a restart, with that same random_id, so
  Telegram drops the copy; but a *new* send from the platform would be a new message. So on TDLib
  an unknown outcome is recorded (`failed`, error_class `unknown`) and never retried.

See docs/delivery-guarantees.md for the whole argument.
"""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis
import structlog

from ..queue.jobs import Enqueuer
from ..storage import delivery as delivery_store
from ..telegram.base import TelegramBackend
from . import liveness
from .jobs import SEND_MESSAGE, message_job_id

log = structlog.get_logger(__name__)

KEYED_BACKENDS = frozenset({"emulator"})
# A claim younger than this is not judged (its worker may have just claimed it).
STALE_CLAIM_SECONDS = 5.0


def is_keyed(backend: TelegramBackend) -> bool:
    """Does this backend send the platform's random_id, so Telegram drops a re-send?"""
    return backend.name in KEYED_BACKENDS


async def resolve_abandoned_sends(pool: asyncpg.Pool, *, keyed: bool, self_identity: str,
                                  redis: aioredis.Redis | None = None,
                                  unrecorded: set[int] | None = None) -> tuple[int, int]:
    """Messages left `sending` by workers that are gone (PostgreSQL liveness, not Redis): re-send
    them with their random_id on a keyed backend, else record the outcome as unknown. With `redis`,
    a re-queued single message gets its job at once (a campaign's own job picks up its messages).
    `unrecorded` holds this worker's own claims whose outcome it failed to record (TelegramHost):
    no longer in flight, they are settled the same way, and taken out of the set once settled.

    Returns (requeued, failed)."""
    settled = 0
    if unrecorded:
        own = sorted(unrecorded)
        settled += await _settle(pool, own, [self_identity], keyed=keyed, redis=redis, cause=delivery_store.UNRECORDED,
                                 event="sends whose outcome was not recorded resolved")
        unrecorded.difference_update(own)  # settled now, or recorded after all: nothing left to do
    claims = await delivery_store.stale_claims(pool, STALE_CLAIM_SECONDS)
    claimants = {c["claimed_by"] for c in claims if c["claimed_by"] and c["claimed_by"] != self_identity}
    dead = sorted(claimants - await liveness.alive(pool, claimants)) if claimants else []
    if dead:
        settled += await _settle(pool, [c["id"] for c in claims if c["claimed_by"] in dead], dead, keyed=keyed,
                                 redis=redis, cause=delivery_store.STOPPED_WORKER,
                                 event="sends of stopped workers resolved", workers=dead)
    return (settled, 0) if keyed else (0, settled)


async def _settle(pool: asyncpg.Pool, ids: list[int], claimants: list[str], *, keyed: bool,
                  redis: aioredis.Redis | None, cause: str, event: str, **fields: object) -> int:
    """Resolve these claims (delivery_store.resolve_abandoned); a re-queued single message gets its
    job at once when `redis` is given. Returns how many were changed."""
    changed = await delivery_store.resolve_abandoned(pool, ids, claimants, resend=keyed, cause=cause)
    if keyed and redis is not None:
        enqueuer = Enqueuer(redis)
        for message_id, campaign_id in changed:
            if campaign_id is None:
                await enqueuer.enqueue("messages", SEND_MESSAGE, [message_id], job_id=message_job_id(message_id))
    if changed:
        log.warning(event, count=len(changed),
                    action="requeued with the same random_id" if keyed else "failed, outcome unknown", **fields)
    return len(changed)
