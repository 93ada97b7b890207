"""Hosts: two worker processes with their own TP_HOST_ID stand for two hosts on one PostgreSQL and
Redis; `GET /api/hosts` and `tp hosts` list both, and the one killed turns gone while the other
takes its accounts over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support import ApiClient, EmulatorHandle, WorkerProcess, eventually
from worker.test_end_to_end import _ready_account

GONE_AFTER = "10"


@pytest.fixture
def platform_env(platform_env: dict[str, str]) -> dict[str, str]:
    """The programs' environment, judging a host gone after 10 s of silence (the floor)."""
    return {**platform_env, "TP_HOST_GONE_SECONDS": GONE_AFTER}


def _host_env(env: dict[str, str], host_id: str) -> dict[str, str]:
    """A host of its own: its id and its own var/ (its TDLib databases, spool, logs)."""
    return {**env, "TP_HOST_ID": host_id, "TP_VAR_DIR": str(Path(env["TP_VAR_DIR"]) / host_id)}


def _tp_hosts(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", "from telegram_platform.cli.tp import main; main()", "hosts",
                             *args], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_two_hosts_listed_and_the_one_killed_turns_gone_with_its_accounts_taken_over(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], db: asyncpg.Pool,
        fresh_emulator: EmulatorHandle) -> None:
    """host-a and host-b each announce themselves; an account logged in on host-a is counted as
    its own, with its client and memory; after host-a's workers are killed (-9) it turns gone, its
    live figures vanish, and host-b owns and hosts both accounts; `tp hosts` says the same."""
    viewer = await api.user_token("viewer", "viewer", db)
    host_a = WorkerProcess.start(_host_env(platform_env, "host-a"))
    host_b: WorkerProcess | None = None
    try:
        first = await _ready_account(api, admin_token, "+9996611001")  # only host-a runs: it logs in
        host_b = WorkerProcess.start(_host_env(platform_env, "host-b"))
        second = await _ready_account(api, admin_token, "+9996621002")

        async def both_up() -> Any:
            status, body = await api.call("GET", "/api/hosts", viewer)
            assert status == 200, body
            hosts = {h["id"]: h for h in body["items"]}
            ready = set(hosts) == {"host-a", "host-b"} and all(
                h["state"] == "up" and h["workers"] and h["memory_bytes"] for h in hosts.values())
            return hosts if ready and sum(h["telegram_clients"] for h in hosts.values()) == 2 else None

        hosts = await eventually(both_up, timeout=30, interval=0.2)
        assert hosts["host-a"]["accounts_owned"] >= 1
        assert sum(h["accounts_owned"] for h in hosts.values()) == 2
        assert all(w.startswith("host-a/") for w in hosts["host-a"]["workers"])
        assert all(w.startswith("host-b/") for w in hosts["host-b"]["workers"])
        assert hosts["host-a"]["memory_bytes"] > 10 << 20 and hosts["host-a"]["heartbeat_age_seconds"] < 10
        owners = dict(await db.fetch("SELECT id, owner_host FROM accounts"))
        assert owners[first["id"]] == "host-a" and owners[second["id"]] in ("host-a", "host-b")

        os.killpg(host_a.process.pid, signal.SIGKILL)  # the whole host: pool and children
        host_a.process.wait()

        async def failed_over() -> Any:
            _, body = await api.call("GET", "/api/hosts", viewer)
            hosts = {h["id"]: h for h in body["items"]}
            a, b = hosts["host-a"], hosts["host-b"]
            done = (a["state"] == "gone" and a["accounts_owned"] == 0 and b["state"] == "up"
                    and b["accounts_owned"] == 2 and b["telegram_clients"] == 2)
            return hosts if done else None

        hosts = await eventually(failed_over, timeout=60, interval=0.5)
        gone = hosts["host-a"]
        assert (gone["telegram_clients"], gone["memory_bytes"], gone["workers"]) == (0, None, [])
        assert gone["heartbeat_age_seconds"] >= float(GONE_AFTER)
        assert await db.fetchval("SELECT count(*) FROM accounts WHERE owner_host = 'host-b'") == 2

        listed = json.loads(_tp_hosts(platform_env, "--json"))
        assert {h["id"]: (h["state"], h["accounts_owned"]) for h in listed["items"]} == {
            "host-a": ("gone", 0), "host-b": ("up", 2)}
        assert listed["gone_after_seconds"] == float(GONE_AFTER)
        table = _tp_hosts(platform_env).splitlines()
        assert table[0].split()[:4] == ["HOST", "STATE", "ACCOUNTS", "CLIENTS"]
        assert table[1].split()[:4] == ["host-a", "gone", "0", "0"]
        assert table[2].split()[:4] == ["host-b", "up", "2", "2"]
    finally:
        host_a.stop()
        if host_b is not None:
            host_b.stop()


async def test_hosts_are_listed_for_every_role_and_not_without_a_token(api: ApiClient, db: asyncpg.Pool) -> None:
    """GET /api/hosts needs a token, any role's; with no host ever started the list is empty."""
    assert (await api.call("GET", "/api/hosts"))[0] == 401
    viewer = await api.user_token("watcher", "viewer", db)
    assert await api.call("GET", "/api/hosts", viewer) == (200, {"items": [], "gone_after_seconds": 10.0})
