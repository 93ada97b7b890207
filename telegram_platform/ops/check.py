"""`tp check`: the pre-deployment check (the seed's check:pre-deploy).

One line per check (`ok   name: detail`), one FAIL line per broken precondition, exit 0 only when
everything passes. It changes nothing: it creates no directory and starts no server.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from ..metrics.definitions import MULTIPROC_ENV
from ..settings import (
    API_GROUP,
    LISTENER_PROGRAM,
    ConfigError,
    RedisSettings,
    Settings,
    SupervisionSettings,
    _Env,
    api_processes,
    redis_settings,
)
from ..storage.files import open_blob_store
from ..storage.migrations import pending_migrations
from ..storage.redis import open_redis
from .dev_artifacts import SECRETS_FILE
from .processes import format_size
from .profile import production_refusals
from .supervisor import SupervisorClient

MIN_FREE_DISK = 1 << 30
MIN_OPEN_FILES = 4096  # supervisord.conf's minfds: supervisord refuses to start below it
CONNECT_TIMEOUT = 5.0


class CheckFailed(Exception):
    """One or more broken preconditions, each a line of its own."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class Context:
    env: dict[str, str]
    conf: Path
    settings: Settings | None = None
    supervision: SupervisionSettings | None = None
    redis: RedisSettings | None = None
    env_problems: dict[str, str] = field(default_factory=dict)

    @property
    def var_dir(self) -> Path:
        return Path(self.env.get("TP_VAR_DIR", "").strip() or "var").absolute()

    @property
    def supervisor_socket(self) -> Path:
        return self.supervision.supervisor_socket if self.supervision else self.var_dir / "run" / "supervisor.sock"


Check = Callable[[Context], Awaitable[str]]


def find_conf(env: Mapping[str, str], explicit: Path | None = None) -> Path:
    """--conf, TP_SUPERVISORD_CONF, ./supervisord.conf, or the one next to this package (a clone)."""
    if explicit is not None:
        return explicit.absolute()
    if env.get("TP_SUPERVISORD_CONF"):
        return Path(env["TP_SUPERVISORD_CONF"]).absolute()
    here = Path("supervisord.conf").absolute()
    clone = Path(__file__).resolve().parents[2] / "supervisord.conf"
    return here if here.exists() or not clone.exists() else clone


def load_context(env: dict[str, str], conf: Path | None = None) -> Context:
    context = Context(env, find_conf(env, conf))
    e = _Env(env)
    # Each required variable on its own, so that every broken one gets its own line.
    validators: list[tuple[str, Callable[[], object]]] = [
        ("DATABASE_URL", lambda: e.url("DATABASE_URL", ("postgres", "postgresql"))),
        ("REDIS_URL", lambda: redis_settings(e)),  # or the Sentinel pair, which replaces it
        ("JWT_SECRET", lambda: e.secret_text("JWT_SECRET", 32)),
        ("ENCRYPTION_KEY", lambda: e.hex_key("ENCRYPTION_KEY", 32)),
        ("TP_API_PROCESSES", lambda: api_processes(env)),
    ]
    for name, validate in validators:
        try:
            validate()
        except ConfigError as exc:
            context.env_problems[name] = str(exc)
    if "REDIS_URL" not in context.env_problems:
        context.redis = redis_settings(e)
    try:
        context.settings = Settings.from_env(env, app_mode="cli")
    except ConfigError as exc:
        context.env_problems.setdefault(exc.variable, str(exc))
    try:
        context.supervision = SupervisionSettings.from_env(env)
    except ConfigError as exc:
        context.env_problems.setdefault(exc.variable, str(exc))
    return context


