"""The opt-out list: peers who asked not to be messaged. Every campaign skips them, even one already
running (checked again when each message is claimed)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...storage import optouts as optout_store
from ..endpoints import Api, Call
from ..keys import DB
from ..schemas.fields import Peer
from ..schemas.optouts import AddOptOuts, OptOut, OptOutPage, OptOutQuery, OptOutsAdded

api = Api()


@api.route("POST", "/api/optouts", summary="Add peers to the opt-out list (already listed ones stay as they are)",
           role="operator", body=AddOptOuts, response=OptOutsAdded, status=201, tags=("opt-outs",), errors=(422,))
async def add_optouts(request: web.Request, call: Call[AddOptOuts, None]) -> Any:
    added = await optout_store.add_optouts(request.app[DB], call.body.peers, call.body.reason, call.user.user_id)
    return {"added": added}


@api.route("GET", "/api/optouts", summary="The opt-out list, by normalised peer, with cursor pagination",
           query=OptOutQuery, response=OptOutPage, tags=("opt-outs",))
async def list_optouts(request: web.Request, call: Call[None, OptOutQuery]) -> Any:
    q = call.query
    items = await optout_store.list_optouts(request.app[DB], after=q.cursor, limit=q.limit + 1)
    next_cursor = items[q.limit - 1]["peer_key"] if len(items) > q.limit else None
    return {"items": items[: q.limit], "next_cursor": next_cursor}


@api.route("GET", "/api/optouts/{peer}", summary="Whether a peer opted out (404 if not)", response=OptOut,
           tags=("opt-outs",), errors=(404,), path_params={"peer": Peer})
async def get_optout(request: web.Request, call: Call[None, None]) -> Any:
    return await optout_store.get_optout(request.app[DB], call.path["peer"])


@api.route("DELETE", "/api/optouts/{peer}", summary="Take a peer off the opt-out list", role="operator", status=204,
           tags=("opt-outs",), errors=(404,), path_params={"peer": Peer})
async def remove_optout(request: web.Request, call: Call[None, None]) -> Any:
    await optout_store.remove_optout(request.app[DB], call.path["peer"])
    return web.Response(status=204)
