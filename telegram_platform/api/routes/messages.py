"""Messages: accepted into the outbox, then sent by the worker."""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from ...errors import BadRequest, ValidationFailed
from ...outages import REDIS_DOWN
from ...queue.routing import enqueue_send
from ...storage import accounts as account_store
from ...storage import outbox as outbox_store
from ..endpoints import Api, Call, path_id
from ..keys import DB, ENQUEUER, REDIS
from ..schemas.messages import Message, MessagePage, MessageQuery, SendMessage

log = structlog.get_logger(__name__)

# An Idempotency-Key header longer than this is refused: the key is stored and indexed with the
# message, so its size is the client's to bound, not ours to absorb.
MAX_IDEMPOTENCY_KEY = 200

api = Api()


@api.route("POST", "/api/messages", summary="Queue a text message for sending", role="operator",
           body=SendMessage, response=Message, status=202, tags=("messages",), errors=(404, 422))
async def send_message(request: web.Request, call: Call[SendMessage, None]) -> Any:
    body = call.body
    header_key = request.headers.get("Idempotency-Key")
    if header_key is not None and not 1 <= len(header_key) <= MAX_IDEMPOTENCY_KEY:
        raise BadRequest(f"the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY} characters",
                         details={"header": "Idempotency-Key", "max_length": MAX_IDEMPOTENCY_KEY})
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
        # The outbox row is the truth: once it is committed the message is accepted, and a job Redis
        # did not take (or loses later) is enqueued by the worker's outbox reconciler. A 503 here
        # would make a client that retries as told send twice.
        try:
            await enqueue_send(request.app[ENQUEUER], request.app[REDIS], db, message["id"], body.account_id)
        except REDIS_DOWN as exc:
            log.warning("message accepted while Redis is unreachable: the reconciler will enqueue it",
                        message_id=message["id"], error=type(exc).__name__)
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
