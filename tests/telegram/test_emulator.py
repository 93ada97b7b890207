"""The Telegram emulator: its rules in process (with a clock the test moves), then through the emulator
backend over HTTP, the way the worker uses it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from structlog.testing import capture_logs
from support import EmulatorHandle, eventually

from telegram_platform.telegram.base import (
    LOGGED_OUT_AT_TELEGRAM,
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
    SessionConfig,
    Update,
    WrongDatabaseKey,
    classify_error,
)
from telegram_platform.telegram.content import plain
from telegram_platform.telegram.emulator.backend import REQUEST_CONNECTIONS, EmulatorBackend, EmulatorSession
from telegram_platform.telegram.emulator.model import (
    EmulatorConfig,
    EmulatorError,
    TelegramEmulator,
    config_with,
)
from telegram_platform.telegram.keys import derive_database_key

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _emulator(**config: object) -> tuple[TelegramEmulator, Clock, int]:
    clock = Clock()
    telegram = TelegramEmulator(config_with(EmulatorConfig(latency_ms=0), config), clock=clock)
    return telegram, clock, telegram.user_for_phone("+9996612345").user_id


def _refusal(telegram: TelegramEmulator, user_id: int, peer: str) -> EmulatorError:
    with pytest.raises(EmulatorError) as caught:
        telegram.send_message(user_id, peer, "hi")
    return caught.value


# -- the rules, in process -----------------------------------------------------------------------

def test_same_seed_same_ids_tokens_and_jitter() -> None:
    """Two emulators with one seed hand out the same session tokens, jitter, chat and message ids."""

    def run(seed: int) -> tuple[object, ...]:
        telegram = TelegramEmulator(EmulatorConfig(latency_ms=5, latency_jitter_ms=20, seed=seed),
                                    clock=Clock())
        telegram.send_code("+9996612345")
        login = telegram.sign_in("+9996612345", "11111")
        record = telegram.send_message(login["user_id"], "@alice", "hi")
        incoming = telegram.deliver_incoming("+9996612345", "@bob", "yo")
        return (login["session"], [telegram.latency() for _ in range(5)], record.chat_id, record.message_id,
                incoming["chat_id"], incoming["message_id"])

    assert run(7) == run(7)
    assert run(7)[:2] != run(8)[:2]


def test_chat_ids_do_not_depend_on_the_process() -> None:
    """Chat ids are the same under any PYTHONHASHSEED: no hash() of strings anywhere."""
    code = ("from telegram_platform.telegram.emulator.model import TelegramEmulator as T; "
            "t = T(); print(t.chat_id_for('@alice'), t.deliver_incoming('+9996612345', 'carol', 'x')['chat_id'])")
    outputs = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed, "PATH": ""},
                              capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(outputs) == 1


def test_the_emulated_telegram_loads_without_its_http_surface() -> None:
    """emulator/model.py stands alone: importing it loads no aiohttp (that is emulator/http.py's)."""
    code = ("import sys, telegram_platform.telegram.emulator.model; "
            "print('aiohttp' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(("rate", "elapsed", "expected"), [
    (0.5, 0.1, 2),     # 0.95 tokens short at 0.5/s: 1.9 s, said as 2
    (0.5, 1.99, 1),    # 0.005 short: 0.01 s, never "retry after 0"
    (0.1, 0.0, 10),
])
def test_account_rate_limit_answers_429_like_tdlib(rate: float, elapsed: float, expected: int) -> None:
    """Past the account's rate: 429 "Too Many Requests: retry after N" (N whole, >= 1); after N s it sends."""
    telegram, clock, user = _emulator(account_rate=rate, account_burst=1)
    telegram.send_message(user, "@a", "hi")
    clock.now += elapsed
    error = _refusal(telegram, user, "@b")
    assert (error.code, error.message) == (429, f"Too Many Requests: retry after {expected}")
    assert error.extra == {"retry_after": expected}
    mapped = classify_error(error.code, error.message)
    assert isinstance(mapped, RateLimited) and mapped.retry_after == expected
    clock.now += expected
    telegram.send_message(user, "@b", "hi")


