"""The errors that mean a server the platform depends on is not there, one definition each.

Callers react to an outage differently (an API request answers 503, a job retries later, a listener
reconnects), but what counts as one is decided here, once. A leaf module: it imports only the
drivers.
"""

from __future__ import annotations

from typing import Final

import asyncpg
import redis.exceptions

# Redis refused, dropped or did not answer a command (redis-py wraps most socket errors, not all),
# is still loading its data (LOADING: a ConnectionError in redis-py), or refuses writes for now:
# out of memory (OOM) or a read-only replica (READONLY). See also `redis_unavailable` (MISCONF).
_REDIS_REFUSING: Final[tuple[type[BaseException], ...]] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)
REDIS_DOWN: Final[tuple[type[BaseException], ...]] = (*_REDIS_REFUSING, OSError)

# PostgreSQL is not there (yet), is going away (an administrator's or a crash's shutdown), or
# refuses writes for now (a read-only standby or transaction mode, a full disk): worth waiting out
# at start, and retrying later.
_POSTGRES_REFUSING: Final[tuple[type[BaseException], ...]] = (
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.DiskFullError,
)
POSTGRES_DOWN: Final[tuple[type[BaseException], ...]] = (OSError, *_POSTGRES_REFUSING)

# Either of them, or a call to one that ran past its deadline.
SERVICES_DOWN: Final[tuple[type[BaseException], ...]] = (*POSTGRES_DOWN, *REDIS_DOWN, TimeoutError)

# What the API answers with 503 and Retry-After (with `is_outage`). Only connection errors among
# OSErrors (refused, reset, aborted, a broken pipe): any other OSError in a request is the
# process's own fault, a 500.
ANSWERED_UNAVAILABLE: Final[tuple[type[BaseException], ...]] = (
    *_REDIS_REFUSING, *_POSTGRES_REFUSING, ConnectionError, TimeoutError)

# Redis errors that mean "not now" whatever class redis-py gives them: MISCONF (a failed snapshot
# stops writes) has none of its own, and a Lua script may pass the others on as plain errors.
_REDIS_REFUSALS: Final = ("OOM ", "MISCONF ", "READONLY ", "LOADING ", "MASTERDOWN ")


def _redis_refusal(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(_REDIS_REFUSALS)


def redis_unavailable(exc: BaseException) -> bool:
    """Whether Redis is away or refuses writes for now: wait and retry, never a failure of the work."""
    return isinstance(exc, REDIS_DOWN) or _redis_refusal(exc)


def is_outage(exc: BaseException) -> bool:
    """What the API answers with 503 and Retry-After."""
    return isinstance(exc, ANSWERED_UNAVAILABLE) or _redis_refusal(exc)
