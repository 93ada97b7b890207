"""The emulator backend: the `TelegramBackend` interface over the emulator server's HTTP API.

It behaves like the TDLib backend where the platform can tell: each account's login is kept in a
local database directory, encrypted with the key derived from ENCRYPTION_KEY, so a worker restart
resumes the session without a new login (and a wrong key is reported as such); a stored login is
READY at once and verified by the update stream (a revoked one ends LOGGED_OUT); the phone's answer
is awaited at most `phone_timeout`, then the login goes on in the background; a dropped connection
reports `connecting`, then `ready` once the stream is back, and the updates missed meanwhile arrive
after it; errors are classified by the same `classify_error` as TDLib's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ...logs import detached_context
from ..base import (
    LOGGED_OUT_AT_TELEGRAM,
    STALL_THRESHOLD_SECONDS,
    AuthError,
    AuthState,
    AuthStateChanged,
    BackendCounters,
    ConnectionState,
    ConnectionStateChanged,
    IncomingEdited,
    IncomingMessage,
    LagWindow,
    MessagesDeleted,
    NotAuthorized,
    PermanentError,
    ReadOutbox,
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
from ..content import Entity, FormattedText, IncomingMedia, MediaKind, OutgoingMessage

log = structlog.get_logger(__name__)

VERSION: Final = "emulator-2"
# How often the watchdog measures the event loop's lag (the emulator has no receive thread).
WATCHDOG_INTERVAL: Final = 0.1
RECONNECT_DELAY_START: Final = 0.2
RECONNECT_DELAY_CAP: Final = 5.0
# Requests in flight to the emulator at once per backend; more wait for a free connection, within
# their deadline.
REQUEST_CONNECTIONS: Final = 200
# Login steps a restart resumes from (Telegram still expects the code, password or names).
_RESUMABLE_STEPS: Final = frozenset({AuthState.WAIT_CODE, AuthState.WAIT_PASSWORD, AuthState.WAIT_REGISTRATION})


def classify(code: int, message: str, retry_after: float | None = None) -> TelegramError:
    """The emulator's errors, classified exactly as TDLib's are (see base.classify_error)."""
    return classify_error(code, message, retry_after=retry_after)


class EmulatorBackend:
    name = "emulator"
    # It speaks an MTProto-like protocol and passes random_id through; the emulator drops a repeated
    # one from the same account, as Telegram does.
    sends_random_id = True
    # Its "database": the sealed login (token, update number) or the login step reached.
    state_files: tuple[str, ...] = ("session.bin",)

    def __init__(self, base_url: str, data_dir: Path, *, on_update: UpdateSink,
                 request_timeout: float = 10.0) -> None:
        self._base_url = base_url.rstrip("/")
        self._data_dir = data_dir / "emulator"
        self._on_update = on_update
        self._timeout = request_timeout
        self._http: aiohttp.ClientSession | None = None
        self._streams_http: aiohttp.ClientSession | None = None
        self.sessions: dict[int, EmulatorSession] = {}
        self.counters = BackendCounters()
        self._in_flight = 0
        self._lag = LagWindow()
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def request_timeout(self) -> float:
        return self._timeout

    async def http(self) -> aiohttp.ClientSession:
        """The session for requests: a bounded pool, every request with a deadline."""
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=REQUEST_CONNECTIONS),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            )
        return self._http

    async def streams_http(self) -> aiohttp.ClientSession:
        """The session for update streams. Each hosted account holds one connection open for as long
        as it is logged in, so streams get a pool of their own without a cap (the accounts a host
        holds bound it): sharing the requests' pool, a host with more accounts than its slots had
        every request wait forever for a connection."""
        if self._streams_http is None:
            self._streams_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._streams_http

    async def call(self, method: str, *, timeout: float | None = None, **params: Any) -> dict[str, Any]:
        http = await self.http()
        # Never `timeout=None` to aiohttp: it reads that as "no deadline at all".
        seconds = self._timeout if timeout is None else timeout
        self.counters.requests_total += 1
        self._in_flight += 1
        try:
            async with http.post(f"{self._base_url}/rpc/{method}", json=params,
                                 timeout=aiohttp.ClientTimeout(total=seconds)) as response:
                body: dict[str, Any] = await response.json()
        except TimeoutError:
            log.warning("emulator.request_timeout", method=method, seconds=seconds)
            error: TelegramError = RequestTimeout(f"{method}: no answer within {seconds:g} s")
            self.counters.error(error)
            raise error from None
        except (aiohttp.ClientError, ValueError) as exc:
            error = TransientError(503, f"emulator unreachable: {type(exc).__name__}")
            self.counters.error(error)
            raise error from None
        finally:
            self._in_flight -= 1
        return self._checked(body)

    async def upload(self, path: Path, *, session: str, file_name: str, mime_type: str) -> dict[str, Any]:
        """Stream a local file to Telegram (`upload.file`); its `file_ref`, size and sha256."""
        http = await self.http()
        self.counters.requests_total += 1
        self._in_flight += 1
        try:
            with path.open("rb") as body:
                async with http.post(f"{self._base_url}/rpc/upload.file", data=body,
                                     params={"session": session, "file_name": file_name, "mime_type": mime_type},
                                     headers={"Content-Type": "application/octet-stream"}) as response:
                    answer: dict[str, Any] = await response.json()
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise self._unreachable("upload.file", exc) from None
        finally:
            self._in_flight -= 1
        return self._checked(answer)

    async def download(self, destination: Path, *, session: str, file_ref: str) -> int:
        """Stream a file the account may see (`download.file`) into `destination`; its size."""
        http = await self.http()
        self.counters.requests_total += 1
        self._in_flight += 1
        size = 0
        try:
            async with http.get(f"{self._base_url}/rpc/download.file",
                                params={"session": session, "file_ref": file_ref}) as response:
                if response.content_type == "application/json":
                    self._checked(await response.json())
                with destination.open("wb") as out:
                    async for chunk in response.content.iter_chunked(1 << 16):
                        out.write(chunk)
                        size += len(chunk)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise self._unreachable("download.file", exc) from None
        finally:
            self._in_flight -= 1
        return size

    def _unreachable(self, method: str, exc: BaseException) -> TelegramError:
        error: TelegramError = (RequestTimeout(f"{method} timed out") if isinstance(exc, TimeoutError) else
                                TransientError(503, f"emulator unreachable: {type(exc).__name__}"))
        self.counters.error(error)
        return error

    def _checked(self, body: dict[str, Any]) -> dict[str, Any]:
        if not body.get("ok"):
            failure = body.get("error", {})
            retry_after = failure.get("retry_after")
            error = classify(int(failure.get("code", 500)), str(failure.get("message", "unknown")),
                             float(retry_after) if retry_after is not None else None)
            self.counters.error(error)
            raise error
        return body

    def database_dir(self, account_id: int) -> Path:
        return self._data_dir / str(account_id)

    def downloads_dir(self, account_id: int) -> Path:
        """Where an account's downloads land before the file store takes them."""
        return self._data_dir / "downloads" / str(account_id)

    async def open_session(self, config: SessionConfig) -> EmulatorSession:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_loop(), context=detached_context())
        session = EmulatorSession(self, config, self.database_dir(config.account_id))
        self.sessions[config.account_id] = session
        self.counters.sessions_total += 1
        return session

    def stats(self) -> dict[str, Any]:
        lag = self._lag.value()
        sessions = list(self.sessions.values())
        return {
            "backend": self.name,
            "version": VERSION,
            "client_count": len(sessions),
            "clients": dict(Counter(s.auth_state.value for s in sessions)),
            "connection": dict(Counter(s.connection_state.value for s in sessions)),
            **self.counters.as_dict(),
            "pending_requests": self._in_flight,
            "updates_queued": 0,  # updates go to the sink as they arrive
            "queue_depth": self._in_flight,
            "receive_loop_lag_seconds": round(lag, 6),
            "stalled": lag > STALL_THRESHOLD_SECONDS,
        }

    async def aclose(self, deadline: float) -> None:
        sessions = list(self.sessions.values())
        if sessions:
            timeout = max(0.1, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(s.close() for s in sessions), return_exceptions=True),
                                       timeout=timeout)
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        for http in (self._http, self._streams_http):
            if http is not None:
                await http.close()
        self._http = self._streams_http = None

    def forget(self, session: EmulatorSession) -> None:
        if self.sessions.get(session.account_id) is session:
            del self.sessions[session.account_id]

    async def emit(self, update: Update) -> None:
        try:
            await self._on_update(update)
        except Exception:
            log.exception("emulator.update_sink_failed", update=type(update).__name__)

    async def _watch_loop(self) -> None:
        """Like telegram-bot-api's watchdog: how late the loop wakes up is how stalled it is."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(WATCHDOG_INTERVAL)
            lag = max(0.0, loop.time() - before - WATCHDOG_INTERVAL)
            self._lag.record(lag)
            if lag > STALL_THRESHOLD_SECONDS:
                log.warning("emulator.event_loop_stalled", lag_seconds=round(lag, 3))


class EmulatorSession:
    def __init__(self, backend: EmulatorBackend, config: SessionConfig, directory: Path) -> None:
        self._backend = backend
        self._config = config
        self._dir = directory
        self._token: str | None = None
        self._pts: int | None = None
        self._user_id: int | None = None
        self._auth_state = AuthState.WAIT_PHONE
        self._connection_state = ConnectionState.CONNECTING
        self._updates_task: asyncio.Task[None] | None = None
        self._login_task: asyncio.Task[AuthState] | None = None
        self._closed = False

    @property
    def account_id(self) -> int:
        return self._config.account_id

    @property
    def auth_state(self) -> AuthState:
        return self._auth_state

    @property
    def connection_state(self) -> ConnectionState:
        return self._connection_state

    # -- the encrypted local "database" --------------------------------------------------------

    @property
    def _session_file(self) -> Path:
        return self._dir / "session.bin"

    def _load(self) -> dict[str, Any] | None:
        """The stored login: {"token", "pts", "user_id"} once logged in, {"step"} mid-login;
        WrongDatabaseKey if it does not decrypt."""
        try:
            blob = self._session_file.read_bytes()
        except FileNotFoundError:
            return None
        if len(blob) < 12 + 16:  # nonce and tag: a truncated file decrypts no more than a wrong key
            raise WrongDatabaseKey()
        try:
            plain = AESGCM(self._config.database_key).decrypt(blob[:12], blob[12:], b"session").decode()
        except InvalidTag:
            raise WrongDatabaseKey() from None
        if not plain.startswith("{"):  # the first format: the bare token
            return {"token": plain}
        data: dict[str, Any] = json.loads(plain)
        return data

    def _store(self, at: AuthState | None = None) -> None:
        """Keep the login (token and update number) or, mid-login, the step reached (`at`, by
        default the current state): like TDLib's database, a restart resumes either without asking
        Telegram again."""
        reached = self._auth_state if at is None else at
        step = reached.value if reached in _RESUMABLE_STEPS else None
        if self._token is None and step is None:
            with contextlib.suppress(FileNotFoundError):
                self._session_file.unlink()
            return
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = ({"token": self._token, "pts": self._pts, "user_id": self._user_id} if self._token is not None
                 else {"step": step})
        plain = json.dumps(state).encode()
        nonce = os.urandom(12)
        blob = nonce + AESGCM(self._config.database_key).encrypt(nonce, plain, b"session")
        tmp = self._session_file.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.chmod(0o600)
        tmp.replace(self._session_file)

    # -- authorization -------------------------------------------------------------------------

    async def _set_state(self, state: AuthState, *, reason: str | None = None) -> AuthState:
        if state != self._auth_state:
            self._auth_state = state
            await self._backend.emit(AuthStateChanged(self.account_id, state, reason))
        return state

    async def _set_connection(self, state: ConnectionState) -> None:
        if state != self._connection_state:
            self._connection_state = state
            await self._backend.emit(ConnectionStateChanged(self.account_id, state))

    async def _apply(self, answer: dict[str, Any]) -> AuthState:
        state = AuthState(answer["state"])
        if state == AuthState.READY:
            self._token = str(answer["session"])
            pts = answer.get("pts")
            self._pts = int(pts) if pts is not None else None
            self._user_id = int(answer["user_id"])
            self._start_updates()
        # Stored before the state is reported, as TDLib does: whoever hears READY (and snapshots
        # the account's state, worker/tdstate.py) finds the login on disk.
        self._store(state)
        await self._set_state(state)
        return state

    async def _auth_call(self, method: str, **params: Any) -> dict[str, Any]:
        try:
            answer = await self._backend.call(method, **params)
        except TelegramError as exc:
            if exc.error_class == "permanent" and not isinstance(exc, AuthError):
                raise AuthError(exc.code, exc.message) from None
            raise
        await self._set_connection(ConnectionState.READY)
        return answer

    async def start(self, *, phone_timeout: float | None = None) -> AuthState:
        """A stored login is READY at once (verified by the update stream, as TDLib does from its
        database); otherwise the phone goes to Telegram and its answer is awaited `phone_timeout`."""
        if self._closed:
            raise PermanentError(400, f"account {self.account_id}: the session is closed")
        if self._auth_state is not AuthState.WAIT_PHONE or self._login_task is not None:
            return self._auth_state
        try:
            stored = self._load()
        except WrongDatabaseKey as exc:
            await self._set_state(AuthState.FAILED, reason=exc.message)
            raise
        if stored is not None and stored.get("token"):
            self._token = str(stored["token"])
            pts, user_id = stored.get("pts"), stored.get("user_id")
            self._pts = int(pts) if pts is not None else None
            self._user_id = int(user_id) if user_id is not None else None  # None: a file from before it was kept
            self._start_updates()
            return await self._set_state(AuthState.READY)
        if stored is not None and stored.get("step") in {s.value for s in _RESUMABLE_STEPS}:
            await self._set_connection(ConnectionState.READY)
            return await self._set_state(AuthState(stored["step"]))
        task = asyncio.get_running_loop().create_task(self._send_phone(), name=f"login:{self.account_id}")
        self._login_task = task
        task.add_done_callback(self._login_done)
        wait = self._backend.request_timeout if phone_timeout is None else phone_timeout
        done, _ = await asyncio.wait({task}, timeout=max(0.0, wait))
        if task in done:
            return task.result()
        log.info("emulator.phone_pending", account_id=self.account_id)
        return self._auth_state

    async def _send_phone(self) -> AuthState:
        return await self._apply(await self._auth_call("auth.sendCode", phone=self._config.phone))

    def _login_done(self, task: asyncio.Task[AuthState]) -> None:
        self._login_task = None
        if not task.cancelled() and (error := task.exception()) is not None:
            log.warning("emulator.phone_failed", account_id=self.account_id, error=str(error))

    async def submit_code(self, code: str) -> AuthState:
        self._require(AuthState.WAIT_CODE)
        return await self._apply(await self._auth_call("auth.signIn", phone=self._config.phone, code=code))

    async def submit_password(self, password: str) -> AuthState:
        self._require(AuthState.WAIT_PASSWORD)
        return await self._apply(
            await self._auth_call("auth.checkPassword", phone=self._config.phone, password=password))

    async def register(self, first_name: str, last_name: str) -> AuthState:
        self._require(AuthState.WAIT_REGISTRATION)
        return await self._apply(await self._auth_call(
            "auth.signUp", phone=self._config.phone, first_name=first_name, last_name=last_name))

    def _require(self, state: AuthState) -> None:
        if self._auth_state != state:
            raise AuthError(400, f"not expected now: auth_state is {self._auth_state}")

    async def send(self, peer: str, message: OutgoingMessage, *, random_id: int | None = None) -> SentMessage:
        if self._auth_state != AuthState.READY or self._token is None:
            raise NotAuthorized(self._auth_state)
        if message.media:
            return await self._send_media(peer, message, random_id)
        answer = await self._backend.call(
            "messages.send", session=self._token, peer=peer, text=message.text.text,
            entities=message.text.entities_json(), reply_to=message.reply_to, silent=message.silent,
            protect_content=message.protect_content, disable_web_page_preview=message.disable_web_page_preview,
            random_id=str(random_id) if random_id is not None else "")
        return SentMessage(int(answer["message_id"]), int(answer["chat_id"]))

    async def _send_media(self, peer: str, message: OutgoingMessage, random_id: int | None) -> SentMessage:
        """One file or an album: each file Telegram does not hold for this account yet is uploaded
        first (streamed from its local copy), then one `messages.sendMedia` names them all, with the
        caption's entities, the reply and the options."""
        assert self._token is not None
        refs = []
        for item in message.media:
            if item.remote_id:
                refs.append(item.remote_id)
                continue
            if item.path is None:
                raise PermanentError(400, f"file {item.file_id}: neither a remote id nor a local path")
            uploaded = await self._backend.upload(item.path, session=self._token, file_name=item.file_name,
                                                  mime_type=item.mime_type)
            refs.append(str(uploaded["file_ref"]))
        answer = await self._backend.call(
            "messages.sendMedia", session=self._token, peer=peer, caption=message.text.text,
            media=[{"kind": item.kind.value, "file_ref": ref} for item, ref in zip(message.media, refs, strict=True)],
            entities=message.text.entities_json(), reply_to=message.reply_to, silent=message.silent,
            protect_content=message.protect_content, disable_web_page_preview=message.disable_web_page_preview,
            random_id=str(random_id) if random_id is not None else "")
        ids = tuple(int(i) for i in answer["message_ids"])
        return SentMessage(ids[0], int(answer["chat_id"]), ids, tuple(str(r) for r in answer["file_refs"]))

    async def download_file(self, remote_id: str) -> Path:
        """The file a received message carries, downloaded whole to this host; its path."""
        if self._auth_state != AuthState.READY or self._token is None:
            raise NotAuthorized(self._auth_state)
        directory = self._backend.downloads_dir(self.account_id)
        directory.mkdir(parents=True, exist_ok=True)
        destination = directory / hashlib.sha256(remote_id.encode()).hexdigest()
        await self._backend.download(destination, session=self._token, file_ref=remote_id)
        return destination
    async def forward(self, from_peer: str, message_ids: Sequence[int], to_peer: str, *,
                      random_id: int | None = None) -> SentMessage:
        token = self._ready_token()
        answer = await self._backend.call("messages.forward", session=token, from_peer=from_peer,
                                          message_ids=list(message_ids), peer=to_peer,
                                          random_id=str(random_id) if random_id is not None else "")
        ids = tuple(int(i) for i in answer["message_ids"])
        return SentMessage(ids[0], int(answer["chat_id"]), ids)

    async def edit(self, peer: str, message_id: int, text: FormattedText, *, caption: bool = False) -> None:
        await self._backend.call("messages.edit", session=self._ready_token(), peer=peer, message_id=message_id,
                                 text=text.text, entities=text.entities_json(), caption=caption)

    async def delete(self, peer: str, message_ids: Sequence[int], *, for_everyone: bool) -> None:
        await self._backend.call("messages.delete", session=self._ready_token(), peer=peer,
                                 message_ids=list(message_ids), revoke=for_everyone)

    async def view(self, peer: str, message_ids: Sequence[int]) -> None:
        await self._backend.call("messages.read", session=self._ready_token(), peer=peer,
                                 message_ids=list(message_ids))

    def _ready_token(self) -> str:
        if self._auth_state != AuthState.READY or self._token is None:
            raise NotAuthorized(self._auth_state)
        return self._token

    async def me(self) -> int:
        if self._auth_state != AuthState.READY or self._token is None:
            raise NotAuthorized(self._auth_state)
        if self._user_id is None:
            answer = await self._backend.call("session.check", session=self._token)
            self._user_id = int(answer["user_id"])
            self._store()
        return self._user_id

    async def log_out(self) -> None:
        await self._cancel_login()
        await self._set_state(AuthState.LOGGING_OUT)
        if self._token is not None:
            with contextlib.suppress(TelegramError):
                await self._backend.call("auth.logOut", session=self._token)
        self._token = None
        await self._stop_updates()
        await self._set_state(AuthState.LOGGED_OUT)
        self._store()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._cancel_login()
        await self._stop_updates()
        if self._token is not None:
            self._store()  # keeps the update sequence number: the next start catches up from it
        self._backend.forget(self)
        if self._auth_state not in (AuthState.LOGGED_OUT, AuthState.FAILED):
            await self._set_state(AuthState.CLOSED)

    async def _cancel_login(self) -> None:
        task, self._login_task = self._login_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- incoming updates ------------------------------------------------------------------------

    def _start_updates(self) -> None:
        if self._updates_task is None:
            self._updates_task = asyncio.get_running_loop().create_task(
                self._receive_updates(), name=f"updates:{self.account_id}", context=detached_context())

    async def _stop_updates(self) -> None:
        task, self._updates_task = self._updates_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _receive_updates(self) -> None:
        """The update stream: `ready` while connected, `connecting` while not; reconnects with back-off
        and asks for what it missed (`after` = the last sequence number it saw)."""
        delay = RECONNECT_DELAY_START
        while self._token is not None:
            try:
                http = await self._backend.streams_http()
                params = {"session": self._token}
                if self._pts is not None:
                    params["after"] = str(self._pts)
                async with http.ws_connect(f"{self._backend.base_url}/updates", params=params, heartbeat=10,
                                           timeout=aiohttp.ClientWSTimeout(ws_close=2)) as ws:
                    await self._set_connection(ConnectionState.READY)
                    delay = RECONNECT_DELAY_START
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            break
                        await self._on_update(msg.json())
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401:  # the session was terminated at Telegram: TDLib logs out
                    await self._revoked()
                    return
                log.info("emulator.connection_refused", account_id=self.account_id, status=exc.status)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.info("emulator.connection_lost", account_id=self.account_id, error=type(exc).__name__)
            await self._set_connection(ConnectionState.CONNECTING)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAY_CAP)

    async def _on_update(self, data: dict[str, Any]) -> None:
        pts = data.get("pts")
        kind = data.get("type")
        update: Update | None = None
        if kind == "message":
            media = data.get("media")
            received = IncomingMedia(
                MediaKind(str(media["kind"])), int(media["size"]), str(media.get("mime_type") or ""),
                str(media.get("file_name") or ""), media.get("width"), media.get("height"), media.get("duration"),
                str(media["file_ref"])) if isinstance(media, dict) else None
            update = IncomingMessage(
                self.account_id, int(data["chat_id"]), int(data["message_id"]), str(data["sender"]),
                str(data["text"]), int(data["date"]),
                entities=tuple(Entity.from_json(e) for e in data.get("entities") or ()),
                reply_to=data.get("reply_to"), forward_from=data.get("forward_from"),
                kind=received.kind.value if received is not None else "text",
                media=received.to_json() if received is not None else None)
        elif kind == "message_edited":
            update = IncomingEdited(self.account_id, int(data["chat_id"]), int(data["message_id"]),
                                    FormattedText.from_json(str(data["text"]), data.get("entities")),
                                    int(data["date"]))
        elif kind == "messages_deleted":
            update = MessagesDeleted(self.account_id, int(data["chat_id"]),
                                     tuple(int(i) for i in data["message_ids"]))
        elif kind == "read_outbox":
            update = ReadOutbox(self.account_id, int(data["chat_id"]), int(data["max_id"]))
        if update is not None:
            # Shielded: closing the session (this task cancelled) must not drop a message halfway
            # into the platform; like TDLib's, its delivery outlives the session that received it.
            await asyncio.shield(self._backend.emit(update))
        if pts is not None:
            self._pts = max(self._pts or 0, int(pts))

    async def _revoked(self) -> None:
        log.warning("emulator.session_revoked", account_id=self.account_id)
        self._token = None
        self._updates_task = None
        await self._set_state(AuthState.LOGGED_OUT, reason=LOGGED_OUT_AT_TELEGRAM)
        self._store()
