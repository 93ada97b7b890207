"""Test-only endpoints (TP_DEBUG_ENDPOINTS=1, refused in production): make this process hold memory
or exit, so the supervision tests can drive the real program into its watchdog and its back-off.
Installed only when enabled: in production these routes do not exist."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any

import msgspec
from aiohttp import web

from ..endpoints import Api, Call, RouteFactory

api = Api()

# Held for the life of the process: that is the point.
_BALLAST = web.AppKey("debug_ballast", list)


def install(app: web.Application, pipeline: RouteFactory) -> None:
    app[_BALLAST] = []
    api.install(app, pipeline)


class Allocate(msgspec.Struct, forbid_unknown_fields=True):
    megabytes: Annotated[int, msgspec.Meta(ge=1, le=16384)]


class Exit(msgspec.Struct, forbid_unknown_fields=True):
    code: Annotated[int, msgspec.Meta(ge=0, le=255)] = 1


@api.route("POST", "/api/_debug/allocate", summary="Hold N more megabytes of resident memory (tests only)",
           role="admin", body=Allocate, response=dict[str, Any], tags=("debug",), hidden=True)
async def allocate(request: web.Request, call: Call[Allocate, None]) -> Any:
    ballast = request.app[_BALLAST]
    # Filled with non-zero bytes so that every page is touched (resident), not merely reserved.
    ballast.append(b"\x01" * (call.body.megabytes << 20))
    return {"pid": os.getpid(), "held_megabytes": sum(len(b) for b in ballast) >> 20}


@api.route("POST", "/api/_debug/exit", summary="Exit this process right after answering (tests only)",
           role="admin", body=Exit, response=dict[str, Any], tags=("debug",), hidden=True)
async def exit_process(request: web.Request, call: Call[Exit, None]) -> Any:
    asyncio.get_running_loop().call_later(0.1, os._exit, call.body.code)
    return {"pid": os.getpid(), "exiting_with": call.body.code}
