"""An account's whole life through the API and a real worker, on the emulator (latency 1 ms):
code, 2FA password, registration, a worker restart without a new login, logout on DELETE.
Every step's answer comes back in well under a second."""

from __future__ import annotations

import json
import time
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from support import ApiClient, EmulatorHandle, WorkerProcess, another_api, eventually

from telegram_platform import events
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.redis_keys import TDLIB_STATS_PREFIX
from telegram_platform.settings import Settings
from telegram_platform.telegram.base import LOGGED_OUT_AT_TELEGRAM
from telegram_platform.telegram.emulator.model import TelegramEmulator
from telegram_platform.telegram.keys import set_aside_copies

STEP_SECONDS = 1.0


async def _serving(redis: aioredis.Redis) -> None:
    """Wait until a worker child serves (its Telegram host publishes stats once its loops run): the
    timed steps measure the answer, not the worker's start."""

    async def published() -> bool:
        return bool([key async for key in redis.scan_iter(match=TDLIB_STATS_PREFIX + "*")])

    await eventually(published, timeout=20)


async def _timed(api: ApiClient, method: str, path: str, token: str, **kwargs: Any) -> tuple[int, Any]:
    started = time.monotonic()
    status, body = await api.call(method, path, token, **kwargs)
    elapsed = time.monotonic() - started
    assert elapsed < STEP_SECONDS, f"{method} {path} took {elapsed:.3f} s"
    return status, body


async def _state(api: ApiClient, token: str, account_id: int) -> str:
    _, body = await api.call("GET", f"/api/accounts/{account_id}", token)
    return str(body["auth_state"])


