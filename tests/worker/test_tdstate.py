"""Portable Telegram state (worker/tdstate.py): an account's login follows it to another host through
PostgreSQL, with no shared disk and no new login, on the emulator and with the real TDLib offline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from support import ApiClient, EmulatorHandle, Host, HostFactory, WorkerProcess, build_host, eventually
from worker.test_accounts import _serving

from telegram_platform.settings import Settings, TdlibSettings
from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import snapshots as snapshot_store
from telegram_platform.telegram.base import (
    AuthState,
    IncomingMessage,
    SessionConfig,
    Update,
    WrongDatabaseKey,
)
from telegram_platform.telegram.content import plain
from telegram_platform.telegram.factory import create_backend
from telegram_platform.telegram.keys import derive_database_key
from telegram_platform.telegram.snapshots import MARK_NAME, read_mark
from telegram_platform.telegram.tdlib.backend import TdlibBackend
from telegram_platform.worker.tdstate import StateSnapshots

# Host A in a process of its own, killed with SIGKILL: it logs the account in, reports each incoming
# message it hears, and renews its (short) lease until it dies.
HOST_A = """
import asyncio, sys
from telegram_platform.settings import Settings
from telegram_platform.storage.db import open_pool
from telegram_platform.storage.redis import open_redis
from telegram_platform.telegram.base import IncomingMessage
from telegram_platform.telegram.factory import create_backend
from telegram_platform.worker.account_sessions import AccountSessions

async def main(account_id, code, lease_ms):
    settings = Settings.from_env(app_mode="worker")
    async with open_pool(settings) as pool, open_redis(settings.redis) as redis:
        ref = []
        async def on_update(update):
            if isinstance(update, IncomingMessage):
                print("incoming", update.telegram_message_id, flush=True)
            await ref[0].on_update(update)
        sessions = AccountSessions(settings, pool, redis, create_backend(settings, on_update=on_update),
                                   worker_name="host-a", lease_ttl_ms=lease_ms)
        ref.append(sessions)
        hosted = await sessions.open(account_id, restart=True)
        await hosted.session.submit_code(code)
        print("ready", hosted.session.auth_state.value, flush=True)
        while True:
            await sessions.renew_leases()
            await asyncio.sleep(lease_ms / 4000)

asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
"""
LEASE_MS = 1500
TDLIB_API_ID = 94575
TDLIB_API_HASH = "a3406de8d171bb422bb6ddf3bbd800e2"


def _host_settings(platform_env: dict[str, str], data_dir: Path, **extra: str) -> Settings:
    return Settings.from_env({**platform_env, "TDLIB_DATA_DIR": str(data_dir), **extra}, app_mode="worker")


@contextlib.asynccontextmanager
async def _host(settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis, name: str,
                heard: list[Update] | None = None) -> AsyncIterator[Host]:
    """A Telegram host with its own data directory (as on another machine); `heard` records what its
    backend reports."""
    ref: list[Host] = []

    async def on_update(update: Update) -> None:
        if heard is not None:
            heard.append(update)
        await ref[0].sessions.on_update(update)

    host = build_host(settings, db, redis, create_backend(settings, on_update=on_update), worker_name=name,
                      lease_ttl_ms=LEASE_MS)
    ref.append(host)
    try:
        yield host
    finally:
        await host.sessions.aclose(time.monotonic() + 5)


async def _heard(heard: list[Update], message_id: int) -> bool:
    """Has the host's backend reported this incoming message?"""
    return any(isinstance(u, IncomingMessage) and u.telegram_message_id == message_id for u in heard)


async def _logged_in(host: Host, account_id: int, code: str) -> None:
    hosted = await host.sessions.open(account_id, restart=True)
    assert await hosted.session.submit_code(code) is AuthState.READY


