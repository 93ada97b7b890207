"""Messages the accounts received, and the pages a client reads them in (`api/routes/incoming.py`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec

from telegram_platform.api.schemas.fields import Cursor, PositiveId
from telegram_platform.api.schemas.messages import Entity

ChatId = Annotated[int, msgspec.Meta(ge=-(2**63 - 1), le=2**63 - 1, description="Telegram's chat id")]


class IncomingQuery(msgspec.Struct, forbid_unknown_fields=True):
    account_id: PositiveId | None = None
    chat_id: ChatId | None = None
    after_id: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1, description=(
        "only messages stored after this one: with order=asc, how a client catches up from the last "
        "`id` it saw (in a message.incoming event or a page)"))] | None = None
    order: Literal["asc", "desc"] = "desc"
    cursor: Cursor | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


class ForwardOrigin(msgspec.Struct, omit_defaults=True):
    """Who a forwarded message came from: a user (`id`), a user who hides their account (`name`),
    a chat (`id`), or a channel's post (`id`, `message_id`)."""

    type: Literal["user", "hidden_user", "chat", "channel", "unknown"]
    id: int | None = None
    name: str | None = None
    message_id: int | None = None


class Incoming(msgspec.Struct):
    id: int
    account_id: int
    chat_id: int
    telegram_message_id: int
    sender: str
    kind: Annotated[str, msgspec.Meta(description="`text`, or the media kind (photo, video, document, ...)")]
    text: Annotated[str, msgspec.Meta(description="the text, or a media message's caption; the latest edit's")]
    entities: list[Entity]
    reply_to: Annotated[int | None, msgspec.Meta(
        description="Telegram's id of the message (same chat) this one replies to")]
    forward_from: ForwardOrigin | None
    media: Annotated[dict[str, Any] | None, msgspec.Meta(
        description="the media's metadata (kind, size, mime type, dimensions, duration)")]
    sent_at: dt.datetime | None
    received_at: dt.datetime
    edited_at: dt.datetime | None
    deleted_at: Annotated[dt.datetime | None, msgspec.Meta(
        description="when the platform learnt it was deleted (by its sender, or for everyone)")]
    read_at: Annotated[dt.datetime | None, msgspec.Meta(
        description="when the account marked it read at Telegram (POST /api/incoming/{id}/read)")]


class IncomingPage(msgspec.Struct):
    items: list[Incoming]
    next_cursor: str | None
