"""Health: liveness for load balancers, details for operators, the Telegram layer's state."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...ops import status
from ..endpoints import Api, Call, json_response
from ..keys import DB, REDIS
from ..schemas import Health

api = Api()


@api.route("GET", "/api/health", summary="Liveness: this process can serve", role=None, response=Health,
           tags=("health",))
async def health(request: web.Request, call: Call[None, None]) -> Any:
    return {"status": "ok"}


@api.route("GET", "/api/health/detailed", summary="Database, Redis, queues, workers and TDLib",
           response=dict[str, Any], tags=("health",), errors=(503,))
async def health_detailed(request: web.Request, call: Call[None, None]) -> Any:
    db = await status.database_status(request.app[DB])
    rds = await status.redis_status(request.app[REDIS])
    body: dict[str, Any] = {"database": db, "redis": rds}
    if rds["status"] == "ok":
        body.update(await status.queue_status(request.app[REDIS]))
        body["tdlib"] = await status.tdlib_status(request.app[REDIS])
    healthy = db["status"] == "ok" and rds["status"] == "ok" and bool(body.get("workers"))
    body["status"] = "ok" if healthy else "degraded"
    return json_response(body, status=200 if healthy else 503)


@api.route("GET", "/api/tdlib/health", summary="Telegram clients by state, receive-loop lag, version",
           response=dict[str, Any], tags=("health",))
async def tdlib_health(request: web.Request, call: Call[None, None]) -> Any:
    return await status.tdlib_status(request.app[REDIS])
