"""A campaign runs on every host that owns some of its accounts (worker/campaigns.py): two worker
processes with their own TP_HOST_ID stand for two hosts on one PostgreSQL and Redis, as in
tests/worker/test_send_routing.py."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from support import ApiClient, EmulatorHandle, WorkerProcess, eventually
from worker.test_campaigns import _finished, _limits
from worker.test_end_to_end import _ready_account

from telegram_platform.queue.jobs import JOB_PREFIX
from telegram_platform.queue.registry import CAMPAIGNS_QUEUE, campaign_job_id, host_queue
from telegram_platform.redis_keys import account_lease, slot_alive

RECIPIENTS = 60


@pytest.fixture
def platform_env(platform_env: dict[str, str]) -> dict[str, str]:
    """The programs' environment, judging a host gone after 10 s of silence (the floor)."""
    return {**platform_env, "TP_HOST_GONE_SECONDS": "10"}


def _host_env(env: dict[str, str], host_id: str) -> dict[str, str]:
    return {**env, "TP_HOST_ID": host_id, "TP_VAR_DIR": str(Path(env["TP_VAR_DIR"]) / host_id)}


async def test_a_campaign_over_two_hosts_sends_each_account_from_its_owner_once_per_recipient(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis,
        fresh_emulator: EmulatorHandle) -> None:
    """Two accounts on host-a, two on host-b, one campaign of 60 recipients: it completes, every
    recipient gets exactly one message, each message is claimed by its account's owner host in one
    attempt (no bounce, no OwnedElsewhere wait), all four accounts send, and each host ran a
    member job of its own."""
    host_a = WorkerProcess.start(_host_env(platform_env, "host-a"))
    host_b: WorkerProcess | None = None
    try:
        on_a = [(await _ready_account(api, admin_token, f"+99966{d}1101"))["id"] for d in (1, 2)]
        host_b = WorkerProcess.start(_host_env(platform_env, "host-b"))

        async def both_alive() -> bool:
            return bool(await redis.exists("tp:host:alive:host-b")) and await db.fetchval(
                "SELECT count(*) FROM hosts") == 2

        await eventually(both_alive, timeout=30, interval=0.2)
        # host-b owns none, host-a two: the next two logins are placed on host-b.
        on_b = [(await _ready_account(api, admin_token, f"+99966{d}1102"))["id"] for d in (3, 4)]
        owners = dict(await db.fetch("SELECT id, owner_host FROM accounts"))
        assert owners == {**dict.fromkeys(on_a, "host-a"), **dict.fromkeys(on_b, "host-b")}
        for account_id in on_a + on_b:
            await _limits(api, admin_token, account_id, per_second=5, burst=2, warmup_days=0)

        status, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
            "name": "two hosts", "account_ids": on_b + on_a, "template": "hi {peer}",
            "recipients": [{"peer": f"@spread{i}"} for i in range(RECIPIENTS)]})
        assert status == 201, campaign
        status, started = await api.call("POST", f"/api/campaigns/{campaign['id']}/start", admin_token)
        assert status == 200 and started["status"] == "running", started

        final = await _finished(api, admin_token, campaign["id"], timeout=90)
        assert final["status"] == "completed", final
        assert final["progress"]["sent"] == RECIPIENTS, final["progress"]
        assert fresh_emulator.telegram.deliveries() == {f"@spread{i}": 1 for i in range(RECIPIENTS)}

        rows = await db.fetch("SELECT account_id, attempts, claimed_by FROM messages WHERE campaign_id = $1",
                              campaign["id"])
        assert len(rows) == RECIPIENTS
        for row in rows:
            assert row["attempts"] == 1, dict(row)
            assert row["claimed_by"].startswith(f"{owners[row['account_id']]}/"), dict(row)
        assert {row["account_id"] for row in rows} == set(on_a + on_b), "every account should have sent"

        async def members_finished() -> bool:  # acknowledged with each consumer's next take
            statuses = []
            for host in ("host-a", "host-b"):  # one member per host: its one child's `campaigns@<host>/<slot>`
                prefix = JOB_PREFIX + campaign_job_id(campaign["id"], host_queue(CAMPAIGNS_QUEUE, host + "/"))
                statuses.append([await redis.hget(key, "status") async for key in redis.scan_iter(match=prefix + "*")])
            return statuses == [[b"finished"], [b"finished"]]

        await eventually(members_finished, timeout=15, interval=0.2)
        logs = host_a.log() + host_b.log()
        assert "campaign account runs elsewhere now" not in logs  # each account ran on its owner from the start
        assert "job failed" not in logs and "job moved" not in logs
    finally:
        host_a.stop()
        if host_b is not None:
            host_b.stop()


async def _sent_by(db: asyncpg.Pool, campaign_id: int) -> dict[tuple[int, str], int]:
    """Sent messages per (account, host whose worker claimed it)."""
    rows = await db.fetch("SELECT account_id, split_part(claimed_by, '/', 1) AS host, count(*) AS n FROM messages "
                          "WHERE campaign_id = $1 AND status = 'sent' GROUP BY 1, 2", campaign_id)
    return {(row["account_id"], row["host"]): int(row["n"]) for row in rows}


