"""The platform under a real supervisord with the real programs: watchdogs, back-off, FATAL, kill -9,
rolling reload under load, restart counts, the processes API and `tp status`."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from harness import Deployment, Load, set_option
from support import eventually

from telegram_platform.api.security import Passwords
from telegram_platform.ops import procfs
from telegram_platform.ops.restarts import ProcessRecord
from telegram_platform.storage import users

MEMBER_00 = "tp-api:tp-api-00"
MEMBER_01 = "tp-api:tp-api-01"
PASSWORD = "ops-password-1234"

Deploy = Callable[..., Awaitable[Deployment]]


@pytest.fixture
async def deploy(tmp_path: Path, platform_env: dict[str, str], db: asyncpg.Pool) -> AsyncIterator[Deploy]:
    """Start a deployment (stopped, with everything it ran, at the end of the test)."""
    made: list[Deployment] = []

    async def make(*, wait: bool = True, **kwargs: Any) -> Deployment:
        deployment = Deployment.create(tmp_path, platform_env, **kwargs)
        made.append(deployment)
        await asyncio.to_thread(deployment.start, wait=wait)
        return deployment

    yield make
    for deployment in made:
        await asyncio.to_thread(deployment.stop)


async def login(deployment: Deployment, db: asyncpg.Pool, username: str = "ops", role: str = "admin") -> str:
    if await users.get_by_username(db, username) is None:
        await users.create_user(db, username, await Passwords().hash(PASSWORD), role)
    async with aiohttp.ClientSession() as session, session.post(
            f"{deployment.url}/api/auth/login", json={"username": username, "password": PASSWORD}) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["access_token"])


async def pid_of(deployment: Deployment, name: str) -> int:
    return (await asyncio.to_thread(deployment.processes))[name].pid


async def replaced_and_ready(deployment: Deployment, name: str, old_pid: int) -> int | None:
    """The member's new pid once a new process answers on its socket, else None."""
    process = (await asyncio.to_thread(deployment.processes))[name]
    if process.pid and process.pid != old_pid and await asyncio.to_thread(deployment.ready, name):
        return process.pid
    return None


async def test_rolling_reload_under_load_fails_no_request(deploy: Deploy) -> None:
    """`tp reload` replaces each API member in turn under a steady request loop: no request fails,
    every member gets a new pid, and each is counted once as a reload restart."""
    deployment = await deploy()
    before = {m: await pid_of(deployment, m) for m in deployment.members()}
    async with Load(deployment.url) as load:
        await asyncio.sleep(1.0)
        result = await asyncio.to_thread(deployment.tp, "reload")
        await asyncio.sleep(1.0)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reloaded 2 processes" in result.stdout
    assert load.result.failures == [], load.result.failures[:5]
    assert load.result.ok > 50
    after = {m: await pid_of(deployment, m) for m in deployment.members()}
    assert all(after[m] != before[m] for m in before), (before, after)
    for member in deployment.members():
        record = await eventually(functools.partial(_record_when, deployment, member, _back_running), timeout=10)
        assert (record.restarts, record.by_reason["reload"], record.crashes) == (1, 1, 0), record
    assert deployment.book().processes["tp-worker"].restarts == 0


async def test_kill_9_of_one_member_under_load(deploy: Deploy) -> None:
    """kill -9 of one API member under load: the other keeps serving, only requests in flight on the
    killed one may fail, it answers again within 2 s, and it is counted as a crash restart."""
    deployment = await deploy()
    victim = await pid_of(deployment, MEMBER_00)
    survivor = await pid_of(deployment, MEMBER_01)
    async with Load(deployment.url) as load:
        await asyncio.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: replaced_and_ready(deployment, MEMBER_00, victim), timeout=10, interval=0.02)
        back_after = time.monotonic() - killed_at
        ok_before_end = load.result.ok
        await asyncio.sleep(1.0)
    late = [f for f in load.result.failures if f[0] > killed_at + 0.5]
    assert late == [], late[:5]
    assert len(load.result.failures) <= load.concurrency, load.result.failures
    assert load.result.ok > ok_before_end  # served all along
    assert back_after < 2.0, f"member back after {back_after:.2f}s"
    assert await pid_of(deployment, MEMBER_01) == survivor
    record = await eventually(functools.partial(_record_when, deployment, MEMBER_00, _back_running), timeout=10)
    assert (record.crashes, record.restarts, record.by_reason["crash"]) == (1, 1, 1), record
    status = await asyncio.to_thread(deployment.tp, "status", "--cpu-interval", "0.2")
    assert status.returncode == 0, status.stderr
    line = next(line for line in status.stdout.splitlines() if line.startswith(MEMBER_00))
    assert "RUNNING" in line and "crash 1" in line and "ready" in line, status.stdout


