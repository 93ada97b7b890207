"""The one interface the platform talks to Telegram through; TDLib and the emulator implement it.

A backend hosts many account sessions inside one long-lived process that never forks. Sessions
report what happens to them (authorization and connection changes, incoming messages) through an
`UpdateSink` the host passes in, so the worker can store and publish it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from telegram_platform.telegram.content import Entity, FormattedText, OutgoingMessage


class AuthState(enum.StrEnum):
    """Authorization states as the API reports them (`auth_state`)."""

    WAIT_PHONE = "wait_phone"
    WAIT_CODE = "wait_code"
    WAIT_PASSWORD = "wait_password"
    WAIT_REGISTRATION = "wait_registration"
    READY = "ready"
    LOGGING_OUT = "logging_out"
    CLOSED = "closed"
    LOGGED_OUT = "logged_out"
    FAILED = "failed"


class ConnectionState(enum.StrEnum):
    WAITING_FOR_NETWORK = "waiting_for_network"
    CONNECTING = "connecting"
    UPDATING = "updating"
    READY = "ready"


ErrorClass = Literal["transient", "rate_limited", "permanent"]
ERROR_CLASSES: Final[tuple[ErrorClass, ...]] = ("transient", "rate_limited", "permanent")


class TelegramError(Exception):
    """An error Telegram (or TDLib) answered with; `error_class` says how the platform reacts."""

    error_class: ErrorClass = "permanent"

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class TransientError(TelegramError):
    """Worth retrying with back-off: network trouble, timeouts, Telegram's 5xx."""

    error_class: ErrorClass = "transient"


class RequestTimeout(TransientError):
    """The request got no answer within its deadline (e.g. the network is unreachable)."""

    def __init__(self, message: str = "request timed out") -> None:
        super().__init__(504, message)


class RateLimited(TelegramError):
    """429 "Too Many Requests: retry after N": the account must not send before `retry_after` passes."""

    error_class: ErrorClass = "rate_limited"

    def __init__(self, retry_after: float, message: str | None = None) -> None:
        super().__init__(429, message or f"Too Many Requests: retry after {max(1, math.ceil(retry_after))}")
        self.retry_after = float(retry_after)


class AccountPaused(RateLimited):
    """The account still waits out an earlier flood wait: nothing was sent to Telegram."""

    def __init__(self, account_id: int, retry_after: float) -> None:
        super().__init__(retry_after, f"account {account_id} is paused by a flood wait for "
                                      f"{retry_after:.1f} s more")


class PeerFlood(TelegramError):
    """PEER_FLOOD: too many messages to non-contacts; the account must stop cold sends."""

    error_class: ErrorClass = "rate_limited"

    def __init__(self, message: str = "PEER_FLOOD") -> None:
        super().__init__(400, message)


class PermanentError(TelegramError):
    """Retrying cannot help: unknown peer, blocked by the user, message too long, and so on."""


class AuthError(PermanentError):
    """A login step was refused (wrong code, wrong password, phone banned)."""


class WrongDatabaseKey(PermanentError):
    """The account's local database does not open with the key derived from ENCRYPTION_KEY."""

    def __init__(self, message: str = "wrong database encryption key") -> None:
        super().__init__(401, message)


class OwnedElsewhere(TelegramError):
    """Another process holds this account's lease: it is the only one allowed to open its database."""

    error_class: ErrorClass = "transient"

    def __init__(self, account_id: int, owner: str) -> None:
        super().__init__(409, f"account {account_id} is owned by {owner}")
        self.account_id = account_id
        self.owner = owner


class NotAuthorized(PermanentError):
    """The session is not logged in (auth_state is not `ready`)."""

    def __init__(self, state: AuthState) -> None:
        super().__init__(401, f"account is not ready (auth_state={state})")
        self.state = state


# -- one classification for both backends -----------------------------------------------------------

# TDLib words a flood wait "Too Many Requests: retry after N"; raw MTProto says FLOOD_WAIT_N (420).
_RETRY_AFTER: Final = re.compile(r"(?:retry after |FLOOD_WAIT_|SLOWMODE_WAIT_)(\d+)", re.IGNORECASE)
# When a 429 names no delay (it always does in TDLib 1.8), wait this long rather than hammer.
DEFAULT_RETRY_AFTER: Final = 60.0
# Login-step refusals Telegram gives outside an explicit auth step too (e.g. a stale code).
AUTH_ERROR_MESSAGES: Final = frozenset({
    "PHONE_CODE_INVALID", "PHONE_CODE_EXPIRED", "PHONE_CODE_EMPTY", "PASSWORD_HASH_INVALID",
    "PHONE_NUMBER_INVALID", "PHONE_NUMBER_BANNED", "PHONE_NUMBER_UNOCCUPIED", "FIRSTNAME_INVALID",
    "LASTNAME_INVALID", "PASSWORD_NOT_REQUESTED", "SESSION_PASSWORD_NEEDED",
})


