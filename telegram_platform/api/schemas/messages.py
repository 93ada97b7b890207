"""Messages the platform sends: a send request, a message and its status, pages of them
(`api/routes/messages.py`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

import msgspec

from telegram_platform.api.schemas.fields import NO_NUL, Cursor, IdempotencyKey, Peer, PositiveId

# The status types are the values of telegram_platform/states.py, spelled as Literals so the OpenAPI
# document lists them inline (tests/test_states.py holds the two equal).
MessageStatus = Literal["queued", "sending", "sent", "failed", "cancelled"]


MediaKindName = Literal["photo", "video", "document", "audio", "voice", "animation", "sticker"]


class MessageMedia(msgspec.Struct, forbid_unknown_fields=True):
    file_id: Annotated[PositiveId, msgspec.Meta(description="an uploaded file's id (POST /api/files)")]
    kind: MediaKindName


class SendMessage(msgspec.Struct, forbid_unknown_fields=True):
    account_id: PositiveId
    peer: Peer
    text: Annotated[str, msgspec.Meta(max_length=4096, pattern=NO_NUL, examples=["hi"], description=(
        "the message; with `media`, its caption (at most 1,024 UTF-16 units; may be empty)"))] = ""
    idempotency_key: IdempotencyKey | None = None
    media: Annotated[list[MessageMedia], msgspec.Meta(min_length=1, max_length=10, description=(
        "one file (any kind), or an album of 2 to 10 photos and videos sharing the caption"))] | None = None


class Message(msgspec.Struct):
    id: int
    account_id: Annotated[int | None, msgspec.Meta(
        description="The account that sends it; null once that account was removed (its messages stay)")]
    peer: str
    text: str
    status: MessageStatus
    attempts: int
    error: str | None
    error_class: str | None
    telegram_message_id: int | None
    idempotency_key: str | None
    not_before: dt.datetime
    sent_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    telegram_message_ids: Annotated[list[int] | None, msgspec.Meta(
        description="every message Telegram made of the send (an album's items), once sent")] = None
    media: list[MessageMedia] = msgspec.field(default_factory=list)


class MessageQuery(msgspec.Struct, forbid_unknown_fields=True):
    account_id: PositiveId | None = None
    status: MessageStatus | None = None
    cursor: Cursor | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


class MessagePage(msgspec.Struct):
    items: list[Message]
    next_cursor: str | None