async def test_a_campaign_whose_host_dies_goes_on_with_its_accounts_on_the_survivor(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis,
        fresh_emulator: EmulatorHandle) -> None:
    """host-a is killed (-9) in the middle of a campaign over its account and host-b's: host-b takes
    host-a's account over (its lease expired) and sends its share too; the campaign completes with
    every recipient reached exactly once."""
    host_a = WorkerProcess.start(_host_env(platform_env, "host-a"))
    host_b: WorkerProcess | None = None
    try:
        first = (await _ready_account(api, admin_token, "+9996651201"))["id"]
        host_b = WorkerProcess.start(_host_env(platform_env, "host-b"))

        async def both_alive() -> bool:
            return bool(await redis.exists("tp:host:alive:host-b")) and await db.fetchval(
                "SELECT count(*) FROM hosts") == 2

        await eventually(both_alive, timeout=30, interval=0.2)
        second = (await _ready_account(api, admin_token, "+9996661202"))["id"]
        owners = dict(await db.fetch("SELECT id, owner_host FROM accounts"))
        assert owners == {first: "host-a", second: "host-b"}
        for account_id in (first, second):
            await _limits(api, admin_token, account_id, per_second=2, burst=1, warmup_days=0)
        count = 80  # about 20 s at both accounts' 2/s
        status, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
            "name": "a host dies", "account_ids": [first, second], "template": "hi",
            "recipients": [{"peer": f"@dies{i}"} for i in range(count)]})
        assert status == 201, campaign
        status, _ = await api.call("POST", f"/api/campaigns/{campaign['id']}/start", admin_token)
        assert status == 200

        async def both_sending() -> bool:
            sent = await _sent_by(db, campaign["id"])
            return sent.get((first, "host-a"), 0) >= 5 and sent.get((second, "host-b"), 0) >= 5

        await eventually(both_sending, timeout=30, interval=0.2)
        os.killpg(host_a.process.pid, signal.SIGKILL)  # the whole host: pool and children
        host_a.process.wait()

        final = await _finished(api, admin_token, campaign["id"], timeout=120)
        assert final["status"] == "completed", final
        assert final["progress"]["sent"] == count, final["progress"]
        assert fresh_emulator.telegram.deliveries() == {f"@dies{i}": 1 for i in range(count)}
        sent = await _sent_by(db, campaign["id"])
        assert sent.get((first, "host-b"), 0) > 0, f"host-b never sent for host-a's account: {sent}"
        assert not {host for _, host in sent} - {"host-a", "host-b"}, sent
        assert await db.fetchval("SELECT owner_host FROM accounts WHERE id = $1", first) == "host-b"
    finally:
        host_a.stop()
        if host_b is not None:
            host_b.stop()


async def test_a_member_whose_accounts_cannot_send_leaves_the_campaign_to_the_others(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis,
        fresh_emulator: EmulatorHandle) -> None:
    """host-a's account hits PEER_FLOOD at its second send, host-b's never does: host-a's member
    hands its recipients back and leaves the campaign without failing it (the other host's account
    can still send), and host-b's account completes it, every recipient reached once."""
    telegram = fresh_emulator.telegram
    telegram.config.peer_flood_after = 1
    host_a = WorkerProcess.start(_host_env(platform_env, "host-a"))
    host_b: WorkerProcess | None = None
    try:
        flooded = (await _ready_account(api, admin_token, "+9996671301"))["id"]
        host_b = WorkerProcess.start(_host_env(platform_env, "host-b"))

        async def both_alive() -> bool:
            return bool(await redis.exists("tp:host:alive:host-b")) and await db.fetchval(
                "SELECT count(*) FROM hosts") == 2

        await eventually(both_alive, timeout=30, interval=0.2)
        healthy = await _ready_account(api, admin_token, "+9996681302")
        assert dict(await db.fetch("SELECT id, owner_host FROM accounts")) == {flooded: "host-a",
                                                                               healthy["id"]: "host-b"}
        count = 20
        peers = [f"@flood{i}" for i in range(count)]
        telegram.add_contacts(healthy["phone"], peers)
        for account_id in (flooded, healthy["id"]):
            await _limits(api, admin_token, account_id, per_second=4, burst=1, warmup_days=0)
        status, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
            "name": "one host floods", "account_ids": [flooded, healthy["id"]], "template": "hi",
            "recipients": [{"peer": p} for p in peers]})
        assert status == 201, campaign
        status, _ = await api.call("POST", f"/api/campaigns/{campaign['id']}/start", admin_token)
        assert status == 200

        final = await _finished(api, admin_token, campaign["id"], timeout=90)
        assert final["status"] == "completed", final
        assert final["progress"]["sent"] == count, final["progress"]
        assert telegram.deliveries() == {p: 1 for p in peers}
        assert telegram.counters["peer_flood"] >= 1
        sent = await _sent_by(db, campaign["id"])
        assert sent.get((flooded, "host-a"), 0) <= 1 and sent.get((healthy["id"], "host-b"), 0) >= count - 1, sent
        assert "no campaign account here can send" in host_a.log()
    finally:
        host_a.stop()
        if host_b is not None:
            host_b.stop()