async def check_environment(ctx: Context) -> str:
    problems = list(ctx.env_problems.values())
    processes = 0 if "TP_API_PROCESSES" in ctx.env_problems else api_processes(ctx.env)
    # From the environment, not the settings: they are missing when any other variable is broken.
    production = ctx.env.get("TP_PROFILE", "").strip().lower() == "production"
    if production and 0 < processes < 2:
        problems.append(f"TP_API_PROCESSES: production needs at least 2 API processes for zero-downtime "
                        f"reloads (got {processes})")
    if problems:
        raise CheckFailed(*problems)
    assert ctx.settings is not None and ctx.supervision is not None
    raw = ctx.env.get("TP_API_PROCESSES", "").strip()
    return (f"profile {ctx.settings.profile}, telegram backend {ctx.settings.telegram_backend}, "
            f"{processes} API processes{'' if raw.isdigit() else ' (one per CPU)'}, memory limits "
            f"{format_size(ctx.supervision.api_memory_limit)} per API process, "
            f"{format_size(ctx.supervision.worker_memory_limit)} for the worker")


async def check_profile(ctx: Context) -> str:
    problems = production_refusals(ctx.env, ctx.var_dir)
    if problems:
        raise CheckFailed(*problems)
    if _production(ctx):
        return "production: own servers and secrets"
    return "development: embedded servers and generated secrets allowed (TP_PROFILE=production refuses them)"


async def check_database(ctx: Context) -> str:
    if "DATABASE_URL" in ctx.env_problems:
        raise CheckFailed("not checked: DATABASE_URL is not valid")
    try:
        conn = await asyncio.wait_for(asyncpg.connect(ctx.env["DATABASE_URL"]), CONNECT_TIMEOUT)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise CheckFailed(f"DATABASE_URL: cannot connect ({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        pending = await pending_migrations(conn)
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    if pending:
        raise CheckFailed(f"migrations pending: {', '.join(map(str, pending))} (run `tp migrate`)")
    return f"PostgreSQL {version} reachable, schema up to date"


async def check_redis(ctx: Context) -> str:
    if "REDIS_URL" in ctx.env_problems:
        raise CheckFailed("not checked: REDIS_URL is not valid")
    assert ctx.redis is not None
    # Through the platform's own factory: a Sentinel-managed master is found as the programs find it.
    variable = "REDIS_SENTINELS" if ctx.redis.uses_sentinel else "REDIS_URL"
    try:
        async with open_redis(ctx.redis, wait_seconds=0, socket_timeout=CONNECT_TIMEOUT) as client:
            policy = (await client.config_get("maxmemory-policy")).get("maxmemory-policy")
            version = (await client.info("server")).get("redis_version")
            master_url = await _master_url(ctx, client)
    except (OSError, aioredis.RedisError) as exc:
        raise CheckFailed(f"{variable}: cannot connect ({type(exc).__name__}: {_first_line(exc)})") from None
    if policy != "noeviction":
        raise CheckFailed(f"Redis maxmemory-policy is {policy}: queued jobs could be evicted; "
                          "set noeviction (CONFIG SET maxmemory-policy noeviction, and in redis.conf)")
    if _production(ctx) and await _answers_anonymously(master_url):
        raise CheckFailed("Redis answers a client that gives no password: anyone who reaches it can read and forge "
                          "the platform's work; set requirepass (or an ACL user without nopass) in redis.conf and "
                          "put the password in REDIS_URL (redis://:PASSWORD@host:port/0)")
    via = f" (master of Sentinel service {ctx.redis.sentinel_service})" if ctx.redis.uses_sentinel else ""
    return f"Redis {version} reachable{via}, maxmemory-policy noeviction"


async def check_files(ctx: Context) -> str:
    """Where the files' bytes go; an S3 store is asked, with the credentials, as the programs ask it."""
    if ctx.settings is None:
        raise CheckFailed("not checked: the environment is not valid")
    files = ctx.settings.files
    if files.s3 is None:
        return "PostgreSQL large objects (TP_FILE_STORE=postgres)"
    try:
        async with open_blob_store(files):  # checks the bucket and the credentials, as tp-api's start does
            pass
    except ConfigError as exc:
        raise CheckFailed(str(exc)) from None
    return (f"S3 bucket {files.s3.bucket!r} at {files.s3.endpoint or 'AWS (' + files.s3.region + ')'}: "
            "reachable, credentials accepted")


def _production(ctx: Context) -> bool:
    return ctx.env.get("TP_PROFILE", "development").strip().lower() == "production"


async def _master_url(ctx: Context, client: aioredis.Redis) -> str:
    """The URL of the server `client` talks to: REDIS_URL, or the master the sentinels name (its
    address, with REDIS_URL's TLS choice)."""
    assert ctx.redis is not None
    url = ctx.redis.url or "redis://"
    if not ctx.redis.uses_sentinel:
        return url
    # A SentinelConnectionPool here, which the client's annotation does not know.
    host, port = await client.connection_pool.get_master_address()  # type: ignore[attr-defined]
    scheme = "rediss" if url.startswith("rediss:") else "redis"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/0"


async def _answers_anonymously(url: str) -> bool:
    """Whether the Redis that `url` names answers PING on the same address with no credentials."""
    pool = aioredis.ConnectionPool.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT,
                                            socket_timeout=CONNECT_TIMEOUT)
    for credential in ("username", "password", "credential_provider"):
        pool.connection_kwargs.pop(credential, None)
    client = aioredis.Redis(connection_pool=pool)
    try:
        return bool(await client.ping())
    except aioredis.RedisError:  # NOAUTH, or an ACL that refuses the default user
        return False
    finally:
        await client.aclose()
        await pool.disconnect()


