from __future__ import annotations

import json
import os
import re
import shlex
import socket
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis

from telegram_platform.devstack.cli import main
from telegram_platform.devstack.dev_secrets import ensure_dev_secrets
from telegram_platform.devstack.errors import DevStackError, ProductionRefusal
from telegram_platform.devstack.plan import _choose_port, plan_dev_stack
from telegram_platform.devstack.servers import ThrowawayPostgres, ThrowawayRedis, free_port, port_is_free, redis_argv
from telegram_platform.ops.dev_artifacts import STATE_FILE
from telegram_platform.settings import EXIT_CONFIG


def _real_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_dev_secrets_generated_once_private_and_stable(tmp_path: Path) -> None:
    """Secrets are generated once into a 0600 file in a 0700 dir and read back unchanged."""
    var_dir = tmp_path / "var"
    first = ensure_dev_secrets(var_dir)
    path = var_dir / "secrets.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(var_dir.stat().st_mode) == 0o700
    assert re.fullmatch(r"[A-Za-z0-9_-]{48}", first["JWT_SECRET"])
    assert re.fullmatch(r"[0-9a-f]{64}", first["ENCRYPTION_KEY"])
    content = path.read_text()
    assert ensure_dev_secrets(var_dir) == first
    assert path.read_text() == content
    assert ensure_dev_secrets(tmp_path / "other") != first


def test_damaged_secrets_file_is_reported_not_overwritten(tmp_path: Path) -> None:
    """A secrets file without a valid key raises a one-line error and is left untouched."""
    tmp_path.chmod(0o700)
    (tmp_path / "secrets.env").write_text("JWT_SECRET=short\n")
    with pytest.raises(DevStackError) as info:
        ensure_dev_secrets(tmp_path)
    assert "\n" not in str(info.value)
    assert (tmp_path / "secrets.env").read_text() == "JWT_SECRET=short\n"


async def test_throwaway_postgres_serves_asyncpg_as_non_root(tmp_path: Path) -> None:
    """A throwaway PostgreSQL accepts an asyncpg connection; its postmaster is not root; stop leaves none."""
    with ThrowawayPostgres(tmp_path / "pg") as server:
        conn = await asyncpg.connect(server.url)
        try:
            assert await conn.fetchval("SELECT 1 + 1") == 2
            assert await conn.fetchval("SHOW fsync") == "off"
        finally:
            await conn.close()
        uid = _real_uid(server.pid)
        assert uid != 0
        if os.geteuid() != 0:
            assert uid == os.geteuid()
        pid = server.pid
    assert not _alive(pid)


def test_throwaway_redis_pings_and_leaves_no_process(tmp_path: Path) -> None:
    """A throwaway Redis answers PING, refuses eviction, and no process remains after stop()."""
    server = ThrowawayRedis(tmp_path / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.ping() is True
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("save") == {"save": ""}
        client.close()
        pid = server.pid
    finally:
        server.stop()
    assert not _alive(pid)
    assert not server.running


def test_redis_argv_dev_instance_keeps_an_append_only_file(tmp_path: Path) -> None:
    """The embedded dev Redis uses appendonly and noeviction; a throwaway one saves nothing."""
    dev = redis_argv(tmp_path, 6390, binary=Path("/usr/bin/redis-server"))
    assert dev[dev.index("--appendonly") + 1] == "yes"
    assert dev[dev.index("--maxmemory-policy") + 1] == "noeviction"
    test = redis_argv(tmp_path, 6390, throwaway=True, binary=Path("/usr/bin/redis-server"))
    assert test[test.index("--save") + 1] == ""
    assert test[test.index("--appendonly") + 1] == "no"


def test_production_profile_refuses_embedded_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """TP_PROFILE=production without DATABASE_URL/REDIS_URL/secrets is refused: one line, exit 78 (EX_CONFIG)."""
    with pytest.raises(ProductionRefusal) as info:
        plan_dev_stack(tmp_path, {"TP_PROFILE": "production", "DATABASE_URL": "postgresql://x/y"})
    message = str(info.value)
    assert "\n" not in message
    assert "REDIS_URL" in message and "JWT_SECRET" in message and "DATABASE_URL" not in message
    monkeypatch.setenv("TP_PROFILE", "production")
    for name in ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "ENCRYPTION_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert main(["prepare", "--root", str(tmp_path)]) == EXIT_CONFIG
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "var").exists()