def test_per_chat_interval_limits_one_chat_only() -> None:
    """A second message to the same chat within `chat_interval` is refused; another chat is not."""
    telegram, clock, user = _emulator(chat_interval=3.0)
    telegram.send_message(user, "@a", "1")
    clock.now += 1.0
    assert _refusal(telegram, user, "@a").message == "Too Many Requests: retry after 2"
    telegram.send_message(user, "@b", "1")
    clock.now += 2.0
    telegram.send_message(user, "@a", "2")


def test_peer_flood_after_too_many_first_contacts() -> None:
    """Past `peer_flood_after` first contacts: PEER_FLOOD for new peers; known peers and contacts still work."""
    telegram, clock, user = _emulator(peer_flood_after=2, peer_flood_window=3600.0)
    telegram.send_message(user, "@a", "1")
    telegram.send_message(user, "@b", "1")
    error = _refusal(telegram, user, "@c")
    assert (error.code, error.message) == (400, "PEER_FLOOD")
    assert isinstance(classify_error(error.code, error.message), PeerFlood)
    telegram.send_message(user, "@a", "2")  # not a first contact
    telegram.deliver_incoming("+9996612345", "@d", "hello")  # someone who wrote first is no cold send
    telegram.send_message(user, "@d", "hi back")
    telegram.add_contacts("+9996612345", ["@e"])
    telegram.send_message(user, "@e", "hi")
    clock.now += 3601
    telegram.send_message(user, "@c", "later")
    assert telegram.counters["peer_flood"] == 1


def test_every_attempt_and_delivery_is_kept() -> None:
    """Attempts keep their outcome and time; deliveries count per recipient; a repeated random_id is one."""
    telegram, clock, user = _emulator(chat_interval=5.0)
    telegram.send_message(user, "@a", "1", random_id="r1")
    telegram.send_message(user, "@a", "1", random_id="r1")  # a retry of the same send
    clock.now += 1
    with pytest.raises(EmulatorError):
        telegram.send_message(user, "@a", "2")
    clock.now += 1
    with pytest.raises(EmulatorError):  # tried again 1 s after "retry after 4": too early
        telegram.send_message(user, "@a", "2")
    clock.now += 4
    telegram.send_message(user, "@a", "2")
    assert [(a.outcome, a.retry_after) for a in telegram.attempts_by(user)] == [
        ("accepted", None), ("duplicate", None), ("rate_limited", 4), ("rate_limited", 3), ("accepted", None)]
    assert telegram.deliveries() == {"@a": 2}
    assert [r.text for r in telegram.received_by("@a")] == ["1", "2"]
    early = telegram.early_attempts(user)
    assert len(early) == 1 and early[0][1].at - early[0][0].at == 1


def test_config_changes_are_validated() -> None:
    """Unknown or mistyped settings are refused by name."""
    with pytest.raises(ValueError, match="unknown setting 'latency'"):
        config_with(EmulatorConfig(), {"latency": 1})
    with pytest.raises(ValueError, match="account_rate"):
        config_with(EmulatorConfig(), {"account_rate": "fast"})
    assert config_with(EmulatorConfig(), {"account_rate": 2, "seed": 3}).account_rate == 2


def test_snapshot_keeps_sessions_and_update_numbers() -> None:
    """A restored emulator knows the sessions and continues the update sequence (no pts reuse)."""
    telegram, _, _ = _emulator()
    telegram.send_code("+9996612345")
    token = telegram.sign_in("+9996612345", "11111")["session"]
    telegram.deliver_incoming("+9996612345", "@bob", "1")
    restored = TelegramEmulator(clock=Clock())
    restored.restore(telegram.snapshot())
    user = restored.session_user(token)
    assert restored.deliver_incoming("+9996612345", "@bob", "2")["pts"] == 2
    assert restored.current_pts(user) == 2


