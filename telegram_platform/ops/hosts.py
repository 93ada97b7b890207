"""The platform's hosts as `GET /api/hosts` and `tp hosts` show them, and what an operator does to
them (`tp accounts move`, `tp drain` and their API routes): what PostgreSQL remembers
(storage/hosts.py: state, first and last heartbeat, accounts owned) with what each host's worker
children publish in Redis while they live (their Telegram clients and memory, the stats that
/api/tdlib/health reads, which expire with the process)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from ..errors import Conflict, NotFound
from ..redis_auth import RedisAuth
from ..redis_keys import TDLIB_STATS_PREFIX
from ..states import HostState
from ..storage import accounts as account_store
from ..storage import hosts as host_store
from ..telegram import rpc

# Accounts a move may take: logged in. Opening one whose login ended elsewhere would start a login
# (a code texted to its owner); one mid-login is resumed by whoever opens it next, not moved.
MOVABLE_STATES = frozenset({"ready", "closed"})


async def live_stats(redis: aioredis.Redis) -> dict[str, list[dict[str, Any]]]:
    """The published stats of every live worker child, by the host it names."""
    keys = [key async for key in redis.scan_iter(match=TDLIB_STATS_PREFIX + "*", count=200)]
    by_host: dict[str, list[dict[str, Any]]] = {}
    for raw in await redis.mget(keys) if keys else []:
        if raw:
            stats = json.loads(raw)
            if stats.get("host"):
                by_host.setdefault(str(stats["host"]), []).append(stats)
    return by_host


async def hosts_overview(pool: asyncpg.Pool, redis: aioredis.Redis, *, gone_after: float) -> dict[str, Any]:
    """Every host ever seen, by id, with its live figures (none for a host whose children are gone)."""
    rows = await host_store.list_hosts(pool, gone_after=gone_after)
    live = await live_stats(redis)
    items = []
    for row in rows:
        # A killed child's stats outlive it by their TTL: a host judged gone has no live figures.
        children = live.get(row["id"], []) if row["state"] != HostState.GONE else []
        memory = [c["rss_bytes"] for c in children if isinstance(c.get("rss_bytes"), int)]
        items.append({
            "id": row["id"], "state": row["state"], "accounts_owned": int(row["accounts_owned"]),
            "telegram_clients": sum(int(c.get("client_count", 0)) for c in children),
            "memory_bytes": sum(memory) if memory else None,
            "workers": sorted(str(c.get("worker")) for c in children),
            "first_seen": row["first_seen"], "last_heartbeat": row["last_seen"],
            "heartbeat_age_seconds": round(max(0.0, row["heartbeat_age_seconds"]), 3),
            "draining_since": row["draining_since"],
        })
    return {"items": items, "gone_after_seconds": gone_after}


async def move_account(pool: asyncpg.Pool, redis: aioredis.Redis, auth: RedisAuth, account_id: int, to: str, *,
                       gone_after: float) -> dict[str, Any]:
    """Move a logged-in account to host `to`: its owner closes it (snapshot, lease and ownership let
    go) and a worker of `to` opens it from the snapshot, without a new login. Answers once `to` has
    it open: the account's owner host and states. NotFound: no such account or host; Conflict:
    `to` is not up, or the account is not logged in."""
    account = await account_store.get_account(pool, account_id)
    state = await host_store.state_of(pool, to, gone_after=gone_after)
    if state is None:
        raise NotFound(f"host {to} not found", details={"field": "to"})
    if state != HostState.UP:
        raise Conflict(f"host {to} is {state}, not up", details={"field": "to", "state": state})
    if account["auth_state"] not in MOVABLE_STATES:
        raise Conflict(f"only a logged-in account moves: its auth_state is {account['auth_state']}",
                       details={"auth_state": account["auth_state"]})
    result = await rpc.call_host(redis, auth, "move", account_id, {"to": to}, timeout=rpc.MOVE_SECONDS)
    owner = await pool.fetchval("SELECT owner_host FROM accounts WHERE id = $1", account_id)
    return {"account_id": account_id, "owner_host": owner, "auth_state": result["auth_state"],
            "connection_state": result["connection_state"]}


async def set_draining(pool: asyncpg.Pool, host_id: str, draining: bool) -> None:
    """Start draining the host (its worker children hand their accounts to the least-loaded up
    hosts, and it takes no new ones) or stop. NotFound: no such host."""
    if not await host_store.set_draining(pool, host_id, draining):
        raise NotFound(f"host {host_id} not found")
