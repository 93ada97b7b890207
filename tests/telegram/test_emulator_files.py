"""The emulator's files: uploads, media sends with Telegram's limits, albums, incoming media and
downloads, in process and through the emulator backend over HTTP."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from support import EmulatorHandle

from telegram_platform.telegram.base import PermanentError, SessionConfig, Update
from telegram_platform.telegram.content import Entity, FormattedText, Media, MediaKind, OutgoingMessage
from telegram_platform.telegram.emulator.backend import EmulatorBackend, EmulatorSession
from telegram_platform.telegram.emulator.model import EmulatorConfig, EmulatorError, TelegramEmulator
from telegram_platform.telegram.keys import derive_database_key

PHONE = "+9996612345"


def _emulator(**config: int) -> tuple[TelegramEmulator, int]:
    telegram = TelegramEmulator(EmulatorConfig(latency_ms=0, **config))
    return telegram, telegram.user_for_phone(PHONE).user_id


def _refused(telegram: TelegramEmulator, user_id: int, media: list[dict[str, str]], caption: str = "") -> str:
    with pytest.raises(EmulatorError) as caught:
        telegram.send_media(user_id, "@bob", media, caption)
    return caught.value.message


def test_a_photo_is_received_with_its_caption_and_bytes() -> None:
    """An uploaded photo sent with a caption reaches the peer once, its kind, size and sha256 recorded."""
    telegram, me = _emulator()
    data = os.urandom(5000)
    photo = telegram.upload(me, data, mime_type="image/jpeg", file_name="a.jpg")
    (record,) = telegram.send_media(me, "@bob", [{"kind": "photo", "file_ref": photo.file_ref}], "look", "r1")
    assert record.text == "look" and record.grouped_id is None
    assert record.media == {"kind": "photo", "size": 5000, "sha256": hashlib.sha256(data).hexdigest(),
                            "mime_type": "image/jpeg", "file_name": "a.jpg", "file_ref": photo.file_ref}
    again = telegram.send_media(me, "@bob", [{"kind": "photo", "file_ref": photo.file_ref}], "look", "r1")
    assert again == [record] and len(telegram.received) == 1  # the same random_id: no second message


def test_an_album_is_one_message_per_item_sharing_a_group() -> None:
    """Three photos make three messages with one grouped_id, the caption on the first."""
    telegram, me = _emulator()
    refs = [telegram.upload(me, os.urandom(100), mime_type="image/png", file_name=f"{i}.png").file_ref
            for i in range(3)]
    records = telegram.send_media(me, "@bob", [{"kind": "photo", "file_ref": r} for r in refs], "trip")
    assert [r.text for r in records] == ["trip", "", ""]
    assert len({r.grouped_id for r in records}) == 1 and records[0].grouped_id is not None
    assert [r.media["file_ref"] for r in records if r.media] == refs


def test_telegrams_limits_are_enforced() -> None:
    """Too many album items, a document in an album, a long caption, a sticker's caption, another
    account's file, an oversized photo: each refused with Telegram's error, nothing received."""
    telegram, me = _emulator(max_photo_size=1000)
    other = telegram.user_for_phone("+9996612346").user_id
    photo = telegram.upload(me, b"p" * 10, mime_type="image/png", file_name="p.png").file_ref
    doc = telegram.upload(me, b"d" * 10, mime_type="application/pdf", file_name="d.pdf").file_ref
    big = telegram.upload(me, b"b" * 2000, mime_type="image/png", file_name="b.png").file_ref
    theirs = telegram.upload(other, b"t", mime_type="image/png", file_name="t.png").file_ref
    assert _refused(telegram, me, [{"kind": "photo", "file_ref": photo}] * 11) == "MULTI_MEDIA_TOO_LONG"
    assert _refused(telegram, me, [{"kind": "photo", "file_ref": photo},
                                   {"kind": "document", "file_ref": doc}]) == "MEDIA_INVALID"
    assert _refused(telegram, me, [{"kind": "photo", "file_ref": photo}], "x" * 1025) == "MEDIA_CAPTION_TOO_LONG"
    assert _refused(telegram, me, [{"kind": "sticker", "file_ref": photo}], "hi") == "MEDIA_CAPTION_INVALID"
    assert _refused(telegram, me, [{"kind": "photo", "file_ref": theirs}]) == "FILE_REFERENCE_INVALID"
    assert _refused(telegram, me, [{"kind": "photo", "file_ref": big}]) == "PHOTO_SAVE_FILE_INVALID"
    assert telegram.send_media(me, "@bob", [{"kind": "document", "file_ref": big}])  # not a photo: fine
    assert len(telegram.received) == 1
    with pytest.raises(EmulatorError, match="FILE_PARTS_INVALID"):
        TelegramEmulator(EmulatorConfig(max_file_size=10)).upload(me, b"x" * 11, mime_type="", file_name="")


# -- through the emulator backend, over HTTP -------------------------------------------------------

async def _sink(update: Update) -> None:
    pass


@pytest.fixture
async def backend(fresh_emulator: EmulatorHandle, tmp_path: Path) -> AsyncIterator[EmulatorBackend]:
    backend = EmulatorBackend(fresh_emulator.url, tmp_path, on_update=_sink, request_timeout=10.0)
    yield backend
    await backend.aclose(time.monotonic() + 5)


async def _ready(backend: EmulatorBackend, account_id: int, phone: str) -> EmulatorSession:
    session = await backend.open_session(SessionConfig(account_id, phone, derive_database_key(bytes(32), account_id)))
    await session.start()
    await session.submit_code(phone[6] * 5)
    return session


def _media(path: Path, kind: MediaKind = MediaKind.DOCUMENT, remote_id: str | None = None) -> Media:
    data = path.read_bytes()
    return Media(kind, 1, len(data), "application/pdf", path.name, hashlib.sha256(data).hexdigest(), path=path,
                 remote_id=remote_id)


async def test_a_20_mb_document_is_uploaded_once_and_its_remote_id_reused(
        backend: EmulatorBackend, fresh_emulator: EmulatorHandle, tmp_path: Path) -> None:
    """The backend streams a 20 MB file up, sends it, and a second send by its remote id uploads nothing."""
    session = await _ready(backend, 1, PHONE)
    path = tmp_path / "report.pdf"
    path.write_bytes(os.urandom(20 << 20))
    sent = await session.send("@bob", OutgoingMessage(FormattedText("the report"), media=(_media(path),)),
                              random_id=11)
    telegram = fresh_emulator.telegram
    assert len(telegram.uploads) == 1 and telegram.uploads[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert telegram.files[sent.remote_file_ids[0]].data == path.read_bytes()
    again = await session.send("@carol", OutgoingMessage(
        FormattedText(""), media=(_media(path, remote_id=sent.remote_file_ids[0]),)), random_id=12)
    assert len(telegram.uploads) == 1 and len(telegram.received) == 2
    assert again.remote_file_ids == sent.remote_file_ids


async def test_a_refused_send_is_a_permanent_error(backend: EmulatorBackend, tmp_path: Path) -> None:
    """A caption over 1,024 units, or an entity past its end, comes back as Telegram's error, permanent."""
    session = await _ready(backend, 2, "+9996622345")
    path = tmp_path / "a.pdf"
    path.write_bytes(b"abc")
    with pytest.raises(PermanentError, match="MEDIA_CAPTION_TOO_LONG"):
        await session.send("@bob", OutgoingMessage(FormattedText("x" * 1025), media=(_media(path),)))
    with pytest.raises(PermanentError, match="ENTITY_BOUNDS_INVALID"):
        await session.send("@bob", OutgoingMessage(FormattedText("hi", (Entity("bold", 0, 3),)), media=(_media(path),)))


async def test_incoming_media_is_injected_and_downloads_byte_for_byte(
        backend: EmulatorBackend, fresh_emulator: EmulatorHandle) -> None:
    """POST /control/incoming with a file pushes a media update; the account downloads the same bytes."""
    session = await _ready(backend, 3, "+9996632345")
    data = os.urandom(300_000)
    async with aiohttp.ClientSession() as http, http.post(f"{fresh_emulator.url}/control/incoming", json={
            "to_phone": "+9996632345", "sender": "@eve", "text": "a voice",
            "media": {"kind": "voice", "data": base64.b64encode(data).decode(), "mime_type": "audio/ogg",
                      "duration": 4}}) as response:
        update = await response.json()
    assert update["media"]["kind"] == "voice" and update["media"]["size"] == len(data)
    path = await session.download_file(update["media"]["file_ref"])
    assert path.read_bytes() == data
    with pytest.raises(PermanentError, match="FILE_REFERENCE_INVALID"):
        await session.download_file("emu-file-999-nope")
