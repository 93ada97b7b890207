"""Sends reach the worker child that holds their account first time (queue/routing.py): two worker
processes with their own TP_HOST_ID stand for two hosts on one PostgreSQL and Redis, as in
tests/ops/test_hosts.py; one worker process with TP_WORKER_CHILDREN=2 for a host of two children."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from support import ApiClient, EmulatorHandle, WorkerProcess, eventually, samples, total
from worker.test_end_to_end import _ready_account

from telegram_platform.metrics.definitions import Metrics
from telegram_platform.metrics.exposition import render
from telegram_platform.queue.jobs import queue_key
from telegram_platform.queue.registry import MESSAGES_QUEUE, host_queue
from telegram_platform.queue.routing import host_queues
from telegram_platform.redis_keys import account_lease, slot_alive

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


def _children_env(env: dict[str, str], children: int, **extra: str) -> dict[str, str]:
    return {**env, "TP_HOST_ID": "host-c", "TP_WORKER_CHILDREN": str(children), **extra}


async def _holders(redis: aioredis.Redis, account_ids: list[int]) -> dict[int, str | None]:
    """Each account's lease holder (a worker identity), None when free."""
    values = await redis.mget([account_lease(a) for a in account_ids])
    return {a: v.decode().split("|", 1)[0] if v else None for a, v in zip(account_ids, values, strict=True)}


async def _held_by_two_children(redis: aioredis.Redis, account_ids: list[int]) -> dict[int, str] | None:
    holders = await _holders(redis, account_ids)
    if any(h is None for h in holders.values()) or len(set(holders.values())) != 2:
        return None
    return {a: str(h) for a, h in holders.items()}


async def test_two_children_share_a_hosts_accounts_and_each_send_is_made_by_its_holder_first_time(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis,
        fresh_emulator: EmulatorHandle) -> None:
    """TP_WORKER_CHILDREN=2: the accounts a one-child worker left behind are opened at start by both
    children, each its share; a new login is placed on the child holding fewer; every send is made by
    the child holding its account, in one attempt, none moved and no OwnedElsewhere."""
    single = WorkerProcess.start(_children_env(platform_env, 1))
    try:
        accounts = [(await _ready_account(api, admin_token, f"+999664{i}00{i}"))["id"] for i in range(1, 7)]
    finally:
        assert single.stop() == 0  # its accounts are let go: nobody holds them now
    assert set((await _holders(redis, accounts)).values()) == {None}

    metrics_dir = Path(platform_env["TP_VAR_DIR"]) / "metrics"
    metrics_dir.mkdir(parents=True)
    worker = WorkerProcess.start(_children_env(platform_env, 2, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)),
                                 append=True)
    try:
        held = await eventually(lambda: _held_by_two_children(redis, accounts), timeout=60, interval=0.2)
        per_child = Counter(held.values())
        assert sorted(per_child.values()) == [3, 3], per_child  # each its share, none twice
        # A login placed by the children's published loads: on the child holding fewer (a tie: the
        # first by name), in either case one of the two.
        newcomer = (await _ready_account(api, admin_token, "+9996670007"))["id"]
        newcomer_holder = (await _holders(redis, [newcomer]))[newcomer]
        assert newcomer_holder in per_child, newcomer_holder
        held[newcomer] = newcomer_holder

        ids = {account: await _post(api, admin_token, account, 2, f"c{account}") for account in held}
        rows = await _all_sent(db, [i for batch in ids.values() for i in batch], timeout=60)
        by_id = {row["id"]: row for row in rows}
        for account, batch in ids.items():
            for message_id in batch:
                row = by_id[message_id]
                assert row["attempts"] == 1 and row["claimed_by"] == held[account], (account, row)
        log_text = worker.log()
        assert "job moved" not in log_text and "OwnedElsewhere" not in log_text and "owned_elsewhere" not in log_text
        assert len([r for r in fresh_emulator.telegram.received if r.to == "@alice"]) == 2 * len(held)

        # /metrics sums both children: their job and send counters (each child's own files, read as a
        # scrape reads them), under the shared queue's name, and their published stats (two Telegram
        # hosts, the host's clients in all).
        body, _ = render(Metrics(None, metrics_dir), [], "", host="host-c")
        files = samples(body.decode())
        assert total(files, "tp_jobs_processed_total", queue="messages", kind="send_message") == 2 * len(held)
        assert total(files, "tp_messages_sent_total") == 2 * len(held)
        writers = {path.name.split("_")[-1].split("-")[0] for path in metrics_dir.glob("counter_*.db")}
        assert {h.rsplit("-", 1)[1] for h in held.values()} <= writers

        async def scraped() -> Any:  # the stats are published every 5 s: the newcomer shows within that
            values = samples((await api.call("GET", "/metrics"))[1])
            return total(values, "tdlib_hosts") == 2 and \
                total(values, "tp_host_telegram_clients", host="host-c") == len(held)

        await eventually(scraped, timeout=30, interval=0.5)
    finally:
        worker.stop()


async def test_a_killed_childs_accounts_are_served_by_its_sibling_once(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis,
        fresh_emulator: EmulatorHandle) -> None:
    """Two children, logins spread over both; one child is SIGKILLed (and kept down by the pool's
    restart delay): sends for its accounts, posted at once (routed to its queue: its alive key has
    not expired), are made by its sibling once its leases are freed, each in one attempt, each
    message reaching Telegram once."""
    worker = WorkerProcess.start(_children_env(platform_env, 2, TP_RESTART_DELAY="60"))
    try:
        async def two_children() -> bool:
            return len([k async for k in redis.scan_iter(match=slot_alive("host-c/*"))]) == 2

        await eventually(two_children, timeout=30, interval=0.2)
        accounts = [(await _ready_account(api, admin_token, f"+999668{i}00{i}"))["id"] for i in range(1, 5)]
        held = await eventually(lambda: _held_by_two_children(redis, accounts), timeout=15, interval=0.2)
        victim = sorted(set(held.values()))[0]
        orphaned = [a for a, holder in held.items() if holder == victim]
        survivor = next(h for h in held.values() if h != victim)
        os.kill(int(victim.rsplit("-", 1)[1]), signal.SIGKILL)

        ids = [i for account in orphaned for i in await _post(api, admin_token, account, 2, f"k{account}")]
        for row in await _all_sent(db, ids, timeout=60):
            assert row["attempts"] == 1 and row["claimed_by"] == survivor, row
        assert set((await _holders(redis, orphaned)).values()) == {survivor}
        received = [r.text for r in fresh_emulator.telegram.received if r.to == "@alice"]
        assert sorted(received) == sorted(f"k{a} {i}" for a in orphaned for i in range(2))
    finally:
        worker.stop()
