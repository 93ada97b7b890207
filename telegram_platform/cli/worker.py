"""`tp-worker`: the worker pool (one supervisord program; its children do the work)."""

from __future__ import annotations

import argparse
import sys

from ..worker.pool import WorkerPool
from .common import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="tp-worker", description="Run the worker pool.")
    parser.parse_args()
    settings = load_settings("tp-worker", "worker")
    sys.exit(WorkerPool(settings).run())
