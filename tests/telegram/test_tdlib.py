"""The TDLib backend against the real, bundled TDLib, offline.

Offline TDLib reaches authorizationStateWaitPhoneNumber and connectionStateConnecting and no further,
so these tests cover everything up to the network: many clients, the database key, timeouts, closing.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from telegram_platform.settings import TdlibSettings
from telegram_platform.telegram.base import (
    AuthError,
    AuthState,
    AuthStateChanged,
    ConnectionState,
    ConnectionStateChanged,
    NotAuthorized,
    PeerFlood,
    PermanentError,
    Proxy,
    RateLimited,
    RequestTimeout,
    SentMessage,
    SessionConfig,
    TransientError,
    Update,
    WrongDatabaseKey,
    classify_error,
)
from telegram_platform.telegram.content import Entity, FormattedText, OutgoingMessage, plain
from telegram_platform.telegram.keys import account_database_dir, derive_database_key, set_aside
from telegram_platform.telegram.tdlib.backend import BackendAlreadyRunning, TdlibBackend
from telegram_platform.telegram.tdlib.messages import (
    delete_messages_query,
    edit_message_query,
    forward_messages_query,
    send_message_query,
    view_messages_query,
)
from telegram_platform.telegram.tdlib.peers import PeerCache, resolve_peer
from telegram_platform.telegram.tdlib.protocol import map_error

API_ID = 94575
API_HASH = "a3406de8d171bb422bb6ddf3bbd800e2"
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def _settings(data_dir: Path, request_timeout: float = 10.0) -> TdlibSettings:
    return TdlibSettings(api_id=API_ID, api_hash=API_HASH, data_dir=data_dir, use_test_dc=False,
                         log_verbosity=1, log_file=data_dir / "tdlib.log",
                         request_timeout=request_timeout, max_clients=1000)


def _config(account_id: int, key: bytes = KEY_A, proxy: Proxy | None = None) -> SessionConfig:
    return SessionConfig(account_id=account_id, phone=f"+1555{account_id:07d}",
                         database_key=derive_database_key(key, account_id), proxy=proxy)


async def _eventually(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


class Sink:
    def __init__(self) -> None:
        self.updates: list[Update] = []

    async def __call__(self, update: Update) -> None:
        self.updates.append(update)


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
async def backend(tmp_path: Path, sink: Sink) -> AsyncIterator[TdlibBackend]:
    backend = TdlibBackend(_settings(tmp_path), on_update=sink)
    try:
        yield backend
    finally:
        await backend.aclose(time.monotonic() + 15)
    assert backend.client_count == 0


async def test_fifty_real_clients_reach_wait_phone_and_connecting(backend: TdlibBackend, sink: Sink) -> None:
    """50 real TDLib clients in one process, one receive thread, all reach WAIT_PHONE and `connecting`."""
    sessions = [await backend.open_session(_config(account_id)) for account_id in range(1, 51)]
    assert len({s.client_id for s in sessions}) == 50
    states = await asyncio.gather(*(s.start(phone_timeout=0.2) for s in sessions))
    assert set(states) == {AuthState.WAIT_PHONE}
    await _eventually(lambda: all(s.connection_state is ConnectionState.CONNECTING for s in sessions))

    stats = backend.stats()
    assert stats["clients"] == {"wait_phone": 50}
    assert stats["connection"] == {"connecting": 50}
    assert stats["receive_thread_alive"] is True
    assert stats["pending_requests"] == 0
    await _eventually(lambda: len(sink.updates) >= 100)
    assert {u for u in sink.updates if isinstance(u, AuthStateChanged)} == {
        AuthStateChanged(i, AuthState.WAIT_PHONE) for i in range(1, 51)}
    assert {u for u in sink.updates if isinstance(u, ConnectionStateChanged)} == {
        ConnectionStateChanged(i, ConnectionState.CONNECTING) for i in range(1, 51)}
    for account_id in (1, 50):  # each account has its own database directory
        assert (account_database_dir(backend.settings.data_dir, account_id) / "td.binlog").exists()


async def test_wrong_database_key_is_reported_and_marks_the_session_failed(
        backend: TdlibBackend, sink: Sink) -> None:
    """A database created with key A and reopened with key B raises WrongDatabaseKey: FAILED, released."""
    first = await backend.open_session(_config(7, KEY_A))
    assert await first.start(phone_timeout=0) is AuthState.WAIT_PHONE
    await first.close()

    second = await backend.open_session(_config(7, KEY_B))
    with pytest.raises(WrongDatabaseKey) as caught:
        await second.start(phone_timeout=0)
    assert caught.value.code == 401
    assert second.auth_state is AuthState.FAILED
    # The failed client is closed by the backend itself; FAILED stays what it reports.
    await _eventually(lambda: second.closed)
    assert second.auth_state is AuthState.FAILED
    assert backend.client_count == 0
    await _eventually(lambda: any(isinstance(u, AuthStateChanged) and u.state is AuthState.FAILED
                                  for u in sink.updates))
    # Why, which the account's last_error then says.
    assert [(u.account_id, u.reason) for u in sink.updates
            if isinstance(u, AuthStateChanged) and u.state is AuthState.FAILED] == [(7, caught.value.message)]
    with pytest.raises(WrongDatabaseKey):
        await second.start()

    third = await backend.open_session(_config(7, KEY_A))  # the right key still opens it
    assert await third.start(phone_timeout=0) is AuthState.WAIT_PHONE


async def test_a_database_set_aside_lets_a_new_key_start_and_keeps_the_old_one(backend: TdlibBackend) -> None:
    """After WrongDatabaseKey, setting the database aside lets key B start an empty one, and the kept
    copy, moved back, still opens with key A: nothing of the old login is lost."""
    first = await backend.open_session(_config(8, KEY_A))
    assert await first.start(phone_timeout=0) is AuthState.WAIT_PHONE
    await first.close()
    second = await backend.open_session(_config(8, KEY_B))
    with pytest.raises(WrongDatabaseKey):
        await second.start(phone_timeout=0)
    await _eventually(lambda: second.closed)

    database = backend.database_dir(8)
    assert database == account_database_dir(backend.settings.data_dir, 8)
    kept = set_aside(database)
    assert kept is not None and (kept / "td.binlog").exists() and not database.exists()
    third = await backend.open_session(_config(8, KEY_B))
    assert await third.start(phone_timeout=0) is AuthState.WAIT_PHONE
    await third.close()

    shutil.rmtree(database)
    kept.rename(database)
    fourth = await backend.open_session(_config(8, KEY_A))
    assert await fourth.start(phone_timeout=0) is AuthState.WAIT_PHONE


async def test_a_send_pending_when_the_client_closes_is_an_unknown_outcome(backend: TdlibBackend) -> None:
    """A message TDLib accepted but Telegram had not confirmed when the client closes fails the send
    with RequestTimeout (outcome unknown: TDLib re-sends it itself), never a TransientError, which
    the platform would retry as a second message."""
    session = await backend.open_session(_config(9))
    assert await session.start(phone_timeout=0) is AuthState.WAIT_PHONE
    confirmation: asyncio.Future[SentMessage] = asyncio.get_running_loop().create_future()
    session._send_waiters[(1, 2)] = confirmation  # what a send registers once TDLib answers sendMessage
    await session.close()
    with pytest.raises(RequestTimeout, match="may still send it"):
        await confirmation


async def test_every_client_closes_cleanly(backend: TdlibBackend) -> None:
    """close() and aclose() both end in authorizationStateClosed, with the dispatch table empty after."""
    sessions = [await backend.open_session(_config(account_id)) for account_id in range(100, 120)]
    await asyncio.gather(*(s.start(phone_timeout=0) for s in sessions))
    never_started = await backend.open_session(_config(999))

    started = time.monotonic()
    await asyncio.gather(*(s.close() for s in sessions[:10]))
    assert time.monotonic() - started < 5
    assert all(s.closed and s.auth_state is AuthState.CLOSED for s in sessions[:10])
    assert backend.client_count == 11

    await backend.aclose(time.monotonic() + 10)
    assert all(s.closed and s.auth_state is AuthState.CLOSED for s in sessions)
    assert never_started.closed
    stats = backend.stats()
    assert backend.client_count == 0
    assert stats["clients"] == {} and stats["pending_requests"] == 0
    assert stats["receive_thread_alive"] is False


async def test_an_unanswered_request_times_out_cleanly(tmp_path: Path, sink: Sink) -> None:
    """A request offline TDLib never answers raises RequestTimeout on time, logs it, and leaves nothing pending."""
    backend = TdlibBackend(_settings(tmp_path, request_timeout=0.5), on_update=sink)
    try:
        session = await backend.open_session(_config(3))
        assert await session.start() is AuthState.WAIT_PHONE  # its own phone request timed out inside
        assert session.pending_requests == 0
        started = time.monotonic()
        with capture_logs() as logs, pytest.raises(RequestTimeout):
            await session.request({"@type": "setAuthenticationPhoneNumber", "phone_number": "+15550000003"})
        assert 0.45 < time.monotonic() - started < 2.0
        assert [line["request"] for line in logs if line["event"] == "tdlib.request_timeout"] == [
            "setAuthenticationPhoneNumber"]  # a passed deadline says so in the log
        with pytest.raises(RequestTimeout):  # a per-call override
            await session.request({"@type": "setAuthenticationPhoneNumber", "phone_number": "+15550000003"},
                                  within=0.1)
        assert session.pending_requests == 0
        assert backend.stats()["pending_requests"] == 0
        await _eventually(lambda: session.connection_state is ConnectionState.CONNECTING)
        assert session.auth_state is AuthState.WAIT_PHONE
        # The client still works: a local request answers at once.
        answer = await session.request({"@type": "getOption", "name": "version"})
        assert answer["value"] == backend.version
    finally:
        await backend.aclose(time.monotonic() + 10)


async def test_a_second_backend_in_the_same_process_is_refused(tmp_path: Path, sink: Sink) -> None:
    """Only one TdlibBackend (one td_receive loop) may exist per process; aclose frees the slot."""
    first = TdlibBackend(_settings(tmp_path / "a"), on_update=sink)
    try:
        with pytest.raises(BackendAlreadyRunning, match="one td_receive loop per process"):
            TdlibBackend(_settings(tmp_path / "b"), on_update=sink)
    finally:
        await first.aclose(time.monotonic() + 5)
    second = TdlibBackend(_settings(tmp_path / "b"), on_update=sink)
    await second.aclose(time.monotonic() + 5)


async def test_send_before_login_is_refused_locally(backend: TdlibBackend) -> None:
    """send and me() on a session that is not READY raise NotAuthorized without waiting on the network."""
    session = await backend.open_session(_config(11))
    await session.start(phone_timeout=0)
    with pytest.raises(NotAuthorized):
        await session.send("@durov", plain("hello"))
    with pytest.raises(NotAuthorized):  # TDLib's own 401 "Unauthorized" maps the same way
        await session.request({"@type": "searchPublicChat", "username": "durov"})
    with pytest.raises(NotAuthorized):
        await session.me()


async def test_a_client_without_login_answers_each_message_shape_with_a_state_error(backend: TdlibBackend) -> None:
    """A real client at WAIT_PHONE: every message request the platform builds is parsed and answered
    "not authorized" (a state error), while a malformed one is refused by TDLib's parser."""
    session = await backend.open_session(_config(12))
    await session.start(phone_timeout=0)
    text = FormattedText("hi 😀", (Entity("bold", 0, 2),))
    shapes = [send_message_query(777, OutgoingMessage(text, reply_to=1 << 20, silent=True,
                                                      disable_web_page_preview=True)),
              forward_messages_query(777, 778, [1 << 20]), edit_message_query(777, 1 << 20, text, caption=False),
              edit_message_query(777, 1 << 20, text, caption=True), delete_messages_query(777, [1 << 20], revoke=True),
              view_messages_query(777, [1 << 20])]
    for query in shapes:
        with pytest.raises(NotAuthorized):
            await session.request(query)
    with pytest.raises(PermanentError, match="Failed to parse JSON object as TDLib request"):
        await session.request({**shapes[0], "reply_to": {"@type": "inputMessageReplyToNothing"}})


