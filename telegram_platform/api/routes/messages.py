"""Messages: accepted into the outbox, then sent by the worker; and what a client does to a sent
message (forward, edit, delete), each through the outbox as a row of its own (`action`, `target_id`),
claimed and settled like a send; and the cancel of one not sent yet.

Text is checked here as Telegram would check it, so a message Telegram would refuse is a 422 naming
the field and never reaches the outbox: markup parsed by TDLib (telegram/formatting.py), explicit
entities and lengths by Telegram's rules.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from ...errors import BadRequest, Conflict, NotFound, ValidationFailed
from ...outages import REDIS_DOWN
from ...queue.routing import enqueue_send
from ...states import MessageStatus
from ...storage import accounts as account_store
from ...storage import incoming as incoming_store
from ...storage import outbox as outbox_store
from ...storage.db import Queryable
from ...storage.files import FileStore
from ...storage.outbox import NewMessage, Outbox
from ...telegram import formatting
from ...telegram.content import (
    ALBUM_KINDS,
    ALBUM_MAX,
    ALBUM_MIN,
    CAPTIONLESS_KINDS,
    MAX_CAPTION_LENGTH,
    Entity,
    FormattedText,
    ParseMode,
    utf16_length,
)
from ...telegram.formatting import ContentInvalid
from ..endpoints import Api, Call, path_id
from ..keys import DB, ENQUEUER, REDIS, REDIS_AUTH, SETTINGS
from ..schemas import messages as schemas
from ..schemas.messages import (
    DeleteQuery,
    EditMessage,
    ForwardMessage,
    Message,
    MessageMedia,
    MessagePage,
    MessageQuery,
    SendMessage,
)

log = structlog.get_logger(__name__)

# An Idempotency-Key header longer than this is refused: the key is stored and indexed with the
# message, so its size is the client's to bound, not ours to absorb.
MAX_IDEMPOTENCY_KEY = 200
# How long after sending Telegram lets a message be edited.
EDIT_WINDOW = dt.timedelta(hours=48)

api = Api()


def _idempotency_key(request: web.Request, body_key: str | None) -> str | None:
    header_key = request.headers.get("Idempotency-Key")
    if header_key is not None and not 1 <= len(header_key) <= MAX_IDEMPOTENCY_KEY:
        raise BadRequest(f"the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY} characters",
                         details={"header": "Idempotency-Key", "max_length": MAX_IDEMPOTENCY_KEY})
    if header_key is not None and body_key is not None and header_key != body_key:
        raise ValidationFailed([{"field": "idempotency_key", "message": "differs from the Idempotency-Key header"}])
    return header_key or body_key


def formatted(text: str, parse_mode: str | None, entities: list[schemas.Entity] | None, *,
              caption: bool = False) -> FormattedText:
    """The client's text as Telegram takes it: markup parsed by TDLib, or explicit entities checked;
    a 422 in Telegram's words naming the field otherwise."""
    if parse_mode is not None and entities is not None:
        raise ValidationFailed([{"field": "entities", "message": "give parse_mode or entities, not both"}])
    try:
        if parse_mode is not None:
            parsed = formatting.parse(text, ParseMode(parse_mode))
        else:
            parsed = FormattedText(text, tuple(
                Entity(e.type, e.offset, e.length, url=e.url, user_id=e.user_id, language=e.language,
                       custom_emoji_id=e.custom_emoji_id) for e in entities or ()))
        return formatting.check(parsed, caption=caption)
    except ContentInvalid as exc:
        field = "entities" if entities and exc.message.startswith("ENTIT") else "text"
        raise ValidationFailed([{"field": field, "message": exc.message}]) from None


async def _replayed(request: web.Request, key: str | None, user_id: int, action: str = "send",
                    target_id: int | None = None) -> dict[str, Any] | None:
    """The message an earlier request with this idempotency key made: answered again as it is,
    before any check that its own effect would now fail (an edit done, a message deleted). A key
    that made another action, or acted on another message, is a 422: it cannot mean this request."""
    if key is None:
        return None
    found = await outbox_store.find_by_key(request.app[DB], user_id, key)
    if found is None:
        return None
    if found["action"] != action or found["target_id"] != target_id:
        raise ValidationFailed([{"field": "idempotency_key",
                                 "message": f"was used for another request (message {found['id']}, a "
                                            f"{found['action']}); a retry must repeat the request it names"}])
    await with_media(request.app[DB], [found])
    return found


