"""The per-process Redis client: bounded when Redis stops answering, transparent when a pooled
connection was closed under it, and following a Sentinel-managed master through a failover."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions
from servers import SentinelRig
from support import TcpProxy, eventually

from telegram_platform.ops.check import check_redis, load_context
from telegram_platform.outages import REDIS_DOWN
from telegram_platform.settings import RedisSettings, Settings
from telegram_platform.storage.redis import open_redis


async def test_a_redis_that_stops_answering_fails_a_command_after_its_timeout(platform_env: dict[str, str]) -> None:
    """No retry after a timeout: a Redis that stops answering costs one socket_timeout per command."""
    proxy = TcpProxy.before(platform_env["REDIS_URL"])
    await proxy.start()
    try:
        async with open_redis(RedisSettings(url=proxy.url), socket_timeout=0.5) as client:
            await client.set("tp:test:k", "v")
            proxy.stall()
            started = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.get("tp:test:k")
            assert time.monotonic() - started < 1.5
    finally:
        await proxy.cut()


async def test_a_pooled_connection_the_server_closed_is_replaced_once(platform_env: dict[str, str]) -> None:
    """Redis restarted (its connections reset) while the client sat idle: the next command gets a
    fresh connection instead of the error (redis-py's from_url retries nothing by default)."""
    proxy = TcpProxy.before(platform_env["REDIS_URL"])
    await proxy.start()
    try:
        async with open_redis(RedisSettings(url=proxy.url), socket_timeout=2) as client:
            await client.set("tp:test:k", "v")
            await proxy.cut()
            await proxy.start()
            assert await client.get("tp:test:k") == b"v"
    finally:
        await proxy.cut()


async def test_a_sentinel_client_follows_the_master_sentinel_promotes(tmp_path: Path,
                                                                      platform_env: dict[str, str]) -> None:
    """Through REDIS_SENTINELS the client (and `tp check`) reach the master; after the master is
    killed and Sentinel promotes the replica, the same client reaches the new master by itself and
    finds what was written before."""
    with SentinelRig(tmp_path / "sentinel") as rig:
        await asyncio.to_thread(rig.start)
        env = {k: v for k, v in platform_env.items() if k != "REDIS_URL"}
        env |= {"REDIS_SENTINELS": rig.sentinels, "REDIS_SENTINEL_SERVICE": rig.SERVICE}
        settings = Settings.from_env(env).redis
        ctx = load_context(env)
        assert await check_redis(ctx) == (f"Redis {redis_version()} reachable (master of Sentinel service "
                                          f"{rig.SERVICE}), maxmemory-policy noeviction")
        async with open_redis(settings, socket_timeout=2) as client:
            assert (await client.info("server"))["tcp_port"] == rig.master_port
            await client.set("tp:test:k", "before")
            await client.wait(1, 2000)  # on the replica too
            await asyncio.to_thread(rig.kill_master)
            took = await asyncio.to_thread(rig.wait_promoted)

            async def on_new_master() -> Any:
                try:
                    return (await client.info("server"))["tcp_port"] == rig.replica_port
                except REDIS_DOWN:
                    return False

            await eventually(on_new_master, timeout=30, interval=0.1)
            assert await client.get("tp:test:k") == b"before"
            await client.set("tp:test:k", "after")
            assert await client.get("tp:test:k") == b"after"
        print(f"sentinel failover: replica promoted {took:.1f}s after the master was killed")


def redis_version() -> str:
    """The redis-server binary's version, as INFO reports it."""
    output = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
    return output.split("v=", 1)[1].split()[0]
