"""Files and media end to end: uploaded through the real API, sent by a real worker process through the
emulator, each reaching Telegram exactly once with the right bytes; bad input leaves nothing half-sent.
Every test runs once per file store (TP_FILE_STORE), the API and the worker sharing it: PostgreSQL
large objects, then radosgw (S3)."""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import aiohttp
import asyncpg
import pytest
from support import ApiClient, EmulatorHandle, WorkerProcess, eventually

MB = 1 << 20


@pytest.fixture
def platform_env(platform_env: dict[str, str], file_store_env: dict[str, str]) -> dict[str, str]:
    """The API's and the worker's environment, with the file store under test."""
    return {**platform_env, **file_store_env}


async def _ready_account(api: ApiClient, token: str, phone: str) -> int:
    status, account = await api.call("POST", "/api/accounts", token, json={"phone": phone})
    assert status == 201, account
    status, account = await api.call("POST", f"/api/accounts/{account['id']}/auth/code", token,
                                     json={"code": phone[6] * 5})
    assert status == 200 and account["auth_state"] == "ready", account
    return int(account["id"])


async def _upload(api: ApiClient, token: str, data: bytes, name: str, content_type: str) -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("file", data, filename=name, content_type=content_type)
    status, body = await api.call("POST", "/api/files", token, data=form)
    assert status == 201, body
    return dict(body)


async def _sent(api: ApiClient, token: str, message_id: int) -> dict[str, Any]:
    async def done() -> Any:
        _, body = await api.call("GET", f"/api/messages/{message_id}", token)
        assert body["status"] in ("queued", "sending", "sent"), body
        return body if body["status"] == "sent" else None

    return dict(await eventually(done, timeout=30))


async def test_a_photo_with_a_caption_and_a_3_photo_album(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                          fresh_emulator: EmulatorHandle, db: asyncpg.Pool) -> None:
    """A photo with its formatted caption (MarkdownV2, bold) and an album of three photos each reach
    the emulator exactly once, with the uploaded bytes; the album's three message ids are recorded;
    a second send of the same photo by the account reuses Telegram's remote id (no second upload)."""
    account = await _ready_account(api, admin_token, "+9996631201")
    photos = [os.urandom(40_000 + i) for i in range(3)]
    uploaded = [await _upload(api, admin_token, data, f"p{i}.jpg", "image/jpeg") for i, data in enumerate(photos)]
    status, single = await api.call("POST", "/api/messages", admin_token, json={
        "account_id": account, "peer": "@alice", "text": "*sunset* at the beach", "parse_mode": "markdown",
        "media": [{"file_id": uploaded[0]["id"], "kind": "photo"}]})
    assert status == 202, single
    assert single["media"] == [{"file_id": uploaded[0]["id"], "kind": "photo"}]
    sent = await _sent(api, admin_token, single["id"])
    telegram = fresh_emulator.telegram
    (photo,) = [r for r in telegram.received if r.to == "@alice"]
    assert photo.text == "sunset at the beach" and photo.message_id == sent["telegram_message_id"]
    assert photo.entities == [{"type": "bold", "offset": 0, "length": 6}]
    assert photo.media is not None and photo.media["kind"] == "photo"
    assert telegram.files[photo.media["file_ref"]].data == photos[0]

    status, album = await api.call("POST", "/api/messages", admin_token, json={
        "account_id": account, "peer": "@bob", "text": "the trip",
        "media": [{"file_id": f["id"], "kind": "photo"} for f in uploaded]})
    assert status == 202, album
    sent_album = await _sent(api, admin_token, album["id"])
    items = [r for r in telegram.received if r.to == "@bob"]
    assert len(items) == 3 and len({r.grouped_id for r in items}) == 1
    assert [r.text for r in items] == ["the trip", "", ""]
    assert [hashlib.sha256(telegram.files[r.media["file_ref"]].data).hexdigest() for r in items if r.media] == [
        f["sha256"] for f in uploaded]
    assert sent_album["telegram_message_ids"] == [r.message_id for r in items]
    # The first photo went up once for @alice; the album reused its remote id and uploaded the other two.
    assert len(telegram.uploads) == 3
    assert await db.fetchval("SELECT count(*) FROM file_remote_ids WHERE account_id = $1", account) == 3


