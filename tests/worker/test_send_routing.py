"""Sends reach their account's owner host first time (queue/routing.py): two worker processes with
their own TP_HOST_ID stand for two hosts on one PostgreSQL and Redis, as in tests/ops/test_hosts.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from support import ApiClient, EmulatorHandle, WorkerProcess, eventually
from worker.test_end_to_end import _ready_account

from telegram_platform.queue.jobs import queue_key
from telegram_platform.queue.registry import MESSAGES_QUEUE, host_queue
from telegram_platform.queue.routing import host_queues

PER_ACCOUNT = 5


@pytest.fixture
def platform_env(platform_env: dict[str, str]) -> dict[str, str]:
    """The programs' environment, judging a host gone after 10 s of silence (the floor)."""
    return {**platform_env, "TP_HOST_GONE_SECONDS": "10"}


def _host_env(env: dict[str, str], host_id: str) -> dict[str, str]:
    return {**env, "TP_HOST_ID": host_id, "TP_VAR_DIR": str(Path(env["TP_VAR_DIR"]) / host_id)}


async def _post(api: ApiClient, token: str, account_id: int, n: int, tag: str) -> list[int]:
    ids = []
    for i in range(n):
        status, message = await api.call("POST", "/api/messages", token,
                                         json={"account_id": account_id, "peer": "@alice", "text": f"{tag} {i}"})
        assert status == 202, message
        ids.append(int(message["id"]))
    return ids


async def _all_sent(db: asyncpg.Pool, ids: list[int], timeout: float) -> list[dict[str, Any]]:
    async def sent() -> Any:
        rows = await db.fetch("SELECT id, status, attempts, claimed_by FROM messages WHERE id = ANY($1)", ids)
        return [dict(r) for r in rows] if all(r["status"] == "sent" for r in rows) else None

    rows: list[dict[str, Any]] = await eventually(sent, timeout=timeout, interval=0.2)
    return rows


async def test_sends_go_to_the_owner_host_first_time_and_follow_the_accounts_when_it_dies(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis,
        fresh_emulator: EmulatorHandle) -> None:
    """An account logged in on host-a is sent for by host-a, a new account lands on the less-loaded
    host-b and is sent for by host-b, every message in one attempt; after host-a is killed (-9), the
    messages queued for it on its queue are sent by host-b, still in one attempt each."""
    host_a = WorkerProcess.start(_host_env(platform_env, "host-a"))
    host_b: WorkerProcess | None = None
    try:
        first = await _ready_account(api, admin_token, "+9996611001")  # only host-a runs: it logs in
        host_b = WorkerProcess.start(_host_env(platform_env, "host-b"))

        async def both_alive() -> bool:
            return bool(await redis.exists("tp:host:alive:host-b")) and await db.fetchval(
                "SELECT count(*) FROM hosts") == 2

        await eventually(both_alive, timeout=30, interval=0.2)
        # A new account: host-b owns none, host-a one, so its login is placed on host-b.
        second = await _ready_account(api, admin_token, "+9996621002")
        owners = dict(await db.fetch("SELECT id, owner_host FROM accounts"))
        assert owners == {first["id"]: "host-a", second["id"]: "host-b"}

        on_a = await _post(api, admin_token, first["id"], PER_ACCOUNT, "a")
        on_b = await _post(api, admin_token, second["id"], PER_ACCOUNT, "b")
        for row in await _all_sent(db, on_a, timeout=30):
            assert row["attempts"] == 1 and row["claimed_by"].startswith("host-a/"), row
        for row in await _all_sent(db, on_b, timeout=30):
            assert row["attempts"] == 1 and row["claimed_by"].startswith("host-b/"), row
        assert "job moved" not in host_a.log() + host_b.log()  # each went to its owner first time

        os.killpg(host_a.process.pid, signal.SIGKILL)  # the whole host: pool and children
        host_a.process.wait()
        # Its lease and its heartbeat have not expired yet: these go to host-a's queue, and stay there
        # (or in a dead child's hands, had one taken a job as it was killed).
        stranded = await _post(api, admin_token, first["id"], PER_ACCOUNT, "after")
        origins = {await redis.hget(f"rq:job:msg-{i}", "origin") for i in stranded}
        assert len(origins) == 1 and origins.pop().startswith(b"messages@host-a/"), origins  # its child's

        for row in await _all_sent(db, stranded, timeout=60):
            assert row["attempts"] == 1 and row["claimed_by"].startswith("host-b/"), row
        assert await db.fetchval("SELECT owner_host FROM accounts WHERE id = $1", first["id"]) == "host-b"
        assert not [q for q in await host_queues(redis) if q.startswith(host_queue(MESSAGES_QUEUE, "host-a/"))
                    and await redis.llen(queue_key(q))]
        received = [r.text for r in fresh_emulator.telegram.received if r.to == "@alice"]
        expected = [f"{tag} {i}" for tag in ("a", "b", "after") for i in range(PER_ACCOUNT)]
        assert sorted(received) == sorted(expected)
    finally:
        host_a.stop()
        if host_b is not None:
            host_b.stop()
