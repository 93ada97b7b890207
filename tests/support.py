"""Helpers the tests share: a thin API client, a worker process handle, waiting for conditions."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from telegram_platform import events, redis_keys
from telegram_platform.api.app import create_app
from telegram_platform.api.keys import PASSWORDS
from telegram_platform.metrics.definitions import Metrics
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.settings import Settings
from telegram_platform.storage import users
from telegram_platform.storage.migrations import available_migrations
from telegram_platform.storage.outbox import Outbox
from telegram_platform.telegram.base import TelegramBackend
from telegram_platform.telegram.emulator.model import TelegramEmulator
from telegram_platform.telegram.leases import LEASE_TTL_MS
from telegram_platform.worker.account_requests import AccountRequests
from telegram_platform.worker.account_sessions import AccountSessions
from telegram_platform.worker.sender import Sender


@dataclass
class Host:
    """A Telegram host as a worker child builds it: its account sessions, the account requests it
    answers, and its sender."""

    sessions: AccountSessions
    requests: AccountRequests
    sender: Sender


def build_host(settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis, backend: TelegramBackend, *,
               worker_name: str, metrics: Metrics | None = None, lease_ttl_ms: int = LEASE_TTL_MS) -> Host:
    """The host's parts wired as worker/child.py wires them."""
    sessions = AccountSessions(settings, pool, redis, backend, worker_name=worker_name, metrics=metrics,
                               lease_ttl_ms=lease_ttl_ms)
    outbox = Outbox(pool, redis, sessions.redis_auth, log_length=settings.events.log_length,
                    count_failure=metrics.message_failed if metrics is not None else None)
    return Host(sessions, AccountRequests(sessions, pool, redis), Sender(sessions, outbox, pool))


# The `make_host` fixture (conftest.py): builds a Telegram host, as a worker child does.
HostFactory = Callable[..., Awaitable[Host]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def another_api(env: dict[str, str], **extra: str) -> AsyncIterator[TestServer]:
    """A second API process's worth of application, on its own port, sharing the same Redis."""
    settings = Settings.from_env({**env, **extra}, app_mode="api")
    server = TestServer(create_app(settings), port=free_port())
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def schema_behind(db: asyncpg.Pool) -> AsyncIterator[int]:
    """The database as code newer than it finds it: its latest migration not applied (yields that
    version); restored afterwards."""
    latest = available_migrations()[-1]
    row = await db.fetchrow("DELETE FROM schema_migrations WHERE version = $1 RETURNING *", latest.version)
    assert row is not None
    try:
        yield latest.version
    finally:
        await db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                         row["version"], row["name"], row["applied_at"])


async def run_to_exit(code: str, env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """A program run to its end in a fresh interpreter (`python -c code *args`): (exit status, stdout,
    stderr)."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", code, *args, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=timeout)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@dataclass
class EmulatorHandle:
    telegram: TelegramEmulator
    url: str


@dataclass
class ApiClient:
    client: TestClient[Any, Any]
    app: web.Application

    async def user_token(self, username: str, role: str, db: asyncpg.Pool, password: str = "pw-" + "x" * 12) -> str:
        password_hash = await self.app[PASSWORDS].hash(password)
        if await users.get_by_username(db, username) is None:
            await users.create_user(db, username, password_hash, role)
        response = await self.client.post("/api/auth/login", json={"username": username, "password": password})
        assert response.status == 200, await response.text()
        return str((await response.json())["access_token"])

    async def call(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> tuple[int, Any]:
        headers = dict(kwargs.pop("headers", {}))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self.client.request(method, path, headers=headers, **kwargs) as response:
            body = await response.json() if response.content_type == "application/json" else await response.text()
            return response.status, body


class WorkerProcess:
    """`tp-worker` as supervisord would run it: its own process group, stopped by SIGTERM."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: str) -> None:
        self.process = process
        self.log_path = log_path

    @classmethod
    def start(cls, env: dict[str, str], *, append: bool = False) -> WorkerProcess:
        """`append` keeps one log across restarts of a worker in the same TP_VAR_DIR."""
        log_path = os.path.join(env["TP_VAR_DIR"], "worker.log")
        os.makedirs(env["TP_VAR_DIR"], exist_ok=True)
        with open(log_path, "ab" if append else "wb") as log:
            process = subprocess.Popen([sys.executable, "-c", "from telegram_platform.cli.worker import main; main()"],
                                       env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(process, log_path)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30) -> int:
        self.terminate()
        try:
            return self.process.wait(timeout=timeout)
        finally:
            # Nothing may outlive the test, whatever happened.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll `check` until it returns a truthy value; fail with its last value after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


async def wait_until_healthy(http: aiohttp.ClientSession, timeout: float = 60.0, interval: float = 0.2) -> None:
    """Wait until `GET /api/health` answers 200 through this session's base URL."""

    async def healthy() -> bool:
        try:
            async with http.get("/api/health") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    await eventually(healthy, timeout=timeout, interval=interval)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus exposition, keyed by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in values.items() if n == name and want <= set(lbl))


