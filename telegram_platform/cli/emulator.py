"""`tp-emulator`: the Telegram emulator server, for development and tests."""

from __future__ import annotations

import argparse
from urllib.parse import urlsplit

from aiohttp import web

from ..logs import configure_logging
from ..telegram.emulator.server import EmulatorConfig, TelegramEmulator, create_emulator_app


def main() -> None:
    import os

    parser = argparse.ArgumentParser(prog="tp-emulator", description="Serve the Telegram emulator.")
    default_url = os.environ.get("TP_EMULATOR_URL", "http://127.0.0.1:3900")
    parser.add_argument("--host", default=urlsplit(default_url).hostname or "127.0.0.1")
    parser.add_argument("--port", type=int, default=urlsplit(default_url).port or 3900)
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    configure_logging(level="info", fmt=os.environ.get("TP_LOG_FORMAT", "auto"), process="emulator")
    emulator = TelegramEmulator(EmulatorConfig(latency_ms=args.latency_ms, seed=args.seed))
    web.run_app(create_emulator_app(emulator), host=args.host, port=args.port, access_log=None,
                print=None, shutdown_timeout=2)
