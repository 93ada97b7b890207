"""WebSocket `/api/ws`: the platform's events, as any process published them, pushed to clients.

Each API process holds ONE Redis pub/sub subscription to `tp:events` (the `EventHub`) and fans every
event out to its connected clients whose topics match. Each client has a bounded send queue and its
own writer: a client that cannot keep up fills its queue and is disconnected (close code 1008)
instead of growing the server's memory; so is a client whose user an admin has demoted or disabled
since it connected (api/revocations.py), and one whose access token has expired: a socket is
authorized by a token for that token's life, which the client extends in band (`{"action": "auth"}`
with a fresh token, after a `token.expiring` notice) without reconnecting and missing events.
aiohttp pings every `TP_WS_HEARTBEAT_SECONDS` and drops a peer that does not answer. On shutdown every
client gets close code 1001 (going away).

What one user can make a process hold is bounded: a client subscribes to at most `TP_WS_MAX_TOPICS`
topics (a subscribe past it is refused in band, the socket stays open), a user opens at most
`TP_WS_MAX_SOCKETS_PER_USER` sockets per process (429 before the upgrade), and the hub indexes its
clients by topic, so an event costs the clients it concerns, not every topic of every client.

Every event carries the `id` it has in the event log (events.py). A client that reconnects with
`?after=<the last id it received>` is first sent what it missed, from the log's latest events
(TP_EVENT_LOG_LENGTH, ~50,000 by default), then a `replay` notice saying whether that was everything
(if not, it reads the current state from the REST API), then live events, none twice: live events
that arrive during the replay are held and sent after it, but those the replay already sent.

One module past the usual size: the client, the hub and the route share one protocol (frames,
subscriptions, replay, limits) that reads best in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from .. import events
from ..errors import PlatformError, ServiceUnavailable, TooManyRequests, Unauthorized, ValidationFailed
from ..redis_auth import RedisAuth
from ..tasks import cancel_and_wait
from .endpoints import Api, Call
from .keys import REDIS, REDIS_AUTH, SETTINGS, TOKENS
from .schemas.events import EventStreamQuery
from .security import Principal, TokenService

log = structlog.get_logger(__name__)

CLOSE_TIMEOUT = 2.0
SUBSCRIBE_WAIT = 5.0
# How long before its token expires a client is told (`token.expiring`), to send a fresh one.
EXPIRY_NOTICE = 60.0
# Events read from the log per round trip while replaying, and how long a replaying client may
# leave its send queue full.
REPLAY_PAGE = 500
REPLAY_SEND_WAIT = 10.0
_TOPIC_FIELDS = {"account": "account_id", "campaign": "campaign_id", "message": "message_id"}
# A refused socket (too many of its user's open) is told to retry after this many seconds.
SOCKET_LIMIT_RETRY_AFTER = 5


class UpgradeRequired(PlatformError):
    status = 426
    code = "upgrade_required"


@dataclass(frozen=True, slots=True)
class Subscription:
    """Which events a client receives: `all`, or events naming one of its accounts, campaigns or
    messages; optionally only some event types."""

    everything: bool = False
    topics: frozenset[tuple[str, int]] = frozenset()
    types: frozenset[str] | None = None

    @classmethod
    def parse(cls, topics: list[str], types: list[str] | None = None) -> Subscription:
        """`topics` like ["all"] or ["account:1", "campaign:2"]; raises ValueError naming a bad one."""
        everything = False
        parsed: set[tuple[str, int]] = set()
        for topic in topics:
            if topic == "all":
                everything = True
                continue
            kind, _, raw = topic.partition(":")
            if kind not in _TOPIC_FIELDS or not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
                raise ValueError(f"unknown topic {topic!r}: use all, account:<id>, campaign:<id> or message:<id>")
            parsed.add((kind, int(raw)))
        return cls(everything, frozenset(parsed), frozenset(types) if types else None)

    @property
    def size(self) -> int:
        """How many topics it holds (`all` counts as one), against TP_WS_MAX_TOPICS."""
        return len(self.topics) + int(self.everything)

    def names(self) -> list[str]:
        return (["all"] if self.everything else []) + sorted(f"{kind}:{ident}" for kind, ident in self.topics)

    def wants(self, event_type: str, data: dict[str, Any]) -> bool:
        if self.types is not None and event_type not in self.types:
            return False
        if self.everything:
            return True
        return any(data.get(_TOPIC_FIELDS[kind]) == ident for kind, ident in self.topics)


class Client:
    """One connected WebSocket: its subscription, its bounded queue and the task that writes it."""

    def __init__(self, ws: web.WebSocketResponse, subscription: Subscription, queue_size: int,
                 principal: Principal) -> None:
        self.ws = ws
        self.subscription = subscription
        self.principal = principal  # whose token authorizes it: revoking that token closes it
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)
        self.dropped = False
        self._writer = asyncio.create_task(self._write(), name="ws-writer")
        self._closing: asyncio.Task[None] | None = None
        self._expiry: list[asyncio.TimerHandle] = []
        self._watch_expiry()
        # While the log is replayed to it: the live events that arrive meanwhile, with their ids.
        self._held: list[tuple[str, str | None]] | None = None

    def wants(self, event_type: str, data: dict[str, Any]) -> bool:
        """Its subscription's choice, but admin-only events (events.ADMIN_ONLY_EVENTS) for admins alone."""
        if event_type in events.ADMIN_ONLY_EVENTS and self.principal.role != "admin":
            return False
        return self.subscription.wants(event_type, data)

    def deliver(self, text: str, event_id: str | None) -> None:
        """A live event: sent now, or held while the log is replayed."""
        if self._held is None:
            self.offer(text)
        elif len(self._held) < self.queue.maxsize:
            self._held.append((text, event_id))
        else:
            self.offer_overflow()

    def hold_live_events(self) -> None:
        self._held = []

    async def release_live_events(self, replayed_up_to: str | None) -> None:
        """After the replay: the held live events, but those the replay sent (ids up to its last)."""
        last = events.parse_id(replayed_up_to) if replayed_up_to else None
        while self._held:
            text, event_id = self._held.pop(0)
            if last is None or event_id is None or events.parse_id(event_id) > last:
                await self.send_in_turn(text)
        self._held = None

    async def send_in_turn(self, text: str) -> None:
        """Queue a frame, waiting while the queue is full (a replay is read faster than it is sent);
        a client that takes longer than REPLAY_SEND_WAIT to make room is too slow."""
        if self.dropped:
            return
        try:
            await asyncio.wait_for(self.queue.put(text), REPLAY_SEND_WAIT)
        except TimeoutError:
            self.offer_overflow()

    def renew(self, principal: Principal) -> None:
        """The client's fresh token (same user) authorizes it from now on, until that one expires."""
        self.principal = principal
        self._watch_expiry()

    def _watch_expiry(self) -> None:
        self._stop_watching_expiry()
        if math.isinf(self.principal.expires_at):
            return
        loop = asyncio.get_running_loop()
        remaining = self.principal.expires_at - time.time()
        self._expiry = [loop.call_later(max(0.0, remaining - EXPIRY_NOTICE), self._notify_expiring),
                        loop.call_later(max(0.0, remaining), self._expire)]

    def _stop_watching_expiry(self) -> None:
        for handle in self._expiry:
            handle.cancel()
        self._expiry = []

    def _notify_expiring(self) -> None:
        self.offer(_control("token.expiring", {"expires_at": self.principal.expires_at}))

    def _expire(self) -> None:
        log.info("websocket token expired, closing", user=self.principal.username)
        self.close(WSCloseCode.POLICY_VIOLATION, "access token expired: send a fresh one before expiry")

    async def _write(self) -> None:
        while True:
            text = await self.queue.get()
            await self.ws.send_str(text)

    def offer(self, text: str) -> None:
        """Queue a frame; a full queue means the client is too slow: disconnect it."""
        if self.dropped:
            return
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self.offer_overflow()

    def offer_overflow(self) -> None:
        if self.dropped:
            return
        self.dropped = True
        log.warning("websocket client too slow, disconnecting", user=self.principal.username,
                    queued=self.queue.qsize())
        self.close(WSCloseCode.POLICY_VIOLATION, "too slow: send queue full")

    def close(self, code: int, reason: str) -> asyncio.Task[None]:
        self._stop_watching_expiry()
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(code, reason), name="ws-close")
        return self._closing

    async def _close(self, code: int, reason: str) -> None:
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        # A peer that reads nothing would block the close frame: past the timeout aiohttp drops
        # the connection.
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()), CLOSE_TIMEOUT)

    async def finish(self) -> None:
        self._stop_watching_expiry()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await self._writer
        if self._closing is not None:
            await self._closing