class TcpProxy:
    """A real TCP hop in front of a server, which a test can cut (refuse and drop every connection)."""

    def __init__(self, target_host: str, target_port: int, url: str = "") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.url = url  # the server's URL with this proxy's port (`before`)
        self._cuts = 0  # a connection still being set up when a cut came is reset too
        self._stalled = False

    @classmethod
    def before(cls, server_url: str) -> TcpProxy:
        """A proxy in front of the server a postgresql:// or redis:// URL names; `.url` reaches it
        through the proxy. Not listening until `start()` (again after a `cut()`: the server is back)."""
        url = urlsplit(server_url)
        assert url.hostname and url.port, server_url
        proxy = cls(url.hostname, url.port)
        netloc = url.netloc.rsplit(":", 1)[0] + f":{proxy.port}"
        proxy.url = urlunsplit((url.scheme, netloc, url.path, url.query, url.fragment))
        return proxy

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cuts = self._cuts
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        if cuts != self._cuts:  # accepted before the cut, connected after it
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if self._stalled:
                        continue  # a network that drops packets: nothing arrives, nothing is refused
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stall(self) -> None:
        """The server stops answering: connections open and stay open, and nothing comes back. A
        `cut()` then `start()` ends it (the connections it spoiled are reset)."""
        self._stalled = True

    async def cut(self) -> None:
        """The server goes away: new connections are refused, open ones are reset."""
        assert self._server is not None
        self._stalled = False
        self._cuts += 1
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()


@dataclass(frozen=True)
class SelfSigned:
    """A certificate for 127.0.0.1 and localhost, its own CA: `cert` and `key` are PEM files."""

    cert: Path
    key: Path


def self_signed(directory: Path, name: str = "api") -> SelfSigned:
    """A fresh self-signed P-256 certificate (a day long) for loopback, made with `cryptography`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return SelfSigned(cert_path, key_path)

# Forged events (support for the tests of every event reader): what someone who can write to Redis,
# but has no ENCRYPTION_KEY, can put on the events channel and in the event log.
FORGED_TEXT = "forged by a Redis writer"


async def forge_events(redis: aioredis.Redis, auth: RedisAuth) -> int:
    """Publish forged events (unsigned, signed with another key, altered after signing, with text
    smuggled beside the id) and append forged entries to the log; each says FORGED_TEXT. Returns how
    many of each (channel, log) there are."""
    encoded = events.encode_event("message.incoming", {"account_id": 1, "id": 1, "text": FORGED_TEXT})
    genuine = events.encode_event("message.incoming", {"account_id": 1, "id": 1, "text": "genuine"})
    other = RedisAuth(bytes(range(32)))
    smuggled = '{"id":"1-0" ,"type" :"message.incoming" ,"data" :{"text" :"' + FORGED_TEXT + '"} ,"zz":"'
    published = [
        events.with_id("1-0", encoded),
        other.event_mac(encoded) + events.with_id("1-0", encoded),
        auth.event_mac(genuine) + events.with_id("1-0", encoded),
        auth.event_mac(genuine) + smuggled + '",' + genuine[1:],
    ]
    for message in published:
        await redis.publish(redis_keys.EVENTS_CHANNEL, message)
    logged: list[dict[str, str]] = [{"e": encoded}, {"e": encoded, "m": other.event_mac(encoded)},
                                    {"e": encoded, "m": auth.event_mac(genuine)}, {"e": encoded, "m": ""}]
    for fields in logged:
        await redis.xadd(redis_keys.EVENTS_LOG, fields)  # type: ignore[arg-type]
    assert len(published) == len(logged)
    return len(published)
