"""Telegram's service notifications (login codes from 777000): never stored, streamed to viewers or
posted to webhooks; only an admin's WebSocket sees them, as one event with every code masked."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from structlog.testing import capture_logs
from support import ApiClient, EmulatorHandle, WorkerProcess, eventually, free_port
from worker.test_end_to_end import _ready_account

from telegram_platform import events, redis_keys
from telegram_platform.queue.consumer import JobContext
from telegram_platform.queue.registry import STORE_INCOMING, UPDATES_QUEUE
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.settings import Settings
from telegram_platform.telegram.base import IncomingMessage
from telegram_platform.telegram.emulator.model import EmulatorConfig, TelegramEmulator
from telegram_platform.worker.updates import IncomingUpdates, mask_codes

PHONE = "+9996671234"
CODE = "77777"  # the test-DC code of PHONE


@pytest.fixture
async def hook_bodies() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A webhook receiver: its URL and every body it was sent."""
    port = free_port()
    bodies: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/hook", bodies
    await runner.cleanup()


async def _frames_until(ws: aiohttp.ClientWebSocketResponse, text: str) -> list[dict[str, Any]]:
    """Every frame received until a message.incoming whose text is `text` (included)."""
    frames = []
    while True:
        frame = await ws.receive_json(timeout=15)
        frames.append(frame)
        if frame["type"] == "message.incoming" and frame["data"]["text"] == text:
            return frames


async def test_a_login_code_reaches_only_an_admin_masked(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle,
        db: asyncpg.Pool, hook_bodies: tuple[str, list[bytes]]) -> None:
    """A second login of a ready account's phone pushes the code from 777000: a viewer's WebSocket,
    GET /api/incoming and a webhook see nothing of it; an admin's WebSocket gets it masked."""
    hook_url, bodies = hook_bodies
    status, _ = await api.call("POST", "/api/webhooks", admin_token, json={"url": hook_url, "events": ["*"]})
    assert status == 201
    account = await _ready_account(api, admin_token, PHONE)
    viewer = await api.user_token("vic", "viewer", db)
    async with (
        api.client.ws_connect(f"/api/ws?token={viewer}") as viewer_ws,
        api.client.ws_connect(f"/api/ws?token={admin_token}") as admin_ws,
        aiohttp.ClientSession() as http,
    ):
        for ws in (viewer_ws, admin_ws):
            assert (await ws.receive_json(timeout=5))["type"] == "subscribed"

        async def streaming() -> bool:
            return fresh_emulator.telegram.connected(PHONE) > 0

        await eventually(streaming)
        # Someone starts a login of this phone elsewhere: Telegram tells the open sessions the code.
        async with http.post(f"{fresh_emulator.url}/rpc/auth.sendCode", json={"phone": PHONE}) as response:
            assert response.status == 200
        # Then an ordinary message, after which everything about the first has been handled.
        async with http.post(f"{fresh_emulator.url}/control/incoming",
                             json={"to_phone": PHONE, "sender": "@eve", "text": "after"}) as response:
            assert response.status == 200
        viewer_frames = await _frames_until(viewer_ws, "after")
        admin_frames = await _frames_until(admin_ws, "after")

    assert all(CODE not in json.dumps(frame["data"]) for frame in viewer_frames + admin_frames)
    assert not [f for f in viewer_frames if f["type"] == "account.service_notification"]
    notices = [f for f in admin_frames if f["type"] == "account.service_notification"]
    assert len(notices) == 1 and notices[0]["data"]["account_id"] == account["id"]
    assert notices[0]["data"]["text"].startswith("Login code: •••••")
    assert [f["data"]["sender"] for f in admin_frames if f["type"] == "message.incoming"] == ["@eve"]

    status, page = await api.call("GET", f"/api/incoming?account_id={account['id']}", viewer)
    assert status == 200 and [item["text"] for item in page["items"]] == ["after"]

    async def after_delivered() -> bool:
        return any(b'"after"' in body for body in bodies)

    await eventually(after_delivered, timeout=20)
    assert not [body for body in bodies if CODE.encode() in body or b"service_notification" in body]


