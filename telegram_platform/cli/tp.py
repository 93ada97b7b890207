"""`tp`: the operator's command line.

init, migrate, create-user, check, supervise, status, hosts, accounts move, drain, reload, restart, stop,
start, logs. The process
commands talk to supervisord over its unix socket (TP_SUPERVISOR_SOCKET, else
<TP_VAR_DIR or ./var>/run/supervisor.sock) and need neither the database nor the secrets.
`tp --env-file /etc/telegram-platform/env ...` sees the settings the systemd unit gives the platform.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from ..deploy.layout import InitRefused, InitRequest, lay_out_host
from ..ops import procfs
from ..ops.actions import ActionError, Operator
from ..ops.check import find_conf
from ..ops.dev_artifacts import parse_env_file
from ..ops.processes import format_size, snapshot
from ..ops.restarts import ReloadStatus
from ..ops.supervisor import Fault, SupervisorClient
from ..settings import ConfigError, Settings, SupervisionSettings, api_host, api_processes
from ..version import VERSION, add_version_option
from .common import config_failure, load_settings


def _settings_for_ops() -> Settings:
    return load_settings("tp", "cli")


async def _migrate(settings: Settings) -> int:
    from ..storage.accounts import seal_clear_proxy_credentials
    from ..storage.db import open_pool
    from ..storage.migrations import migrate

    async with open_pool(settings, min_size=1, max_size=1) as pool, pool.acquire() as conn:
        applied = await migrate(conn)
        await seal_clear_proxy_credentials(conn, settings.encryption_key)  # what SQL could not seal
    print(f"migrations applied: {applied}" if applied else "database is up to date")
    return 0


async def _create_user(settings: Settings, username: str, role: str, password: str) -> int:
    from ..api.security import Passwords
    from ..errors import Conflict
    from ..storage import users
    from ..storage.db import open_pool
    from ..storage.migrations import migrate

    async with open_pool(settings, min_size=1, max_size=1) as pool:
        async with pool.acquire() as conn:
            await migrate(conn)
        password_hash = await Passwords().hash(password)
        try:
            user = await users.create_user(pool, username, password_hash, role)
        except Conflict as exc:
            print(f"tp create-user: {exc.message}", file=sys.stderr)
            return 1
    print(f"created user {user.username} (id {user.id}, role {user.role})")
    return 0


async def _hosts(settings: Settings, as_json: bool) -> int:
    from ..ops.hosts import hosts_overview
    from ..outages import POSTGRES_DOWN, REDIS_DOWN
    from ..storage.db import open_pool
    from ..storage.redis import open_redis

    try:
        async with open_pool(settings, min_size=1, max_size=1, wait_seconds=5, connect_timeout=5) as pool, \
                open_redis(settings.redis, wait_seconds=5, socket_timeout=5) as redis:
            overview = await hosts_overview(pool, redis, gone_after=settings.host.gone_after)
    except (*POSTGRES_DOWN, *REDIS_DOWN) as exc:
        print(f"tp hosts: the database or Redis does not answer ({type(exc).__name__})", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(overview, indent=2, default=lambda value: value.isoformat()))
        return 0
    rows = [("HOST", "STATE", "ACCOUNTS", "CLIENTS", "MEMORY", "WORKERS", "LAST HEARTBEAT")]
    for host in overview["items"]:
        memory = format_size(host["memory_bytes"]) if host["memory_bytes"] is not None else "-"
        rows.append((host["id"], host["state"], str(host["accounts_owned"]), str(host["telegram_clients"]), memory,
                     str(len(host["workers"])), f"{_duration(host['heartbeat_age_seconds'])} ago"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if not overview["items"]:
        print("no host has started a worker yet")
    return 0


async def _move(settings: Settings, account_id: int, to: str) -> int:
    """`tp accounts move ID --to HOST` (ops/hosts.py `move_account`, as POST /api/accounts/{id}/move)."""
    from ..errors import PlatformError
    from ..ops.hosts import move_account
    from ..outages import POSTGRES_DOWN, REDIS_DOWN
    from ..redis_auth import RedisAuth
    from ..storage.db import open_pool
    from ..storage.redis import open_redis

    try:
        async with open_pool(settings, min_size=1, max_size=1, wait_seconds=5, connect_timeout=5) as pool, \
                open_redis(settings.redis, wait_seconds=5, socket_timeout=None) as redis:
            moved = await move_account(pool, redis, RedisAuth(settings.encryption_key), account_id, to,
                                       gone_after=settings.host.gone_after)
    except (*POSTGRES_DOWN, *REDIS_DOWN) as exc:
        print(f"tp accounts move: the database or Redis does not answer ({type(exc).__name__})", file=sys.stderr)
        return 1
    except PlatformError as exc:
        print(f"tp accounts move: {exc.message}", file=sys.stderr)
        return 1
    print(f"account {account_id} is on {moved['owner_host']} ({moved['auth_state']})")
    return 0


async def _drain(settings: Settings, host_id: str, draining: bool) -> int:
    """`tp drain HOST` (`--undo`: stop), as POST (DELETE) /api/hosts/{id}/drain."""
    from ..errors import PlatformError
    from ..ops.hosts import set_draining
    from ..outages import POSTGRES_DOWN
    from ..storage.db import open_pool

    try:
        async with open_pool(settings, min_size=1, max_size=1, wait_seconds=5, connect_timeout=5) as pool:
            await set_draining(pool, host_id, draining)
    except POSTGRES_DOWN as exc:
        print(f"tp drain: the database does not answer ({type(exc).__name__})", file=sys.stderr)
        return 1
    except PlatformError as exc:
        print(f"tp drain: {exc.message}", file=sys.stderr)
        return 1
    print(f"{host_id} is draining: its accounts go to the up hosts (watch `tp hosts`)" if draining
          else f"{host_id} takes accounts again")
    return 0


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        import getpass

        password = getpass.getpass("password: ")
    if len(password) < 8:
        print("tp create-user: password must be at least 8 characters", file=sys.stderr)
        sys.exit(2)
    return password


# -- processes ---------------------------------------------------------------------------------


def _supervision_settings() -> SupervisionSettings:
    """The supervision part of the settings alone: `tp status`, `restart`, `logs` work without the secrets."""
    try:
        return SupervisionSettings.from_env()
    except ConfigError as exc:
        config_failure("tp", exc)


def _unreachable(config: SupervisionSettings, exc: OSError) -> NoReturn:
    print(f"tp: supervisord is not running (no answer on {config.supervisor_socket}: {exc.strerror or exc}); "
          "start it with scripts/run or `systemctl start telegram-platform`", file=sys.stderr)
    sys.exit(1)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _status(as_json: bool, cpu_interval: float) -> int:
    config = _supervision_settings()
    snap = snapshot(config)
    if snap.supervisor != "ok":
        print(f"tp: {snap.error}; start it with scripts/run", file=sys.stderr)
        return 1
    cpu: dict[str, float] = {}
    if cpu_interval > 0:
        cpu = procfs.cpu_percent({p.name: (p.pid, p.memory_includes_children) for p in snap.processes if p.pid},
                                 cpu_interval)
    if as_json:
        data = {"version": VERSION, **snap.to_json()}
        for process in data["processes"]:
            process["cpu_percent"] = round(cpu[process["name"]], 1) if process["name"] in cpu else None
        print(json.dumps(data, indent=2))
        return 0
    print(f"telegram-platform {VERSION}")
    rows = [("NAME", "STATE", "PID", "UPTIME", "RESTARTS", "MEMORY", "CPU", "NOTE")]
    for p in snap.processes:
        memory = "-"
        if p.memory_bytes is not None:
            memory = format_size(p.memory_bytes)
            if p.memory_includes_children:
                memory += f" ({p.processes_counted} procs)"
        notes = []
        if p.ready is not None and p.state == "RUNNING":
            notes.append("ready" if p.ready else "NOT READY")
        if p.restart_in_seconds is not None:
            notes.append(f"crashed: restart in {p.restart_in_seconds:.1f}s (back-off)")
        if p.fatal_reason:
            notes.append(p.fatal_reason)
        elif p.state not in ("RUNNING", "STOPPED") and p.description and p.restart_in_seconds is None:
            notes.append(p.description)
        reasons = ", ".join(f"{k} {v}" for k, v in p.restarts_by_reason.items() if v)
        if reasons:
            notes.append(f"restarts: {reasons}")
        rows.append((p.name, p.state, str(p.pid or "-"), _duration(p.uptime_seconds) if p.pid else "-",
                     str(p.restarts), memory, f"{cpu[p.name]:.1f}%" if p.name in cpu else "-", "; ".join(notes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if snap.listener.get("stale"):
        print(f"warning: the tp-events listener is {snap.listener.get('state')} (last heartbeat "
              f"{snap.listener.get('heartbeat_age_seconds')}s ago): restart counts, back-off and memory "
              "watchdogs are not running; `tp restart tp-events`")
    if snap.reload.get("status") in (ReloadStatus.RUNNING, ReloadStatus.FAILED):
        print(f"reload: {snap.reload.get('status')} {snap.reload.get('error') or ''}".rstrip())
    return 0


def _operate(action: Callable[..., list[str]], *args: str) -> int:
    config = _supervision_settings()
    try:
        action(config, *args)
    except KeyError as exc:
        print(f"tp: no process or group named {exc.args[0]} (see `tp status`)", file=sys.stderr)
        return 1
    except ActionError as exc:
        print(f"tp: {exc}", file=sys.stderr)
        return 1
    except Fault as fault:
        print(f"tp: supervisord refused: {fault.faultString}", file=sys.stderr)
        return 1
    except OSError as exc:
        _unreachable(config, exc)
    return 0


def _operator(config: SupervisionSettings) -> Operator:
    return Operator(SupervisorClient(config.supervisor_socket), config, progress=lambda line: print(line, flush=True))


def _reload(config: SupervisionSettings, with_worker: str) -> list[str]:
    operator = _operator(config)
    started = time.monotonic()
    done = operator.reload()
    if with_worker:
        operator.restart_one(operator.client.info(config.worker_program), "reload")
        done.append(config.worker_program)
    print(f"reloaded {len(done)} processes in {time.monotonic() - started:.1f}s: {', '.join(done)}")
    return done


def _restart(config: SupervisionSettings, name: str) -> list[str]:
    operator = _operator(config)
    return operator.restart(name)


def _stop(config: SupervisionSettings, name: str) -> list[str]:
    operator = _operator(config)
    return operator.stop(name)


def _start(config: SupervisionSettings, name: str) -> list[str]:
    operator = _operator(config)
    return operator.start(name)


def _logs(name: str, stderr: bool, lines: int, follow: bool) -> int:
    config = _supervision_settings()
    try:
        paths = SupervisorClient(config.supervisor_socket).log_path(name, stderr)
    except KeyError:
        print(f"tp: no process or group named {name} (see `tp status`)", file=sys.stderr)
        return 1
    except OSError:
        # supervisord is down: the files are still there (supervisord.conf names them var/log/...).
        suffix = "err" if stderr else "out"
        log_dir = config.supervisor_socket.parent.parent / "log"
        paths = sorted(str(p) for p in log_dir.glob(f"{name.split(':')[-1]}*.{suffix}.log"))
        if not paths:
            print(f"tp: supervisord is not running and {log_dir} has no {name}*.{suffix}.log", file=sys.stderr)
            return 1
    paths = [p for p in paths if p and p != "none"]
    if not paths:
        print(f"tp: {name} has no {'stderr' if stderr else 'stdout'} log file", file=sys.stderr)
        return 1
    argv = ["tail", "-n", str(lines)] + (["-F"] if follow else []) + paths
    os.execvp("tail", argv)


def _check(conf: str | None) -> int:
    from ..ops.check import run_checks

    return asyncio.run(run_checks(dict(os.environ), Path(conf) if conf else None))


def _supervise(conf: str | None) -> NoReturn:
    """supervisord in the foreground (the unit's ExecStart), with what supervisord.conf reads from the
    environment settled first: TP_API_PROCESSES as a count (unset or `max`: one per CPU), PORT and
    TP_HOST at the programs' defaults (TP_HOST's is the profile's). Refuses to start without
    PROMETHEUS_MULTIPROC_DIR: without it every process keeps its own registry and /metrics loses the
    whole-host view."""
    env = dict(os.environ)
    try:
        env["TP_API_PROCESSES"] = str(api_processes(env))
    except ConfigError as exc:
        config_failure("tp", exc)
    if not env.get("PROMETHEUS_MULTIPROC_DIR", "").strip():
        config_failure("tp", ConfigError("PROMETHEUS_MULTIPROC_DIR", "is not set: every process would keep its own "
                                         "metrics and /metrics would lose the worker's and the other members'"))
    try:
        env["TP_HOST"] = api_host(env)  # the profile's default when unset (production: loopback)
    except ConfigError as exc:
        config_failure("tp", exc)
    if not env.get("PORT", "").strip():
        env["PORT"] = "3000"
    path = find_conf(env, Path(conf) if conf else None)
    if not path.exists():
        config_failure("tp", ConfigError("TP_SUPERVISORD_CONF", f"{path} not found (pass --conf)"))
    own = Path(sys.executable).parent / "supervisord"
    binary = str(own) if own.exists() else "supervisord"
    sys.stdout.flush()
    os.execvpe(binary, [binary, "--nodaemon", "--configuration", str(path)], env)


def _init(args: argparse.Namespace) -> int:
    request = InitRequest(prefix=Path(args.prefix), user=args.user, database_url=args.database_url,
                          redis_url=args.redis_url, jwt_secret=args.jwt_secret, encryption_key=args.encryption_key,
                          port=args.port, host=args.host, api_processes=args.api_processes, keep_env=args.keep_env)
    try:
        layout, written = lay_out_host(request)
    except InitRefused as exc:
        print(exc, file=sys.stderr)
        return exc.exit_status
    for path in written:
        print(f"wrote {path}")
    print(f"directories: {layout.data_dir} (TDLib: {layout.tdlib_dir}), {layout.log_dir}, {layout.run_dir}")
    print(f"next: check {layout.env_file} (DATABASE_URL, REDIS_URL, TDLIB_API_ID/TDLIB_API_HASH), then\n"
          f"  {layout.bin_dir / 'tp'} --env-file {layout.env_file} migrate\n"
          f"  {layout.bin_dir / 'tp'} --env-file {layout.env_file} check\n"
          f"  systemctl daemon-reload && systemctl enable --now {layout.unit_file.name}")
    return 0


def _clone_roots() -> list[Path]:
    """The development clone this `tp` belongs to, if any: the one holding its virtualenv
    (scripts/run's .venv) or its source (an editable install). Never the working directory."""
    roots = [Path(sys.prefix).absolute().parent, Path(__file__).resolve().parents[2]]
    return [root for root in dict.fromkeys(roots) if (root / "supervisord.conf").exists()]


def load_deployment_env(environ: dict[str, str] | os._Environ[str] = os.environ,
                        env_file: Path | None = None) -> Path | None:
    """Fill what the environment lacks from one file; the environment always wins. --env-file names
    it (the unit's EnvironmentFile); else var/run/tp.env, the exports scripts/run wrote for this
    tp's own clone (so `tp` works in an operator's shell, from any directory)."""
    if env_file is not None:
        try:
            values = parse_env_file(env_file.read_text())
        except OSError as exc:
            config_failure("tp", ConfigError("--env-file", f"cannot read {env_file} ({exc.strerror or exc})"))
        for key, value in values.items():
            environ.setdefault(key, value)
        return env_file
    candidates = [root / "var" / "run" / "tp.env" for root in _clone_roots()]
    if environ.get("TP_SUPERVISOR_SOCKET"):
        candidates.insert(0, Path(environ["TP_SUPERVISOR_SOCKET"]).parent / "tp.env")
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            if len(words) == 2 and words[0] == "export" and "=" in words[1]:
                key, _, value = words[1].partition("=")
                environ.setdefault(key, value)
        return path
    return None


def main(argv: list[str] | None = None) -> None:
    parser = add_version_option(argparse.ArgumentParser(prog="tp", description="Operate telegram-platform."))
    parser.add_argument("--env-file", type=Path, metavar="FILE",
                        help="read settings from FILE (KEY=value lines, e.g. /etc/telegram-platform/env) for what "
                             "the environment does not set")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="lay out a host from the installed package: configuration, directories, "
                                       "the systemd unit (docs/deployment.md)")
    init.add_argument("--prefix", default="/", help="root of the layout (default /; any directory for a trial)")
    init.add_argument("--user", help="the service user (default: telegram-platform as root, else you)")
    init.add_argument("--database-url")
    init.add_argument("--redis-url")
    init.add_argument("--jwt-secret", help="default: generated")
    init.add_argument("--encryption-key", help="64 hex digits; default: generated")
    init.add_argument("--port", type=int)
    init.add_argument("--host")
    init.add_argument("--api-processes", help="a number, or max (one per CPU, the default)")
    init.add_argument("--keep-env", action="store_true",
                      help="the env file exists: keep it, write supervisord.conf and the unit again (an upgrade)")
    supervise = sub.add_parser("supervise", help="run supervisord in the foreground (the systemd unit's ExecStart)")
    supervise.add_argument("--conf", help="supervisord.conf (default: TP_SUPERVISORD_CONF, ./supervisord.conf)")
    sub.add_parser("migrate", help="apply pending database migrations")
    create = sub.add_parser("create-user", help="create an API user")
    create.add_argument("--username", required=True)
    create.add_argument("--role", choices=("admin", "operator", "viewer"), default="admin")
    create.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    check = sub.add_parser("check", help="pre-deployment check: one line per check, exit 0 only when all pass")
    check.add_argument("--conf", help="supervisord.conf to validate (default: TP_SUPERVISORD_CONF, ./supervisord.conf)")
    status = sub.add_parser("status", help="every process: state, pid, uptime, restarts, memory, CPU")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--cpu-interval", type=float, default=0.5, help="CPU sampling window in s (0: no CPU)")
    reload = sub.add_parser("reload", help="rolling, zero-downtime reload of the API group")
    reload.add_argument("--worker", action="store_true", help="then restart the worker too (it drains first)")
    for name, text in (("restart", "restart gracefully (a group rolls one member at a time)"),
                       ("stop", "stop (drain) and keep stopped"), ("start", "start and wait until ready")):
        command = sub.add_parser(name, help=f"{text}: a program, a group or a member")
        command.add_argument("name")
    hosts = sub.add_parser("hosts", help="every host of the platform: state (up, draining, gone), accounts "
                                         "owned, Telegram clients, memory, last heartbeat")
    hosts.add_argument("--json", action="store_true", help="machine-readable output")
    accounts = sub.add_parser("accounts", help="Telegram accounts across hosts")
    accounts_sub = accounts.add_subparsers(dest="accounts_command", required=True)
    move = accounts_sub.add_parser("move", help="move a logged-in account to another host (no new login)")
    move.add_argument("account_id", type=int, metavar="ID")
    move.add_argument("--to", required=True, metavar="HOST", help="TP_HOST_ID of an up host")
    drain = sub.add_parser("drain", help="hand every account of a host to the up hosts; it takes no new ones")
    drain.add_argument("host", metavar="HOST", help="TP_HOST_ID of the host")
    drain.add_argument("--undo", action="store_true", help="stop draining: the host takes accounts again")
    logs = sub.add_parser("logs", help="show a program's log (a group: all its members)")
    logs.add_argument("name")
    logs.add_argument("--err", action="store_true", help="the stderr log")
    logs.add_argument("-n", type=int, default=100, dest="lines")
    logs.add_argument("-f", "--follow", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "init":
        sys.exit(_init(args))
    load_deployment_env(env_file=args.env_file)

    if args.command == "supervise":
        _supervise(args.conf)

    if args.command == "check":
        sys.exit(_check(args.conf))
    if args.command == "status":
        sys.exit(_status(args.json, args.cpu_interval))
    if args.command == "reload":
        sys.exit(_operate(_reload, "worker" if args.worker else ""))
    if args.command in ("restart", "stop", "start"):
        sys.exit(_operate({"restart": _restart, "stop": _stop, "start": _start}[args.command], args.name))
    if args.command == "logs":
        sys.exit(_logs(args.name, args.err, args.lines, args.follow))
    if args.command == "create-user":
        password = _read_password(args)
        settings = _settings_for_ops()
        sys.exit(asyncio.run(_create_user(settings, args.username, args.role, password)))
    try:
        settings = Settings.from_env(app_mode="cli")
    except ConfigError as exc:
        config_failure("tp", exc)
    if args.command == "migrate":
        from ..logs import configure_logging

        configure_logging(level=settings.logging.level, fmt=settings.logging.format, process="tp")
        sys.exit(asyncio.run(_migrate(settings)))
    if args.command == "hosts":
        sys.exit(asyncio.run(_hosts(settings, args.json)))
    if args.command == "accounts":
        sys.exit(asyncio.run(_move(settings, args.account_id, args.to)))
    if args.command == "drain":
        sys.exit(asyncio.run(_drain(settings, args.host, not args.undo)))


if __name__ == "__main__":
    main()
