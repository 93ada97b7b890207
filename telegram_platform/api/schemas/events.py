"""The WebSocket event stream's query string (`api/ws.py`)."""

from __future__ import annotations

from typing import Annotated

import msgspec


class EventStreamQuery(msgspec.Struct, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(max_length=4096,
                                       description="access token, if not in Authorization")] | None = None
    topics: Annotated[str, msgspec.Meta(
        pattern=r"^(all|(account|campaign|message):[0-9]{1,19})(,(all|(account|campaign|message):[0-9]{1,19}))*$",
        max_length=4096,
        description="comma-separated: `all` (the default), `account:<id>`, `campaign:<id>`, `message:<id>`",
    )] | None = None
    types: Annotated[str, msgspec.Meta(
        pattern=r"^[a-z][a-z_.]*(,[a-z][a-z_.]*)*$", max_length=1024,
        description="comma-separated event types to receive (default: every type): message.status, "
                    "message.incoming, message.edited, message.deleted, account.state, campaign.progress, "
                    "account.service_notification (admins only), ...")] | None = None
    after: Annotated[str, msgspec.Meta(
        pattern=r"^[0-9]{1,19}-[0-9]{1,19}$",
        description="the `id` of the last event received: the events published since are sent first")] | None = None