async def test_memory_hog_member_is_restarted_alone(deploy: Deploy, db: asyncpg.Pool) -> None:
    """A member pushed over TP_API_MEMORY_LIMIT is restarted gracefully within 10 s, the other member
    and the worker are left alone, and the restart is counted under memory."""
    deployment = await deploy(env={"TP_API_MEMORY_LIMIT": "160MB"})
    token = await login(deployment, db)
    hog = await pid_of(deployment, MEMBER_00)
    others = {name: await pid_of(deployment, name) for name in (MEMBER_01, "tp-worker")}
    status, body = await asyncio.to_thread(deployment.member_request, MEMBER_00, "POST", "/api/_debug/allocate",
                                           json.dumps({"megabytes": 160}).encode(), token)
    crossed = time.monotonic()
    assert status == 200 and json.loads(body)["pid"] == hog, body
    await eventually(lambda: replaced_and_ready(deployment, MEMBER_00, hog), timeout=10, interval=0.05)
    assert time.monotonic() - crossed < 10
    await asyncio.sleep(2.5)  # two more watchdog rounds: nothing else is touched
    assert {name: await pid_of(deployment, name) for name in others} == others
    record = await eventually(functools.partial(_record_when, deployment, MEMBER_00, _back_running), timeout=10)
    book = deployment.book()
    assert (record.restarts, record.by_reason["memory"], record.crashes) == (1, 1, 0), record
    assert record.memory_restart_rss is not None and record.memory_restart_rss > 160 << 20
    assert book.processes[MEMBER_01].restarts == 0
    assert "memory limit exceeded" in deployment.log("tp-events")


async def test_worker_over_its_limit_with_children_is_restarted_gracefully(deploy: Deploy) -> None:
    """The worker's memory counts its pool's children: over TP_WORKER_MEMORY_LIMIT together (though
    the pool alone is under it), it is drained (exit 0 on SIGTERM) and started again, counted as memory."""
    deployment = await deploy(env={"TP_WORKER_MEMORY_LIMIT": "64MB"})
    worker = await pid_of(deployment, "tp-worker")
    own = procfs.rss(worker)
    assert own is not None and own < 64 << 20  # the pool alone is under the limit
    await eventually(functools.partial(_record_when, deployment, "tp-worker", _back_running), timeout=20)
    record = deployment.book().processes["tp-worker"]
    assert record.by_reason["memory"] >= 1 and record.crashes == 0, record
    assert record.memory_restart_rss is not None and record.memory_restart_rss > 64 << 20
    supervisord_log = (deployment.root / "var/log/supervisord.log").read_text()
    assert "stopped: tp-worker (exit status 0)" in supervisord_log, supervisord_log[-2000:]


async def test_crash_after_a_good_start_is_restarted_with_growing_delays(deploy: Deploy, db: asyncpg.Pool) -> None:
    """A member that keeps crashing after a good start is restarted after 1 s, 1.5 s, 2.25 s
    (TP_RESTART_DELAY=1, x1.5), where supervisord alone would restart it at once."""
    deployment = await deploy(env={"TP_RESTART_DELAY": "1"})
    token = await login(deployment, db)
    gaps = []
    for _ in range(3):
        process = (await asyncio.to_thread(deployment.processes))[MEMBER_00]
        await eventually(lambda: _running_and_ready(deployment, MEMBER_00), timeout=15)
        old = process.pid
        await asyncio.to_thread(deployment.member_request, MEMBER_00, "POST", "/api/_debug/exit",
                                json.dumps({"code": 3}).encode(), token)
        exited = await eventually(functools.partial(_gone, old), timeout=5, interval=0.01)
        spawned = await eventually(functools.partial(_new_pid, deployment, MEMBER_00, old), timeout=20,
                                   interval=0.01)
        gaps.append(spawned - exited)
    assert gaps[0] >= 0.9 and gaps[1] >= 1.4 and gaps[2] >= 2.1, gaps
    assert gaps[0] < gaps[1] < gaps[2], gaps
    record = await eventually(functools.partial(_record_when, deployment, MEMBER_00, _back_running), timeout=15)
    assert (record.crashes, record.consecutive_crashes, record.by_reason["crash"]) == (3, 3, 3), record
    assert record.backoff_delay == pytest.approx(2.25)


async def test_program_crashing_at_start_goes_fatal_and_says_why(deploy: Deploy) -> None:
    """A program that dies before startsecs is retried startretries times, then FATAL; the listener
    does not restart it and `tp status` says why (its last error line)."""

    def broken_worker(conf: str) -> str:
        conf = set_option(conf, "program:tp-worker", "startretries", "2")
        # The broken worker dies once its settings are read, ~0.5 s after exec on an idle machine but
        # past the shipped startsecs=1 on a loaded one, where supervisord would count it as started.
        conf = set_option(conf, "program:tp-worker", "startsecs", "10")
        return set_option(conf, "program:tp-worker", "environment",
                          'APP_MODE="worker",TP_INSTANCE="tp-worker",DATABASE_URL="mysql://nowhere/db"')

    deployment = await deploy(edit=broken_worker, wait=False)

    async def worker_fatal() -> bool:
        try:
            return (await asyncio.to_thread(deployment.processes))["tp-worker"].state == "FATAL"
        except OSError:
            return False

    await eventually(worker_fatal, timeout=40, interval=0.2)
    await eventually(lambda: _fatal_reason(deployment, "tp-worker"), timeout=5)
    await asyncio.sleep(1.5)
    assert (await asyncio.to_thread(deployment.processes))["tp-worker"].state == "FATAL"
    record = deployment.book().processes["tp-worker"]
    assert (record.start_failures, record.fatal, record.starts) == (3, 1, 0), record
    assert record.fatal_reason is not None and "DATABASE_URL" in record.fatal_reason
    status = await asyncio.to_thread(deployment.tp, "status", "--cpu-interval", "0")
    line = next(line for line in status.stdout.splitlines() if line.startswith("tp-worker"))
    assert "FATAL" in line and "DATABASE_URL" in line, status.stdout


