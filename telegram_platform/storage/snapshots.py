"""Accounts' state snapshots (migration 0015): written only by the account's current owner.

Every write names the owner token the writer took (`accounts.owner_token`, storage/accounts.py) and
locks the account's row FOR SHARE while it checks it: a new owner's `take_ownership` (an UPDATE of
that row) then either comes first, and the stale owner's write finds its token outdated and changes
nothing, or waits until the write is committed, so the new owner reads it when it restores.
A write also names the generation it follows: two writes of one owner cannot both land on it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from .db import Queryable


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    """What PostgreSQL holds for an account; `sha256` None: discarded (the account logged out)."""

    generation: int
    backend: str
    sha256: bytes | None
    size_bytes: int
    taken_at: dt.datetime

    @property
    def discarded(self) -> bool:
        return self.sha256 is None


async def latest(conn: Queryable, account_id: int) -> StoredSnapshot | None:
    """The account's snapshot without its bytes (None: none was ever taken)."""
    row = await conn.fetchrow("SELECT generation, backend, sha256, size_bytes, taken_at FROM account_snapshots "
                              "WHERE account_id = $1", account_id)
    if row is None:
        return None
    return StoredSnapshot(int(row["generation"]), str(row["backend"]),
                          bytes(row["sha256"]) if row["sha256"] is not None else None,
                          int(row["size_bytes"]), row["taken_at"])


async def sealed_bytes(conn: Queryable, account_id: int, generation: int) -> bytes | None:
    """The sealed bytes of that generation (None: it is no longer the latest, or was discarded)."""
    value = await conn.fetchval("SELECT sealed FROM account_snapshots WHERE account_id = $1 AND generation = $2",
                                account_id, generation)
    return bytes(value) if value is not None else None


async def put(conn: Queryable, account_id: int, *, owner_token: int, generation: int, backend: str,
              sealed: bytes, sha256: bytes) -> bool:
    """Store `generation` (the stored one plus 1, or 1 for the first) as written by the owner
    `owner_token`; False when refused: another host owns the account now, or another snapshot took
    that generation first."""
    stored = await conn.fetchval(
        """WITH owner AS (SELECT id FROM accounts WHERE id = $1 AND owner_token = $2 FOR SHARE)
           INSERT INTO account_snapshots AS s (account_id, generation, owner_token, backend, sealed, sha256,
                                               size_bytes, taken_at)
           SELECT id, $3, $2, $4, $5, $6, $7, now() FROM owner
           ON CONFLICT (account_id) DO UPDATE
              SET generation = EXCLUDED.generation, owner_token = EXCLUDED.owner_token,
                  backend = EXCLUDED.backend, sealed = EXCLUDED.sealed, sha256 = EXCLUDED.sha256,
                  size_bytes = EXCLUDED.size_bytes, taken_at = EXCLUDED.taken_at
            WHERE s.generation = EXCLUDED.generation - 1
           RETURNING generation""",
        account_id, owner_token, generation, backend, sealed, sha256, len(sealed))
    return stored is not None


async def discard(conn: Queryable, account_id: int, *, owner_token: int) -> int | None:
    """Forget the account's stored state (it logged out, or its login starts over), so no host
    resumes it: the bytes go, the generation grows. The new generation, or None when there was
    nothing to discard or another host owns the account now."""
    value = await conn.fetchval(
        """WITH owner AS (SELECT id FROM accounts WHERE id = $1 AND owner_token = $2 FOR SHARE)
           UPDATE account_snapshots AS s
              SET generation = s.generation + 1, owner_token = $2, sealed = NULL, sha256 = NULL,
                  size_bytes = 0, taken_at = now()
             FROM owner
            WHERE s.account_id = owner.id AND s.sealed IS NOT NULL
           RETURNING s.generation""",
        account_id, owner_token)
    return int(value) if value is not None else None
