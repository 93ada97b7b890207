"""The development stack scripts/run starts: what `prepare` decides from the environment (embedded
servers, generated secrets, the emulator), the supervisord program files it writes, and the small
probes scripts/run waits with."""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..ops.dev_artifacts import DATABASE_NAME, SECRETS_FILE, STATE_FILE, load_state
from ..settings import BACKING_SERVICE_PROGRAMS, ConfigError, api_host, api_processes
from .binaries import require_binaries
from .dev_secrets import ensure_dev_secrets, ensure_redis_password
from .errors import DevStackError, ProductionRefusal
from .servers import (
    free_port,
    init_postgres,
    port_is_free,
    postgres_argv,
    postgres_url,
    redis_argv,
    redis_url,
    socket_dir_for,
)
from .users import child_env, current_user, make_traversable, prepare_owned_dir, service_user

DEFAULT_PG_PORT = 5433
DEFAULT_REDIS_PORT = 6380
DEFAULT_EMULATOR_URL = "http://127.0.0.1:3900"


def _conf_value(text: str) -> str:
    """Escape for supervisord's config parser (which expands %(name)s)."""
    return text.replace("%", "%%")


def _command(argv: Sequence[str]) -> str:
    return _conf_value(shlex.join(argv))


def _program_conf(name: str, options: Mapping[str, str | int]) -> str:
    lines = [
        "; Written by scripts/run (telegram_platform.devstack); rewritten on every run.",
        f"[program:{name}]",
    ]
    lines += [f"{key}={value}" for key, value in options.items()]
    return "\n".join(lines) + "\n"



def _choose_port(state: dict[str, int], key: str, preferred: int, reserved: set[int]) -> int:
    """The port recorded for `key` if still free, else `preferred`, else any free one; never one in
    `reserved` (the API's PORT, the emulator's, the other server's): those are free now only
    because their programs have not started yet. The choice is added to `reserved`."""
    candidates = [state.get(key), preferred]
    port = next((p for p in candidates if p and p not in reserved and port_is_free(p)), None)
    while port is None:
        chosen = free_port()
        port = chosen if chosen not in reserved else None
    state[key] = port
    reserved.add(port)
    return port


def _port_of(url: str) -> int | None:
    try:
        return urllib.parse.urlsplit(url).port
    except ValueError:
        return None


def reachable_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "*") else host


@dataclass(slots=True)
class Plan:
    """What `prepare` decided: variables to export and supervisord program files to write."""

    exports: dict[str, str]
    programs: dict[str, str]
    notes: list[str]


