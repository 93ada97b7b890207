"""Files clients upload and messages carry (`api/routes/files.py`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import msgspec

# The multipart body of POST /api/files, for the OpenAPI document (the route reads it itself, streamed).
UPLOAD_BODY_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "the file; its part's filename and Content-Type are kept"}},
}


class FileInfo(msgspec.Struct):
    id: int
    sha256: Annotated[str, msgspec.Meta(description="SHA-256 of the content, hex: the same bytes are one file")]
    size: int
    mime_type: str
    file_name: str
    width: Annotated[int | None, msgspec.Meta(description="pixels, when read from an image's header")]
    height: int | None
    duration: Annotated[int | None, msgspec.Meta(description="seconds, when known")]
    created_at: dt.datetime
    last_used_at: dt.datetime
