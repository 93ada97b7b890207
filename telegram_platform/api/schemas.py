"""Request and response shapes; they validate input and generate the OpenAPI document."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, ClassVar, Literal

import msgspec

# PostgreSQL text (and jsonb) cannot hold NUL: refused here, with the field named, not by the database.
NO_NUL = r"^[^\x00]*$"
Username = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
# E.164: at most 15 digits, and no country code starts with 0.
# Examples are Telegram test-DC numbers (+99966XYYYY, logging in with the code XXXXX), which the
# emulator serves: Swagger UI's "Try it out" and schemathesis can then walk a login end to end.
Phone = Annotated[str, msgspec.Meta(pattern=r"^\+?[1-9][0-9]{6,14}$", description="E.164 phone number",
                                    examples=["+9996621234"])]
Peer = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=NO_NUL,
                                   description="a user id, a @username or a phone number", examples=["@alice"])]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=NO_NUL, examples=["hi"])]
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=NO_NUL)]
ShortText = Annotated[str, msgspec.Meta(max_length=256, pattern=NO_NUL)]
PositiveId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
# An id to page before; 18 digits keep it inside PostgreSQL's bigint.
Cursor = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,18}$")]
MessageStatus = Literal["queued", "sending", "sent", "failed", "cancelled"]
AuthStateName = Literal["wait_phone", "wait_code", "wait_password", "wait_registration", "ready",
                        "logging_out", "closed", "logged_out", "failed"]


class LoginRequest(msgspec.Struct, forbid_unknown_fields=True):
    username: Username
    password: Password


class RefreshRequest(msgspec.Struct, forbid_unknown_fields=True):
    refresh_token: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class TokenPair(msgspec.Struct):
    access_token: str
    refresh_token: str
    expires_in: int
    token_type: str = "bearer"


class ProxyIn(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["socks5", "http", "mtproto"]
    server: Annotated[str, msgspec.Meta(min_length=1, max_length=253, pattern=NO_NUL)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    username: ShortText | None = None
    password: ShortText | None = None
    secret: ShortText | None = None
    http_only: bool = False


class CreateAccount(msgspec.Struct, forbid_unknown_fields=True):
    phone: Phone
    proxy: ProxyIn | None = None


class SubmitCode(msgspec.Struct, forbid_unknown_fields=True):
    code: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{3,8}$", examples=["22222"])]


class SubmitPassword(msgspec.Struct, forbid_unknown_fields=True):
    password: Password


class LoginAgainQuery(msgspec.Struct, forbid_unknown_fields=True):
    set_aside_database: Annotated[bool, msgspec.Meta(description=(
        "For a session that cannot resume, such as a database that no longer opens because "
        "ENCRYPTION_KEY changed (409 wrong_database_key): the account's database is renamed aside "
        "(kept on disk, never deleted) and the login starts from an empty one. A database that opens "
        "to a live session is never set aside: the account answers as it would without the flag."))] = False


class Register(msgspec.Struct, forbid_unknown_fields=True):
    first_name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL)]
    last_name: Annotated[str, msgspec.Meta(max_length=64, pattern=NO_NUL)] = ""


class ProxyOut(msgspec.Struct):
    """A proxy as the API shows it: its password and secret are write-only, flags say whether given."""

    type: Literal["socks5", "http", "mtproto"]
    server: str
    port: int
    username: str | None = None
    http_only: bool = False
    has_password: bool = False
    has_secret: bool = False


class Account(msgspec.Struct):
    id: int
    phone: str
    auth_state: str
    connection_state: str | None
    proxy: ProxyOut | None
    telegram_user_id: Annotated[int | None, msgspec.Meta(
        description="The account's user id at Telegram, known once it has logged in")]
    paused_until: dt.datetime | None
    peer_flood_until: dt.datetime | None
    last_error: Annotated[str | None, msgspec.Meta(
        description="Why the session last failed, was ended at Telegram, or was held back (Telegram's words); "
                    "cleared when it is ready again")]
    created_at: dt.datetime
    updated_at: dt.datetime


class AccountList(msgspec.Struct):
    items: list[Account]


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


class Health(msgspec.Struct):
    status: str


class HealthDetails(msgspec.Struct, omit_defaults=True):
    """`/api/health/detailed`: only `status` without a token (for load balancers and monitors),
    every part with one."""

    status: Literal["ok", "degraded"]
    database: dict[str, Any] | None = None
    redis: dict[str, Any] | None = None
    queues: dict[str, Any] | None = None
    workers: list[Any] | None = None
    tdlib: dict[str, Any] | None = None
    processes: dict[str, Any] | None = None


# -- users -----------------------------------------------------------------------------------------

Role = Literal["admin", "operator", "viewer"]
NewPassword = Annotated[str, msgspec.Meta(min_length=8, max_length=1024)]


class User(msgspec.Struct):
    id: int
    username: str
    role: Role
    disabled: bool
    created_at: dt.datetime


class UserList(msgspec.Struct):
    items: list[User]


class CreateUser(msgspec.Struct, forbid_unknown_fields=True):
    username: Username
    password: NewPassword
    role: Role


class UpdateUser(msgspec.Struct, forbid_unknown_fields=True):
    """Only the fields given change; a change revokes the user's refresh tokens."""

    # At least one field (OpenAPI's minProperties; checked by the handler).
    __json_schema_extra__: ClassVar[dict[str, Any]] = {"minProperties": 1}
    role: Role | msgspec.UnsetType = msgspec.UNSET
    disabled: bool | msgspec.UnsetType = msgspec.UNSET
    password: NewPassword | msgspec.UnsetType = msgspec.UNSET


# -- webhooks --------------------------------------------------------------------------------------

