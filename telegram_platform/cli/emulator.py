"""`tp-emulator`: the Telegram emulator server, for development and tests."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from ..logs import configure_logging
from ..telegram.emulator.http import create_emulator_app
from ..telegram.emulator.model import EmulatorConfig, TelegramEmulator
from ..version import add_version_option


def main() -> None:
    parser = add_version_option(argparse.ArgumentParser(prog="tp-emulator", description="Serve the Telegram emulator."))
    default_url = os.environ.get("TP_EMULATOR_URL", "http://127.0.0.1:3900")
    parser.add_argument("--host", default=urlsplit(default_url).hostname or "127.0.0.1")
    parser.add_argument("--port", type=int, default=urlsplit(default_url).port or 3900)
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state", default=os.environ.get("TP_EMULATOR_STATE", ""),
                        help="keep users and sessions in this JSON file across restarts, as Telegram would")
    args = parser.parse_args()
    configure_logging(level="info", fmt=os.environ.get("TP_LOG_FORMAT", "auto"), process="emulator")
    emulator = TelegramEmulator(EmulatorConfig(latency_ms=args.latency_ms, seed=args.seed))
    app = create_emulator_app(emulator)
    if args.state:
        state = Path(args.state)
        if state.exists():
            emulator.restore(json.loads(state.read_text()))
        app.cleanup_ctx.append(_persisted(emulator, state))
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, shutdown_timeout=2)


def _persisted(emulator: TelegramEmulator, path: Path) -> Callable[[web.Application], AsyncIterator[None]]:
    """Save the state every second while it changes, and at stop."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        last = ""

        def save() -> None:
            nonlocal last
            data = json.dumps(emulator.snapshot())
            if data != last:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(data)
                tmp.replace(path)
                last = data

        async def keep_saving() -> None:
            while True:
                await asyncio.sleep(1)
                save()

        task = asyncio.create_task(keep_saving())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        save()

    return context