async def test_a_configured_proxy_is_enabled_once(backend: TdlibBackend) -> None:
    """The proxy is added after the parameters, in TDLib 1.8.69's format, and not duplicated on reopen."""
    proxy = Proxy(type="socks5", server="127.0.0.1", port=1, username="u", password="p")
    for _ in range(2):
        session = await backend.open_session(_config(12, proxy=proxy))
        assert await session.start(phone_timeout=0) is AuthState.WAIT_PHONE
        stored = await session.request({"@type": "getProxies"})
        await session.close()
    assert len(stored["proxies"]) == 1
    assert stored["proxies"][0]["is_enabled"] is True
    assert stored["proxies"][0]["proxy"]["server"] == "127.0.0.1"


async def test_stats_report_version_and_receive_loop_lag(backend: TdlibBackend) -> None:
    """stats() carries the TDLib version (td_execute, offline) and a small, unstalled receive-loop lag."""
    session = await backend.open_session(_config(13))
    await session.start(phone_timeout=0)
    stats = backend.stats()
    assert stats["backend"] == "tdlib"
    assert stats["version"] == "1.8.69"
    assert 0 <= stats["receive_loop_lag_seconds"] < 0.25
    assert stats["stalled"] is False


@pytest.mark.parametrize(("code", "message", "auth_step", "expected"), [
    (429, "Too Many Requests: retry after 123", False, RateLimited),
    (400, "PEER_FLOOD", False, PeerFlood),
    (500, "Request aborted", False, TransientError),
    (400, "PHONE_CODE_INVALID", True, AuthError),
    (400, "PASSWORD_HASH_INVALID", True, AuthError),
    (400, "CHAT_WRITE_FORBIDDEN", False, PermanentError),
    (403, "USER_IS_BLOCKED", False, PermanentError),
])
def test_tdlib_errors_map_to_platform_errors(code: int, message: str, auth_step: bool,
                                             expected: type[Exception]) -> None:
    """Each TDLib error lands in the class that decides retry, back-off or giving up."""
    error = map_error(code, message, auth_step=auth_step)
    assert type(error) is expected
    if isinstance(error, RateLimited):
        assert error.retry_after == 123
    if not auth_step and expected is PermanentError:
        assert not isinstance(error, AuthError)


