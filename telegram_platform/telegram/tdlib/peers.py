"""A peer as the platform names it (user id, chat id, @username, +phone) resolved to a TDLib chat id,
and each account's cache of what was resolved, kept by the backend across the account's sessions:
resolving a username spends a small daily budget, and a peer that does not resolve is not asked again
for a while.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Mapping
from typing import Any, Final, Protocol

from telegram_platform.telegram.base import AuthError, NotAuthorized, PermanentError, TelegramError
from telegram_platform.telegram.tdlib.protocol import Event

# Resolved peers kept per account: username resolution is limited to about 200 a day per account.
PEER_CACHE_SIZE: Final = 10_000
# A peer that did not resolve (unknown username, no such phone) is not asked again for this long.
PEER_MISS_TTL_SECONDS: Final = 600.0
# The forms of a peer the platform accepts, each resolved by its own TDLib method.
_CHAT_ID: Final = re.compile(r"-\d+")
_USER_ID: Final = re.compile(r"\d+")
_PHONE: Final = re.compile(r"\+\d{5,15}")
_USERNAME: Final = re.compile(r"@[A-Za-z0-9_]{3,64}")


class Request(Protocol):
    """A TDLib request of one client: the answer, or a mapped TelegramError (`TdlibSession._call`)."""

    def __call__(self, query: Mapping[str, Any], *, within: float | None) -> Awaitable[Event]: ...


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


async def resolve_peer(cache: PeerCache, request: Request, peer: str, deadline: float) -> int:
    """Peer → chat id, cached per account: username lookups are limited (~200 a day per account)."""
    peer = peer.strip()
    cached = cache.get(peer)
    if cached is not None:
        return cached
    try:
        chat_id = await _lookup_peer(request, peer, deadline)
    except (NotAuthorized, AuthError):
        raise
    except PermanentError as exc:  # e.g. USERNAME_NOT_OCCUPIED: the same answer for a while
        cache.miss(peer, exc)
        raise
    cache.put(peer, chat_id)
    return chat_id


async def _lookup_peer(request: Request, peer: str, deadline: float) -> int:
    loop = asyncio.get_running_loop()

    def remaining() -> float:
        return max(0.0, deadline - loop.time())

    if _CHAT_ID.fullmatch(peer):
        chat = await request({"@type": "getChat", "chat_id": int(peer)}, within=remaining())
    elif _USER_ID.fullmatch(peer):
        chat = await request({"@type": "createPrivateChat", "user_id": int(peer), "force": False},
                             within=remaining())
    elif _USERNAME.fullmatch(peer):
        chat = await request({"@type": "searchPublicChat", "username": peer[1:]}, within=remaining())
    elif _PHONE.fullmatch(peer):
        user = await request({"@type": "searchUserByPhoneNumber", "phone_number": peer,
                              "only_local": False}, within=remaining())
        chat = await request({"@type": "createPrivateChat", "user_id": int(user["id"]),
                              "force": False}, within=remaining())
    else:
        raise PermanentError(400, "peer must be a user id, a chat id, @username or +phone")
    return int(chat["id"])
