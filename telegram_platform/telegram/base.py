"""The one interface the platform talks to Telegram through; TDLib and the emulator implement it.

A backend hosts many account sessions inside one long-lived process that never forks. Sessions
report what happens to them (authorization and connection changes, incoming messages) through an
`UpdateSink` the host passes in, so the worker can store and publish it.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


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
        super().__init__(429, message or f"Too Many Requests: retry after {int(retry_after)}")
        self.retry_after = float(retry_after)


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
    telegram_message_id: int
    chat_id: int


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    account_id: int
    chat_id: int
    telegram_message_id: int
    sender: str
    text: str
    date: int


@dataclass(frozen=True, slots=True)
class AuthStateChanged:
    account_id: int
    state: AuthState


@dataclass(frozen=True, slots=True)
class ConnectionStateChanged:
    account_id: int
    state: ConnectionState


Update = IncomingMessage | AuthStateChanged | ConnectionStateChanged
UpdateSink = Callable[[Update], Awaitable[None]]


class Session(Protocol):
    """One account's live client. Methods raise TelegramError subclasses."""

    @property
    def account_id(self) -> int: ...

    @property
    def auth_state(self) -> AuthState: ...

    @property
    def connection_state(self) -> ConnectionState: ...

    async def start(self) -> AuthState:
        """Open the client; a stored login resumes to READY, otherwise the phone is sent."""

    async def submit_code(self, code: str) -> AuthState: ...

    async def submit_password(self, password: str) -> AuthState: ...

    async def register(self, first_name: str, last_name: str) -> AuthState: ...

    async def send_text(self, peer: str, text: str) -> SentMessage:
        """Send and wait for Telegram's confirmation (updateMessageSendSucceeded), not the response."""

    async def log_out(self) -> None: ...

    async def close(self) -> None:
        """Close the client and wait until it reports closed."""


class TelegramBackend(Protocol):
    """Creates sessions in this process; `aclose` closes every one within the deadline."""

    name: str

    async def open_session(self, config: SessionConfig) -> Session: ...

    def stats(self) -> dict[str, Any]:
        """Clients by auth and connection state, version, receive-loop lag: for /api/tdlib/health."""

    async def aclose(self, deadline: float) -> None: ...
