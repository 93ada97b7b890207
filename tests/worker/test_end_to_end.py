"""A message end to end: the real API accepts it, a real worker process sends it through the emulator."""

from __future__ import annotations

from typing import Any

import asyncpg
from support import ApiClient, EmulatorHandle, WorkerProcess, eventually


async def _ready_account(api: ApiClient, token: str, phone: str = "+9996631234") -> dict[str, Any]:
    status, account = await api.call("POST", "/api/accounts", token, json={"phone": phone})
    assert status == 201, account
    assert account["auth_state"] == "wait_code"
    code = phone[6] * 5  # test-DC convention: +99966XYYYY logs in with XXXXX
    status, account = await api.call("POST", f"/api/accounts/{account['id']}/auth/code", token, json={"code": code})
    assert status == 200, account
    assert account["auth_state"] == "ready"
    return account


async def test_message_reaches_sent(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                    fresh_emulator: EmulatorHandle, db: asyncpg.Pool) -> None:
    """POST /api/messages is queued, sent by the worker through the emulator, and shows `sent` with its id."""
    account = await _ready_account(api, admin_token)
    status, message = await api.call("POST", "/api/messages", admin_token,
                                     json={"account_id": account["id"], "peer": "@alice", "text": "hello"})
    assert status == 202 and message["status"] == "queued"

    async def sent() -> Any:
        _, body = await api.call("GET", f"/api/messages/{message['id']}", admin_token)
        return body if body["status"] == "sent" else None

    body = await eventually(sent)
    assert body["telegram_message_id"] > 0
    received = [r for r in fresh_emulator.telegram.received if r.to == "@alice"]
    assert [(r.text, r.message_id) for r in received] == [("hello", body["telegram_message_id"])]


async def test_idempotency_key_sends_once(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                          fresh_emulator: EmulatorHandle) -> None:
    """The same Idempotency-Key twice returns the first message and Telegram gets one message."""
    account = await _ready_account(api, admin_token, "+9996641234")
    payload = {"account_id": account["id"], "peer": "@bob", "text": "once"}
    _, first = await api.call("POST", "/api/messages", admin_token, json=payload, headers={"Idempotency-Key": "k-1"})
    _, second = await api.call("POST", "/api/messages", admin_token, json=payload, headers={"Idempotency-Key": "k-1"})
    assert first["id"] == second["id"]

    async def sent() -> Any:
        _, body = await api.call("GET", f"/api/messages/{first['id']}", admin_token)
        return body["status"] == "sent"

    await eventually(sent)
    assert len([r for r in fresh_emulator.telegram.received if r.to == "@bob"]) == 1


async def test_wrong_code_is_refused_and_login_can_continue(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                            fresh_emulator: EmulatorHandle) -> None:
    """A wrong login code gives 422 naming `code`; the right one then logs in."""
    status, account = await api.call("POST", "/api/accounts", admin_token, json={"phone": "+9996651234"})
    assert status == 201
    status, body = await api.call("POST", f"/api/accounts/{account['id']}/auth/code", admin_token,
                                  json={"code": "12345"})
    assert status == 422 and body["error"]["details"]["field"] == "code"
    status, body = await api.call("POST", f"/api/accounts/{account['id']}/auth/code", admin_token,
                                  json={"code": "55555"})
    assert status == 200 and body["auth_state"] == "ready"


async def test_two_factor_password_step(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                        fresh_emulator: EmulatorHandle) -> None:
    """An account with a 2FA password goes code -> wait_password -> ready."""
    fresh_emulator.telegram.user_for_phone("+9996661234").password = "hunter2-pass"
    status, account = await api.call("POST", "/api/accounts", admin_token, json={"phone": "+9996661234"})
    assert status == 201
    _, body = await api.call("POST", f"/api/accounts/{account['id']}/auth/code", admin_token, json={"code": "66666"})
    assert body["auth_state"] == "wait_password"
    status, body = await api.call("POST", f"/api/accounts/{account['id']}/auth/password", admin_token,
                                  json={"password": "hunter2-pass"})
    assert status == 200 and body["auth_state"] == "ready"


async def test_detailed_health_sees_the_worker(api: ApiClient, admin_token: str, worker: WorkerProcess) -> None:
    """With a worker running, the detailed health is 200 and lists it."""

    async def healthy() -> Any:
        status, body = await api.call("GET", "/api/health/detailed", admin_token)
        return body if status == 200 else None

    body = await eventually(healthy)
    assert body["status"] == "ok" and len(body["workers"]) == 1
    assert await api.call("GET", "/api/health/detailed") == (200, {"status": "ok"})
