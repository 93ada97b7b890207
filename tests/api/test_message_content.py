"""Messages whole through the REST API, on the emulator: formatted text (MarkdownV2, HTML, entities),
options, replies, forwards, edits, deletions and cancels; bad input refused before the outbox."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from support import ApiClient, EmulatorHandle, WorkerProcess, eventually, free_port

from telegram_platform.storage import accounts as account_store
from telegram_platform.worker.webhooks import HOOKS_CACHE_SECONDS

PHONE = "+9996671234"


async def _ready_account(api: ApiClient, token: str, phone: str = PHONE) -> int:
    status, account = await api.call("POST", "/api/accounts", token, json={"phone": phone})
    assert status == 201, account
    status, account = await api.call("POST", f"/api/accounts/{account['id']}/auth/code", token,
                                     json={"code": phone[6] * 5})
    assert status == 200 and account["auth_state"] == "ready", account
    return int(account["id"])


async def _settled(api: ApiClient, token: str, message_id: int, status: str = "sent") -> dict[str, Any]:
    async def done() -> Any:
        _, body = await api.call("GET", f"/api/messages/{message_id}", token)
        assert body["status"] not in ("failed", "cancelled"), body
        return body if body["status"] == status else None

    result: dict[str, Any] = await eventually(done)
    return result


async def _control(emulator: EmulatorHandle, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.post(f"{emulator.url}/control/{path}", json=body) as response:
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result


async def test_formatted_messages_reach_the_emulator_once_with_their_entities(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle) -> None:
    """MarkdownV2 with bold, an emoji and a link (UTF-16 offsets), HTML, and explicit entities with
    options each reach the emulator exactly once with the entities TDLib parsed; GET shows them."""
    account_id = await _ready_account(api, admin_token)
    sends = [
        ({"text": "*bold* 😀 [link](https://example.com/a)", "parse_mode": "markdown"},
         "bold 😀 link", [{"type": "bold", "offset": 0, "length": 4},
                         {"type": "text_link", "offset": 8, "length": 4, "url": "https://example.com/a"}]),
        ({"text": "<i>it</i> &amp; <code>x&lt;y</code>", "parse_mode": "html"},
         "it & x<y", [{"type": "italic", "offset": 0, "length": 2}, {"type": "code", "offset": 5, "length": 3}]),
        ({"text": "😀 plain", "entities": [{"type": "underline", "offset": 3, "length": 5}],
          "silent": True, "protect_content": True, "disable_web_page_preview": True},
         "😀 plain", [{"type": "underline", "offset": 3, "length": 5}]),
    ]
    ids = []
    for body, _, _ in sends:
        status, message = await api.call("POST", "/api/messages", admin_token,
                                         json={"account_id": account_id, "peer": "@fmt", **body})
        assert status == 202, message
        ids.append(message["id"])
    for message_id, (_, text, entities) in zip(ids, sends, strict=True):
        sent = await _settled(api, admin_token, message_id)
        assert (sent["text"], sent["entities"]) == (text, entities)
    received = {r.text: r for r in fresh_emulator.telegram.received_by("@fmt")}  # sent in any order
    assert len(fresh_emulator.telegram.received_by("@fmt")) == len(sends)
    assert {text: r.entities for text, r in received.items()} == {text: entities for _, text, entities in sends}
    assert received["😀 plain"].options == {"silent": True, "protect_content": True, "disable_web_page_preview": True}
    assert received["bold 😀 link"].options["silent"] is False
    _, last = await api.call("GET", f"/api/messages/{ids[2]}", admin_token)
    assert last["options"]["silent"] is True and last["action"] == "send"


async def test_bad_text_is_refused_before_the_outbox(api: ApiClient, admin_token: str, db: asyncpg.Pool,
                                                     fresh_emulator: EmulatorHandle) -> None:
    """Unparseable MarkdownV2, 4,097 UTF-16 units, entities out of bounds, markup and entities
    together, an unknown reply: each a 422 naming the field in Telegram's words; nothing queued."""
    account = await account_store.create_account(db, "+9996672234", None)  # no worker: never logged in
    base = {"account_id": account["id"], "peer": "@bad"}
    cases = [
        ({"text": "*bold", "parse_mode": "markdown"}, "text", "Can't parse entities"),
        ({"text": "a_b", "parse_mode": "markdown"}, "text", "Can't parse entities"),
        ({"text": "<b>x</i>", "parse_mode": "html"}, "text", "Can't parse entities"),
        ({"text": "😀" * 2048 + "x"}, "text", "MESSAGE_TOO_LONG"),
        ({"text": "**" * 2049, "parse_mode": "markdown"}, "text", "MESSAGE_EMPTY"),
        ({"text": "😀x", "entities": [{"type": "bold", "offset": 1, "length": 3}]}, "entities",
         "ENTITY_BOUNDS_INVALID"),
        ({"text": "x", "entities": [{"type": "text_link", "offset": 0, "length": 1}]}, "entities",
         "ENTITY_FIELD_MISSING"),
        ({"text": "*x*", "parse_mode": "markdown", "entities": []}, "entities", "not both"),
        ({"text": "x", "reply_to_message_id": 999999}, "reply_to_message_id", "no such message"),
        ({"text": "x", "reply_to_incoming_id": 999999}, "reply_to_incoming_id", "no such incoming"),
    ]
    for extra, field, words in cases:
        status, body = await api.call("POST", "/api/messages", admin_token, json={**base, **extra})
        assert status == 422, (extra, body)
        errors = body["error"]["details"]["errors"]
        assert errors[0]["field"] == field and words in errors[0]["message"], (extra, errors)
    status, body = await api.call("POST", "/api/messages", admin_token,
                                  json={"account_id": account["id"], "text": "no peer"})
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "peer"
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    assert fresh_emulator.telegram.attempts == []
    status, _ = await api.call("POST", "/api/messages", admin_token, json={**base, "text": "x" * 4096})
    assert status == 202  # exactly the limit passes