async def check_tdlib(ctx: Context) -> str:
    # In a child process: loading TDLib here would put it in a process that may fork.
    code = ("import json, tdjson; r = tdjson.td_execute(json.dumps({'@type': 'getOption', 'name': 'version'})"
            ".encode()); print(json.loads(r).get('value', '?'))")
    result = await _run([sys.executable, "-c", code], ctx.env)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckFailed(f"TDLib does not load: {last}")
    return f"TDLib {result.stdout.strip()} loads"


async def check_supervisord_conf(ctx: Context) -> str:
    if not ctx.conf.exists():
        raise CheckFailed(f"{ctx.conf} not found (pass --conf or set TP_SUPERVISORD_CONF)")
    missing = [name for name in ("PORT", "TP_HOST") if not ctx.env.get(name, "").strip()]
    if missing:
        raise CheckFailed(f"{ctx.conf.name} reads {', '.join(missing)} from the environment: export "
                          f"{' '.join(f'{m}=...' for m in missing)}")
    if "TP_API_PROCESSES" in ctx.env_problems:
        raise CheckFailed("not checked: TP_API_PROCESSES is not valid")
    # As supervisord will see it: scripts/run and `tp supervise` export TP_API_PROCESSES as a count.
    supervisord_env = {**ctx.env, "TP_API_PROCESSES": str(api_processes(ctx.env))}
    code = ("import sys\nfrom supervisor.options import ServerOptions\no = ServerOptions()\n"
            "o.usage = lambda msg: (print('Error: ' + str(msg), file=sys.stderr), sys.exit(2))\n"
            "o.realize(args=['-c', sys.argv[1]])\n"
            "print(len(o.process_group_configs))")
    result = await _run([sys.executable, "-c", code, str(ctx.conf)], supervisord_env)
    if result.returncode != 0:
        errors = [line.removeprefix("Error: ") for line in result.stderr.splitlines() if line.startswith("Error:")]
        raise CheckFailed(f"{ctx.conf}: {(errors or result.stderr.strip().splitlines()[-1:] or ['invalid'])[0]}")
    parser = configparser.RawConfigParser(strict=False)
    parser.read(ctx.conf)
    problems = []
    if f"eventlistener:{LISTENER_PROGRAM}" not in parser:
        problems.append(f"{ctx.conf.name} has no [eventlistener:{LISTENER_PROGRAM}]: crashed programs would not "
                        "be restarted, restarts not counted, memory not watched")
    if f"fcgi-program:{API_GROUP}" not in parser:
        problems.append(f"{ctx.conf.name} has no [fcgi-program:{API_GROUP}] (the API group sharing one socket)")
    if problems:
        raise CheckFailed(*problems)
    return f"{ctx.conf} valid ({result.stdout.strip()} groups)"


