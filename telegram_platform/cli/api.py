"""`tp-api`: one API process."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..api.app import serve
from ..settings import ConfigError
from ..version import add_version_option
from .common import config_failure, load_settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="tp-api", description="Serve the REST API (one process).")
    add_version_option(parser).parse_args()
    settings = load_settings("tp-api", "api")
    try:
        status = asyncio.run(serve(settings))
    except ConfigError as exc:  # found at start, e.g. a schema behind the code
        config_failure("tp-api", exc)
    sys.exit(status)
