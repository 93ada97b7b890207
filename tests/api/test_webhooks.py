"""Webhooks: admin CRUD, secrets sealed, signed deliveries by the worker, retries, one delivery per event,
and no event lost while no worker listened."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from conftest import free_port
from structlog.testing import capture_logs
from support import FORGED_TEXT, ApiClient, WorkerProcess, eventually, forge_events

from telegram_platform import events, redis_keys
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.settings import Settings
from telegram_platform.storage import webhooks as store
from telegram_platform.tasks import cancel_and_wait
from telegram_platform.worker.webhooks import WebhookService, sign, verify


@dataclass
class Receiver:
    """An HTTP endpoint that records what it is sent and answers with the statuses queued for it."""

    url: str
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    state = Receiver(f"http://127.0.0.1:{port}/hook")

    async def hook(request: web.Request) -> web.Response:
        state.received.append((dict(request.headers), await request.read()))
        return web.Response(status=state.statuses.pop(0) if state.statuses else 200, text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield state
    await runner.cleanup()


async def test_webhook_crud_shows_the_secret_once(api: ApiClient, admin_token: str, db: asyncpg.Pool,
                                                  settings: Settings) -> None:
    """Created with a generated secret shown once; stored sealed; listed, changed and deleted."""
    status, hook = await api.call("POST", "/api/webhooks", admin_token,
                                  json={"url": "http://127.0.0.1:9/x", "events": ["message.*", "account.state"]})
    assert status == 201 and hook["secret"].startswith("whsec_") and hook["events"] == ["account.state", "message.*"]
    sealed = await db.fetchval("SELECT secret_sealed FROM webhooks WHERE id = $1", hook["id"])
    assert hook["secret"].encode() not in sealed
    assert store.open_secret(settings.encryption_key, sealed) == hook["secret"]
    status, listing = await api.call("GET", "/api/webhooks", admin_token)
    assert status == 200 and [h["id"] for h in listing["items"]] == [hook["id"]]
    assert "secret" not in listing["items"][0]
    status, changed = await api.call("PATCH", f"/api/webhooks/{hook['id']}", admin_token, json={"active": False})
    assert status == 200 and changed["active"] is False and "secret" not in changed
    status, body = await api.call("POST", "/api/webhooks", admin_token,
                                  json={"url": "ftp://x", "events": [], "secret": "short"})
    assert status == 422
    assert {e["field"] for e in body["error"]["details"]["errors"]} == {"url", "events", "secret"}
    status, _ = await api.call("DELETE", f"/api/webhooks/{hook['id']}", admin_token)
    assert status == 204
    status, _ = await api.call("GET", f"/api/webhooks/{hook['id']}", admin_token)
    assert status == 404


async def test_signed_delivery_is_retried_until_accepted(
    api: ApiClient, admin_token: str, receiver: Receiver, platform_env: dict[str, str], db: asyncpg.Pool,
    redis_auth: RedisAuth,
) -> None:
    """The worker POSTs a signed test event; a 500 is retried with back-off; the 200 delivers it."""
    worker = WorkerProcess.start({**platform_env, "TP_WEBHOOK_RETRY_SECONDS": "0.2"})
    try:
        secret = "s" * 32
        _, hook = await api.call("POST", "/api/webhooks", admin_token,
                                 json={"url": receiver.url, "events": ["message.status"], "secret": secret})
        receiver.statuses = [500]
        status, delivery = await api.call("POST", f"/api/webhooks/{hook['id']}/test", admin_token)
        assert status == 202 and delivery["status"] == "pending" and delivery["event_type"] == "webhook.test"

        async def delivered() -> Any:
            _, page = await api.call("GET", f"/api/webhooks/{hook['id']}/deliveries", admin_token)
            return page["items"][0]["status"] == "delivered" and page["items"][0]

        final = await eventually(delivered, timeout=30)
        assert final["attempts"] == 2 and final["response_status"] == 200
        assert len(receiver.received) == 2
        headers, body = receiver.received[-1]
        assert verify(secret, headers["X-TP-Signature"], body)
        assert not verify("another-secret-another-secret", headers["X-TP-Signature"], body)
        assert headers["X-TP-Event"] == "webhook.test" and headers["X-TP-Delivery"] == str(delivery["id"])
        payload = json.loads(body)
        assert payload["type"] == "webhook.test" and payload["data"]["webhook_id"] == hook["id"]

        # A published platform event of a subscribed type is delivered too; other types are not.
        redis = aioredis.Redis.from_url(platform_env["REDIS_URL"])
        try:
            await events.publish(redis, redis_auth, "account.state", {"account_id": 1})
            await events.publish(redis, redis_auth, "message.status", {"message_id": 3, "status": "sent"})
        finally:
            await redis.aclose()
        async def status_delivered() -> bool:
            return _count(receiver, "message.status") == 1

        await eventually(status_delivered, timeout=15)
        assert _count(receiver, "account.state") == 0
    finally:
        worker.stop()


def _count(receiver: Receiver, event_type: str) -> int:
    return sum(1 for headers, _ in receiver.received if headers.get("X-TP-Event") == event_type)


async def test_one_delivery_per_event_whatever_the_listeners(settings: Settings, db: asyncpg.Pool,
                                                             redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """Two worker children seeing the same published event record one delivery, not two."""
    sealed = store.seal_secret(settings.encryption_key, "k" * 32)
    hook = await store.create_webhook(db, url="http://127.0.0.1:9/", events=["*"], sealed_secret=sealed,
                                      description="", active=True, created_by=None)
    raw = events.encode_event("message.status", {"message_id": 1, "status": "sent"}).encode()
    first, second = WebhookService(settings, db, redis, redis_auth), WebhookService(settings, db, redis, redis_auth)
    assert await first.on_event(raw) == 1
    assert await second.on_event(raw) == 0
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1", hook["id"]) == 1


async def test_events_published_while_no_worker_listened_are_caught_up(settings: Settings, db: asyncpg.Pool,
                                                                       redis: aioredis.Redis,
                                                                       redis_auth: RedisAuth) -> None:
    """A child that subscribes reads the event log from the latest event any child handled: what was
    published while none listened gets its delivery, and nothing gets two; a cursor the log no longer
    reaches back to is reported."""
    sealed = store.seal_secret(settings.encryption_key, "k" * 32)
    hook = await store.create_webhook(db, url="http://127.0.0.1:9/", events=["message.*"], sealed_secret=sealed,
                                      description="", active=True, created_by=None)

    async def deliveries() -> int:
        return int(await db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1", hook["id"]))

    first = WebhookService(settings, db, redis, redis_auth)
    listening = asyncio.create_task(first.listen())
    await asyncio.wait_for(first.subscribed.wait(), 5)
    await events.publish(redis, redis_auth, "message.status", {"message_id": 1, "status": "sent"})
    await eventually(lambda: _equals(deliveries(), 1))
    await cancel_and_wait([listening])  # every child gone

    for message_id in (2, 3):
        await events.publish(redis, redis_auth, "message.status", {"message_id": message_id, "status": "sent"})
    await events.publish(redis, redis_auth, "account.state", {"account_id": 1, "auth_state": "ready"})  # not wanted
    second = WebhookService(settings, db, redis, redis_auth)
    listening = asyncio.create_task(second.listen())
    try:
        await eventually(lambda: _equals(deliveries(), 3))
        rows = await db.fetch("SELECT payload->'data'->>'message_id' AS m FROM webhook_deliveries ORDER BY id")
        assert [row["m"] for row in rows] == ["1", "2", "3"]

        await redis.set(redis_keys.WEBHOOKS_CURSOR, "1-0")  # older than the log's oldest event
        with capture_logs() as logs:
            await WebhookService(settings, db, redis, redis_auth)._catch_up()
        assert any(entry["event"].startswith("webhook events missed") for entry in logs), logs
        assert await deliveries() == 3
    finally:
        await cancel_and_wait([listening])


async def _equals(count: Awaitable[int], expected: int) -> bool:
    return await count == expected


async def test_a_url_no_delivery_could_reach_is_refused(api: ApiClient, admin_token: str) -> None:
    """Hosts the HTTP client refuses on every attempt (or that cannot exist) are a 422 naming `url`,
    on creation and on change; names, IPs, IDNs and ports it can reach are taken."""
    refused = ["http://0/", "http://10.0.0/x", "http://a..b/", "http://ex ample.com/", "http://%zz/",
               "http://[::1/", "http://h:99999/", f"http://{'a' * 64}.com/", "http://-bad-.example/"]
    for url in refused:
        status, body = await api.call("POST", "/api/webhooks", admin_token, json={"url": url})
        assert status == 422, (url, body)
        assert [e["field"] for e in body["error"]["details"]["errors"]] == ["url"], (url, body)
    taken = ["http://127.0.0.1:8080/hook", "https://hooks.example.com/x?y=1", "http://[::1]:9/",
             "http://bücher.example/", "http://my_service:8000/", "http://localhost./"]
    for url in taken:
        status, body = await api.call("POST", "/api/webhooks", admin_token, json={"url": url})
        assert status == 201, (url, body)
    status, body = await api.call("PATCH", f"/api/webhooks/{body['id']}", admin_token, json={"url": "http://0/"})
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "url", body


def test_signature_checks() -> None:
    """A signature verifies for its body and secret only, and not once it is too old."""
    header = sign("secret-secret-secret", 1_000_000, b"{}")
    assert verify("secret-secret-secret", header, b"{}", now=1_000_010)
    assert not verify("secret-secret-secret", header, b"{ }", now=1_000_010)
    assert not verify("secret-secret-secret", header, b"{}", now=1_001_000)
    assert not verify("secret-secret-secret", "garbage", b"{}")


async def test_a_forged_event_makes_no_webhook_delivery(settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis,
                                                        redis_auth: RedisAuth) -> None:
    """Events someone without ENCRYPTION_KEY pushes into Redis, live on the channel or into the log a
    listener catches up from, record no delivery (so none is signed and posted) and are counted; the
    genuine event after them is delivered."""
    sealed = store.seal_secret(settings.encryption_key, "k" * 32)
    hook = await store.create_webhook(db, url="http://127.0.0.1:9/", events=["*"], sealed_secret=sealed,
                                      description="", active=True, created_by=None)
    counted: list[str] = []
    service = WebhookService(settings, db, redis, RedisAuth(settings.encryption_key, count_refused=counted.append))
    await redis.set(redis_keys.WEBHOOKS_CURSOR, await events.publish(redis, redis_auth, "test.start", {}))
    forged = await forge_events(redis, redis_auth)  # in the log before the listener catches up
    listening = asyncio.create_task(service.listen())
    try:
        await asyncio.wait_for(service.subscribed.wait(), 5)
        await forge_events(redis, redis_auth)  # live
        await events.publish(redis, redis_auth, "message.status", {"message_id": 1, "status": "sent"})
        await eventually(lambda: _equals(_deliveries(db, hook["id"]), 1))
        await eventually(lambda: asyncio.sleep(0, len(counted) == 2 * forged))
    finally:
        await cancel_and_wait([listening])
    rows = await db.fetch("SELECT event_type, payload FROM webhook_deliveries")
    assert [row["event_type"] for row in rows] == ["message.status"]
    assert FORGED_TEXT not in str([row["payload"] for row in rows])


async def _deliveries(db: asyncpg.Pool, webhook_id: int) -> int:
    return int(await db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1", webhook_id))


async def test_a_genuine_event_appended_again_under_a_new_id_is_delivered_once(
        settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """Someone who copies a genuine event (its MAC valid) into the log or the channel again, under
    another id, makes no second delivery: a delivery is keyed by the event as published, not by its id."""
    sealed = store.seal_secret(settings.encryption_key, "k" * 32)
    hook = await store.create_webhook(db, url="http://127.0.0.1:9/", events=["*"], sealed_secret=sealed,
                                      description="", active=True, created_by=None)
    service = WebhookService(settings, db, redis, redis_auth)
    encoded = events.encode_event("message.status", {"message_id": 7, "status": "sent"})
    made = []
    for event_id in ("1-1", "2-1", "3-7"):
        text = events.open_published(redis_auth, redis_auth.event_mac(encoded) + events.with_id(event_id, encoded))
        assert text is not None
        made.append(await service.on_event(text.encode()))
    assert made == [1, 0, 0] and await _deliveries(db, hook["id"]) == 1


async def test_a_paused_webhook_shows_its_breaker_and_an_admin_resumes_it(
    api: ApiClient, admin_token: str, db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth,
) -> None:
    """GET shows the breaker; `POST /resume` closes a paused one (publishing `webhook.resumed`, and
    marking its held deliveries for release), is a 409 on a closed one, and is for admins only."""
    _, hook = await api.call("POST", "/api/webhooks", admin_token, json={"url": "http://127.0.0.1:9/x"})
    assert hook["breaker"] == {"state": "closed", "consecutive_failures": 0, "failing_since": None,
                               "paused_at": None, "probe_at": None}
    status, body = await api.call("POST", f"/api/webhooks/{hook['id']}/resume", admin_token)
    assert status == 409 and body["error"]["details"] == {"breaker_state": "closed"}, body
    await db.execute(
        """UPDATE webhooks SET breaker_state = 'open', consecutive_failures = 12,
                  failing_since = now() - interval '10 minutes', paused_at = now(),
                  paused_until = now() + interval '5 minutes' WHERE id = $1""", hook["id"])
    status, shown = await api.call("GET", f"/api/webhooks/{hook['id']}", admin_token)
    assert status == 200 and shown["breaker"]["state"] == "open" and shown["breaker"]["consecutive_failures"] == 12
    assert shown["breaker"]["probe_at"] is not None
    operator = await api.user_token("operator", "operator", db)
    status, _ = await api.call("POST", f"/api/webhooks/{hook['id']}/resume", operator)
    assert status == 403

    status, resumed = await api.call("POST", f"/api/webhooks/{hook['id']}/resume", admin_token)
    assert status == 200 and resumed["breaker"]["state"] == "closed", resumed
    assert resumed["breaker"]["consecutive_failures"] == 0 and resumed["breaker"]["paused_at"] is None
    assert await db.fetchval("SELECT release_held FROM webhooks WHERE id = $1", hook["id"]) is True
    logged = [json.loads(text) async for _, text in events.log_after(redis, redis_auth, "0-0", 100)]
    assert [e["data"] for e in logged if e["type"] == events.WEBHOOK_RESUMED] == [
        {"webhook_id": hook["id"], "by": "admin"}]
    status, body = await api.call("POST", "/api/webhooks/999999/resume", admin_token)
    assert status == 404