async def _accept(request: web.Request, message: NewMessage, key: str | None, user_id: int,
                  media: list[MessageMedia] | None = None) -> dict[str, Any]:
    """Into the outbox (with its files, in one transaction), then its job; a known idempotency key
    returns the first row instead."""
    db = request.app[DB]
    async with db.acquire() as conn, conn.transaction():
        row, created = await outbox_store.create(conn, message, idempotency_key=key, created_by=user_id)
        if created and media:
            await add_media(conn, row["id"], media)
    if created:
        # Its files are the ones just inserted, in this order: no query to read them back.
        row["media"] = [{"file_id": m.file_id, "kind": m.kind} for m in media or ()]
    else:
        await with_media(db, [row])
    if created:
        # The outbox row is the truth: once it is committed the message is accepted, and a job Redis
        # did not take (or loses later) is enqueued by the worker's outbox reconciler. A 503 here
        # would make a client that retries as told send twice.
        try:
            await enqueue_send(request.app[ENQUEUER], request.app[REDIS], db, row["id"], row["account_id"])
        except REDIS_DOWN as exc:
            log.warning("message accepted while Redis is unreachable: the reconciler will enqueue it",
                        message_id=row["id"], error=type(exc).__name__)
    return row


async def _reply(request: web.Request, body: SendMessage) -> tuple[str, int | None]:
    """The peer and Telegram's id of the message replied to, from the platform's ids."""
    db = request.app[DB]
    if body.reply_to_message_id is not None and body.reply_to_incoming_id is not None:
        raise ValidationFailed([{"field": "reply_to_incoming_id",
                                 "message": "give reply_to_message_id or reply_to_incoming_id, not both"}])
    if body.reply_to_message_id is not None:
        field = "reply_to_message_id"
        try:
            target = await outbox_store.get_message(db, body.reply_to_message_id)
        except NotFound:
            raise ValidationFailed([{"field": field, "message": "no such message"}]) from None
        if target["account_id"] != body.account_id or (body.peer is not None and target["peer"] != body.peer):
            raise ValidationFailed([{"field": field, "message": "not a message of this account and peer"}])
        if target["status"] not in MessageStatus.DELIVERED or target["telegram_message_id"] is None \
                or target["action"] not in ("send", "forward"):
            raise ValidationFailed([{"field": field, "message": f"not a sent message (status {target['status']})"}])
        return target["peer"], int(target["telegram_message_id"])
    if body.reply_to_incoming_id is not None:
        field = "reply_to_incoming_id"
        try:
            incoming = await incoming_store.get_incoming(db, body.reply_to_incoming_id)
        except NotFound:
            raise ValidationFailed([{"field": field, "message": "no such incoming message"}]) from None
        chat = str(incoming["chat_id"])
        if incoming["account_id"] != body.account_id or body.peer not in (None, chat, incoming["sender"]):
            raise ValidationFailed([{"field": field, "message": "not a message this account received from this peer"}])
        return body.peer or chat, int(incoming["telegram_message_id"])
    if body.peer is None:
        raise ValidationFailed([{"field": "peer", "message": "required (unless replying to an incoming message)"}])
    return body.peer, None


@api.route("POST", "/api/messages", summary="Queue a message (plain, MarkdownV2, HTML or with entities; a file or an "
           "album) for sending",
           role="operator", body=SendMessage, response=Message, status=202, tags=("messages",),
           errors=(404, 422))
async def send_message(request: web.Request, call: Call[SendMessage, None]) -> Any:
    body = call.body
    key = _idempotency_key(request, body.idempotency_key)
    if (replay := await _replayed(request, key, call.user.user_id)) is not None:
        return replay
    media = body.media or []
    if not media and not body.text:
        raise ValidationFailed([{"field": "text", "message": "is required (or media)"}])
    text = formatted(body.text, body.parse_mode, body.entities, caption=bool(media))
    await check_media(request.app[DB], text.text, media)
    await account_store.get_account(request.app[DB], body.account_id)
    peer, reply_to = await _reply(request, body)
    options = {"silent": body.silent, "protect_content": body.protect_content,
               "disable_web_page_preview": body.disable_web_page_preview}
    return await _accept(request, NewMessage(
        body.account_id, peer, text.text, text.entities_json(), options, reply_to,
        body.reply_to_message_id, body.reply_to_incoming_id), key, call.user.user_id, media)


async def _sent_target(request: web.Request, what: str) -> dict[str, Any]:
    """The message a forward, edit or deletion acts on: one the platform sent (409 otherwise)."""
    target = await outbox_store.get_message(request.app[DB], path_id(request))
    await with_media(request.app[DB], [target])
    if target["action"] not in ("send", "forward"):
        raise Conflict(f"message {target['id']} is a {target['action']}, not a message to {what}")
    if target["status"] not in MessageStatus.DELIVERED or target["telegram_message_id"] is None:
        hint = "; cancel it instead" if target["status"] == MessageStatus.QUEUED and what == "delete" else ""
        raise Conflict(f"message {target['id']} is {target['status']}, not sent: nothing to {what}{hint}",
                       details={"status": target["status"]})
    if target["deleted_at"] is not None:
        raise Conflict(f"message {target['id']} was deleted", details={"deleted_at": target["deleted_at"].isoformat()})
    if target["account_id"] is None:
        raise Conflict(f"message {target['id']}'s account was removed")
    return target


@api.route("POST", "/api/messages/{id}/forward", summary="Forward a sent message to another peer",
           role="operator", body=ForwardMessage, response=Message, status=202, tags=("messages",),
           errors=(404, 409, 422))
