"""`tp-api`: one API process."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..api.app import serve
from .common import load_settings


def main() -> None:
    argparse.ArgumentParser(prog="tp-api", description="Serve the REST API (one process).").parse_args()
    settings = load_settings("tp-api", "api")
    sys.exit(asyncio.run(serve(settings)))
