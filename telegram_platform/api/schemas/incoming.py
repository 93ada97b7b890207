"""Messages the accounts received, and the pages a client reads them in (`api/routes/incoming.py`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

import msgspec

from telegram_platform.api.schemas.fields import Cursor, PositiveId

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


class Incoming(msgspec.Struct):
    id: int
    account_id: int
    chat_id: int
    telegram_message_id: int
    sender: str
    text: str
    sent_at: dt.datetime | None
    received_at: dt.datetime


class IncomingPage(msgspec.Struct):
    items: list[Incoming]
    next_cursor: str | None