async def forward_message(request: web.Request, call: Call[ForwardMessage, None]) -> Any:
    """Through the outbox, from the account that sent it (Telegram's forwardMessages)."""
    key = _idempotency_key(request, call.body.idempotency_key)
    if (replay := await _replayed(request, key, call.user.user_id, "forward", path_id(request))) is not None:
        return replay
    target = await _sent_target(request, "forward")
    return await _accept(request, NewMessage(
        target["account_id"], call.body.peer, target["text"], target["entities"], {}, action="forward",
        target_id=target["id"]), key, call.user.user_id)


@api.route("PATCH", "/api/messages/{id}", summary="Edit a sent message's text (or caption) within 48 hours",
           role="operator", body=EditMessage, response=Message, status=202, tags=("messages",),
           errors=(404, 409, 422))
async def edit_message(request: web.Request, call: Call[EditMessage, None]) -> Any:
    """Through the outbox (TDLib editMessageText, or editMessageCaption for a media message). As
    Telegram: 409 MESSAGE_EDIT_TIME_EXPIRED past 48 hours, 422 MESSAGE_NOT_MODIFIED for the same text."""
    body = call.body
    key = _idempotency_key(request, body.idempotency_key)
    if (replay := await _replayed(request, key, call.user.user_id, "edit", path_id(request))) is not None:
        return replay
    target = await _sent_target(request, "edit")
    if target["action"] != "send":
        raise Conflict("MESSAGE_ID_INVALID: a forwarded message cannot be edited")
    if target["sent_at"] is not None and dt.datetime.now(dt.UTC) - target["sent_at"] > EDIT_WINDOW:
        raise Conflict("MESSAGE_EDIT_TIME_EXPIRED: Telegram allows editing for 48 hours after sending",
                       details={"sent_at": target["sent_at"].isoformat()})
    text = formatted(body.text, body.parse_mode, body.entities, caption=bool(target.get("media")))
    if text.text == target["text"] and text.entities_json() == target["entities"]:
        raise ValidationFailed([{"field": "text", "message": "MESSAGE_NOT_MODIFIED: the message says this already"}])
    return await _accept(request, NewMessage(
        target["account_id"], target["peer"], text.text, text.entities_json(), {}, action="edit",
        target_id=target["id"]), key, call.user.user_id)


@api.route("DELETE", "/api/messages/{id}", summary="Delete a sent message, for everyone or for the account",
           role="operator", query=DeleteQuery, response=Message, status=202, tags=("messages",),
           errors=(404, 409, 422))
async def delete_message(request: web.Request, call: Call[None, DeleteQuery]) -> Any:
    """Through the outbox (TDLib deleteMessages, `revoke` = for_everyone). An Idempotency-Key header
    makes a repeated request return the first deletion."""
    key = _idempotency_key(request, None)
    if (replay := await _replayed(request, key, call.user.user_id, "delete", path_id(request))) is not None:
        return replay
    target = await _sent_target(request, "delete")
    return await _accept(request, NewMessage(
        target["account_id"], target["peer"], "", [], {"for_everyone": call.query.for_everyone},
        action="delete", target_id=target["id"]), key, call.user.user_id)


@api.route("POST", "/api/messages/{id}/cancel", summary="Cancel a message that has not been sent yet",
           role="operator", response=Message, tags=("messages",), errors=(404, 409))
async def cancel_message(request: web.Request, call: Call[None, None]) -> Any:
    """queued -> cancelled, with its `message.status` event; 409 once it is being sent, or settled."""
    db = request.app[DB]
    message_id = path_id(request)
    cancelled = await outbox_store.cancel(db, message_id)
    if cancelled is None:
        current = await outbox_store.get_message(db, message_id)
        raise Conflict(f"message {message_id} is {current['status']}: only a queued message can be cancelled",
                       details={"status": current["status"]})
    outbox = Outbox(db, request.app[REDIS], request.app[REDIS_AUTH], log_length=request.app[SETTINGS].events.log_length)
    await outbox.publish_status(cancelled, MessageStatus.CANCELLED, cancelled["error"])
    return cancelled


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
        request.app[DB], account_id=q.account_id, status=q.status, action=q.action,
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


async def check_media(db: Queryable, caption: str, media: list[MessageMedia], *, text_field: str = "text") -> None:
    """Telegram's rules for a message's files, checked before anything is stored: a 422 naming the
    field for a file that does not exist, an album of other than 2 to 10 photos and videos, a
    caption (`text_field`) too long or on a sticker, a file Telegram would not take as its kind."""
    if not media:
        return
    errors: list[dict[str, str]] = []
    if utf16_length(caption) > MAX_CAPTION_LENGTH:
        errors.append({"field": text_field,
                       "message": f"a caption is at most {MAX_CAPTION_LENGTH} UTF-16 code units"})
    if caption and any(item.kind in CAPTIONLESS_KINDS for item in media):
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
