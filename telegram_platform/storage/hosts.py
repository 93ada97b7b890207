"""The platform's hosts as PostgreSQL remembers them (migration 0014): when each was first and last
seen, whether it is draining, and the accounts it owns (`accounts.owner_host`).

A host's state is judged here from PostgreSQL's own clock (`now()`), never a host's: the heartbeats
of every host and the reading of them share one clock, so a host whose clock is off is judged right.
"""

from __future__ import annotations

from typing import Any

from ..states import HostState
from ..telegram.base import AuthState
from .db import Queryable

# Each worker child of a host announces it this often (worker/child.py): TP_HOST_GONE_SECONDS'
# floor (10 s) leaves a heartbeat or two of slack before a live host could look gone.
HEARTBEAT_SECONDS = 5.0


async def announce(conn: Queryable, host_id: str) -> None:
    """This host is alive now (a heartbeat): registered at its first, `last_seen` moved at each."""
    await conn.execute("INSERT INTO hosts (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET last_seen = now()",
                       host_id)


async def list_hosts(conn: Queryable, *, gone_after: float) -> list[dict[str, Any]]:
    """Every host ever seen, by id: its state, first and last heartbeat (and its age in seconds, by
    PostgreSQL's clock), and the logged-in accounts it owns."""
    rows = await conn.fetch(
        """SELECT h.id, h.first_seen, h.last_seen, h.draining_since,
                  CASE WHEN h.last_seen < now() - make_interval(secs => $1) THEN $2
                       WHEN h.draining_since IS NOT NULL THEN $3 ELSE $4 END AS state,
                  extract(epoch FROM now() - h.last_seen)::float8 AS heartbeat_age_seconds,
                  coalesce(o.owned, 0) AS accounts_owned
           FROM hosts h
           LEFT JOIN (SELECT owner_host, count(*) AS owned FROM accounts WHERE owner_host IS NOT NULL
                      GROUP BY owner_host) o ON o.owner_host = h.id
           ORDER BY h.id""",
        gone_after, HostState.GONE, HostState.DRAINING, HostState.UP)
    return [dict(row) for row in rows]


async def count_without_owner(conn: Queryable, *, gone_after: float) -> int:
    """Logged-in accounts no live host owns: no `owner_host` (closed and not reopened yet) or an
    owner whose heartbeat is older than `gone_after`. The orphan scan (worker/account_sessions.py)
    opens these; one that stays here is an account nobody serves."""
    value = await conn.fetchval(
        """SELECT count(*) FROM accounts a LEFT JOIN hosts h ON h.id = a.owner_host
           WHERE a.auth_state IN ($2, $3)
             AND (h.id IS NULL OR h.last_seen < now() - make_interval(secs => $1))""",
        gone_after, AuthState.READY, AuthState.CLOSED)
    return int(value)


async def state_of(conn: Queryable, host_id: str, *, gone_after: float) -> str | None:
    """The host's state now (None: never seen)."""
    value = await conn.fetchval(
        """SELECT CASE WHEN last_seen < now() - make_interval(secs => $2) THEN $3
                       WHEN draining_since IS NOT NULL THEN $4 ELSE $5 END
           FROM hosts WHERE id = $1""",
        host_id, gone_after, HostState.GONE, HostState.DRAINING, HostState.UP)
    return None if value is None else str(value)


async def set_draining(conn: Queryable, host_id: str, draining: bool) -> bool:
    """Start (or stop) draining the host; the first start's time is kept. False: no such host."""
    result = await conn.execute(
        "UPDATE hosts SET draining_since = CASE WHEN $2 THEN coalesce(draining_since, now()) END WHERE id = $1",
        host_id, draining)
    return result != "UPDATE 0"
