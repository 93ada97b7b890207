"""Webhooks and the record of their deliveries (`api/routes/webhooks.py`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from telegram_platform.api.schemas.fields import NO_NUL, Cursor, ShortText

# Explicit ranges, not \s: Python's and ECMAScript's \s differ, and clients check this pattern too.
WebhookUrl = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\x00-\x20/?#]+[^\x00-\x20]*$", max_length=2048,
                                         description="http(s) URL the events are POSTed to")]
EventPattern = Annotated[str, msgspec.Meta(
    pattern=r"^(\*|[a-z][a-z_]*(\.[a-z_]+)*(\.\*)?)$", max_length=64,
    description="an event type (`message.status`), a prefix (`message.*`) or `*` for every event")]
WebhookSecret = Annotated[str, msgspec.Meta(min_length=16, max_length=256, pattern=NO_NUL,
                                            description="HMAC-SHA256 key; generated when not given")]
DeliveryStatus = Literal["pending", "delivered", "failed"]
BreakerState = Literal["closed", "open", "half_open"]


class CreateWebhook(msgspec.Struct, forbid_unknown_fields=True):
    url: WebhookUrl
    events: Annotated[list[EventPattern], msgspec.Meta(min_length=1, max_length=32)] = msgspec.field(
        default_factory=lambda: ["*"])
    secret: WebhookSecret | None = None
    description: ShortText = ""
    active: bool = True


class UpdateWebhook(msgspec.Struct, forbid_unknown_fields=True):
    """Only the fields given change."""

    __json_schema_extra__: ClassVar[dict[str, Any]] = {"minProperties": 1}
    url: WebhookUrl | msgspec.UnsetType = msgspec.UNSET
    events: Annotated[list[EventPattern], msgspec.Meta(min_length=1, max_length=32)] | msgspec.UnsetType = (
        msgspec.UNSET)
    secret: WebhookSecret | msgspec.UnsetType = msgspec.UNSET
    description: ShortText | msgspec.UnsetType = msgspec.UNSET
    active: bool | msgspec.UnsetType = msgspec.UNSET


class WebhookBreaker(msgspec.Struct):
    """The webhook's circuit breaker: `open` (paused after failing for long: deliveries are held,
    pending), `half_open` (one probe delivery is being tried) or `closed` (delivering)."""

    state: BreakerState
    consecutive_failures: int
    failing_since: dt.datetime | None
    paused_at: dt.datetime | None
    # Open: when the probe is tried; half-open: when an unanswered probe is given up and retried.
    probe_at: dt.datetime | None


class Webhook(msgspec.Struct):
    id: int
    url: str
    events: list[str]
    description: str
    active: bool
    created_at: dt.datetime
    updated_at: dt.datetime
    breaker: WebhookBreaker


class WebhookCreated(Webhook):
    """The webhook and its secret: the only response that shows the secret."""

    secret: str


class WebhookList(msgspec.Struct):
    items: list[Webhook]


class WebhookDelivery(msgspec.Struct):
    id: int
    webhook_id: int
    event_type: str
    payload: dict[str, Any]
    status: DeliveryStatus
    attempts: int
    response_status: int | None
    error: str | None
    next_attempt_at: dt.datetime | None
    delivered_at: dt.datetime | None
    created_at: dt.datetime


class DeliveryQuery(msgspec.Struct, forbid_unknown_fields=True):
    status: DeliveryStatus | None = None
    cursor: Cursor | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


class DeliveryPage(msgspec.Struct):
    items: list[WebhookDelivery]
    next_cursor: str | None
