"""The real Telegram backend: many accounts' TDLib clients in one process, fed by one receive thread.

TDLib's JSON interface allows exactly one `td_receive` caller per process (two abort the process), so a
`TdlibBackend` owns the only receive thread and only one backend may exist per process at a time
(`BackendAlreadyRunning` otherwise; `aclose` releases the slot). The thread batches what it receives
and hands each batch to the event loop with one `call_soon_threadsafe`; there each event goes, by its
`@client_id`, to its `TdlibSession`. Requests are matched to answers by `@extra`.

TDLib's own log: `log_verbosity` applies as configured. Without `log_file`, a verbosity above 1 would
flood stderr, so the log then goes to `<data_dir>/tdlib.log` (10 MB, rotated by TDLib) instead of
silently dropping the detail the operator asked for.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

import structlog
import tdjson

from telegram_platform import __version__
from telegram_platform.logs import detached_context
from telegram_platform.settings import ConfigError, TdlibSettings
from telegram_platform.telegram.base import (
    LOGGED_OUT_AT_TELEGRAM,
    STALL_THRESHOLD_SECONDS,
    AuthError,
    AuthState,
    AuthStateChanged,
    BackendCounters,
    ConnectionState,
    ConnectionStateChanged,
    IncomingMessage,
    LagWindow,
    NotAuthorized,
    OwnedElsewhere,
    PermanentError,
    RequestTimeout,
    SentMessage,
    SessionConfig,
    TelegramError,
    TransientError,
    Update,
    UpdateSink,
    WrongDatabaseKey,
    classify_error,
)
from telegram_platform.telegram.keys import account_database_dir

log = structlog.get_logger(__name__)

Event = dict[str, Any]

TDLIB_VERSION_FALLBACK: Final = "1.8.69"
# Back-pressure: requests one client may have awaiting an answer; more wait for a slot.
MAX_IN_FLIGHT_PER_CLIENT: Final = 1000
LOG_FILE_MAX_BYTES: Final = 10 * 1024 * 1024
# How long one td_receive blocks: bounds how long stopping the thread takes.
RECEIVE_TIMEOUT_SECONDS: Final = 0.5
# Clients opening their database at once (see TdlibSession.start).
MAX_CONCURRENT_OPENS: Final = 32
# Events handed to the loop in one call_soon_threadsafe, at most.
MAX_BATCH: Final = 1000
# Back-pressure: past this many updates waiting for the sink, the receive thread stops taking events
# (TDLib buffers them meanwhile) until the sink catches up.
MAX_UPDATES_QUEUED: Final = 10_000
BACKLOG_PAUSE_SECONDS: Final = 0.05
# Resolved peers kept per account: username resolution is limited to about 200 a day per account.
PEER_CACHE_SIZE: Final = 10_000
# A peer that did not resolve (unknown username, no such phone) is not asked again for this long.
PEER_MISS_TTL_SECONDS: Final = 600.0
# After a login step is accepted, how long to wait for TDLib to report the next state.
_STATE_SETTLE_SECONDS: Final = 5.0

_AUTH_STATES: Final[Mapping[str, AuthState]] = {
    "authorizationStateWaitPhoneNumber": AuthState.WAIT_PHONE,
    "authorizationStateWaitCode": AuthState.WAIT_CODE,
    "authorizationStateWaitPassword": AuthState.WAIT_PASSWORD,
    "authorizationStateWaitRegistration": AuthState.WAIT_REGISTRATION,
    "authorizationStateReady": AuthState.READY,
    "authorizationStateLoggingOut": AuthState.LOGGING_OUT,
    "authorizationStateClosing": AuthState.CLOSED,
    "authorizationStateClosed": AuthState.CLOSED,
}
_CONNECTION_STATES: Final[Mapping[str, ConnectionState]] = {
    "connectionStateWaitingForNetwork": ConnectionState.WAITING_FOR_NETWORK,
    "connectionStateConnectingToProxy": ConnectionState.CONNECTING,
    "connectionStateConnecting": ConnectionState.CONNECTING,
    "connectionStateUpdating": ConnectionState.UPDATING,
    "connectionStateReady": ConnectionState.READY,
}
# Updates a session acts on; the receive thread drops every other update unparsed (a new client alone
# sends ~100 updateOption), so the loop only sees what matters.
_HANDLED_UPDATES: Final = frozenset({
    "updateAuthorizationState",
    "updateConnectionState",
    "updateMessageSendSucceeded",
    "updateMessageSendFailed",
    "updateNewMessage",
})
_TYPE_PREFIX: Final = b'{"@type":"'
_CHAT_ID = re.compile(r"-\d+")
_USER_ID = re.compile(r"\d+")
_PHONE = re.compile(r"\+\d{5,15}")
_USERNAME = re.compile(r"@[A-Za-z0-9_]{3,64}")


class BackendAlreadyRunning(RuntimeError):
    """A second TdlibBackend in one process would be a second td_receive caller, which aborts TDLib."""


def map_error(code: int, message: str, *, auth_step: bool = False) -> TelegramError:
    """Turn a TDLib `error` into the platform's error classes (the one classifier both backends share)."""
    return classify_error(code, message, auth_step=auth_step)


