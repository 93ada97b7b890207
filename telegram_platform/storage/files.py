"""The file store: files clients upload and messages carry, de-duplicated by content.

A file's metadata is a `files` row; its bytes live in a `BlobStore`. The default, `PgLargeObjects`,
keeps them as PostgreSQL large objects: every host that may own an account reaches the database
already, so nothing else needs to be set up. A blob is written inside the transaction that inserts
its row, so an upload that fails (too large, the client gone) leaves nothing behind, and a second
upload of the same bytes gets the first file's id (its own blob rolled back). With TP_FILE_STORE=s3
the bytes go to an S3-compatible object store instead (storage/s3.py), which deletes its object
itself when the upload fails or was a duplicate; the row records which store holds each file, so
files stored before a switch stay readable.

Telegram's own ids of a file, once an account sent it, are kept per account (`file_remote_ids`), so
that account's later sends reuse them instead of uploading again. Files unused for the retention
period are purged in batches by the worker, never one that a message still waiting to be sent carries.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import asyncpg
import structlog

from ..errors import NotFound, PayloadTooLarge, PlatformError
from ..settings import FileSettings
from .db import Queryable

log = structlog.get_logger(__name__)

# Bytes written or read per round trip to the blob store: small enough to keep a 20 MB upload's
# memory flat, large enough that round trips do not dominate (docs/performance.md).
CHUNK_SIZE: Final = 256 * 1024
# Bytes read per round trip: reads cost PostgreSQL less per byte than writes, so larger pieces pay.
READ_CHUNK_SIZE: Final = 1024 * 1024
PURGE_BATCH: Final = 100
FILE_COLUMNS: Final = ("id, sha256, size, mime_type, file_name, width, height, duration, created_by, "
                       "created_at, last_used_at")
DEFAULT_MIME_TYPE: Final = "application/octet-stream"


class BlobStore(Protocol):
    """Where a file's bytes live, named by a `ref` the store chooses. `conn` is the connection whose
    transaction writes the file's row: a store inside PostgreSQL writes in it (a rollback removes
    the blob: `transactional`); a store outside it (S3) ignores it and deletes the blob itself when
    `discard` is called. `name` is what the row's `storage` column records."""

    name: str
    transactional: bool

    async def create(self, conn: asyncpg.Connection) -> str: ...

    async def append(self, conn: asyncpg.Connection, ref: str, offset: int, chunk: bytes) -> None: ...

    async def finish(self, conn: asyncpg.Connection, ref: str, size: int) -> None:
        """Every byte was appended: the blob is whole and readable once this returns."""

    async def discard(self, conn: asyncpg.Connection, ref: str) -> None:
        """The upload that created `ref` failed (finished or not), or its bytes were a duplicate."""

    async def reader(self, conn: Queryable, ref: str, size: int, chunk_size: int) -> AsyncIterator[bytes]:
        """The blob's bytes in pieces of about `chunk_size`; a blob that is gone raises BlobMissing
        here, before the first piece."""

    async def delete(self, conn: Queryable, ref: str) -> None: ...


class BlobMissing(PlatformError):
    """A file's row names a blob its store no longer has (deleted behind the platform's back, or a
    store that is not this one): a fault of the deployment, not of the request."""

    code = "file_content_missing"