# Explicit ranges, not \s: Python's and ECMAScript's \s differ, and clients check this pattern too.
WebhookUrl = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\x00-\x20/?#]+[^\x00-\x20]*$", max_length=2048,
                                         description="http(s) URL the events are POSTed to")]
EventPattern = Annotated[str, msgspec.Meta(
    pattern=r"^(\*|[a-z][a-z_]*(\.[a-z_]+)*(\.\*)?)$", max_length=64,
    description="an event type (`message.status`), a prefix (`message.*`) or `*` for every event")]
WebhookSecret = Annotated[str, msgspec.Meta(min_length=16, max_length=256, pattern=NO_NUL,
                                            description="HMAC-SHA256 key; generated when not given")]
DeliveryStatus = Literal["pending", "delivered", "failed"]


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


class Webhook(msgspec.Struct):
    id: int
    url: str
    events: list[str]
    description: str
    active: bool
    created_at: dt.datetime
    updated_at: dt.datetime


class WebhookCreated(msgspec.Struct):
    """The webhook and its secret: the only response that shows the secret."""

    id: int
    url: str
    events: list[str]
    description: str
    active: bool
    created_at: dt.datetime
    updated_at: dt.datetime
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


# -- queues ----------------------------------------------------------------------------------------

JobId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]


class QueueStats(msgspec.Struct):
    depth: int
    scheduled: int
    started: int
    failed: int


class QueueWorker(msgspec.Struct):
    name: str
    info: str
    expires_in: int


class QueueOverview(msgspec.Struct):
    queues: dict[str, QueueStats]
    workers: list[QueueWorker]


class FailedJob(msgspec.Struct):
    id: str
    queue: str
    func: str | None
    args: list[Any] | None
    status: str | None
    description: str | None
    enqueued_at: str | None
    ended_at: str | None
    exc_info: str | None
    expires_at: float


class FailedJobQuery(msgspec.Struct, forbid_unknown_fields=True):
    cursor: Annotated[int, msgspec.Meta(ge=0, le=10**9)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


class FailedJobPage(msgspec.Struct):
    items: list[FailedJob]
    next_cursor: int | None


class RequeuedJob(msgspec.Struct):
    id: str
    queue: str
    status: str


# -- events (WebSocket) ----------------------------------------------------------------------------

class EventStreamQuery(msgspec.Struct, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(max_length=4096,
                                       description="access token, if not in Authorization")] | None = None
    topics: Annotated[str, msgspec.Meta(
        pattern=r"^(all|(account|campaign|message):[0-9]{1,19})(,(all|(account|campaign|message):[0-9]{1,19}))*$",
        max_length=4096,
        description="comma-separated: `all` (the default), `account:<id>`, `campaign:<id>`, `message:<id>`",
    )] | None = None
    types: Annotated[str, msgspec.Meta(
        pattern=r"^[a-z][a-z_.]*(,[a-z][a-z_.]*)*$", max_length=1024,
        description="comma-separated event types to receive (default: every type)")] | None = None
    after: Annotated[str, msgspec.Meta(
        pattern=r"^[0-9]{1,19}-[0-9]{1,19}$",
        description="the `id` of the last event received: the events published since are sent first")] | None = None


# -- campaigns, opt-outs, account limits -----------------------------------------------------------

CampaignStatus = Literal["draft", "scheduled", "running", "paused", "completed", "cancelled", "failed"]
Template = Annotated[str, msgspec.Meta(
    min_length=1, max_length=4096, pattern=NO_NUL, examples=["Hi {first_name}!"],
    description="message text; `{first_name}` is filled from the recipient's variables (empty when it "
                "has none), `{peer}` is the recipient, `{{` and `}}` are literal braces")]
VariableName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
VariableValue = Annotated[str, msgspec.Meta(max_length=1024, pattern=NO_NUL)] | int | float | bool | None
AwareDatetime = Annotated[dt.datetime, msgspec.Meta(tz=True)]
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
    idempotency_key: str | None
    error: str | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


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


class AddOptOuts(msgspec.Struct, forbid_unknown_fields=True):
    peers: Annotated[list[Peer], msgspec.Meta(min_length=1, max_length=10_000)]
    reason: Annotated[str, msgspec.Meta(max_length=500, pattern=NO_NUL)] | None = None


class OptOutsAdded(msgspec.Struct):
    added: int


class OptOut(msgspec.Struct):
    peer: str
    peer_key: str
    reason: str | None
    created_at: dt.datetime


class OptOutQuery(msgspec.Struct, forbid_unknown_fields=True):
    # The last page's last peer_key; like every peer, it holds no NUL (which PostgreSQL's text refuses).
    cursor: Annotated[str, msgspec.Meta(max_length=300, pattern=NO_NUL)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class OptOutPage(msgspec.Struct):
    items: list[OptOut]
    next_cursor: str | None


class AccountLimits(msgspec.Struct):
    """What the campaign engine paces the account to; `custom` is false while the defaults apply."""

    account_id: int
    per_second: float
    burst: int
    per_chat_seconds: float
    per_day: int
    warmup_days: int
    warmup_start_per_day: int
    warmup_from: dt.datetime | None
    custom: bool
    # Today's daily limit on the warm-up ramp.
    daily_cap_now: int


class UpdateLimits(msgspec.Struct, forbid_unknown_fields=True):
    """Only the fields given change (DELETE .../limits restores the defaults)."""

    per_second: Annotated[float, msgspec.Meta(ge=0.001, le=1000)] | None = None
    burst: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None
    per_chat_seconds: Annotated[float, msgspec.Meta(ge=0, le=86_400)] | None = None
    per_day: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] | None = None
    warmup_days: Annotated[int, msgspec.Meta(ge=0, le=365)] | None = None
    warmup_start_per_day: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] | None = None
    warmup_from: AwareDatetime | None = None
