"""The Telegram emulator: a small server that behaves like Telegram where the platform must cope.

It follows the test-DC convention (a phone `+99966XYYYY` logs in with the code `XXXXX`), supports
2FA passwords and registration, answers sends after a configurable latency, enforces per-account
and per-chat rate limits with TDLib's own words ("Too Many Requests: retry after N"), answers
PEER_FLOOD after too many first contacts, pushes incoming messages over a WebSocket, and keeps every
message it accepted so tests can count losses and duplicates. Its randomness comes from one seed.

`/rpc/*` is what the platform's emulator backend calls; `/control/*` is for tests and developers.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

TEST_PHONE = re.compile(r"^\+?99966(\d)\d{4}$")


@dataclass
class EmulatorConfig:
    latency_ms: float = 5.0
    latency_jitter_ms: float = 0.0
    # Sends per second an account may make (None: unlimited), and the burst it may take at once.
    account_rate: float | None = None
    account_burst: int = 1
    # Minimum seconds between two messages to the same chat from one account (None: no limit).
    chat_interval: float | None = None
    # First contacts per account per day before PEER_FLOOD (None: never).
    peer_flood_after: int | None = None
    seed: int = 0


@dataclass
class User:
    user_id: int
    phone: str
    password: str | None = None
    registered: bool = True
    first_name: str = ""
    last_name: str = ""
    username: str | None = None


@dataclass
class Received:
    to: str
    from_user_id: int
    text: str
    message_id: int
    random_id: str
    at: float


@dataclass
class AccountLimits:
    """Telegram's view of one sending account: its token bucket, per-chat clocks, contacts."""

    tokens: float = 0.0
    refilled_at: float = 0.0
    last_to_chat: dict[str, float] = field(default_factory=dict)
    contacts: set[str] = field(default_factory=set)
    first_contacts: deque[float] = field(default_factory=deque)


