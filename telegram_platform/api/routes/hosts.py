"""Hosts: every host of the platform with its state, accounts, Telegram clients and memory; moving
an account to another host, and draining a host (docs/operations.md)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...ops.hosts import hosts_overview, move_account, set_draining
from ..endpoints import Api, Call, path_id
from ..keys import DB, REDIS, REDIS_AUTH, SETTINGS
from ..schemas.hosts import Host, HostId, HostList, MoveAccount, MovedAccount

api = Api()


@api.route("GET", "/api/hosts", summary="Hosts: state (up, draining, gone), accounts owned, Telegram clients, "
           "memory, last heartbeat", response=HostList, tags=("hosts",))
async def list_hosts(request: web.Request, call: Call[None, None]) -> Any:
    return await hosts_overview(request.app[DB], request.app[REDIS],
                                gone_after=request.app[SETTINGS].host.gone_after)


@api.route("POST", "/api/accounts/{id}/move", summary="Move a logged-in account to another host", role="operator",
           body=MoveAccount, response=MovedAccount, tags=("hosts",), errors=(404, 409, 422, 504))
async def move(request: web.Request, call: Call[MoveAccount, None]) -> Any:
    """The account's owner closes it (its TDLib state snapshot is taken at the close) and lets its
    lease go; a worker of `to` opens it from the snapshot, without a new login. Answers once `to`
    holds it. 404: no such account or host; 409: `to` is not up, or the account is not logged in
    (`ready` or `closed`)."""
    return await move_account(request.app[DB], request.app[REDIS], request.app[REDIS_AUTH], path_id(request),
                              call.body.to, gone_after=request.app[SETTINGS].host.gone_after)


async def _host(request: web.Request, host_id: str) -> Any:
    overview = await hosts_overview(request.app[DB], request.app[REDIS],
                                    gone_after=request.app[SETTINGS].host.gone_after)
    return next(host for host in overview["items"] if host["id"] == host_id)


@api.route("POST", "/api/hosts/{id}/drain", summary="Drain a host: it hands its accounts to the up hosts",
           role="operator", response=Host, tags=("hosts",), errors=(404,), path_params={"id": HostId})
async def drain(request: web.Request, call: Call[None, None]) -> Any:
    """Sets the host's draining_since (kept if already set): its worker children hand their accounts
    one by one to the least-loaded up hosts, and it takes no new accounts until drained is undone
    (`DELETE`). A host that restarts stays draining."""
    await set_draining(request.app[DB], call.path["id"], True)
    return await _host(request, call.path["id"])


@api.route("DELETE", "/api/hosts/{id}/drain", summary="Stop draining a host: it takes accounts again",
           role="operator", response=Host, tags=("hosts",), errors=(404,), path_params={"id": HostId})
async def undrain(request: web.Request, call: Call[None, None]) -> Any:
    await set_draining(request.app[DB], call.path["id"], False)
    return await _host(request, call.path["id"])
