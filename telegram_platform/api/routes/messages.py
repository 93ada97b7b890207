"""Messages: accepted into the outbox, then sent by the worker."""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog
from aiohttp import web

from ...errors import BadRequest, ValidationFailed
from ...outages import REDIS_DOWN
from ...queue.registry import MESSAGES_QUEUE, SEND_MESSAGE, message_job_id
from ...storage import accounts as account_store
from ...storage import outbox as outbox_store
from ...storage.db import Queryable
from ...storage.files import FileStore
from ...telegram.content import (
    ALBUM_KINDS,
    ALBUM_MAX,
    ALBUM_MIN,
    CAPTIONLESS_KINDS,
    MAX_CAPTION_LENGTH,
    utf16_length,
)
from ..endpoints import Api, Call, path_id
from ..keys import DB, ENQUEUER
from ..schemas.messages import Message, MessageMedia, MessagePage, MessageQuery, SendMessage

log = structlog.get_logger(__name__)

# An Idempotency-Key header longer than this is refused: the key is stored and indexed with the
# message, so its size is the client's to bound, not ours to absorb.
MAX_IDEMPOTENCY_KEY = 200

api = Api()


@api.route("POST", "/api/messages", summary="Queue a message (text, a file or an album) for sending", role="operator",
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
    media = body.media or []
    await check_media(db, body.text, media)
    await account_store.get_account(db, body.account_id)
    async with db.acquire() as conn, conn.transaction():
        message, created = await outbox_store.create_message(
            conn, account_id=body.account_id, peer=body.peer, text=body.text, idempotency_key=key,
            created_by=call.user.user_id)
        if created and media:
            await add_media(conn, message["id"], media)
    await with_media(db, [message])
    if created:
        # The outbox row is the truth: once it is committed the message is accepted, and a job Redis
        # did not take (or loses later) is enqueued by the worker's outbox reconciler. A 503 here
        # would make a client that retries as told send twice.
        try:
            await request.app[ENQUEUER].enqueue(MESSAGES_QUEUE, SEND_MESSAGE, [message["id"]],
                                                job_id=message_job_id(message["id"]))
        except REDIS_DOWN as exc:
            log.warning("message accepted while Redis is unreachable: the reconciler will enqueue it",
                        message_id=message["id"], error=type(exc).__name__)
    return message


@api.route("GET", "/api/messages/{id}", summary="A message and its delivery state", response=Message,
           tags=("messages",), errors=(404,))
async def get_message(request: web.Request, call: Call[None, None]) -> Any:
    message = await outbox_store.get_message(request.app[DB], path_id(request))
    await with_media(request.app[DB], [message])
    return message


@api.route("GET", "/api/messages", summary="Messages, newest first, with cursor pagination",
           query=MessageQuery, response=MessagePage, tags=("messages",))
async def list_messages(request: web.Request, call: Call[None, MessageQuery]) -> Any:
    q = call.query
    items = await outbox_store.list_messages(
        request.app[DB], account_id=q.account_id, status=q.status,
        before_id=int(q.cursor) if q.cursor else None, limit=q.limit + 1)
    next_cursor = str(items[q.limit - 1]["id"]) if len(items) > q.limit else None
    await with_media(request.app[DB], items[: q.limit])
    return {"items": items[: q.limit], "next_cursor": next_cursor}


# -- media ------------------------------------------------------------------------------------------

# The types Telegram takes for each kind (a document takes any); and a photo's size limit.
MEDIA_TYPES: dict[str, tuple[str, ...]] = {
    "photo": ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp"),
    "video": ("video/",), "audio": ("audio/",), "voice": ("audio/",),
    "animation": ("image/gif", "video/"),
    "sticker": ("image/webp", "video/webm", "application/x-tgsticker"),
}
MAX_PHOTO_BYTES = 10 << 20


async def check_media(db: Queryable, text: str, media: list[MessageMedia], *, text_field: str = "text") -> None:
    """Telegram's rules for a message's files, checked before anything is stored: a 422 naming the
    field for a file that does not exist, an album of other than 2 to 10 photos and videos, a
    caption (`text_field`) too long or on a sticker, a file Telegram would not take as its kind."""
    if not media:
        if not text:
            raise ValidationFailed([{"field": "text", "message": "is required (or media)"}])
        return
    errors: list[dict[str, str]] = []
    if utf16_length(text) > MAX_CAPTION_LENGTH:
        errors.append({"field": text_field,
                       "message": f"a caption is at most {MAX_CAPTION_LENGTH} UTF-16 code units"})
    if text and any(item.kind in CAPTIONLESS_KINDS for item in media):
        errors.append({"field": text_field, "message": "a sticker has no caption"})
    if len(media) > 1 and any(item.kind not in ALBUM_KINDS for item in media):
        errors.append({"field": "media", "message": f"an album holds {ALBUM_MIN} to {ALBUM_MAX} photos and videos"})
    files = await FileStore.existing_in(db, [item.file_id for item in media])
    for index, item in enumerate(media):
        file = files.get(item.file_id)
        field = f"media[{index}].file_id"
        if file is None:
            errors.append({"field": field, "message": f"file {item.file_id} does not exist"})
            continue
        allowed = MEDIA_TYPES.get(item.kind)
        if allowed is not None and not file["mime_type"].startswith(allowed):
            errors.append({"field": f"media[{index}].kind",
                           "message": f"a {file['mime_type']} file cannot be sent as {item.kind}"})
        if item.kind == "photo" and file["size"] > MAX_PHOTO_BYTES:
            errors.append({"field": field, "message": f"a photo is at most {MAX_PHOTO_BYTES} bytes: send it as a "
                                                      "document"})
    if errors:
        raise ValidationFailed(errors)


async def add_media(conn: Queryable, message_id: int, media: list[MessageMedia]) -> None:
    """The message's files, in order; each file's use refreshed (retention counts from now). A file
    deleted since it was checked fails the insert (its foreign key): the message is not stored."""
    try:
        await conn.execute(
            """INSERT INTO message_files (message_id, position, file_id, kind)
               SELECT $1, p - 1, f, k FROM unnest($2::bigint[], $3::text[]) WITH ORDINALITY AS t(f, k, p)""",
            message_id, [m.file_id for m in media], [m.kind for m in media])
    except asyncpg.ForeignKeyViolationError:
        raise ValidationFailed([{"field": "media", "message": "a file was deleted meanwhile"}]) from None
    await conn.execute("UPDATE files SET last_used_at = now() WHERE id = ANY($1::bigint[])",
                       [m.file_id for m in media])


async def with_media(db: Queryable, messages: list[dict[str, Any]]) -> None:
    """Each message's `media` ([] for text), in one query."""
    if not messages:
        return
    rows = await db.fetch(
        "SELECT message_id, file_id, kind FROM message_files WHERE message_id = ANY($1::bigint[]) "
        "ORDER BY message_id, position", [m["id"] for m in messages])
    by_message: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_message.setdefault(row["message_id"], []).append({"file_id": row["file_id"], "kind": row["kind"]})
    for message in messages:
        message["media"] = by_message.get(message["id"], [])
