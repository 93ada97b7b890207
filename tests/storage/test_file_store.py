"""storage/files.py: uploads streamed into the blob store, de-duplicated, read back, purged; each
store-bound test runs against PostgreSQL large objects and against a real S3 server (radosgw)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from telegram_platform.errors import NotFound, PayloadTooLarge
from telegram_platform.settings import Settings
from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import outbox as outbox_store
from telegram_platform.storage.files import (
    FileStore,
    clean_file_name,
    guess_mime_type,
    image_dimensions,
    open_blob_store,
)


async def chunks_of(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def png(width: int, height: int) -> bytes:
    """A valid PNG of this size (one grey row repeated), as a camera would not make but a parser reads."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


async def large_objects(db: asyncpg.Pool) -> int:
    return int(await db.fetchval("SELECT count(*) FROM pg_largeobject_metadata"))


@dataclass(frozen=True)
class Files:
    """A FileStore over the store under test, and how many blobs that store holds."""

    store: FileStore
    blobs: Callable[[], Awaitable[int]]


@pytest.fixture
async def files(db: asyncpg.Pool, platform_env: dict[str, str], file_store_env: dict[str, str],
                request: pytest.FixtureRequest) -> AsyncIterator[Files]:
    """The file store as a process opens it from TP_FILE_STORE: large objects, then radosgw."""
    settings = Settings.from_env({**platform_env, **file_store_env})
    async with open_blob_store(settings.files) as blobs:
        if settings.files.s3 is None:
            yield Files(FileStore(db, blobs), lambda: large_objects(db))
        else:
            server, bucket = request.getfixturevalue("s3_server"), settings.files.s3.bucket
            yield Files(FileStore(db, blobs), lambda: asyncio.to_thread(server.blobs_in, bucket))


async def test_an_upload_is_stored_and_reads_back_byte_for_byte(files: Files) -> None:
    """A 3 MB upload in chunks becomes one row (size, sha256, mime type) and one blob, and reads back identical."""
    store = files.store
    data = os.urandom(3 * 1024 * 1024 + 17)
    row, created = await store.put(chunks_of(data), file_name="../../etc/report.pdf", mime_type=None,
                                   max_size=10 << 20, created_by=None)
    assert created
    assert row["size"] == len(data) and row["sha256"] == hashlib.sha256(data).hexdigest()
    assert row["file_name"] == "report.pdf" and row["mime_type"] == "application/pdf"
    read = b"".join([chunk async for chunk in await store.stream(row["id"])])
    assert read == data
    assert await files.blobs() == 1


async def test_the_same_bytes_give_the_same_file(db: asyncpg.Pool, files: Files) -> None:
    """A second upload of identical bytes returns the first file's id and keeps one blob."""
    store = files.store
    data = os.urandom(500_000)
    first, created = await store.put(chunks_of(data), file_name="a.bin", mime_type=None, max_size=1 << 20,
                                     created_by=None)
    second, created_again = await store.put(chunks_of(data, 7_000), file_name="b.bin", mime_type=None,
                                            max_size=1 << 20, created_by=None)
    assert created and not created_again
    assert second["id"] == first["id"]
    assert await files.blobs() == 1
    assert await db.fetchval("SELECT count(*) FROM files") == 1


async def test_an_upload_past_the_limit_leaves_nothing(db: asyncpg.Pool, files: Files) -> None:
    """Past max_size the upload is refused (413) and neither a row nor a blob remains."""
    store = files.store
    with pytest.raises(PayloadTooLarge):
        await store.put(chunks_of(os.urandom(300_000)), file_name="big", mime_type=None, max_size=200_000,
                        created_by=None)
    assert await db.fetchval("SELECT count(*) FROM files") == 0
    assert await files.blobs() == 0


async def test_image_dimensions_are_read_from_the_header(db: asyncpg.Pool) -> None:
    """A PNG's width and height are recorded; GIF and JPEG headers are read too; other bytes give none."""
    row, _ = await FileStore(db).put(chunks_of(png(33, 21)), file_name="p.png", mime_type="image/png",
                                     max_size=1 << 20, created_by=None)
    assert (row["width"], row["height"], row["mime_type"]) == (33, 21, "image/png")
    gif = b"GIF89a" + struct.pack("<HH", 640, 480) + b"\x00" * 10
    gif_dims = image_dimensions(gif)
    assert gif_dims is not None and (gif_dims.width, gif_dims.height) == (640, 480)
    jpeg = (b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
            + b"\xff\xc0" + struct.pack(">HBHH", 17, 8, 200, 300) + b"\x00" * 12)
    dims = image_dimensions(jpeg)
    assert dims is not None and (dims.width, dims.height) == (300, 200)
    assert image_dimensions(b"plain text") is None