# -- through the emulator backend, over HTTP -----------------------------------------------------

class Sink:
    def __init__(self) -> None:
        self.updates: list[Update] = []

    async def __call__(self, update: Update) -> None:
        self.updates.append(update)

    def connection(self, account_id: int) -> list[ConnectionState]:
        return [u.state for u in self.updates if isinstance(u, ConnectionStateChanged) and u.account_id == account_id]

    def auth(self, account_id: int) -> list[AuthState]:
        return [u.state for u in self.updates if isinstance(u, AuthStateChanged) and u.account_id == account_id]


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
async def backend(fresh_emulator: EmulatorHandle, tmp_path: Path, sink: Sink) -> AsyncIterator[EmulatorBackend]:
    backend = EmulatorBackend(fresh_emulator.url, tmp_path, on_update=sink, request_timeout=5.0)
    yield backend
    await backend.aclose(time.monotonic() + 5)


def _config(account_id: int, phone: str, key: bytes = KEY) -> SessionConfig:
    return SessionConfig(account_id=account_id, phone=phone, database_key=derive_database_key(key, account_id))


async def _ready(backend: EmulatorBackend, account_id: int, phone: str) -> EmulatorSession:
    session = await backend.open_session(_config(account_id, phone))
    assert await session.start() is AuthState.WAIT_CODE
    assert await session.submit_code(phone[6] * 5) is AuthState.READY
    return session


async def test_login_with_password_and_registration(backend: EmulatorBackend, fresh_emulator: EmulatorHandle,
                                                    sink: Sink) -> None:
    """A new user goes code -> registration -> password -> ready; a wrong code is an AuthError."""
    user = fresh_emulator.telegram.user_for_phone("+9996671234")
    user.registered, user.password = False, "secret-pass"
    session = await backend.open_session(_config(1, "+9996671234"))
    assert await session.start() is AuthState.WAIT_CODE
    with pytest.raises(AuthError, match="PHONE_CODE_INVALID"):
        await session.submit_code("12345")
    assert await session.submit_code("77777") is AuthState.WAIT_REGISTRATION
    assert await session.register("Ada", "L") is AuthState.WAIT_PASSWORD
    with pytest.raises(AuthError, match="PASSWORD_HASH_INVALID"):
        await session.submit_password("nope")
    assert await session.submit_password("secret-pass") is AuthState.READY
    assert sink.auth(1) == [AuthState.WAIT_CODE, AuthState.WAIT_REGISTRATION, AuthState.WAIT_PASSWORD,
                            AuthState.READY]
    assert fresh_emulator.telegram.counters["logins"] == 1


async def test_a_stored_login_resumes_without_logging_in(fresh_emulator: EmulatorHandle, tmp_path: Path) -> None:
    """A new backend on the same data directory is READY at once (no login); a wrong key is reported."""
    first = EmulatorBackend(fresh_emulator.url, tmp_path, on_update=Sink())
    await _ready(first, 2, "+9996621234")
    await first.aclose(time.monotonic() + 5)

    second = EmulatorBackend(fresh_emulator.url, tmp_path, on_update=Sink())
    try:
        session = await second.open_session(_config(2, "+9996621234"))
        assert await session.start() is AuthState.READY
        await session.send("@x", plain("after restart"))
        assert fresh_emulator.telegram.counters["logins"] == 1
        await session.close()
        wrong = await second.open_session(_config(2, "+9996621234", OTHER_KEY))
        with pytest.raises(WrongDatabaseKey):
            await wrong.start()
        assert wrong.auth_state is AuthState.FAILED
    finally:
        await second.aclose(time.monotonic() + 5)


