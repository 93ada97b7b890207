"""The states a message, a campaign, a campaign recipient, a webhook delivery and a webhook's circuit
breaker can be in, with the groups the code tests them by (as Supervisor's `states.py` does for its
processes).

A leaf module: it imports nothing from the package, so storage, worker and API all name a status
from here instead of spelling it. The values are the database's (the CHECK constraints of
storage/migrations/*.sql, held to them by tests/test_states.py); a `StrEnum` member is the plain
string wherever it goes (SQL parameters, JSON events, API responses). SQL text keeps its literals.
Telegram sessions' states (`AuthState`, `ConnectionState`) live with the sessions in
telegram/base.py; the RQ job statuses are RQ's, in queue/.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class MessageStatus(StrEnum):
    """An outbox message: queued → sending (claimed) → sent | failed, or back to queued for a
    retry; sent → read when the recipient's read receipt covers it; cancelled when its campaign is
    cancelled, its peer opted out, or a client cancelled it before it went out."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    READ = "read"
    FAILED = "failed"
    CANCELLED = "cancelled"

    # Telegram has it (read or not).
    DELIVERED: ClassVar[frozenset[MessageStatus]]
    # Not yet settled: a campaign with such a message has work left.
    PENDING: ClassVar[frozenset[MessageStatus]]
    # Settled for good: no send leaves them (a sent message may still be read).
    FINAL: ClassVar[frozenset[MessageStatus]]


MessageStatus.PENDING = frozenset({MessageStatus.QUEUED, MessageStatus.SENDING})
MessageStatus.FINAL = frozenset({MessageStatus.SENT, MessageStatus.READ, MessageStatus.FAILED,
                                 MessageStatus.CANCELLED})
MessageStatus.DELIVERED = frozenset({MessageStatus.SENT, MessageStatus.READ})


class CampaignStatus(StrEnum):
    """A campaign: draft | scheduled → running ⇄ paused → completed | cancelled; failed when no
    account can send (resumable once one can)."""

    DRAFT = "draft"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    # Ended (its `finished_at` set): it takes no more recipients. A failed one may still be resumed.
    ENDED: ClassVar[frozenset[CampaignStatus]]


CampaignStatus.ENDED = frozenset({CampaignStatus.COMPLETED, CampaignStatus.CANCELLED, CampaignStatus.FAILED})


class RecipientStatus(StrEnum):
    """A campaign recipient: pending until handed to an account as a message (assigned), or
    skipped because the peer opted out."""

    PENDING = "pending"
    ASSIGNED = "assigned"
    SKIPPED = "skipped"


class WebhookDeliveryStatus(StrEnum):
    """One POST of an event to a webhook: pending (to try, or to retry) → delivered | failed."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookBreakerState(StrEnum):
    """A webhook's circuit breaker: closed (delivering) → open (paused after failing for long: its
    deliveries are held) → half_open (after the cool-down, one probe delivery is tried) → closed on
    the probe's success, open again on its failure; an admin's resume closes it at once."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class HostState(StrEnum):
    """A host of the platform (storage/hosts.py): up while its workers' heartbeats arrive, draining
    once an operator asked it to hand its accounts off, gone after TP_HOST_GONE_SECONDS without a
    heartbeat. Never stored: judged from `hosts.last_seen` and `hosts.draining_since` when read."""

    UP = "up"
    DRAINING = "draining"
    GONE = "gone"
