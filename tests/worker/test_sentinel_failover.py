"""The platform on a Sentinel-managed Redis: the real API and a real worker process keep accepting,
enqueueing, consuming, sending and publishing after the master is killed (kill -9) and Sentinel
promotes the replica; a message whose job died with the master (written, never replicated) is sent
all the same, re-enqueued by the reconciler from PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from servers import SentinelRig
from support import ApiClient, EmulatorHandle, TcpProxy, WorkerProcess, eventually
from worker.test_end_to_end import _ready_account

from telegram_platform import redis_keys
from telegram_platform.outages import REDIS_DOWN
from telegram_platform.queue.jobs import JOB_PREFIX
from telegram_platform.queue.registry import message_job_id


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[SentinelRig, TcpProxy]]:
    """A master, a replica replicating it through a proxy the test can stall, and three sentinels;
    every process stopped at the end, whatever happened."""
    sentinel_rig = SentinelRig(tmp_path / "sentinel")
    proxy: TcpProxy | None = None
    try:
        await asyncio.to_thread(sentinel_rig.start_master)
        proxy = TcpProxy("127.0.0.1", sentinel_rig.master_port)
        await proxy.start()
        await asyncio.to_thread(sentinel_rig.start_replica, proxy.port)
        await asyncio.to_thread(sentinel_rig.start_sentinels)
        yield sentinel_rig, proxy
    finally:
        sentinel_rig.stop()
        if proxy is not None:
            await proxy.cut()


@pytest.fixture
def platform_env(platform_env: dict[str, str], rig: tuple[SentinelRig, TcpProxy]) -> dict[str, str]:
    """The programs' environment naming Redis by its sentinels only (no REDIS_URL)."""
    env = {k: v for k, v in platform_env.items() if k != "REDIS_URL"}
    return {**env, "REDIS_SENTINELS": rig[0].sentinels, "REDIS_SENTINEL_SERVICE": rig[0].SERVICE}


async def _retrying(call: Any) -> Any:
    """A command on the platform's own client, tried until the new master answers."""

    async def attempt() -> Any:
        try:
            return (await call(),)
        except REDIS_DOWN:
            return None

    return (await eventually(attempt, timeout=30, interval=0.1))[0]


async def test_sends_go_on_through_a_master_failover_and_a_lost_job_is_refilled(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool,
        redis: aioredis.Redis, rig: tuple[SentinelRig, TcpProxy], fresh_emulator: EmulatorHandle) -> None:
    """Before the failover a message is sent; one accepted while the worker is paused and the
    replica cut off lives only on the master, which is then killed: after the promotion that job is
    gone from Redis, yet the message is sent (the reconciler); one accepted after the promotion is
    sent too; each exactly once, with its `sent` event in the new master's event log."""
    sentinel_rig, replication = rig
    worker = WorkerProcess.start(platform_env)
    paused = False
    try:
        account = await _ready_account(api, admin_token, "+9996651001")

        async def post(text: str) -> dict[str, Any]:
            async def accepted() -> Any:
                status, body = await api.call("POST", "/api/messages", admin_token,
                                              json={"account_id": account["id"], "peer": "@failover", "text": text})
                assert status in (202, 503), body
                return body if status == 202 else None

            result: dict[str, Any] = await eventually(accepted, timeout=30, interval=0.1)
            return result

        async def sent(message_id: int) -> bool:
            _, body = await api.call("GET", f"/api/messages/{message_id}", admin_token)
            return bool(body["status"] == "sent")

        before = await post("before")
        await eventually(lambda: sent(before["id"]), timeout=30)

        replication.stall()  # from now on the replica hears nothing the master is told
        os.killpg(worker.process.pid, signal.SIGSTOP)
        paused = True
        lost = await post("only on the old master")
        assert await redis.exists(JOB_PREFIX + message_job_id(lost["id"])) == 1
        killed_at = time.monotonic()
        await asyncio.to_thread(sentinel_rig.kill_master)
        promoted = await asyncio.to_thread(sentinel_rig.wait_promoted)
        info = await _retrying(lambda: redis.info("server"))
        assert info["tcp_port"] == sentinel_rig.replica_port
        assert await redis.exists(JOB_PREFIX + message_job_id(lost["id"])) == 0  # died with the master
        after = await post("after")
        accepted_after = time.monotonic() - killed_at
        os.killpg(worker.process.pid, signal.SIGCONT)
        paused = False

        for message in (lost, after):
            await eventually(lambda message=message: sent(message["id"]), timeout=60, interval=0.2)
        received = sorted(r.text for r in fresh_emulator.telegram.received if r.to == "@failover")
        assert received == ["after", "before", "only on the old master"]
        entries = await redis.xrange(redis_keys.EVENTS_LOG)
        events = [json.loads(fields[b"e"]) for _, fields in entries]
        sent_ids = {e["data"]["message_id"] for e in events
                    if e["type"] == "message.status" and e["data"].get("status") == "sent"}
        assert {lost["id"], after["id"]} <= sent_ids
        assert "outbox reconciled" in worker.log()
        print(f"sentinel failover: promoted {promoted:.1f}s after the kill; a message accepted "
              f"{accepted_after:.1f}s after it")
    finally:
        if paused:
            os.killpg(worker.process.pid, signal.SIGCONT)
        worker.stop()


async def test_messages_posted_without_pause_through_a_failover_are_each_sent_once(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool,
        rig: tuple[SentinelRig, TcpProxy], fresh_emulator: EmulatorHandle) -> None:
    """A client posts a message every 50 ms before, during and after the master's kill while the
    worker runs on: every message the API accepted (202) is sent exactly once; those refused in the
    gap were answered 503, never accepted and lost."""
    sentinel_rig, _ = rig
    worker = WorkerProcess.start(platform_env)
    try:
        account = await _ready_account(api, admin_token, "+9996661001")
        accepted: list[int] = []
        refused = 0
        stop = asyncio.Event()

        async def keep_posting() -> None:
            nonlocal refused
            n = 0
            while not stop.is_set():
                n += 1
                status, body = await api.call("POST", "/api/messages", admin_token, json={
                    "account_id": account["id"], "peer": "@steady", "text": f"m{n}"})
                assert status in (202, 503), body
                if status == 202:
                    accepted.append(body["id"])
                else:
                    refused += 1
                await asyncio.sleep(0.05)

        async def accepted_at_least(count: int) -> bool:
            return len(accepted) >= count

        posting = asyncio.create_task(keep_posting())
        await eventually(lambda: accepted_at_least(20), timeout=30)
        killed_at = len(accepted)
        await asyncio.to_thread(sentinel_rig.kill_master)
        await asyncio.to_thread(sentinel_rig.wait_promoted)
        await eventually(lambda: accepted_at_least(killed_at + 40), timeout=60)
        stop.set()
        await posting

        async def all_sent() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM messages WHERE id = ANY($1) AND status = 'sent'",
                                          accepted) == len(accepted))

        await eventually(all_sent, timeout=90, interval=0.5)
        texts = [r.text for r in fresh_emulator.telegram.received if r.to == "@steady"]
        assert len(texts) == len(set(texts)) == len(accepted)
        print(f"sentinel failover under load: {len(accepted)} accepted and sent once, {refused} answered 503")
    finally:
        worker.stop()