class PgLargeObjects:
    """Blobs as PostgreSQL large objects (`ref` is the oid). lo_put and lo_get address a large
    object by offset, so no descriptor has to stay open between round trips."""

    name = "pg"
    transactional = True

    async def create(self, conn: asyncpg.Connection) -> str:
        return str(await conn.fetchval("SELECT lo_create(0)"))

    async def append(self, conn: asyncpg.Connection, ref: str, offset: int, chunk: bytes) -> None:
        await conn.execute("SELECT lo_put($1::oid, $2, $3)", int(ref), offset, chunk)

    async def finish(self, conn: asyncpg.Connection, ref: str, size: int) -> None:
        pass  # every lo_put is in the large object already

    async def discard(self, conn: asyncpg.Connection, ref: str) -> None:
        pass  # the rolled-back transaction takes the large object with it

    async def reader(self, conn: Queryable, ref: str, size: int, chunk_size: int) -> AsyncIterator[bytes]:
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_largeobject_metadata WHERE oid = $1::oid)",
                                   int(ref)):
            raise BlobMissing(f"large object {ref} is gone (unlinked outside the platform?)",
                              details={"storage": self.name, "ref": ref})
        return self._pieces(conn, ref, size, chunk_size)

    async def _pieces(self, conn: Queryable, ref: str, size: int, chunk_size: int) -> AsyncIterator[bytes]:
        offset = 0
        while offset < size:
            chunk: bytes | None = await conn.fetchval("SELECT lo_get($1::oid, $2, $3)", int(ref), offset,
                                                      min(chunk_size, size - offset))
            if not chunk:
                break
            yield chunk
            offset += len(chunk)

    async def delete(self, conn: Queryable, ref: str) -> None:
        await conn.execute("SELECT lo_unlink($1::oid) WHERE EXISTS "
                           "(SELECT 1 FROM pg_largeobject_metadata WHERE oid = $1::oid)", int(ref))


@dataclass(frozen=True, slots=True)
class Dimensions:
    width: int
    height: int


def image_dimensions(head: bytes) -> Dimensions | None:
    """Width and height of a PNG, GIF or JPEG from its first bytes, when they say (else None)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24 and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return Dimensions(width, height)
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        width, height = struct.unpack("<HH", head[6:10])
        return Dimensions(width, height)
    if head.startswith(b"\xff\xd8"):
        i = 2
        while i + 9 < len(head):
            if head[i] != 0xFF:
                return None
            marker = head[i + 1]
            length = int.from_bytes(head[i + 2:i + 4], "big")
            # Start-of-frame markers (baseline, progressive, ...) carry the size; C4, C8, CC do not.
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", head[i + 5:i + 9])
                return Dimensions(width, height)
            i += 2 + length
    return None


def guess_mime_type(declared: str | None, file_name: str) -> str:
    """The part's own Content-Type, unless it is missing or generic; then the file name's."""
    if declared and declared.split(";")[0].strip().lower() != DEFAULT_MIME_TYPE:
        return declared.split(";")[0].strip().lower()
    guessed, _ = mimetypes.guess_type(file_name)
    return guessed or DEFAULT_MIME_TYPE


def clean_file_name(name: str | None) -> str:
    """The client's file name without any directory part or control characters (never a path here)."""
    base = os.path.basename((name or "").replace("\\", "/"))
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:255] or "file"


@asynccontextmanager
async def open_blob_store(files: FileSettings) -> AsyncIterator[BlobStore]:
    """The store TP_FILE_STORE names, open for the process's life (an S3 client is checked against
    its bucket first: ConfigError naming the variable when the store refuses it)."""
    if files.s3 is None:
        yield PgLargeObjects()
        return
    from .s3 import S3BlobStore  # botocore costs a third of a second to import: only when configured

    async with S3BlobStore.connect(files.s3) as store:
        yield store