async def test_replies_forwards_edits_and_deletes_each_act_once(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle) -> None:
    """A reply (to a sent and to an incoming message), a forward, an edit and a delete for everyone
    go through the outbox, reach the emulator once each and record the Telegram ids they acted on."""
    telegram = fresh_emulator.telegram
    account_id = await _ready_account(api, admin_token, "+9996673234")
    _, first = await api.call("POST", "/api/messages", admin_token,
                              json={"account_id": account_id, "peer": "@dora", "text": "first"})
    first = await _settled(api, admin_token, first["id"])

    status, reply = await api.call("POST", "/api/messages", admin_token, json={
        "account_id": account_id, "text": "_re_", "parse_mode": "markdown", "reply_to_message_id": first["id"]})
    assert status == 202 and reply["peer"] == "@dora" and reply["reply_to"] == first["telegram_message_id"]
    await _settled(api, admin_token, reply["id"])
    assert telegram.received_by("@dora")[1].reply_to == first["telegram_message_id"]

    incoming = await _control(fresh_emulator, "incoming", {"to_phone": "+9996673234", "sender": "@erin",
                                                           "text": "question?"})

    async def stored() -> Any:
        _, page = await api.call("GET", f"/api/incoming?account_id={account_id}", admin_token)
        return page["items"][0] if page["items"] else None

    question = await eventually(stored)
    status, answer = await api.call("POST", "/api/messages", admin_token, json={
        "account_id": account_id, "text": "answer", "reply_to_incoming_id": question["id"]})
    assert status == 202 and answer["peer"] == str(incoming["chat_id"]), answer
    await _settled(api, admin_token, answer["id"])
    answered = [r for r in telegram.received if r.chat_id == incoming["chat_id"]]
    assert [(r.text, r.reply_to) for r in answered] == [("answer", incoming["message_id"])]

    status, forward = await api.call("POST", f"/api/messages/{first['id']}/forward", admin_token,
                                     json={"peer": "@fred"})
    assert status == 202 and forward["action"] == "forward" and forward["target_id"] == first["id"]
    forward = await _settled(api, admin_token, forward["id"])
    (copy,) = telegram.received_by("@fred")
    assert copy.text == "first"
    assert copy.forwarded_from == {"chat_id": first["chat_id"], "message_id": first["telegram_message_id"]}
    assert forward["telegram_message_ids"] == [copy.message_id]

    status, edit = await api.call("PATCH", f"/api/messages/{first['id']}", admin_token,
                                  json={"text": "*first*, edited", "parse_mode": "markdown"})
    assert status == 202 and edit["action"] == "edit", edit
    edit = await _settled(api, admin_token, edit["id"])
    assert edit["telegram_message_ids"] == [first["telegram_message_id"]]
    _, edited = await api.call("GET", f"/api/messages/{first['id']}", admin_token)
    assert edited["text"] == "first, edited" and edited["entities"] == [{"type": "bold", "offset": 0, "length": 5}]
    assert edited["edited_at"] is not None
    original = telegram.received_by("@dora")[0]
    assert (original.text, original.entities) == ("first, edited", [{"type": "bold", "offset": 0, "length": 5}])
    status, same = await api.call("PATCH", f"/api/messages/{first['id']}", admin_token,
                                  json={"text": "*first*, edited", "parse_mode": "markdown"})
    assert status == 422 and "MESSAGE_NOT_MODIFIED" in same["error"]["details"]["errors"][0]["message"]

    status, delete = await api.call("DELETE", f"/api/messages/{first['id']}?for_everyone=true", admin_token,
                                    headers={"Idempotency-Key": "del-1"})
    assert status == 202 and delete["action"] == "delete", delete
    await _settled(api, admin_token, delete["id"])
    _, again = await api.call("DELETE", f"/api/messages/{first['id']}?for_everyone=true", admin_token,
                              headers={"Idempotency-Key": "del-1"})
    assert again["id"] == delete["id"]
    _, deleted = await api.call("GET", f"/api/messages/{first['id']}", admin_token)
    assert deleted["deleted_at"] is not None
    assert original.deleted_for_everyone is True
    status, gone = await api.call("PATCH", f"/api/messages/{first['id']}", admin_token, json={"text": "late"})
    assert status == 409, gone
    assert telegram.counters["edits"] == 1 and telegram.counters["deletions"] == 1
    assert telegram.counters["forwards"] == 1