def _encode(query: Mapping[str, Any]) -> bytes:
    return json.dumps(query, separators=(",", ":"), ensure_ascii=False).encode()


def _execute(query: Mapping[str, Any]) -> Event | None:
    """td_execute: the synchronous, client-less TDLib calls (log settings, options)."""
    raw = tdjson.td_execute(_encode(query))
    if raw is None:
        return None
    result: Event = json.loads(raw)
    return result


def _event_type(raw: bytes) -> str | None:
    """The @type of a raw event without parsing it: TDLib always writes @type first."""
    if raw.startswith(_TYPE_PREFIX):
        end = raw.find(b'"', len(_TYPE_PREFIX))
        if end > 0:
            return raw[len(_TYPE_PREFIX):end].decode("ascii", "replace")
    return None


class PeerCache:
    """One account's resolved peers (peer -> chat id); the least recently used go past `size`.

    The backend keeps it per account, not per session, so a reopened session (a new login step, a
    lease regained, a restart of the session) reuses what was resolved. A peer that failed to resolve
    permanently is remembered for `miss_ttl` seconds: asking again would spend the daily budget.
    """

    def __init__(self, size: int = PEER_CACHE_SIZE, miss_ttl: float = PEER_MISS_TTL_SECONDS) -> None:
        self.size = size
        self.miss_ttl = miss_ttl
        self._entries: OrderedDict[str, int | tuple[float, TelegramError]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, peer: str) -> int | None:
        """The cached chat id; raises the remembered error of a recent miss; None if unknown."""
        entry = self._entries.get(peer)
        if entry is None:
            return None
        if isinstance(entry, tuple):
            until, error = entry
            if time.monotonic() >= until:
                del self._entries[peer]
                return None
            raise error.with_traceback(None)  # the same error each time, without piling up tracebacks
        self._entries.move_to_end(peer)
        return entry

    def put(self, peer: str, chat_id: int) -> None:
        self._set(peer, chat_id)

    def miss(self, peer: str, error: TelegramError) -> None:
        self._set(peer, (time.monotonic() + self.miss_ttl, error))

    def _set(self, peer: str, entry: int | tuple[float, TelegramError]) -> None:
        self._entries[peer] = entry
        self._entries.move_to_end(peer)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Event]
    # Runs inside dispatch, before any later event of the same batch: lets send_text register its
    # confirmation waiter before updateMessageSendSucceeded can arrive.
    on_result: Callable[[Event], None] | None


