"""`tp check`: the pre-deployment check. One line per check; exit 0 only when all pass."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from ..settings import Settings
from ..storage.migrations import pending_migrations

MIN_FREE_DISK = 1 << 30
Check = Callable[[Settings], Awaitable[str]]


class CheckFailed(Exception):
    pass


async def check_environment(settings: Settings) -> str:
    if settings.profile == "production" and settings.var_dir in Path(settings.database_url).parents:
        raise CheckFailed("production must not use the embedded database")
    return f"profile {settings.profile}, telegram backend {settings.telegram_backend}"


async def check_database(settings: Settings) -> str:
    try:
        conn = await asyncio.wait_for(asyncpg.connect(settings.database_url), 5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise CheckFailed(f"DATABASE_URL: cannot connect ({type(exc).__name__})") from None
    try:
        pending = await pending_migrations(conn)
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    if pending:
        raise CheckFailed(f"migrations pending: {pending} (run `tp migrate`)")
    return f"PostgreSQL {version} reachable, schema up to date"


async def check_redis(settings: Settings) -> str:
    client = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        policy = (await client.config_get("maxmemory-policy")).get("maxmemory-policy")
        version = (await client.info("server")).get("redis_version")
    except (OSError, aioredis.RedisError) as exc:
        raise CheckFailed(f"REDIS_URL: cannot connect ({type(exc).__name__})") from None
    finally:
        await client.aclose()
    if policy != "noeviction":
        raise CheckFailed(f"Redis maxmemory-policy is {policy}: queues need noeviction "
                          "(CONFIG SET maxmemory-policy noeviction)")
    return f"Redis {version} reachable, maxmemory-policy noeviction"


async def check_tdlib(settings: Settings) -> str:
    # In a child process: loading TDLib here would put it in a process that may fork.
    code = ("import json, tdjson; r = tdjson.td_execute(json.dumps({'@type': 'getOption', 'name': 'version'})"
            ".encode()); print(json.loads(r).get('value', '?'))")
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], capture_output=True,
                                     text=True, timeout=30)
    if result.returncode != 0:
        raise CheckFailed(f"TDLib does not load: {result.stderr.strip().splitlines()[-1:]}")
    return f"TDLib {result.stdout.strip()} loads"


async def check_port(settings: Settings) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        in_use = sock.connect_ex(("127.0.0.1", settings.port)) == 0
    if not in_use:
        return f"port {settings.port} free"
    if settings.supervisor_socket.exists():
        return f"port {settings.port} served by this deployment"
    raise CheckFailed(f"PORT {settings.port} is taken by another program")


async def check_directories(settings: Settings) -> str:
    checked = []
    for directory in (settings.var_dir, settings.tdlib.data_dir):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(directory, os.W_OK):
            raise CheckFailed(f"{directory} is not writable")
        mode = stat.S_IMODE(directory.stat().st_mode)
        if mode & 0o007:
            raise CheckFailed(f"{directory} is world-accessible (mode {mode:o}); chmod o-rwx it")
        checked.append(str(directory))
    free = shutil.disk_usage(settings.var_dir).free
    if free < MIN_FREE_DISK:
        raise CheckFailed(f"only {free / 2**30:.2f} GiB free under {settings.var_dir}")
    return f"{', '.join(checked)} writable, {free / 2**30:.1f} GiB free"


CHECKS: list[tuple[str, Check]] = [
    ("environment", check_environment),
    ("database", check_database),
    ("redis", check_redis),
    ("tdlib", check_tdlib),
    ("port", check_port),
    ("directories", check_directories),
]


async def run_checks(settings: Settings) -> int:
    failed = 0
    for name, check in CHECKS:
        try:
            detail = await check(settings)
        except CheckFailed as exc:
            failed += 1
            print(f"FAIL {name}: {exc}")
        else:
            print(f"ok   {name}: {detail}")
    return 1 if failed else 0
