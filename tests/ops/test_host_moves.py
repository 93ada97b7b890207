"""Moving an account to another host and draining a host: two worker processes with their own
TP_HOST_ID and var/ stand for two hosts on one PostgreSQL and Redis (as in test_hosts.py). An
account moves with its TDLib state snapshot, so it is READY on the target without a new login."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import asyncpg
import pytest
from ops.test_hosts import GONE_AFTER, _host_env
from support import ApiClient, EmulatorHandle, WorkerProcess, eventually
from worker.test_end_to_end import _ready_account


@pytest.fixture
def platform_env(platform_env: dict[str, str]) -> dict[str, str]:
    """The programs' environment, judging a host gone after 10 s of silence (the floor)."""
    return {**platform_env, "TP_HOST_GONE_SECONDS": GONE_AFTER}


def _tp(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from telegram_platform.cli.tp import main; main()", *args],
                          env=env, capture_output=True, text=True, timeout=90, check=False)


async def _hosts(api: ApiClient, token: str) -> dict[str, dict[str, Any]]:
    status, body = await api.call("GET", "/api/hosts", token)
    assert status == 200, body
    return {h["id"]: h for h in body["items"]}


async def _placed(api: ApiClient, token: str, db: asyncpg.Pool, want: dict[str, int]) -> Any:
    """The hosts once each owns and holds open the accounts `want` says, all READY."""
    hosts = await _hosts(api, token)
    ready = await db.fetchval("SELECT count(*) FROM accounts WHERE auth_state = 'ready'")
    placed = all(hosts.get(h, {}).get("accounts_owned") == n and hosts[h]["telegram_clients"] == n
                 for h, n in want.items())
    return hosts if placed and ready == sum(want.values()) else None


async def test_an_account_moves_to_the_target_host_ready_without_a_new_login(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool,
        fresh_emulator: EmulatorHandle) -> None:
    """POST /api/accounts/{id}/move lands the account on host-b READY, its client there and none on
    host-a, with no new login or code at Telegram; `tp accounts move` brings it back the same way.
    Unknown accounts and hosts are 404, a host that is not up 409, a viewer 403."""
    telegram = fresh_emulator.telegram
    host_a = WorkerProcess.start(_host_env(platform_env, "host-a"))
    host_b: WorkerProcess | None = None
    try:
        account = await _ready_account(api, admin_token, "+9996641001")  # only host-a runs: it logs in
        host_b = WorkerProcess.start(_host_env(platform_env, "host-b"))
        await eventually(lambda: _placed(api, admin_token, db, {"host-a": 1, "host-b": 0}), timeout=30,
                         interval=0.2)
        await eventually(lambda: _b_up(api, admin_token), timeout=30, interval=0.2)
        logins, codes = telegram.counters["logins"], telegram.counters["code_requests"]

        status, moved = await api.call("POST", f"/api/accounts/{account['id']}/move", admin_token,
                                       json={"to": "host-b"})
        assert status == 200, moved
        assert moved == {"account_id": account["id"], "owner_host": "host-b", "auth_state": "ready",
                         "connection_state": moved["connection_state"]}
        await eventually(lambda: _placed(api, admin_token, db, {"host-a": 0, "host-b": 1}), timeout=30,
                         interval=0.2)
        assert (telegram.counters["logins"], telegram.counters["code_requests"]) == (logins, codes)

        result = _tp(platform_env, "accounts", "move", str(account["id"]), "--to", "host-a")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"account {account['id']} is on host-a (ready)"
        await eventually(lambda: _placed(api, admin_token, db, {"host-a": 1, "host-b": 0}), timeout=30,
                         interval=0.2)
        assert (telegram.counters["logins"], telegram.counters["code_requests"]) == (logins, codes)

        status, body = await api.call("POST", "/api/accounts/999999/move", admin_token, json={"to": "host-b"})
        assert status == 404, body
        status, body = await api.call("POST", f"/api/accounts/{account['id']}/move", admin_token,
                                      json={"to": "host-z"})
        assert (status, body["error"]["code"]) == (404, "not_found"), body
        await db.execute("INSERT INTO hosts (id, last_seen) VALUES ('host-c', now() - interval '1 hour')")
        status, body = await api.call("POST", f"/api/accounts/{account['id']}/move", admin_token,
                                      json={"to": "host-c"})
        assert (status, body["error"]["details"]) == (409, {"field": "to", "state": "gone"}), body
        viewer = await api.user_token("watcher", "viewer", db)
        status, _ = await api.call("POST", f"/api/accounts/{account['id']}/move", viewer, json={"to": "host-b"})
        assert status == 403
        assert await db.fetchval("SELECT owner_host FROM accounts WHERE id = $1", account["id"]) == "host-a"
    finally:
        host_a.stop()
        if host_b is not None:
            host_b.stop()


async def _b_up(api: ApiClient, token: str) -> bool:
    hosts = await _hosts(api, token)
    return bool(hosts.get("host-b", {}).get("state") == "up" and hosts["host-b"]["workers"])


async def test_a_drained_host_hands_every_account_to_the_up_host_and_takes_none_back(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool,
        fresh_emulator: EmulatorHandle) -> None:
    """`tp drain host-a` empties host-a: host-b owns and holds both accounts READY without a new
    login, host-a stays draining and does not take them back (its orphan scan skips them); POST
    /api/hosts/{id}/drain is idempotent and DELETE makes the host up again."""
    telegram = fresh_emulator.telegram
    host_a = WorkerProcess.start(_host_env(platform_env, "host-a"))
    host_b: WorkerProcess | None = None
    try:
        first = await _ready_account(api, admin_token, "+9996641002")
        second = await _ready_account(api, admin_token, "+9996641003")
        host_b = WorkerProcess.start(_host_env(platform_env, "host-b"))
        await eventually(lambda: _b_up(api, admin_token), timeout=30, interval=0.2)
        await eventually(lambda: _placed(api, admin_token, db, {"host-a": 2, "host-b": 0}), timeout=30,
                         interval=0.2)
        logins, codes = telegram.counters["logins"], telegram.counters["code_requests"]

        result = _tp(platform_env, "drain", "host-a")
        assert result.returncode == 0, result.stderr
        hosts = await eventually(lambda: _placed(api, admin_token, db, {"host-a": 0, "host-b": 2}), timeout=45,
                                 interval=0.3)
        assert hosts["host-a"]["state"] == "draining" and hosts["host-a"]["draining_since"] is not None
        assert (telegram.counters["logins"], telegram.counters["code_requests"]) == (logins, codes)
        owners = dict(await db.fetch("SELECT id, owner_host FROM accounts"))
        assert owners == {first["id"]: "host-b", second["id"]: "host-b"}

        status, host = await api.call("POST", "/api/hosts/host-a/drain", admin_token)
        assert (status, host["state"], host["draining_since"]) == (200, "draining",
                                                                   hosts["host-a"]["draining_since"])
        assert (await api.call("POST", "/api/hosts/host-z/drain", admin_token))[0] == 404
        status, host = await api.call("DELETE", "/api/hosts/host-a/drain", admin_token)
        assert (status, host["state"], host["draining_since"]) == (200, "up", None)
        assert (await _hosts(api, admin_token))["host-b"]["accounts_owned"] == 2
    finally:
        host_a.stop()
        if host_b is not None:
            host_b.stop()
