"""Logging in to the API and refreshing its tokens (`api/routes/auth.py`)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from telegram_platform.api.schemas.fields import Password, Username


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