class TdlibSession:
    """One account's TDLib client. Created by `TdlibBackend.open_session`; driven by its events.

    `auth_state` is CLOSED until TDLib has opened the database, FAILED (and stays so) once opening it
    failed, and LOGGED_OUT when the client closed after logging out.
    """

    def __init__(self, backend: TdlibBackend, client_id: int, config: SessionConfig) -> None:
        self._backend = backend
        self._client_id = client_id
        self._config = config
        self._auth_state = AuthState.CLOSED
        self._td_auth: str | None = None
        self._connection_state = ConnectionState.WAITING_FOR_NETWORK
        self._pending: dict[int, _Pending] = {}
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT_PER_CLIENT)
        self._send_waiters: dict[tuple[int, int], asyncio.Future[SentMessage]] = {}
        self._peers = backend.peer_cache(config.account_id)
        self._changed = asyncio.Event()
        self._closed = asyncio.Event()
        self._started = False
        self._opened = False
        self._close_sent = False
        self._failure: TelegramError | None = None
        self._saw_logging_out = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._user_id: int | None = None
        self._logout_asked = False

    # -- Session interface -------------------------------------------------------------------------

    @property
    def account_id(self) -> int:
        return self._config.account_id

    @property
    def client_id(self) -> int:
        return self._client_id

    @property
    def auth_state(self) -> AuthState:
        return self._auth_state

    @property
    def connection_state(self) -> ConnectionState:
        return self._connection_state

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def start(self, *, phone_timeout: float | None = None) -> AuthState:
        """Open the database (a stored login resumes) and, at WAIT_PHONE, send the phone number.

        Returns once the state needs the caller. The phone's answer needs Telegram; it is awaited at most
        `phone_timeout` (default: the request timeout; 0 = do not wait) and then left to TDLib, which
        still completes it when the network comes back (the new state arrives through the sink).
        """
        if self._failure is not None:
            raise self._failure
        if self._closed.is_set():
            raise PermanentError(400, f"account {self.account_id}: the session is closed")
        timeout = self._backend.request_timeout

        def opened() -> bool:
            return self._failure is not None or self._closed.is_set() or self._opened

        if not self._started:
            # A client's first request creates it synchronously inside td_send: a burst of
            # starts would block the loop; the bound spreads them (the wait here is not timed).
            async with self._backend.opening:
                if not self._started:
                    self._started = True
                    # The first request wakes the client; updateAuthorizationState drives the opening.
                    await self._call({"@type": "getAuthorizationState"}, within=timeout)
                settled = await self._wait_until(opened, timeout)
        else:
            settled = await self._wait_until(opened, timeout)
        if self._failure is not None:
            raise self._failure
        if not settled:
            raise RequestTimeout(
                f"account {self.account_id}: TDLib did not open the database in {timeout:g} s")
        if self._auth_state is AuthState.WAIT_PHONE:
            await self._send_phone(timeout if phone_timeout is None else phone_timeout)
        return self._auth_state

    async def submit_code(self, code: str) -> AuthState:
        return await self._auth_step({"@type": "checkAuthenticationCode", "code": code}, AuthState.WAIT_CODE)

    async def submit_password(self, password: str) -> AuthState:
        return await self._auth_step(
            {"@type": "checkAuthenticationPassword", "password": password}, AuthState.WAIT_PASSWORD)

    async def register(self, first_name: str, last_name: str) -> AuthState:
        return await self._auth_step(
            {"@type": "registerUser", "first_name": first_name, "last_name": last_name,
             "disable_notification": False},
            AuthState.WAIT_REGISTRATION)

    async def send_text(self, peer: str, text: str, *, random_id: int | None = None,
                        within: float | None = None) -> SentMessage:
        """Send and wait for updateMessageSendSucceeded, all `within` seconds (default: request timeout).
        `random_id` is ignored: TDLib chooses each message's random_id itself (sends_random_id False).

        On RequestTimeout the message may still be sent: TDLib keeps it queued (and, with the message
        database, re-sends it after a restart), so a blind retry can deliver it twice.
        """
        if self._auth_state is not AuthState.READY:
            raise NotAuthorized(self._auth_state)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._backend.timeout(within)
        chat_id = await self._resolve_peer(peer, deadline)
        outcome: asyncio.Future[SentMessage] = loop.create_future()
        keys: list[tuple[int, int]] = []

        def expect_outcome(response: Event) -> None:
            if response.get("@type") == "message" and response.get("sending_state") is not None:
                key = (int(response["chat_id"]), int(response["id"]))
                keys.append(key)
                self._send_waiters[key] = outcome

        query = {"@type": "sendMessage", "chat_id": chat_id,
                 "input_message_content": {"@type": "inputMessageText",
                                           "text": {"@type": "formattedText", "text": text}}}
        try:
            message = await self._call(query, within=max(0.0, deadline - loop.time()),
                                       on_result=expect_outcome)
            if not keys:  # no sending state: TDLib reports it sent already
                return SentMessage(telegram_message_id=int(message["id"]), chat_id=int(message["chat_id"]))
            try:
                async with asyncio.timeout_at(deadline):
                    return await outcome
            except TimeoutError:
                raise RequestTimeout(
                    f"account {self.account_id}: message not confirmed by Telegram in time; "
                    "TDLib keeps it queued and may still send it") from None
        finally:
            for key in keys:
                self._send_waiters.pop(key, None)

    async def me(self) -> int:
        if self._auth_state is not AuthState.READY:
            raise NotAuthorized(self._auth_state)
        if self._user_id is None:
            user = await self._call({"@type": "getMe"}, within=None)  # from TDLib's cache once logged in
            self._user_id = int(user["id"])
        return self._user_id

    async def log_out(self) -> None:
        """Log out at Telegram (TDLib deletes the local database) and wait until the client closed."""
        if not self._started or self._closed.is_set():
            raise NotAuthorized(self._auth_state)
        self._logout_asked = True
        await self._call({"@type": "logOut"}, within=None)
        await self._wait_closed(time.monotonic() + self._backend.request_timeout)

    async def close(self, *, within: float | None = None) -> None:
        """Send `close` and wait for authorizationStateClosed; unregister even if it does not come."""
        await self.close_until(time.monotonic() + self._backend.timeout(within))

    async def close_until(self, deadline: float) -> None:
        """`close` with a time.monotonic() deadline; raises RequestTimeout if TDLib did not close."""
        if self._closed.is_set():
            return
        if not self._started:
            # Nothing was ever sent, so TDLib never created the client: nothing to close.
            self._finish_closed()
            return
        if not self._close_sent:
            self._close_sent = True
            self._backend.send(self._client_id, {"@type": "close"})
        await self._wait_closed(deadline)

    async def request(self, query: Mapping[str, Any], *, within: float | None = None) -> Event:
        """Any TDLib method the Session interface lacks; the answer, or a mapped TelegramError."""
        return await self._call(query, within=within)

    # -- requests ----------------------------------------------------------------------------------

    async def _call(self, query: Mapping[str, Any], *, within: float | None, auth_step: bool = False,
                    on_result: Callable[[Event], None] | None = None) -> Event:
        if self._closed.is_set():
            raise TransientError(500, f"account {self.account_id}: the client is closed")
        seconds = self._backend.timeout(within)
        loop = asyncio.get_running_loop()
        self._backend.counters.requests_total += 1
        try:
            async with asyncio.timeout(seconds), self._in_flight:
                extra = self._backend.next_extra()
                future: asyncio.Future[Event] = loop.create_future()
                self._pending[extra] = _Pending(future, on_result)
                try:
                    self._backend.send(self._client_id, {**query, "@extra": extra})
                    response = await future
                finally:
                    self._pending.pop(extra, None)
        except TimeoutError:
            timeout = RequestTimeout(f"{query.get('@type')}: no answer within {seconds:g} s")
            self._backend.counters.error(timeout)
            raise timeout from None
        if response.get("@type") == "error":
            raise self._error(response, auth_step=auth_step)
        return response

    def _error(self, error: Mapping[str, Any], *, auth_step: bool) -> TelegramError:
        code = int(error.get("code", 0))
        message = str(error.get("message", ""))
        mapped: TelegramError
        if code == 401 and message == "Unauthorized" and not auth_step:
            mapped = NotAuthorized(self._auth_state)
        else:
            mapped = classify_error(code, message, auth_step=auth_step)
        self._backend.counters.error(mapped)
        return mapped

    async def _send_phone(self, within: float) -> None:
        query = {"@type": "setAuthenticationPhoneNumber", "phone_number": self._config.phone,
                 "settings": None}
        try:
            await self._call(query, within=within, auth_step=True)
        except RequestTimeout:
            log.info("tdlib.phone_pending", account_id=self.account_id)
            return
        except TransientError:
            if self._closed.is_set() or self._close_sent:
                return  # closed meanwhile: TDLib aborted the request
            raise
        await self._wait_until(lambda: self._auth_state is not AuthState.WAIT_PHONE,
                               min(_STATE_SETTLE_SECONDS, self._backend.request_timeout))

    async def _auth_step(self, query: Mapping[str, Any], state: AuthState) -> AuthState:
        await self._call(query, within=None, auth_step=True)
        # The new state usually arrives before the `ok`; wait briefly in case it does not.
        await self._wait_until(lambda: self._auth_state is not state,
                               min(_STATE_SETTLE_SECONDS, self._backend.request_timeout))
        return self._auth_state

    async def _resolve_peer(self, peer: str, deadline: float) -> int:
        """Peer → chat id, cached per account: username lookups are limited (~200 a day per account)."""
        peer = peer.strip()
        cached = self._peers.get(peer)
        if cached is not None:
            return cached
        try:
            chat_id = await self._lookup_peer(peer, deadline)
        except (NotAuthorized, AuthError):
            raise
        except PermanentError as exc:  # e.g. USERNAME_NOT_OCCUPIED: the same answer for a while
            self._peers.miss(peer, exc)
            raise
        self._peers.put(peer, chat_id)
        return chat_id

    async def _lookup_peer(self, peer: str, deadline: float) -> int:
        loop = asyncio.get_running_loop()

        def remaining() -> float:
            return max(0.0, deadline - loop.time())

        if _CHAT_ID.fullmatch(peer):
            chat = await self._call({"@type": "getChat", "chat_id": int(peer)}, within=remaining())
        elif _USER_ID.fullmatch(peer):
            chat = await self._call({"@type": "createPrivateChat", "user_id": int(peer), "force": False},
                                    within=remaining())
        elif _USERNAME.fullmatch(peer):
            chat = await self._call({"@type": "searchPublicChat", "username": peer[1:]}, within=remaining())
        elif _PHONE.fullmatch(peer):
            user = await self._call({"@type": "searchUserByPhoneNumber", "phone_number": peer,
                                     "only_local": False}, within=remaining())
            chat = await self._call({"@type": "createPrivateChat", "user_id": int(user["id"]),
                                     "force": False}, within=remaining())
        else:
            raise PermanentError(400, "peer must be a user id, a chat id, @username or +phone")
        return int(chat["id"])

    # -- opening -----------------------------------------------------------------------------------

    async def _open_database(self) -> None:
        """Answer authorizationStateWaitTdlibParameters; a failure here marks the session FAILED."""
        settings = self._backend.settings
        directory = self._backend.database_dir(self.account_id)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            await self._call({
                "@type": "setTdlibParameters",
                "use_test_dc": settings.use_test_dc,
                "database_directory": str(directory),
                "files_directory": str(directory / "files"),
                "database_encryption_key": base64.b64encode(self._config.database_key).decode(),
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
            }, within=None)
            await self._apply_proxy()
        except TelegramError as exc:
            if exc.code == 401:
                self._fail(WrongDatabaseKey(f"account {self.account_id}: {exc.message}"))
            elif "lock file" in exc.message:
                self._fail(OwnedElsewhere(self.account_id, "another TDLib client (database is locked)"))
            else:
                self._fail(exc)
            return
        except OSError as exc:
            self._fail(PermanentError(500, f"account {self.account_id}: cannot create its directory: {exc}"))
            return
        self._opened = True
        self._notify()

    async def _apply_proxy(self) -> None:
        """Enable the configured proxy (reusing a stored identical one), or disable a stale one."""
        wanted = self._config.proxy
        stored = await self._call({"@type": "getProxies"}, within=None)
        proxies: list[Event] = stored.get("proxies", [])
        if wanted is None:
            if any(p.get("is_enabled") for p in proxies):
                await self._call({"@type": "disableProxy"}, within=None)
            return
        proxy = wanted.to_tdlib()["proxy"]
        for entry in proxies:
            if entry.get("proxy") == proxy:
                if not entry.get("is_enabled"):
                    await self._call({"@type": "enableProxy", "proxy_id": entry["id"]}, within=None)
                return
        await self._call({"@type": "addProxy", "proxy": proxy, "enable": True}, within=None)

    def _fail(self, failure: TelegramError) -> None:
        """Opening failed: report FAILED (kept from now on) and release the TDLib client."""
        log.warning("tdlib.session_failed", account_id=self.account_id, error=str(failure))
        self._set_auth_state(AuthState.FAILED, reason=failure.message)
        self._failure = failure
        self._notify()
        self._spawn(self._close_quietly())

    async def _close_quietly(self) -> None:
        try:
            await self.close()
        except TelegramError as exc:
            log.warning("tdlib.close_failed", account_id=self.account_id, error=str(exc))

    # -- events --------------------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        """One event for this client, on the loop (called by the backend's dispatch)."""
        extra = event.get("@extra")
        if extra is not None:
            pending = self._pending.pop(extra, None) if isinstance(extra, int) else None
            if pending is not None and not pending.future.done():
                if pending.on_result is not None:
                    pending.on_result(event)
                pending.future.set_result(event)
            return
        kind = event.get("@type")
        if kind == "updateAuthorizationState":
            self._on_auth_state(str(event["authorization_state"]["@type"]))
        elif kind == "updateConnectionState":
            state = _CONNECTION_STATES.get(str(event["state"]["@type"]))
            if state is not None and state is not self._connection_state:
                self._connection_state = state
                self._backend.emit(ConnectionStateChanged(self.account_id, state))
        elif kind == "updateMessageSendSucceeded":
            message = event["message"]
            waiter = self._send_waiters.pop((int(message["chat_id"]), int(event["old_message_id"])), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(SentMessage(int(message["id"]), int(message["chat_id"])))
        elif kind == "updateMessageSendFailed":
            message = event["message"]
            waiter = self._send_waiters.pop((int(message["chat_id"]), int(event["old_message_id"])), None)
            if waiter is not None and not waiter.done():
                error = event.get("error") or {"code": event.get("error_code", 400),
                                               "message": event.get("error_message", "")}
                waiter.set_exception(self._error(error, auth_step=False))
        elif kind == "updateNewMessage":
            self._on_new_message(event["message"])

    def _on_auth_state(self, td_state: str) -> None:
        self._td_auth = td_state
        if td_state == "authorizationStateWaitTdlibParameters":
            self._spawn(self._open_database())
            return
        if td_state == "authorizationStateLoggingOut":
            self._saw_logging_out = True
        if td_state == "authorizationStateClosed":
            self._finish_closed()
            return
        state = _AUTH_STATES.get(td_state)
        reason = None
        if state is None:  # e.g. email login or another device's confirmation: not supported
            log.warning("tdlib.unsupported_auth_state",
                        account_id=self.account_id, state=td_state)
            state, reason = AuthState.FAILED, f"unsupported login step {td_state}"
        elif state is AuthState.CLOSED and self._saw_logging_out:
            state = AuthState.LOGGED_OUT
        self._set_auth_state(state, reason=reason)
        self._notify()

    def _on_new_message(self, message: Mapping[str, Any]) -> None:
        content = message.get("content") or {}
        if message.get("is_outgoing") or content.get("@type") != "messageText":
            return
        sender = message.get("sender_id") or {}
        sender_id = sender.get("user_id", sender.get("chat_id", ""))
        self._backend.emit(IncomingMessage(
            account_id=self.account_id, chat_id=int(message["chat_id"]),
            telegram_message_id=int(message["id"]), sender=str(sender_id),
            text=str(content["text"]["text"]), date=int(message.get("date", 0))))

    def _set_auth_state(self, state: AuthState, *, reason: str | None = None) -> None:
        if self._auth_state is AuthState.FAILED or state is self._auth_state:
            return
        self._auth_state = state
        self._backend.emit(AuthStateChanged(self.account_id, state, reason))

    def _finish_closed(self) -> None:
        """The client is gone: fail what still waits, leave the dispatch table, wake the closers."""
        if self._saw_logging_out:
            self._set_auth_state(AuthState.LOGGED_OUT, reason=None if self._logout_asked else LOGGED_OUT_AT_TELEGRAM)
        else:
            self._set_auth_state(AuthState.CLOSED)
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(TransientError(500, "client closed before answering"))
        self._pending.clear()
        for waiter in self._send_waiters.values():
            if not waiter.done():
                # TDLib has the message (pending) and re-sends it itself when the account opens again:
                # an unknown outcome, never a transient error, which a retry would make a second message.
                waiter.set_exception(RequestTimeout(
                    f"account {self.account_id}: the client closed before Telegram confirmed the message; "
                    "TDLib keeps it queued and may still send it"))
        self._send_waiters.clear()
        if self._saw_logging_out:  # a new login may be another user: what it resolved is not theirs
            self._backend.forget_peers(self.account_id)
        self._backend.unregister(self)
        self._closed.set()
        self._notify()

    async def _wait_closed(self, deadline: float) -> None:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._closed.wait()
        except TimeoutError:
            # Leave the table anyway: the caller gives up on this client; a late event is dropped.
            self._backend.unregister(self)
            raise RequestTimeout(f"account {self.account_id}: TDLib did not report closed in time") from None

    # -- helpers -------------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, predicate: Callable[[], bool], within: float) -> bool:
        try:
            async with asyncio.timeout(within):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            return predicate()
        return True

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class TdlibBackend:
    """All TDLib clients of this process. Only one may exist per process (see module docstring)."""

    name = "tdlib"
    # TDLib chooses each message's random_id itself: a new send from the platform is a new message.
    sends_random_id = False
    # Process-wide by nature: TDLib's receive queue is process-wide. The backend owns the thread; this
    # only records which backend currently holds the one td_receive slot.
    _holder: ClassVar[TdlibBackend | None] = None
    _holder_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, settings: TdlibSettings, *, on_update: UpdateSink,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        if settings.api_id is None or settings.api_hash is None:
            raise ConfigError("TDLIB_API_ID",
                              "TDLIB_API_ID and TDLIB_API_HASH are needed for the TDLib backend")
        with TdlibBackend._holder_lock:
            if TdlibBackend._holder is not None:
                raise BackendAlreadyRunning(
                    "a TdlibBackend already runs in this process: TDLib allows one td_receive loop per "
                    "process, so share that backend (or aclose it first)")
            TdlibBackend._holder = self
        try:
            self.log_file = _configure_tdlib_log(settings)
        except BaseException:
            self._release()
            raise
        self.settings = settings
        self.version = _tdlib_version()
        self._on_update = on_update
        self._loop = loop
        self._pid = os.getpid()
        self._clients: dict[int, TdlibSession] = {}
        self._by_account: dict[int, TdlibSession] = {}
        self._extra = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lag = LagWindow()
        self._last_stall_warning = 0.0
        self._updates: asyncio.Queue[Update] | None = None
        self._peer_caches: dict[int, PeerCache] = {}
        self.counters = BackendCounters()
        self._deliverer: asyncio.Task[None] | None = None
        self._closing = False
        self.opening = asyncio.Semaphore(MAX_CONCURRENT_OPENS)

    @property
    def request_timeout(self) -> float:
        return self.settings.request_timeout

    def timeout(self, within: float | None) -> float:
        return self.settings.request_timeout if within is None else max(0.0, within)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def database_dir(self, account_id: int) -> Path:
        return account_database_dir(self.settings.data_dir, account_id)

    async def open_session(self, config: SessionConfig) -> TdlibSession:
        """Create (not start) the account's client, registered for dispatch before anything is sent."""
        if os.getpid() != self._pid:
            raise RuntimeError("TDLib cannot be used in a forked child; create the backend after forking")
        if self._closing:
            raise TransientError(503, "the TDLib backend is closing")
        if config.account_id in self._by_account:
            raise PermanentError(409, f"account {config.account_id} already has a session in this process")
        if len(self._clients) >= self.settings.max_clients:
            raise TransientError(503, f"this process hosts its max of {self.settings.max_clients} clients")
        self._ensure_running()
        client_id = tdjson.td_create_client_id()
        session = TdlibSession(self, client_id, config)
        self._clients[client_id] = session
        self._by_account[config.account_id] = session
        self.counters.sessions_total += 1
        return session

    def session(self, account_id: int) -> TdlibSession | None:
        return self._by_account.get(account_id)

    def peer_cache(self, account_id: int) -> PeerCache:
        """The account's resolved peers; outlives its sessions in this process (see PeerCache)."""
        cache = self._peer_caches.get(account_id)
        if cache is None:
            cache = self._peer_caches[account_id] = PeerCache()
        return cache

    def forget_peers(self, account_id: int) -> None:
        self._peer_caches.pop(account_id, None)

    def stats(self) -> dict[str, Any]:
        """Clients by state, TDLib version, receive-loop lag (max over the last ~60 s), counters."""
        sessions = list(self._clients.values())
        lag = self._lag.value()
        pending = sum(s.pending_requests for s in sessions)
        queued = self._updates.qsize() if self._updates is not None else 0
        return {
            "backend": self.name,
            "version": self.version,
            "client_count": len(sessions),
            "max_clients": self.settings.max_clients,
            "clients": dict(Counter(str(s.auth_state) for s in sessions)),
            "connection": dict(Counter(str(s.connection_state) for s in sessions)),
            **self.counters.as_dict(),
            "pending_requests": pending,
            "updates_queued": queued,
            "queue_depth": pending + queued,
            "peers_cached": sum(len(c) for c in self._peer_caches.values()),
            "receive_loop_lag_seconds": round(lag, 6),
            "stalled": lag > STALL_THRESHOLD_SECONDS,
            "receive_thread_alive": self._thread is not None and self._thread.is_alive(),
        }

    async def aclose(self, deadline: float) -> None:
        """Close every client concurrently by `deadline` (a time.monotonic() value), then stop the thread.

        The process's td_receive slot is released only once the thread has stopped.
        """
        self._closing = True
        sessions = list(self._clients.values())
        results = await asyncio.gather(*(s.close_until(deadline) for s in sessions), return_exceptions=True)
        unclosed = sum(1 for r in results if isinstance(r, BaseException))
        if unclosed:
            log.error("tdlib.clients_not_closed", count=unclosed)
        thread = self._thread
        if thread is not None:
            self._stop.set()
            join_within = max(deadline - time.monotonic(), 2 * RECEIVE_TIMEOUT_SECONDS)
            await asyncio.to_thread(thread.join, join_within)
            if thread.is_alive():
                log.error("tdlib.receive_thread_still_running")
                return
            self._thread = None
        if self._updates is not None and self._deliverer is not None:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._updates.join()
            except TimeoutError:
                log.warning("tdlib.updates_dropped", count=self._updates.qsize())
            self._deliverer.cancel()
            await asyncio.gather(self._deliverer, return_exceptions=True)
            self._deliverer = None
        self._release()

    # -- used by sessions ------------------------------------------------------------------------------

    def next_extra(self) -> int:
        return next(self._extra)

    def send(self, client_id: int, query: Mapping[str, Any]) -> None:
        tdjson.td_send(client_id, _encode(query))

    def emit(self, update: Update) -> None:
        if self._updates is not None:
            self._updates.put_nowait(update)

    def unregister(self, session: TdlibSession) -> None:
        if self._clients.get(session.client_id) is session:
            del self._clients[session.client_id]
        if self._by_account.get(session.account_id) is session:
            del self._by_account[session.account_id]

    # -- the receive thread and dispatch -------------------------------------------------------------

    def _ensure_running(self) -> None:
        running = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = running
        elif self._loop is not running:
            raise RuntimeError("TdlibBackend used from another event loop than its own")
        if self._updates is None:
            self._updates = asyncio.Queue()
            self._deliverer = running.create_task(self._deliver_updates(self._updates), context=detached_context())
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._receive_loop, args=(running,),
                                            name="tdlib-receive", daemon=True)
            self._thread.start()

    def _receive_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The process's only td_receive caller: batch events, hand each batch to the loop once."""
        while not self._stop.is_set():
            if self._backlogged():
                time.sleep(BACKLOG_PAUSE_SECONDS)  # back-pressure: TDLib keeps the events meanwhile
                continue
            try:
                raw = tdjson.td_receive(RECEIVE_TIMEOUT_SECONDS)
                if raw is None:
                    continue
                received_at = time.monotonic()
                events: list[Event] = []
                for _ in range(MAX_BATCH):
                    event = self._decode(raw)
                    if event is not None:
                        events.append(event)
                    raw = tdjson.td_receive(0.0)
                    if raw is None:
                        break
                else:
                    if raw is not None and (event := self._decode(raw)) is not None:
                        events.append(event)
                if events:
                    loop.call_soon_threadsafe(self._dispatch, received_at, events)
            except RuntimeError:  # the loop is closed: nobody is left to serve
                log.exception("tdlib.receive_loop_stopped")
                return
            except Exception:  # never lose the only receive thread to one bad event
                log.exception("tdlib.receive_loop_error")

    def _backlogged(self) -> bool:
        # Read from the receive thread: qsize() is a len() of a deque, atomic under the GIL.
        updates = self._updates
        return updates is not None and updates.qsize() >= MAX_UPDATES_QUEUED

    @staticmethod
    def _decode(raw: bytes) -> Event | None:
        kind = _event_type(raw)
        if kind is not None and kind.startswith("update") and kind not in _HANDLED_UPDATES:
            return None
        try:
            event: Event = json.loads(raw)
        except ValueError:
            log.error("tdlib.bad_event", size=len(raw))
            return None
        return event

    def _dispatch(self, received_at: float, events: list[Event]) -> None:
        lag = time.monotonic() - received_at
        self._lag.record(lag)
        if lag > STALL_THRESHOLD_SECONDS and received_at - self._last_stall_warning > 10.0:
            self._last_stall_warning = received_at
            log.warning("tdlib.receive_loop_stalled", lag_seconds=round(lag, 3))
        for event in events:
            session = self._clients.get(event.get("@client_id", -1))
            if session is None:
                continue
            try:
                session.handle(event)
            except Exception:
                log.exception("tdlib.event_failed", type=event.get("@type"))

    async def _deliver_updates(self, queue: asyncio.Queue[Update]) -> None:
        """Feed the sink one update at a time, in order; a failing sink loses that update only."""
        while True:
            update = await queue.get()
            try:
                await self._on_update(update)
            except Exception:
                log.exception("tdlib.update_sink_failed", update=type(update).__name__)
            finally:
                queue.task_done()

    def _release(self) -> None:
        with TdlibBackend._holder_lock:
            if TdlibBackend._holder is self:
                TdlibBackend._holder = None


