"""Every job the platform enqueues: its queue, its name and its id.

A job's name is what RQ stores in its `func` field (and `rq info` shows), so it never changes when
the code that runs it moves: a job enqueued before an upgrade is run after it. The API enqueues and
the worker handles, and both name the job from here, so neither imports the other. A leaf module.
"""

from __future__ import annotations

from typing import Final

# The queues the worker consumes; each has its own concurrency (TP_QUEUE_CONCURRENCY_<NAME>).
MESSAGES_QUEUE: Final = "messages"
CAMPAIGNS_QUEUE: Final = "campaigns"
UPDATES_QUEUE: Final = "updates"
DEFAULT_QUEUE: Final = "default"
QUEUE_NAMES: Final[tuple[str, ...]] = (MESSAGES_QUEUE, CAMPAIGNS_QUEUE, UPDATES_QUEUE, DEFAULT_QUEUE)
# Sends go to the host that owns their account (queue/routing.py): each host also consumes its own
# `messages@<host id>`; the shared `messages` is for accounts no live host owns.
HOST_QUEUE_SEPARATOR: Final = "@"

# One message's send (on MESSAGES_QUEUE).
SEND_MESSAGE: Final = "telegram_platform.worker.jobs.send_message"
# A campaign's run, not one job per message (on CAMPAIGNS_QUEUE): on the shared queue it fans out,
# on a member's routed queue (`campaigns@<host>`) it paces the campaign's accounts that member holds.
RUN_CAMPAIGN: Final = "telegram_platform.worker.jobs.run_campaign"
# Store an incoming message and publish it (on UPDATES_QUEUE).
STORE_INCOMING: Final = "telegram_platform.worker.updates.store_incoming"
# Record an edit, a deletion or a read receipt and publish it (on UPDATES_QUEUE, behind the messages
# it changes).
APPLY_MESSAGE_CHANGE: Final = "telegram_platform.worker.updates.apply_change"
# One webhook delivery's POST (on WEBHOOK_QUEUE).
DELIVER_WEBHOOK: Final = "telegram_platform.worker.webhooks.deliver"
WEBHOOK_QUEUE: Final = DEFAULT_QUEUE


def message_job_id(message_id: int) -> str:
    """One job id per message: re-enqueueing replaces rather than multiplies its job."""
    return f"msg-{message_id}"


def campaign_job_id(campaign_id: int, queue: str = CAMPAIGNS_QUEUE) -> str:
    """One job id per campaign and queue: `campaign-<id>` on the shared queue (starting, resuming and
    reconciling never make a second one), `campaign-<id>_<queue>` on a member's routed queue (fanning
    out again replaces it, never multiplies it). RQ allows only letters, digits, `_` and `-` in an id:
    any other character of the queue's name is written `_<hex>` (`campaigns@a` -> `campaigns_40a`)."""
    if queue == CAMPAIGNS_QUEUE:
        return f"campaign-{campaign_id}"
    escaped = "".join(c if c.isascii() and (c.isalnum() or c == "-") else f"_{ord(c):x}" for c in queue)
    return f"campaign-{campaign_id}_{escaped}"


def incoming_job_id(account_id: int, chat_id: int, telegram_message_id: int) -> str:
    """One job per incoming message: a redelivered update replaces its job's data instead of adding
    a job (Telegram's message ids are unique per account and chat)."""
    return f"in-{account_id}-{chat_id}-{telegram_message_id}"


def webhook_delivery_job_id(delivery_id: int) -> str:
    """One job per recorded delivery."""
    return f"webhook-{delivery_id}"


def host_queue(queue: str, host_id: str) -> str:
    """The queue of `queue`'s jobs for the accounts host `host_id` owns (a host id has no `@`)."""
    return f"{queue}{HOST_QUEUE_SEPARATOR}{host_id}"


def queue_host(queue: str) -> str | None:
    """The host a queue belongs to (`messages@a` -> `a`); None for a shared queue."""
    _, sep, host_id = queue.partition(HOST_QUEUE_SEPARATOR)
    return host_id if sep else None


def base_queue(queue: str) -> str:
    """The shared queue a host's queue belongs to (`messages@a` -> `messages`)."""
    return queue.partition(HOST_QUEUE_SEPARATOR)[0]
