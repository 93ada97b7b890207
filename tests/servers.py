"""Test servers: TEST_DATABASE_URL / TEST_REDIS_URL when set, else throwaway local instances.

The fixtures in conftest.py are thin wrappers around the context managers here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis

from telegram_platform.devstack.binaries import require_binaries
from telegram_platform.devstack.servers import ThrowawayPostgres, ThrowawayRedis, free_port, redis_argv
from telegram_platform.devstack.users import pdeathsig

_T = TypeVar("_T")


def run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to completion in a thread of its own (never touches pytest-asyncio's loop)."""
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="test-servers")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def with_database(url: str, database: str) -> str:
    """The same server URL, naming another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


@contextmanager
def postgres_server(tmp_dir: Path) -> Iterator[str]:
    """A PostgreSQL server URL: TEST_DATABASE_URL, or a throwaway instance stopped at the end."""
    external = os.environ.get("TEST_DATABASE_URL", "").strip()
    if external:
        yield external
        return
    with ThrowawayPostgres(tmp_dir) as server:
        yield server.url


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """Create a uniquely named database on the server; yield its URL; drop it afterwards."""
    name = f"tp_test_{os.getpid()}_{secrets.token_hex(4)}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(server_url, timeout=30)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    run_async(execute(f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(server_url, name)
    finally:
        run_async(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def redis_server(tmp_dir: Path) -> Iterator[str]:
    """A Redis URL: TEST_REDIS_URL, or a throwaway instance stopped at the end."""
    external = os.environ.get("TEST_REDIS_URL", "").strip()
    if external:
        yield external
        return
    with ThrowawayRedis(tmp_dir) as server:
        yield server.url


def flush_redis(url: str) -> None:
    """FLUSHDB on the database the URL names."""
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


class SentinelRig:
    """A Sentinel-managed Redis of its own: a master, a replica and three sentinels (quorum 2), each
    a redis-server process on a free port of 127.0.0.1, quick to fail over (the master is judged
    down after `down_after_ms`). Started in stages, so that a test may put a hop between the replica
    and its master (`start_replica(via=...)`); every process is killed on `stop`, also after a failure,
    and dies with the test run (PR_SET_PDEATHSIG)."""

    SERVICE = "tp-test"

    def __init__(self, base_dir: Path, *, down_after_ms: int = 1000) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.down_after_ms = down_after_ms
        self.master_port = 0
        self.replica_port = 0
        self.sentinel_ports: list[int] = []
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        _, binary = require_binaries(postgres=False, redis=True)
        assert binary is not None
        self._binary = binary

    @property
    def sentinels(self) -> str:
        """REDIS_SENTINELS for the programs."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def _spawn(self, name: str, argv: list[str]) -> None:
        directory = self.base_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "server.log", "ab") as log:
            self._processes[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                                     stderr=subprocess.STDOUT, cwd=directory,
                                                     start_new_session=True, preexec_fn=pdeathsig(signal.SIGKILL))

    def _server(self, name: str, *extra: str) -> int:
        port = free_port()
        self._spawn(name, [*redis_argv(self.base_dir / name, port, throwaway=True, binary=self._binary), *extra])
        _wait(lambda: _ping(port), f"redis {name} on {port}")
        return port

    def start_master(self) -> int:
        self.master_port = self._server("master")
        return self.master_port

    def start_replica(self, via: int | None = None) -> int:
        """The replica, replicating the master directly or through the port `via` (a proxy)."""
        self.replica_port = self._server("replica", "--replicaof", "127.0.0.1", str(via or self.master_port))
        _wait(lambda: _info(self.replica_port, "replication").get("master_link_status") == "up", "replica in sync")
        return self.replica_port

    def start_sentinels(self, count: int = 3) -> None:
        for i in range(count):
            port = free_port()
            directory = self.base_dir / f"sentinel-{i}"
            directory.mkdir(parents=True, exist_ok=True)
            conf = directory / "sentinel.conf"  # sentinel rewrites its configuration file: one each
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master_port} 2\n"
                            f"sentinel down-after-milliseconds {self.SERVICE} {self.down_after_ms}\n"
                            f"sentinel failover-timeout {self.SERVICE} 10000\n"
                            f"sentinel parallel-syncs {self.SERVICE} 1\n")
            self._spawn(f"sentinel-{i}", [str(self._binary), str(conf), "--sentinel"])
            self.sentinel_ports.append(port)

        def all_see_everything() -> bool:
            for port in self.sentinel_ports:
                state = _sentinel_master(port, self.SERVICE)
                if not state or int(state.get("num-slaves", 0)) < 1 or int(state.get("num-other-sentinels", 0)) < 2:
                    return False
            return True

        _wait(all_see_everything, "sentinels aware of the master, the replica and each other", timeout=60)

    def start(self) -> Self:
        self.start_master()
        self.start_replica()
        self.start_sentinels()
        return self

    def master_address(self) -> tuple[str, int] | None:
        """The master as the sentinels' majority names it now."""
        answers = []
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, socket_timeout=1)
            try:
                answer = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
                if answer:
                    answers.append((answer[0].decode(), int(answer[1])))
            except redis.RedisError:
                pass
            finally:
                client.close()
        best = max(set(answers), key=answers.count, default=None)
        return best if best is not None and answers.count(best) >= 2 else None

    def kill_master(self) -> None:
        """kill -9 of the master's process."""
        process = self._processes.pop("master")
        process.kill()
        process.wait(timeout=10)

    def wait_promoted(self, timeout: float = 60) -> float:
        """Wait until the sentinels name the replica as the master; the seconds it took."""
        started = time.monotonic()
        _wait(lambda: self.master_address() == ("127.0.0.1", self.replica_port), "the replica promoted",
              timeout=timeout)
        _wait(lambda: _info(self.replica_port, "replication").get("role") == "master", "the replica acting as master",
              timeout=timeout)
        return time.monotonic() - started

    def stop(self) -> None:
        for process in self._processes.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        self._processes.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _wait(ready: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {timeout}s")


def _ping(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _info(port: int, section: str) -> dict[str, Any]:
    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return dict(client.info(section))
    except redis.RedisError:
        return {}
    finally:
        client.close()


def _sentinel_master(port: int, service: str) -> dict[str, Any] | None:
    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)
    try:
        reply = client.execute_command("SENTINEL", "MASTER", service)
    except redis.RedisError:
        return None
    finally:
        client.close()
    return dict(zip(reply[::2], reply[1::2], strict=True)) if isinstance(reply, list) else dict(reply)