async def test_a_host_killed_mid_session_is_replaced_by_one_with_an_empty_disk_without_a_login(
        platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis, fresh_emulator: EmulatorHandle,
        tmp_path: Path) -> None:
    """Host A logs an account in and is SIGKILLed; once its lease expires host B, with an empty data
    directory, opens the account READY from the snapshot (no new login, no new code), hears again the
    message A heard after the snapshot (a re-sync of updates), and sends."""
    telegram = fresh_emulator.telegram
    account = await account_store.create_account(db, "+9996651234", None)
    env = {**platform_env, "TDLIB_DATA_DIR": str(tmp_path / "host-a")}
    host_a = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOST_A, str(account["id"]), "55555", str(LEASE_MS), env=env,
        stdout=asyncio.subprocess.PIPE, start_new_session=True)
    assert host_a.stdout is not None
    try:
        line = await asyncio.wait_for(host_a.stdout.readline(), timeout=30)
        assert line.decode().split() == ["ready", "ready"], line
        stored = await eventually(lambda: snapshot_store.latest(db, account["id"]))
        assert not stored.discarded and stored.backend == "emulator"
        sent = telegram.deliver_incoming("+9996651234", "@carol", "while A was up")
        line = await asyncio.wait_for(host_a.stdout.readline(), timeout=10)
        assert line.decode().split() == ["incoming", str(sent["message_id"])], line
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(host_a.pid, signal.SIGKILL)
        await host_a.wait()
    assert host_a.returncode == -signal.SIGKILL
    assert (await snapshot_store.latest(db, account["id"])) == stored  # nothing written after the kill
    logins, codes = telegram.counters["logins"], telegram.counters["code_requests"]
    assert (logins, codes) == (1, 1)

    heard: list[Update] = []
    settings_b = _host_settings(platform_env, tmp_path / "host-b")
    async with _host(settings_b, db, redis, "host-b", heard) as host_b:
        assert not (tmp_path / "host-b").exists()
        await asyncio.sleep(LEASE_MS / 1000)
        assert await eventually(host_b.sessions.resume_orphaned_accounts, timeout=10) == 1
        hosted = host_b.sessions.hosted(account["id"])
        assert hosted is not None and hosted.session.auth_state is AuthState.READY
        assert host_b.sessions.state.counts["restored"] == 1
        assert (telegram.counters["logins"], telegram.counters["code_requests"]) == (logins, codes)

        await eventually(lambda: _heard(heard, sent["message_id"]), timeout=10)
        message = await hosted.session.send("@dave", plain("from host B"))
        assert [r.text for r in telegram.received_by("@dave")] == ["from host B"]
        assert message.telegram_message_id > 0
        assert (await account_store.get_account(db, account["id"]))["auth_state"] == "ready"
        stats = host_b.sessions.stats()["state_snapshots"]
        assert stats["accounts"] == 1 and stats["bytes"] == stored.size_bytes and stats["restored_total"] == 1


async def test_a_closed_session_hands_its_latest_state_and_a_logout_resurrects_nothing(
        platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis, fresh_emulator: EmulatorHandle,
        tmp_path: Path) -> None:
    """A's close snapshots the state it ended with (a new generation); B resumes it, then logs out:
    the snapshot is discarded, and A, with its old copy on disk, does not resume the login."""
    telegram = fresh_emulator.telegram
    account = await account_store.create_account(db, "+9996652234", None)
    settings_a = _host_settings(platform_env, tmp_path / "host-a")
    settings_b = _host_settings(platform_env, tmp_path / "host-b")
    heard: list[Update] = []
    async with _host(settings_a, db, redis, "host-a", heard) as host_a:
        await _logged_in(host_a, account["id"], "55555")
        first = await eventually(lambda: snapshot_store.latest(db, account["id"]))
        assert first.generation == 1
        sent = telegram.deliver_incoming("+9996652234", "@erin", "moves the update number on")
        await eventually(lambda: _heard(heard, sent["message_id"]))
        await host_a.sessions.close_account(account["id"])
    closed = await snapshot_store.latest(db, account["id"])
    assert closed is not None and closed.generation == 2 and closed.sha256 != first.sha256

    async with _host(settings_b, db, redis, "host-b") as host_b:
        hosted = await host_b.sessions.open_for_sending(account["id"])
        assert hosted.session.auth_state is AuthState.READY
        assert read_mark(tmp_path / "host-b" / "emulator" / str(account["id"])) == read_mark(
            tmp_path / "host-a" / "emulator" / str(account["id"]))
        await hosted.session.log_out()
        await host_b.sessions.close_account(account["id"])
    discarded = await snapshot_store.latest(db, account["id"])
    assert discarded is not None and discarded.discarded and discarded.generation == 3
    assert await snapshot_store.sealed_bytes(db, account["id"], 3) is None

    async with _host(settings_a, db, redis, "host-a-again") as host_a:
        directory = tmp_path / "host-a" / "emulator" / str(account["id"])
        assert (directory / "session.bin").exists()  # A's stale copy of the login
        hosted = await host_a.sessions.open(account["id"])
        assert hosted.session.auth_state is not AuthState.READY
        assert sorted(p.name for p in directory.iterdir()) in ([MARK_NAME], [MARK_NAME, "session.bin"])
        assert telegram.counters["logins"] == 1
        assert host_a.sessions.state.counts["discarded_locally"] == 1