async def test_code_login_survives_a_restart_and_logs_out(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle,
        platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """+99966XYYYY reaches ready with XXXXX and its Telegram user id, is ready again after a worker
    restart with no new login, and DELETE logs it out at Telegram and removes it."""
    telegram = fresh_emulator.telegram
    await _serving(redis)
    status, account = await _timed(api, "POST", "/api/accounts", admin_token, json={"phone": "+9996612345"})
    assert status == 201, account
    assert account["auth_state"] == "wait_code"
    account_id = account["id"]
    status, body = await _timed(api, "POST", f"/api/accounts/{account_id}/auth/code", admin_token,
                                json={"code": "11111"})
    assert status == 200 and body["auth_state"] == "ready", body
    assert account["telegram_user_id"] is None
    assert body["telegram_user_id"] == telegram.user_for_phone("+9996612345").user_id
    assert telegram.counters["logins"] == 1

    assert worker.stop() == 0
    assert await _state(api, admin_token, account_id) == "closed"
    restarted = WorkerProcess.start(platform_env)
    try:
        await eventually(lambda: _is(api, admin_token, account_id, "ready"), timeout=20)
        assert telegram.counters["logins"] == 1  # resumed from its stored session
        _, resumed = await api.call("GET", f"/api/accounts/{account_id}", admin_token)
        assert resumed["telegram_user_id"] == body["telegram_user_id"]
        assert telegram.counters["code_requests"] == 1
        status, message = await api.call("POST", "/api/messages", admin_token,
                                         json={"account_id": account_id, "peer": "@after", "text": "still me"})
        assert status == 202, message
        await eventually(lambda: _message_status(api, admin_token, message["id"], "sent"))

        status, _ = await _timed(api, "DELETE", f"/api/accounts/{account_id}", admin_token)
        assert status == 204
        assert telegram.sessions == {} and telegram.counters["logouts"] == 1
        status, _ = await api.call("GET", f"/api/accounts/{account_id}", admin_token)
        assert status == 404
    finally:
        assert restarted.stop() == 0


async def test_two_factor_password(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                   fresh_emulator: EmulatorHandle, redis: aioredis.Redis) -> None:
    """With a 2FA password: code -> wait_password; a wrong password is 422 naming `password`; the right one
    -> ready. A step the account is not at is a 409 naming its state, which it keeps."""
    await _serving(redis)
    fresh_emulator.telegram.user_for_phone("+9996622345").password = "correct horse"
    _, account = await _timed(api, "POST", "/api/accounts", admin_token, json={"phone": "+9996622345"})
    path = f"/api/accounts/{account['id']}/auth"
    status, body = await _timed(api, "POST", f"{path}/password", admin_token, json={"password": "correct horse"})
    assert status == 409 and body["error"]["details"] == {"auth_state": "wait_code"}, body
    status, body = await _timed(api, "POST", f"{path}/code", admin_token, json={"code": "22222"})
    assert status == 200 and body["auth_state"] == "wait_password"
    status, body = await _timed(api, "POST", f"{path}/password", admin_token, json={"password": "wrong one"})
    assert status == 422 and body["error"]["code"] == "auth_rejected"
    assert body["error"]["details"]["field"] == "password"
    status, body = await _timed(api, "POST", f"{path}/password", admin_token, json={"password": "correct horse"})
    assert status == 200 and body["auth_state"] == "ready"
    for step, payload in (("code", {"code": "22222"}), ("register", {"first_name": "Late"}),
                          ("password", {"password": "correct horse"})):
        status, body = await _timed(api, "POST", f"{path}/{step}", admin_token, json=payload)
        assert status == 409 and body["error"]["code"] == "conflict", body
        assert body["error"]["details"] == {"auth_state": "ready"}
    assert await _state(api, admin_token, account["id"]) == "ready"


async def test_registration_of_a_new_user(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                          fresh_emulator: EmulatorHandle, redis: aioredis.Redis,
                                          redis_auth: RedisAuth) -> None:
    """A phone with no Telegram user yet: code -> wait_registration -> names -> ready, and an
    account.state event gives its new Telegram user id."""
    await _serving(redis)
    fresh_emulator.telegram.user_for_phone("+9996632345").registered = False
    _, account = await _timed(api, "POST", "/api/accounts", admin_token, json={"phone": "+9996632345"})
    path = f"/api/accounts/{account['id']}/auth"
    status, body = await _timed(api, "POST", f"{path}/code", admin_token, json={"code": "33333"})
    assert status == 200 and body["auth_state"] == "wait_registration"
    status, body = await _timed(api, "POST", f"{path}/register", admin_token,
                                json={"first_name": "Grace", "last_name": "Hopper"})
    assert status == 200 and body["auth_state"] == "ready", body
    user = fresh_emulator.telegram.user_for_phone("+9996632345")
    assert (user.registered, user.first_name, user.last_name) == (True, "Grace", "Hopper")
    assert body["telegram_user_id"] == user.user_id
    published = [json.loads(text) async for _, text in events.log_after(redis, redis_auth, "0", page_size=100)]
    assert {"account_id": account["id"], "telegram_user_id": user.user_id} in [
        event["data"] for event in published if event["type"] == "account.state"]


async def test_a_login_interrupted_by_a_restart_is_not_restarted_by_itself(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle,
        platform_env: dict[str, str], redis: aioredis.Redis) -> None:
    """An account stopped at wait_code stays there over a restart (no new code asked for), and the code
    still completes it."""
    await _serving(redis)
    _, account = await _timed(api, "POST", "/api/accounts", admin_token, json={"phone": "+9996642345"})
    assert worker.stop() == 0
    assert await _state(api, admin_token, account["id"]) == "wait_code"
    restarted = WorkerProcess.start(platform_env)
    try:
        status, body = await eventually(lambda: _code(api, admin_token, account["id"], "44444"), timeout=20)
        assert status == 200 and body["auth_state"] == "ready", body
        assert fresh_emulator.telegram.counters["code_requests"] == 1
    finally:
        assert restarted.stop() == 0


async def _is(api: ApiClient, token: str, account_id: int, state: str) -> bool:
    return await _state(api, token, account_id) == state


async def _message_status(api: ApiClient, token: str, message_id: int, status: str) -> bool:
    _, body = await api.call("GET", f"/api/messages/{message_id}", token)
    return bool(body["status"] == status)


async def _code(api: ApiClient, token: str, account_id: int, code: str) -> tuple[int, Any] | None:
    """Submit the code once the worker answers (None while it is still starting)."""
    status, body = await api.call("POST", f"/api/accounts/{account_id}/auth/code", token, json={"code": code})
    return None if status == 504 else (status, body)


async def test_a_phone_telegram_refuses_is_422_and_keeps_nothing(api: ApiClient, admin_token: str,
                                                                 worker: WorkerProcess,
                                                                 fresh_emulator: EmulatorHandle) -> None:
    """A phone Telegram refuses (not a test-DC number) gives 422 naming `phone`, and no account is left."""
    status, body = await api.call("POST", "/api/accounts", admin_token, json={"phone": "+15550001111"})
    assert status == 422, body
    assert body["error"]["details"]["errors"][0]["field"] == "phone"
    _, listed = await api.call("GET", "/api/accounts", admin_token)
    assert listed["items"] == []


async def test_proxy_credentials_are_write_only(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                               fresh_emulator: EmulatorHandle, db: asyncpg.Pool,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An account's proxy password reaches its session but no answer (any role) and no log line:
    the API shows `has_password` instead."""
    proxy = {"type": "socks5", "server": "10.9.8.7", "port": 1080, "username": "u", "password": "pr0xy-pw-7781"}
    status, account = await api.call("POST", "/api/accounts", admin_token,
                                     json={"phone": "+9996641212", "proxy": proxy})
    assert status == 201, account
    viewer = await api.user_token("proxy-viewer", "viewer", db)
    answers = [account]
    for token in (admin_token, viewer):
        answers.append((await api.call("GET", "/api/accounts", token))[1])
        answers.append((await api.call("GET", f"/api/accounts/{account['id']}", token))[1])
    assert "pr0xy-pw-7781" not in json.dumps(answers)
    assert account["proxy"]["has_password"] is True and account["proxy"]["has_secret"] is False
    assert "pr0xy-pw-7781" not in worker.log() + "".join(capsys.readouterr())


async def test_an_account_stuck_mid_login_can_still_be_deleted(api: ApiClient, admin_token: str,
                                                                worker: WorkerProcess,
                                                                fresh_emulator: EmulatorHandle) -> None:
    """DELETE of an account that never finished its login removes it (nothing to log out at Telegram)."""
    status, account = await api.call("POST", "/api/accounts", admin_token, json={"phone": "+9996641111"})
    assert status == 201 and account["auth_state"] == "wait_code"
    fresh_emulator.telegram.reset()  # Telegram forgets the pending login: the session cannot resume
    status, _ = await api.call("DELETE", f"/api/accounts/{account['id']}", admin_token)
    assert status == 204
    status, _ = await api.call("GET", f"/api/accounts/{account['id']}", admin_token)
    assert status == 404


async def test_a_session_ended_at_telegram_says_why_and_logs_in_again(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle,
        redis: aioredis.Redis) -> None:
    """When Telegram ends a ready account's session (another device terminated it), the account turns
    logged_out with that reason as its last_error; POST .../auth/login then logs the same account in
    again with a new code (409 naming the state while ready or mid-login), and ready clears the error."""
    telegram = fresh_emulator.telegram
    await _serving(redis)
    _, account = await _timed(api, "POST", "/api/accounts", admin_token, json={"phone": "+9996652345"})
    path = f"/api/accounts/{account['id']}/auth"
    status, body = await _timed(api, "POST", f"{path}/login", admin_token)
    assert status == 409 and body["error"]["details"] == {"auth_state": "wait_code"}, body
    status, ready = await _timed(api, "POST", f"{path}/code", admin_token, json={"code": "55555"})
    assert status == 200 and ready["auth_state"] == "ready" and ready["last_error"] is None, ready
    status, body = await _timed(api, "POST", f"{path}/login", admin_token)
    assert status == 409 and body["error"]["details"] == {"auth_state": "ready"}, body

    await eventually(lambda: _connected(telegram, "+9996652345"))
    telegram.sessions.clear()  # the session is gone at Telegram: the reconnecting stream is refused
    telegram.drop_connections()
    await eventually(lambda: _is(api, admin_token, account["id"], "logged_out"), timeout=10)
    _, body = await api.call("GET", f"/api/accounts/{account['id']}", admin_token)
    assert body["last_error"] == LOGGED_OUT_AT_TELEGRAM

    status, body = await _timed(api, "POST", f"{path}/login", admin_token)
    assert status == 200 and body["auth_state"] == "wait_code" and body["id"] == account["id"], body
    assert telegram.counters["code_requests"] == 2
    status, body = await _timed(api, "POST", f"{path}/code", admin_token, json={"code": "55555"})
    assert status == 200 and body["auth_state"] == "ready" and body["last_error"] is None, body
    assert body["telegram_user_id"] == ready["telegram_user_id"]
    assert telegram.counters["logins"] == 2


async def _connected(telegram: TelegramEmulator, phone: str) -> bool:
    return bool(telegram.connected(phone))


async def test_a_database_the_key_no_longer_opens_is_set_aside_on_request(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle,
        platform_env: dict[str, str], redis: aioredis.Redis) -> None:
    """After ENCRYPTION_KEY changes, a ready account's database does not open: the account is failed,
    login again is a 409 wrong_database_key that moves nothing, and with set_aside_database=true the old
    database is kept aside and a new login reaches ready; a live session is never set aside, and
    DELETE removes the copies."""
    telegram = fresh_emulator.telegram
    await _serving(redis)
    _, account = await _timed(api, "POST", "/api/accounts", admin_token, json={"phone": "+9996672345"})
    path = f"/api/accounts/{account['id']}/auth"
    status, ready = await _timed(api, "POST", f"{path}/code", admin_token, json={"code": "77777"})
    assert status == 200 and ready["auth_state"] == "ready", ready
    database = Settings.from_env(platform_env, app_mode="worker").tdlib.data_dir / "emulator" / str(account["id"])

    assert worker.stop() == 0
    stored = (database / "session.bin").read_bytes()  # rewritten while the session ran (its update number)
    new_key = "6" * 64
    restarted = WorkerProcess.start({**platform_env, "ENCRYPTION_KEY": new_key})
    try:
        # Every process takes the new key: what crosses Redis is sealed with keys derived from it.
        async with another_api(platform_env, ENCRYPTION_KEY=new_key) as server, TestClient(server) as client:
            rekeyed = ApiClient(client, server.app)
            await eventually(lambda: _is(rekeyed, admin_token, account["id"], "failed"), timeout=20)
            _, failed = await rekeyed.call("GET", f"/api/accounts/{account['id']}", admin_token)
            assert failed["last_error"] == "wrong database encryption key", failed

            status, body = await _timed(rekeyed, "POST", f"{path}/login", admin_token)
            assert status == 409 and body["error"]["code"] == "wrong_database_key", body
            assert body["error"]["details"] == {"auth_state": "failed"}
            assert "set_aside_database=true" in body["error"]["message"]
            assert (database / "session.bin").read_bytes() == stored and not set_aside_copies(database)
            assert telegram.counters["code_requests"] == 1

            status, body = await _timed(rekeyed, "POST", f"{path}/login?set_aside_database=maybe", admin_token)
            assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "set_aside_database", body

            status, body = await _timed(rekeyed, "POST", f"{path}/login?set_aside_database=true", admin_token)
            assert status == 200 and body["auth_state"] == "wait_code" and body["id"] == account["id"], body
            [kept] = set_aside_copies(database)
            assert (kept / "session.bin").read_bytes() == stored  # kept whole, for the right key to open
            assert telegram.counters["code_requests"] == 2
            status, body = await _timed(rekeyed, "POST", f"{path}/code", admin_token, json={"code": "77777"})
            assert status == 200 and body["auth_state"] == "ready" and body["last_error"] is None, body
            assert body["telegram_user_id"] == ready["telegram_user_id"]

            status, body = await _timed(rekeyed, "POST", f"{path}/login?set_aside_database=true", admin_token)
            assert status == 409 and body["error"]["details"] == {"auth_state": "ready"}, body
            assert set_aside_copies(database) == [kept] and (database / "session.bin").exists()

            status, _ = await _timed(rekeyed, "DELETE", f"/api/accounts/{account['id']}", admin_token)
            assert status == 204
            assert not database.exists() and not set_aside_copies(database)
    finally:
        assert restarted.stop() == 0
