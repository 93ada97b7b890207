"""TDLib's JSON vocabulary: its authorization and connection states, the updates a session acts on,
its errors in the platform's classes, a client's parameters, the JSON encoding of queries and
`execute` (the synchronous, client-less calls). No state and no clients: the words, not the conversation.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import tdjson

from telegram_platform import __version__
from telegram_platform.settings import TdlibSettings
from telegram_platform.telegram.base import AuthState, ConnectionState, TelegramError, classify_error

Event = dict[str, Any]

AUTH_STATES: Final[Mapping[str, AuthState]] = {
    "authorizationStateWaitPhoneNumber": AuthState.WAIT_PHONE,
    "authorizationStateWaitCode": AuthState.WAIT_CODE,
    "authorizationStateWaitPassword": AuthState.WAIT_PASSWORD,
    "authorizationStateWaitRegistration": AuthState.WAIT_REGISTRATION,
    "authorizationStateReady": AuthState.READY,
    "authorizationStateLoggingOut": AuthState.LOGGING_OUT,
    "authorizationStateClosing": AuthState.CLOSED,
    "authorizationStateClosed": AuthState.CLOSED,
}
CONNECTION_STATES: Final[Mapping[str, ConnectionState]] = {
    "connectionStateWaitingForNetwork": ConnectionState.WAITING_FOR_NETWORK,
    "connectionStateConnectingToProxy": ConnectionState.CONNECTING,
    "connectionStateConnecting": ConnectionState.CONNECTING,
    "connectionStateUpdating": ConnectionState.UPDATING,
    "connectionStateReady": ConnectionState.READY,
}
# Updates a session acts on; the receive thread drops every other update unparsed (a new client alone
# sends ~100 updateOption), so the loop only sees what matters.
HANDLED_UPDATES: Final = frozenset({
    "updateAuthorizationState",
    "updateConnectionState",
    "updateMessageSendSucceeded",
    "updateMessageSendFailed",
    "updateNewMessage",
    "updateMessageContent",
    "updateDeleteMessages",
    "updateChatReadOutbox",
})
_TYPE_PREFIX: Final = b'{"@type":"'


def map_error(code: int, message: str, *, auth_step: bool = False) -> TelegramError:
    """Turn a TDLib `error` into the platform's error classes (the one classifier both backends share)."""
    return classify_error(code, message, auth_step=auth_step)


def tdlib_parameters(settings: TdlibSettings, directory: Path, database_key: bytes) -> Event:
    """The `setTdlibParameters` query: who this client is and where its encrypted database lives."""
    return {
        "@type": "setTdlibParameters",
        "use_test_dc": settings.use_test_dc,
        "database_directory": str(directory),
        "files_directory": str(directory / "files"),
        "database_encryption_key": base64.b64encode(database_key).decode(),
        "use_file_database": False,
        "use_chat_info_database": True,
        # TDLib re-sends pending messages itself after a restart.
        "use_message_database": True,
        "use_secret_chats": False,
        "api_id": settings.api_id,
        "api_hash": settings.api_hash,
        "system_language_code": "en",
        "device_model": "telegram-platform",
        "system_version": "",
        "application_version": __version__,
    }


def encode(query: Mapping[str, Any]) -> bytes:
    return json.dumps(query, separators=(",", ":"), ensure_ascii=False).encode()


def execute(query: Mapping[str, Any]) -> Event | None:
    """td_execute: the synchronous, client-less TDLib calls (log settings, options)."""
    raw = tdjson.td_execute(encode(query))
    if raw is None:
        return None
    result: Event = json.loads(raw)
    return result


def event_type(raw: bytes) -> str | None:
    """The @type of a raw event without parsing it: TDLib always writes @type first."""
    if raw.startswith(_TYPE_PREFIX):
        end = raw.find(b'"', len(_TYPE_PREFIX))
        if end > 0:
            return raw[len(_TYPE_PREFIX):end].decode("ascii", "replace")
    return None