def classify_error(code: int, message: str, *, auth_step: bool = False,
                   retry_after: float | None = None) -> TelegramError:
    """Map an error as TDLib words it (code, message) to the class that decides the platform's reaction.

    rate_limited: 429/420 flood waits (retry_after parsed from the message unless given) and PEER_FLOOD;
    transient: Telegram's or TDLib's 5xx, request timeouts (408), TDLib's internal negative codes;
    permanent: the rest; a 4xx during a login step (or a known login refusal) is an AuthError.
    Both backends use this one function, so both classify the same error the same way.
    """
    upper = message.upper()
    if code in (420, 429) or upper.startswith("FLOOD_WAIT") or "SLOWMODE_WAIT" in upper:
        if retry_after is None:
            match = _RETRY_AFTER.search(message)
            retry_after = float(match.group(1)) if match else DEFAULT_RETRY_AFTER
        return RateLimited(max(1.0, retry_after), message)
    if "PEER_FLOOD" in upper:
        return PeerFlood(message)
    if code >= 500 or code <= 0 or code == 408:
        return TransientError(code, message)
    if 400 <= code < 500 and (auth_step or message in AUTH_ERROR_MESSAGES):
        return AuthError(code, message)
    return PermanentError(code, message)


# -- what both backends count, for the health route and the metrics ---------------------------------

@dataclass(slots=True)
class BackendCounters:
    """Monotonic counts since the backend started; exported as tdlib_*_total by the metrics."""

    sessions_total: int = 0
    requests_total: int = 0
    errors_total: Counter[str] = field(default_factory=Counter)

    def error(self, error: TelegramError) -> None:
        self.errors_total[error.error_class] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"sessions_total": self.sessions_total, "requests_total": self.requests_total,
                "errors_total": {cls: self.errors_total.get(cls, 0) for cls in ERROR_CLASSES}}


# telegram-bot-api's watchdog calls the main thread stalled after 0.25 s; so do we.
STALL_THRESHOLD_SECONDS: Final = 0.25
# The reason of a LOGGED_OUT the platform did not ask for: the session was ended at Telegram (from
# another device, or by Telegram), and only a new login brings the account back.
LOGGED_OUT_AT_TELEGRAM: Final = "logged out at Telegram: the session was terminated; log in again"
LAG_WINDOW_SECONDS: Final = 60.0


class LagWindow:
    """Max event-handling delay over the last one to two windows: recent, yet not one sample."""

    def __init__(self, window: float = LAG_WINDOW_SECONDS) -> None:
        self._window = window
        self._started = time.monotonic()
        self._current = 0.0
        self._previous = 0.0
        self.last = 0.0

    def _rotate(self, now: float) -> None:
        if now - self._started >= self._window:
            elapsed_windows = (now - self._started) // self._window
            self._previous = self._current if elapsed_windows == 1 else 0.0
            self._current = 0.0
            self._started += elapsed_windows * self._window

    def record(self, lag: float) -> None:
        self._rotate(time.monotonic())
        self.last = lag
        self._current = max(self._current, lag)

    def value(self) -> float:
        self._rotate(time.monotonic())
        return max(self._current, self._previous)


@dataclass(frozen=True, slots=True)
class Proxy:
    """A proxy as TDLib's addProxy takes it."""

    type: Literal["socks5", "http", "mtproto"]
    server: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    http_only: bool = False

    def to_tdlib(self) -> dict[str, Any]:
        proxy_type: dict[str, Any]
        if self.type == "socks5":
            proxy_type = {"@type": "proxyTypeSocks5", "username": self.username or "",
                          "password": self.password or ""}
        elif self.type == "http":
            proxy_type = {"@type": "proxyTypeHttp", "username": self.username or "",
                          "password": self.password or "", "http_only": self.http_only}
        else:
            proxy_type = {"@type": "proxyTypeMtproto", "secret": self.secret or ""}
        return {"@type": "addProxy", "enable": True,
                "proxy": {"@type": "proxy", "server": self.server, "port": self.port, "type": proxy_type}}


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What a backend needs to open one account's session."""

    account_id: int
    phone: str = field(repr=False)
    # Derived per account from ENCRYPTION_KEY (see telegram.keys); never stored.
    database_key: bytes = field(repr=False)
    proxy: Proxy | None = None