async def test_me_is_the_user_id_telegram_gave_and_outlives_a_restart(fresh_emulator: EmulatorHandle,
                                                                       tmp_path: Path) -> None:
    """me() is NotAuthorized before login, then Telegram's user id for the phone, kept in the stored
    login; a login stored before it was kept is asked of Telegram once (session.check)."""
    telegram = fresh_emulator.telegram
    expected = telegram.user_for_phone("+9996641234").user_id
    first = EmulatorBackend(fresh_emulator.url, tmp_path, on_update=Sink())
    try:
        pending = await first.open_session(_config(4, "+9996641234"))
        assert await pending.start() is AuthState.WAIT_CODE
        with pytest.raises(NotAuthorized):
            await pending.me()
        assert await pending.submit_code("44444") is AuthState.READY
        assert await pending.me() == expected
    finally:
        await first.aclose(time.monotonic() + 5)

    # The stored login as the version before this one wrote it: token and update number only.
    key = derive_database_key(KEY, 4)
    session_file = tmp_path / "emulator" / "4" / "session.bin"
    blob = session_file.read_bytes()
    stored = json.loads(AESGCM(key).decrypt(blob[:12], blob[12:], b"session"))
    assert stored["user_id"] == expected
    del stored["user_id"]
    nonce = os.urandom(12)
    session_file.write_bytes(nonce + AESGCM(key).encrypt(nonce, json.dumps(stored).encode(), b"session"))

    second = EmulatorBackend(fresh_emulator.url, tmp_path, on_update=Sink())
    try:
        resumed = await second.open_session(_config(4, "+9996641234"))
        assert await resumed.start() is AuthState.READY
        assert await resumed.me() == expected
        assert telegram.counters["logins"] == 1
    finally:
        await second.aclose(time.monotonic() + 5)
    blob = session_file.read_bytes()
    assert json.loads(AESGCM(key).decrypt(blob[:12], blob[12:], b"session"))["user_id"] == expected


async def test_limits_arrive_classified_and_counted(backend: EmulatorBackend, fresh_emulator: EmulatorHandle) -> None:
    """Through the backend, a 429 is RateLimited with TDLib's N and PEER_FLOOD is PeerFlood; stats count both."""
    session = await _ready(backend, 3, "+9996631234")
    fresh_emulator.telegram.config = config_with(fresh_emulator.telegram.config,
                                                 {"account_rate": 0.25, "peer_flood_after": 1})
    await session.send("@first", plain("1"))
    with pytest.raises(RateLimited) as limited:
        await session.send("@first", plain("2"))
    assert limited.value.retry_after == 4 and limited.value.message == "Too Many Requests: retry after 4"
    fresh_emulator.telegram.config.account_rate = None
    with pytest.raises(PeerFlood):
        await session.send("@second", plain("1"))
    with pytest.raises(PermanentError):
        await session.send("@first", plain(""))
    stats = backend.stats()
    assert stats["errors_total"] == {"transient": 0, "rate_limited": 2, "permanent": 1}
    assert stats["requests_total"] == 6  # sendCode, signIn, four sends
    assert stats["sessions_total"] == 1
    assert stats["clients"] == {"ready": 1} and stats["backend"] == "emulator"
    assert {"pending_requests", "queue_depth", "receive_loop_lag_seconds", "stalled"} <= set(stats)


async def test_update_streams_never_starve_requests(fresh_emulator: EmulatorHandle, tmp_path: Path) -> None:
    """With more logged-in accounts than the request pool's connections, a send still goes out at once."""
    backend = EmulatorBackend(fresh_emulator.url, tmp_path, on_update=Sink(), request_timeout=5.0)
    try:
        count = REQUEST_CONNECTIONS + 10
        sessions = []
        for start in range(0, count, 50):
            sessions += await asyncio.gather(*(_ready(backend, 1000 + i, f"+99966{10000 + i}")
                                               for i in range(start, min(count, start + 50))))

        async def all_streaming() -> bool:
            return all(s.connection_state is ConnectionState.READY for s in sessions)

        await eventually(all_streaming, timeout=20)
        sent = await asyncio.wait_for(sessions[0].send("@peer", plain("after the streams")), timeout=3)
        assert sent.telegram_message_id > 0
    finally:
        await backend.aclose(time.monotonic() + 10)