def test_the_emulator_tells_open_sessions_a_new_login_code() -> None:
    """Like Telegram, sendCode for a phone with live sessions pushes them a message from 777000
    with the code; without a session, nothing is pushed."""
    telegram = TelegramEmulator(EmulatorConfig())
    telegram.send_code(PHONE)
    user_id = telegram.sign_in(PHONE, CODE)["user_id"]
    queue = telegram.subscribe(user_id)
    assert queue.empty()
    telegram.send_code(PHONE)
    update = queue.get_nowait()
    assert update["sender"] == "777000" and update["chat_id"] == 777000
    assert update["text"].startswith(f"Login code: {CODE}. Do not give this code to anyone")


def test_codes_are_masked() -> None:
    """Every run of four or more digits is masked; shorter numbers stay."""
    assert mask_codes("Login code: 12345. Or 1234 or 12 3") == "Login code: •••••. Or ••••• or 12 3"


async def test_a_queued_service_message_is_not_stored(settings: Settings, db: asyncpg.Pool,
                                                     redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """A job for a message from 777000 already in the queue publishes the masked notice, stores
    nothing, and logs no text."""
    account_id = int(await db.fetchval("INSERT INTO accounts (phone) VALUES ($1) RETURNING id", PHONE))
    message = IncomingMessage(account_id, 777000, 5 << 20, "777000", f"Login code: {CODE}. Do not give", 1_700_000_000)
    await redis.delete(redis_keys.EVENTS_LOG)
    with capture_logs() as logs:
        await IncomingUpdates(db, redis, redis_auth).store_incoming(
            JobContext("in-test", UPDATES_QUEUE, STORE_INCOMING), message.account_id, message.chat_id,
            message.telegram_message_id, message.sender, message.text, message.date, message.extra_json(),
            redis_auth.job_mac([message.account_id, message.chat_id, message.telegram_message_id, message.sender,
                                message.text, message.date, message.extra_json()]))
    assert await db.fetchval("SELECT count(*) FROM incoming_messages") == 0
    logged = [(_, fields) async for _, fields in events.log_after(redis, redis_auth, "0-0", 10)]
    assert len(logged) == 1
    event = json.loads(logged[0][1])
    assert event["type"] == "account.service_notification"
    assert event["data"] == {"account_id": account_id, "text": "Login code: •••••. Do not give",
                             "date": 1_700_000_000}
    assert logs and all(CODE not in str(entry) for entry in logs)


async def test_a_replay_sends_service_notifications_to_admins_only(api: ApiClient, admin_token: str,
                                                                   db: asyncpg.Pool, redis: aioredis.Redis,
                                                                   redis_auth: RedisAuth) -> None:
    """A client catching up from the event log gets service notifications only if it is an admin's."""
    viewer = await api.user_token("vic", "viewer", db)
    before = await events.publish(redis, redis_auth, "account.state", {"account_id": 1, "state": "ready"})
    await events.publish(redis, redis_auth, events.SERVICE_NOTIFICATION, {"account_id": 1, "text": "Login code: •••••"})
    await events.publish(redis, redis_auth, "account.state", {"account_id": 1, "state": "closed"})
    seen = {}
    for name, token in (("viewer", viewer), ("admin", admin_token)):
        async with api.client.ws_connect(f"/api/ws?token={token}&after={before}") as ws:
            frames = []
            while (frame := await ws.receive_json(timeout=5))["type"] != "replay":
                frames.append(frame["type"])
            seen[name] = frames
    assert seen["viewer"] == ["subscribed", "account.state"]
    assert seen["admin"] == ["subscribed", events.SERVICE_NOTIFICATION, "account.state"]
