"""The issue's check: kill -9 the worker (pool and children) at random moments and FLUSHALL Redis once
during a 5,000-recipient campaign; it completes, and Telegram got exactly one message per recipient."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from support import ApiClient, EmulatorHandle, WorkerProcess, eventually
from worker.test_campaigns import _accounts, _limits

RECIPIENTS = 5_000
ACCOUNTS = 10
PER_SECOND = 25.0


def _kill_everything(worker: WorkerProcess) -> None:
    """kill -9 of the pool and every child at once (its process group)."""
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait()


async def test_kill_9_and_flushall_lose_nothing_and_send_nothing_twice(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool,
        redis: aioredis.Redis, fresh_emulator: EmulatorHandle) -> None:
    """Three kill -9s of the whole worker at random moments and one FLUSHALL: every one of 5,000
    recipients gets exactly one message, and the campaign completes."""
    seed = int(os.environ.get("TP_CHAOS_SEED", "20261129"))
    rng = random.Random(seed)
    worker = WorkerProcess.start(platform_env, append=True)
    try:
        accounts = await _accounts(api, admin_token, ACCOUNTS, first=100)
        for account_id in accounts:
            await _limits(api, admin_token, account_id, per_second=PER_SECOND, burst=2, per_chat_seconds=0,
                          per_day=1_000_000, warmup_days=0)
        status, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
            "name": "chaos", "account_ids": accounts, "template": "hello {n}",
            "recipients": [{"peer": f"@c{i}", "variables": {"n": i}} for i in range(RECIPIENTS)]})
        assert status == 201, campaign
        cid = campaign["id"]
        status, _ = await api.call("POST", f"/api/campaigns/{cid}/start", admin_token)
        assert status == 200

        async def sent() -> int:
            return int(await db.fetchval(
                "SELECT count(*) FROM messages WHERE campaign_id = $1 AND status = 'sent'", cid))

        events: list[str] = []
        for step in ("kill", "flushall", "kill", "kill"):
            target = await sent() + rng.randint(300, 900)

            async def reached(target: int = target) -> Any:
                return await sent() >= target

            await eventually(reached, timeout=120, interval=0.05)
            # A random moment within the next ~0.3 s: mid-send, mid-claim, mid-batch.
            await asyncio.sleep(rng.uniform(0, 0.3))
            if step == "kill":
                _kill_everything(worker)
                events.append(f"kill@{await sent()}")
                worker = WorkerProcess.start(platform_env, append=True)
            else:
                await redis.flushall()
                events.append(f"flushall@{await sent()}")

        async def completed() -> Any:
            _, body = await api.call("GET", f"/api/campaigns/{cid}", admin_token)
            return body if body["status"] != "running" else None

        final = await eventually(completed, timeout=240, interval=0.5)
        telegram = fresh_emulator.telegram
        deliveries = telegram.deliveries()
        note = (f"seed={seed} events={events} deduplicated={telegram.counters.get('deduplicated', 0)} "
                f"progress={final['progress']}")
        assert final["status"] == "completed", note
        assert final["progress"]["sent"] == RECIPIENTS and final["progress"]["failed"] == 0, note
        missing = [f"@c{i}" for i in range(RECIPIENTS) if deliveries.get(f"@c{i}", 0) == 0]
        twice = {peer: n for peer, n in deliveries.items() if n > 1}
        assert not missing and not twice, f"missing={missing[:10]} twice={list(twice.items())[:10]} {note}"
        assert len(deliveries) == RECIPIENTS
        print(note)
    finally:
        worker.stop()
