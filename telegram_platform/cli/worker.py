"""`tp-worker`: the worker pool (one supervisord program; its children do the work)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..settings import ConfigError
from ..version import add_version_option
from ..worker.pool import WorkerPool, check_file_store, check_schema
from .common import config_failure, load_settings


def main() -> None:
    parser = add_version_option(argparse.ArgumentParser(prog="tp-worker", description="Run the worker pool."))
    parser.parse_args()
    settings = load_settings("tp-worker", "worker")
    try:
        asyncio.run(check_schema(settings))
        asyncio.run(check_file_store(settings))
    except ConfigError as exc:
        config_failure("tp-worker", exc)
    sys.exit(WorkerPool(settings).run())
