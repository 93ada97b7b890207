"""The platform's hosts: their state, accounts, clients and memory (`api/routes/hosts.py`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

import msgspec

HostStateName = Literal["up", "draining", "gone"]
# TP_HOST_ID's form (settings.py): a DNS label.
HostId = Annotated[str, msgspec.Meta(pattern="^[a-z0-9-]{1,63}$", description="TP_HOST_ID of a host")]


class Host(msgspec.Struct):
    id: Annotated[str, msgspec.Meta(description="TP_HOST_ID of the host (default: its hostname)")]
    state: Annotated[HostStateName, msgspec.Meta(description=(
        "up; draining (handing its accounts off); gone: no heartbeat for gone_after_seconds"))]
    accounts_owned: Annotated[int, msgspec.Meta(description=(
        "Accounts whose session this host opened last and has not let go; a gone host's stay counted "
        "until another host takes them over"))]
    telegram_clients: Annotated[int, msgspec.Meta(description="Telegram clients its worker children hold now")]
    memory_bytes: Annotated[int | None, msgspec.Meta(description=(
        "Resident memory of its worker children (null when none is running)"))]
    workers: Annotated[list[str], msgspec.Meta(description="Identities of its live worker children")]
    first_seen: dt.datetime
    last_heartbeat: dt.datetime
    heartbeat_age_seconds: Annotated[float, msgspec.Meta(description="Seconds since the last heartbeat "
                                                                     "(by the database's clock)")]
    draining_since: dt.datetime | None


class HostList(msgspec.Struct):
    items: list[Host]
    gone_after_seconds: Annotated[float, msgspec.Meta(description="TP_HOST_GONE_SECONDS")]


class MoveAccount(msgspec.Struct, forbid_unknown_fields=True):
    to: Annotated[HostId, msgspec.Meta(description="The host to move the account to; it must be up")]


class MovedAccount(msgspec.Struct):
    account_id: int
    owner_host: Annotated[str | None, msgspec.Meta(description="The host that holds the account now")]
    auth_state: str
    connection_state: str | None
