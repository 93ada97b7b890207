"""Hosts: every host of the platform with its state, accounts, Telegram clients and memory."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...ops.hosts import hosts_overview
from ..endpoints import Api, Call
from ..keys import DB, REDIS, SETTINGS
from ..schemas.hosts import HostList

api = Api()


@api.route("GET", "/api/hosts", summary="Hosts: state (up, draining, gone), accounts owned, Telegram clients, "
           "memory, last heartbeat", response=HostList, tags=("hosts",))
async def list_hosts(request: web.Request, call: Call[None, None]) -> Any:
    return await hosts_overview(request.app[DB], request.app[REDIS],
                                gone_after=request.app[SETTINGS].host.gone_after)