async def check_port(ctx: Context) -> str:
    """The API's port, and TP_METRICS_LISTEN's when set: free, or served by this deployment."""
    if ctx.settings is None:
        raise CheckFailed("not checked: the environment is not valid")
    api = ctx.settings.api
    listens = [("PORT", "TP_HOST", api.host, api.port)]
    if api.metrics_listen is not None:
        listens.append(("TP_METRICS_LISTEN", "TP_METRICS_LISTEN", *api.metrics_listen))
    details, problems = [], []
    for variable, host_variable, host, port in listens:
        probe_host = "127.0.0.1" if host in ("0.0.0.0", "", "*") else ("::1" if host == "::" else host)
        try:
            with socket.socket(socket.AF_INET6 if ":" in probe_host else socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                in_use = sock.connect_ex((probe_host, port)) == 0
        except OSError as exc:
            problems.append(f"{host_variable} {host}: cannot use it ({exc.strerror or exc})")
            continue
        if not in_use:
            details.append(f"port {port} free")
        elif await _served_here(ctx):
            details.append(f"port {port} served by this deployment's {API_GROUP} group")
        else:
            problems.append(f"{variable} {port} is taken by another program (not this deployment's supervisord): "
                            f"stop it or choose another {variable}")
    if problems:
        raise CheckFailed(*problems)
    return ", ".join(details)


async def _served_here(ctx: Context) -> bool:
    try:
        processes = await asyncio.to_thread(SupervisorClient(ctx.supervisor_socket).processes)
    except OSError:
        processes = []
    return any(p.group == API_GROUP and p.state == "RUNNING" for p in processes)


def _dir_problems(directory: Path, what: str, world_ok: bool = False) -> list[str]:
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if existing != directory:
        if not os.access(existing, os.W_OK | os.X_OK):
            return [f"{what} {directory} does not exist and {existing} is not writable"]
        return []
    problems = []
    if not directory.is_dir():
        return [f"{what} {directory} is not a directory"]
    if not os.access(directory, os.W_OK | os.X_OK):
        problems.append(f"{what} {directory} is not writable by {os.geteuid()}")
    mode = stat.S_IMODE(directory.stat().st_mode)
    # o+x alone is allowed: scripts/run lets the embedded PostgreSQL's user pass through var/.
    if not world_ok and mode & 0o006:
        problems.append(f"{what} {directory} is open to other users (mode {mode:o}): chmod o-rw {directory}")
    if mode & 0o002:
        problems.append(f"{what} {directory} is world-writable (mode {mode:o}): chmod o-w {directory}")
    return problems


def conf_log_dir(conf: Path) -> Path:
    """The log directory supervisord.conf names (childlogdir, %(here)s expanded as supervisord does:
    the directory of the path given, a symlink not resolved); a clone's var/log when it names none."""
    parser = configparser.RawConfigParser(strict=False)
    try:
        parser.read(conf)
        value = parser.get("supervisord", "childlogdir", fallback="")
    except configparser.Error:
        value = ""
    if not value or "%(ENV_" in value:
        return conf.parent / "var" / "log"
    return Path(value.replace("%(here)s", str(conf.parent)).replace("%%", "%"))


async def check_directories(ctx: Context) -> str:
    log_dir = conf_log_dir(ctx.conf)
    data_dirs = [("data directory", ctx.var_dir)]
    if ctx.settings is not None:
        data_dirs.append(("TDLib data directory", ctx.settings.tdlib.data_dir))
    problems = []
    for what, directory in data_dirs:
        problems += _dir_problems(directory, what)
    problems += _dir_problems(log_dir, "log directory", world_ok=True)
    secrets = ctx.var_dir / SECRETS_FILE
    if secrets.exists() and stat.S_IMODE(secrets.stat().st_mode) & 0o077:
        problems.append(f"{secrets} is readable by others (mode {stat.S_IMODE(secrets.stat().st_mode):o}): "
                        f"chmod 600 {secrets}")
    if problems:
        raise CheckFailed(*problems)
    return f"{', '.join(str(d) for _, d in data_dirs)} and {log_dir} writable, not open to others"


def _metrics_files(raw: str) -> tuple[Path, list[Path]]:
    directory = Path(raw).absolute()
    return directory, sorted(directory.glob("*.db")) if directory.is_dir() else []


async def check_metrics(ctx: Context) -> str:
    """supervisord's programs share one multiprocess directory, empty when supervisord starts: without
    it each process keeps its own registry and /metrics loses the worker's counters and the other
    API members' requests; files left from a previous run would be added to this one's."""
    raw = ctx.env.get(MULTIPROC_ENV, "").strip()
    if not raw:
        raise CheckFailed(f"{MULTIPROC_ENV} is not set: every process under supervisord would keep its own "
                          "metrics and /metrics would lose the worker's counters and the other API members' "
                          "requests (scripts/run and the systemd unit set it)")
    directory, files = _metrics_files(raw)
    problems = _dir_problems(directory, "metrics directory")
    if problems:
        raise CheckFailed(*problems)
    if not files:
        return f"{directory} empty, writable, not open to others"
    try:
        processes = await asyncio.to_thread(SupervisorClient(ctx.supervisor_socket).processes)
    except OSError:
        processes = []
    if processes:
        return f"{directory} in use by this deployment's supervisord ({len(files)} files)"
    raise CheckFailed(f"metrics directory {directory} holds {len(files)} files from a previous run and supervisord "
                      "is not running: they would be added to the next run's counters; empty it before starting "
                      "(scripts/run and the unit's ExecStartPre do)")


async def check_disk(ctx: Context) -> str:
    existing = ctx.var_dir
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_DISK:
        raise CheckFailed(f"only {format_size(free)} free under {existing} (need {format_size(MIN_FREE_DISK)}: "
                          "TDLib databases, logs, the append-only file)")
    return f"{format_size(free)} free under {existing}"


async def check_limits(ctx: Context) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < MIN_OPEN_FILES and hard != resource.RLIM_INFINITY and hard < MIN_OPEN_FILES and os.geteuid() != 0:
        raise CheckFailed(f"open files limit {soft}/{hard} is below supervisord's minfds {MIN_OPEN_FILES}: "
                          "raise it (LimitNOFILE= in the systemd unit, or ulimit -n)")
    return f"open files {soft} (hard {hard if hard != resource.RLIM_INFINITY else 'unlimited'})"


CHECKS: list[tuple[str, Check]] = [
    ("environment", check_environment),
    ("profile", check_profile),
    ("database", check_database),
    ("redis", check_redis),
    ("files", check_files),
    ("tdlib", check_tdlib),
    ("supervisord.conf", check_supervisord_conf),
    ("port", check_port),
    ("directories", check_directories),
    ("metrics", check_metrics),
    ("disk", check_disk),
    ("limits", check_limits),
]


async def run_checks(env: dict[str, str], conf: Path | None = None) -> int:
    ctx = load_context(env, conf)
    failed = 0
    for name, check in CHECKS:
        try:
            detail = await check(ctx)
        except CheckFailed as exc:
            failed += 1
            for problem in exc.problems:
                print(f"FAIL {name}: {problem}", flush=True)
        else:
            print(f"ok   {name}: {detail}", flush=True)
    if failed:
        print(f"{failed} of {len(CHECKS)} checks failed")
    return 1 if failed else 0


async def _run(argv: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60, env=dict(env),
                                   check=False)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]