async def test_a_blocked_event_loop_is_reported_as_stalled(backend: TdlibBackend) -> None:
    """An answer that waits > 0.25 s for a blocked loop shows up as receive-loop lag and `stalled`."""
    session = await backend.open_session(_config(14))
    await session.start(phone_timeout=0)
    answer = asyncio.ensure_future(session.request({"@type": "getOption", "name": "version"}))
    await asyncio.sleep(0)  # the request is sent; TDLib answers at once, into the receive thread
    time.sleep(0.4)  # noqa: ASYNC251 - blocking the loop is the point
    await answer
    stats = backend.stats()
    assert stats["receive_loop_lag_seconds"] >= 0.3
    assert stats["stalled"] is True


@pytest.mark.parametrize(("code", "message", "expected", "retry_after"), [
    (429, "Too Many Requests: retry after 7", RateLimited, 7),
    (420, "FLOOD_WAIT_30", RateLimited, 30),
    (400, "SLOWMODE_WAIT_5", RateLimited, 5),
    (429, "Too Many Requests: retry after 0", RateLimited, 1),  # never "retry now"
    (400, "PEER_FLOOD", PeerFlood, None),
    (500, "Request aborted", TransientError, None),
    (408, "Request timeout", TransientError, None),
    (-1, "Connection closed", TransientError, None),
    (400, "PHONE_CODE_INVALID", AuthError, None),
    (400, "USERNAME_NOT_OCCUPIED", PermanentError, None),
    (403, "USER_IS_BLOCKED", PermanentError, None),
])
def test_both_backends_classify_alike(code: int, message: str, expected: type[Exception],
                                      retry_after: int | None) -> None:
    """TDLib's mapping and the emulator backend's are the one shared classifier: same error, same class."""
    from telegram_platform.telegram.emulator.backend import classify

    for error in (map_error(code, message), classify(code, message), classify_error(code, message)):
        assert type(error) is expected
        if retry_after is not None:
            assert isinstance(error, RateLimited) and error.retry_after == retry_after
    assert map_error(code, message).error_class == classify(code, message).error_class


