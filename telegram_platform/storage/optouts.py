"""The opt-out list: peers who asked not to be messaged. Every campaign checks it before each send."""

from __future__ import annotations

import re
from typing import Any

from ..errors import NotFound
from .db import Queryable

_PHONE = re.compile(r"^\+[\d\s().-]{6,}$")
_USER_ID = re.compile(r"^-?[0-9]+$")

OPTOUT_COLUMNS = "peer_key, peer, reason, created_at"


def peer_key(peer: str) -> str:
    """One spelling per peer: usernames are case-insensitive, a phone keeps its digits only."""
    peer = peer.strip()
    if peer.startswith("@"):
        return peer.lower()
    if _PHONE.match(peer):
        return "+" + re.sub(r"\D", "", peer)
    if _USER_ID.match(peer):
        return peer
    return "@" + peer.lower()


async def add_optouts(conn: Queryable, peers: list[str], reason: str | None, created_by: int | None) -> int:
    """Add peers (already listed ones are left as they are); returns how many were new."""
    keys = [peer_key(p) for p in peers]
    result = await conn.execute(
        """INSERT INTO optouts (peer_key, peer, reason, created_by)
           SELECT k, p, $3, $4 FROM unnest($1::text[], $2::text[]) AS t(k, p)
           ON CONFLICT (peer_key) DO NOTHING""",
        keys, [p.strip() for p in peers], reason, created_by)
    return int(result.rsplit(" ", 1)[-1])


async def list_optouts(conn: Queryable, *, after: str | None, limit: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"""SELECT {OPTOUT_COLUMNS} FROM optouts WHERE ($1::text IS NULL OR peer_key > $1)
            ORDER BY peer_key LIMIT $2""",
        after, limit)
    return [dict(r) for r in rows]


async def get_optout(conn: Queryable, peer: str) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {OPTOUT_COLUMNS} FROM optouts WHERE peer_key = $1", peer_key(peer))
    if row is None:
        raise NotFound(f"{peer!r} has not opted out")
    return dict(row)


async def remove_optout(conn: Queryable, peer: str) -> None:
    result = await conn.execute("DELETE FROM optouts WHERE peer_key = $1", peer_key(peer))
    if result.endswith(" 0"):
        raise NotFound(f"{peer!r} has not opted out")
