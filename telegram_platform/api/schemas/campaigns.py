"""Campaigns: a template sent to many recipients from several accounts, their progress and
recipients (`api/routes/campaigns.py`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec

from telegram_platform.api.schemas.fields import NO_NUL, AwareDatetime, Cursor, IdempotencyKey, Peer, PositiveId
from telegram_platform.api.schemas.messages import MessageMedia, MessageStatus, ParseModeName

CampaignStatus = Literal["draft", "scheduled", "running", "paused", "completed", "cancelled", "failed"]
Template = Annotated[str, msgspec.Meta(
    min_length=1, max_length=16384, pattern=NO_NUL, examples=["Hi {first_name}!"],
    description="message text; `{first_name}` is filled from the recipient's variables (empty when it "
                "has none), `{peer}` is the recipient, `{{` and `}}` are literal braces. With a "
                "`parse_mode`, values are escaped for it first (they never add markup), then the text is "
                "parsed; each recipient's message must fit Telegram's 4,096 UTF-16 units")]
VariableName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
VariableValue = Annotated[str, msgspec.Meta(max_length=1024, pattern=NO_NUL)] | int | float | bool | None
RecipientStatus = Literal["pending", "assigned", "skipped"]


class RecipientIn(msgspec.Struct, forbid_unknown_fields=True):
    peer: Peer
    variables: dict[VariableName, VariableValue] = msgspec.field(default_factory=dict)


class CreateCampaign(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_NUL)]
    account_ids: Annotated[list[PositiveId], msgspec.Meta(min_length=1, max_length=1000)]
    template: Template
    recipients: Annotated[list[RecipientIn], msgspec.Meta(max_length=100_000)] = msgspec.field(
        default_factory=list)
    # Given: the campaign is `scheduled` and starts by itself then; else it is a `draft` until started.
    schedule_at: AwareDatetime | None = None
    idempotency_key: IdempotencyKey | None = None
    media: Annotated[list[MessageMedia], msgspec.Meta(min_length=1, max_length=10, description=(
        "files each message carries (the template is their caption): one, or an album of 2 to 10 photos "
        "and videos"))] | None = None
    parse_mode: ParseModeName | None = None
    silent: bool = False
    protect_content: bool = False
    disable_web_page_preview: bool = False


class CampaignOptions(msgspec.Struct):
    silent: bool = False
    protect_content: bool = False
    disable_web_page_preview: bool = False


class HeldBack(msgspec.Struct):
    """Why a running campaign sends nothing now: every account waits on a limit. The first to resume."""

    limit: Annotated[Literal["per_second", "per_chat", "per_day", "flood_wait"], msgspec.Meta(
        description="per_day includes a new account's warm-up ramp; flood_wait is Telegram's 429")]
    detail: str
    account_id: int
    resumes_at: dt.datetime


class CampaignProgress(msgspec.Struct):
    total: int
    sent: int
    failed: int
    pending: int
    skipped: int
    cancelled: int


class Campaign(msgspec.Struct):
    id: int
    name: str
    template: str
    status: CampaignStatus
    schedule_at: dt.datetime | None
    account_ids: list[int]
    progress: CampaignProgress
    parse_mode: ParseModeName | None
    options: CampaignOptions
    held_back: Annotated[HeldBack | None, msgspec.Meta(
        description="set while the campaign is held back by its accounts' limits, null once it moves")]
    idempotency_key: str | None
    error: str | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    media: list[MessageMedia] = msgspec.field(default_factory=list)


class CampaignQuery(msgspec.Struct, forbid_unknown_fields=True):
    status: CampaignStatus | None = None
    cursor: Cursor | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=200)] = 50


class CampaignPage(msgspec.Struct):
    items: list[Campaign]
    next_cursor: str | None


class AddRecipients(msgspec.Struct, forbid_unknown_fields=True):
    recipients: Annotated[list[RecipientIn], msgspec.Meta(min_length=1, max_length=100_000)]


class RecipientsAdded(msgspec.Struct):
    added: int
    duplicates: int
    total: int


class CampaignRecipient(msgspec.Struct):
    id: int
    peer: str
    variables: dict[str, Any]
    status: RecipientStatus
    message_id: int | None
    message_status: MessageStatus | None
    error: str | None


class RecipientQuery(msgspec.Struct, forbid_unknown_fields=True):
    status: RecipientStatus | None = None
    cursor: Cursor | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class RecipientPage(msgspec.Struct):
    items: list[CampaignRecipient]
    next_cursor: str | None
