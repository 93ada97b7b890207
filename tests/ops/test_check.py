"""`tp check`: passes on a sound deployment, and names each broken precondition on a line of its own."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
import redis

from telegram_platform.devstack.dev_secrets import ensure_dev_secrets
from telegram_platform.devstack.servers import ThrowawayRedis
from telegram_platform.ops.profile import production_refusals
from telegram_platform.settings import EXIT_CONFIG

REPO = Path(__file__).resolve().parents[2]


def deployment_root(tmp_path: Path) -> Path:
    """A copy of supervisord.conf with the var/ directories scripts/run would make."""
    root = tmp_path / "deploy"
    for sub, mode in (("var", 0o700), ("var/log", 0o750), ("var/run", 0o700)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub).chmod(mode)
    shutil.copy(REPO / "supervisord.conf", root / "supervisord.conf")
    return root


def check_env(platform_env: dict[str, str], root: Path, **changes: str | None) -> dict[str, str]:
    env = {**platform_env, "TP_HOST": "127.0.0.1", "TP_API_PROCESSES": "2", "TP_VAR_DIR": str(root / "var"),
           "TP_SUPERVISOR_SOCKET": str(root / "var/run/supervisor.sock"),
           "PROMETHEUS_MULTIPROC_DIR": str(root / "var/run/metrics")}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


async def tp_check(env: dict[str, str], root: Path) -> tuple[int, list[str]]:
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "telegram_platform.cli.tp", "check", "--conf",
                         str(root / "supervisord.conf")],
        env=env, cwd=root, capture_output=True, text=True, timeout=120, check=False)
    assert not result.stderr.strip(), result.stderr
    return result.returncode, result.stdout.splitlines()


def failures(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("FAIL")]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_sound_deployment_passes_every_check(tmp_path: Path, platform_env: dict[str, str],
                                                   db: asyncpg.Pool) -> None:
    """A migrated database, a noeviction Redis, TDLib, a valid conf, a free port, private
    directories: every line says ok and the exit status is 0."""
    root = deployment_root(tmp_path)
    code, lines = await tp_check(check_env(platform_env, root), root)
    assert code == 0, lines
    names = [line.split(":")[0].split()[-1] for line in lines]
    assert names == ["environment", "profile", "database", "redis", "files", "tdlib", "supervisord.conf", "port",
                     "directories", "metrics", "disk", "limits"], lines
    assert all(line.startswith("ok   ") for line in lines), lines


async def test_each_broken_precondition_gets_its_own_line(tmp_path: Path, platform_env: dict[str, str],
                                                          db: asyncpg.Pool) -> None:
    """Bad secrets, unreachable servers, a missing conf variable, a taken port, an open data
    directory: one clear FAIL line each, exit 1."""
    root = deployment_root(tmp_path)
    (root / "var").chmod(0o777)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        env = check_env(platform_env, root, ENCRYPTION_KEY="abc123", JWT_SECRET="short",
                        DATABASE_URL=f"postgresql://nobody@127.0.0.1:{closed_port()}/none",
                        REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0", TP_HOST=None,
                        PORT=str(squatter.getsockname()[1]), TP_API_MEMORY_LIMIT="lots")
        code, lines = await tp_check(env, root)
    assert code == 1
    failed = failures(lines)
    expected = [
        "FAIL environment: JWT_SECRET: must be at least 32 characters",
        "FAIL environment: ENCRYPTION_KEY: must be 64 hex digits",
        "FAIL environment: TP_API_MEMORY_LIMIT: not a size",
        "FAIL database: DATABASE_URL: cannot connect",
        "FAIL redis: REDIS_URL: cannot connect",
        "FAIL supervisord.conf: supervisord.conf reads TP_HOST from the environment",
        "FAIL directories: data directory",
    ]
    for start in expected:
        assert any(line.startswith(start) for line in failed), (start, lines)
    assert any("world-writable" in line for line in failed), lines
    assert lines[-1].endswith("checks failed")


async def test_port_taken_and_unmigrated_database_fail(tmp_path: Path, platform_env: dict[str, str],
                                                       database_url: str, db: asyncpg.Pool) -> None:
    """A port held by another program and a database with migrations pending each fail their check."""
    root = deployment_root(tmp_path)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CREATE DATABASE tp_check_empty")
    except asyncpg.DuplicateDatabaseError:
        pass
    finally:
        await conn.close()
    empty = database_url.rsplit("/", 1)[0] + "/tp_check_empty"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        env = check_env(platform_env, root, DATABASE_URL=empty, PORT=str(squatter.getsockname()[1]))
        code, lines = await tp_check(env, root)
    assert code == 1
    failed = failures(lines)
    assert any(line.startswith("FAIL database: migrations pending") and "tp migrate" in line for line in failed), lines
    assert any(line.startswith("FAIL port: PORT") and "taken by another program" in line for line in failed), lines


async def test_a_taken_metrics_address_fails_the_port_check(tmp_path: Path, platform_env: dict[str, str],
                                                            db: asyncpg.Pool) -> None:
    """TP_METRICS_LISTEN on a port another program holds fails the port check, naming the variable;
    free, it passes."""
    root = deployment_root(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        env = check_env(platform_env, root, TP_METRICS_LISTEN=f"127.0.0.1:{squatter.getsockname()[1]}")
        code, lines = await tp_check(env, root)
    assert code == 1
    assert any(line.startswith("FAIL port: TP_METRICS_LISTEN") and "taken by another program" in line
               for line in failures(lines)), lines
    env = check_env(platform_env, root, TP_METRICS_LISTEN=f"127.0.0.1:{closed_port()}")
    _, lines = await tp_check(env, root)
    assert [line for line in lines if line.startswith("ok   port:") and line.count("free") == 2], lines


async def test_evicting_redis_and_an_invalid_conf_fail(tmp_path: Path, platform_env: dict[str, str],
                                                       db: asyncpg.Pool) -> None:
    """A Redis that may evict keys (queues would lose jobs) and a supervisord.conf that does not
    parse are each named."""
    root = deployment_root(tmp_path)
    conf = root / "supervisord.conf"
    conf.write_text(conf.read_text().replace("\nstartsecs=1\n", "\nstartsecs=soon\n", 1))
    server = await asyncio.to_thread(ThrowawayRedis(tmp_path / "lru").start)
    try:
        client = redis.Redis.from_url(server.url)
        client.config_set("maxmemory-policy", "allkeys-lru")
        client.close()
        code, lines = await tp_check(check_env(platform_env, root, REDIS_URL=server.url), root)
    finally:
        await asyncio.to_thread(server.stop)
    assert code == 1
    failed = failures(lines)
    assert any(line.startswith("FAIL redis: Redis maxmemory-policy is allkeys-lru") for line in failed), lines
    assert any(line.startswith("FAIL supervisord.conf:") and "'soon' in section 'fcgi-program:tp-api'" in line
               for line in failed), lines


async def test_production_fails_on_a_redis_that_answers_without_a_password(tmp_path: Path,
                                                                           platform_env: dict[str, str],
                                                                           db: asyncpg.Pool) -> None:
    """In production, a Redis that answers PING without credentials fails the redis check with one
    line saying how to fix it; one that requires a password (given in REDIS_URL) passes; development
    does not ask."""
    root = deployment_root(tmp_path)
    open_server = await asyncio.to_thread(ThrowawayRedis(tmp_path / "open").start)
    locked = await asyncio.to_thread(ThrowawayRedis(tmp_path / "locked", password=secrets.token_urlsafe(24)).start)
    try:
        runs = {name: await tp_check(check_env(platform_env, root, TP_PROFILE=profile, REDIS_URL=url), root)
                for name, profile, url in (("open", "production", open_server.url),
                                           ("locked", "production", locked.url),
                                           ("development", "development", open_server.url))}
    finally:
        await asyncio.to_thread(open_server.stop)
        await asyncio.to_thread(locked.stop)
    redis_lines = {name: [line for line in lines if line.split(":")[0].split()[-1] == "redis"]
                   for name, (_, lines) in runs.items()}
    [refused] = redis_lines["open"]
    assert refused.startswith("FAIL redis: Redis answers a client that gives no password"), refused
    assert "requirepass" in refused and "REDIS_URL" in refused and runs["open"][0] == 1
    assert [line.split(":")[0] for line in redis_lines["locked"] + redis_lines["development"]] == ["ok   redis"] * 2


async def test_production_refuses_generated_secrets_and_one_api_process(tmp_path: Path,
                                                                         platform_env: dict[str, str],
                                                                         db: asyncpg.Pool) -> None:
    """TP_PROFILE=production with the development secrets from var/secrets.env and a single API
    process fails, and the programs themselves refuse to start with the same reason."""
    root = deployment_root(tmp_path)
    generated = ensure_dev_secrets(root / "var")
    env = check_env(platform_env, root, TP_PROFILE="production", TP_API_PROCESSES="1", TP_METRICS_TOKEN="m" * 32,
                    **generated)
    code, lines = await tp_check(env, root)
    assert code == 1
    failed = failures(lines)
    assert any(line.startswith("FAIL profile: JWT_SECRET is the generated development secret") for line in failed)
    assert any(line.startswith("FAIL profile: ENCRYPTION_KEY is the generated development secret")
               for line in failed)
    assert any(line.startswith("FAIL environment: TP_API_PROCESSES: production needs at least 2") for line in failed)
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", "from telegram_platform.cli.api import main; main()"],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == EXIT_CONFIG == 78
    assert "production refuses" in result.stderr and "generated development secret" in result.stderr


def test_production_uses_the_emulator_only_when_named(tmp_path: Path, platform_env: dict[str, str]) -> None:
    """Production without TDLib credentials is refused, unless TP_EMULATOR_URL names an emulator
    explicitly (a rehearsal); never the emulator's default address by accident."""
    env = {**platform_env, "TP_PROFILE": "production"}
    assert production_refusals(env, tmp_path) == []
    del env["TP_EMULATOR_URL"]
    assert [p for p in production_refusals(env, tmp_path) if p.startswith("TDLIB_API_ID and TDLIB_API_HASH")]
    env.update(TDLIB_API_ID="94575", TDLIB_API_HASH="a" * 32)
    assert production_refusals(env, tmp_path) == []