async def test_a_campaign_none_of_whose_accounts_on_any_host_can_send_fails(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis,
        fresh_emulator: EmulatorHandle) -> None:
    """Both hosts' accounts hit PEER_FLOOD: the member that finds its own account unusable and
    PostgreSQL showing the other host's flooded too fails the campaign (it does not wait forever),
    its unsent recipients still pending for a resume."""
    fresh_emulator.telegram.config.peer_flood_after = 1
    host_a = WorkerProcess.start(_host_env(platform_env, "host-a"))
    host_b: WorkerProcess | None = None
    try:
        first = (await _ready_account(api, admin_token, "+9996671401"))["id"]
        host_b = WorkerProcess.start(_host_env(platform_env, "host-b"))

        async def both_alive() -> bool:
            return bool(await redis.exists("tp:host:alive:host-b")) and await db.fetchval(
                "SELECT count(*) FROM hosts") == 2

        await eventually(both_alive, timeout=30, interval=0.2)
        second = (await _ready_account(api, admin_token, "+9996681402"))["id"]
        assert dict(await db.fetch("SELECT id, owner_host FROM accounts")) == {first: "host-a", second: "host-b"}
        for account_id in (first, second):
            await _limits(api, admin_token, account_id, per_second=4, burst=1, warmup_days=0)
        count = 20
        status, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
            "name": "every host floods", "account_ids": [first, second], "template": "hi",
            "recipients": [{"peer": f"@cold{i}"} for i in range(count)]})
        assert status == 201, campaign
        status, _ = await api.call("POST", f"/api/campaigns/{campaign['id']}/start", admin_token)
        assert status == 200

        final = await _finished(api, admin_token, campaign["id"], timeout=60)
        assert final["status"] == "failed", final
        assert final["error"].startswith("no account can send"), final["error"]
        progress = final["progress"]
        assert progress["sent"] <= 2 and progress["sent"] + progress["pending"] == count, progress
        deliveries = fresh_emulator.telegram.deliveries()
        assert sum(deliveries.values()) == progress["sent"] and set(deliveries.values()) <= {1}, deliveries
    finally:
        host_a.stop()
        if host_b is not None:
            host_b.stop()


MANY_ACCOUNTS = 300


async def test_a_campaign_over_hundreds_of_accounts_on_two_children_is_sent_by_both(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis,
        fresh_emulator: EmulatorHandle) -> None:
    """TP_WORKER_CHILDREN=2, 300 accounts logged in over both children (well over the Redis client's
    pool of 100 connections for the accounts each child must look up), one campaign over them all:
    it completes, every recipient gets one message, each claimed in one attempt by the child holding
    its account, and both children send (issue 28: such a campaign sent nothing)."""
    worker = WorkerProcess.start({**platform_env, "TP_HOST_ID": "host-c", "TP_WORKER_CHILDREN": "2"})
    try:
        async def two_children() -> bool:
            return len([k async for k in redis.scan_iter(match=slot_alive("host-c/*"))]) == 2

        await eventually(two_children, timeout=30, interval=0.2)
        at_once = asyncio.Semaphore(16)

        async def ready(i: int) -> int:
            async with at_once:
                account_id = int((await _ready_account(api, admin_token, f"+99966{1 + i // 1000}{i % 1000:04d}"))["id"])
                await _limits(api, admin_token, account_id, per_second=5, burst=2, warmup_days=0)
                return account_id

        accounts = await asyncio.gather(*(ready(i) for i in range(MANY_ACCOUNTS)))
        holders = await redis.mget([account_lease(a) for a in accounts])
        held = {a: h.decode().split("|", 1)[0] for a, h in zip(accounts, holders, strict=True) if h}
        assert len(held) == MANY_ACCOUNTS and len(set(held.values())) == 2, set(held.values())
        assert min(Counter(held.values()).values()) > 100, Counter(held.values())  # more than the pool each

        recipients = 2 * MANY_ACCOUNTS
        status, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
            "name": "two children", "account_ids": accounts, "template": "hi {peer}",
            "recipients": [{"peer": f"@many{i}"} for i in range(recipients)]})
        assert status == 201, campaign
        status, started = await api.call("POST", f"/api/campaigns/{campaign['id']}/start", admin_token)
        assert status == 200 and started["status"] == "running", started

        final = await _finished(api, admin_token, campaign["id"], timeout=60)
        assert final["status"] == "completed", final
        assert final["progress"]["sent"] == recipients, final["progress"]
        assert fresh_emulator.telegram.deliveries() == {f"@many{i}": 1 for i in range(recipients)}
        rows = await db.fetch("SELECT account_id, attempts, claimed_by FROM messages WHERE campaign_id = $1",
                              campaign["id"])
        assert len(rows) == recipients
        for row in rows:
            assert row["attempts"] == 1 and row["claimed_by"] == held[row["account_id"]], dict(row)
        assert {row["claimed_by"] for row in rows} == set(held.values())
        assert "MaxConnectionsError" not in worker.log()
    finally:
        worker.stop()
