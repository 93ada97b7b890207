"""The newcomer's path: no URLs, no secrets given; embedded PostgreSQL, Redis and emulator under supervisord."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from conftest import free_port
from ops.test_stack import REPO, kill_leftovers, stop_leaving_nothing
from support import eventually, wait_until_healthy


def _prepare(root: Path, env: dict[str, str]) -> dict[str, str]:
    result = subprocess.run([sys.executable, "-m", "telegram_platform.devstack", "prepare", "--root", str(root)],
                            env=env, capture_output=True, text=True, timeout=120, check=True)
    exports = dict(env)
    for line in result.stdout.splitlines():
        assert line.startswith("export "), line
        key, _, value = line[len("export "):].partition("=")
        exports[key] = shlex.split(value)[0] if value else ""
    return exports


async def _run_once(root: Path, env: dict[str, str], marker: str, first: bool) -> None:
    bin_dir = str(Path(sys.executable).parent)
    supervisord = await asyncio.create_subprocess_exec(
        f"{bin_dir}/supervisord", "-n", "-c", str(root / "supervisord.conf"), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{env['PORT']}") as http:
            await wait_until_healthy(http, timeout=90, interval=0.3)
            if first:
                create = await asyncio.create_subprocess_exec(
                    f"{bin_dir}/tp", "create-user", "--username", "newcomer", "--password-stdin", env=env,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
                await create.communicate(b"newcomer-password\n")
                assert create.returncode == 0
            # On the second start the user must still be there: the data lives under var/.
            async with http.post("/api/auth/login",
                                 json={"username": "newcomer", "password": "newcomer-password"}) as r:
                assert r.status == 200, await r.text()
                headers = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
            if first:
                async with http.post("/api/accounts", json={"phone": "+9996611234"}, headers=headers) as r:
                    assert r.status == 201, await r.text()
                async with http.post("/api/accounts/1/auth/code", json={"code": "11111"}, headers=headers) as r:
                    assert (await r.json())["auth_state"] == "ready"
            async with http.post("/api/messages", json={"account_id": 1, "peer": "@new", "text": "hi"},
                                 headers=headers) as r:
                assert r.status == 202, await r.text()
                message = await r.json()

            async def sent() -> Any:
                async with http.get(f"/api/messages/{message['id']}", headers=headers) as r:
                    return (await r.json())["status"] == "sent"

            await eventually(sent, timeout=30)
        if first:
            # What the run command made (var/, the TDLib data directory, the metrics directory)
            # passes the platform's own check as made.
            check = await asyncio.create_subprocess_exec(
                f"{bin_dir}/tp", "check", "--conf", str(root / "supervisord.conf"), env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            output = (await check.communicate())[0].decode()
            assert check.returncode == 0, output
        assert await stop_leaving_nothing(supervisord, marker, stop_timeout=90, reap_timeout=15) == 0
    finally:
        await kill_leftovers(supervisord, marker)


async def test_embedded_stack_runs_and_keeps_its_data(tmp_path: Path) -> None:
    """With no DATABASE_URL/REDIS_URL/secrets, the stack comes up, sends, passes `tp check` as made, stops, and
    restarts with its data."""
    root = tmp_path / "clone"
    root.mkdir()
    os.chmod(tmp_path, 0o755)
    shutil.copy(REPO / "supervisord.conf", root / "supervisord.conf")
    marker = uuid.uuid4().hex
    bin_dir = str(Path(sys.executable).parent)
    base = {key: value for key, value in os.environ.items()
            if key not in ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "ENCRYPTION_KEY", "TDLIB_API_ID",
                           "TDLIB_API_HASH", "TP_PROFILE")}
    base.update({"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "PORT": str(free_port()),
                 "TP_HOST": "127.0.0.1", "TP_API_PROCESSES": "1", "TP_TEST_MARKER": marker,
                 "TP_EMULATOR_URL": f"http://127.0.0.1:{free_port()}", "TP_VAR_DIR": str(root / "var"),
                 "TP_LOG_FORMAT": "json"})
    env = _prepare(root, base)
    assert "DATABASE_URL" in env and "REDIS_URL" in env and len(env["ENCRYPTION_KEY"]) == 64
    secrets = root / "var" / "secrets.env"
    assert secrets.stat().st_mode & 0o777 == 0o600
    await _run_once(root, env, marker, first=True)
    again = _prepare(root, base)
    assert again["ENCRYPTION_KEY"] == env["ENCRYPTION_KEY"]  # generated once, reused
    await _run_once(root, again, marker, first=False)