async def test_a_stale_owner_cannot_write_the_snapshot(
        platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis, fresh_emulator: EmulatorHandle,
        tmp_path: Path) -> None:
    """Host A still runs an account another host has taken over (its lease lost unnoticed): the
    snapshot A takes when it closes is refused by PostgreSQL, and B's stands."""
    account = await account_store.create_account(db, "+9996653234", None)
    heard_a: list[Update] = []
    heard_b: list[Update] = []
    async with _host(_host_settings(platform_env, tmp_path / "host-a"), db, redis, "host-a", heard_a) as host_a, \
            _host(_host_settings(platform_env, tmp_path / "host-b"), db, redis, "host-b", heard_b) as host_b:
        await _logged_in(host_a, account["id"], "55555")
        await eventually(lambda: snapshot_store.latest(db, account["id"]))
        await redis.flushdb()  # A's lease vanishes: B may take the account
        await host_b.sessions.open(account["id"])
        sent = fresh_emulator.telegram.deliver_incoming("+9996653234", "@frank", "both copies move on")
        await eventually(lambda: _heard(heard_a, sent["message_id"]))
        await eventually(lambda: _heard(heard_b, sent["message_id"]))
        await host_b.sessions.close_account(account["id"])
        by_b = await snapshot_store.latest(db, account["id"])
        assert by_b is not None and by_b.generation == 2
        await host_a.sessions.close_account(account["id"])
        assert host_a.sessions.state.counts["refused"] == 1
        assert await snapshot_store.latest(db, account["id"]) == by_b


async def test_removing_an_account_removes_its_snapshot(db: asyncpg.Pool, make_host: HostFactory) -> None:
    """DELETE of an account takes its stored state with it: no host can resume a removed account."""
    host = await make_host("host-a")
    account = await account_store.create_account(db, "+9996654234", None)
    await _logged_in(host, account["id"], "55555")
    await eventually(lambda: snapshot_store.latest(db, account["id"]))
    await host.sessions.close_account(account["id"])
    await account_store.delete_account(db, account["id"])
    assert await db.fetchval("SELECT count(*) FROM account_snapshots") == 0


async def test_a_snapshot_sealed_under_another_encryption_key_is_refused_then_set_aside(
        platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis, fresh_emulator: EmulatorHandle,
        tmp_path: Path) -> None:
    """A host whose ENCRYPTION_KEY differs cannot restore the snapshot (WrongDatabaseKey, nothing
    written locally); a login started over with the database set aside discards it, and the step
    that login reached is what B's close leaves."""
    account = await account_store.create_account(db, "+9996655234", None)
    async with _host(_host_settings(platform_env, tmp_path / "host-a"), db, redis, "host-a") as host_a:
        await _logged_in(host_a, account["id"], "55555")
        await host_a.sessions.close_account(account["id"])
    other_key = _host_settings(platform_env, tmp_path / "host-b", ENCRYPTION_KEY="6" * 64)
    async with _host(other_key, db, redis, "host-b") as host_b:
        with pytest.raises(WrongDatabaseKey):
            await host_b.sessions.open(account["id"])
        assert not (tmp_path / "host-b" / "emulator" / str(account["id"])).exists()
        hosted = await host_b.sessions.login_again(account["id"], set_aside_database=True)
        assert hosted.session.auth_state is AuthState.WAIT_CODE
        stored = await snapshot_store.latest(db, account["id"])
        assert stored is not None and stored.discarded
    # Closed mid-login, B leaves its step (under its own key) for the next owner: a new generation.
    step = await snapshot_store.latest(db, account["id"])
    assert step is not None and not step.discarded and step.generation == stored.generation + 1


# -- the real TDLib, offline ----------------------------------------------------------------------

def _tdlib_settings(data_dir: Path) -> TdlibSettings:
    return TdlibSettings(api_id=TDLIB_API_ID, api_hash=TDLIB_API_HASH, data_dir=data_dir, use_test_dc=False,
                         log_verbosity=1, log_file=data_dir / "tdlib.log", request_timeout=10.0, max_clients=10)


async def _ignore(update: Update) -> None:
    return None


