"""WebSocket /api/ws: events from any process through Redis, topics, token expiry and renewal, slow
clients, shutdown code 1001."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import aiohttp
import asyncpg
import jwt
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from conftest import TEST_JWT_SECRET
from support import FORGED_TEXT, ApiClient, EmulatorHandle, WorkerProcess, another_api, eventually, forge_events

from telegram_platform import events, redis_keys
from telegram_platform.api.keys import METRICS
from telegram_platform.api.security import Principal, TokenService
from telegram_platform.api.ws import HUB, Client, EventHub, Subscription
from telegram_platform.redis_auth import RedisAuth


async def _next_event(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> dict[str, Any]:
    message = await ws.receive(timeout=timeout)
    assert message.type is aiohttp.WSMsgType.TEXT, message
    return json.loads(message.data)  # type: ignore[no-any-return]


async def test_message_status_reaches_a_client_of_another_process(
    api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle,
    platform_env: dict[str, str], db: asyncpg.Pool,
) -> None:
    """A message accepted by one API instance: its `message.status` events (published by the worker)
    reach a WebSocket client connected to a different API instance, token in the query string."""
    status, account = await api.call("POST", "/api/accounts", admin_token, json={"phone": "+9996671234"})
    assert status == 201
    status, account = await api.call("POST", f"/api/accounts/{account['id']}/auth/code", admin_token,
                                     json={"code": "77777"})
    assert status == 200 and account["auth_state"] == "ready"
    async with (
        another_api(platform_env) as other,
        aiohttp.ClientSession() as session,
        session.ws_connect(other.make_url(f"/api/ws?token={admin_token}&topics=account:{account['id']}")) as ws,
    ):
        hello = await _next_event(ws)
        assert hello["type"] == "subscribed" and hello["data"]["topics"] == [f"account:{account['id']}"]
        status, message = await api.call("POST", "/api/messages", admin_token,
                                         json={"account_id": account["id"], "peer": "@carl", "text": "hi"})
        assert status == 202
        seen: list[str] = []
        while "sent" not in seen:
            event = await _next_event(ws)
            if event["type"] == "message.status" and event["data"]["message_id"] == message["id"]:
                assert isinstance(event["ts"], float)
                seen.append(event["data"]["status"])
        assert seen[0] == "sending" and seen[-1] == "sent"


async def test_topics_and_types_filter_events(api: ApiClient, admin_token: str, redis: aioredis.Redis,
                                              redis_auth: RedisAuth) -> None:
    """A client gets the events of its topics (and types) only; subscribe/unsubscribe change that."""
    async with (
        api.client.ws_connect("/api/ws?topics=account:1,campaign:9",
                              headers={"Authorization": f"Bearer {admin_token}"}) as narrow,
        api.client.ws_connect(f"/api/ws?token={admin_token}&types=account.state") as typed,
    ):
        assert (await _next_event(narrow))["type"] == "subscribed"
        assert (await _next_event(typed))["data"]["types"] == ["account.state"]
        await events.publish(redis, redis_auth, "message.status", {"message_id": 5, "account_id": 2, "status": "sent"})
        await events.publish(redis, redis_auth, "campaign.progress", {"campaign_id": 9, "sent": 1})
        await events.publish(redis, redis_auth, "account.state", {"account_id": 1, "auth_state": "ready"})
        assert (await _next_event(narrow))["type"] == "campaign.progress"
        assert (await _next_event(narrow))["data"] == {"account_id": 1, "auth_state": "ready"}
        assert (await _next_event(typed))["type"] == "account.state"

        await narrow.send_json({"action": "unsubscribe", "topics": ["account:1"]})
        assert (await _next_event(narrow))["data"] == {"all": False, "topic_count": 1, "changed": 1, "types": []}
        await narrow.send_json({"action": "subscribe", "topics": ["message:5", "campaign:9"]})
        assert (await _next_event(narrow))["data"] == {"all": False, "topic_count": 2, "changed": 1, "types": []}
        await events.publish(redis, redis_auth, "account.state", {"account_id": 1, "auth_state": "closed"})
        await events.publish(redis, redis_auth, "message.status",
                             {"message_id": 5, "account_id": 2, "status": "failed"})
        assert (await _next_event(narrow))["data"]["status"] == "failed"
        await narrow.send_json({"action": "subscribe", "topics": ["bogus:1"]})
        assert (await _next_event(narrow))["type"] == "error"


async def test_auth_and_upgrade_are_required(api: ApiClient, admin_token: str) -> None:
    """No token: 401 before any upgrade; a plain GET with a token: 426; a bad topic: 422."""
    status, body = await api.call("GET", "/api/ws")
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, body = await api.call("GET", "/api/ws", admin_token)
    assert status == 426 and body["error"]["code"] == "upgrade_required"
    status, body = await api.call("GET", "/api/ws?topics=everything", admin_token)
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "topics"


async def test_a_reconnecting_client_is_sent_what_it_missed(api: ApiClient, admin_token: str,
                                                            redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """Events carry their log id; reconnecting with `after=<last id>` sends the missed events of its
    topics in order, then a `replay` notice, then live events, none twice."""
    async with api.client.ws_connect(f"/api/ws?token={admin_token}&topics=account:1") as first:
        assert (await _next_event(first))["type"] == "subscribed"
        await events.publish(redis, redis_auth, "account.state", {"account_id": 1, "auth_state": "wait_code"})
        seen = await _next_event(first)
    last_id = seen["id"]
    missed = [await events.publish(redis, redis_auth, "account.state", {"account_id": 1, "connection_state": state})
              for state in ("connecting", "ready")]
    await events.publish(redis, redis_auth, "account.state", {"account_id": 2, "auth_state": "ready"})  # another topic
    async with api.client.ws_connect(f"/api/ws?token={admin_token}&topics=account:1&after={last_id}") as again:
        assert (await _next_event(again))["type"] == "subscribed"
        replayed = [await _next_event(again) for _ in missed]
        assert [(event["id"], event["data"]["connection_state"]) for event in replayed] == list(
            zip(missed, ["connecting", "ready"], strict=True))
        notice = await _next_event(again)
        assert notice["type"] == "replay"
        assert notice["data"] == {"after": last_id, "events": 2, "complete": True, "up_to": notice["data"]["up_to"]}
        live = await events.publish(redis, redis_auth, "account.state", {"account_id": 1, "auth_state": "ready"})
        assert (await _next_event(again))["id"] == live
        await again.send_json({"action": "ping"})
        assert (await _next_event(again))["type"] == "pong"  # nothing else came in between


async def test_a_replay_under_a_steady_stream_misses_nothing_and_repeats_nothing(
        api: ApiClient, admin_token: str, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """Reconnecting while events keep coming: the replayed and the live events together are exactly
    the log's events after `after`, in order, whatever was published during the replay."""
    published: list[str] = []

    async def publish_steadily() -> None:
        for n in range(300):
            published.append(await events.publish(redis, redis_auth, "account.state", {"account_id": 7, "n": n}))
            if n % 10 == 0:
                await asyncio.sleep(0.001)

    publisher = asyncio.create_task(publish_steadily())
    try:
        await eventually(lambda: _at_least(published, 50))
        after = published[20]
        received: list[str] = []
        async with api.client.ws_connect(f"/api/ws?token={admin_token}&topics=account:7&after={after}") as ws:
            assert (await _next_event(ws))["type"] == "subscribed"
            await publisher
            while len(received) < len(published) - 21:
                event = await _next_event(ws)
                if event["type"] == "account.state":
                    received.append(event["id"])
                else:
                    assert event["type"] == "replay" and event["data"]["complete"] is True, event
    finally:
        publisher.cancel()
    assert received == published[21:]