class FileStore:
    """File metadata in PostgreSQL, bytes in `blobs` (new files), or in the store a row names."""

    def __init__(self, pool: asyncpg.Pool, blobs: BlobStore | None = None) -> None:
        self.pool = pool
        self.blobs: BlobStore = blobs or PgLargeObjects()
        # Large objects stay readable after a switch to S3: they need nothing but the database.
        self._stores: dict[str, BlobStore] = {PgLargeObjects.name: PgLargeObjects(), self.blobs.name: self.blobs}

    def store_of(self, name: str) -> BlobStore:
        """The store a row's `storage` names."""
        store = self._stores.get(name)
        if store is None:
            raise BlobMissing(f"the file's bytes are in the {name!r} store, which this process is not configured "
                              "for (TP_FILE_STORE)", details={"storage": name})
        return store

    async def put(self, chunks: AsyncIterator[bytes], *, file_name: str, mime_type: str | None,
                  max_size: int, created_by: int | None) -> tuple[dict[str, Any], bool]:
        """Store what `chunks` yields, hashing it as it goes (never whole in memory).

        Returns (file, created): the same bytes stored before give the first file's row, its
        `last_used_at` refreshed. PayloadTooLarge past `max_size` bytes, with nothing kept."""
        digest = hashlib.sha256()
        size = 0
        head = b""
        async with self.pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            ref: str | None = None
            try:
                ref = await self.blobs.create(conn)
                async for chunk in chunks:
                    if not chunk:
                        continue
                    if size + len(chunk) > max_size:
                        raise PayloadTooLarge(f"the file is larger than {max_size} bytes",
                                              details={"field": "file", "max_bytes": max_size})
                    if len(head) < 64 * 1024:
                        head += chunk[:64 * 1024 - len(head)]
                    digest.update(chunk)
                    await self.blobs.append(conn, ref, size, chunk)
                    size += len(chunk)
                await self.blobs.finish(conn, ref, size)
                sha256 = digest.hexdigest()
                dimensions = image_dimensions(head)
                row = await conn.fetchrow(
                    f"""INSERT INTO files (sha256, size, mime_type, file_name, width, height, storage, blob_ref,
                                           created_by)
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                        ON CONFLICT (sha256) DO NOTHING RETURNING {FILE_COLUMNS}""",
                    sha256, size, guess_mime_type(mime_type, file_name), clean_file_name(file_name),
                    dimensions.width if dimensions else None, dimensions.height if dimensions else None,
                    self.blobs.name, ref, created_by)
            except BaseException:
                await transaction.rollback()
                if ref is not None:
                    await self._discard(conn, ref)
                raise
            if row is not None:
                await transaction.commit()
                return dict(row), True
            # The same bytes are stored already (before, or by a concurrent upload that won the race).
            await transaction.rollback()
            await self._discard(conn, ref)
            existing = await conn.fetchrow(
                f"UPDATE files SET last_used_at = now() WHERE sha256 = $1 RETURNING {FILE_COLUMNS}", sha256)
        if existing is None:  # purged between the conflict and this read: store it again
            raise RuntimeError("a duplicate file vanished during its upload")  # pragma: no cover
        return dict(existing), False

    async def _discard(self, conn: asyncpg.Connection, ref: str) -> None:
        """The blob of a failed or duplicate upload goes; a store that cannot delete it now (S3 gone)
        leaves an object no row names, and the upload's own outcome (its error, or the first file)
        is still what the caller gets."""
        try:
            await self.blobs.discard(conn, ref)
        except PlatformError as exc:
            log.warning("file upload: blob left behind", storage=self.blobs.name, ref=ref, error=exc.message)

    async def get(self, file_id: int, conn: Queryable | None = None) -> dict[str, Any]:
        row = await (conn or self.pool).fetchrow(f"SELECT {FILE_COLUMNS} FROM files WHERE id = $1", file_id)
        if row is None:
            raise NotFound(f"file {file_id} not found", details={"file_id": file_id})
        return dict(row)

    @staticmethod
    async def existing_in(conn: Queryable, file_ids: list[int]) -> dict[int, dict[str, Any]]:
        """The rows of those of `file_ids` that exist, by id."""
        rows = await conn.fetch(f"SELECT {FILE_COLUMNS} FROM files WHERE id = ANY($1::bigint[])", file_ids)
        return {row["id"]: dict(row) for row in rows}

    async def touch(self, file_ids: list[int], conn: Queryable | None = None) -> None:
        """The files were used (sent, downloaded): retention counts from now."""
        await (conn or self.pool).execute(
            "UPDATE files SET last_used_at = now() WHERE id = ANY($1::bigint[])", file_ids)

    async def stream(self, file_id: int, *, chunk_size: int = READ_CHUNK_SIZE) -> AsyncIterator[bytes]:
        """The file's bytes, chunk by chunk (NotFound before the first if there is no such file)."""
        row = await self.pool.fetchrow("SELECT size, storage, blob_ref FROM files WHERE id = $1", file_id)
        if row is None:
            raise NotFound(f"file {file_id} not found", details={"file_id": file_id})
        try:
            return await self.store_of(row["storage"]).reader(self.pool, row["blob_ref"], row["size"], chunk_size)
        except BlobMissing as exc:
            exc.details["file_id"] = file_id
            raise

    async def copy_to(self, file_id: int, path: Path) -> Path:
        """Write the file to `path` (through a temporary name beside it, so no reader sees half)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as out:
                async for chunk in await self.stream(file_id):
                    out.write(chunk)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    async def local_path(self, file_id: int, sha256: str, cache_dir: Path) -> Path:
        """A local copy of the file on this host, named by its content: filled once from the store,
        shared by every send of it from this host."""
        path = cache_dir / sha256[:2] / sha256
        if path.exists():
            return path
        return await self.copy_to(file_id, path)

    # -- Telegram's ids of a file, per account ----------------------------------------------------

    async def remote_ids(self, account_id: int, file_ids: list[int]) -> dict[int, str]:
        rows = await self.pool.fetch(
            "SELECT file_id, remote_id FROM file_remote_ids WHERE account_id = $1 AND file_id = ANY($2::bigint[])",
            account_id, file_ids)
        return {row["file_id"]: row["remote_id"] for row in rows}

    async def record_remote_ids(self, account_id: int, remote_ids: dict[int, str]) -> None:
        """Telegram's ids of files `account_id` sent (file id -> remote id); a newer id replaces an older."""
        if not remote_ids:
            return
        await self.pool.execute(
            """INSERT INTO file_remote_ids (file_id, account_id, remote_id)
               SELECT f, $1, r FROM unnest($2::bigint[], $3::text[]) AS t(f, r)
               WHERE EXISTS (SELECT 1 FROM files WHERE id = f)
               ON CONFLICT (file_id, account_id) DO UPDATE SET remote_id = EXCLUDED.remote_id""",
            account_id, list(remote_ids), list(remote_ids.values()))

    async def forget_remote_id(self, account_id: int, file_id: int) -> None:
        """Telegram no longer knows the id (FILE_REFERENCE_EXPIRED and kin): upload again next time."""
        await self.pool.execute("DELETE FROM file_remote_ids WHERE account_id = $1 AND file_id = $2",
                                account_id, file_id)

    # -- retention ---------------------------------------------------------------------------------

    async def purge(self, retention_days: float, *, batch: int = PURGE_BATCH) -> int:
        """Delete up to `batch` files unused for `retention_days`, never one a queued or sending
        message carries, nor one of a campaign that may still send; returns how many went. Rows
        and large objects go together, in one transaction; an object outside PostgreSQL (S3) goes
        once the rows' deletion committed (a failure then leaves an object no row names, never a row
        without its bytes)."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """DELETE FROM files WHERE id IN (
                       SELECT f.id FROM files f
                       WHERE f.last_used_at < now() - make_interval(secs => $1)
                         AND NOT EXISTS (SELECT 1 FROM message_files mf JOIN messages m ON m.id = mf.message_id
                                         WHERE mf.file_id = f.id AND m.status IN ('queued', 'sending'))
                         AND NOT EXISTS (SELECT 1 FROM campaign_files cf JOIN campaigns c ON c.id = cf.campaign_id
                                         WHERE cf.file_id = f.id
                                           AND c.status IN ('draft', 'scheduled', 'running', 'paused'))
                       ORDER BY f.last_used_at LIMIT $2
                       FOR UPDATE OF f SKIP LOCKED)
                   RETURNING id, storage, blob_ref""",
                retention_days * 86_400.0, batch)
            outside = []
            for row in rows:
                store = self._stores.get(row["storage"])
                if store is not None and store.transactional:
                    await store.delete(conn, row["blob_ref"])
                elif store is not None:
                    outside.append((store, row["blob_ref"]))
        for store, ref in outside:
            try:
                await store.delete(self.pool, ref)
            except PlatformError as exc:
                log.warning("file purge: blob left behind", storage=store.name, ref=ref, error=exc.message)
        if rows:
            log.info("files purged", count=len(rows), retention_days=retention_days)
        return len(rows)

    async def purge_all(self, retention_days: float, *, batch: int = PURGE_BATCH) -> int:
        """`purge` batch after batch until nothing is left to purge."""
        total = 0
        while (count := await self.purge(retention_days, batch=batch)) > 0:
            total += count
            if count < batch:
                break
        return total
