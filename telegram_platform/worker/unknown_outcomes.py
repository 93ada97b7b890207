"""Sends whose outcome is unknown: what the platform may do about them, per backend.

Telegram recognises a re-sent message by its `random_id` (MTProto's messages.sendMessage: "unique
client message ID required to prevent message resending"): a second message with a random_id it
already accepted from the same account is not delivered again. The platform chooses one random_id
per message (messages.random_id) and keeps it for every attempt, so where the backend puts *our*
random_id on the wire (`TelegramBackend.sends_random_id`), re-sending a message whose outcome is
unknown is safe.

- The emulator backend sends it (it speaks an MTProto-like protocol and passes random_id through);
  the emulator drops a repeated random_id from the same account as Telegram does, and nothing else:
  two messages of the platform with different random_ids are two messages there too.
- TDLib does not: it chooses each message's random_id itself. It persists a pending message in
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
from ..queue.registry import MESSAGES_QUEUE, SEND_MESSAGE, message_job_id
from ..storage import outbox as outbox_store
from ..storage.outbox import Outbox
from . import liveness

log = structlog.get_logger(__name__)

# A claim younger than this is not judged (its worker may have just claimed it).
STALE_CLAIM_SECONDS = 5.0


async def settle_abandoned_sends(pool: asyncpg.Pool, outbox: Outbox, *, sends_random_id: bool, self_identity: str,
                                 redis: aioredis.Redis | None = None,
                                 unrecorded: set[int] | None = None) -> tuple[int, int]:
    """Messages left `sending` by workers that are gone (PostgreSQL liveness, not Redis): re-send
    them with their random_id where the backend `sends_random_id`, else record the outcome as
    unknown; each gets its `message.status` event. With `redis`, a re-queued single message gets its
    job at once (a campaign's own job picks up its messages). `unrecorded` holds this worker's own
    claims whose outcome it failed to record (worker/sender.py): no longer in flight, they are
    settled the same way, and taken out of the set once settled.

    Returns (requeued, failed)."""
    settled = 0
    if unrecorded:
        own = sorted(unrecorded)
        settled += await _settle(outbox, own, [self_identity], resend=sends_random_id, redis=redis,
                                 cause=outbox_store.UNRECORDED, event="sends whose outcome was not recorded resolved")
        unrecorded.difference_update(own)  # settled now, or recorded after all: nothing left to do
    claims = await outbox_store.stale_claims(pool, STALE_CLAIM_SECONDS)
    claimants = {c["claimed_by"] for c in claims if c["claimed_by"] and c["claimed_by"] != self_identity}
    dead = sorted(claimants - await liveness.alive(pool, claimants)) if claimants else []
    if dead:
        settled += await _settle(outbox, [c["id"] for c in claims if c["claimed_by"] in dead], dead,
                                 resend=sends_random_id, redis=redis, cause=outbox_store.STOPPED_WORKER,
                                 event="sends of stopped workers resolved", workers=dead)
    return (settled, 0) if sends_random_id else (0, settled)


async def _settle(outbox: Outbox, ids: list[int], claimants: list[str], *, resend: bool,
                  redis: aioredis.Redis | None, cause: str, event: str, **fields: object) -> int:
    """Resolve these claims (Outbox.settle_abandoned); a re-queued single message gets its job at
    once when `redis` is given. Returns how many were changed."""
    changed = await outbox.settle_abandoned(ids, claimants, resend=resend, cause=cause)
    if resend and redis is not None:
        enqueuer = Enqueuer(redis)
        for message_id, campaign_id in changed:
            if campaign_id is None:
                await enqueuer.enqueue(MESSAGES_QUEUE, SEND_MESSAGE, [message_id], job_id=message_job_id(message_id))
    if changed:
        log.warning(event, count=len(changed),
                    action="requeued with the same random_id" if resend else "failed, outcome unknown", **fields)
    return len(changed)