async def test_a_20_mb_document_arrives_byte_for_byte(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                      fresh_emulator: EmulatorHandle) -> None:
    """A 20 MB document goes through upload, the store, the worker's cache and the emulator unchanged, once."""
    account = await _ready_account(api, admin_token, "+9996631202")
    data = os.urandom(20 * MB)
    uploaded = await _upload(api, admin_token, data, "report.pdf", "application/pdf")
    status, message = await api.call("POST", "/api/messages", admin_token, json={
        "account_id": account, "peer": "@carol", "media": [{"file_id": uploaded["id"], "kind": "document"}]})
    assert status == 202, message
    await _sent(api, admin_token, message["id"])
    received = [r for r in fresh_emulator.telegram.received if r.to == "@carol"]
    assert len(received) == 1 and received[0].media is not None
    assert received[0].media["size"] == len(data) and received[0].media["file_name"] == "report.pdf"
    assert fresh_emulator.telegram.files[received[0].media["file_ref"]].data == data


async def test_bad_media_is_refused_and_nothing_is_queued(api: ApiClient, admin_token: str,
                                                          fresh_emulator: EmulatorHandle, db: asyncpg.Pool) -> None:
    """A file id that does not exist, a document in an album, a sticker with a caption, a PDF as a
    photo, a caption over 1,024 units, and no text nor media: each a 422 naming the field, no message stored."""
    account = int(await db.fetchval("INSERT INTO accounts (phone) VALUES ('+9996631203') RETURNING id"))
    pdf = await _upload(api, admin_token, b"%PDF-1.4 ...", "a.pdf", "application/pdf")
    image = await _upload(api, admin_token, os.urandom(100), "a.webp", "image/webp")
    cases = [
        ({"media": [{"file_id": 987654, "kind": "photo"}]}, "media[0].file_id"),
        ({"media": [{"file_id": image["id"], "kind": "photo"}, {"file_id": pdf["id"], "kind": "document"}]},
         "media"),
        ({"text": "hi", "media": [{"file_id": image["id"], "kind": "sticker"}]}, "text"),
        ({"media": [{"file_id": pdf["id"], "kind": "photo"}]}, "media[0].kind"),
        ({"text": "x" * 1025, "media": [{"file_id": pdf["id"], "kind": "document"}]}, "text"),
        ({}, "text"),
        ({"media": [{"file_id": image["id"], "kind": "photo"}] * 11}, "media"),
    ]
    for extra, field in cases:
        status, body = await api.call("POST", "/api/messages", admin_token,
                                      json={"account_id": account, "peer": "@dave", **extra})
        assert status == 422, (extra, body)
        assert field in [e["field"] for e in body["error"]["details"]["errors"]], (extra, body)
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    assert await db.fetchval("SELECT count(*) FROM message_files") == 0
    assert fresh_emulator.telegram.received == []


async def test_a_campaign_carries_a_photo_to_every_recipient(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                             fresh_emulator: EmulatorHandle,
                                                             db: asyncpg.Pool) -> None:
    """A campaign with a photo: each of five recipients gets it once with the rendered caption; the
    account uploads it once and reuses Telegram's remote id after; the campaign shows its media."""
    account = await _ready_account(api, admin_token, "+9996631204")
    status, _ = await api.call("PUT", f"/api/accounts/{account}/limits", admin_token,
                               json={"per_second": 20, "burst": 5, "warmup_days": 0})
    assert status == 200
    data = os.urandom(30_000)
    photo = await _upload(api, admin_token, data, "offer.png", "image/png")
    status, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "offer", "account_ids": [account], "template": "Hi {first_name}",
        "media": [{"file_id": photo["id"], "kind": "photo"}],
        "recipients": [{"peer": f"@r{i}", "variables": {"first_name": f"N{i}"}} for i in range(5)]})
    assert status == 201, campaign
    assert campaign["media"] == [{"file_id": photo["id"], "kind": "photo"}]
    status, _ = await api.call("POST", f"/api/campaigns/{campaign['id']}/start", admin_token)
    assert status == 200

    async def done() -> Any:
        _, body = await api.call("GET", f"/api/campaigns/{campaign['id']}", admin_token)
        return body if body["status"] == "completed" else None

    finished = await eventually(done, timeout=60, interval=0.2)
    assert finished["progress"]["sent"] == 5 and finished["media"] == campaign["media"]
    telegram = fresh_emulator.telegram
    received = sorted((r.to, r.text) for r in telegram.received)
    assert received == [(f"@r{i}", f"Hi N{i}") for i in range(5)]
    assert all(r.media and telegram.files[r.media["file_ref"]].data == data for r in telegram.received)
    assert len(telegram.uploads) == 1


async def test_a_campaign_with_a_missing_file_is_refused(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """A campaign naming a file that does not exist is a 422 naming it, and no campaign is made."""
    account = int(await db.fetchval("INSERT INTO accounts (phone) VALUES ('+9996631205') RETURNING id"))
    status, body = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "x", "account_ids": [account], "template": "hi", "media": [{"file_id": 424242, "kind": "photo"}]})
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "media[0].file_id"
    assert await db.fetchval("SELECT count(*) FROM campaigns") == 0


