"""`tp`: the operator's command line (migrate, create-user, check, status, reload, restart, logs)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from ..ops.supervisor import SupervisorClient
from ..settings import ConfigError, Settings
from .common import config_failure, load_settings


def _settings_for_ops() -> Settings:
    return load_settings("tp", "cli")


async def _migrate(settings: Settings) -> int:
    from ..storage.db import open_pool
    from ..storage.migrations import migrate

    async with open_pool(settings, min_size=1, max_size=1) as pool, pool.acquire() as conn:
        applied = await migrate(conn)
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


def _status(settings: Settings) -> int:
    client = SupervisorClient(settings.supervisor_socket)
    rows = [("NAME", "STATE", "PID", "UPTIME", "MEMORY")]
    for p in client.processes():
        rss = p.rss_bytes
        rows.append((p.name, p.state, str(p.pid or "-"), _duration(p.uptime) if p.uptime else "-",
                     f"{rss / 2**20:.1f} MiB" if rss else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _logs(settings: Settings, name: str, stderr: bool, lines: int, follow: bool) -> int:
    path = SupervisorClient(settings.supervisor_socket).log_path(name, stderr)
    argv = ["tail", "-n", str(lines)] + (["-F"] if follow else []) + [path]
    os.execvp("tail", argv)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tp", description="Operate telegram-platform.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply pending database migrations")
    create = sub.add_parser("create-user", help="create an API user")
    create.add_argument("--username", required=True)
    create.add_argument("--role", choices=("admin", "operator", "viewer"), default="admin")
    create.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    sub.add_parser("check", help="pre-deployment check: exit 0 only when the deployment is sound")
    sub.add_parser("status", help="every process: state, pid, uptime, memory")
    sub.add_parser("reload", help="rolling, zero-downtime reload of the API group")
    restart = sub.add_parser("restart", help="restart one program or process")
    restart.add_argument("name")
    stop = sub.add_parser("stop", help="stop one program or process")
    stop.add_argument("name")
    logs = sub.add_parser("logs", help="show a program's log")
    logs.add_argument("name")
    logs.add_argument("--err", action="store_true", help="the stderr log")
    logs.add_argument("-n", type=int, default=100, dest="lines")
    logs.add_argument("-f", "--follow", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "check":
        from ..ops.check import run_checks

        try:
            settings = Settings.from_env(app_mode="cli")
        except ConfigError as exc:
            print(f"FAIL environment: {exc}")
            sys.exit(1)
        sys.exit(asyncio.run(run_checks(settings)))
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

        configure_logging(level=settings.log_level, fmt=settings.log_format, process="tp")
        sys.exit(asyncio.run(_migrate(settings)))
    if args.command == "status":
        sys.exit(_status(settings))
    if args.command == "reload":
        started = time.monotonic()
        done = SupervisorClient(settings.supervisor_socket).rolling_restart()
        print(f"reloaded {len(done)} API processes in {time.monotonic() - started:.1f}s: {', '.join(done)}")
        sys.exit(0)
    if args.command == "restart":
        SupervisorClient(settings.supervisor_socket).restart(args.name)
        sys.exit(0)
    if args.command == "stop":
        SupervisorClient(settings.supervisor_socket).stop(args.name)
        sys.exit(0)
    if args.command == "logs":
        sys.exit(_logs(settings, args.name, args.err, args.lines, args.follow))
