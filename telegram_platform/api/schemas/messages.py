"""Messages the platform sends: a send request, a message and its status, pages of them
(`api/routes/messages.py`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

import msgspec

from telegram_platform.api.schemas.fields import Cursor, IdempotencyKey, Peer, PositiveId, Text

# The status types are the values of telegram_platform/states.py, spelled as Literals so the OpenAPI
# document lists them inline (tests/test_states.py holds the two equal).
MessageStatus = Literal["queued", "sending", "sent", "failed", "cancelled"]


class SendMessage(msgspec.Struct, forbid_unknown_fields=True):
    account_id: PositiveId
    peer: Peer
    text: Text
    idempotency_key: IdempotencyKey | None = None


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


class MessageQuery(msgspec.Struct, forbid_unknown_fields=True):
    account_id: PositiveId | None = None
    status: MessageStatus | None = None
    cursor: Cursor | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


class MessagePage(msgspec.Struct):
    items: list[Message]
    next_cursor: str | None
