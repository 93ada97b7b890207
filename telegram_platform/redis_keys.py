"""Every Redis key and channel the platform itself names (`tp:*`), in one place.

RQ's own keys (`rq:queue:*`, `rq:job:*`, its registries) are RQ's vocabulary and stay with the code
that speaks RQ's format (queue/jobs.py). A leaf module: it imports nothing, so any part of the
platform can name a key without depending on the part that owns its contents.
"""

from __future__ import annotations

from typing import Final

# Events: published on the channel, and kept in the log (a stream) for replay and webhook catch-up.
EVENTS_CHANNEL: Final = "tp:events"
EVENTS_LOG: Final = "tp:events:log"
# Where the webhook dispatcher has read the event log up to.
WEBHOOKS_CURSOR: Final = "tp:webhooks:cursor"
# Access tokens refused from now on (a demotion, a disabled user), announced to every API process.
AUTH_REVOCATIONS: Final = "tp:auth:revocations"
# The one scheduler of delayed jobs at a time, among all worker children.
SCHEDULER_LOCK: Final = "tp:scheduler:lock"
# A worker's heartbeat: `tp:worker:<name>`. Account requests are routed to a host by this name too.
WORKER_HEARTBEAT_PREFIX: Final = "tp:worker:"
# What a worker child's Telegram host reports (clients by state, ...): read by health and metrics.
TDLIB_STATS_PREFIX: Final = "tp:tdlib:stats:"
# Account requests from API processes: the shared list, a list per host, and a reply per request.
TELEGRAM_REQUESTS: Final = "tp:rpc:telegram"
HOST_REQUESTS_PREFIX: Final = "tp:rpc:telegram:host:"


# A host is alive while any of its worker children renews this (`tp:host:alive:<host id>`): what
# sends are routed by (queue/routing.py).
HOST_ALIVE_PREFIX: Final = "tp:host:alive:"


def host_alive(host_id: str) -> str:
    return HOST_ALIVE_PREFIX + host_id


def campaign_progress(campaign_id: int) -> str:
    """Held for a second by the campaign runner that last published the campaign's progress, so
    its members on several hosts publish about one event a second between them, not one each."""
    return f"tp:campaign:progress:{campaign_id}"


def worker_heartbeat(worker: str) -> str:
    return WORKER_HEARTBEAT_PREFIX + worker


def tdlib_stats(worker: str) -> str:
    return TDLIB_STATS_PREFIX + worker


def host_requests(owner: str) -> str:
    """The list of requests for the accounts one host owns."""
    return HOST_REQUESTS_PREFIX + owner


def request_reply(request_id: str) -> str:
    return f"tp:rpc:reply:{request_id}"


def request_claim(request_id: str, hop: str) -> str:
    """Set by the host that takes a request (`hop`: first, or forwarded), so it is taken once."""
    return f"tp:rpc:claimed:{request_id}:{hop}"


def active_jobs(queue: str, worker: str) -> str:
    """Jobs a worker has taken and not finished: returned to the queue if that worker dies."""
    return f"tp:active:{queue}:{worker}"


def account_lease(account_id: int) -> str:
    """Which process holds an account's Telegram session (owner|token)."""
    return f"tp:lease:account:{account_id}"


def account_fence(account_id: int) -> str:
    """The account's fencing counter: every new lease gets a larger token."""
    return f"tp:lease:fence:{account_id}"


def login_attempts(username: str, address: str) -> list[str]:
    """The failure count and the wait of one (username, address) pair, and the address's count."""
    pair = f"{username.lower()}|{address}"
    return [f"tp:login:fail:{pair}", f"tp:login:wait:{pair}", f"tp:login:addr:{address}"]


def webhook_slots(webhook_id: int) -> str:
    """The deliveries in flight to one webhook, across every worker (a sorted set of leases scored by
    their expiry, so a dead worker's slot comes back by itself)."""
    return f"tp:webhook:slots:{webhook_id}"


# Rebalancing (worker/rebalance.py): the one decider at a time (a lock holding its token), and the
# accounts it moved, scored by when (Redis's clock): the platform-wide moves-per-minute bound.
REBALANCE_LOCK: Final = "tp:rebalance:lock"
REBALANCE_MOVES: Final = "tp:rebalance:moves"