def test_names_and_types_are_cleaned() -> None:
    """A client's file name loses its directories and control characters; a generic type is guessed."""
    assert clean_file_name("C:\\Users\\x\\photo.jpg") == "photo.jpg"
    assert clean_file_name("a\x00b\nc.txt") == "abc.txt"
    assert clean_file_name("") == "file"
    assert guess_mime_type("application/octet-stream", "x.png") == "image/png"
    assert guess_mime_type("Image/JPEG; q=1", "x.bin") == "image/jpeg"
    assert guess_mime_type(None, "noext") == "application/octet-stream"


async def test_remote_ids_are_kept_per_account(db: asyncpg.Pool) -> None:
    """A remote id recorded for one account is found for it only, replaced by a newer one, and forgotten."""
    store = FileStore(db)
    row, _ = await store.put(chunks_of(b"abc"), file_name="a", mime_type=None, max_size=100, created_by=None)
    one = (await account_store.create_account(db, "+9996610301", None))["id"]
    two = (await account_store.create_account(db, "+9996610302", None))["id"]
    await store.record_remote_ids(one, {row["id"]: "remote-1"})
    await store.record_remote_ids(one, {row["id"]: "remote-2", 999_999: "no such file"})
    assert await store.remote_ids(one, [row["id"]]) == {row["id"]: "remote-2"}
    assert await store.remote_ids(two, [row["id"]]) == {}
    await store.forget_remote_id(one, row["id"])
    assert await store.remote_ids(one, [row["id"]]) == {}


async def test_a_local_copy_is_made_once(files: Files, tmp_path: Path) -> None:
    """local_path writes the file under the cache named by its hash, and reuses that copy."""
    store = files.store
    data = os.urandom(700_000)
    row, _ = await store.put(chunks_of(data), file_name="v.mp4", mime_type=None, max_size=1 << 20, created_by=None)
    path = await store.local_path(row["id"], row["sha256"], tmp_path)
    assert path.read_bytes() == data and path.name == row["sha256"]
    mtime = path.stat().st_mtime_ns
    assert await store.local_path(row["id"], row["sha256"], tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [row["sha256"]]  # no temporary file left


async def test_purge_deletes_unused_files_but_not_those_a_waiting_message_carries(db: asyncpg.Pool,
                                                                                  files: Files) -> None:
    """Files unused past retention go (rows and blobs), in batches; one a queued message
    carries stays, as do one a draft campaign carries and one used recently."""
    store = files.store
    ids = []
    for i in range(5):
        row, _ = await store.put(chunks_of(b"file %d" % i), file_name="f", mime_type=None, max_size=100,
                                 created_by=None)
        ids.append(row["id"])
    await db.execute("UPDATE files SET last_used_at = now() - interval '40 days' WHERE id = ANY($1::bigint[])",
                     ids[:4])
    account = (await account_store.create_account(db, "+9996610303", None))["id"]
    message, _ = await outbox_store.create_message(db, account_id=account, peer="@p", text="t",
                                                   idempotency_key=None, created_by=None)
    await db.execute("INSERT INTO message_files (message_id, position, file_id, kind) VALUES ($1, 0, $2, 'photo')",
                     message["id"], ids[0])
    campaign = int(await db.fetchval("INSERT INTO campaigns (name, template) VALUES ('c', 'hi') RETURNING id"))
    await db.execute("INSERT INTO campaign_files (campaign_id, position, file_id, kind) VALUES ($1, 0, $2, 'photo')",
                     campaign, ids[1])
    assert await store.purge(30, batch=1) == 1
    assert await store.purge_all(30, batch=1) == 1
    left = sorted(r["id"] for r in await db.fetch("SELECT id FROM files"))
    assert left == [ids[0], ids[1], ids[4]]
    assert await files.blobs() == 3
    await db.execute("UPDATE messages SET status = 'sent' WHERE id = $1", message["id"])
    await db.execute("UPDATE campaigns SET status = 'completed' WHERE id = $1", campaign)
    assert await store.purge_all(30) == 2
    assert await files.blobs() == 1
    with pytest.raises(NotFound):
        await store.get(ids[0])