async def test_metrics_directory_unset_or_stale_fails(tmp_path: Path, platform_env: dict[str, str],
                                                     db: asyncpg.Pool) -> None:
    """supervisord would run without a multiprocess directory, or with a previous run's files in it
    (and no supervisord using them): each is a FAIL metrics line."""
    root = deployment_root(tmp_path)
    code, lines = await tp_check(check_env(platform_env, root, PROMETHEUS_MULTIPROC_DIR=None), root)
    assert code == 1
    assert [line for line in failures(lines) if line.startswith("FAIL metrics: PROMETHEUS_MULTIPROC_DIR is not set")]
    stale = root / "var/run/metrics"
    stale.mkdir(mode=0o700)
    (stale / "counter_123.db").write_bytes(b"")
    code, lines = await tp_check(check_env(platform_env, root), root)
    assert code == 1
    assert [line for line in failures(lines) if line.startswith("FAIL metrics:") and "previous run" in line], lines


async def test_api_processes_max_is_one_per_cpu(tmp_path: Path, platform_env: dict[str, str],
                                                db: asyncpg.Pool) -> None:
    """TP_API_PROCESSES=max (and unset) passes as one API process per CPU; a word that is not max fails."""
    root = deployment_root(tmp_path)
    cpus = len(os.sched_getaffinity(0))
    for value in ("max", None):
        code, lines = await tp_check(check_env(platform_env, root, TP_API_PROCESSES=value), root)
        assert code == 0, lines
        assert f"{cpus} API processes (one per CPU)" in lines[0], lines
    code, lines = await tp_check(check_env(platform_env, root, TP_API_PROCESSES="many"), root)
    assert code == 1
    assert [line for line in failures(lines) if line.startswith("FAIL environment: TP_API_PROCESSES:")
            and "or max (one per CPU)" in line], lines