async def test_incoming_photo_and_voice_note_are_listed_published_and_downloadable(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle,
        db: asyncpg.Pool, file_store_env: dict[str, str]) -> None:
    """A photo and a voice note injected through the emulator show in GET /api/incoming and as
    message.incoming events with their kind and metadata; the photo downloads byte-for-byte through
    the account's worker, into the configured store, and a second download is served from the file
    store (no second download from Telegram)."""
    account = await _ready_account(api, admin_token, "+9996631206")
    viewer = await api.user_token("viewer", "viewer", db)
    photo = os.urandom(120_000)
    voice = os.urandom(9_000)
    injected = []
    async with api.client.ws_connect(f"/api/ws?token={admin_token}&types=message.incoming") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "subscribed"
        async with aiohttp.ClientSession() as http:
            for text, media in (("from the trip", {"kind": "photo", "data": base64.b64encode(photo).decode(),
                                                   "mime_type": "image/jpeg", "width": 800, "height": 600}),
                                ("", {"kind": "voice", "data": base64.b64encode(voice).decode(),
                                      "mime_type": "audio/ogg", "duration": 3})):
                async with http.post(f"{fresh_emulator.url}/control/incoming", json={
                        "to_phone": "+9996631206", "sender": "@eve", "text": text, "media": media}) as response:
                    assert response.status == 200
                    injected.append(await response.json())
        events = [await ws.receive_json(timeout=15) for _ in range(2)]
    assert [e["data"]["kind"] for e in events] == ["photo", "voice"]
    assert events[0]["data"]["text"] == "from the trip"
    assert events[0]["data"]["media"]["size"] == len(photo)
    assert (events[0]["data"]["media"]["width"], events[0]["data"]["media"]["height"]) == (800, 600)
    assert events[1]["data"]["media"]["duration"] == 3 and events[1]["data"]["media"]["mime_type"] == "audio/ogg"
    status, page = await api.call("GET", f"/api/incoming?account_id={account}&order=asc", viewer)
    assert status == 200 and [item["kind"] for item in page["items"]] == ["photo", "voice"]
    photo_id = page["items"][0]["id"]
    assert photo_id == events[0]["data"]["id"]
    headers = {"Authorization": f"Bearer {viewer}"}
    for _ in range(2):
        async with api.client.get(f"/api/incoming/{photo_id}/file", headers=headers) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"] == "image/jpeg"
            assert await response.read() == photo
    assert fresh_emulator.telegram.counters["downloads"] == 1
    assert await db.fetchval("SELECT count(*) FROM incoming_files") == 1
    stored_in = await db.fetchval("SELECT f.storage FROM files f JOIN incoming_files i ON i.file_id = f.id")
    assert stored_in == ("s3" if file_store_env else "pg")  # the worker wrote where TP_FILE_STORE says
    status, body = await api.call("GET", "/api/incoming/999999/file", viewer)
    assert status == 404 and body["error"]["code"] == "not_found"


async def test_a_remote_id_telegram_no_longer_takes_is_forgotten_and_the_file_uploaded(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle,
        db: asyncpg.Pool) -> None:
    """A stored remote id Telegram refuses (FILE_REFERENCE_INVALID) is dropped and the send retried
    with an upload: the message is sent once, with the right bytes, and the new remote id recorded."""
    account = await _ready_account(api, admin_token, "+9996631207")
    data = os.urandom(10_000)
    uploaded = await _upload(api, admin_token, data, "doc.pdf", "application/pdf")
    await db.execute("INSERT INTO file_remote_ids (file_id, account_id, remote_id) VALUES ($1, $2, 'emu-file-stale')",
                     uploaded["id"], account)
    status, message = await api.call("POST", "/api/messages", admin_token, json={
        "account_id": account, "peer": "@erin", "media": [{"file_id": uploaded["id"], "kind": "document"}]})
    assert status == 202, message
    sent = await _sent(api, admin_token, message["id"])
    assert sent["attempts"] == 2
    received = [r for r in fresh_emulator.telegram.received if r.to == "@erin"]
    assert len(received) == 1 and received[0].media is not None
    assert fresh_emulator.telegram.files[received[0].media["file_ref"]].data == data
    # The sender records the new remote id just after it marks the message sent: wait for it.
    expected = received[0].media["file_ref"]
    assert await eventually(lambda: _remote_id_is(db, account, expected)), expected


async def _remote_id_is(db: asyncpg.Pool, account: int, expected: str) -> bool:
    return bool(await db.fetchval("SELECT remote_id FROM file_remote_ids WHERE account_id = $1", account) == expected)
