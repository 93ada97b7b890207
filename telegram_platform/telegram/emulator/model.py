"""The emulated Telegram (`TelegramEmulator`): behaves like Telegram where the platform must cope.

It follows the test-DC convention (a phone `+99966XYYYY` logs in with the code `XXXXX`), supports
2FA passwords and registration, answers requests after a configurable latency, enforces per-account
and per-chat rate limits with TDLib's own words ("Too Many Requests: retry after N", N a whole number
of seconds >= 1), answers PEER_FLOOD after too many first contacts, pushes incoming messages to its
listeners (with a per-user update sequence, so a client that reconnects gets what it missed), tells
an account's open sessions a new login's code in a message from the service account 777000, drops
connections and goes offline on demand, and keeps every send attempt and every accepted message, so
tests can count losses, duplicates and attempts made too early.

Deterministic given a seed: latency jitter, session tokens, message and chat ids come from the seed
and the order of calls, never from the process (no `hash()`, no `secrets`). Time comes from `clock`,
which tests may replace. The HTTP surface over it is `emulator/http.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import random
import re
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from telegram_platform.telegram.content import MAX_CAPTION_LENGTH, MAX_TEXT_LENGTH, utf16_length

TEST_PHONE = re.compile(r"^\+?99966(\d)\d{4}$")
# Updates kept per user for clients that reconnect (Telegram's getDifference, in small).
UPDATE_LOG_SIZE: Final = 10_000
LISTENER_QUEUE_SIZE: Final = 10_000
_DROP: Final = {"type": "__drop__"}
# Telegram's service account: it tells an account's open sessions its login codes and security notices.
SERVICE_SENDER: Final = "777000"


@dataclass
class EmulatorConfig:
    latency_ms: float = 5.0
    latency_jitter_ms: float = 0.0
    # Sends per second an account may make (None: unlimited), and the burst it may take at once.
    account_rate: float | None = None
    account_burst: int = 1
    # Minimum seconds between two messages to the same chat from one account (None: no limit).
    chat_interval: float | None = None
    # First contacts per account within `peer_flood_window` seconds before PEER_FLOOD (None: never).
    peer_flood_after: int | None = None
    peer_flood_window: float = 86_400.0
    seed: int = 0
    # Telegram's file size limits: any file (2000 MiB for an ordinary account), and a photo.
    max_file_size: int = 2000 << 20
    max_photo_size: int = 10 << 20


_CONFIG_TYPES: Final[Mapping[str, tuple[type, ...]]] = {
    "latency_ms": (int, float), "latency_jitter_ms": (int, float), "account_rate": (int, float, type(None)),
    "account_burst": (int,), "chat_interval": (int, float, type(None)), "peer_flood_after": (int, type(None)),
    "peer_flood_window": (int, float), "seed": (int,), "max_file_size": (int,), "max_photo_size": (int,),
}


def config_with(base: EmulatorConfig, changes: Mapping[str, Any]) -> EmulatorConfig:
    """`base` with `changes` applied; ValueError naming the first unknown or mistyped setting."""
    for key, value in changes.items():
        types = _CONFIG_TYPES.get(key)
        if types is None:
            raise ValueError(f"unknown setting {key!r}")
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"setting {key!r} has the wrong type ({type(value).__name__})")
        if isinstance(value, int | float) and value < 0:
            raise ValueError(f"setting {key!r} must not be negative")
    if changes.get("account_rate") == 0:
        raise ValueError("setting 'account_rate' must be positive (or null: unlimited)")
    return dataclasses.replace(base, **changes)


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
    """A message Telegram accepted: what the recipient `to` got, its entities (the Bot API's JSON),
    the message it replies to, and its send options."""

    to: str
    from_user_id: int
    text: str
    message_id: int
    random_id: str
    at: float
    chat_id: int = 0
    entities: list[dict[str, Any]] = field(default_factory=list)
    reply_to: int | None = None
    options: dict[str, bool] = field(default_factory=dict)
    # A forward: the chat and message it copies.
    forwarded_from: dict[str, int] | None = None
    edited_at: float | None = None
    deleted_for_everyone: bool | None = None
    # A media message: its file (kind, size, sha256, mime_type, file_name, file_ref), and the album
    # it belongs to (Telegram's grouped_id: the items of one album share it).
    media: dict[str, Any] | None = None
    grouped_id: int | None = None


@dataclass(frozen=True)
class Outgoing:
    """What a send asks for beyond its text: entities, the message replied to, the send options."""

    entities: tuple[Mapping[str, Any], ...] = ()
    reply_to: int | None = None
    silent: bool = False
    protect_content: bool = False
    disable_web_page_preview: bool = False

    def options(self) -> dict[str, bool]:
        return {"silent": self.silent, "protect_content": self.protect_content,
                "disable_web_page_preview": self.disable_web_page_preview}


@dataclass(frozen=True)
class Attempt:
    """One `messages.send` that reached Telegram, whatever the answer: the record of when it was tried."""

    from_user_id: int
    to: str
    at: float
    outcome: str  # accepted, duplicate, rate_limited, peer_flood, invalid
    retry_after: int | None = None
    message_id: int | None = None
    # The address the send came from: one account's session is the same on every host that opens it,
    # so only the sender's address tells two hosts sending for one account apart.
    source: str = ""


@dataclass
class AccountLimits:
    """Telegram's view of one sending account: its token bucket, per-chat clocks, contacts."""

    tokens: float = 0.0
    refilled_at: float | None = None
    last_to_chat: dict[int, float] = field(default_factory=dict)
    contacts: set[int] = field(default_factory=set)
    first_contacts: deque[float] = field(default_factory=deque)


@dataclass
class StoredFile:
    """A file Telegram holds: uploaded by an account, or attached to a message someone received.
    `file_ref` is its remote id, good for the accounts in `visible_to` (as Telegram's file ids are
    per account): a send by reference reuses it without an upload."""

    file_ref: str
    data: bytes = field(repr=False)
    sha256: str
    mime_type: str
    file_name: str
    visible_to: set[int] = field(default_factory=set)

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Upload:
    """One upload that reached Telegram: who sent which bytes."""

    user_id: int
    file_ref: str
    size: int
    sha256: str


# Kinds Telegram sends as media, the ones an album may mix, and those with no caption.
MEDIA_KINDS: Final = frozenset({"photo", "video", "document", "audio", "voice", "animation", "sticker"})
ALBUM_MEDIA_KINDS: Final = frozenset({"photo", "video"})
MAX_CAPTION_UNITS: Final = 1024


class EmulatorError(Exception):
    def __init__(self, code: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


def too_many_requests(wait: float) -> EmulatorError:
    """429 exactly as TDLib words it; N is whole seconds, rounded up, at least 1."""
    seconds = max(1, math.ceil(wait))
    return EmulatorError(429, f"Too Many Requests: retry after {seconds}", retry_after=seconds)


def stable_id(text: str) -> int:
    """A chat id for a peer the emulator has no user for: the same in every process and run."""
    return 2_000_000_000 + int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 10**9


# Entities Telegram takes per text (the length limits: content.py).
MAX_ENTITIES: Final = 100
# How long after sending Telegram lets a user edit a message.
EDIT_WINDOW_SECONDS: Final = 48 * 3600
# The entity types Telegram knows (the Bot API's names), and the field each needs.
ENTITY_TYPES: Final = frozenset({
    "bold", "italic", "underline", "strikethrough", "spoiler", "code", "pre", "text_link", "text_mention",
    "custom_emoji", "blockquote", "expandable_blockquote", "mention", "hashtag", "cashtag", "bot_command",
    "url", "email", "phone_number", "bank_card_number"})
ENTITY_FIELDS: Final[Mapping[str, str]] = {
    "text_link": "url", "text_mention": "user_id", "custom_emoji": "custom_emoji_id"}


def check_text(text: str, entities: tuple[Mapping[str, Any], ...], limit: int, *, caption: bool = False) -> None:
    """Telegram's rules for a text (or caption) and its entities; raises its error where it refuses."""
    length = utf16_length(text)
    if not text.strip() and not caption:
        raise EmulatorError(400, "MESSAGE_EMPTY")
    if length > limit:
        raise EmulatorError(400, "MEDIA_CAPTION_TOO_LONG" if caption else "MESSAGE_TOO_LONG")
    check_entities(entities, length)


def check_entities(entities: tuple[Mapping[str, Any], ...], length: int) -> None:
    """Entities of known types, inside a text of `length` UTF-16 units, with their type's field."""
    if len(entities) > MAX_ENTITIES:
        raise EmulatorError(400, "ENTITIES_TOO_LONG")
    for entity in entities:
        kind = entity.get("type")
        offset, size = entity.get("offset"), entity.get("length")
        if kind not in ENTITY_TYPES:
            raise EmulatorError(400, "ENTITY_TYPE_INVALID")
        if (not isinstance(offset, int) or not isinstance(size, int) or isinstance(offset, bool)
                or isinstance(size, bool) or offset < 0 or size <= 0 or offset + size > length):
            raise EmulatorError(400, "ENTITY_BOUNDS_INVALID")
        needed = ENTITY_FIELDS.get(str(kind))
        if needed is not None and not entity.get(needed):
            raise EmulatorError(400, "ENTITY_MENTION_USER_INVALID" if needed == "user_id" else
                                "ENTITY_URL_INVALID" if needed == "url" else "DOCUMENT_INVALID")


@dataclass
class ChatMessage:
    """A message in one user's chat, as that user sees it: what replies, forwards, edits and deletions
    refer to."""

    message_id: int
    chat_id: int
    text: str
    entities: list[dict[str, Any]]
    outgoing: bool
    date: float
    edited_at: float | None = None
    deleted: bool = False


class TelegramEmulator:
    """All of the emulated Telegram's state; the HTTP layer (`emulator/http.py`) is a thin shell around it."""

    def __init__(self, config: EmulatorConfig | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.config = config or EmulatorConfig()
        self.reset(self.config)

    def reset(self, config: EmulatorConfig | None = None) -> None:
        if config is not None:
            self.config = config
        self.reseed(self.config.seed)
        self.users: dict[str, User] = {}
        self.sessions: dict[str, int] = {}  # session token -> user id
        self._pending_codes: dict[str, str] = {}  # phone -> expected code
        self._passed_code: set[str] = set()
        self.received: list[Received] = []
        self.attempts: list[Attempt] = []
        # Incoming messages the accounts marked read (viewMessages).
        self.inbox_reads: list[dict[str, Any]] = []
        self._by_random_id: dict[tuple[int, str], Received] = {}
        # Every message of every user's chats (sent and received), by message id: what replies,
        # forwards, edits and deletions refer to.
        self._messages: dict[int, dict[int, ChatMessage]] = defaultdict(dict)
        self._limits: dict[int, AccountLimits] = defaultdict(AccountLimits)
        self._next_message_id: dict[int, int] = defaultdict(int)
        self._listeners: dict[int, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
        self._update_log: dict[int, deque[dict[str, Any]]] = defaultdict(lambda: deque(maxlen=UPDATE_LOG_SIZE))
        self._pts: dict[int, int] = defaultdict(int)
        self._offline_until = 0.0
        self.counters: dict[str, int] = defaultdict(int)
        self.files: dict[str, StoredFile] = {}
        self.uploads: list[Upload] = []
        self._next_grouped_id = 0

    def reseed(self, seed: int) -> None:
        self.config.seed = seed
        self._rng = random.Random(seed)  # latency jitter
        self._token_rng = random.Random(f"sessions:{seed}")

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
        user = self.user_for_phone(phone)
        code = match[1] * 5
        self._pending_codes[phone] = code
        self._passed_code.discard(phone)
        self.counters["code_requests"] += 1
        if user.user_id in self.sessions.values():
            # As Telegram does: the sessions already open get the code, from the service account.
            self.deliver_incoming(phone, SERVICE_SENDER, f"Login code: {code}. Do not give this code to anyone, "
                                  "even if they say they are from Telegram!\n\nThis code can be used to log in "
                                  "to your Telegram account. We never ask it for anything else.\n\nIf you "
                                  "didn't request this code by trying to log in on another device, simply "
                                  "ignore this message.")
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
        self.counters["registrations"] += 1
        if user.password:
            return {"state": "wait_password"}
        return self._authorize(user)

    def _authorize(self, user: User) -> dict[str, Any]:
        self._pending_codes.pop(user.phone, None)
        self._passed_code.discard(user.phone)
        token = f"{self._token_rng.getrandbits(128):032x}"
        self.sessions[token] = user.user_id
        self.counters["logins"] += 1
        return {"state": "ready", "session": token, "user_id": user.user_id, "pts": self._pts[user.user_id]}

    def session_user(self, token: str) -> int:
        user_id = self.sessions.get(token)
        if user_id is None:
            raise EmulatorError(401, "AUTH_KEY_UNREGISTERED")
        return user_id

    def log_out(self, token: str) -> None:
        if self.sessions.pop(token, None) is not None:
            self.counters["logouts"] += 1

    # -- peers ------------------------------------------------------------------------------

    def chat_id_for(self, peer: str) -> int:
        """The chat a peer string names: a known user's id (by @username or phone), a numeric id, or a
        stable id derived from the text."""
        peer = peer.strip()
        if peer.startswith("@"):
            name = peer[1:].lower()
            user = next((u for u in self.users.values() if u.username and u.username.lower() == name), None)
            if user is not None:
                return user.user_id
        elif peer.startswith("+"):
            user = self.users.get(normalize_phone(peer))
            if user is not None:
                return user.user_id
        elif peer.lstrip("-").isdigit():
            return int(peer)
        return stable_id(peer)

    def add_contacts(self, phone: str, peers: list[str]) -> int:
        """Make `peers` contacts of the account: sends to them are never cold (no PEER_FLOOD)."""
        limits = self._limits[self.user_for_phone(phone).user_id]
        limits.contacts.update(self.chat_id_for(p) for p in peers)
        return len(limits.contacts)

    # -- sending -----------------------------------------------------------------------------

    def _admit(self, user_id: int, chat_id: int, now: float, reply_to: int | None) -> None:
        """What every send passes before Telegram takes it: its reply names a message of the chat,
        the account's limits allow it (or a 429/PEER_FLOOD is raised), and then it is counted."""
        if reply_to is not None and self._message_in(user_id, chat_id, reply_to) is None:
            raise EmulatorError(400, "REPLY_MESSAGE_ID_INVALID")
        self.check_limits(user_id, chat_id, now)
        limits = self._limits[user_id]
        if self.config.account_rate is not None:
            limits.tokens -= 1.0
        limits.last_to_chat[chat_id] = now
        if chat_id not in limits.contacts:
            limits.contacts.add(chat_id)
            limits.first_contacts.append(now)

    def check_limits(self, user_id: int, chat_id: int, now: float) -> None:
        """Raise 429 or PEER_FLOOD exactly where Telegram would refuse this send."""
        cfg = self.config
        limits = self._limits[user_id]
        if cfg.account_rate is not None:
            if limits.refilled_at is None:
                limits.tokens, limits.refilled_at = float(cfg.account_burst), now
            limits.tokens = min(float(cfg.account_burst),
                                limits.tokens + max(0.0, now - limits.refilled_at) * cfg.account_rate)
            limits.refilled_at = now
            if limits.tokens < 1.0:
                self.counters["rate_limited"] += 1
                raise too_many_requests((1.0 - limits.tokens) / cfg.account_rate)
        if cfg.chat_interval is not None:
            last = limits.last_to_chat.get(chat_id)
            if last is not None and now - last < cfg.chat_interval:
                self.counters["rate_limited"] += 1
                raise too_many_requests(cfg.chat_interval - (now - last))
        if cfg.peer_flood_after is not None and chat_id not in limits.contacts:
            while limits.first_contacts and now - limits.first_contacts[0] > cfg.peer_flood_window:
                limits.first_contacts.popleft()
            if len(limits.first_contacts) >= cfg.peer_flood_after:
                self.counters["peer_flood"] += 1
                raise EmulatorError(400, "PEER_FLOOD")

    def send_message(self, user_id: int, peer: str, text: str, random_id: str = "",
                     outgoing: Outgoing | None = None, source: str = "") -> Received:
        """One send attempt: recorded whatever the outcome; raises the error Telegram would answer."""
        now = self.clock()
        self.counters["attempts"] += 1
        try:
            record, created = self._accept(user_id, peer, text, random_id, now, outgoing or Outgoing())
        except EmulatorError as error:
            outcome = ("rate_limited" if error.code == 429 else
                       "peer_flood" if error.message == "PEER_FLOOD" else "invalid")
            self.attempts.append(Attempt(user_id, peer, now, outcome, error.extra.get("retry_after"),
                                         source=source))
            raise
        self.attempts.append(Attempt(user_id, peer, now, "accepted" if created else "duplicate",
                                     message_id=record.message_id, source=source))
        return record

    def accept_message(self, user_id: int, peer: str, text: str, random_id: str = "") -> Received:
        """Record a send that passes the limits; a repeated random_id returns the first message."""
        return self._accept(user_id, peer, text, random_id, self.clock(), Outgoing())[0]

    def _accept(self, user_id: int, peer: str, text: str, random_id: str, now: float,
                outgoing: Outgoing) -> tuple[Received, bool]:
        duplicate = self._by_random_id.get((user_id, random_id)) if random_id else None
        if duplicate is not None:
            self.counters["deduplicated"] += 1
            return duplicate, False
        if not peer:
            raise EmulatorError(400, "PEER_ID_INVALID")
        check_text(text, outgoing.entities, MAX_TEXT_LENGTH)
        chat_id = self.chat_id_for(peer)
        self._admit(user_id, chat_id, now, outgoing.reply_to)
        message_id = self._new_message_id(user_id)
        record = Received(peer, user_id, text, message_id, random_id, now, chat_id,
                          [dict(e) for e in outgoing.entities], outgoing.reply_to, outgoing.options())
        self.received.append(record)
        self._remember(user_id, ChatMessage(message_id, chat_id, text, list(record.entities), True, now))
        if random_id:
            self._by_random_id[(user_id, random_id)] = record
        self.counters["messages"] += 1
        return record, True

    # -- files and media ---------------------------------------------------------------------

    def store_file(self, user_id: int, data: bytes, *, mime_type: str, file_name: str) -> StoredFile:
        """Keep a file for `user_id` (an upload, or an attachment it received) under a new file_ref."""
        if len(data) > self.config.max_file_size:
            raise EmulatorError(400, "FILE_PARTS_INVALID")
        ref = f"emu-file-{len(self.files) + 1}-{hashlib.sha256(data).hexdigest()[:12]}"
        stored = StoredFile(ref, data, hashlib.sha256(data).hexdigest(), mime_type or "application/octet-stream",
                            file_name, {user_id})
        self.files[ref] = stored
        return stored

    def upload(self, user_id: int, data: bytes, *, mime_type: str, file_name: str) -> StoredFile:
        """An account's upload: stored, and counted (tests check a file is uploaded once per account)."""
        stored = self.store_file(user_id, data, mime_type=mime_type, file_name=file_name)
        self.uploads.append(Upload(user_id, stored.file_ref, stored.size, stored.sha256))
        self.counters["uploads"] += 1
        return stored

    def file_for(self, user_id: int, file_ref: str) -> StoredFile:
        """A file the user may use (send, download); Telegram's error for any other reference."""
        stored = self.files.get(file_ref)
        if stored is None or user_id not in stored.visible_to:
            raise EmulatorError(400, "FILE_REFERENCE_INVALID")
        return stored

    def send_media(self, user_id: int, peer: str, media: list[dict[str, Any]], caption: str = "",
                   random_id: str = "", outgoing: Outgoing | None = None, source: str = "") -> list[Received]:
        """One media message, or an album (2 to 10 photos and videos, one caption on its first item),
        with Telegram's limits and errors; each item is a message the recipient gets. A repeated
        random_id returns the first send's messages. Recorded in `attempts` as a text send is."""
        now = self.clock()
        self.counters["attempts"] += 1
        try:
            records, created = self._accept_media(user_id, peer, media, caption, random_id, now,
                                                  outgoing or Outgoing())
        except EmulatorError as error:
            outcome = ("rate_limited" if error.code == 429 else
                       "peer_flood" if error.message == "PEER_FLOOD" else "invalid")
            self.attempts.append(Attempt(user_id, peer, now, outcome, error.extra.get("retry_after"),
                                         source=source))
            raise
        self.attempts.append(Attempt(user_id, peer, now, "accepted" if created else "duplicate",
                                     message_id=records[0].message_id, source=source))
        return records

    def _accept_media(self, user_id: int, peer: str, media: list[dict[str, Any]], caption: str, random_id: str,
                      now: float, outgoing: Outgoing) -> tuple[list[Received], bool]:
        if random_id and (user_id, random_id) in self._by_random_id:
            self.counters["deduplicated"] += 1
            first = self._by_random_id[(user_id, random_id)]
            return [r for r in self.received if r.from_user_id == user_id and r.random_id == random_id
                    and (first.grouped_id is None or r.grouped_id == first.grouped_id)], False
        if not peer:
            raise EmulatorError(400, "PEER_ID_INVALID")
        if not media:
            raise EmulatorError(400, "MEDIA_EMPTY")
        if len(media) > 10:
            raise EmulatorError(400, "MULTI_MEDIA_TOO_LONG")
        kinds = [str(item.get("kind")) for item in media]
        if any(kind not in MEDIA_KINDS for kind in kinds):
            raise EmulatorError(400, "MEDIA_INVALID")
        if len(media) > 1 and any(kind not in ALBUM_MEDIA_KINDS for kind in kinds):
            raise EmulatorError(400, "MEDIA_INVALID")
        if caption and "sticker" in kinds:
            raise EmulatorError(400, "MEDIA_CAPTION_INVALID")
        check_text(caption, outgoing.entities, MAX_CAPTION_UNITS, caption=True)
        files = [self.file_for(user_id, str(item.get("file_ref", ""))) for item in media]
        for kind, stored in zip(kinds, files, strict=True):
            if kind == "photo" and stored.size > self.config.max_photo_size:
                raise EmulatorError(400, "PHOTO_SAVE_FILE_INVALID")
            if stored.size == 0:
                raise EmulatorError(400, "FILE_PARTS_INVALID")
        chat_id = self.chat_id_for(peer)
        self._admit(user_id, chat_id, now, outgoing.reply_to)
        grouped_id: int | None = None
        if len(media) > 1:
            self._next_grouped_id += 1
            grouped_id = self._next_grouped_id
        records = []
        for index, (kind, stored) in enumerate(zip(kinds, files, strict=True)):
            leading = index == 0  # the album's caption (and its entities) go on its first item
            record = Received(peer, user_id, caption if leading else "", self._new_message_id(user_id), random_id,
                              now, chat_id, [dict(e) for e in outgoing.entities] if leading else [],
                              outgoing.reply_to, outgoing.options(),
                              media={"kind": kind, "size": stored.size, "sha256": stored.sha256,
                                     "mime_type": stored.mime_type, "file_name": stored.file_name,
                                     "file_ref": stored.file_ref},
                              grouped_id=grouped_id)
            self.received.append(record)
            self._remember(user_id, ChatMessage(record.message_id, chat_id, record.text, list(record.entities),
                                                True, now))
            records.append(record)
        if random_id:
            self._by_random_id[(user_id, random_id)] = records[0]
        self.counters["messages"] += len(records)
        self.counters["media_messages"] += 1
        return records, True

    def deliver_incoming_media(self, to_phone: str, sender: str, caption: str, *, kind: str, data: bytes,
                               mime_type: str, file_name: str = "", width: int | None = None,
                               height: int | None = None, duration: int | None = None) -> dict[str, Any]:
        """A media message from `sender` to the account with phone `to_phone` (as `deliver_incoming`):
        its file kept for that account to download (`file_ref`)."""
        if kind not in MEDIA_KINDS:
            raise EmulatorError(400, "MEDIA_INVALID")
        user = self.user_for_phone(to_phone)
        stored = self.store_file(user.user_id, data, mime_type=mime_type, file_name=file_name)
        chat_id = self.chat_id_for(sender)
        message_id = self._new_message_id(user.user_id)
        self._remember(user.user_id, ChatMessage(message_id, chat_id, caption, [], False, self.clock()))
        media = {"kind": kind, "size": stored.size, "mime_type": stored.mime_type, "file_name": file_name,
                 "width": width, "height": height, "duration": duration, "file_ref": stored.file_ref}
        update = {"type": "message", "chat_id": chat_id, "sender": sender, "text": caption,
                  "message_id": message_id, "date": int(self.clock()), "media": media}
        self._limits[user.user_id].contacts.add(chat_id)
        self._push(user.user_id, update)
        self.counters["incoming"] += 1
        return update
    def forward_messages(self, user_id: int, from_peer: str, message_ids: list[int], to_peer: str,
                         random_id: str = "") -> list[Received]:
        """Forward messages of the user's chat `from_peer` to `to_peer`: one new message each, in
        order, under the same limits as a send; a repeated random_id returns the first forward."""
        now = self.clock()
        self.counters["attempts"] += 1
        first = self._by_random_id.get((user_id, random_id)) if random_id else None
        if first is not None:
            self.counters["deduplicated"] += 1
            return [r for r in self.received if r.from_user_id == user_id and r.random_id == random_id]
        from_chat = self.chat_id_for(from_peer)
        originals = [self._message_in(user_id, from_chat, i) for i in message_ids]
        if not message_ids or any(m is None for m in originals):
            self.attempts.append(Attempt(user_id, to_peer, now, "invalid"))
            raise EmulatorError(400, "MESSAGE_ID_INVALID")
        chat_id = self.chat_id_for(to_peer)
        try:
            self.check_limits(user_id, chat_id, now)
        except EmulatorError as error:
            self.attempts.append(Attempt(user_id, to_peer, now, "rate_limited" if error.code == 429 else "peer_flood",
                                         error.extra.get("retry_after")))
            raise
        records = []
        for original in originals:
            assert original is not None
            message_id = self._new_message_id(user_id)
            record = Received(to_peer, user_id, original.text, message_id, random_id, now, chat_id,
                              list(original.entities),
                              forwarded_from={"chat_id": from_chat, "message_id": original.message_id})
            self.received.append(record)
            self._remember(user_id, ChatMessage(message_id, chat_id, original.text, list(original.entities),
                                                True, now))
            records.append(record)
            self.attempts.append(Attempt(user_id, to_peer, now, "accepted", message_id=message_id))
        self._limits[user_id].last_to_chat[chat_id] = now
        if random_id:
            self._by_random_id[(user_id, random_id)] = records[0]
        self.counters["forwards"] += len(records)
        return records

    def edit_message(self, user_id: int, peer: str, message_id: int, text: str,
                     entities: tuple[Mapping[str, Any], ...] = (), *, caption: bool = False) -> ChatMessage:
        """Edit a message the user sent to `peer`, as Telegram allows: its own, within 48 hours, and
        changing something."""
        message = self._message_in(user_id, self.chat_id_for(peer), message_id)
        if message is None:
            raise EmulatorError(400, "MESSAGE_ID_INVALID")
        if not message.outgoing:
            raise EmulatorError(400, "MESSAGE_AUTHOR_REQUIRED")
        now = self.clock()
        if now - message.date > EDIT_WINDOW_SECONDS:
            raise EmulatorError(400, "MESSAGE_EDIT_TIME_EXPIRED")
        check_text(text, entities, MAX_CAPTION_LENGTH if caption else MAX_TEXT_LENGTH, caption=caption)
        if text == message.text and [dict(e) for e in entities] == message.entities:
            raise EmulatorError(400, "MESSAGE_NOT_MODIFIED")
        message.text, message.entities, message.edited_at = text, [dict(e) for e in entities], now
        for record in self.received:
            if record.from_user_id == user_id and record.message_id == message_id:
                record.text, record.entities, record.edited_at = text, list(message.entities), now
        self.counters["edits"] += 1
        return message

    def delete_messages(self, user_id: int, peer: str, message_ids: list[int], *, revoke: bool) -> int:
        """Delete messages of the user's chat with `peer` (for everyone with `revoke`); ids that are
        not there are passed over, as Telegram does. Returns how many were deleted."""
        chat_id = self.chat_id_for(peer)
        deleted = 0
        for message_id in message_ids:
            message = self._message_in(user_id, chat_id, message_id)
            if message is None:
                continue
            message.deleted = True
            deleted += 1
            for record in self.received:
                if record.from_user_id == user_id and record.message_id == message_id:
                    record.deleted_for_everyone = revoke
        self.counters["deletions"] += deleted
        return deleted

    def read_inbox(self, user_id: int, peer: str, message_ids: list[int]) -> int:
        """The user read messages `peer` sent them (their client viewed them): recorded in `inbox_reads`
        for tests; ids that are not incoming messages of that chat are passed over. How many were read."""
        chat_id = self.chat_id_for(peer)
        read = [i for i in message_ids
                if (m := self._message_in(user_id, chat_id, i)) is not None and not m.outgoing]
        self.inbox_reads.append({"user_id": user_id, "chat_id": chat_id, "message_ids": read, "at": self.clock()})
        self.counters["inbox_reads"] += len(read)
        return len(read)

    def _new_message_id(self, user_id: int) -> int:
        self._next_message_id[user_id] += 1
        return self._next_message_id[user_id] << 20

    def _remember(self, user_id: int, message: ChatMessage) -> None:
        self._messages[user_id][message.message_id] = message

    def _message_in(self, user_id: int, chat_id: int, message_id: int) -> ChatMessage | None:
        """The message `message_id` of the user's chat `chat_id`, unless deleted."""
        message = self._messages[user_id].get(message_id)
        if message is None or message.chat_id != chat_id or message.deleted:
            return None
        return message

    def latency(self) -> float:
        cfg = self.config
        jitter = self._rng.uniform(0, cfg.latency_jitter_ms) if cfg.latency_jitter_ms else 0.0
        return max(0.0, (cfg.latency_ms + jitter) / 1000)

    # -- what tests ask ----------------------------------------------------------------------

    def received_by(self, peer: str) -> list[Received]:
        return [r for r in self.received if r.to == peer]

    def deliveries(self) -> dict[str, int]:
        """How many messages each recipient got: more than expected is a duplicate, fewer a loss."""
        return dict(Counter(r.to for r in self.received))

    def attempts_by(self, user_id: int) -> list[Attempt]:
        return [a for a in self.attempts if a.from_user_id == user_id]

    def early_attempts(self, user_id: int | None = None) -> list[tuple[Attempt, Attempt]]:
        """(429, later attempt) pairs where an account tried again before the 429's `retry after` passed."""
        early = []
        users = {user_id} if user_id is not None else {a.from_user_id for a in self.attempts}
        for uid in users:
            paused_until = -math.inf
            refusal: Attempt | None = None
            for attempt in self.attempts_by(uid):
                if attempt.at < paused_until and refusal is not None:
                    early.append((refusal, attempt))
                if attempt.outcome == "rate_limited" and attempt.retry_after is not None:
                    until = attempt.at + attempt.retry_after
                    if until > paused_until:
                        paused_until, refusal = until, attempt
        return early

    # -- incoming and connections -------------------------------------------------------------

    def subscribe(self, user_id: int, after: int | None = None) -> asyncio.Queue[dict[str, Any]]:
        """A queue of the user's updates; with `after`, first those it missed since that sequence number."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=LISTENER_QUEUE_SIZE)
        if after is not None:
            for update in self._update_log[user_id]:
                if update["pts"] > after and not queue.full():
                    queue.put_nowait(update)
        self._listeners[user_id].add(queue)
        return queue

    def unsubscribe(self, user_id: int, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._listeners[user_id].discard(queue)

    def connected(self, phone: str) -> int:
        """How many update streams the account with this phone has open now."""
        return len(self._listeners[self.user_for_phone(phone).user_id])

    def current_pts(self, user_id: int) -> int:
        return self._pts[user_id]

    def _push(self, user_id: int, update: dict[str, Any]) -> None:
        self._pts[user_id] += 1
        update["pts"] = self._pts[user_id]
        self._update_log[user_id].append(update)
        for queue in list(self._listeners[user_id]):
            if queue.full():
                # A client that does not read: cut it off; it catches up from the log on reconnect.
                _drain(queue)
                queue.put_nowait(_DROP)
            else:
                queue.put_nowait(update)

    def deliver_incoming(self, to_phone: str, sender: str, text: str, *,
                         entities: tuple[Mapping[str, Any], ...] = (), reply_to: int | None = None,
                         forward_from: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A message from `sender` to the account with phone `to_phone`: pushed to its live clients, and
        kept for those that reconnect. The sender becomes a contact (replying to them is not cold).
        It may carry entities, reply to a message of that chat, or be a forward (`forward_from`)."""
        user = self.user_for_phone(to_phone)
        chat_id = self.chat_id_for(sender)
        check_entities(entities, utf16_length(text))
        if reply_to is not None and self._message_in(user.user_id, chat_id, reply_to) is None:
            raise EmulatorError(400, "REPLY_MESSAGE_ID_INVALID")
        message_id = self._new_message_id(user.user_id)
        update: dict[str, Any] = {"type": "message", "chat_id": chat_id, "sender": sender, "text": text,
                                  "message_id": message_id, "date": int(self.clock())}
        if entities:
            update["entities"] = [dict(e) for e in entities]
        if reply_to is not None:
            update["reply_to"] = reply_to
        if forward_from is not None:
            update["forward_from"] = dict(forward_from)
        self._remember(user.user_id, ChatMessage(message_id, chat_id, text, [dict(e) for e in entities], False,
                                                 self.clock()))
        self._limits[user.user_id].contacts.add(chat_id)
        self._push(user.user_id, update)
        self.counters["incoming"] += 1
        return update

    def edit_incoming(self, to_phone: str, sender: str, message_id: int, text: str,
                      entities: tuple[Mapping[str, Any], ...] = ()) -> dict[str, Any]:
        """`sender` edits a message they sent the account: the account's clients get the new text."""
        user = self.user_for_phone(to_phone)
        chat_id = self.chat_id_for(sender)
        message = self._message_in(user.user_id, chat_id, message_id)
        if message is None or message.outgoing:
            raise EmulatorError(400, "MESSAGE_ID_INVALID")
        check_entities(entities, utf16_length(text))
        now = self.clock()
        message.text, message.entities, message.edited_at = text, [dict(e) for e in entities], now
        update = {"type": "message_edited", "chat_id": chat_id, "message_id": message_id, "text": text,
                  "entities": list(message.entities), "date": int(now)}
        self._push(user.user_id, update)
        return update

    def delete_incoming(self, to_phone: str, sender: str, message_ids: list[int]) -> dict[str, Any]:
        """`sender` deletes messages of their chat with the account for everyone."""
        user = self.user_for_phone(to_phone)
        chat_id = self.chat_id_for(sender)
        deleted = []
        for message_id in message_ids:
            message = self._message_in(user.user_id, chat_id, message_id)
            if message is not None:
                message.deleted = True
                deleted.append(message_id)
        if not deleted:
            raise EmulatorError(400, "MESSAGE_ID_INVALID")
        update = {"type": "messages_deleted", "chat_id": chat_id, "message_ids": deleted}
        self._push(user.user_id, update)
        return update

    def read_outbox(self, phone: str, reader: str, max_id: int | None = None) -> dict[str, Any]:
        """`reader` read the account's messages in their chat, up to `max_id` (default: the last one):
        the account's clients get the read receipt."""
        user = self.user_for_phone(phone)
        chat_id = self.chat_id_for(reader)
        if max_id is None:
            sent = [m.message_id for m in self._messages[user.user_id].values()
                    if m.chat_id == chat_id and m.outgoing]
            if not sent:
                raise EmulatorError(400, "MESSAGE_ID_INVALID")
            max_id = max(sent)
        update = {"type": "read_outbox", "chat_id": chat_id, "max_id": max_id}
        self._push(user.user_id, update)
        self.counters["read_receipts"] += 1
        return update

    def drop_connections(self, seconds: float = 0.0) -> int:
        """Cut every update stream now; with `seconds`, stay unreachable that long (requests wait and
        update streams are refused until then, as when the network is gone)."""
        if seconds > 0:
            self._offline_until = max(self._offline_until, self.clock() + seconds)
        dropped = 0
        for queues in self._listeners.values():
            for queue in list(queues):
                if queue.full():
                    _drain(queue)
                queue.put_nowait(_DROP)
                dropped += 1
        self.counters["drops"] += 1
        return dropped

    def offline_for(self) -> float:
        return max(0.0, self._offline_until - self.clock())

    async def wait_until_online(self) -> None:
        while (remaining := self.offline_for()) > 0:  # noqa: ASYNC110 - time is `clock`'s, not an event
            await asyncio.sleep(min(remaining, 0.05))

    # -- durability ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Telegram's durable part (users, live sessions, update sequence numbers): what a restart must
        not forget."""
        return {"users": [vars(u) for u in self.users.values()], "sessions": self.sessions,
                "pts": {str(k): v for k, v in self._pts.items() if v}}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.users = {u["phone"]: User(**u) for u in snapshot.get("users", [])}
        self.sessions = {str(k): int(v) for k, v in snapshot.get("sessions", {}).items()}
        self._pts.update({int(k): int(v) for k, v in snapshot.get("pts", {}).items()})


def _drain(queue: asyncio.Queue[dict[str, Any]]) -> None:
    while not queue.empty():
        queue.get_nowait()


def normalize_phone(phone: str) -> str:
    digits = re.sub(r"[^\d]", "", phone)
    return f"+{digits}"
