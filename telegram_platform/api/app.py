"""The API application factory and its runner.

`create_app(settings)` is what `tp-api` serves and what the tests call. Every resource is a
cleanup context: opened at start, closed at stop, in reverse order. `create_metrics_app(app)` is
GET /metrics alone, served on TP_METRICS_LISTEN when that is set.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from ..metrics.definitions import create_metrics
from ..ops.member import MemberLifecycle
from ..queue.jobs import Enqueuer
from ..redis_auth import RedisAuth
from ..settings import ConfigError, Settings
from ..storage.accounts import seal_clear_proxy_credentials
from ..storage.db import open_pool
from ..storage.files import FileStore, open_blob_store
from ..storage.migrations import ensure_schema
from ..storage.redis import open_redis
from ..telegram.formatting import configure_logging as configure_tdlib_logging
from ..tls import server_context
from . import openapi, revocations, ws
from .journal import RequestJournal
from .keys import (
    DB,
    ENQUEUER,
    FILES,
    JOURNAL,
    METRICS,
    PASSWORDS,
    PIPELINE,
    REDIS,
    REDIS_AUTH,
    SCRAPES,
    SETTINGS,
    TOKENS,
)
from .pipeline import Pipeline
from .routes import (
    accounts,
    auth,
    campaigns,
    debug,
    files,
    health,
    hosts,
    incoming,
    messages,
    optouts,
    processes,
    queues,
    users,
    webhooks,
)
from .routes import metrics as metrics_routes
from .scrape import ScrapeCache
from .security import Passwords, TokenService

log = structlog.get_logger(__name__)

# A database or Redis that stops answering costs a request at most about this long, then 503.
DB_COMMAND_TIMEOUT = 10.0
DB_CONNECT_TIMEOUT = 5.0
REDIS_COMMAND_TIMEOUT = 12.0

ROUTE_MODULES = (health, auth, accounts, messages, files, incoming, campaigns, optouts, openapi, metrics_routes,
                 users, queues, webhooks, ws, processes, hosts)


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with open_pool(settings, command_timeout=DB_COMMAND_TIMEOUT, connect_timeout=DB_CONNECT_TIMEOUT) as pool:
        async with pool.acquire() as conn:
            await ensure_schema(conn, auto_migrate=settings.database.auto_migrate)
            await seal_clear_proxy_credentials(conn, settings.encryption_key)  # migration 0010's leftovers
        app[DB] = pool
        yield


async def _files(app: web.Application) -> AsyncIterator[None]:
    # An S3 store is checked at start: credentials it refuses stop the process (ConfigError), not a request.
    async with open_blob_store(app[SETTINGS].files) as blobs:
        app[FILES] = FileStore(app[DB], blobs)
        yield


async def _redis(app: web.Application) -> AsyncIterator[None]:
    # Commands are bounded (an unanswering Redis gives 503, not a hang); above call_host's 10 s BLPOP.
    async with open_redis(app[SETTINGS].redis, socket_timeout=REDIS_COMMAND_TIMEOUT) as client:
        app[REDIS] = client
        app[ENQUEUER] = Enqueuer(client)
        yield


async def _journal(app: web.Application) -> AsyncIterator[None]:
    async with app[JOURNAL].running():  # flushed periodically, and a last time at the end
        yield


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.api.max_body_bytes, handler_args={"max_field_size": 16384})
    app[SETTINGS] = settings
    # Message text is parsed by TDLib in this process (telegram/formatting.py): its log stays quiet.
    configure_tdlib_logging(settings.tdlib.log_verbosity)
    app[TOKENS] = TokenService(settings.auth.jwt_secret, settings.auth.access_token_ttl)
    app[PASSWORDS] = Passwords()
    metrics = app[METRICS] = create_metrics(settings.metrics_dir)
    app[REDIS_AUTH] = RedisAuth(settings.encryption_key, count_refused=metrics.count_redis_refused)
    journal = app[JOURNAL] = RequestJournal.for_this_process(metrics)
    app[PIPELINE] = pipeline = Pipeline(app[TOKENS], journal, metrics.websocket_connections)
    app[SCRAPES] = ScrapeCache()
    app.cleanup_ctx.extend([_journal, _database, _files, _redis, ws.event_hub, revocations.revocations])
    app.on_shutdown.append(ws.close_clients)
    for module in ROUTE_MODULES:
        if module is metrics_routes and settings.api.metrics_listen is not None:
            continue  # served on its own address (create_metrics_app), not on the API port
        module.api.install(app, pipeline)
    if settings.api.debug_endpoints:  # test-only routes; Settings refuses them in production
        debug.install(app, pipeline)
    pipeline.install_fallback(app)
    return app


def create_metrics_app(app: web.Application) -> web.Application:
    """GET /metrics alone, over `app`'s started resources (its pools, journal and scrape cache), for
    TP_METRICS_LISTEN: the rest of the API is not reachable there."""
    metrics_app = web.Application()
    metrics_app[SETTINGS] = app[SETTINGS]
    metrics_app[METRICS] = app[METRICS]
    metrics_app[JOURNAL] = app[JOURNAL]
    metrics_app[SCRAPES] = app[SCRAPES]
    if DB in app:
        metrics_app[DB] = app[DB]
    if REDIS in app:
        metrics_app[REDIS] = app[REDIS]
    pipeline = Pipeline(app[TOKENS], app[JOURNAL], app[METRICS].websocket_connections)
    metrics_routes.api.install(metrics_app, pipeline)
    pipeline.install_fallback(metrics_app)
    return metrics_app


async def _start_metrics_site(settings: Settings, app: web.Application) -> web.AppRunner | None:
    """Every member binds TP_METRICS_LISTEN with SO_REUSEPORT: the kernel hands each scrape to one of
    them, a member that stops or restarts leaves the others serving, and old and new members of a
    rolling reload hold it together (the metrics are the whole host's, whichever member answers)."""
    if settings.api.metrics_listen is None:
        return None
    runner = web.AppRunner(create_metrics_app(app), shutdown_timeout=settings.api.drain_seconds, access_log=None,
                           handle_signals=False)
    await runner.setup()
    host, port = settings.api.metrics_listen
    try:
        await web.TCPSite(runner, host, port, reuse_port=True).start()
    except OSError as exc:  # held by another user's or a non-sharing socket, or no such address here
        await runner.cleanup()
        raise ConfigError("TP_METRICS_LISTEN", f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    return runner


async def serve(settings: Settings, app: web.Application | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, finish requests in flight within
    `api_drain_seconds`, close WebSockets and pools."""
    app = app or create_app(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    member = MemberLifecycle(settings, on_drain=app[PIPELINE].start_draining)
    runner = web.AppRunner(app, shutdown_timeout=settings.api.drain_seconds, access_log=None,
                           handle_signals=False)
    await runner.setup()
    tls = (server_context(settings.api.tls_cert, settings.api.tls_key)
           if settings.api.tls_cert is not None and settings.api.tls_key is not None else None)
    site: web.BaseSite
    if settings.api.listen_fd is not None:
        # supervisord's [fcgi-program] opened the socket once and handed it to every member: the
        # accept queue outlives any one member's restart. TLS is each member's, over that socket.
        sock = socket.socket(fileno=settings.api.listen_fd)
        sock.setblocking(False)
        site = web.SockSite(runner, sock, ssl_context=tls)
    else:
        site = web.TCPSite(runner, settings.api.host, settings.api.port, reuse_port=True, backlog=1024,
                           ssl_context=tls)
    await site.start()
    metrics_runner = await _start_metrics_site(settings, app)
    # Its own unix socket too, where a rolling reload sees this member answer (ops/member.py).
    ready_site = await member.start_readiness_site(runner)
    log.info("api serving", address=site.name, readiness=ready_site.name if ready_site else None,
             metrics=[s.name for s in metrics_runner.sites] if metrics_runner else None, tls=tls is not None,
             telegram_backend=settings.telegram_backend, profile=settings.profile)
    await stop.wait()
    log.info("api stopping: draining requests in flight", deadline_s=settings.api.drain_seconds)
    if metrics_runner is not None:  # first: the other members answer the next scrapes
        await metrics_runner.cleanup()
    await member.drain(runner)
    log.info("api stopped")
    return 0
