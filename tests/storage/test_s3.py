"""storage/s3.py against a real S3 server (Ceph's radosgw): multipart boundaries, aborted uploads,
missing objects, and credentials the store refuses stopping a process at start."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from servers import ThrowawayRadosgw, run_async
from support import free_port

from telegram_platform.errors import PayloadTooLarge, ServiceUnavailable
from telegram_platform.settings import EXIT_CONFIG, S3_MIN_PART_SIZE, ConfigError
from telegram_platform.storage.files import BlobMissing, FileStore
from telegram_platform.storage.s3 import S3BlobStore

REPO = Path(__file__).resolve().parents[2]
PART = S3_MIN_PART_SIZE  # 5 MiB, S3's smallest part: the boundaries below are S3's own


async def chunks_of(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def object_etag(server: ThrowawayRadosgw, bucket: str, key: str) -> str:
    async def head() -> str:
        async with server.client() as client:
            return str((await client.head_object(Bucket=bucket, Key=key))["ETag"]).strip('"')

    return await asyncio.to_thread(run_async, head())


@pytest.mark.parametrize(("size", "parts"), [(0, 0), (PART - 1, 0), (PART, 1), (PART + 1, 2), (2 * PART + 17, 3)])
async def test_uploads_around_the_part_size_read_back_whole(db: asyncpg.Pool, s3_server: ThrowawayRadosgw,
                                                            s3_bucket: str, size: int, parts: int) -> None:
    """Below one part a file is one PUT; from one part on, a multipart upload of ceil(size/part)
    parts (S3's ETag of a multipart object ends in -<parts>); every size reads back byte for byte,
    with one object in the bucket and no upload left open."""
    data = os.urandom(size)
    async with S3BlobStore.connect(s3_server.settings(s3_bucket, part_size=PART)) as blobs:
        store = FileStore(db, blobs)
        row, created = await store.put(chunks_of(data), file_name="f.bin", mime_type=None, max_size=64 << 20,
                                       created_by=None)
        assert created and row["size"] == size and row["sha256"] == hashlib.sha256(data).hexdigest()
        assert b"".join([chunk async for chunk in await store.stream(row["id"])]) == data
        ref = await db.fetchval("SELECT blob_ref FROM files WHERE id = $1", row["id"])
        assert await db.fetchval("SELECT storage FROM files WHERE id = $1", row["id"]) == "s3"
    etag = await object_etag(s3_server, s3_bucket, ref)
    assert (etag.endswith(f"-{parts}") if parts else "-" not in etag), etag
    assert await asyncio.to_thread(s3_server.blobs_in, s3_bucket) == 1


async def test_an_upload_refused_after_parts_were_sent_leaves_no_upload_open(
        db: asyncpg.Pool, s3_server: ThrowawayRadosgw, s3_bucket: str) -> None:
    """Past max_size with two parts already in the store: the multipart upload is aborted, so
    neither an object nor its parts stay (nor a row)."""
    async with S3BlobStore.connect(s3_server.settings(s3_bucket, part_size=PART)) as blobs:
        with pytest.raises(PayloadTooLarge):
            await FileStore(db, blobs).put(chunks_of(os.urandom(3 * PART)), file_name="big", mime_type=None,
                                           max_size=2 * PART + 1000, created_by=None)
    assert await asyncio.to_thread(s3_server.blobs_in, s3_bucket) == 0
    assert await db.fetchval("SELECT count(*) FROM files") == 0


async def test_large_objects_stay_readable_after_a_switch_to_s3(db: asyncpg.Pool, s3_server: ThrowawayRadosgw,
                                                               s3_bucket: str) -> None:
    """A file stored as a large object before TP_FILE_STORE=s3 is still read (from PostgreSQL),
    while a new upload goes to the bucket; the purge deletes each from its own store."""
    old, _ = await FileStore(db).put(chunks_of(b"stored before the switch"), file_name="a", mime_type=None,
                                     max_size=1 << 20, created_by=None)
    async with S3BlobStore.connect(s3_server.settings(s3_bucket)) as blobs:
        store = FileStore(db, blobs)
        new, _ = await store.put(chunks_of(b"stored after it"), file_name="b", mime_type=None, max_size=1 << 20,
                                 created_by=None)
        assert b"".join([c async for c in await store.stream(old["id"])]) == b"stored before the switch"
        assert b"".join([c async for c in await store.stream(new["id"])]) == b"stored after it"
        assert await db.fetchval("SELECT count(*) FROM pg_largeobject_metadata") == 1
        assert await asyncio.to_thread(s3_server.blobs_in, s3_bucket) == 1
        await db.execute("UPDATE files SET last_used_at = now() - interval '40 days'")
        assert await store.purge_all(30) == 2
    assert await db.fetchval("SELECT count(*) FROM pg_largeobject_metadata") == 0
    assert await asyncio.to_thread(s3_server.blobs_in, s3_bucket) == 0


async def test_a_missing_object_is_blob_missing_naming_its_key(db: asyncpg.Pool, s3_server: ThrowawayRadosgw,
                                                               s3_bucket: str) -> None:
    """An object deleted outside the platform: stream() raises BlobMissing (the file id, the key and
    the bucket in it) before yielding anything; a process not configured for S3 cannot read an S3
    file and says which store it would need."""
    async with S3BlobStore.connect(s3_server.settings(s3_bucket)) as blobs:
        store = FileStore(db, blobs)
        row, _ = await store.put(chunks_of(b"soon gone"), file_name="x", mime_type=None, max_size=100,
                                 created_by=None)
        key = await db.fetchval("SELECT blob_ref FROM files WHERE id = $1", row["id"])
        await asyncio.to_thread(s3_server.delete_objects, s3_bucket)
        with pytest.raises(BlobMissing) as caught:
            await store.stream(row["id"])
    assert key in caught.value.message and s3_bucket in caught.value.message
    assert caught.value.details["file_id"] == row["id"] and caught.value.status == 500
    with pytest.raises(BlobMissing, match="TP_FILE_STORE"):
        await FileStore(db).stream(row["id"])


async def test_a_store_gone_after_start_is_503(db: asyncpg.Pool, s3_server: ThrowawayRadosgw, s3_bucket: str) -> None:
    """A bucket deleted after the process started: an upload answers ServiceUnavailable (503)
    naming the store, not a raw botocore error."""
    async with S3BlobStore.connect(s3_server.settings(s3_bucket)) as blobs:
        async def drop_bucket() -> None:
            async with s3_server.client() as client:
                await client.delete_bucket(Bucket=s3_bucket)

        await asyncio.to_thread(run_async, drop_bucket())
        with pytest.raises(ServiceUnavailable, match="S3 store"):
            await FileStore(db, blobs).put(chunks_of(b"nowhere to go"), file_name="x", mime_type=None,
                                           max_size=100, created_by=None)
    assert await db.fetchval("SELECT count(*) FROM files") == 0


@pytest.mark.parametrize(("change", "variable"), [
    ({"secret_access_key": "not-the-secret"}, "TP_S3_SECRET_ACCESS_KEY"),
    ({"access_key_id": "AKNOSUCHKEY0000"}, "TP_S3_ACCESS_KEY_ID"),
    ({"bucket": "tp-no-such-bucket"}, "TP_S3_BUCKET"),
    ({"endpoint": "closed-port"}, "TP_S3_ENDPOINT"),
])
async def test_a_store_that_refuses_is_a_config_error_naming_the_variable(
        s3_server: ThrowawayRadosgw, s3_bucket: str, change: dict[str, str], variable: str) -> None:
    """A wrong secret, an unknown key id, a missing bucket, an endpoint nobody listens on: connect()
    raises ConfigError naming the variable to fix, and never echoes the secret."""
    fields = {"bucket": s3_bucket, **change}
    if fields.get("endpoint") == "closed-port":
        fields["endpoint"] = f"http://127.0.0.1:{free_port()}"
    settings = s3_server.settings(**fields)
    with pytest.raises(ConfigError) as caught:
        async with S3BlobStore.connect(settings):
            pass
    assert caught.value.variable == variable, caught.value
    assert settings.secret_access_key not in str(caught.value)


@pytest.mark.parametrize("program", ["telegram_platform.cli.api", "telegram_platform.cli.worker"])
def test_a_process_stops_at_start_with_one_line_on_a_refused_secret(
        platform_env: dict[str, str], db: asyncpg.Pool, s3_server: ThrowawayRadosgw, s3_bucket: str,
        program: str) -> None:
    """tp-api, and tp-worker before it starts a child, configured with a secret the store refuses:
    exit EX_CONFIG with one line naming TP_S3_SECRET_ACCESS_KEY, before serving anything; the
    secret is not in it."""
    env = {**platform_env, **s3_server.env(s3_bucket), "TP_S3_SECRET_ACCESS_KEY": "wrong-secret-value"}
    result = subprocess.run([sys.executable, "-c", f"from {program} import main; main()"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_CONFIG, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.strip().splitlines() if "TP_S3" in line]
    assert len(errors) == 1 and "TP_S3_SECRET_ACCESS_KEY" in errors[0], result.stderr[-2000:]
    assert "wrong-secret-value" not in result.stderr + result.stdout


def test_tp_check_reports_the_store(tmp_path: Path, platform_env: dict[str, str], db: asyncpg.Pool,
                                    s3_server: ThrowawayRadosgw, s3_bucket: str) -> None:
    """`tp check`'s files line: ok naming the bucket with good credentials; FAIL naming the variable
    with a refused secret."""
    root = tmp_path / "deploy"
    (root / "var/run").mkdir(parents=True)
    shutil.copy(REPO / "supervisord.conf", root / "supervisord.conf")

    def files_line(**changes: str) -> str:
        env = {**platform_env, **s3_server.env(s3_bucket), "TP_VAR_DIR": str(root / "var"), **changes}
        result = subprocess.run([sys.executable, "-m", "telegram_platform.cli.tp", "check", "--conf",
                                 str(root / "supervisord.conf")], env=env, cwd=root, capture_output=True, text=True,
                                timeout=120, check=False)
        return next(line for line in result.stdout.splitlines() if line.split(":")[0].endswith(" files"))

    good = files_line()
    assert good.startswith("ok   files: S3 bucket") and s3_bucket in good, good
    bad = files_line(TP_S3_SECRET_ACCESS_KEY="wrong-secret-value")
    assert bad.startswith("FAIL files: TP_S3_SECRET_ACCESS_KEY:"), bad