async def test_processes_api_lists_restarts_and_hands_requests_to_the_listener(deploy: Deploy,
                                                                               db: asyncpg.Pool) -> None:
    """GET /api/processes shows every process with state, pid, uptime, restarts and memory; an admin's
    restart and reload are carried out by the listener (202) and counted; all of it is admin only."""
    deployment = await deploy()
    admin = await login(deployment, db)
    viewer = await login(deployment, db, "watcher", "viewer")
    async with aiohttp.ClientSession(base_url=deployment.url) as http:

        async def call(method: str, path: str, token: str) -> tuple[int, Any]:
            async with http.request(method, path, headers={"Authorization": f"Bearer {token}"}) as response:
                return response.status, await response.json()

        assert (await call("GET", "/api/processes", viewer))[0] == 403
        status, body = await call("GET", "/api/processes", admin)
        assert status == 200, body
        processes = {p["name"]: p for p in body["processes"]}
        assert set(processes) == {MEMBER_00, MEMBER_01, "tp-worker", "tp-events"}
        for member in (MEMBER_00, MEMBER_01):
            assert processes[member]["state"] == "RUNNING" and processes[member]["ready"] is True
            assert processes[member]["memory_bytes"] > 10 << 20 and processes[member]["restarts"] == 0
        assert processes["tp-worker"]["memory_includes_children"] is True
        assert body["listener"]["stale"] is False

        assert (await call("POST", f"/api/processes/{MEMBER_01}/restart", viewer))[0] == 403
        status, body = await call("POST", "/api/processes/nope/restart", admin)
        assert status == 404 and body["error"]["code"] == "not_found"
        old = await pid_of(deployment, MEMBER_01)
        status, body = await call("POST", "/api/processes/tp-api-01/restart", admin)
        assert status == 202 and body["status"] == "accepted", body
        await eventually(lambda: replaced_and_ready(deployment, MEMBER_01, old), timeout=20)

        status, body = await call("POST", "/api/processes/reload", admin)
        assert status == 202, body

        async def reloaded() -> bool:
            code, listing = await call("GET", "/api/processes", admin)
            return code == 200 and listing["reload"].get("status") == "done"

        await eventually(reloaded, timeout=30, interval=0.2)

        async def counted() -> dict[str, Any] | None:
            # A restart is counted when supervisord says RUNNING (startsecs after the member answers).
            _, listing = await call("GET", "/api/processes", admin)
            counts = {p["name"]: p["restarts_by_reason"] for p in listing["processes"]}
            return counts if counts[MEMBER_01]["reload"] == 1 else None

        counts = await eventually(counted, timeout=10, interval=0.2)
        assert counts[MEMBER_01] == {"crash": 0, "memory": 0, "reload": 1, "manual": 1}, counts
        assert counts[MEMBER_00]["reload"] == 1 and counts[MEMBER_00]["manual"] == 0
        status, body = await call("GET", "/api/health/detailed", admin)
        assert body["processes"]["processes"][MEMBER_01]["restarts"] == 2, body


async def _running_and_ready(deployment: Deployment, name: str) -> bool:
    process = (await asyncio.to_thread(deployment.processes))[name]
    return process.state == "RUNNING" and await asyncio.to_thread(deployment.ready, name)


async def _gone(pid: int) -> float | None:
    stat = procfs.read_stat(pid)  # None once it is a zombie or reaped
    return time.monotonic() if stat is None else None


async def _new_pid(deployment: Deployment, name: str, old: int) -> float | None:
    pid = (await asyncio.to_thread(deployment.processes))[name].pid
    return time.monotonic() if pid and pid != old else None


def _back_running(record: ProcessRecord) -> bool:
    return record.state == "RUNNING" and record.restarts >= 1


async def _record_when(deployment: Deployment, name: str,
                       condition: Callable[[ProcessRecord], bool]) -> ProcessRecord | None:
    """The listener's record of `name` once `condition` holds for it (the book lags the events a little)."""
    record = deployment.book().processes.get(name)
    return record if record is not None and condition(record) else None


async def _fatal_reason(deployment: Deployment, name: str) -> str | None:
    record = deployment.book().processes.get(name)
    return record.fatal_reason if record else None
