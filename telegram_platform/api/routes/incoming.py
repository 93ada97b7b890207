"""Incoming messages: what the accounts received, stored by the worker's `updates` queue."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...storage import incoming as incoming_store
from ...telegram.rpc import call_host
from ..endpoints import Api, Call, path_id
from ..keys import DB, REDIS, REDIS_AUTH
from ..schemas.incoming import Incoming, IncomingPage, IncomingQuery

api = Api()


@api.route("POST", "/api/incoming/{id}/read", summary="Mark a received message read at Telegram",
           role="operator", response=Incoming, tags=("messages",), errors=(404, 409, 502, 503, 504))
async def read_incoming(request: web.Request, call: Call[None, None]) -> Any:
    """Through the account's owner (TDLib viewMessages, forced read): its sender sees it read, and
    every earlier message of the chat with it, as Telegram reads a chat up to a message."""
    db = request.app[DB]
    incoming = await incoming_store.get_incoming(db, path_id(request))
    await call_host(request.app[REDIS], request.app[REDIS_AUTH], "view", incoming["account_id"],
                    {"peer": str(incoming["chat_id"]), "message_ids": [incoming["telegram_message_id"]]})
    return await incoming_store.mark_read(db, incoming["id"])


@api.route("GET", "/api/incoming", summary="Messages the accounts received, newest first or forward from an id",
           query=IncomingQuery, response=IncomingPage, tags=("messages",))
async def list_incoming(request: web.Request, call: Call[None, IncomingQuery]) -> Any:
    """A client that was away longer than the event log reaches back (its WebSocket's `replay`
    notice says `complete: false`) reads what it missed with `order=asc&after_id=<the last message
    id it saw>`, following `next_cursor` until it is null."""
    q = call.query
    items = await incoming_store.list_incoming(
        request.app[DB], account_id=q.account_id, chat_id=q.chat_id, after_id=q.after_id,
        cursor=int(q.cursor) if q.cursor else None, order=q.order, limit=q.limit + 1)
    next_cursor = str(items[q.limit - 1]["id"]) if len(items) > q.limit else None
    return {"items": items[: q.limit], "next_cursor": next_cursor}
