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
    if unrecorded:
        own = sorted(unrecorded)
        settled = await delivery_store.resolve_abandoned(pool, own, [self_identity], resend=keyed,
                                                         cause=delivery_store.UNRECORDED)
        unrecorded.difference_update(own)  # settled now, or recorded after all: nothing left to do
        if settled:
            log.warning("sends whose outcome was not recorded resolved", count=len(settled),
                        action="requeued with the same random_id" if keyed else "failed, outcome unknown")
    claims = await delivery_store.stale_claims(pool, STALE_CLAIM_SECONDS)
    claimants = {c["claimed_by"] for c in claims if c["claimed_by"] and c["claimed_by"] != self_identity}
    if not claimants:
        return 0, 0
    dead = sorted(claimants - await liveness.alive(pool, claimants))
    if not dead:
        return 0, 0
    ids = [c["id"] for c in claims if c["claimed_by"] in dead]
    changed = await delivery_store.resolve_abandoned(pool, ids, dead, resend=keyed)
    if keyed and redis is not None and changed:
        singles = {c["id"] for c in claims if c["campaign_id"] is None} & set(changed)
        enqueuer = Enqueuer(redis)
        for message_id in sorted(singles):
            await enqueuer.enqueue("messages", SEND_MESSAGE, [message_id], job_id=message_job_id(message_id))
    if changed:
        log.warning("sends of stopped workers resolved", count=len(changed),
                    action="requeued with the same random_id" if keyed else "failed, outcome unknown",
                    workers=dead)
    return (len(changed), 0) if keyed else (0, len(changed))
