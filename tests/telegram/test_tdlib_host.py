"""The Telegram host over the real, bundled TDLib, offline: leases, the login's prompt answer, and a real
worker process running TDLib behind the API.

Offline TDLib stops at authorizationStateWaitPhoneNumber / connectionStateConnecting; the host must
answer the API promptly all the same, and never open a second client for an account.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from support import ApiClient, Host, WorkerProcess, build_host, eventually

from telegram_platform.settings import Settings
from telegram_platform.storage import accounts as account_store
from telegram_platform.telegram.base import OwnedElsewhere, Update
from telegram_platform.telegram.factory import create_backend
from telegram_platform.telegram.tdlib.backend import TdlibBackend
from telegram_platform.worker.account_sessions import LOGIN_ANSWER_SECONDS

TDLIB_ENV = {"TDLIB_API_ID": "94575", "TDLIB_API_HASH": "a3406de8d171bb422bb6ddf3bbd800e2"}


@pytest.fixture
def tdlib_env(platform_env: dict[str, str]) -> dict[str, str]:
    """The platform's environment with TDLib configured (test API id and hash): the TDLib backend."""
    return {**platform_env, **TDLIB_ENV}


@pytest.fixture
def tdlib_settings(tdlib_env: dict[str, str]) -> Settings:
    settings = Settings.from_env(tdlib_env, app_mode="worker")
    assert settings.telegram_backend == "tdlib"
    return settings


@pytest.fixture
async def tdlib_host(tdlib_settings: Settings, db: asyncpg.Pool,
                     redis: aioredis.Redis) -> AsyncIterator[Host]:
    """A Telegram host in this process over a real TdlibBackend (the process's only one)."""
    ref: list[Host] = []

    async def on_update(update: Update) -> None:
        await ref[0].sessions.on_update(update)

    backend = create_backend(tdlib_settings, on_update=on_update)
    assert isinstance(backend, TdlibBackend)
    host = build_host(tdlib_settings, db, redis, backend, worker_name="test-host-a")
    ref.append(host)
    yield host
    await host.sessions.aclose(time.monotonic() + 15)


async def test_login_answers_promptly_with_wait_phone_and_connecting(tdlib_host: Host,
                                                                     db: asyncpg.Pool) -> None:
    """Offline, the login step answers after LOGIN_ANSWER_SECONDS (not the 10 s API timeout) with
    wait_phone / connecting, and the account row says the same when the answer arrives."""
    account_id = int((await account_store.create_account(db, "+15550001001", None))["id"])
    started = time.monotonic()
    answer = await tdlib_host.requests.handle_request({"op": "login", "account_id": account_id})
    elapsed = time.monotonic() - started
    assert answer == {"auth_state": "wait_phone", "connection_state": "connecting"}
    assert LOGIN_ANSWER_SECONDS - 0.1 < elapsed < LOGIN_ANSWER_SECONDS + 3
    row = await account_store.get_account(db, account_id)
    assert (row["auth_state"], row["connection_state"]) == ("wait_phone", "connecting")
    assert tdlib_host.sessions.stats()["clients"] == {"wait_phone": 1}


async def test_a_second_owner_is_refused_and_no_second_client_opens(
        tdlib_host: Host, tdlib_settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """A second host (same TDLib process, same data directory) asking for the account gets OwnedElsewhere
    and TDLib keeps exactly one client for it."""
    account_id = int((await account_store.create_account(db, "+15550001002", None))["id"])
    await tdlib_host.sessions.open(account_id)
    backend = tdlib_host.sessions.backend
    assert isinstance(backend, TdlibBackend)
    second = build_host(tdlib_settings, db, redis, backend, worker_name="test-host-b")
    with pytest.raises(OwnedElsewhere) as caught:
        await second.requests.handle_request({"op": "login", "account_id": account_id})
    assert caught.value.owner == "test-host-a"
    assert backend.client_count == 1 and backend.stats()["sessions_total"] == 1


async def test_a_worker_on_tdlib_serves_the_api_and_refuses_a_foreign_account(
        api: ApiClient, admin_token: str, tdlib_env: dict[str, str], tdlib_host: Host,
        db: asyncpg.Pool) -> None:
    """A real tp-worker with TDLib says so at start, answers POST /api/accounts promptly (wait_phone,
    connecting), shows its clients in /api/tdlib/health, and answers 409 owned_elsewhere for an account
    another process holds, without opening it."""
    worker = WorkerProcess.start(tdlib_env)
    try:
        started = time.monotonic()
        status, account = await api.call("POST", "/api/accounts", admin_token, json={"phone": "+15550001003"})
        assert status == 201, (account, worker.log()[-3000:])
        assert (account["auth_state"], account["connection_state"]) == ("wait_phone", "connecting")
        assert time.monotonic() - started < 10, "the first answer includes the worker's start"
        started = time.monotonic()
        status, account = await api.call("GET", f"/api/accounts/{account['id']}", admin_token)
        assert status == 200 and account["auth_state"] == "wait_phone"

        # Another process (this test's host) holds a second account: the worker must not open it.
        foreign = int((await account_store.create_account(db, "+15550001004", None))["id"])
        await tdlib_host.sessions.open(foreign)
        started = time.monotonic()
        status, body = await api.call("POST", f"/api/accounts/{foreign}/auth/code", admin_token,
                                      json={"code": "12345"})
        assert status == 409 and body["error"]["code"] == "owned_elsewhere", body
        assert time.monotonic() - started < 2

        async def health() -> dict[str, Any] | None:
            _, body = await api.call("GET", "/api/tdlib/health", admin_token)
            return dict(body) if body.get("active_clients") else None

        body = await eventually(health, timeout=15)
        assert body["backend"] == "tdlib" and body["version"] == "1.8.69"
        assert body["clients"] == {"wait_phone": 1}, body  # the worker's one client; not the foreign one
        assert body["connection"] == {"connecting": 1}
        assert body["stalled"] is False and body["receive_loop_lag_seconds"] < 0.25
        assert set(body["errors_total"]) == {"transient", "rate_limited", "permanent"}
    finally:
        assert worker.stop() == 0
    starts = [json.loads(line) for line in worker.log().splitlines()
              if line.startswith("{") and "worker child starting" in line]
    assert starts and starts[0]["telegram_backend"] == "tdlib"