class EmulatorError(Exception):
    def __init__(self, code: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


class TelegramEmulator:
    """All of the emulated Telegram's state; the HTTP layer below is a thin shell around it."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.reset(self.config)

    def reset(self, config: EmulatorConfig | None = None) -> None:
        if config is not None:
            self.config = config
        self._rng = random.Random(self.config.seed)
        self.users: dict[str, User] = {}
        self.sessions: dict[str, int] = {}  # session token -> user id
        self._pending_codes: dict[str, str] = {}  # phone -> expected code
        self._passed_code: set[str] = set()
        self.received: list[Received] = []
        self._by_random_id: dict[tuple[int, str], Received] = {}
        self._limits: dict[int, AccountLimits] = defaultdict(AccountLimits)
        self._next_message_id: dict[int, int] = defaultdict(int)
        self._listeners: dict[int, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
        self.counters: dict[str, int] = defaultdict(int)

    # -- users and logins --------------------------------------------------------------------

    def user_for_phone(self, phone: str) -> User:
        phone = normalize_phone(phone)
        user = self.users.get(phone)
        if user is None:
            user = User(user_id=int(phone[-9:]) + 1_000_000_000, phone=phone)
            self.users[phone] = user
        return user

    def _user_by_id(self, user_id: int) -> User | None:
        return next((u for u in self.users.values() if u.user_id == user_id), None)

    def send_code(self, phone: str) -> dict[str, Any]:
        match = TEST_PHONE.match(phone)
        if not match:
            raise EmulatorError(400, "PHONE_NUMBER_INVALID")
        phone = normalize_phone(phone)
        self.user_for_phone(phone)
        self._pending_codes[phone] = match[1] * 5
        self._passed_code.discard(phone)
        return {"state": "wait_code", "code_length": 5}

    def sign_in(self, phone: str, code: str) -> dict[str, Any]:
        phone = normalize_phone(phone)
        expected = self._pending_codes.get(phone)
        if expected is None:
            raise EmulatorError(400, "PHONE_CODE_EXPIRED")
        if code != expected:
            raise EmulatorError(400, "PHONE_CODE_INVALID")
        user = self.user_for_phone(phone)
        self._passed_code.add(phone)
        if not user.registered:
            return {"state": "wait_registration"}
        if user.password:
            return {"state": "wait_password"}
        return self._authorize(user)

    def check_password(self, phone: str, password: str) -> dict[str, Any]:
        phone = normalize_phone(phone)
        user = self.user_for_phone(phone)
        if phone not in self._passed_code or not user.password:
            raise EmulatorError(400, "PASSWORD_NOT_REQUESTED")
        if password != user.password:
            raise EmulatorError(400, "PASSWORD_HASH_INVALID")
        return self._authorize(user)

    def sign_up(self, phone: str, first_name: str, last_name: str) -> dict[str, Any]:
        phone = normalize_phone(phone)
        user = self.user_for_phone(phone)
        if phone not in self._passed_code:
            raise EmulatorError(400, "PHONE_CODE_EXPIRED")
        if not first_name:
            raise EmulatorError(400, "FIRSTNAME_INVALID")
        user.registered, user.first_name, user.last_name = True, first_name, last_name
        if user.password:
            return {"state": "wait_password"}
        return self._authorize(user)

    def _authorize(self, user: User) -> dict[str, Any]:
        self._pending_codes.pop(user.phone, None)
        self._passed_code.discard(user.phone)
        token = secrets.token_hex(16)
        self.sessions[token] = user.user_id
        self.counters["logins"] += 1
        return {"state": "ready", "session": token, "user_id": user.user_id}

    def session_user(self, token: str) -> int:
        user_id = self.sessions.get(token)
        if user_id is None:
            raise EmulatorError(401, "AUTH_KEY_UNREGISTERED")
        return user_id

    def log_out(self, token: str) -> None:
        self.sessions.pop(token, None)

    # -- sending -----------------------------------------------------------------------------

    def check_limits(self, user_id: int, peer: str, now: float) -> None:
        """Raise 429 or PEER_FLOOD exactly where Telegram would refuse this send."""
        cfg = self.config
        limits = self._limits[user_id]
        if cfg.account_rate is not None:
            if limits.refilled_at == 0.0:
                limits.tokens, limits.refilled_at = float(cfg.account_burst), now
            limits.tokens = min(float(cfg.account_burst),
                                limits.tokens + (now - limits.refilled_at) * cfg.account_rate)
            limits.refilled_at = now
            if limits.tokens < 1.0:
                wait = (1.0 - limits.tokens) / cfg.account_rate
                self.counters["rate_limited"] += 1
                raise EmulatorError(429, f"Too Many Requests: retry after {math.ceil(wait)}",
                                    retry_after=math.ceil(wait))
        if cfg.chat_interval is not None:
            last = limits.last_to_chat.get(peer)
            if last is not None and now - last < cfg.chat_interval:
                wait = cfg.chat_interval - (now - last)
                self.counters["rate_limited"] += 1
                raise EmulatorError(429, f"Too Many Requests: retry after {math.ceil(wait)}",
                                    retry_after=math.ceil(wait))
        if cfg.peer_flood_after is not None and peer not in limits.contacts:
            while limits.first_contacts and now - limits.first_contacts[0] > 86_400:
                limits.first_contacts.popleft()
            if len(limits.first_contacts) >= cfg.peer_flood_after:
                self.counters["peer_flood"] += 1
                raise EmulatorError(400, "PEER_FLOOD")

    def accept_message(self, user_id: int, peer: str, text: str, random_id: str) -> Received:
        """Record a send that passed the limits; a repeated random_id returns the first message."""
        duplicate = self._by_random_id.get((user_id, random_id)) if random_id else None
        if duplicate is not None:
            self.counters["deduplicated"] += 1
            return duplicate
        if not peer or len(text) > 4096 or not text:
            raise EmulatorError(400, "MESSAGE_EMPTY" if not text else
                                "MESSAGE_TOO_LONG" if len(text) > 4096 else "PEER_ID_INVALID")
        now = time.time()
        self.check_limits(user_id, peer, now)
        limits = self._limits[user_id]
        if self.config.account_rate is not None:
            limits.tokens -= 1.0
        limits.last_to_chat[peer] = now
        if peer not in limits.contacts:
            limits.contacts.add(peer)
            limits.first_contacts.append(now)
        self._next_message_id[user_id] += 1
        record = Received(peer, user_id, text, self._next_message_id[user_id] << 20, random_id, now)
        self.received.append(record)
        if random_id:
            self._by_random_id[(user_id, random_id)] = record
        self.counters["messages"] += 1
        return record

    def latency(self) -> float:
        cfg = self.config
        jitter = self._rng.uniform(0, cfg.latency_jitter_ms) if cfg.latency_jitter_ms else 0.0
        return max(0.0, (cfg.latency_ms + jitter) / 1000)

    # -- incoming ----------------------------------------------------------------------------

    def subscribe(self, user_id: int) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10_000)
        self._listeners[user_id].add(queue)
        return queue

    def unsubscribe(self, user_id: int, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._listeners[user_id].discard(queue)

    def deliver_incoming(self, to_phone: str, sender: str, text: str) -> dict[str, Any]:
        user = self.user_for_phone(to_phone)
        self._next_message_id[user.user_id] += 1
        update = {"type": "message", "chat_id": abs(hash(sender)) % 10**9, "sender": sender, "text": text,
                  "message_id": self._next_message_id[user.user_id] << 20, "date": int(time.time())}
        for queue in list(self._listeners[user.user_id]):
            if not queue.full():
                queue.put_nowait(update)
        return update

    def snapshot(self) -> dict[str, Any]:
        """Telegram's durable part (users and live sessions): what a restart must not forget."""
        return {"users": [vars(u) for u in self.users.values()], "sessions": self.sessions}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.users = {u["phone"]: User(**u) for u in snapshot.get("users", [])}
        self.sessions = {str(k): int(v) for k, v in snapshot.get("sessions", {}).items()}

    def drop_connections(self) -> int:
        dropped = 0
        for queues in self._listeners.values():
            for queue in list(queues):
                queue.put_nowait({"type": "__drop__"})
                dropped += 1
        return dropped


def normalize_phone(phone: str) -> str:
    digits = re.sub(r"[^\d]", "", phone)
    return f"+{digits}"


EMULATOR = web.AppKey("emulator", TelegramEmulator)


def create_emulator_app(emulator: TelegramEmulator | None = None) -> web.Application:
    app = web.Application()
    app[EMULATOR] = emulator or TelegramEmulator()
    app.router.add_post("/rpc/{method}", _rpc)
    app.router.add_get("/updates", _updates)
    app.router.add_get("/control/received", _control_received)
    app.router.add_get("/control/stats", _control_stats)
    app.router.add_post("/control/config", _control_config)
    app.router.add_post("/control/users", _control_users)
    app.router.add_post("/control/incoming", _control_incoming)
    app.router.add_post("/control/drop", _control_drop)
    app.router.add_post("/control/reset", _control_reset)
    app.router.add_get("/health", _health)
    return app


def _ok(**data: Any) -> web.Response:
    return web.json_response({"ok": True, **data})


def _err(error: EmulatorError) -> web.Response:
    return web.json_response({"ok": False, "error": {"code": error.code, "message": error.message, **error.extra}})


async def _rpc(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    method = request.match_info["method"]
    body: dict[str, Any] = await request.json()
    # Every round trip to Telegram takes time; sends and login steps alike.
    await asyncio.sleep(emulator.latency())
    try:
        if method == "auth.sendCode":
            return _ok(**emulator.send_code(str(body["phone"])))
        if method == "auth.signIn":
            return _ok(**emulator.sign_in(str(body["phone"]), str(body["code"])))
        if method == "auth.checkPassword":
            return _ok(**emulator.check_password(str(body["phone"]), str(body["password"])))
        if method == "auth.signUp":
            return _ok(**emulator.sign_up(str(body["phone"]), str(body.get("first_name", "")),
                                          str(body.get("last_name", ""))))
        if method == "auth.logOut":
            emulator.log_out(str(body["session"]))
            return _ok()
        if method == "session.check":
            return _ok(user_id=emulator.session_user(str(body["session"])))
        if method == "messages.send":
            user_id = emulator.session_user(str(body["session"]))
            record = emulator.accept_message(user_id, str(body["peer"]), str(body["text"]),
                                             str(body.get("random_id", "")))
            return _ok(message_id=record.message_id, chat_id=abs(hash(record.to)) % 10**9)
    except EmulatorError as error:
        return _err(error)
    except (KeyError, TypeError, ValueError) as error:
        return _err(EmulatorError(400, f"INPUT_INVALID: {error}"))
    return _err(EmulatorError(400, f"METHOD_INVALID: {method}"))


async def _updates(request: web.Request) -> web.WebSocketResponse:
    emulator = request.app[EMULATOR]
    ws = web.WebSocketResponse(heartbeat=10)
    try:
        user_id = emulator.session_user(request.query.get("session", ""))
    except EmulatorError:
        raise web.HTTPUnauthorized() from None
    await ws.prepare(request)
    queue = emulator.subscribe(user_id)

    async def pump() -> None:
        while True:
            update = await queue.get()
            if update.get("type") == "__drop__":
                await ws.close(code=1012)
                return
            await ws.send_json(update)

    pumping = asyncio.create_task(pump())
    try:
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
    finally:
        pumping.cancel()
        await asyncio.gather(pumping, return_exceptions=True)
        emulator.unsubscribe(user_id, queue)
    return ws


async def _control_received(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    peer = request.query.get("peer")
    items = [r for r in emulator.received if peer is None or r.to == peer]
    return web.json_response({"count": len(items), "messages": [
        {"to": r.to, "from_user_id": r.from_user_id, "text": r.text, "message_id": r.message_id,
         "random_id": r.random_id, "at": r.at} for r in items]})


async def _control_stats(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    per_recipient: dict[str, int] = defaultdict(int)
    for r in emulator.received:
        per_recipient[r.to] += 1
    return web.json_response({"counters": dict(emulator.counters), "recipients": len(per_recipient),
                              "duplicates": sum(n - 1 for n in per_recipient.values() if n > 1),
                              "sessions": len(emulator.sessions)})


async def _control_config(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    body = await request.json()
    for key, value in body.items():
        if not hasattr(emulator.config, key):
            raise web.HTTPBadRequest(text=f"unknown setting {key}")
        setattr(emulator.config, key, value)
    if "seed" in body:
        emulator._rng = random.Random(emulator.config.seed)
    return web.json_response(vars(emulator.config))


async def _control_users(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    body = await request.json()
    user = emulator.user_for_phone(str(body["phone"]))
    if "password" in body:
        user.password = body["password"] or None
    if "registered" in body:
        user.registered = bool(body["registered"])
    if "username" in body:
        user.username = body["username"]
    return web.json_response({"user_id": user.user_id, "phone": user.phone})


async def _control_incoming(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    body = await request.json()
    return web.json_response(emulator.deliver_incoming(str(body["to_phone"]), str(body.get("sender", "user")),
                                                       str(body["text"])))


async def _control_drop(request: web.Request) -> web.Response:
    return web.json_response({"dropped": request.app[EMULATOR].drop_connections()})


async def _control_reset(request: web.Request) -> web.Response:
    body = await request.json() if request.can_read_body else {}
    request.app[EMULATOR].reset(EmulatorConfig(**body))
    return web.json_response({"ok": True})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