@dataclass(frozen=True, slots=True)
class SentMessage:
    """What Telegram accepted for one send: every message it made (an album makes one per item, in
    order), `telegram_message_id` being the first."""

    telegram_message_id: int
    chat_id: int
    telegram_message_ids: tuple[int, ...] = ()
    # Telegram's remote id of each file the send carried, in order ("" where it gave none): the
    # account's later sends of the same file reuse it instead of uploading.
    remote_file_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.telegram_message_ids:
            object.__setattr__(self, "telegram_message_ids", (self.telegram_message_id,))


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A message an account received: its text (a caption, for media) with entities, the message
    it replies to (Telegram's id, same chat), who a forward came from ({"type": "user"|"chat"|
    "channel"|"hidden_user", "id"?, "name"?, "message_id"?}), its kind (`text`, or a MediaKind
    value) and the media's metadata."""

    account_id: int
    chat_id: int
    telegram_message_id: int
    sender: str
    text: str
    date: int
    entities: tuple[Entity, ...] = ()
    reply_to: int | None = None
    forward_from: Mapping[str, Any] | None = None
    kind: str = "text"
    media: Mapping[str, Any] | None = None

    def extra_json(self) -> dict[str, Any]:
        """What the six first fields do not say, as JSON (the updates queue's job argument, the spool)."""
        return {"entities": [e.to_json() for e in self.entities], "reply_to": self.reply_to,
                "forward_from": dict(self.forward_from) if self.forward_from is not None else None,
                "kind": self.kind, "media": dict(self.media) if self.media is not None else None}

    def with_extra(self, extra: Mapping[str, Any] | None) -> IncomingMessage:
        """This message with what `extra_json` wrote (None: a plain text message)."""
        if not extra:
            return self
        return dataclasses.replace(
            self, entities=tuple(Entity.from_json(e) for e in extra.get("entities") or ()),
            reply_to=extra.get("reply_to"), forward_from=extra.get("forward_from"),
            kind=str(extra.get("kind") or "text"), media=extra.get("media"))


@dataclass(frozen=True, slots=True)
class IncomingEdited:
    """A message of the account's chats was edited (by its sender): its new text and entities."""

    account_id: int
    chat_id: int
    telegram_message_id: int
    text: FormattedText
    date: int


@dataclass(frozen=True, slots=True)
class MessagesDeleted:
    """Messages of a chat were deleted for the account (by their sender, or for everyone)."""

    account_id: int
    chat_id: int
    telegram_message_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ReadOutbox:
    """The other side read the account's messages in `chat_id` up to `max_message_id` (a read receipt)."""

    account_id: int
    chat_id: int
    max_message_id: int


@dataclass(frozen=True, slots=True)
class AuthStateChanged:
    account_id: int
    state: AuthState
    # Why, for a change the platform did not ask for (a session FAILED, or logged out at Telegram):
    # the account's `last_error`.
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ConnectionStateChanged:
    account_id: int
    state: ConnectionState


def change_to_json(change: MessageChange) -> dict[str, Any]:
    """An edit, deletion or read receipt as JSON (the updates queue's job argument)."""
    if isinstance(change, IncomingEdited):
        return {"kind": "edited", "account_id": change.account_id, "chat_id": change.chat_id,
                "message_id": change.telegram_message_id, "text": change.text.text,
                "entities": change.text.entities_json(), "date": change.date}
    if isinstance(change, MessagesDeleted):
        return {"kind": "deleted", "account_id": change.account_id, "chat_id": change.chat_id,
                "message_ids": list(change.telegram_message_ids)}
    return {"kind": "read_outbox", "account_id": change.account_id, "chat_id": change.chat_id,
            "max_message_id": change.max_message_id}


def change_from_json(data: Mapping[str, Any]) -> MessageChange:
    """What `change_to_json` wrote (KeyError, ValueError: not a change)."""
    kind, account_id, chat_id = data["kind"], int(data["account_id"]), int(data["chat_id"])
    if kind == "edited":
        return IncomingEdited(account_id, chat_id, int(data["message_id"]),
                              FormattedText.from_json(str(data["text"]), data.get("entities")), int(data["date"]))
    if kind == "deleted":
        return MessagesDeleted(account_id, chat_id, tuple(int(i) for i in data["message_ids"]))
    if kind == "read_outbox":
        return ReadOutbox(account_id, chat_id, int(data["max_message_id"]))
    raise ValueError(f"not a message change: {kind!r}")


