"""The files' bytes in an S3-compatible object store (TP_FILE_STORE=s3): AWS S3, Ceph's radosgw, MinIO.

Only the bytes move: the `files` rows (hash, size, type, Telegram's ids, retention) stay in
PostgreSQL, and a row's `blob_ref` is its object's key. An upload is sent as it arrives, one part
of TP_S3_PART_SIZE at a time (S3's multipart upload; one PUT when the whole file fits in a part).
A part is gathered in an anonymous temporary file, not in memory: S3 wants each part's length
before its first byte, parts are at least 5 MiB, and an upload must not cost the API process its
size in memory (docs/performance.md). S3 cannot take part in the transaction
that inserts the row, so the object is written first and deleted again (`discard`) when the
upload fails or its bytes were already stored; a process killed mid-upload leaves an incomplete
multipart upload, which the bucket's AbortIncompleteMultipartUpload lifecycle rule clears
(docs/deployment.md).

The client is aiobotocore's (botocore's signing, retries and error model on aiohttp):
https://aiobotocore.aio-libs.org/ and https://docs.aws.amazon.com/AmazonS3/latest/API/.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Final

import asyncpg
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..errors import ServiceUnavailable
from ..settings import ConfigError, S3Settings
from .db import Queryable
from .files import BlobMissing

# Every object the platform writes is under this prefix: the bucket may hold other things.
KEY_PREFIX: Final = "files/"
CONNECT_TIMEOUT: Final = 5.0
READ_TIMEOUT: Final = 60.0
MAX_ATTEMPTS: Final = 3
_MISSING_CODES: Final = frozenset({"NoSuchKey", "NotFound", "404"})


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "") or "")


@dataclass(slots=True)
class _Upload:
    """An upload in progress: the bytes not yet sent as a part (in `spool`), and the parts sent."""

    spool: IO[bytes] = field(default_factory=tempfile.TemporaryFile)
    spooled: int = 0
    upload_id: str | None = None
    parts: list[dict[str, Any]] = field(default_factory=list)


class S3BlobStore:
    """`BlobStore` over one bucket. Open it with `S3BlobStore.connect(settings)`, once per process."""

    name = "s3"
    transactional = False

    def __init__(self, client: Any, settings: S3Settings) -> None:
        self._client = client  # aiobotocore's S3 client (untyped: its methods are generated at run time)
        self._bucket = settings.bucket
        self._part_size = settings.part_size
        self._endpoint = settings.endpoint or f"AWS ({settings.region})"
        self._uploads: dict[str, _Upload] = {}

    @classmethod
    @asynccontextmanager
    async def connect(cls, settings: S3Settings) -> AsyncIterator[S3BlobStore]:
        """A client for the process's life, checked against the bucket first: ConfigError naming
        the variable to fix when the store refuses the credentials, has no such bucket or cannot be
        reached."""
        config = Config(
            region_name=settings.region,
            s3={"addressing_style": settings.addressing_style},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            # Checksums only where S3 requires them: the newer default (a CRC32 trailer on every
            # upload) is not understood by every S3-compatible store; SigV4 signs the payload anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(get_session().create_client(
                "s3", endpoint_url=settings.endpoint, aws_access_key_id=settings.access_key_id,
                aws_secret_access_key=settings.secret_access_key, config=config))
            store = cls(client, settings)
            await store.verify()
            yield store

    async def verify(self) -> str:
        """HEAD the bucket; on a refusal, a listing tells which credential is wrong (a HEAD answer
        has no body to say it). A line for `tp check` when all is well."""
        try:
            await self._client.head_bucket(Bucket=self._bucket)
        except ClientError as exc:
            code = _code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise ConfigError("TP_S3_BUCKET", f"{self._endpoint} has no bucket {self._bucket!r} "
                                                  "(create it first)") from None
            if code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
                raise ConfigError("TP_S3_REGION", f"bucket {self._bucket!r} is in another region "
                                                  f"(the store answered {code})") from None
            if code in ("403", "AccessDenied"):
                raise await self._refusal() from None
            raise ConfigError("TP_S3_ENDPOINT", f"{self._endpoint} answered {code or exc} to a HEAD of "
                                                f"bucket {self._bucket!r}") from None
        except BotoCoreError as exc:
            raise ConfigError("TP_S3_ENDPOINT", f"cannot reach {self._endpoint} ({type(exc).__name__}: "
                                                f"{_first_line(exc)})") from None
        return f"bucket {self._bucket!r} at {self._endpoint}: credentials accepted"

    async def _refusal(self) -> ConfigError:
        try:
            await self._client.list_objects_v2(Bucket=self._bucket, MaxKeys=1, Prefix=KEY_PREFIX)
        except ClientError as exc:
            code = _code(exc)
        except BotoCoreError as exc:
            code = type(exc).__name__
        else:
            code = "AccessDenied to HeadBucket"
        if code == "InvalidAccessKeyId":
            return ConfigError("TP_S3_ACCESS_KEY_ID", f"{self._endpoint} knows no such key id (InvalidAccessKeyId)")
        if code == "SignatureDoesNotMatch":
            return ConfigError("TP_S3_SECRET_ACCESS_KEY", f"{self._endpoint} refused the signature: the secret "
                                                          "does not belong to TP_S3_ACCESS_KEY_ID "
                                                          "(SignatureDoesNotMatch)")
        return ConfigError("TP_S3_ACCESS_KEY_ID", f"{self._endpoint} refused access to bucket {self._bucket!r} "
                                                  f"with these credentials ({code})")

    @contextmanager
    def _answers(self, what: str, key: str) -> Iterator[None]:
        """The store's failures as the platform's: a missing object is BlobMissing, anything else
        (refused, unreachable, timed out after botocore's retries) ServiceUnavailable."""
        try:
            yield
        except ClientError as exc:
            code = _code(exc)
            if code in _MISSING_CODES:
                raise BlobMissing(f"the S3 store has no object {key!r} in bucket {self._bucket!r} (deleted outside "
                                  "the platform?)", details={"storage": self.name, "key": key}) from None
            raise ServiceUnavailable(f"the S3 store refused to {what} ({code or 'no error code'})",
                                     details={"storage": self.name}) from None
        except BotoCoreError as exc:
            raise ServiceUnavailable(f"the S3 store could not {what} ({type(exc).__name__})",
                                     details={"storage": self.name}) from None

    # -- BlobStore ---------------------------------------------------------------------------------

    async def create(self, conn: asyncpg.Connection) -> str:
        key = f"{KEY_PREFIX}{uuid.uuid4().hex}"
        self._uploads[key] = _Upload()
        return key

    async def append(self, conn: asyncpg.Connection, ref: str, offset: int, chunk: bytes) -> None:
        upload = self._uploads[ref]
        view = memoryview(chunk)
        while view:
            room = self._part_size - upload.spooled
            upload.spool.write(view[:room])
            upload.spooled += min(room, len(view))
            view = view[room:]
            if upload.spooled == self._part_size:
                await self._send_part(ref, upload)

    async def _send_part(self, key: str, upload: _Upload) -> None:
        """The spooled bytes as the next part; the spool is then empty again."""
        upload.spool.seek(0)
        with self._answers("store a file", key):
            if upload.upload_id is None:
                started = await self._client.create_multipart_upload(Bucket=self._bucket, Key=key)
                upload.upload_id = str(started["UploadId"])
            number = len(upload.parts) + 1
            sent = await self._client.upload_part(Bucket=self._bucket, Key=key, UploadId=upload.upload_id,
                                                  PartNumber=number, Body=upload.spool, ContentLength=upload.spooled)
        upload.parts.append({"PartNumber": number, "ETag": sent["ETag"]})
        upload.spool.seek(0)
        upload.spool.truncate()
        upload.spooled = 0

    async def finish(self, conn: asyncpg.Connection, ref: str, size: int) -> None:
        upload = self._uploads[ref]
        if upload.upload_id is None:  # it fitted in one part: one PUT
            upload.spool.seek(0)
            with self._answers("store a file", ref):
                await self._client.put_object(Bucket=self._bucket, Key=ref, Body=upload.spool,
                                              ContentLength=upload.spooled)
        else:
            if upload.spooled:  # the last part may be smaller than the others
                await self._send_part(ref, upload)
            with self._answers("store a file", ref):
                await self._client.complete_multipart_upload(Bucket=self._bucket, Key=ref, UploadId=upload.upload_id,
                                                             MultipartUpload={"Parts": upload.parts})
        del self._uploads[ref]  # whole: from now on `discard` deletes the object
        upload.spool.close()

    async def discard(self, conn: asyncpg.Connection, ref: str) -> None:
        upload = self._uploads.pop(ref, None)
        if upload is None:
            await self.delete(conn, ref)
            return
        upload.spool.close()
        if upload.upload_id is not None:
            with self._answers("abort an upload", ref):
                await self._client.abort_multipart_upload(Bucket=self._bucket, Key=ref, UploadId=upload.upload_id)

    async def reader(self, conn: Queryable, ref: str, size: int, chunk_size: int) -> AsyncIterator[bytes]:
        with self._answers("read a file", ref):
            response = await self._client.get_object(Bucket=self._bucket, Key=ref)
        return self._pieces(response["Body"], ref, chunk_size)

    async def _pieces(self, body: Any, ref: str, chunk_size: int) -> AsyncIterator[bytes]:
        try:
            while True:
                with self._answers("read a file", ref):
                    chunk: bytes = await body.read(chunk_size)
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()  # a reader that stops early (a client gone) frees the connection

    async def delete(self, conn: Queryable, ref: str) -> None:
        with self._answers("delete a file", ref):
            await self._client.delete_object(Bucket=self._bucket, Key=ref)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]
