"""The errors that mean a server the platform depends on is not there, one definition each.

Callers react to an outage differently (an API request answers 503, a job retries later, a listener
reconnects), but what counts as one is decided here, once. A leaf module: it imports only the
drivers.
"""

from __future__ import annotations

from typing import Final

import asyncpg
import redis.exceptions

# Redis refused, dropped or did not answer a command (redis-py wraps most socket errors, not all).
REDIS_DOWN: Final[tuple[type[BaseException], ...]] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)

# PostgreSQL is not there (yet): worth waiting out at start, and retrying later.
POSTGRES_DOWN: Final[tuple[type[BaseException], ...]] = (
    OSError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
)

# Either of them, or a call to one that ran past its deadline.
SERVICES_DOWN: Final[tuple[type[BaseException], ...]] = (*POSTGRES_DOWN, *REDIS_DOWN, TimeoutError)

# What the API answers with 503 and Retry-After. Only connection errors among OSErrors: any other
# OSError in a request is the process's own fault, a 500.
ANSWERED_UNAVAILABLE: Final[tuple[type[BaseException], ...]] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    ConnectionRefusedError,
    TimeoutError,
)