async def test_tdlib_state_round_trips_through_postgresql_to_another_directory(
        db: asyncpg.Pool, settings: Settings, tmp_path: Path) -> None:
    """Real TDLib (offline): what a client stored in its binlog (an option) is restored byte for byte
    into another host's empty directory, where a new client opens it with the same key, reaches the
    same authorization state and reads the option back; the caches (db.sqlite) stay behind. An
    unchanged binlog is not written again; a changed one is the next generation."""
    account = await account_store.create_account(db, "+15550001234", None)
    token = await account_store.take_ownership(db, account["id"], "host-a")
    config = SessionConfig(account_id=account["id"], phone=account["phone"],
                           database_key=derive_database_key(settings.encryption_key, account["id"]))
    option = {"@type": "setOption", "name": "x-tp-portable", "value": {"@type": "optionValueString",
                                                                          "value": "carried"}}

    backend_a = TdlibBackend(_tdlib_settings(tmp_path / "host-a"), on_update=_ignore)
    try:
        session = await backend_a.open_session(config)
        assert await session.start(phone_timeout=0) is AuthState.WAIT_PHONE
        await session.request(option)
        await session.close()
    finally:
        await backend_a.aclose(time.monotonic() + 10)
    directory_a = backend_a.database_dir(account["id"])
    assert {"td.binlog", "db.sqlite"} <= {p.name for p in directory_a.iterdir()}
    state_a = StateSnapshots(db, settings.encryption_key, backend_a)
    assert await state_a.take(account["id"], token) == 1
    assert await state_a.take(account["id"], token) is None  # unchanged: no write
    assert state_a.counts["unchanged"] == 1
    stored = await snapshot_store.latest(db, account["id"])
    assert stored is not None and stored.backend == "tdlib"
    assert stored.size_bytes < (directory_a / "td.binlog").stat().st_size + 200

    backend_b = TdlibBackend(_tdlib_settings(tmp_path / "host-b"), on_update=_ignore)
    try:
        restored = await StateSnapshots(db, settings.encryption_key, backend_b).restore(account["id"])
        assert restored.action == "restored" and restored.generation == 1
        directory_b = backend_b.database_dir(account["id"])
        assert (directory_b / "td.binlog").read_bytes() == (directory_a / "td.binlog").read_bytes()
        assert sorted(p.name for p in directory_b.iterdir()) == [MARK_NAME, "td.binlog"]
        session = await backend_b.open_session(config)
        assert await session.start(phone_timeout=0) is AuthState.WAIT_PHONE
        answer = await session.request({"@type": "getOption", "name": "x-tp-portable"})
        assert answer["value"] == "carried"
        await session.request({**option, "value": {"@type": "optionValueString", "value": "changed on B"}})
        state_b = StateSnapshots(db, settings.encryption_key, backend_b)
        # An open client's binlog, as a periodic round takes it, once TDLib has written it.
        assert await eventually(lambda: state_b.take(account["id"], token), timeout=5) == 2
        await session.close()
    finally:
        await backend_b.aclose(time.monotonic() + 10)

    other = StateSnapshots(db, bytes(32), backend_b)
    (directory_b / MARK_NAME).unlink()
    with pytest.raises(WrongDatabaseKey):
        await other.restore(account["id"])


# -- whole workers ----------------------------------------------------------------------------------

async def test_a_worker_killed_with_kill_9_is_replaced_by_one_on_an_empty_disk_without_a_login(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis,
        fresh_emulator: EmulatorHandle, tmp_path: Path) -> None:
    """A real tp-worker logs an account in through the API and is killed (kill -9, its whole process
    group); a second tp-worker with its own, empty TP_VAR_DIR serves the account READY from its
    snapshot (no new login, no new code) and sends a message posted to the API."""
    telegram = fresh_emulator.telegram
    worker_a = WorkerProcess.start({**platform_env, "TP_VAR_DIR": str(tmp_path / "host-a")})
    try:
        await _serving(redis)
        status, account = await api.call("POST", "/api/accounts", admin_token, json={"phone": "+9996656234"})
        assert status == 201, account
        status, body = await api.call("POST", f"/api/accounts/{account['id']}/auth/code", admin_token,
                                      json={"code": "55555"})
        assert status == 200 and body["auth_state"] == "ready", body
        stored = await eventually(lambda: snapshot_store.latest(db, account["id"]))
        assert not stored.discarded
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker_a.process.pid, signal.SIGKILL)
        worker_a.process.wait()
    assert (telegram.counters["logins"], telegram.counters["code_requests"]) == (1, 1)

    worker_b = WorkerProcess.start({**platform_env, "TP_VAR_DIR": str(tmp_path / "host-b")})
    try:
        status, message = await api.call("POST", "/api/messages", admin_token,
                                          json={"account_id": account["id"], "peer": "@grace", "text": "on B"})
        assert status == 202, message

        async def sent() -> bool:
            _, body = await api.call("GET", f"/api/messages/{message['id']}", admin_token)
            return bool(body["status"] == "sent")

        await eventually(sent, timeout=45)
        assert [r.text for r in telegram.received_by("@grace")] == ["on B"]
        assert (telegram.counters["logins"], telegram.counters["code_requests"]) == (1, 1)
        assert (tmp_path / "host-b" / "tdlib" / "emulator" / str(account["id"]) / "session.bin").exists()
    finally:
        assert worker_b.stop() == 0

