"""Test servers: TEST_DATABASE_URL / TEST_REDIS_URL when set, else throwaway local instances.

The fixtures in conftest.py are thin wrappers around the context managers here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
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
from telegram_platform.settings import S3Settings

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


# -- S3: Ceph's radosgw on a one-OSD throwaway cluster ------------------------------------------

CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool", "ceph-authtool")
CEPH_PACKAGES = "ceph-mon ceph-osd radosgw"


def missing_ceph_binaries() -> list[str]:
    return [name for name in CEPH_BINARIES if shutil.which(name) is None]


class ThrowawayRadosgw:
    """A real S3 server for one test session: Ceph's radosgw (beast frontend, 127.0.0.1, a free
    port) over a cluster of one monitor and one OSD whose objects live in memory (memstore), with
    authentication off inside the cluster (it is reached from loopback only) and one S3 user whose
    key id and secret the fixture makes up. The way in is Ceph's own vstart.sh, cut to the minimum:
    https://github.com/ceph/ceph/blob/main/src/vstart.sh. Every daemon runs in the foreground as
    our child, in a session of its own, and dies with the test run (PR_SET_PDEATHSIG); `stop` kills
    them all, also after a failed start, and removes the directory."""

    def __init__(self, base_dir: Path, *, startup_timeout: float = 180.0) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.startup_timeout = startup_timeout
        self.access_key_id = "TP" + secrets.token_hex(8).upper()
        self.secret_access_key = secrets.token_urlsafe(30)
        self.mon_port = 0
        self.port = 0
        self._conf = self.base_dir / "ceph.conf"
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self, bucket: str, **overrides: Any) -> S3Settings:
        """The platform's S3 settings for a bucket of this server."""
        fields: dict[str, Any] = {"region": "us-east-1", "access_key_id": self.access_key_id,
                                  "secret_access_key": self.secret_access_key, "endpoint": self.endpoint,
                                  **overrides}
        return S3Settings(bucket=bucket, **fields)

    def env(self, bucket: str) -> dict[str, str]:
        """The same, as the TP_* variables a deployment sets."""
        return {"TP_FILE_STORE": "s3", "TP_S3_ENDPOINT": self.endpoint, "TP_S3_BUCKET": bucket,
                "TP_S3_ACCESS_KEY_ID": self.access_key_id, "TP_S3_SECRET_ACCESS_KEY": self.secret_access_key}

    def _write_conf(self, fsid: str) -> None:
        d = self.base_dir
        self._conf.write_text(f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{self.mon_port}
public network = 127.0.0.0/8
# A throwaway on loopback: no cephx; then every connection mode must allow plain crc.
auth cluster required = none
auth service required = none
auth client required = none
ms bind msgr1 = false
ms mon client mode = crc
ms client mode = crc
ms mon cluster mode = crc
ms mon service mode = crc
ms cluster mode = crc
ms service mode = crc
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
keyring = {d}/keyring
# One OSD: one copy of everything, and few placement groups.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
[mon]
mon data = {d}/mon.$id
[osd]
osd data = {d}/osd.$id
osd objectstore = memstore
memstore device bytes = {1 << 30}
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{self.port}
rgw data = {d}/rgw
""")

    def _run(self, *argv: str) -> str:
        result = subprocess.run([*argv], capture_output=True, text=True, timeout=120, check=False,
                                env={**os.environ, "CEPH_ARGS": ""}, cwd=self.base_dir)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()[-500:]
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {detail}")
        return result.stdout

    def _spawn(self, name: str, *argv: str) -> None:
        with open(self.base_dir / "log" / f"{name}.out", "ab") as out:
            self._processes[name] = subprocess.Popen(
                [*argv, "-f", "-c", str(self._conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.base_dir, env={**os.environ, "CEPH_ARGS": ""}, start_new_session=True,
                preexec_fn=pdeathsig(signal.SIGKILL))

    def _check_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                log = self.base_dir / "log" / f"{name}.out"
                tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
                raise RuntimeError(f"{name} exited with {process.returncode}: {' | '.join(tail)}")

    def _answers(self) -> bool:
        self._check_alive()
        try:
            with urllib.request.urlopen(self.endpoint, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # any S3 answer (an anonymous listing may be refused) means it serves
        except OSError:
            return False

    def start(self) -> Self:
        missing = missing_ceph_binaries()
        if missing:
            raise FileNotFoundError(f"not installed: {', '.join(missing)} (apt-get install {CEPH_PACKAGES})")
        for sub in ("mon.a", "osd.0", "run", "log", "rgw"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        self.mon_port, self.port = free_port(), free_port()
        fsid = str(uuid.uuid4())
        self._write_conf(fsid)
        keyring, monmap = str(self.base_dir / "keyring"), str(self.base_dir / "monmap")
        self._run("ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]", monmap)
        self._run("ceph-mon", "-c", str(self._conf), "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring)
        self._spawn("mon.a", "ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd_id = self._run("ceph", "-c", str(self._conf), "--connect-timeout", "60", "osd", "new", osd_uuid).strip()
        self._run("ceph-osd", "-c", str(self._conf), "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        self._spawn(f"osd.{osd_id}", "ceph-osd", "-i", osd_id)
        self._spawn("rgw", "radosgw", "-n", "client.rgw")  # creates its pools once the OSD is up
        _wait(self._answers, f"radosgw on {self.endpoint}", timeout=self.startup_timeout)
        self._run("radosgw-admin", "-c", str(self._conf), "user", "create", "--uid", "tp-tests",
                  "--display-name", "telegram-platform tests", "--access-key", self.access_key_id,
                  "--secret", self.secret_access_key)
        return self

    def create_bucket(self, bucket: str) -> None:
        run_async(self._create_bucket(bucket))

    async def _create_bucket(self, bucket: str) -> None:
        async with self.client() as client:
            await client.create_bucket(Bucket=bucket)

    def client(self) -> Any:
        """An S3 client of the tests' own, as any S3 user would make one (not the platform's)."""
        from aiobotocore.session import get_session

        return get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key)

    def blobs_in(self, bucket: str) -> int:
        """Objects in the bucket plus multipart uploads begun and neither completed nor aborted."""
        return run_async(self._blobs_in(bucket))

    async def _blobs_in(self, bucket: str) -> int:
        async with self.client() as client:
            objects = await client.list_objects_v2(Bucket=bucket)
            uploads = await client.list_multipart_uploads(Bucket=bucket)
            return len(objects.get("Contents", [])) + len(uploads.get("Uploads", []))

    def delete_objects(self, bucket: str) -> None:
        """Every object of the bucket, deleted behind the platform's back."""
        run_async(self._delete_objects(bucket))

    async def _delete_objects(self, bucket: str) -> None:
        async with self.client() as client:
            for item in (await client.list_objects_v2(Bucket=bucket)).get("Contents", []):
                await client.delete_object(Bucket=bucket, Key=item["Key"])

    def stop(self) -> None:
        for process in self._processes.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in self._processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        self._processes.clear()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