async def test_a_request_past_its_deadline_is_logged_and_a_timeout(fresh_emulator: EmulatorHandle,
                                                                  tmp_path: Path) -> None:
    """A send Telegram does not answer within the request timeout raises RequestTimeout and logs a line."""
    backend = EmulatorBackend(fresh_emulator.url, tmp_path, on_update=Sink(), request_timeout=0.5)
    try:
        session = await _ready(backend, 7, "+9996671111")
        fresh_emulator.telegram.config = config_with(fresh_emulator.telegram.config, {"latency_ms": 3000})
        started = time.monotonic()
        with capture_logs() as logs, pytest.raises(RequestTimeout):
            await session.send("@peer", plain("slow"))
        assert time.monotonic() - started < 2.0
        assert [line["method"] for line in logs if line["event"] == "emulator.request_timeout"] == ["messages.send"]
    finally:
        await backend.aclose(time.monotonic() + 5)


async def test_a_dropped_connection_reconnects_and_catches_up(backend: EmulatorBackend,
                                                              fresh_emulator: EmulatorHandle, sink: Sink) -> None:
    """A drop reports `connecting` then `ready`; a message sent while offline arrives after the reconnect."""
    session = await _ready(backend, 4, "+9996641234")
    await eventually(lambda: _async(fresh_emulator.telegram.connected("+9996641234")))
    sink.updates.clear()
    assert fresh_emulator.telegram.drop_connections(seconds=0.6) >= 1
    await eventually(lambda: _async(sink.connection(4) == [ConnectionState.CONNECTING]))
    fresh_emulator.telegram.deliver_incoming("+9996641234", "@bob", "while you were away")
    await asyncio.sleep(0.3)
    assert session.connection_state is ConnectionState.CONNECTING  # still offline
    await eventually(lambda: _async(sink.connection(4) == [ConnectionState.CONNECTING, ConnectionState.READY]),
                     timeout=5)
    incoming = await eventually(lambda: _async([u for u in sink.updates if isinstance(u, IncomingMessage)]))
    assert [(m.text, m.sender, m.chat_id) for m in incoming] == [
        ("while you were away", "@bob", fresh_emulator.telegram.chat_id_for("@bob"))]


async def test_incoming_messages_on_demand(backend: EmulatorBackend, fresh_emulator: EmulatorHandle,
                                           sink: Sink) -> None:
    """POST /control/incoming pushes a message to the account's live session, once."""
    await _ready(backend, 5, "+9996651234")
    await eventually(lambda: _async(fresh_emulator.telegram.connected("+9996651234")))
    async with aiohttp.ClientSession() as http, http.post(f"{fresh_emulator.url}/control/incoming",
                         json={"to_phone": "+9996651234", "sender": "@eve", "text": "ping"}) as response:
        assert response.status == 200
    incoming = await eventually(lambda: _async([u for u in sink.updates if isinstance(u, IncomingMessage)]))
    assert [(m.account_id, m.text) for m in incoming] == [(5, "ping")]


async def test_phone_answer_waits_at_most_phone_timeout(backend: EmulatorBackend, fresh_emulator: EmulatorHandle,
                                                        sink: Sink) -> None:
    """Offline, start() returns WAIT_PHONE after phone_timeout; the login completes by itself later."""
    fresh_emulator.telegram.drop_connections(seconds=0.8)
    session = await backend.open_session(_config(6, "+9996661234"))
    started = time.monotonic()
    assert await session.start(phone_timeout=0.2) is AuthState.WAIT_PHONE
    assert time.monotonic() - started < 0.6
    assert session.connection_state is ConnectionState.CONNECTING
    await eventually(lambda: _async(sink.auth(6) == [AuthState.WAIT_CODE]), timeout=5)
    assert await session.submit_code("66666") is AuthState.READY


