"""The retention purge: a worker child's periodic task that deletes finished rows older than their
retention (TP_RETENTION_*; 0 keeps them forever), batch by batch (storage/retention.py).

One purger at a time in the whole deployment: a round runs only in the child that gets a
PostgreSQL advisory lock without waiting, the others skip it. A round deletes until a table has
nothing left to purge, or until it has run `max_batches` batches of it (a large backlog, after
retention is first enabled or shortened, is spread over rounds).
"""

from __future__ import annotations

import asyncpg
import structlog

from ..metrics.definitions import Metrics
from ..settings import RetentionSettings
from ..storage import retention as store

log = structlog.get_logger(__name__)

PURGE_EVERY_SECONDS = 300.0
PURGE_FIRST_AFTER_SECONDS = 60.0
PURGE_BATCH = 1000
MAX_BATCHES_PER_ROUND = 100
# pg_try_advisory_lock(bigint): "tp-purge" in ASCII; distinct from the migrations' key, and from
# the two-int locks of worker identities (another lock space).
PURGE_LOCK_KEY = 0x74702D7075726765


class Purger:
    """Runs purge rounds; `batch` and `max_batches` are the round's bounds (tests make them small)."""

    def __init__(self, pool: asyncpg.Pool, retention: RetentionSettings, metrics: Metrics | None = None, *,
                 batch: int = PURGE_BATCH, max_batches: int = MAX_BATCHES_PER_ROUND) -> None:
        self._pool = pool
        self._metrics = metrics
        self._batch = batch
        self._max_batches = max_batches
        self._retention = {store.WEBHOOK_DELIVERIES: retention.webhook_deliveries,
                           store.INCOMING_MESSAGES: retention.incoming, store.MESSAGES: retention.messages,
                           store.REFRESH_TOKENS: retention.refresh_tokens}

    async def run_once(self) -> dict[str, tuple[int, int]] | None:
        """One round: {table: (rows deleted, batches run)}, or None when another process purges."""
        async with self._pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1::bigint)", PURGE_LOCK_KEY):
                return None
            try:
                done = {table: await self._purge(conn, table, seconds)
                        for table, seconds in self._retention.items() if seconds > 0}
            finally:
                try:
                    await conn.execute("SELECT pg_advisory_unlock($1::bigint)", PURGE_LOCK_KEY)
                except BaseException:
                    # The pool does not reset sessions (storage/db.py): a lock left held would stay
                    # with this connection. Closing it releases the lock.
                    conn.terminate()
                    raise
        purged = {table: rows for table, (rows, _) in done.items() if rows}
        if purged:
            log.info("retention purge", purged=purged)
        return done

    async def _purge(self, conn: asyncpg.Connection, table: str, seconds: float) -> tuple[int, int]:
        rows = batches = 0
        while batches < self._max_batches:
            deleted = await store.purge_batch(conn, table, seconds, self._batch)
            batches += 1
            rows += deleted
            if deleted and self._metrics is not None:
                self._metrics.purged_rows.labels(table).inc(deleted)
            if deleted < self._batch:
                break
        return rows, batches
