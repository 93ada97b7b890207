"""Telegram accounts: adding one, its login steps, what it looks like, its sending limits
(`api/routes/accounts.py`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

import msgspec

from telegram_platform.api.schemas.fields import NO_NUL, AwareDatetime, Password, Phone, ShortText

AuthStateName = Literal["wait_phone", "wait_code", "wait_password", "wait_registration", "ready",
                        "logging_out", "closed", "logged_out", "failed"]


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