Update = (IncomingMessage | IncomingEdited | MessagesDeleted | ReadOutbox | AuthStateChanged
          | ConnectionStateChanged)
# What a chat's messages went through, beside new ones: stored and published by the worker.
MessageChange = IncomingEdited | MessagesDeleted | ReadOutbox
UpdateSink = Callable[[Update], Awaitable[None]]


class Session(Protocol):
    """One account's live client. Methods raise TelegramError subclasses."""

    @property
    def account_id(self) -> int: ...

    @property
    def auth_state(self) -> AuthState: ...

    @property
    def connection_state(self) -> ConnectionState: ...

    async def start(self, *, phone_timeout: float | None = None) -> AuthState:
        """Open the client; a stored login resumes to READY, otherwise the phone is sent.

        Telegram's answer to the phone is awaited at most `phone_timeout` seconds (None: the request
        timeout); past that the state stays WAIT_PHONE (connection `connecting`) and the login goes
        on in the background, reporting its next state through the sink.
        """

    async def submit_code(self, code: str) -> AuthState: ...

    async def submit_password(self, password: str) -> AuthState: ...

    async def register(self, first_name: str, last_name: str) -> AuthState: ...

    async def send(self, peer: str, message: OutgoingMessage, *, random_id: int | None = None) -> SentMessage:
        """Send `message` (its formatted text, reply and options) and wait for Telegram's confirmation
        (updateMessageSendSucceeded), not the response.

        `random_id` is the platform's id of the message, the same on every attempt: a backend that
        `sends_random_id` puts it on the wire, so Telegram drops a re-send; others ignore it."""

    async def download_file(self, remote_id: str) -> Path:
        """The file of a received message (`IncomingMedia.remote_id`), downloaded whole to this host:
        its local path, which the caller removes once it copied the file (TDLib notices a removed
        file and downloads it again if asked)."""
    async def forward(self, from_peer: str, message_ids: Sequence[int], to_peer: str, *,
                      random_id: int | None = None) -> SentMessage:
        """Forward messages of the chat `from_peer` (Telegram's ids) to `to_peer` and wait until
        Telegram confirmed the copies; their ids in order."""

    async def edit(self, peer: str, message_id: int, text: FormattedText, *, caption: bool = False) -> None:
        """Replace the text (or, with `caption`, a media message's caption) of a message the account
        sent to `peer`. Telegram refuses one older than 48 hours (MESSAGE_EDIT_TIME_EXPIRED) and an
        edit that changes nothing (MESSAGE_NOT_MODIFIED)."""

    async def delete(self, peer: str, message_ids: Sequence[int], *, for_everyone: bool) -> None:
        """Delete messages of the chat with `peer`: for the account only, or for everyone (revoke)."""

    async def view(self, peer: str, message_ids: Sequence[int]) -> None:
        """Mark messages the account received from `peer` as read: the sender sees them read."""

    async def me(self) -> int:
        """The logged-in account's Telegram user id (TDLib's getMe), which operators match against
        what they see in Telegram; NotAuthorized before READY. Asked once, then remembered."""

    async def log_out(self) -> None: ...

    async def close(self) -> None:
        """Close the client and wait until it reports closed."""


class TelegramBackend(Protocol):
    """Creates sessions in this process; `aclose` closes every one within the deadline."""

    name: str
    # Does a session's send carry the platform's random_id to Telegram? Then re-sending a message
    # whose outcome is unknown is safe (worker/unknown_outcomes.py).
    sends_random_id: bool
    # The files of an account's database directory that a new owner needs to resume it without a
    # new login (worker/tdstate.py snapshots them); the rest of the directory is a cache.
    state_files: tuple[str, ...]

    async def open_session(self, config: SessionConfig) -> Session: ...

    def database_dir(self, account_id: int) -> Path:
        """The directory of the account's local database (its login, kept across restarts)."""

    def stats(self) -> dict[str, Any]:
        """For /api/tdlib/health and the metrics. Keys every backend reports:

        backend, version, client_count, clients (by auth state), connection (by connection state),
        sessions_total, requests_total, errors_total (by error class), pending_requests,
        updates_queued, queue_depth, receive_loop_lag_seconds, stalled.
        """

    async def aclose(self, deadline: float) -> None: ...
