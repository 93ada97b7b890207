"""One account's TDLib client (`TdlibSession`): its login steps, its requests matched to their answers,
its sends awaited until Telegram confirms them, and the events the backend's dispatch hands it.

The session talks to TDLib only through its backend (`SessionBackend`): the backend owns the process's
one receive thread and the dispatch table, and hands each of this client's events to `handle`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import structlog

from telegram_platform.settings import TdlibSettings
from telegram_platform.telegram.base import (
    LOGGED_OUT_AT_TELEGRAM,
    AuthState,
    AuthStateChanged,
    BackendCounters,
    ConnectionState,
    ConnectionStateChanged,
    NotAuthorized,
    OwnedElsewhere,
    PermanentError,
    RequestTimeout,
    SentMessage,
    SessionConfig,
    TelegramError,
    TransientError,
    Update,
    WrongDatabaseKey,
    classify_error,
)
from telegram_platform.telegram.content import FormattedText, OutgoingMessage
from telegram_platform.telegram.tdlib.messages import (
    delete_messages_query,
    download_file_query,
    edit_message_query,
    forward_messages_query,
    get_remote_file_query,
    incoming_message,
    message_change,
    send_message_query,
    sent_message,
    sent_messages,
    view_messages_query,
)
from telegram_platform.telegram.tdlib.peers import PeerCache, resolve_peer
from telegram_platform.telegram.tdlib.protocol import AUTH_STATES, CONNECTION_STATES, Event, tdlib_parameters

log = structlog.get_logger(__name__)

# Back-pressure: requests one client may have awaiting an answer; more wait for a slot.
MAX_IN_FLIGHT_PER_CLIENT: Final = 1000
# A download is answered once the whole file is on disk: far longer than a request may take.
DOWNLOAD_SECONDS: Final = 600.0
# After a login step is accepted, how long to wait for TDLib to report the next state.
_STATE_SETTLE_SECONDS: Final = 5.0


class SessionBackend(Protocol):
    """What a session needs from its backend (`TdlibBackend`): settings, the shared bounds and
    counters, the account's peers, and the way to TDLib and to the update sink. A protocol, so that
    this module does not import the backend that creates its sessions."""

    settings: TdlibSettings
    counters: BackendCounters
    # Bounds how many clients open their database at once (see TdlibSession.start).
    opening: asyncio.Semaphore

    @property
    def request_timeout(self) -> float: ...

    def timeout(self, within: float | None) -> float: ...

    def database_dir(self, account_id: int) -> Path: ...

    def peer_cache(self, account_id: int) -> PeerCache: ...

    def forget_peers(self, account_id: int) -> None: ...

    def next_extra(self) -> int: ...

    def send(self, client_id: int, query: Mapping[str, Any]) -> None: ...

    def emit(self, update: Update) -> None: ...

    def unregister(self, session: TdlibSession) -> None: ...


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Event]
    # Runs inside dispatch, before any later event of the same batch: lets a send register its
    # confirmation waiter before updateMessageSendSucceeded can arrive.
    on_result: Callable[[Event], None] | None


class TdlibSession:
    """One account's TDLib client. Created by `TdlibBackend.open_session`; driven by its events.

    `auth_state` is CLOSED until TDLib has opened the database, FAILED (and stays so) once opening it
    failed, and LOGGED_OUT when the client closed after logging out.
    """

    def __init__(self, backend: SessionBackend, client_id: int, config: SessionConfig) -> None:
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

    async def send(self, peer: str, message: OutgoingMessage, *, random_id: int | None = None,
                   within: float | None = None) -> SentMessage:
        """Send and wait for updateMessageSendSucceeded of every message the send makes, all `within`
        seconds (default: request timeout). `random_id` is ignored: TDLib chooses each message's
        random_id itself (sends_random_id False).

        On RequestTimeout the message may still be sent: TDLib keeps it queued (and, with the message
        database, re-sends it after a restart), so a blind retry can deliver it twice.
        """
        if self._auth_state is not AuthState.READY:
            raise NotAuthorized(self._auth_state)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._backend.timeout(within)
        chat_id = await resolve_peer(self._peers, self._call, peer, deadline)
        query = send_message_query(chat_id, message)
        return await self._send_and_confirm(query, deadline)

    async def forward(self, from_peer: str, message_ids: Sequence[int], to_peer: str, *,
                      random_id: int | None = None, within: float | None = None) -> SentMessage:
        """forwardMessages, then wait until Telegram confirmed every copy (as a send)."""
        if self._auth_state is not AuthState.READY:
            raise NotAuthorized(self._auth_state)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._backend.timeout(within)
        from_chat = await resolve_peer(self._peers, self._call, from_peer, deadline)
        to_chat = await resolve_peer(self._peers, self._call, to_peer, deadline)
        return await self._send_and_confirm(forward_messages_query(to_chat, from_chat, message_ids), deadline)

    async def edit(self, peer: str, message_id: int, text: FormattedText, *, caption: bool = False,
                   within: float | None = None) -> None:
        if self._auth_state is not AuthState.READY:
            raise NotAuthorized(self._auth_state)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._backend.timeout(within)
        chat_id = await resolve_peer(self._peers, self._call, peer, deadline)
        await self._call(edit_message_query(chat_id, message_id, text, caption=caption),
                         within=max(0.0, deadline - loop.time()))

    async def delete(self, peer: str, message_ids: Sequence[int], *, for_everyone: bool,
                     within: float | None = None) -> None:
        if self._auth_state is not AuthState.READY:
            raise NotAuthorized(self._auth_state)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._backend.timeout(within)
        chat_id = await resolve_peer(self._peers, self._call, peer, deadline)
        await self._call(delete_messages_query(chat_id, message_ids, revoke=for_everyone),
                         within=max(0.0, deadline - loop.time()))

    async def view(self, peer: str, message_ids: Sequence[int], *, within: float | None = None) -> None:
        if self._auth_state is not AuthState.READY:
            raise NotAuthorized(self._auth_state)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._backend.timeout(within)
        chat_id = await resolve_peer(self._peers, self._call, peer, deadline)
        await self._call(view_messages_query(chat_id, message_ids), within=max(0.0, deadline - loop.time()))

    async def _send_and_confirm(self, query: Mapping[str, Any], deadline: float) -> SentMessage:
        """Send a query answered by a `message` (or `messages`), then wait until Telegram confirmed
        each one still being sent; a failure of any is the send's failure."""
        loop = asyncio.get_running_loop()
        outcomes: dict[tuple[int, int], asyncio.Future[SentMessage]] = {}

        def expect_outcome(response: Event) -> None:
            answered = response.get("messages") if response.get("@type") == "messages" else [response]
            for item in answered or ():
                if item and item.get("@type") == "message" and item.get("sending_state") is not None:
                    key = (int(item["chat_id"]), int(item["id"]))
                    outcomes[key] = self._send_waiters[key] = loop.create_future()

        try:
            response = await self._call(query, within=max(0.0, deadline - loop.time()), on_result=expect_outcome)
            answered = response.get("messages") if response.get("@type") == "messages" else [response]
            if not outcomes:  # no sending state: TDLib reports it sent already
                return sent_messages([m for m in answered or () if m])
            try:
                async with asyncio.timeout_at(deadline):
                    confirmed = [await outcome for outcome in outcomes.values()]
            except TimeoutError:
                raise RequestTimeout(
                    f"account {self.account_id}: message not confirmed by Telegram in time; "
                    "TDLib keeps it queued and may still send it") from None
            ids = tuple(i for sent in confirmed for i in sent.telegram_message_ids)
            remote_ids = tuple(r for sent in confirmed for r in sent.remote_file_ids or ("",))
            return SentMessage(ids[0], confirmed[0].chat_id, ids, remote_ids if any(remote_ids) else ())
        finally:
            for key in outcomes:
                self._send_waiters.pop(key, None)

    async def download_file(self, remote_id: str, *, within: float | None = None) -> Path:
        """TDLib's `getRemoteFile`, then `downloadFile` (synchronous: answered once the whole file is in
        TDLib's files directory), within DOWNLOAD_SECONDS unless told; the file's local path."""
        if self._auth_state is not AuthState.READY:
            raise NotAuthorized(self._auth_state)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (within if within is not None else DOWNLOAD_SECONDS)
        file = await self._call(get_remote_file_query(remote_id), within=max(0.0, deadline - loop.time()))
        done = await self._call(download_file_query(int(file["id"])), within=max(0.0, deadline - loop.time()))
        local = done.get("local") or {}
        if not local.get("is_downloading_completed") or not local.get("path"):
            raise TransientError(503, f"account {self.account_id}: the download of a file did not complete")
        return Path(str(local["path"]))

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
            log.warning("tdlib.request_timeout", account_id=self.account_id, request=query.get("@type"),
                        seconds=seconds)
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

    # -- opening -----------------------------------------------------------------------------------

    async def _open_database(self) -> None:
        """Answer authorizationStateWaitTdlibParameters; a failure here marks the session FAILED."""
        directory = self._backend.database_dir(self.account_id)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            await self._call(tdlib_parameters(self._backend.settings, directory, self._config.database_key),
                             within=None)
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
            state = CONNECTION_STATES.get(str(event["state"]["@type"]))
            if state is not None and state is not self._connection_state:
                self._connection_state = state
                self._backend.emit(ConnectionStateChanged(self.account_id, state))
        elif kind == "updateMessageSendSucceeded":
            message = event["message"]
            waiter = self._send_waiters.pop((int(message["chat_id"]), int(event["old_message_id"])), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(sent_message(message))
        elif kind == "updateMessageSendFailed":
            message = event["message"]
            waiter = self._send_waiters.pop((int(message["chat_id"]), int(event["old_message_id"])), None)
            if waiter is not None and not waiter.done():
                error = event.get("error") or {"code": event.get("error_code", 400),
                                               "message": event.get("error_message", "")}
                waiter.set_exception(self._error(error, auth_step=False))
        elif kind == "updateNewMessage":
            incoming = incoming_message(self.account_id, event["message"])
            if incoming is not None:
                self._backend.emit(incoming)
        elif kind in ("updateMessageContent", "updateDeleteMessages", "updateChatReadOutbox"):
            change = message_change(self.account_id, event, int(time.time()))
            if change is not None:
                self._backend.emit(change)

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
        state = AUTH_STATES.get(td_state)
        reason = None
        if state is None:  # e.g. email login or another device's confirmation: not supported
            log.warning("tdlib.unsupported_auth_state",
                        account_id=self.account_id, state=td_state)
            state, reason = AuthState.FAILED, f"unsupported login step {td_state}"
        elif state is AuthState.CLOSED and self._saw_logging_out:
            state = AuthState.LOGGED_OUT
        self._set_auth_state(state, reason=reason)
        self._notify()

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