def _configure_tdlib_log(settings: TdlibSettings) -> Path | None:
    """Point TDLib's log at a file when one is set or the verbosity would flood stderr."""
    log_file = settings.log_file
    if log_file is None and settings.log_verbosity > 1:
        log_file = settings.data_dir / "tdlib.log"
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError("TDLIB_LOG_FILE", f"cannot create the log directory: {exc}") from None
        stream: dict[str, Any] = {"@type": "logStreamFile", "path": str(log_file),
                                  "max_file_size": LOG_FILE_MAX_BYTES, "redirect_stderr": False}
    else:
        stream = {"@type": "logStreamDefault"}
    result = _execute({"@type": "setLogStream", "log_stream": stream})
    if result is None or result.get("@type") == "error":
        problem = (result or {}).get("message", "no answer")
        raise ConfigError("TDLIB_LOG_FILE", f"TDLib cannot write its log there: {problem}")
    _execute({"@type": "setLogVerbosityLevel", "new_verbosity_level": settings.log_verbosity})
    return log_file


def _tdlib_version() -> str:
    """TDLib's own version (works offline through td_execute); the bundled one if it does not answer."""
    try:
        result = _execute({"@type": "getOption", "name": "version"})
    except (ValueError, RuntimeError):
        return TDLIB_VERSION_FALLBACK
    if result is not None and result.get("@type") == "optionValueString":
        return str(result["value"])
    return TDLIB_VERSION_FALLBACK