def test_a_port_left_in_time_wait_still_counts_as_free() -> None:
    """A stopped server's port, its connections in TIME_WAIT, is free to a server that binds as
    PostgreSQL and Redis do (SO_REUSEADDR): a restart keeps the port it recorded."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server closes first: its end of the connection stays in TIME_WAIT
        client.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the check used to do, and why it moved ports
    assert port_is_free(port)


def test_an_embedded_server_is_never_given_the_platforms_own_ports(tmp_path: Path) -> None:
    """A port the API (PORT) or the emulator will listen on is free while they have not started,
    yet is never handed to an embedded server: not as the recorded port, nor as the default."""
    api_port, emulator_port = free_port(), free_port()
    var = tmp_path / "var"
    var.mkdir(mode=0o700)
    (var / STATE_FILE).write_text(json.dumps({"redis_port": api_port}))
    plan = plan_dev_stack(tmp_path, {
        "DATABASE_URL": "postgresql://db.invalid/x", "JWT_SECRET": "j" * 40, "ENCRYPTION_KEY": "e" * 64,
        "PORT": str(api_port), "TP_EMULATOR_URL": f"http://127.0.0.1:{emulator_port}"})
    redis_port = urlsplit(plan.exports["REDIS_URL"]).port
    assert redis_port not in (api_port, emulator_port, None), plan.exports
    assert json.loads((var / STATE_FILE).read_text())["redis_port"] == redis_port
    state: dict[str, int] = {"postgres_port": api_port}
    chosen = _choose_port(state, "postgres_port", emulator_port, {api_port, emulator_port})
    assert chosen not in (api_port, emulator_port) and state["postgres_port"] == chosen


def test_the_embedded_redis_requires_a_generated_password_kept_off_its_command_line(tmp_path: Path) -> None:
    """The dev stack's Redis reads a generated password from a 0600 file in its 0700 data directory
    (the same on every run), never from its command line, which `ps` shows; it refuses a client
    without it, and the REDIS_URL the stack exports carries it."""
    env = {"DATABASE_URL": "postgresql://db.invalid/x", "JWT_SECRET": "j" * 40, "ENCRYPTION_KEY": "e" * 64,
           "PORT": str(free_port()), "TP_EMULATOR_URL": f"http://127.0.0.1:{free_port()}"}
    plan = plan_dev_stack(tmp_path, env)
    url = urlsplit(plan.exports["REDIS_URL"])
    password = url.password
    assert password is not None and len(password) >= 32 and url.port is not None
    config = tmp_path / "var" / "redis" / "redis.conf"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600 and stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    assert f"requirepass {password}" in config.read_text()
    assert password not in plan.programs["redis"]
    assert plan_dev_stack(tmp_path, env).exports["REDIS_URL"] == plan.exports["REDIS_URL"]  # generated once

    command = next(line for line in plan.programs["redis"].splitlines() if line.startswith("command="))
    server = subprocess.Popen(shlex.split(command.removeprefix("command=").replace("%%", "%")),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        anonymous = redis.Redis(host="127.0.0.1", port=url.port, socket_connect_timeout=2)
        for _ in range(100):
            try:
                anonymous.ping()
                raise AssertionError("the embedded Redis answered a client without its password")
            except redis.exceptions.AuthenticationError:
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)  # still starting
        else:
            raise AssertionError("the embedded Redis did not start")
        anonymous.close()
        client = redis.Redis.from_url(plan.exports["REDIS_URL"])
        assert client.ping()
        client.close()
        assert password.encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_database_fixture_is_a_fresh_database(database_url: str) -> None:
    """The session's database_url names a uniquely named test database."""
    assert re.fullmatch(r"/tp_test_\d+_[0-9a-f]{8}", urlsplit(database_url).path)


def test_clean_redis_starts_empty(clean_redis: str) -> None:
    """clean_redis hands over an empty Redis database."""
    client = redis.Redis.from_url(clean_redis)
    try:
        assert client.dbsize() == 0
        client.set("tp-test-key", "1")
    finally:
        client.close()
