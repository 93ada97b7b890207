"""Files: uploaded once (multipart, streamed into the file store), named by id in messages.

An upload is read part chunk by part chunk into the store while it is hashed, never whole in
memory: its size limit is TP_MAX_UPLOAD_BYTES, not the JSON bodies' TP_MAX_BODY_BYTES (aiohttp
applies that one only to bodies read whole, which this route never does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.payload import AsyncIterablePayload

from ...errors import NotFound, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from ...storage.files import CHUNK_SIZE
from ...telegram.rpc import DOWNLOAD_INCOMING_FILE, call_host
from ..endpoints import Api, Call, path_id
from ..keys import DB, FILES, REDIS, REDIS_AUTH, SETTINGS
from ..schemas.files import UPLOAD_BODY_SCHEMA, FileInfo

api = Api()

# Room for the multipart framing (boundaries, part headers) around the file in a declared
# Content-Length: a body longer than the limit and this is refused before a byte is read.
MULTIPART_OVERHEAD = 64 * 1024
FILE_FIELD = "file"
# A file is served with its own type, whatever it is.
ANY_TYPE = "*/*"
# How long a download through the account's worker may take (Telegram's largest files take minutes).
DOWNLOAD_TIMEOUT = 300.0


@api.route("POST", "/api/files", summary="Upload a file (multipart/form-data, part `file`)", role="operator",
           response=FileInfo, status=201, tags=("files",), errors=(400, 413, 415, 422),
           raw_body=("multipart/form-data",), raw_body_schema=UPLOAD_BODY_SCHEMA)
async def upload_file(request: web.Request, call: Call[None, None]) -> Any:
    """The part named `file` is stored, de-duplicated by content: the same bytes give the same id.
    Past TP_MAX_UPLOAD_BYTES the answer is 413 and nothing is kept. Send it in a message with
    `media: [{"file_id": <id>, "kind": "photo"}]` (POST /api/messages)."""
    limit = request.app[SETTINGS].files.max_upload_bytes
    if request.content_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"send the file as multipart/form-data (got {request.content_type or 'no Content-Type'})",
            details={"field": "body"})
    declared = request.content_length
    if declared is not None and declared > limit + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(f"the file is larger than {limit} bytes",
                              details={"field": FILE_FIELD, "max_bytes": limit})
    try:
        reader = await request.multipart()
        part = await reader.next()
        while part is not None and not (isinstance(part, BodyPartReader) and part.name == FILE_FIELD):
            await part.release()
            part = await reader.next()
        if part is None:
            raise ValidationFailed([{"field": FILE_FIELD, "message": "is required (a part named `file`)"}])
        assert isinstance(part, BodyPartReader)
        row, _ = await request.app[FILES].put(
            _chunks(part), file_name=part.filename or FILE_FIELD, mime_type=part.headers.get(hdrs.CONTENT_TYPE),
            max_size=limit, created_by=call.user.user_id)
    except (ValueError, HttpProcessingError) as exc:  # a body that is not the multipart it says it is
        raise ValidationFailed([{"field": "body", "message": f"not a valid multipart body: {exc}"}]) from None
    return row


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    """The part's content, decoded as its Content-Transfer-Encoding says, in CHUNK_SIZE pieces."""
    buffered = bytearray()
    while not part.at_eof():
        buffered += part.decode(await part.read_chunk(CHUNK_SIZE))
        if len(buffered) >= CHUNK_SIZE:
            yield bytes(buffered)
            buffered.clear()
    if buffered:
        yield bytes(buffered)


@api.route("GET", "/api/files/{id}", summary="A file's metadata", response=FileInfo, tags=("files",), errors=(404,))
async def get_file(request: web.Request, call: Call[None, None]) -> Any:
    return await request.app[FILES].get(path_id(request))


@api.route("GET", "/api/files/{id}/content", summary="A file's bytes, streamed", tags=("files",), errors=(404,),
           content_type=ANY_TYPE)
async def download_file(request: web.Request, call: Call[None, None]) -> Any:
    """Served as an attachment with the file's own type (and `nosniff`): never rendered by a browser
    as a page of this origin, whatever a client uploaded."""
    store = request.app[FILES]
    file_id = path_id(request)
    row = await store.get(file_id)
    chunks = await store.stream(file_id)
    return await stream_file(request, row, chunks)


@api.route("GET", "/api/incoming/{id}/file", summary="The file a received message carries, streamed",
           tags=("files",), errors=(404, 409, 502, 503, 504), content_type=ANY_TYPE)
async def download_incoming_file(request: web.Request, call: Call[None, None]) -> Any:
    """Downloaded through the account that received it (by the worker that hosts it) into the file
    store on first request, then served from the store."""
    db = request.app[DB]
    incoming_id = path_id(request)
    row = await db.fetchrow(
        """SELECT i.account_id, i.media IS NOT NULL AS has_media, f.file_id FROM incoming_messages i
           LEFT JOIN incoming_files f ON f.incoming_id = i.id WHERE i.id = $1""", incoming_id)
    if row is None:
        raise NotFound(f"incoming message {incoming_id} not found")
    if not row["has_media"]:
        raise NotFound(f"incoming message {incoming_id} carries no file")
    file_id = row["file_id"]
    if file_id is None:
        answer = await call_host(request.app[REDIS], request.app[REDIS_AUTH], DOWNLOAD_INCOMING_FILE, row["account_id"],
                                 {"incoming_id": incoming_id}, timeout=DOWNLOAD_TIMEOUT)
        file_id = int(answer["file_id"])
    store = request.app[FILES]
    meta = await store.get(file_id)
    await store.touch([file_id])
    return await stream_file(request, meta, await store.stream(file_id))


async def stream_file(request: web.Request, row: dict[str, Any], chunks: AsyncIterator[bytes]) -> web.Response:
    """A stored file's bytes, sent as they are read (shared with GET /api/incoming/{id}/file): the
    response is not prepared here, so the pipeline still adds its headers (X-Request-ID)."""
    return web.Response(body=AsyncIterablePayload(chunks, content_type=row["mime_type"]), headers={
        hdrs.CONTENT_TYPE: row["mime_type"],
        hdrs.CONTENT_LENGTH: str(row["size"]),
        hdrs.CONTENT_DISPOSITION: f"attachment; filename*=UTF-8''{quote(row['file_name'], safe='')}",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    })
