"""Health: liveness for load balancers, details for operators, the Telegram layer's state."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ...ops import status
from ...ops.processes import health_summary
from ...version import VERSION
from ..endpoints import Api, Call, json_response
from ..keys import DB, REDIS, SETTINGS
from ..schemas.health import Health, HealthDetails

api = Api()


@api.route("GET", "/api/health", summary="Liveness: this process can serve", role=None, response=Health,
           tags=("health",))
def health(request: web.Request, call: Call[None, None]) -> Any:
    return {"status": "ok"}


@api.route("GET", "/api/health/detailed", summary="Database, Redis, queues, workers and TDLib",
           role=None, token_optional=True, response=HealthDetails, tags=("health",),
           responses={503: HealthDetails})
async def health_detailed(request: web.Request, call: Call[None, None]) -> Any:
    """Without a token, only `{"status": "ok"|"degraded"}` with 200/503, for load balancers and
    monitors; with a valid token of any role, every part (the details name hosts, queues and
    processes: not for anyone who can reach the port)."""
    db = await status.database_status(request.app[DB])
    rds = await status.redis_status(request.app[REDIS])
    body: dict[str, Any] = {"version": VERSION, "database": db, "redis": rds}
    if rds["status"] == "ok":
        body.update(await status.queue_status(request.app[REDIS]))  # its live workers count below
        if call.principal is not None:  # a detail only: an unauthenticated probe is not shown it
            body["tdlib"] = await status.tdlib_status(request.app[REDIS])
    # Supervised processes (state, restarts): degraded when one was given up on (FATAL) or the
    # tp-events listener is down; not without supervisord (development, tests).
    settings = request.app[SETTINGS]
    body["processes"], processes_ok = await asyncio.to_thread(health_summary, settings.supervision)
    healthy = db["status"] == "ok" and rds["status"] == "ok" and bool(body.get("workers")) and processes_ok
    body["status"] = "ok" if healthy else "degraded"
    if call.principal is None:
        body = {"status": body["status"]}
    return json_response(body, status=200 if healthy else 503)


@api.route("GET", "/api/tdlib/health", summary="Telegram clients by state, receive-loop lag, version",
           response=dict[str, Any], tags=("health",))
async def tdlib_health(request: web.Request, call: Call[None, None]) -> Any:
    return await status.tdlib_status(request.app[REDIS])
