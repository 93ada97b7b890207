"""The platform obeys Telegram's limits: a real API and worker against an emulator that limits them.

The emulator keeps every send attempt with its time, so "no send before retry after" is checked where
it matters: at Telegram.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from support import ApiClient, EmulatorHandle, WorkerProcess, eventually

from telegram_platform.telegram.emulator.model import config_with


async def _ready_account(api: ApiClient, token: str, phone: str) -> int:
    status, account = await api.call("POST", "/api/accounts", token, json={"phone": phone})
    assert status == 201, account
    status, account = await api.call("POST", f"/api/accounts/{account['id']}/auth/code", token,
                                     json={"code": phone[6] * 5})
    assert status == 200 and account["auth_state"] == "ready", account
    return int(account["id"])


async def _send(api: ApiClient, token: str, account_id: int, peer: str, text: str) -> int:
    status, message = await api.call("POST", "/api/messages", token,
                                     json={"account_id": account_id, "peer": peer, "text": text})
    assert status == 202, message
    return int(message["id"])


async def _message(api: ApiClient, token: str, message_id: int) -> dict[str, Any]:
    _, body = await api.call("GET", f"/api/messages/{message_id}", token)
    return dict(body)


async def test_no_send_is_attempted_before_retry_after(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                       fresh_emulator: EmulatorHandle) -> None:
    """With the account limited to one send per 6 s, three messages all arrive once, every 429's
    "retry after N" is waited out (checked on the emulator's attempt times), and the pause shows in the
    account (paused_until, with Telegram's words as last_error) and in /api/tdlib/health."""
    telegram = fresh_emulator.telegram
    phone = "+9996671111"
    account_id = await _ready_account(api, admin_token, phone)
    telegram.config = config_with(telegram.config, {"account_rate": 1 / 6, "account_burst": 1})
    ids = [await _send(api, admin_token, account_id, f"@peer{i}", f"hello {i}") for i in range(3)]

    seen_paused_account = False
    seen_health: dict[str, Any] = {}

    async def all_sent() -> bool:
        nonlocal seen_paused_account, seen_health
        _, account = await api.call("GET", f"/api/accounts/{account_id}", admin_token)
        if account["paused_until"] is not None:
            assert account["last_error"] and "retry after" in account["last_error"], account
            seen_paused_account = True
        _, health = await api.call("GET", "/api/tdlib/health", admin_token)
        if health.get("accounts_paused"):
            seen_health = health
        statuses = [(await _message(api, admin_token, i))["status"] for i in ids]
        assert "failed" not in statuses, statuses
        return statuses == ["sent"] * 3

    started = time.monotonic()
    try:
        await eventually(all_sent, timeout=30, interval=0.2)
    except AssertionError as exc:
        messages = [await _message(api, admin_token, i) for i in ids]
        raise AssertionError(f"{exc}; messages: {messages}; attempts: {telegram.attempts}") from None
    user_id = telegram.user_for_phone(phone).user_id
    attempts = telegram.attempts_by(user_id)
    refused = [a for a in attempts if a.outcome == "rate_limited"]
    assert refused, "the emulator never limited the account"
    assert all(a.retry_after is not None and a.retry_after >= 1 for a in refused)
    assert telegram.early_attempts(user_id) == []
    assert telegram.deliveries() == {"@peer0": 1, "@peer1": 1, "@peer2": 1}
    accepted = sorted(a.at for a in attempts if a.outcome == "accepted")
    assert all(later - earlier >= 5.9 for earlier, later in itertools.pairwise(accepted))
    assert time.monotonic() - started < 40
    assert seen_paused_account
    assert seen_health, "/api/tdlib/health never showed the paused account"
    assert any(p["account_id"] == account_id for p in seen_health["paused_accounts"])
    assert seen_health["errors_total"]["rate_limited"] >= 1


async def test_peer_flood_stops_cold_sends_only(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                fresh_emulator: EmulatorHandle) -> None:
    """After PEER_FLOOD the account sends nothing to new peers (not even an attempt) while a peer it
    already wrote to still gets messages; the account records peer_flood_until and PEER_FLOOD as its
    last error."""
    telegram = fresh_emulator.telegram
    phone = "+9996672222"
    account_id = await _ready_account(api, admin_token, phone)
    telegram.config = config_with(telegram.config, {"peer_flood_after": 1})

    async def final(message_id: int) -> dict[str, Any] | None:
        body = await _message(api, admin_token, message_id)
        return body if body["status"] in ("sent", "failed") else None

    async def send_and_wait(peer: str, text: str) -> dict[str, Any]:
        message_id = await _send(api, admin_token, account_id, peer, text)
        return dict(await eventually(lambda: final(message_id), timeout=20))

    first = await send_and_wait("@known", "1")
    assert first["status"] == "sent"
    flooded = await send_and_wait("@new1", "1")
    assert flooded["status"] == "failed" and "PEER_FLOOD" in flooded["error"]
    _, account = await api.call("GET", f"/api/accounts/{account_id}", admin_token)
    assert account["peer_flood_until"] is not None and account["last_error"] == "PEER_FLOOD"

    cold = await send_and_wait("@new2", "1")
    assert cold["status"] == "failed" and "PEER_FLOOD" in cold["error"]
    warm = await send_and_wait("@known", "2")
    assert warm["status"] == "sent"

    user_id = telegram.user_for_phone(phone).user_id
    assert [(a.to, a.outcome) for a in telegram.attempts_by(user_id)] == [
        ("@known", "accepted"), ("@new1", "peer_flood"), ("@known", "accepted")]

    async def health_shows_it() -> bool:
        _, health = await api.call("GET", "/api/tdlib/health", admin_token)
        return account_id in health.get("peer_flood_accounts", [])

    await eventually(health_shows_it, timeout=10)
