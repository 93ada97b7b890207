"""The worker pool as configured: the schema check at start, queue concurrency, child recycling, and a
killed child's job."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import zlib
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from structlog.testing import capture_logs
from support import ApiClient, EmulatorHandle, WorkerProcess, eventually, free_port, run_to_exit, schema_behind
from worker.test_campaigns import _accounts, _finished, _limits
from worker.test_end_to_end import _ready_account
from worker.test_graceful_stop import _group_members

from telegram_platform.queue.consumer import MAX_WORKER_DEATHS
from telegram_platform.queue.jobs import JOB_PREFIX, failed_key
from telegram_platform.queue.registry import WEBHOOK_QUEUE, webhook_delivery_job_id
from telegram_platform.settings import EXIT_CONFIG, Settings
from telegram_platform.worker.pool import ChildSlot, WorkerPool, check_schema


async def _all_sent(db: asyncpg.Pool, count: int) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM messages WHERE status = 'sent'") == count)


async def test_tp_worker_refuses_a_schema_behind_the_code(platform_env: dict[str, str], db: asyncpg.Pool) -> None:
    """With TP_AUTO_MIGRATE=false and a migration not applied, `tp-worker` exits 78 with one line naming
    DATABASE_URL and `tp migrate` before starting any child (supervisord then shows it FATAL)."""
    async with schema_behind(db) as missing:
        status, stdout, stderr = await run_to_exit("from telegram_platform.cli.worker import main; main()",
                                                   {**platform_env, "TP_AUTO_MIGRATE": "false"})
    lines = stderr.strip().splitlines()
    assert status == EXIT_CONFIG, stderr
    assert len(lines) == 1 and f"migrations {missing}" in lines[0] and "tp migrate" in lines[0], lines
    assert lines[0].startswith("tp-worker: configuration error: DATABASE_URL")
    assert "worker child started" not in stdout


async def test_worker_child_refuses_a_schema_behind_the_code(platform_env: dict[str, str],
                                                             db: asyncpg.Pool) -> None:
    """A child started while the schema is behind (the database was down when the pool checked) stops
    with the same line and exit 2 before taking any job; the pool restarts it with back-off."""
    async with schema_behind(db) as missing:
        status, stdout, stderr = await run_to_exit(
            "import sys; from telegram_platform.worker.child import main; sys.exit(main())",
            {**platform_env, "TP_AUTO_MIGRATE": "false"}, "--name", "schema-test")
    assert status == 2, stderr
    assert f"DATABASE_URL: the schema lacks migrations {missing}" in stderr
    assert "worker child ready" not in stdout


async def test_schema_check_leaves_an_unreachable_database_to_the_children(platform_env: dict[str, str]) -> None:
    """A database that does not answer at start is no misconfiguration: the check warns and returns
    (the children wait for it with back-off) instead of stopping `tp-worker`."""
    unreachable = f"postgresql://tp@127.0.0.1:{free_port()}/tp"
    settings = Settings.from_env({**platform_env, "DATABASE_URL": unreachable}, app_mode="worker")
    with capture_logs() as logs:
        await check_schema(settings, wait_seconds=0.5)
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [entry["event"] for entry in warnings] == ["database not reachable at start; the children will wait for it"]
    assert warnings[0]["error"] in {"ConnectionRefusedError", "OSError", "TimeoutError"}


def test_child_respawn_backoff_follows_settings(platform_env: dict[str, str]) -> None:
    """A crashing child is respawned after TP_RESTART_DELAY, x1.5 per crash in a row, capped at
    TP_RESTART_DELAY_MAX; TP_RESTART_RESET_AFTER up (or a recycle) starts the count again."""
    settings = Settings.from_env({**platform_env, "TP_RESTART_DELAY": "1", "TP_RESTART_DELAY_MAX": "2",
                                  "TP_RESTART_RESET_AFTER": "60"}, app_mode="worker")
    slot = ChildSlot(name="w0", argv=[])
    delays = []
    for now in (10.0, 20.0, 30.0, 40.0):
        slot.started_at = now - 5.0
        assert not slot.record_exit(1, 100, now, settings)
        delays.append(slot.restart_delay)
    assert delays == [1.0, 1.5, 2.0, 2.0]
    assert slot.next_start == 42.0 and slot.reaped == "w0-100"
    slot.started_at = 0.0
    slot.record_exit(1, 101, 60.0, settings)  # up 60 s: a fresh series
    assert slot.restart_delay == 1.0
    slot.started_at = 60.0
    slot.record_exit(1, 102, 61.0, settings)
    assert slot.restart_delay == 1.5
    assert slot.record_exit(0, 103, 62.0, settings)  # stopped itself: recycled, no back-off growth
    assert slot.restart_delay == 1.0


def test_child_memory_ceiling_is_a_share_of_the_worker_limit(platform_env: dict[str, str]) -> None:
    """The pool recycles a child at 3/4 of TP_WORKER_MEMORY_LIMIT, split between its children: the
    default 2GB gives the 1536 MiB ceiling a child always had."""
    settings = Settings.from_env(platform_env, app_mode="worker")
    assert WorkerPool(settings).child_memory_limit == 1536 << 20
    assert WorkerPool(settings, children=2).child_memory_limit == 768 << 20


async def test_queue_concurrency_follows_configuration(api: ApiClient, admin_token: str, db: asyncpg.Pool,
                                                       platform_env: dict[str, str],
                                                       fresh_emulator: EmulatorHandle) -> None:
    """TP_QUEUE_CONCURRENCY_MESSAGES=2: sends reach Telegram two at a time, never three."""
    worker = WorkerProcess.start({**platform_env, "TP_QUEUE_CONCURRENCY_MESSAGES": "2"})
    try:
        accounts = await _accounts(api, admin_token, 6, first=50)
        fresh_emulator.telegram.config.latency_ms = 300
        for i in range(12):
            status, _ = await api.call("POST", "/api/messages", admin_token,
                                       json={"account_id": accounts[i % 6], "peer": f"@cc{i}", "text": "x"})
            assert status == 202
        await eventually(lambda: _all_sent(db, 12), timeout=30)
        times = sorted(a.at for a in fresh_emulator.telegram.attempts if a.to.startswith("@cc"))
        assert len(times) == 12
        # Each send holds a slot for the 300 ms latency: no 150 ms window sees more than 2 arrive.
        busiest = max(sum(1 for t in times if start <= t < start + 0.15) for start in times)
        assert busiest == 2, times
        assert times[-1] - times[0] >= 5 * 0.3 * 0.9
    finally:
        worker.stop()


async def test_child_recycled_after_max_jobs(api: ApiClient, admin_token: str, db: asyncpg.Pool,
                                             platform_env: dict[str, str], fresh_emulator: EmulatorHandle) -> None:
    """TP_WORKER_MAX_JOBS=3: the child stops warm after 3 jobs and a fresh one carries on at once."""
    worker = WorkerProcess.start({**platform_env, "TP_WORKER_MAX_JOBS": "3"})
    try:
        account = await _ready_account(api, admin_token, "+9996671111")
        for i in range(8):
            await api.call("POST", "/api/messages", admin_token,
                           json={"account_id": account["id"], "peer": f"@mj{i}", "text": "x"})
        await eventually(lambda: _all_sent(db, 8), timeout=60)
        assert fresh_emulator.telegram.deliveries() == {f"@mj{i}": 1 for i in range(8)}
        log = worker.log()
        assert log.count("worker child recycling: max jobs reached") >= 2, log[-3000:]
        assert "worker child exited, restarting" not in log
    finally:
        worker.stop()


async def test_child_over_memory_ceiling_is_recycled(platform_env: dict[str, str], db: asyncpg.Pool) -> None:
    """A child above its share of TP_WORKER_MEMORY_LIMIT is stopped warm (exit 0) and replaced."""
    worker = WorkerProcess.start({**platform_env, "TP_WORKER_MEMORY_LIMIT": "1MB"})
    try:
        async def replaced() -> Any:
            return worker.log().count("worker child started") >= 2

        await eventually(replaced, timeout=40, interval=0.5)
        log = worker.log()
        assert "over its memory ceiling, recycling" in log
        assert "worker child recycled, replacing it" in log
    finally:
        worker.stop()


async def test_killed_child_send_completes_exactly_once(api: ApiClient, admin_token: str, db: asyncpg.Pool,
                                                        worker: WorkerProcess,
                                                        fresh_emulator: EmulatorHandle) -> None:
    """kill -9 of the child while Telegram is answering a send: the pool restarts it, the message is
    re-sent with its random_id and recorded sent within seconds; Telegram delivered it once."""
    account = await _ready_account(api, admin_token, "+9996681111")
    fresh_emulator.telegram.config.latency_ms = 1500
    _, message = await api.call("POST", "/api/messages", admin_token,
                                json={"account_id": account["id"], "peer": "@killed", "text": "once"})

    async def sending() -> Any:
        return await db.fetchval("SELECT status = 'sending' FROM messages WHERE id = $1", message["id"])

    await eventually(sending, timeout=15)
    # The row is `sending` from the claim, a moment before the request is on the wire: let it reach
    # the emulator (well inside its 1.5 s latency), so the kill lands while Telegram is answering.
    await asyncio.sleep(0.3)
    child = [pid for pid in _group_members(worker.process.pid) if pid != worker.process.pid]
    assert len(child) == 1
    os.kill(child[0], signal.SIGKILL)
    await asyncio.sleep(2.0)  # the emulator accepts the orphaned request after its latency
    fresh_emulator.telegram.config.latency_ms = 1

    async def sent() -> Any:
        row = await db.fetchrow("SELECT status, delivery_unknown, telegram_message_id FROM messages WHERE id = $1",
                                message["id"])
        return row if row["status"] == "sent" else None

    row = await eventually(sent, timeout=30, interval=0.2)
    assert row["delivery_unknown"]
    received = fresh_emulator.telegram.received_by("@killed")
    assert len(received) == 1 and received[0].message_id == row["telegram_message_id"]
    assert fresh_emulator.telegram.counters["deduplicated"] == 1


async def test_campaign_obeys_429_and_hands_work_on_after_peer_flood(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle) -> None:
    """Limits set above Telegram's: 429s are waited out (never an early attempt) and an account
    that hits PEER_FLOOD hands its recipients to the other; everyone still gets exactly one message."""
    telegram = fresh_emulator.telegram
    telegram.config.account_rate = 4.0
    telegram.config.account_burst = 1
    telegram.config.peer_flood_after = 12
    accounts = await _accounts(api, admin_token, 2, first=60)
    for account_id in accounts:
        await _limits(api, admin_token, account_id, per_second=20, burst=3, per_chat_seconds=0, warmup_days=0)
    _, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "rough", "account_ids": accounts, "template": "t",
        "recipients": [{"peer": f"@f{i}"} for i in range(20)]})
    await api.call("POST", f"/api/campaigns/{campaign['id']}/start", admin_token)
    final = await _finished(api, admin_token, campaign["id"], timeout=90)
    assert final["status"] == "completed" and final["progress"]["sent"] == 20, final
    assert telegram.deliveries() == {f"@f{i}": 1 for i in range(20)}
    assert telegram.counters["rate_limited"] > 0
    assert telegram.early_attempts() == []


async def test_a_job_that_kills_its_child_is_parked_after_three_deaths(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], redis: aioredis.Redis) -> None:
    """A job whose worker child dies while running it (SIGKILL each time) is run three times, then
    parked in the failed registry with a clear exc_info, not retried forever."""
    runs: list[float] = []
    port = free_port()

    async def hang(request: web.Request) -> web.Response:
        runs.append(time.monotonic())
        await asyncio.sleep(60)
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    worker = WorkerProcess.start(platform_env)
    try:
        _, hook = await api.call("POST", "/api/webhooks", admin_token,
                                 json={"url": f"http://127.0.0.1:{port}/hook", "events": ["message.status"]})
        status, delivery = await api.call("POST", f"/api/webhooks/{hook['id']}/test", admin_token)
        assert status == 202
        job_id = webhook_delivery_job_id(delivery["id"])
        for death in range(1, MAX_WORKER_DEATHS + 1):
            await eventually(lambda: _true(len(runs) >= death), timeout=30)  # noqa: B023 - awaited at once
            for pid in _group_members(worker.process.pid):
                if pid != worker.process.pid:
                    os.kill(pid, signal.SIGKILL)

        async def parked() -> bool:
            return await redis.zscore(failed_key(WEBHOOK_QUEUE), job_id) is not None

        await eventually(parked, timeout=30)
        exc_info = zlib.decompress(await redis.hget(JOB_PREFIX + job_id, "exc_info")).decode()
        assert f"died {MAX_WORKER_DEATHS} times" in exc_info
        await asyncio.sleep(2)  # a fourth run would have started by now
        assert len(runs) == MAX_WORKER_DEATHS
    finally:
        worker.stop()
        await runner.cleanup()


async def _true(value: bool) -> bool:
    return value


def test_child_identities_start_with_the_host_id(platform_env: dict[str, str]) -> None:
    """A pool's slots (so its children's identities, `<slot>-<pid>`) start with TP_HOST_ID: two hosts'
    children never share an identity, whatever their instance names and pids."""
    settings = Settings.from_env({**platform_env, "TP_HOST_ID": "edge-7", "TP_INSTANCE": "tp-worker"},
                                 app_mode="worker")
    pool = WorkerPool(settings, children=2)
    assert [slot.name for slot in pool.slots] == ["edge-7/tp-worker-w0", "edge-7/tp-worker-w1"]
    assert all(slot.argv[slot.argv.index("--name") + 1] == slot.name for slot in pool.slots)
