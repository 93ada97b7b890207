"""The platform's users and their roles (`api/routes/users.py`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from telegram_platform.api.schemas.fields import Username

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
