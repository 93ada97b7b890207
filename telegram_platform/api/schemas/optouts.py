"""Peers that opted out of campaigns (`api/routes/optouts.py`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import msgspec

from telegram_platform.api.schemas.fields import NO_NUL, Peer


class AddOptOuts(msgspec.Struct, forbid_unknown_fields=True):
    peers: Annotated[list[Peer], msgspec.Meta(min_length=1, max_length=10_000)]
    reason: Annotated[str, msgspec.Meta(max_length=500, pattern=NO_NUL)] | None = None


class OptOutsAdded(msgspec.Struct):
    added: int


class OptOut(msgspec.Struct):
    peer: str
    peer_key: str
    reason: str | None
    created_at: dt.datetime


class OptOutQuery(msgspec.Struct, forbid_unknown_fields=True):
    # The last page's last peer_key; like every peer, it holds no NUL (which PostgreSQL's text refuses).
    cursor: Annotated[str, msgspec.Meta(max_length=300, pattern=NO_NUL)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class OptOutPage(msgspec.Struct):
    items: list[OptOut]
    next_cursor: str | None
