"""Messages: accepted into the outbox, then sent by the worker."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...errors import ValidationFailed
from ...storage import accounts as account_store
from ...storage import outbox as outbox_store
from ...worker.jobs import SEND_MESSAGE, message_job_id
from ..endpoints import Api, Call, path_id
from ..keys import DB, ENQUEUER
from ..schemas import Message, MessagePage, MessageQuery, SendMessage

api = Api()


@api.route("POST", "/api/messages", summary="Queue a text message for sending", role="operator",
           body=SendMessage, response=Message, status=202, tags=("messages",), errors=(404, 422))
async def send_message(request: web.Request, call: Call[SendMessage, None]) -> Any:
    body = call.body
    header_key = request.headers.get("Idempotency-Key")
    if header_key is not None and body.idempotency_key is not None and header_key != body.idempotency_key:
        raise ValidationFailed([{"field": "idempotency_key",
                                 "message": "differs from the Idempotency-Key header"}])
    key = header_key or body.idempotency_key
    db = request.app[DB]
    await account_store.get_account(db, body.account_id)
    message, created = await outbox_store.create_message(
        db, account_id=body.account_id, peer=body.peer, text=body.text, idempotency_key=key,
        created_by=call.user.user_id)
    if created:
        # If Redis loses this job, the outbox reconciler re-enqueues the message.
        await request.app[ENQUEUER].enqueue("messages", SEND_MESSAGE, [message["id"]],
                                            job_id=message_job_id(message["id"]))
    return message


@api.route("GET", "/api/messages/{id}", summary="A message and its delivery state", response=Message,
           tags=("messages",), errors=(404,))
async def get_message(request: web.Request, call: Call[None, None]) -> Any:
    return await outbox_store.get_message(request.app[DB], path_id(request))


@api.route("GET", "/api/messages", summary="Messages, newest first, with cursor pagination",
           query=MessageQuery, response=MessagePage, tags=("messages",))
async def list_messages(request: web.Request, call: Call[None, MessageQuery]) -> Any:
    q = call.query
    items = await outbox_store.list_messages(
        request.app[DB], account_id=q.account_id, status=q.status,
        before_id=int(q.cursor) if q.cursor else None, limit=q.limit + 1)
    next_cursor = str(items[q.limit - 1]["id"]) if len(items) > q.limit else None
    return {"items": items[: q.limit], "next_cursor": next_cursor}
