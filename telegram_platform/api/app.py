"""The API application factory and its runner.

`create_app(settings)` is what `tp-api` serves and what the tests call. Every resource is a
cleanup context: opened at start, closed at stop, in reverse order.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from ..queue.jobs import Enqueuer
from ..settings import Settings
from ..storage.db import open_pool
from ..storage.migrations import migrate
from ..storage.redis import open_redis
from .keys import DB, ENQUEUER, PASSWORDS, REDIS, SETTINGS, TOKENS
from .middleware import request_middleware
from .routes import accounts, auth, health, messages
from .security import Passwords, TokenService

log = structlog.get_logger(__name__)

ROUTE_MODULES = (health, auth, accounts, messages)


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with open_pool(settings) as pool:
        if settings.auto_migrate:
            async with pool.acquire() as conn:
                await migrate(conn)
        app[DB] = pool
        yield


async def _redis(app: web.Application) -> AsyncIterator[None]:
    async with open_redis(app[SETTINGS].redis_url) as client:
        app[REDIS] = client
        app[ENQUEUER] = Enqueuer(client)
        yield


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[request_middleware], client_max_size=settings.max_body_bytes,
                          handler_args={"max_field_size": 16384})
    app[SETTINGS] = settings
    app[TOKENS] = TokenService(settings.jwt_secret, settings.access_token_ttl)
    app[PASSWORDS] = Passwords()
    app.cleanup_ctx.extend([_database, _redis])
    for module in ROUTE_MODULES:
        module.api.install(app)
    return app


async def serve(settings: Settings, app: web.Application | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, finish requests in flight within
    `api_drain_seconds`, close WebSockets and pools."""
    app = app or create_app(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, shutdown_timeout=settings.api_drain_seconds, access_log=None,
                           handle_signals=False)
    await runner.setup()
    site: web.BaseSite
    if settings.listen_fd is not None:
        # supervisord's [fcgi-program] opened the socket once and handed it to every member: the
        # accept queue outlives any one member's restart.
        sock = socket.socket(fileno=settings.listen_fd)
        sock.setblocking(False)
        site = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=True, backlog=1024)
    await site.start()
    log.info("api serving", address=site.name, telegram_backend=settings.telegram_backend,
             profile=settings.profile)
    await stop.wait()
    log.info("api stopping: draining requests in flight", deadline_s=settings.api_drain_seconds)
    await runner.cleanup()
    log.info("api stopped")
    return 0
