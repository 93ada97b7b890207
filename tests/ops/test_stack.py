"""The whole platform under a real supervisord: API group, worker, a message to `sent`, a clean stop."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from support import EmulatorHandle, eventually, wait_until_healthy

REPO = Path(__file__).resolve().parents[2]


def _marked_processes(marker: str) -> list[int]:
    """Pids whose environment carries this test's marker: everything the stack started."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"TP_TEST_MARKER={marker}".encode() in f.read().split(b"\0"):
                    with open(f"/proc/{entry}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] != "Z":
                            found.append(int(entry))
        except OSError:
            continue
    return found


async def stop_leaving_nothing(supervisord: asyncio.subprocess.Process, marker: str, *, stop_timeout: float,
                               reap_timeout: float) -> int:
    """SIGTERM supervisord and wait for it; then wait until no process of the stack is left.
    Returns supervisord's exit status."""
    supervisord.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(supervisord.wait(), stop_timeout)

    async def nothing_left() -> Any:
        return _marked_processes(marker) == []

    await eventually(nothing_left, timeout=reap_timeout)
    return code


async def kill_leftovers(supervisord: asyncio.subprocess.Process, marker: str) -> None:
    """Whatever a failed test left running: supervisord and every process carrying the marker."""
    if supervisord.returncode is None:
        supervisord.kill()
        await supervisord.wait()
    for pid in _marked_processes(marker):
        os.kill(pid, signal.SIGKILL)


async def test_stack_serves_sends_and_stops_cleanly(platform_env: dict[str, str], db: asyncpg.Pool,
                                                   fresh_emulator: EmulatorHandle, tmp_path: Path) -> None:
    """supervisord runs 2 API members and the worker; a message reaches `sent`; SIGTERM leaves nothing."""
    root = tmp_path / "deploy"
    root.mkdir()
    shutil.copy(REPO / "supervisord.conf", root / "supervisord.conf")
    for sub in ("var/log", "var/run", "var/supervisor.d"):
        (root / sub).mkdir(parents=True)
    marker = uuid.uuid4().hex
    bin_dir = str(Path(sys.executable).parent)
    env = {**platform_env, "TP_HOST": "127.0.0.1", "TP_API_PROCESSES": "2", "TP_TEST_MARKER": marker,
           "TP_VAR_DIR": str(root / "var"), "PATH": f"{bin_dir}:{platform_env['PATH']}"}
    conf = str(root / "supervisord.conf")
    supervisord = await asyncio.create_subprocess_exec(
        f"{bin_dir}/supervisord", "-n", "-c", conf, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    base = f"http://127.0.0.1:{env['PORT']}"
    try:
        async with aiohttp.ClientSession(base) as http:
            await wait_until_healthy(http, timeout=60, interval=0.2)

            async def all_running() -> Any:
                result = await asyncio.to_thread(
                    subprocess.run, [f"{bin_dir}/supervisorctl", "-c", conf, "status"], env=env,
                    capture_output=True, text=True)
                lines = [line.split() for line in result.stdout.splitlines() if line.strip()]
                states = {parts[0]: parts[1] for parts in lines}
                wanted = {"tp-api:tp-api-00", "tp-api:tp-api-01", "tp-worker"}
                return wanted <= set(states) and all(states[n] == "RUNNING" for n in wanted)

            await eventually(all_running, timeout=30, interval=0.5)

            create = await asyncio.create_subprocess_exec(
                f"{bin_dir}/tp", "create-user", "--username", "ops", "--role", "operator", "--password-stdin",
                env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
            await create.communicate(b"stack-password-1\n")
            assert create.returncode == 0
            async with http.post("/api/auth/login", json={"username": "ops", "password": "stack-password-1"}) as r:
                assert r.status == 200
                headers = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
            async with http.post("/api/accounts", json={"phone": "+9996691234"}, headers=headers) as r:
                assert r.status == 201, await r.text()
                account = await r.json()
            async with http.post(f"/api/accounts/{account['id']}/auth/code", json={"code": "99999"},
                                 headers=headers) as r:
                assert (await r.json())["auth_state"] == "ready"
            async with http.post("/api/messages", json={"account_id": account["id"], "peer": "@stack",
                                                        "text": "through supervisord"}, headers=headers) as r:
                assert r.status == 202
                message = await r.json()

            async def sent() -> Any:
                async with http.get(f"/api/messages/{message['id']}", headers=headers) as r:
                    return (await r.json())["status"] == "sent"

            await eventually(sent, timeout=20)

        assert len(_marked_processes(marker)) >= 4  # supervisord, 2 API members, pool (+ child)
        assert await stop_leaving_nothing(supervisord, marker, stop_timeout=60, reap_timeout=10) == 0
    finally:
        await kill_leftovers(supervisord, marker)