async def test_a_session_revoked_at_telegram_ends_logged_out(backend: EmulatorBackend,
                                                             fresh_emulator: EmulatorHandle, sink: Sink) -> None:
    """When Telegram forgets the session (terminated elsewhere), the reconnecting stream reports LOGGED_OUT,
    saying so."""
    session = await _ready(backend, 8, "+9996681234")
    await eventually(lambda: _async(fresh_emulator.telegram.connected("+9996681234")))
    fresh_emulator.telegram.sessions.clear()
    fresh_emulator.telegram.drop_connections()
    await eventually(lambda: _async(session.auth_state is AuthState.LOGGED_OUT), timeout=5)
    logged_out = [u for u in sink.updates if isinstance(u, AuthStateChanged) and u.state is AuthState.LOGGED_OUT]
    assert [u.reason for u in logged_out] == [LOGGED_OUT_AT_TELEGRAM]  # the account's last_error


async def test_control_surface_over_http(fresh_emulator: EmulatorHandle) -> None:
    """The /control endpoints configure, count attempts and deliveries, and refuse bad settings with 400."""
    telegram = fresh_emulator.telegram
    telegram.send_code("+9996691234")
    user = telegram.sign_in("+9996691234", "99999")["user_id"]
    async with aiohttp.ClientSession(base_url=fresh_emulator.url) as http:
        async with http.post("/control/config", json={"chat_interval": 60}) as response:
            assert response.status == 200 and (await response.json())["chat_interval"] == 60
        async with http.post("/control/config", json={"chat_intervl": 60}) as response:
            assert response.status == 400 and "chat_intervl" in (await response.json())["error"]["message"]
        telegram.send_message(user, "@z", "1")
        with pytest.raises(EmulatorError):
            telegram.send_message(user, "@z", "2")
        async with http.get("/control/attempts", params={"phone": "+9996691234"}) as response:
            body = await response.json()
        assert [a["outcome"] for a in body["attempts"]] == ["accepted", "rate_limited"]
        assert body["attempts"][1]["retry_after"] == 60 and body["early"] == 0
        async with http.get("/control/deliveries") as response:
            assert await response.json() == {"recipients": {"@z": 1}, "duplicates": 0}
        async with http.post("/control/reset", json={"latency_ms": "x"}) as response:
            assert response.status == 400


async def test_an_attempt_records_the_address_it_came_from(fresh_emulator: EmulatorHandle) -> None:
    """A send over HTTP keeps the sender's address in its attempt: hosts sharing one account's session
    are told apart by it (tests/multihost); a send made in-process has none."""
    telegram = fresh_emulator.telegram
    telegram.send_code("+9996691235")
    session = telegram.sign_in("+9996691235", "99999")["session"]
    user = telegram.session_user(session)
    telegram.send_message(user, "@y", "in process")
    async with aiohttp.ClientSession(base_url=fresh_emulator.url) as http:
        async with http.post("/rpc/messages.send", json={"session": session, "peer": "@y", "text": "over http"}) as r:
            assert (await r.json())["ok"] is True
        async with http.get("/control/attempts", params={"phone": "+9996691235"}) as response:
            body = await response.json()
    assert [(a["outcome"], a["source"]) for a in body["attempts"]] == [("accepted", ""), ("accepted", "127.0.0.1")]


async def _async(value: object) -> object:
    return value


async def test_a_blocked_event_loop_is_reported_as_stalled(backend: EmulatorBackend) -> None:
    """The emulator backend's watchdog reports a loop blocked over 0.25 s as lag and `stalled`, like TDLib's."""
    await backend.open_session(_config(9, "+9996691111"))  # starts the watchdog
    await asyncio.sleep(0.15)
    assert backend.stats()["stalled"] is False
    time.sleep(0.4)  # noqa: ASYNC251 - blocking the loop is the point
    await asyncio.sleep(0.15)
    stats = backend.stats()
    assert stats["receive_loop_lag_seconds"] >= 0.25 and stats["stalled"] is True
