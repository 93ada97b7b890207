"""/api/tdlib/health: the Telegram hosts' published stats, merged into one view."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from support import ApiClient

from telegram_platform.redis_keys import TDLIB_STATS_PREFIX


def _host(worker: str, **overrides: Any) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "backend": "tdlib", "version": "1.8.69", "worker": worker, "client_count": 2,
        "clients": {"ready": 1, "wait_phone": 1}, "connection": {"ready": 1, "connecting": 1},
        "sessions_total": 3, "requests_total": 40, "errors_total": {"transient": 1, "rate_limited": 2, "permanent": 0},
        "pending_requests": 1, "updates_queued": 0, "queue_depth": 1, "receive_loop_lag_seconds": 0.01,
        "stalled": False, "accounts_hosted": 2, "accounts_paused": 0, "paused_accounts": [],
        "accounts_peer_flood": 0, "peer_flood_accounts": [], "published_at": 1.0,
    }
    stats.update(overrides)
    return stats


async def test_hosts_are_merged(api: ApiClient, admin_token: str, redis: aioredis.Redis) -> None:
    """Counts add up over hosts, the worst lag wins, one stalled host flags the whole, paused accounts are listed."""
    paused = [{"account_id": 7, "paused_until": 100.0, "retry_after": 12.0}]
    await redis.set(TDLIB_STATS_PREFIX + "w0", json.dumps(_host("w0")), ex=15)
    await redis.set(TDLIB_STATS_PREFIX + "w1", json.dumps(_host(
        "w1", receive_loop_lag_seconds=0.4, stalled=True, accounts_paused=1, paused_accounts=paused,
        accounts_peer_flood=1, peer_flood_accounts=[9])), ex=15)
    status, body = await api.call("GET", "/api/tdlib/health", admin_token)
    assert status == 200
    assert (body["backend"], body["version"], body["hosts"]) == ("tdlib", "1.8.69", 2)
    assert body["clients"] == {"ready": 2, "wait_phone": 2} and body["active_clients"] == 4
    assert body["connection"] == {"ready": 2, "connecting": 2}
    assert body["errors_total"] == {"transient": 2, "rate_limited": 4, "permanent": 0}
    assert (body["sessions_total"], body["requests_total"], body["queue_depth"]) == (6, 80, 2)
    assert body["receive_loop_lag_seconds"] == 0.4 and body["stalled"] is True
    assert body["accounts_paused"] == 1 and body["paused_accounts"] == paused
    assert body["peer_flood_accounts"] == [9]
    assert [w["worker"] for w in body["workers"]] == ["w0", "w1"]


async def test_state_snapshot_sizes_add_up_over_hosts(api: ApiClient, admin_token: str, redis: aioredis.Redis) -> None:
    """Each host's snapshot sizes (worker/tdstate.py) are listed per worker, summed, and the largest
    account's size is kept."""
    snapshots = {"bytes": 300, "max_bytes": 200, "accounts": 2, "taken_total": 2}
    await redis.set(TDLIB_STATS_PREFIX + "w0", json.dumps(_host("w0", state_snapshots=snapshots)), ex=15)
    await redis.set(TDLIB_STATS_PREFIX + "w1", json.dumps(_host(
        "w1", state_snapshots={**snapshots, "bytes": 50, "max_bytes": 50, "accounts": 1})), ex=15)
    _, body = await api.call("GET", "/api/tdlib/health", admin_token)
    assert (body["state_snapshot_bytes"], body["state_snapshot_max_bytes"]) == (350, 200)
    assert [w["state_snapshots"]["accounts"] for w in body["workers"]] == [2, 1]


async def test_no_host_no_backend(api: ApiClient, admin_token: str) -> None:
    """With no live host the view is empty, not an error: backend null, no clients."""
    status, body = await api.call("GET", "/api/tdlib/health", admin_token)
    assert status == 200
    assert (body["hosts"], body["backend"], body["active_clients"], body["stalled"]) == (0, None, 0, False)


async def test_needs_a_token(api: ApiClient) -> None:
    """The Telegram layer's health is for authenticated users."""
    status, _ = await api.call("GET", "/api/tdlib/health")
    assert status == 401