async def _at_least(items: list[str], count: int) -> bool:
    return len(items) >= count


async def test_a_replay_from_before_the_log_says_it_is_incomplete(api: ApiClient, admin_token: str,
                                                                  redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """An `after` older than the log's oldest event: the rest is sent, and the notice says some may
    be gone (read the state from the REST API); a malformed `after` is a 422 naming it."""
    kept = await events.publish(redis, redis_auth, "account.state", {"account_id": 3, "auth_state": "ready"})
    async with api.client.ws_connect(f"/api/ws?token={admin_token}&topics=account:3&after=1-0") as ws:
        assert (await _next_event(ws))["type"] == "subscribed"
        assert (await _next_event(ws))["id"] == kept
        notice = await _next_event(ws)
        assert notice["type"] == "replay" and notice["data"]["complete"] is False
    status, body = await api.call("GET", "/api/ws?after=yesterday", admin_token)
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "after"


async def test_live_events_held_during_a_replay_follow_it_once() -> None:
    """Live events that arrive while the log is replayed wait, and then go out unless the replay
    already sent them (an id up to its last); after that, live events go straight out."""
    client = Client(web.WebSocketResponse(), Subscription(everything=True), 10, Principal(1, "ada", "admin"))
    client._writer.cancel()  # no socket here: the queue shows what would be sent
    client.hold_live_events()
    for text, event_id in (("also replayed", "5-0"), ("newer", "5-1"), ("without an id", None)):
        client.deliver(text, event_id)
    assert client.queue.empty()
    await client.release_live_events("5-0")
    client.deliver("live", "6-0")
    assert [client.queue.get_nowait() for _ in range(client.queue.qsize())] == ["newer", "without an id", "live"]


def _short_lived(token: str, seconds: int) -> str:
    """Another access token of the same user, signed with the same secret, that expires in ~`seconds`."""
    claims = jwt.decode(token, TEST_JWT_SECRET, algorithms=["HS256"])
    principal = Principal(int(claims["sub"]), claims["name"], claims["role"], claims["ver"])
    return TokenService(TEST_JWT_SECRET, seconds).issue_access(principal)


async def test_an_expired_token_closes_its_socket_unless_renewed_in_band(api: ApiClient, admin_token: str) -> None:
    """A socket lives as long as its token: it is told `token.expiring`, then closed with 1008 at
    expiry; the one that sent a fresh token of the same user (`auth`) stays open past it."""
    short = _short_lived(admin_token, 4)
    async with (
        api.client.ws_connect(f"/api/ws?token={short}") as lapsing,
        api.client.ws_connect(f"/api/ws?token={short}") as renewed,
    ):
        for ws in (lapsing, renewed):
            assert (await _next_event(ws))["type"] == "subscribed"
            notice = await _next_event(ws)  # under a minute left: at once
            assert notice["type"] == "token.expiring"
            assert notice["data"]["expires_at"] == jwt.decode(short, options={"verify_signature": False})["exp"]
        await renewed.send_json({"action": "auth", "token": admin_token})
        answer = await _next_event(renewed)
        assert answer["type"] == "authenticated"
        assert answer["data"]["expires_at"] == jwt.decode(admin_token, options={"verify_signature": False})["exp"]
        closed = await lapsing.receive(timeout=10)
        assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 1008, closed
        assert "expired" in closed.extra
        await renewed.send_json({"action": "ping"})
        assert (await _next_event(renewed))["type"] == "pong"


async def test_auth_action_refuses_bad_and_foreign_tokens(api: ApiClient, admin_token: str) -> None:
    """`auth` with no token, a forged one or another user's gets an error event naming why, and the
    socket stays its user's, open on its current token."""
    status, _ = await api.call("POST", "/api/users", admin_token,
                               json={"username": "wendy", "password": "wendy-password-1", "role": "viewer"})
    assert status == 201
    status, tokens = await api.call("POST", "/api/auth/login",
                                    json={"username": "wendy", "password": "wendy-password-1"})
    assert status == 200
    forged = jwt.encode({**jwt.decode(admin_token, TEST_JWT_SECRET, algorithms=["HS256"])}, "another-key-" * 4,
                        algorithm="HS256")
    async with api.client.ws_connect(f"/api/ws?token={admin_token}") as ws:
        assert (await _next_event(ws))["type"] == "subscribed"
        for request, error in (({"action": "auth"}, "auth needs token"),
                               ({"action": "auth", "token": forged}, "invalid access token"),
                               ({"action": "auth", "token": tokens["access_token"]}, "another user's")):
            await ws.send_json(request)
            event = await _next_event(ws)
            assert event["type"] == "error" and error in event["data"]["message"], (request, event)
        await ws.send_json({"action": "ping"})
        assert (await _next_event(ws))["type"] == "pong"


async def test_slow_client_is_disconnected(platform_env: dict[str, str], admin_token: str,
                                           redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """A client that reads nothing while events pour in is cut off (1008) once its queue is full,
    and the server forgets it; a reading client on the same process keeps going."""
    async with (
        another_api(platform_env, TP_WS_SEND_QUEUE="20") as server,
        aiohttp.ClientSession() as session,
        session.ws_connect(server.make_url(f"/api/ws?token={admin_token}"), max_msg_size=0) as slow,
        session.ws_connect(server.make_url(f"/api/ws?token={admin_token}&types=ping.test")) as fast,
    ):
        hub = server.app[HUB]
        assert len(hub.clients) == 2
        padding = "x" * 8192
        # ~40 MB: more than the socket buffers between the server and a client that reads nothing.
        for _ in range(10):
            async with redis.pipeline(transaction=False) as pipe:
                for i in range(500):
                    encoded = events.encode_event("bulk.test", {"i": i, "pad": padding})
                    signed = redis_auth.event_mac(encoded) + events.with_id("1-0", encoded)
                    pipe.publish(redis_keys.EVENTS_CHANNEL, signed)
                await pipe.execute()
            if len(hub.clients) < 2:
                break
        await eventually(lambda: asyncio.sleep(0, len(hub.clients) == 1), timeout=20)
        await events.publish(redis, redis_auth, "ping.test", {})
        assert (await _next_event(fast))["type"] == "subscribed"
        assert (await _next_event(fast))["type"] == "ping.test"
        closing = None
        while closing is None:  # the slow client drains what was buffered, then sees the end
            message = await slow.receive(timeout=20)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                closing = message
        assert slow.close_code in (1008, 1006), (closing, slow.close_code)


async def test_shutdown_closes_clients_with_1001(platform_env: dict[str, str], admin_token: str) -> None:
    """Stopping an API process sends every WebSocket client close code 1001 (going away)."""
    async with another_api(platform_env) as server, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.make_url(f"/api/ws?token={admin_token}"))
        assert (await _next_event(ws))["type"] == "subscribed"
        closing = asyncio.create_task(server.close())
        message = await ws.receive(timeout=10)
        assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1001, message
        await ws.close()
        await asyncio.wait_for(closing, 10)


async def test_silent_peer_is_dropped_by_heartbeat(platform_env: dict[str, str], admin_token: str) -> None:
    """A client that never answers the server's pings is disconnected after about a heartbeat."""
    async with (
        another_api(platform_env, TP_WS_HEARTBEAT_SECONDS="1") as server,
        aiohttp.ClientSession() as session,
        session.ws_connect(server.make_url(f"/api/ws?token={admin_token}"), autoping=False) as ws,
    ):
        hub = server.app[HUB]
        assert len(hub.clients) == 1
        kinds = []
        while True:
            message = await ws.receive(timeout=10)
            kinds.append(message.type)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break
        assert aiohttp.WSMsgType.PING in kinds
        await eventually(lambda: asyncio.sleep(0, not hub.clients), timeout=5)


async def test_topics_per_client_are_capped(platform_env: dict[str, str], admin_token: str,
                                            redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """Past TP_WS_MAX_TOPICS a subscribe gets an error naming the limit and changes nothing; the
    socket stays open and keeps its events. Too many topics in the query string is a 422."""
    async with (
        another_api(platform_env, TP_WS_MAX_TOPICS="3") as server,
        aiohttp.ClientSession() as session,
        session.ws_connect(server.make_url(f"/api/ws?token={admin_token}&topics=account:1,account:2")) as ws,
    ):
        assert (await _next_event(ws))["data"]["topics"] == ["account:1", "account:2"]
        await ws.send_json({"action": "subscribe", "topics": ["account:3", "account:4"]})
        error = await _next_event(ws)
        assert error["type"] == "error" and "3 topics" in error["data"]["message"], error
        assert error["data"]["limit"] == 3
        await ws.send_json({"action": "subscribe", "topics": ["account:3", "account:1"]})
        assert (await _next_event(ws))["data"]["topic_count"] == 3
        await events.publish(redis, redis_auth, "account.state", {"account_id": 3, "auth_state": "ready"})
        assert (await _next_event(ws))["data"]["account_id"] == 3
        async with session.get(server.make_url(f"/api/ws?token={admin_token}&topics=account:1,account:2,"
                                               "account:3,account:4")) as response:
            body = await response.json()
        assert response.status == 422 and body["error"]["details"]["errors"][0]["field"] == "topics"


async def test_sockets_per_user_are_capped(platform_env: dict[str, str], admin_token: str) -> None:
    """Past TP_WS_MAX_SOCKETS_PER_USER a user's next socket is refused before the upgrade (429 in
    the error shape); closing one makes room."""
    async with (
        another_api(platform_env, TP_WS_MAX_SOCKETS_PER_USER="2") as server,
        aiohttp.ClientSession() as session,
    ):
        url = server.make_url(f"/api/ws?token={admin_token}")
        first = await session.ws_connect(url)
        second = await session.ws_connect(url)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url)
        assert refused.value.status == 429
        async with session.get(url, headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                             "Sec-WebSocket-Version": "13",
                                             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as response:
            body = await response.json()
        assert response.status == 429 and body["error"]["code"] == "too_many_requests"
        assert "2 WebSockets" in body["error"]["message"] and int(response.headers["Retry-After"]) > 0
        await first.close()
        await eventually(lambda: asyncio.sleep(0, len(server.app[HUB].clients) == 1), timeout=5)
        third = await session.ws_connect(url)
        assert (await _next_event(third))["type"] == "subscribed"
        await second.close()
        await third.close()


async def test_an_event_reaches_only_the_clients_of_its_topics() -> None:
    """The hub finds an event's clients by its topics (an index), instead of asking every client:
    with a thousand clients of one account each, an event of one account is looked at by one."""
    hub = EventHub(cast(aioredis.Redis, None), RedisAuth(bytes(32)), queue_size=10)
    asked: list[int] = []

    class Counted(Client):
        def wants(self, event_type: str, data: dict[str, Any]) -> bool:
            asked.append(self.principal.user_id)
            return super().wants(event_type, data)

    clients = [Counted(web.WebSocketResponse(), Subscription.parse([f"account:{n}"]), 10, Principal(n, "u", "viewer"))
               for n in range(1000)]
    watcher = Counted(web.WebSocketResponse(), Subscription.parse(["all"]), 10, Principal(5000, "w", "viewer"))
    for client in [*clients, watcher]:
        client._writer.cancel()
        hub.add(client)
    hub.dispatch(events.with_id("1-0", events.encode_event("account.state", {"account_id": 7})))
    assert sorted(asked) == [7, 5000]
    assert clients[7].queue.qsize() == 1 and watcher.queue.qsize() == 1 and clients[8].queue.empty()
    hub.resubscribe(clients[8], Subscription.parse(["account:7"]))
    hub.remove(clients[7])
    asked.clear()
    hub.dispatch(events.with_id("1-1", events.encode_event("account.state", {"account_id": 7})))
    assert sorted(asked) == [8, 5000]
    assert len(hub.clients) == 1000


async def test_a_forged_event_reaches_no_websocket_client(api: ApiClient, admin_token: str, redis: aioredis.Redis,
                                                          redis_auth: RedisAuth) -> None:
    """Events someone without ENCRYPTION_KEY pushes into Redis (unsigned, another key's MAC, altered
    after signing, text smuggled beside the id) reach no client, live or replayed, and are counted;
    the genuine events around them do."""
    before = await events.publish(redis, redis_auth, "account.state", {"account_id": 1, "n": 0})
    async with api.client.ws_connect(f"/api/ws?token={admin_token}") as live:
        assert (await _next_event(live))["type"] == "subscribed"
        forged = await forge_events(redis, redis_auth)
        after = await events.publish(redis, redis_auth, "account.state", {"account_id": 1, "n": 1})
        event = await _next_event(live)
        assert event["id"] == after and FORGED_TEXT not in json.dumps(event), event
    async with api.client.ws_connect(f"/api/ws?token={admin_token}&after={before}") as again:
        assert (await _next_event(again))["type"] == "subscribed"
        replayed = await _next_event(again)
        assert replayed["id"] == after, replayed
        notice = await _next_event(again)
        assert notice["type"] == "replay" and notice["data"]["events"] == 1, notice
    registry = api.app[METRICS].registry
    assert registry is not None
    assert registry.get_sample_value("tp_redis_refused_total", {"kind": "event"}) == 2 * forged