class EventHub:
    """This process's one subscription to `tp:events`, fanned out to its WebSocket clients.

    Clients are indexed by topic (`all` apart): an event is offered to the clients of the topics it
    names and to those that want everything, never compared with every topic of every client."""

    def __init__(self, redis: aioredis.Redis, auth: RedisAuth, *, queue_size: int) -> None:
        self._redis = redis
        self._auth = auth
        self.queue_size = queue_size
        self.clients: set[Client] = set()
        self._everything: set[Client] = set()
        self._by_topic: dict[tuple[str, int], set[Client]] = {}
        # Sockets per user id: those open and those being opened (reserved before the upgrade).
        self._sockets: dict[int, int] = {}
        self.subscribed = asyncio.Event()
        self.received = 0

    async def run(self) -> None:
        """Listen until cancelled (events.listen retries a lost Redis connection with back-off)."""
        await events.listen(self._redis, self._on_event, listener="event", subscribed=self.subscribed)

    async def _on_event(self, raw: bytes | str) -> None:
        text = events.open_published(self._auth, raw)  # a forged event reaches no client
        if text is not None:
            self.dispatch(text)

    # -- membership and the topic index ---------------------------------------------------------

    def reserve_socket(self, user_id: int, limit: int) -> None:
        """Count a socket the user is opening, or refuse it (429) past `limit` open in this process."""
        if self._sockets.get(user_id, 0) >= limit:
            raise TooManyRequests(f"too many WebSockets open for this user: the limit is {limit} WebSockets "
                                  "per user and process; close one first", retry_after=SOCKET_LIMIT_RETRY_AFTER)
        self._sockets[user_id] = self._sockets.get(user_id, 0) + 1

    def release_socket(self, user_id: int) -> None:
        left = self._sockets.get(user_id, 0) - 1
        if left > 0:
            self._sockets[user_id] = left
        else:
            self._sockets.pop(user_id, None)

    def add(self, client: Client) -> None:
        self.clients.add(client)
        self._index(client)

    def remove(self, client: Client) -> None:
        if client in self.clients:
            self.clients.discard(client)
            self._unindex(client)

    def resubscribe(self, client: Client, subscription: Subscription) -> None:
        """Give a client a new subscription, keeping the index in step."""
        known = client in self.clients
        if known:
            self._unindex(client)
        client.subscription = subscription
        if known:
            self._index(client)

    def _index(self, client: Client) -> None:
        if client.subscription.everything:
            self._everything.add(client)
        for topic in client.subscription.topics:
            self._by_topic.setdefault(topic, set()).add(client)

    def _unindex(self, client: Client) -> None:
        self._everything.discard(client)
        for topic in client.subscription.topics:
            members = self._by_topic.get(topic)
            if members is not None:
                members.discard(client)
                if not members:
                    del self._by_topic[topic]

    def _candidates(self, data: dict[str, Any]) -> set[Client]:
        """The clients an event with this data may concern: `all`, and those of each topic it names."""
        found = set(self._everything)
        for kind, field_name in _TOPIC_FIELDS.items():
            ident = data.get(field_name)
            if type(ident) is int:
                found.update(self._by_topic.get((kind, ident), ()))
        return found

    # -- fan-out --------------------------------------------------------------------------------

    def dispatch(self, raw: bytes | str) -> None:
        """Parse an event once and queue its original text for every client that wants it."""
        self.received += 1
        if not self.clients:
            return
        text = raw.decode() if isinstance(raw, bytes) else raw
        try:
            event = json.loads(text)
            event_type, data = str(event["type"]), event.get("data") or {}
            event_id = event.get("id")
            if event_id is not None:
                events.parse_id(event_id)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("malformed event ignored", size=len(text))
            return
        if not isinstance(data, dict):
            data = {}
        for client in self._candidates(data):
            if client.wants(event_type, data):
                client.deliver(text, event_id)

    def close_revoked(self, user_id: int, version: int) -> int:
        """Close (1008) the user's clients opened with a token older than `version`; how many."""
        revoked = [client for client in self.clients
                   if client.principal.user_id == user_id and client.principal.token_version < version]
        for client in revoked:
            client.close(WSCloseCode.POLICY_VIOLATION, "credentials revoked: sign in again")
        return len(revoked)

    async def close_all(self, code: int = WSCloseCode.GOING_AWAY, reason: str = "server shutting down") -> None:
        closing = [client.close(code, reason) for client in list(self.clients)]
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)


