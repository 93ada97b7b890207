"""The annotated field types the resources share: what a username, a phone, a peer, a text, an id, a
page cursor or an aware datetime may be, each with its bounds (checked on input, stated in OpenAPI)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import msgspec

# PostgreSQL text (and jsonb) cannot hold NUL: refused here, with the field named, not by the database.
NO_NUL = r"^[^\x00]*$"
Username = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
# E.164: at most 15 digits, and no country code starts with 0.
# Examples are Telegram test-DC numbers (+99966XYYYY, logging in with the code XXXXX), which the
# emulator serves: Swagger UI's "Try it out" and schemathesis can then walk a login end to end.
Phone = Annotated[str, msgspec.Meta(pattern=r"^\+?[1-9][0-9]{6,14}$", description="E.164 phone number",
                                    examples=["+9996621234"])]
Peer = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=NO_NUL,
                                   description="a user id, a @username or a phone number", examples=["@alice"])]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=NO_NUL, examples=["hi"])]
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=NO_NUL)]
ShortText = Annotated[str, msgspec.Meta(max_length=256, pattern=NO_NUL)]
PositiveId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
# An id to page before; 18 digits keep it inside PostgreSQL's bigint.
Cursor = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,18}$")]
AwareDatetime = Annotated[dt.datetime, msgspec.Meta(tz=True)]
