"""The one table that turns Telegram's errors into the errors the API answers an account request with."""

from __future__ import annotations

from telegram_platform.telegram.base import (
    AuthError,
    OwnedElsewhere,
    PermanentError,
    RequestTimeout,
    TelegramError,
    WrongDatabaseKey,
)
from telegram_platform.worker.account_requests import platform_error


def _answer(exc: TelegramError, op: str) -> tuple[int, str, str, dict[str, object]]:
    error = platform_error(exc, op)
    return error.status, error.code, error.message, error.details


def test_each_telegram_error_answers_its_status_code_and_details() -> None:
    """Owned elsewhere and a wrong database key conflict (409), a refused step names its field (422),
    and any other Telegram error is a bad gateway, or unavailable when it is transient."""
    assert _answer(OwnedElsewhere(7, "host-a"), "code") == (
        409, "owned_elsewhere", "409: account 7 is owned by host-a", {"owner": "host-a"})
    status, code, message, details = _answer(WrongDatabaseKey(), "login_again")
    assert (status, code, details) == (409, "wrong_database_key", {"auth_state": "failed"})
    assert message.startswith("wrong database encryption key: ") and "set_aside_database=true" in message
    assert _answer(AuthError(400, "PHONE_CODE_INVALID"), "code") == (
        422, "auth_rejected", "PHONE_CODE_INVALID", {"field": "code"})
    assert _answer(AuthError(400, "FIRSTNAME_INVALID"), "register")[3] == {"field": "first_name"}
    assert _answer(AuthError(400, "PHONE_NUMBER_BANNED"), "login")[3] == {"field": "phone"}
    assert _answer(PermanentError(400, "PEER_ID_INVALID"), "status") == (
        502, "telegram_error", "PEER_ID_INVALID", {"error_class": "permanent"})
    assert _answer(RequestTimeout(), "login")[:2] == (503, "telegram_error")