HUB = web.AppKey("event_hub", EventHub)


async def event_hub(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the hub and its listening task (after Redis is open)."""
    hub = EventHub(app[REDIS], app[REDIS_AUTH], queue_size=app[SETTINGS].ws.send_queue)
    app[HUB] = hub
    task = asyncio.create_task(hub.run(), name="event-hub")
    # Serve once subscribed, so a client that connects at once misses nothing published after.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hub.subscribed.wait(), SUBSCRIBE_WAIT)
    yield
    await cancel_and_wait([task])


async def close_clients(app: web.Application) -> None:
    """on_shutdown: every WebSocket client gets 1001 before the server waits for handlers."""
    hub = app.get(HUB)
    if hub is not None:
        await hub.close_all()


def _control(event_type: str, data: dict[str, Any]) -> str:
    return json.dumps({"type": event_type, "data": data, "ts": time.time()})


api = Api()


# Not in the OpenAPI document (OpenAPI cannot describe a WebSocket; a plain GET only gets 426): the
# document's description points here instead.
@api.route("GET", "/api/ws", summary="WebSocket of platform events", query=EventStreamQuery, status=101,
           tags=("events",), errors=(426,), hidden=True, websocket=True)
async def event_stream(request: web.Request, call: Call[None, EventStreamQuery]) -> Any:
    """Open with a WebSocket upgrade; the access token goes in `Authorization: Bearer` or `?token=`.

    The server first sends `{"type": "subscribed", "data": {"topics": [...]}}`, then events
    `{"type", "data", "ts"}` (`message.status`, `account.state`, `campaign.progress`,
    `message.incoming`, ...). Topics: `all` (default), `account:<id>`, `campaign:<id>`,
    `message:<id>`. The client may send `{"action": "subscribe" | "unsubscribe", "topics": [...]}`
    (answered `subscribed` with counts: `all`, `topic_count`, `changed`; past TP_WS_MAX_TOPICS an
    `error` naming the limit, the subscription unchanged), `{"action": "ping"}`, or
    `{"action": "auth", "token": "<access token>"}`: a fresh token of the same user keeps the socket
    open past the first one's expiry (answered `authenticated`; the server sends `token.expiring` a
    minute before). A client too slow to read its events, whose token has
    expired, or whose user an admin has demoted or disabled, is closed with 1008; on server shutdown
    clients get 1001. A user with TP_WS_MAX_SOCKETS_PER_USER sockets open here gets 429 instead of
    an upgrade."""
    settings = request.app[SETTINGS]
    ws = web.WebSocketResponse(heartbeat=settings.ws.heartbeat_seconds, max_msg_size=64 * 1024,
                               timeout=CLOSE_TIMEOUT)
    topics = call.query.topics.split(",") if call.query.topics else ["all"]
    types = call.query.types.split(",") if call.query.types else None
    subscription = Subscription.parse(topics, types)  # the query pattern already checked each topic
    if subscription.size > settings.ws.max_topics:
        raise ValidationFailed([{"field": "topics", "message": f"at most {settings.ws.max_topics} topics "
                                                               "per connection (TP_WS_MAX_TOPICS)"}])
    if not ws.can_prepare(request).ok:
        raise UpgradeRequired("this endpoint speaks WebSocket only: send an Upgrade request",
                              details={"upgrade": "websocket"})
    hub = request.app[HUB]
    if not hub.subscribed.is_set():
        try:
            await asyncio.wait_for(hub.subscribed.wait(), SUBSCRIBE_WAIT)
        except TimeoutError:
            raise ServiceUnavailable("the event stream is not connected to Redis; retry") from None
    # Counted before the upgrade (no await between the check and the count): concurrent opens of
    # one user cannot all pass the limit.
    hub.reserve_socket(call.user.user_id, settings.ws.max_sockets_per_user)
    try:
        await ws.prepare(request)
        await _serve(request, ws, Client(ws, subscription, hub.queue_size, call.user), call.query.after)
    finally:
        hub.release_socket(call.user.user_id)
    return ws


async def _serve(request: web.Request, ws: web.WebSocketResponse, client: Client, after: str | None) -> None:
    """An upgraded socket, from its `subscribed` frame (and the replay after `after`) to its end."""
    hub = request.app[HUB]
    if after is not None:
        client.hold_live_events()  # from now on: none is missed between the log and the live feed
    hub.add(client)
    log.info("websocket open", topics=client.subscription.names(), clients=len(hub.clients))
    try:
        client.offer(_control("subscribed", {"topics": client.subscription.names(),
                                             "types": sorted(client.subscription.types or [])}))
        if after is not None:
            await _replay(client, request.app[REDIS], request.app[REDIS_AUTH], after)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                _on_client_message(client, message.data, request.app[TOKENS], hub,
                                   request.app[SETTINGS].ws.max_topics)
            elif message.type is WSMsgType.ERROR:
                break
    finally:
        hub.remove(client)
        await client.finish()
        log.info("websocket closed", close_code=ws.close_code, dropped=client.dropped)


async def _replay(client: Client, redis: aioredis.Redis, auth: RedisAuth, after: str) -> None:
    """The events of the log after `after` that the client's subscription wants, then a `replay`
    notice (`complete`: false when the log no longer held all of them), then the live events held
    meanwhile."""
    sent, last = 0, None
    try:
        complete = await events.log_reaches(redis, after)
        async for event_id, text in events.log_after(redis, auth, after, REPLAY_PAGE):
            last = event_id
            event = json.loads(text)
            if client.wants(str(event["type"]), event.get("data") or {}):
                await client.send_in_turn(text)
                sent += 1
    except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
        log.warning("event log unreadable, replay cut short", error=type(exc).__name__)
        complete = False
    await client.send_in_turn(_control("replay", {"after": after, "events": sent, "complete": complete,
                                                  "up_to": last}))
    await client.release_live_events(last)


def _on_client_message(client: Client, text: str, tokens: TokenService, hub: EventHub, max_topics: int) -> None:
    try:
        request = json.loads(text)
        action = request["action"]
    except (ValueError, KeyError, TypeError, RecursionError):
        client.offer(_control("error", {"message": 'expected JSON {"action": ...}'}))
        return
    if action == "ping":
        client.offer(_control("pong", {}))
        return
    if action == "auth":
        _renew(client, request.get("token"), tokens)
        return
    if action not in ("subscribe", "unsubscribe") or not isinstance(request.get("topics"), list):
        client.offer(_control("error", {"message": "action must be subscribe, unsubscribe, ping or auth, "
                                                   "with topics: [...] or token: ..."}))
        return
    try:
        change = Subscription.parse([str(t) for t in request["topics"]])
    except ValueError as exc:
        client.offer(_control("error", {"message": str(exc)}))
        return
    current = client.subscription
    if action == "subscribe":
        updated = Subscription(current.everything or change.everything, current.topics | change.topics,
                               current.types)
    else:
        updated = Subscription(current.everything and not change.everything, current.topics - change.topics,
                               current.types)
    if updated.size > max_topics:
        client.offer(_control("error", {"message": f"subscription refused: at most {max_topics} topics per "
                                                   f"connection (it has {current.size})", "limit": max_topics}))
        return
    hub.resubscribe(client, updated)
    # Counts, not the list: an answer's size must not grow with the subscription.
    client.offer(_control("subscribed", {"all": updated.everything, "topic_count": len(updated.topics),
                                         "changed": abs(updated.size - current.size),
                                         "types": sorted(updated.types or [])}))


def _renew(client: Client, token: object, tokens: TokenService) -> None:
    """`{"action": "auth", "token": ...}`: a refused token changes nothing (the current one still
    holds until it expires); a socket stays its user's, so another user's token is refused."""
    if not isinstance(token, str) or not token:
        client.offer(_control("error", {"message": "auth needs token: a fresh access token"}))
        return
    try:
        principal = tokens.verify_access(token)
    except Unauthorized as exc:
        client.offer(_control("error", {"message": exc.message}))
        return
    if principal.user_id != client.principal.user_id:
        client.offer(_control("error", {"message": "the token is another user's: open a connection of its own"}))
        return
    client.renew(principal)
    client.offer(_control("authenticated", {"expires_at": principal.expires_at}))