def plan_dev_stack(root: Path, environ: Mapping[str, str]) -> Plan:
    """Decide the dev stack from the environment; creates var/, secrets and embedded clusters.

    Embedded PostgreSQL/Redis when DATABASE_URL/REDIS_URL are unset, the emulator when
    TDLIB_API_ID is unset, generated secrets when JWT_SECRET/ENCRYPTION_KEY are unset.
    """
    root = root.absolute()
    env = {k: v.strip() for k, v in environ.items() if v.strip()}
    exports: dict[str, str] = {}
    programs: dict[str, str] = {}
    notes: list[str] = []

    profile = env.get("TP_PROFILE", "development").lower()
    if profile == "production":
        missing = [v for v in ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "ENCRYPTION_KEY") if v not in env]
        if missing:
            raise ProductionRefusal(
                f"TP_PROFILE=production refuses embedded servers and generated secrets: set {', '.join(missing)}"
            )

    # supervisord's own files (socket, pid, logs, generated programs) live in <root>/var, where
    # supervisord.conf names them; application data and secrets in TP_VAR_DIR (default the same).
    run_var = root / "var"
    var_dir = Path(env.get("TP_VAR_DIR", str(run_var))).absolute()
    for directory, mode in (
        (run_var, 0o700),
        (run_var / "run", 0o700),
        (run_var / "log", 0o750),
        (run_var / "supervisor.d", 0o700),
        (var_dir, 0o700),
        (var_dir / "run", 0o700),
        # Made here, closed to others, before a worker would make it with the process umask:
        # `tp check` refuses a TDLib data directory that other users can read.
        (Path(env.get("TDLIB_DATA_DIR", str(var_dir / "tdlib"))).absolute(), 0o700),
    ):
        if not directory.exists():
            directory.mkdir(mode=mode, parents=True)
            os.chmod(directory, mode)
    log_dir = run_var / "log"
    exports["TP_VAR_DIR"] = str(var_dir)
    exports["TP_PROFILE"] = profile
    exports["PORT"] = env.get("PORT", "3000")
    try:
        exports["TP_HOST"] = api_host(env)  # the profile's default when unset, as the programs have it
    except ConfigError as exc:
        raise DevStackError(str(exc)) from None
    # supervisord.conf's numprocs needs a number: unset or `max` is one per CPU (settings.api_processes).
    try:
        exports["TP_API_PROCESSES"] = str(api_processes(env))
    except ConfigError as exc:
        raise DevStackError(str(exc)) from None
    exports["TP_SUPERVISOR_SOCKET"] = env.get("TP_SUPERVISOR_SOCKET", str(run_var / "run/supervisor.sock"))
    # prometheus_client's multiprocess files, for every program (wiped by `prepare`; metrics/definitions.py).
    exports["PROMETHEUS_MULTIPROC_DIR"] = str(Path(env.get("PROMETHEUS_MULTIPROC_DIR",
                                                           str(run_var / "run/metrics"))).absolute())

    if "JWT_SECRET" not in env or "ENCRYPTION_KEY" not in env:
        generated = ensure_dev_secrets(var_dir)
        for key, value in generated.items():
            if key not in env:
                exports[key] = value
        notes.append(f"secrets: {var_dir / SECRETS_FILE}")

    want_pg = "DATABASE_URL" not in env
    want_redis = "REDIS_URL" not in env
    # Ports the platform's own programs will listen on: an embedded server must not be given one.
    reserved = {port for port in (int(exports["PORT"]) if exports["PORT"].isdigit() else None,
                                  _port_of(env.get("TP_EMULATOR_URL", DEFAULT_EMULATOR_URL))) if port}
    state_path = var_dir / STATE_FILE
    state = load_state(state_path)
    if want_pg or want_redis:
        pg_bins, redis_bin = require_binaries(postgres=want_pg, redis=want_redis)
        if want_pg:
            assert pg_bins is not None
            user = service_user()
            if not user.is_current:
                # var/ and var/run stay unlistable; the service user may only pass through them.
                make_traversable(var_dir / "run")
            data_dir = var_dir / "postgres"
            socket_dir = socket_dir_for(var_dir / "run" / "postgresql")
            if init_postgres(data_dir, databases=(DATABASE_NAME,), user=user, binaries=pg_bins):
                notes.append(f"initialised PostgreSQL in {data_dir}")
            prepare_owned_dir(socket_dir, user, 0o700)
            port = _choose_port(state, "postgres_port", DEFAULT_PG_PORT, reserved)
            max_connections = max(200, 25 * (int(exports["TP_API_PROCESSES"]) + 4))
            argv = postgres_argv(data_dir, port, socket_dir, max_connections=max_connections, binaries=pg_bins)
            env_words = [f"{k}={v}" for k, v in child_env(user).items()]
            options: dict[str, str | int] = {
                "command": _command(["/usr/bin/env", "-i", *env_words, *argv]),
                "directory": "/",
                "priority": 10,
                "autostart": "true",
                "autorestart": "true",
                "startsecs": 3,
                "startretries": 5,
                "stopsignal": "INT",
                "stopwaitsecs": 60,
                "redirect_stderr": "true",
                "stdout_logfile": _conf_value(str(log_dir / "postgres.log")),
                "stdout_logfile_maxbytes": "10MB",
                "stdout_logfile_backups": 30,
            }
            if not user.is_current:
                options["user"] = user.name
            programs["postgres"] = _program_conf("postgres", options)
            exports["DATABASE_URL"] = postgres_url(port)
        if want_redis:
            assert redis_bin is not None
            data_dir = var_dir / "redis"
            data_dir.mkdir(mode=0o700, exist_ok=True)
            port = _choose_port(state, "redis_port", DEFAULT_REDIS_PORT, reserved)
            config_file, password = ensure_redis_password(data_dir)
            argv = redis_argv(data_dir, port, binary=redis_bin, config_file=config_file)
            env_words = [f"{k}={v}" for k, v in child_env(current_user()).items()]
            programs["redis"] = _program_conf(
                "redis",
                {
                    "command": _command(["/usr/bin/env", "-i", *env_words, *argv]),
                    "directory": _conf_value(str(data_dir)),
                    "priority": 10,
                    "autostart": "true",
                    "autorestart": "true",
                    "startsecs": 1,
                    "startretries": 5,
                    "stopsignal": "TERM",
                    "stopwaitsecs": 30,
                    "redirect_stderr": "true",
                    "stdout_logfile": _conf_value(str(log_dir / "redis.log")),
                    "stdout_logfile_maxbytes": "10MB",
                    "stdout_logfile_backups": 30,
                },
            )
            exports["REDIS_URL"] = redis_url(port, password=password)
        state_path.write_text(json.dumps(state, indent=2) + "\n")

    if "TDLIB_API_ID" not in env:
        exports["TP_EMULATOR_URL"] = env.get("TP_EMULATOR_URL", DEFAULT_EMULATOR_URL)
        programs["tp-emulator"] = _program_conf(
            "tp-emulator",
            {
                # The emulated Telegram keeps its users and sessions across restarts, as Telegram does.
                "command": _conf_value(f"tp-emulator --state {shlex.quote(str(root / 'var' / 'emulator.json'))}"),
                "directory": _conf_value(str(root)),
                "environment": 'TP_INSTANCE="tp-emulator"',
                "priority": 50,
                "autostart": "true",
                "autorestart": "true",
                "startsecs": 1,
                "startretries": 16,
                "stopsignal": "TERM",
                "stopwaitsecs": 10,
                "stdout_logfile": _conf_value(str(log_dir / "tp-emulator.out.log")),
                "stdout_logfile_maxbytes": "10MB",
                "stdout_logfile_backups": 30,
                "stderr_logfile": _conf_value(str(log_dir / "tp-emulator.err.log")),
                "stderr_logfile_maxbytes": "10MB",
                "stderr_logfile_backups": 30,
            },
        )
        notes.append("Telegram: emulator (set TDLIB_API_ID and TDLIB_API_HASH for real TDLib)")
    return Plan(exports=exports, programs=programs, notes=notes)


def write_programs(var_dir: Path, programs: Mapping[str, str]) -> None:
    """Write var/supervisor.d/<name>.conf for each program; remove stale generated ones."""
    conf_dir = var_dir / "supervisor.d"
    conf_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Only these files are ours: any other file in var/supervisor.d is left alone.
    for name in BACKING_SERVICE_PROGRAMS:
        path = conf_dir / f"{name}.conf"
        if name in programs:
            tmp = path.with_suffix(".conf.tmp")
            tmp.write_text(programs[name])
            os.chmod(tmp, 0o600)
            tmp.replace(path)
        else:
            path.unlink(missing_ok=True)


def supervisor_running(socket_path: Path) -> bool:
    """True when a supervisord answers on this clone's unix socket."""
    if not socket_path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(socket_path))
        except OSError:
            return False
        return True


def wait_http_ok(url: str, timeout: float) -> bool:
    """Poll `url` until it answers 200 or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    return False
