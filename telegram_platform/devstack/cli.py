"""The development stack's command line, used by scripts/run (`python -m telegram_platform.devstack`)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from ..metrics.files import wipe
from ..settings import EXIT_CONFIG
from .dev_secrets import ensure_dev_secrets
from .errors import DevStackError, ProductionRefusal
from .plan import plan_dev_stack, reachable_host, supervisor_running, wait_http_ok, write_programs


def _cmd_prepare(args: argparse.Namespace) -> int:
    root = Path(args.root).absolute()
    plan = plan_dev_stack(root, os.environ)
    write_programs(root / "var", plan.programs)
    # Once, before supervisord starts: the previous run's metrics files go (never wiped by a process
    # at its own start, which would erase the other processes' numbers).
    wipe(Path(plan.exports["PROMETHEUS_MULTIPROC_DIR"]))
    for key, value in plan.exports.items():
        print(f"export {key}={shlex.quote(value)}")
    for note in plan.notes:
        print(note, file=sys.stderr)
    return 0


def _cmd_secrets(args: argparse.Namespace) -> int:
    for key, value in ensure_dev_secrets(Path(args.var_dir)).items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _cmd_running(args: argparse.Namespace) -> int:
    return 0 if supervisor_running(Path(args.socket)) else 1


def _cmd_wait_http(args: argparse.Namespace) -> int:
    return 0 if wait_http_ok(args.url, args.timeout) else 1


def _cmd_health_url(args: argparse.Namespace) -> int:
    host = reachable_host(os.environ.get("TP_HOST", "0.0.0.0").strip())
    if ":" in host:
        host = f"[{host}]"
    print(f"http://{host}:{os.environ.get('PORT', '3000').strip() or '3000'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m telegram_platform.devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="set up var/, secrets, embedded servers; print exports")
    prepare.add_argument("--root", default=".", help="the clone's top directory")
    prepare.set_defaults(func=_cmd_prepare)
    secrets_cmd = sub.add_parser("secrets", help="print the dev secrets (generated once) as exports")
    secrets_cmd.add_argument("var_dir")
    secrets_cmd.set_defaults(func=_cmd_secrets)
    running = sub.add_parser("running", help="exit 0 when supervisord answers on SOCKET")
    running.add_argument("socket")
    running.set_defaults(func=_cmd_running)
    wait = sub.add_parser("wait-http", help="exit 0 once URL answers 200")
    wait.add_argument("url")
    wait.add_argument("--timeout", type=float, default=60.0)
    wait.set_defaults(func=_cmd_wait_http)
    base = sub.add_parser("base-url", help="print the local base URL of the API from PORT/TP_HOST")
    base.set_defaults(func=_cmd_health_url)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ProductionRefusal as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except DevStackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return code
