"""Graceful stop: SIGTERM lets the job in hand finish, then everything exits 0 and nothing is left."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import aiohttp
import asyncpg
from support import ApiClient, EmulatorHandle, WorkerProcess, eventually, wait_until_healthy
from worker.test_end_to_end import _ready_account


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


async def test_worker_finishes_job_in_hand_on_sigterm(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                      fresh_emulator: EmulatorHandle, db: asyncpg.Pool) -> None:
    """A send in flight when SIGTERM arrives still completes as `sent`; the pool and child exit 0."""
    account = await _ready_account(api, admin_token, "+9996671234")
    fresh_emulator.telegram.config.latency_ms = 2000
    _, message = await api.call("POST", "/api/messages", admin_token,
                                json={"account_id": account["id"], "peer": "@slow", "text": "in flight"})

    async def sending() -> Any:
        return await db.fetchval("SELECT status = 'sending' FROM messages WHERE id = $1", message["id"])

    await eventually(sending)
    started = time.monotonic()
    worker.terminate()
    code = await asyncio.to_thread(worker.process.wait, 30)
    assert code == 0, worker.log()[-2000:]
    assert time.monotonic() - started < 12
    assert await db.fetchval("SELECT status FROM messages WHERE id = $1", message["id"]) == "sent"
    assert _group_members(worker.process.pid) == [], "a worker child outlived the pool"


async def test_an_account_request_in_hand_is_answered_before_the_worker_stops(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle) -> None:
    """A login code the worker took just before SIGTERM is still answered (200, ready) by the stopping
    worker before its sessions close; the caller does not wait out its timeout for a 504."""
    status, account = await api.call("POST", "/api/accounts", admin_token, json={"phone": "+9996691234"})
    assert status == 201 and account["auth_state"] == "wait_code", account
    fresh_emulator.telegram.config.latency_ms = 1500
    step = asyncio.ensure_future(api.call("POST", f"/api/accounts/{account['id']}/auth/code", admin_token,
                                          json={"code": "99999"}))
    await asyncio.sleep(0.3)  # taken by now: Telegram (the emulator) is answering it for 1.5 s
    started = time.monotonic()
    worker.terminate()
    status, body = await step
    assert status == 200 and body["auth_state"] == "ready", body
    assert time.monotonic() - started < 5
    assert await asyncio.to_thread(worker.process.wait, 30) == 0, worker.log()[-2000:]
    assert "Unclosed client session" not in worker.log()


async def test_worker_pool_killed_leaves_no_orphan(platform_env: dict[str, str], db: asyncpg.Pool) -> None:
    """SIGKILL of the pool itself: its children notice and exit on their own."""
    process = WorkerProcess.start(platform_env)
    try:
        async def child_running() -> Any:
            return len(_group_members(process.process.pid)) >= 2

        await eventually(child_running, timeout=30)
        process.process.kill()
        process.process.wait()

        async def group_empty() -> Any:
            return _group_members(process.process.pid) == []

        await eventually(group_empty, timeout=15)
    finally:
        process.stop()


async def test_api_drains_request_in_flight_on_sigterm(platform_env: dict[str, str], db: asyncpg.Pool,
                                                       worker: WorkerProcess, admin_token: str,
                                                       fresh_emulator: EmulatorHandle) -> None:
    """`tp-api` given SIGTERM mid-request answers that request, then exits 0."""
    port = platform_env["PORT"]
    api_process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from telegram_platform.cli.api import main; main()",
        env=platform_env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            await wait_until_healthy(http, timeout=30)
            fresh_emulator.telegram.config.latency_ms = 1500
            request = asyncio.ensure_future(http.post(
                "/api/accounts", json={"phone": "+9996681234"}, headers={"Authorization": f"Bearer {admin_token}"}))
            await asyncio.sleep(0.5)
            api_process.send_signal(signal.SIGTERM)
            response = await request
            assert response.status == 201, await response.text()
            response.release()
        code = await asyncio.wait_for(api_process.wait(), 15)
        assert code == 0
    finally:
        if api_process.returncode is None:
            api_process.kill()
            await api_process.wait()