def test_debug_endpoints_exist_only_when_enabled_and_never_in_production(platform_env: dict[str, str]) -> None:
    """The test-only routes are absent by default, present with TP_DEBUG_ENDPOINTS=1 in development,
    and production refuses the setting outright."""
    from telegram_platform.api.app import create_app
    from telegram_platform.settings import ConfigError, Settings

    def debug_routes(env: dict[str, str]) -> list[str]:
        app = create_app(Settings.from_env(env, app_mode="api"))
        return [r.resource.canonical for r in app.router.routes() if r.resource and "_debug" in r.resource.canonical]

    assert debug_routes(platform_env) == []
    assert set(debug_routes({**platform_env, "TP_DEBUG_ENDPOINTS": "1"})) == {"/api/_debug/allocate",
                                                                             "/api/_debug/exit"}
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**platform_env, "TP_DEBUG_ENDPOINTS": "1", "TP_PROFILE": "production",
                           "TP_METRICS_TOKEN": "m" * 32})
    assert info.value.variable == "TP_DEBUG_ENDPOINTS"


async def test_sentinels_that_name_no_master_fail_the_redis_check(tmp_path: Path, platform_env: dict[str, str],
                                                                 db: asyncpg.Pool) -> None:
    """With REDIS_SENTINELS instead of REDIS_URL, `tp check` asks the sentinels as the programs do:
    none answering is one FAIL line naming REDIS_SENTINELS; production takes them in REDIS_URL's place."""
    root = deployment_root(tmp_path)
    env = check_env(platform_env, root, REDIS_URL=None, REDIS_SENTINELS=f"127.0.0.1:{closed_port()}",
                    REDIS_SENTINEL_SERVICE="tp-main")
    code, lines = await tp_check(env, root)
    assert code == 1
    redis_lines = [line for line in failures(lines) if line.startswith("FAIL redis:")]
    assert len(redis_lines) == 1, lines
    assert redis_lines[0].startswith("FAIL redis: REDIS_SENTINELS: cannot connect (MasterNotFoundError"), lines
    assert not [line for line in lines if line.startswith("FAIL environment")], lines
    assert production_refusals({**env, "TP_PROFILE": "production"}, tmp_path) == []
    del env["REDIS_SENTINELS"]
    assert "REDIS_URL is not set: production refuses the embedded default" in production_refusals(
        {**env, "TP_PROFILE": "production"}, tmp_path)