async def test_an_edit_after_48_hours_is_refused(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                  fresh_emulator: EmulatorHandle, db: asyncpg.Pool) -> None:
    """A message sent more than 48 hours ago: PATCH answers 409 MESSAGE_EDIT_TIME_EXPIRED, nothing queued."""
    account_id = await _ready_account(api, admin_token, "+9996674234")
    _, message = await api.call("POST", "/api/messages", admin_token,
                                json={"account_id": account_id, "peer": "@gus", "text": "old"})
    await _settled(api, admin_token, message["id"])
    await db.execute("UPDATE messages SET sent_at = now() - interval '49 hours' WHERE id = $1", message["id"])
    status, body = await api.call("PATCH", f"/api/messages/{message['id']}", admin_token, json={"text": "new"})
    assert status == 409 and "MESSAGE_EDIT_TIME_EXPIRED" in body["error"]["message"]
    assert await db.fetchval("SELECT count(*) FROM messages WHERE action = 'edit'") == 0


async def test_cancel_stops_a_queued_message_only(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """A queued message is cancelled (200, `cancelled`); cancelling it again, or a sent one, is 409."""
    account = await account_store.create_account(db, "+9996675234", None)  # no worker: it stays queued
    _, message = await api.call("POST", "/api/messages", admin_token,
                                json={"account_id": account["id"], "peer": "@hal", "text": "never"})
    status, cancelled = await api.call("POST", f"/api/messages/{message['id']}/cancel", admin_token)
    assert status == 200 and cancelled["status"] == "cancelled"
    status, body = await api.call("POST", f"/api/messages/{message['id']}/cancel", admin_token)
    assert status == 409 and body["error"]["details"]["status"] == "cancelled"
    status, _ = await api.call("POST", "/api/messages/999999/cancel", admin_token)
    assert status == 404
    status, body = await api.call("POST", f"/api/messages/{message['id']}/forward", admin_token, json={"peer": "@x"})
    assert status == 409


async def _event(ws: aiohttp.ClientWebSocketResponse, wanted: str, timeout: float = 15.0) -> dict[str, Any]:
    """The next event of type `wanted` on the stream (others skipped)."""
    while True:
        message = await ws.receive(timeout=timeout)
        assert message.type is aiohttp.WSMsgType.TEXT, message
        event: dict[str, Any] = json.loads(message.data)
        if event["type"] == wanted:
            return event


async def test_incoming_text_edits_deletions_and_read_receipts(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle) -> None:
    """Injected through the emulator: an incoming message with entities, a reply and a forward origin
    (which the account then marks read at Telegram), its edit and its deletion, and a read receipt,
    each in GET /api/incoming or GET /api/messages and as its WebSocket event."""
    phone = "+9996676234"
    account_id = await _ready_account(api, admin_token, phone)
    _, mine = await api.call("POST", "/api/messages", admin_token,
                             json={"account_id": account_id, "peer": "@ivy", "text": "hello ivy"})
    mine = await _settled(api, admin_token, mine["id"])
    async with api.client.ws_connect(f"/api/ws?token={admin_token}&topics=account:{account_id}") as ws:
        sent = await _control(fresh_emulator, "incoming", {
            "to_phone": phone, "sender": "@ivy", "text": "😀 hi there",
            "entities": [{"type": "bold", "offset": 3, "length": 2}], "reply_to": mine["telegram_message_id"],
            "forward_from": {"type": "user", "id": 42}})
        event = await _event(ws, "message.incoming")
        assert event["data"]["entities"] == [{"type": "bold", "offset": 3, "length": 2}]
        assert event["data"]["reply_to"] == mine["telegram_message_id"] and event["data"]["kind"] == "text"
        assert event["data"]["forward_from"] == {"type": "user", "id": 42}
        incoming_id = event["data"]["id"]

        status, marked = await api.call("POST", f"/api/incoming/{incoming_id}/read", admin_token)
        assert status == 200 and marked["read_at"] is not None, marked
        assert fresh_emulator.telegram.inbox_reads[-1]["message_ids"] == [sent["message_id"]]

        await _control(fresh_emulator, "edit", {"to_phone": phone, "sender": "@ivy", "message_id": sent["message_id"],
                                                "text": "hi, edited", "entities": []})
        edited = await _event(ws, "message.edited")
        assert edited["data"]["id"] == incoming_id and edited["data"]["text"] == "hi, edited"

        await _control(fresh_emulator, "delete", {"to_phone": phone, "sender": "@ivy",
                                                  "message_ids": [sent["message_id"]]})
        deleted = await _event(ws, "message.deleted")
        assert deleted["data"]["incoming_ids"] == [incoming_id]
        assert deleted["data"]["telegram_message_ids"] == [sent["message_id"]]

        await _control(fresh_emulator, "read", {"phone": phone, "reader": "@ivy"})
        read = await _event(ws, "message.status")
        assert read["data"] == {**read["data"], "message_id": mine["id"], "status": "read"}

    _, page = await api.call("GET", f"/api/incoming?account_id={account_id}", admin_token)
    (item,) = page["items"]
    assert item["text"] == "hi, edited" and item["entities"] == [] and item["edited_at"] is not None
    assert item["deleted_at"] is not None and item["reply_to"] == mine["telegram_message_id"]
    assert item["forward_from"] == {"type": "user", "id": 42}
    _, now_read = await api.call("GET", f"/api/messages/{mine['id']}", admin_token)
    assert now_read["status"] == "read" and now_read["read_at"] is not None


async def test_edits_and_deletions_reach_webhooks(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                  fresh_emulator: EmulatorHandle) -> None:
    """A webhook subscribed to message.edited and message.deleted is POSTed both when the sender
    edits, then deletes, a message the account received; message.incoming it did not ask for."""
    posted: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        posted.append(json.loads(await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        phone = "+9996677234"
        status, _ = await api.call("POST", "/api/webhooks", admin_token, json={
            "url": f"http://127.0.0.1:{port}/hook", "events": ["message.edited", "message.deleted"]})
        assert status == 201
        account_id = await _ready_account(api, admin_token, phone)
        await asyncio.sleep(HOOKS_CACHE_SECONDS)  # the worker's webhooks, read again
        sent = await _control(fresh_emulator, "incoming", {"to_phone": phone, "sender": "@jay", "text": "v1"})
        await _control(fresh_emulator, "edit", {"to_phone": phone, "sender": "@jay",
                                                "message_id": sent["message_id"], "text": "v2"})
        await _control(fresh_emulator, "delete", {"to_phone": phone, "sender": "@jay",
                                                  "message_ids": [sent["message_id"]]})

        async def both() -> bool:
            return {p["type"] for p in posted} == {"message.edited", "message.deleted"}

        await eventually(both, timeout=30)
        edited = next(p for p in posted if p["type"] == "message.edited")
        assert edited["data"]["text"] == "v2" and edited["data"]["account_id"] == account_id
        assert len(posted) == 2
    finally:
        await runner.cleanup()


async def test_an_idempotency_key_answers_only_the_request_it_made(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle) -> None:
    """A key that made a send is a 422 on a forward (and on a forward of another message), never
    that send answered again; the forward's own retry with its key is answered with the forward."""
    account_id = await _ready_account(api, admin_token, "+9996673777")
    _, first = await api.call("POST", "/api/messages", admin_token,
                              json={"account_id": account_id, "peer": "@gus", "text": "first",
                                    "idempotency_key": "key-of-a-send"})
    first = await _settled(api, admin_token, first["id"])
    for path in (f"/api/messages/{first['id']}/forward", "/api/messages/0/forward"):
        status, body = await api.call("POST", path, admin_token,
                                      json={"peer": "@hal", "idempotency_key": "key-of-a-send"})
        assert status == 422, (path, body)
        assert body["error"]["details"]["errors"][0]["field"] in ("idempotency_key", "id"), body
    forwards = []
    for _ in range(2):
        status, forward = await api.call("POST", f"/api/messages/{first['id']}/forward", admin_token,
                                         json={"peer": "@hal", "idempotency_key": "key-of-a-forward"})
        assert status == 202, forward
        forwards.append(forward["id"])
    assert forwards[0] == forwards[1] != first["id"]
