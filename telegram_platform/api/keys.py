"""Typed application state: every resource an API process holds, under one `web.AppKey` each."""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from ..metrics.definitions import Metrics
from ..queue.jobs import Enqueuer
from ..redis_auth import RedisAuth
from ..settings import Settings
from ..storage.files import FileStore
from .journal import RequestJournal
from .pipeline import Pipeline
from .scrape import ScrapeCache
from .security import Passwords, TokenService

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", asyncpg.Pool)
# Files' metadata in DB, their bytes in the store TP_FILE_STORE names (storage/files.py).
FILES = web.AppKey("files", FileStore)
REDIS = web.AppKey("redis", aioredis.Redis)
ENQUEUER = web.AppKey("enqueuer", Enqueuer)
# MACs and seals for what crosses Redis (redis_auth.py): events, revocations, account requests.
REDIS_AUTH = web.AppKey("redis_auth", RedisAuth)
TOKENS = web.AppKey("tokens", TokenService)
PASSWORDS = web.AppKey("passwords", Passwords)
# The one `Metrics` of this process (metrics/definitions.py): HTTP counts through the journal, GET /metrics.
METRICS = web.AppKey("metrics", Metrics)
# Each answered request's log line and metrics, written in batches (api/journal.py).
JOURNAL = web.AppKey("journal", RequestJournal)
# The request path every route takes (api/pipeline.py); `serve()` tells it when the member drains.
PIPELINE = web.AppKey("pipeline", Pipeline)
# The scrape-time reads of GET /metrics, one round at a time and kept a second (api/scrape.py).
SCRAPES = web.AppKey("scrapes", ScrapeCache)
