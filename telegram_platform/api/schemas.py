"""Request and response shapes; they validate input and generate the OpenAPI document."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec

Username = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
Phone = Annotated[str, msgspec.Meta(pattern=r"^\+?[0-9]{7,15}$", description="E.164 phone number")]
Peer = Annotated[str, msgspec.Meta(min_length=1, max_length=256,
                                   description="a user id, a @username or a phone number")]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
PositiveId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
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
    server: Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    username: str | None = None
    password: str | None = None
    secret: str | None = None
    http_only: bool = False


class CreateAccount(msgspec.Struct, forbid_unknown_fields=True):
    phone: Phone
    proxy: ProxyIn | None = None


class SubmitCode(msgspec.Struct, forbid_unknown_fields=True):
    code: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{3,8}$")]


class SubmitPassword(msgspec.Struct, forbid_unknown_fields=True):
    password: Password


class Register(msgspec.Struct, forbid_unknown_fields=True):
    first_name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    last_name: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Account(msgspec.Struct):
    id: int
    phone: str
    auth_state: str
    connection_state: str | None
    proxy: dict[str, Any] | None
    paused_until: dt.datetime | None
    peer_flood_until: dt.datetime | None
    last_error: str | None
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
    account_id: int
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
    cursor: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,19}$")] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


class MessagePage(msgspec.Struct):
    items: list[Message]
    next_cursor: str | None


class Health(msgspec.Struct):
    status: str