def test_peer_cache_is_bounded_and_remembers_misses() -> None:
    """The least recently used peers go past the size; a permanent miss is answered from the cache until
    its TTL, then asked again."""
    cache = PeerCache(size=2, miss_ttl=0.05)
    cache.put("@a", 1)
    cache.put("@b", 2)
    assert cache.get("@a") == 1  # @a is now the most recent
    cache.put("@c", 3)
    assert (cache.get("@b"), cache.get("@a"), cache.get("@c"), len(cache)) == (None, 1, 3, 2)
    cache.miss("@nobody", PermanentError(400, "USERNAME_NOT_OCCUPIED"))
    with pytest.raises(PermanentError, match="USERNAME_NOT_OCCUPIED"):
        cache.get("@nobody")
    time.sleep(0.06)
    assert cache.get("@nobody") is None


async def test_resolved_peers_outlive_the_session(backend: TdlibBackend) -> None:
    """A reopened session of the account reuses what the first resolved: no second lookup at Telegram."""
    first = await backend.open_session(_config(21))
    await first.start(phone_timeout=0)
    backend.peer_cache(21).put("@known", 777)
    await first.close()
    second = await backend.open_session(_config(21))
    await second.start(phone_timeout=0)
    requests = backend.stats()["requests_total"]
    deadline = asyncio.get_running_loop().time() + 1
    assert await resolve_peer(second._peers, second.request, "@known", deadline) == 777
    assert backend.stats()["requests_total"] == requests
    assert backend.stats()["peers_cached"] == 1


async def test_stats_count_sessions_requests_and_errors_by_class(tmp_path: Path, sink: Sink) -> None:
    """sessions_total, requests_total and errors_total (by class) count what happened; queue_depth is
    the requests awaiting an answer plus the updates awaiting the sink."""
    backend = TdlibBackend(_settings(tmp_path, request_timeout=0.3), on_update=sink)
    try:
        session = await backend.open_session(_config(22))
        await session.start(phone_timeout=0)
        with pytest.raises(RequestTimeout):
            await session.request({"@type": "setAuthenticationPhoneNumber", "phone_number": "+15550000022"})
        with pytest.raises(PermanentError):
            await session.request({"@type": "getChat", "chat_id": 1})
        stats = backend.stats()
        assert stats["sessions_total"] == 1
        assert stats["requests_total"] >= 4  # getAuthorizationState, setTdlibParameters, getProxies, ...
        assert stats["errors_total"]["transient"] >= 1 and stats["errors_total"]["permanent"] >= 1
        assert stats["errors_total"]["rate_limited"] == 0
        assert stats["queue_depth"] == stats["pending_requests"] + stats["updates_queued"]
    finally:
        await backend.aclose(time.monotonic() + 10)
