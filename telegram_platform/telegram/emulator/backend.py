"""The emulator backend: the `TelegramBackend` interface over the emulator server's HTTP API.

Like TDLib, it keeps each account's login in a local database directory, encrypted with the key
derived from ENCRYPTION_KEY, so a worker restart resumes the session without a new login, and a
wrong key is reported as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..base import (
    AuthError,
    AuthState,
    AuthStateChanged,
    ConnectionState,
    ConnectionStateChanged,
    IncomingMessage,
    NotAuthorized,
    PeerFlood,
    PermanentError,
    RateLimited,
    RequestTimeout,
    SentMessage,
    SessionConfig,
    TelegramError,
    TransientError,
    UpdateSink,
    WrongDatabaseKey,
)

log = structlog.get_logger(__name__)

_AUTH_ERRORS = frozenset({"PHONE_CODE_INVALID", "PHONE_CODE_EXPIRED", "PASSWORD_HASH_INVALID",
                          "PHONE_NUMBER_INVALID", "FIRSTNAME_INVALID", "PASSWORD_NOT_REQUESTED"})


def classify(code: int, message: str, retry_after: float | None = None) -> TelegramError:
    """Map an error as TDLib words it to the platform's classes."""
    if code == 429:
        if retry_after is None:
            tail = message.rsplit(" ", 1)[-1]
            retry_after = float(tail) if tail.isdigit() else 1.0
        return RateLimited(retry_after, message)
    if "PEER_FLOOD" in message:
        return PeerFlood(message)
    if message in _AUTH_ERRORS:
        return AuthError(code, message)
    if code >= 500 or code in (408, 420):
        return TransientError(code, message)
    return PermanentError(code, message)


class EmulatorBackend:
    name = "emulator"

    def __init__(self, base_url: str, data_dir: Path, *, on_update: UpdateSink,
                 request_timeout: float = 10.0) -> None:
        self._base_url = base_url.rstrip("/")
        self._data_dir = data_dir / "emulator"
        self._on_update = on_update
        self._timeout = request_timeout
        self._http: aiohttp.ClientSession | None = None
        self.sessions: dict[int, EmulatorSession] = {}

    async def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=200),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            )
        return self._http

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        http = await self.http()
        try:
            async with http.post(f"{self._base_url}/rpc/{method}", json=params) as response:
                body: dict[str, Any] = await response.json()
        except TimeoutError:
            raise RequestTimeout(f"{method} timed out") from None
        except aiohttp.ClientError as exc:
            raise TransientError(503, f"emulator unreachable: {type(exc).__name__}") from None
        if not body.get("ok"):
            error = body.get("error", {})
            raise classify(int(error.get("code", 500)), str(error.get("message", "unknown")),
                           error.get("retry_after"))
        return body

    async def open_session(self, config: SessionConfig) -> EmulatorSession:
        session = EmulatorSession(self, config, self._data_dir / str(config.account_id))
        self.sessions[config.account_id] = session
        return session

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "emulator",
            "version": "emulator-1",
            "clients": dict(Counter(s.auth_state.value for s in self.sessions.values())),
            "connection": dict(Counter(s.connection_state.value for s in self.sessions.values())),
            "receive_loop_lag_seconds": 0.0,
            "pending_requests": 0,
        }

    async def aclose(self, deadline: float) -> None:
        sessions = list(self.sessions.values())
        if sessions:
            timeout = max(0.1, deadline - time.monotonic())
            await asyncio.wait_for(asyncio.gather(*(s.close() for s in sessions), return_exceptions=True),
                                   timeout=timeout)
        if self._http is not None:
            await self._http.close()
            self._http = None

    def forget(self, account_id: int) -> None:
        self.sessions.pop(account_id, None)


