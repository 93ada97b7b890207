"""POST /api/files, GET /api/files/{id} and its content: streamed uploads and downloads, limits, roles;
every test runs once per file store (TP_FILE_STORE): PostgreSQL large objects, then radosgw (S3)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import asyncpg
import pytest
from support import ApiClient

from telegram_platform.settings import Settings

MB = 1 << 20


@pytest.fixture
def platform_env(platform_env: dict[str, str], file_store_env: dict[str, str]) -> dict[str, str]:
    """The API's environment, with the file store under test."""
    return {**platform_env, **file_store_env}


@pytest.fixture
def blobs(settings: Settings, db: asyncpg.Pool, request: pytest.FixtureRequest) -> Callable[[], Awaitable[int]]:
    """How many blobs the store under test holds (S3: objects and unfinished multipart uploads)."""
    s3 = settings.files.s3
    if s3 is None:
        return lambda: db.fetchval("SELECT count(*) FROM pg_largeobject_metadata")
    server = request.getfixturevalue("s3_server")
    return lambda: asyncio.to_thread(server.blobs_in, s3.bucket)


def form(data: bytes | AsyncIterator[bytes], name: str = "photo.jpg", content_type: str = "image/jpeg",
         field: str = "file") -> aiohttp.FormData:
    body = aiohttp.FormData()
    body.add_field(field, data, filename=name, content_type=content_type)
    return body


async def upload(api: ApiClient, token: str, data: bytes, **kwargs: str) -> tuple[int, dict[str, object]]:
    status, body = await api.call("POST", "/api/files", token, data=form(data, **kwargs))
    return status, body


async def test_an_upload_returns_its_id_and_downloads_byte_for_byte(api: ApiClient, db: asyncpg.Pool) -> None:
    """201 with id, size, sha256 and type; the metadata and the streamed content read back the same."""
    token = await api.user_token("op", "operator", db)
    data = os.urandom(2 * MB + 3)
    status, body = await upload(api, token, data, name="holiday.jpg")
    assert status == 201, body
    assert body["size"] == len(data) and body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["mime_type"] == "image/jpeg" and body["file_name"] == "holiday.jpg"
    status, meta = await api.call("GET", f"/api/files/{body['id']}", token)
    assert status == 200 and meta == body
    async with api.client.get(f"/api/files/{body['id']}/content",
                              headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/jpeg"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Content-Disposition"].startswith("attachment;")
        assert response.content_length == len(data)
        assert await response.read() == data


async def test_the_same_bytes_give_the_same_id(api: ApiClient, db: asyncpg.Pool) -> None:
    """Uploading identical content twice (under another name) answers the first file's id."""
    token = await api.user_token("op", "operator", db)
    data = os.urandom(100_000)
    _, first = await upload(api, token, data, name="a.png", content_type="image/png")
    status, second = await upload(api, token, data, name="b.png", content_type="image/png")
    assert status == 201 and second["id"] == first["id"]
    assert await db.fetchval("SELECT count(*) FROM files") == 1


async def test_an_upload_past_the_limit_is_413_and_leaves_nothing(api: ApiClient, db: asyncpg.Pool,
                                                                  blobs: Callable[[], Awaitable[int]]) -> None:
    """A 60 MB upload (over the 50 MB default) gets 413 in the error shape, whether its length is
    declared or streamed chunked (S3: after several parts were sent); no row and no blob is left."""
    token = await api.user_token("op", "operator", db)
    status, body = await upload(api, token, b"\0" * (60 * MB), name="big.bin", content_type="application/octet-stream")
    assert status == 413, body
    assert body["error"]["code"] == "payload_too_large" and body["error"]["details"]["field"] == "file"

    async def chunked() -> AsyncIterator[bytes]:
        block = os.urandom(MB)
        for _ in range(60):
            yield block

    status, body = await api.call("POST", "/api/files", token, data=form(chunked(), name="big.bin"))
    assert status == 413, body
    assert body["error"]["code"] == "payload_too_large"
    assert await db.fetchval("SELECT count(*) FROM files") == 0
    assert await blobs() == 0


async def test_bad_uploads_are_refused_with_the_field_named(api: ApiClient, db: asyncpg.Pool) -> None:
    """A JSON body is 415; a multipart body without a `file` part is 422 naming `file`."""
    token = await api.user_token("op", "operator", db)
    status, body = await api.call("POST", "/api/files", token, json={"file": "x"})
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"
    status, body = await api.call("POST", "/api/files", token, data=form(b"abc", field="other"))
    assert status == 422, body
    assert body["error"]["details"]["errors"][0]["field"] == "file"


async def test_roles_are_those_of_messages(api: ApiClient, db: asyncpg.Pool) -> None:
    """A viewer may read files but not upload; no token is 401; an unknown id is 404."""
    operator = await api.user_token("op", "operator", db)
    viewer = await api.user_token("viewer", "viewer", db)
    _, body = await upload(api, operator, b"hello")
    status, _ = await upload(api, viewer, b"hello again")
    assert status == 403
    assert (await api.call("GET", f"/api/files/{body['id']}", viewer))[0] == 200
    assert (await api.call("GET", f"/api/files/{body['id']}/content", viewer))[0] == 200
    assert (await api.call("GET", f"/api/files/{body['id']}"))[0] == 401
    assert (await api.call("GET", "/api/files/999999", viewer))[0] == 404
    assert (await api.call("GET", "/api/files/999999/content", viewer))[0] == 404


async def test_a_file_whose_bytes_vanished_is_a_clear_error(api: ApiClient, db: asyncpg.Pool, settings: Settings,
                                                           request: pytest.FixtureRequest) -> None:
    """Bytes deleted from the store behind the platform's back (a large object unlinked, an S3 object
    deleted): the download answers 500 `file_content_missing` in the error shape, naming the file,
    before any byte of a body; the metadata still reads."""
    token = await api.user_token("op", "operator", db)
    _, body = await upload(api, token, os.urandom(300_000))
    if settings.files.s3 is None:
        await db.execute("SELECT lo_unlink(oid) FROM pg_largeobject_metadata")
    else:
        await asyncio.to_thread(request.getfixturevalue("s3_server").delete_objects, settings.files.s3.bucket)
    status, error = await api.call("GET", f"/api/files/{body['id']}/content", token)
    assert status == 500, error
    assert error["error"]["code"] == "file_content_missing"
    assert error["error"]["details"]["file_id"] == body["id"]
    assert (await api.call("GET", f"/api/files/{body['id']}", token))[0] == 200