class EmulatorSession:
    def __init__(self, backend: EmulatorBackend, config: SessionConfig, directory: Path) -> None:
        self._backend = backend
        self._config = config
        self._dir = directory
        self._token: str | None = None
        self._auth_state = AuthState.WAIT_PHONE
        self._connection_state = ConnectionState.CONNECTING
        self._updates_task: asyncio.Task[None] | None = None

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

    def _load_token(self) -> str | None:
        try:
            blob = self._session_file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return AESGCM(self._config.database_key).decrypt(blob[:12], blob[12:], b"session").decode()
        except InvalidTag:
            raise WrongDatabaseKey() from None

    def _store_token(self, token: str | None) -> None:
        if token is None:
            with contextlib.suppress(FileNotFoundError):
                self._session_file.unlink()
            return
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        nonce = os.urandom(12)
        blob = nonce + AESGCM(self._config.database_key).encrypt(nonce, token.encode(), b"session")
        tmp = self._session_file.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.chmod(0o600)
        tmp.replace(self._session_file)

    # -- authorization -------------------------------------------------------------------------

    async def _set_state(self, state: AuthState) -> AuthState:
        if state != self._auth_state:
            self._auth_state = state
            await self._backend._on_update(AuthStateChanged(self.account_id, state))
        return state

    async def _set_connection(self, state: ConnectionState) -> None:
        if state != self._connection_state:
            self._connection_state = state
            await self._backend._on_update(ConnectionStateChanged(self.account_id, state))

    async def _apply(self, answer: dict[str, Any]) -> AuthState:
        state = AuthState(answer["state"])
        if state == AuthState.READY:
            self._token = str(answer["session"])
            self._store_token(self._token)
            self._start_updates()
        return await self._set_state(state)

    async def start(self) -> AuthState:
        try:
            token = self._load_token()
        except WrongDatabaseKey:
            await self._set_state(AuthState.FAILED)
            raise
        if token is not None:
            try:
                await self._backend.call("session.check", session=token)
            except PermanentError:
                self._store_token(None)
            else:
                self._token = token
                self._start_updates()
                return await self._set_state(AuthState.READY)
        await self._set_connection(ConnectionState.READY)
        answer = await self._backend.call("auth.sendCode", phone=self._config.phone)
        return await self._apply(answer)

    async def submit_code(self, code: str) -> AuthState:
        self._require(AuthState.WAIT_CODE)
        return await self._apply(await self._backend.call("auth.signIn", phone=self._config.phone, code=code))

    async def submit_password(self, password: str) -> AuthState:
        self._require(AuthState.WAIT_PASSWORD)
        return await self._apply(
            await self._backend.call("auth.checkPassword", phone=self._config.phone, password=password))

    async def register(self, first_name: str, last_name: str) -> AuthState:
        self._require(AuthState.WAIT_REGISTRATION)
        return await self._apply(await self._backend.call(
            "auth.signUp", phone=self._config.phone, first_name=first_name, last_name=last_name))

    def _require(self, state: AuthState) -> None:
        if self._auth_state != state:
            raise AuthError(400, f"not expected now: auth_state is {self._auth_state}")

    async def send_text(self, peer: str, text: str, *, random_id: str = "") -> SentMessage:
        if self._auth_state != AuthState.READY or self._token is None:
            raise NotAuthorized(self._auth_state)
        answer = await self._backend.call("messages.send", session=self._token, peer=peer, text=text,
                                          random_id=random_id)
        return SentMessage(int(answer["message_id"]), int(answer["chat_id"]))

    async def log_out(self) -> None:
        await self._set_state(AuthState.LOGGING_OUT)
        if self._token is not None:
            with contextlib.suppress(TelegramError):
                await self._backend.call("auth.logOut", session=self._token)
        self._token = None
        self._store_token(None)
        await self._stop_updates()
        await self._set_state(AuthState.LOGGED_OUT)

    async def close(self) -> None:
        await self._stop_updates()
        self._backend.forget(self.account_id)
        if self._auth_state != AuthState.LOGGED_OUT:
            await self._set_state(AuthState.CLOSED)

    # -- incoming updates ------------------------------------------------------------------------

    def _start_updates(self) -> None:
        if self._updates_task is None:
            self._updates_task = asyncio.create_task(self._receive_updates(), name=f"updates:{self.account_id}")

    async def _stop_updates(self) -> None:
        task, self._updates_task = self._updates_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _receive_updates(self) -> None:
        delay = 0.2
        while self._token is not None:
            try:
                http = await self._backend.http()
                async with http.ws_connect(f"{self._backend._base_url}/updates",
                                           params={"session": self._token}, heartbeat=10,
                                           timeout=aiohttp.ClientWSTimeout(ws_close=2)) as ws:
                    await self._set_connection(ConnectionState.READY)
                    delay = 0.2
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            break
                        data = msg.json()
                        if data.get("type") == "message":
                            await self._backend._on_update(IncomingMessage(
                                self.account_id, int(data["chat_id"]), int(data["message_id"]),
                                str(data["sender"]), str(data["text"]), int(data["date"])))
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.info("emulator connection lost", account_id=self.account_id, error=type(exc).__name__)
            await self._set_connection(ConnectionState.CONNECTING)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
