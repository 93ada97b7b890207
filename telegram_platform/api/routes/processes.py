"""Processes under supervisord (admin only): state, pid, uptime, restarts, memory; restart, reload.

Restarts and reloads are carried out by the tp-events listener, not by this process: an API member
cannot restart its own group from inside it (it would stop itself halfway). The request is handed
over as a supervisord REMOTE_COMMUNICATION event and answered 202; progress shows in
`GET /api/processes` (`reload`, each process's `restarts`). supervisord's XML-RPC is synchronous,
so every call runs in a thread.

What the API restarts are the platform's own processes, as PM2 did for the Node original. The
services it runs on (the embedded PostgreSQL and Redis, the Telegram emulator) are restarted on the
host (`tp restart NAME`): from the API, a restart of the database would take the API down with it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from ...errors import Conflict, NotFound, ServiceUnavailable
from ...ops.processes import snapshot
from ...ops.supervisor import SupervisorClient
from ...settings import BACKING_SERVICE_PROGRAMS, LISTENER_PROGRAM, Settings
from ..endpoints import Api, Call
from ..keys import SETTINGS

api = Api()


class ProcessOut(msgspec.Struct):
    name: str
    group: str
    state: str
    pid: int | None
    uptime_seconds: float
    restarts: int
    restarts_by_reason: dict[str, int]
    starts: int
    crashes: int
    start_failures: int
    memory_bytes: int | None
    memory_includes_children: bool
    memory_limit_bytes: int | None
    ready: bool | None
    restart_in_seconds: float | None
    fatal_reason: str | None
    description: str


class ProcessList(msgspec.Struct):
    supervisor: str
    processes: list[ProcessOut]
    listener: dict[str, Any]
    reload: dict[str, Any]


class Accepted(msgspec.Struct):
    action: str
    target: str
    status: str = "accepted"


def _unavailable(settings: Settings) -> ServiceUnavailable:
    return ServiceUnavailable("supervisord is not reachable from this process",
                              details={"socket": str(settings.supervision.supervisor_socket)})


@api.route("GET", "/api/processes", summary="Every supervised process: state, pid, uptime, restarts, memory",
           role="admin", response=ProcessList, tags=("processes",), errors=(503,))
async def list_processes(request: web.Request, call: Call[None, None]) -> Any:
    settings = request.app[SETTINGS]
    snap = await asyncio.to_thread(snapshot, settings.supervision)
    if snap.supervisor != "ok":
        raise _unavailable(settings)
    return ProcessList(
        supervisor=snap.supervisor,
        processes=[msgspec.convert(p, ProcessOut, from_attributes=True) for p in snap.processes],
        listener=snap.listener, reload=snap.reload)


def _refuse_from_here(name: str) -> None:
    """Conflict for a process the API must not restart: the listener, and the backing services."""
    program = name.split(":", 1)[0]
    if program == LISTENER_PROGRAM:
        raise Conflict(f"{LISTENER_PROGRAM} carries out restarts and cannot restart itself: "
                       f"use `tp restart {LISTENER_PROGRAM}` on the host", details={"name": name})
    if program in BACKING_SERVICE_PROGRAMS:
        raise Conflict(f"{program} is a service the platform runs on, not one of its processes: restarting it "
                       f"would take the API down with it; use `tp restart {program}` on the host",
                       details={"name": name})


def _hand_over(settings: Settings, message: dict[str, Any]) -> None:
    """Check the target exists and the listener runs, then pass the request on (in a thread)."""
    name = message.get("name")
    if name:
        _refuse_from_here(name)
    client = SupervisorClient(settings.supervision.supervisor_socket)
    try:
        processes = client.processes()
    except OSError:
        raise _unavailable(settings) from None
    if name and not any(name in (p.name, p.member, p.group) for p in processes):
        raise NotFound(f"no process named {name}", details={"name": name})
    if not any(p.group == LISTENER_PROGRAM and p.state == "RUNNING" for p in processes):
        raise ServiceUnavailable("the tp-events listener is not running: restart it with `tp restart tp-events`")
    client.notify(message)


@api.route("POST", "/api/processes/{name}/restart", summary="Restart a process gracefully (a group rolls)",
           role="admin", response=Accepted, status=202, tags=("processes",), errors=(404, 409, 503),
           path_params={"name": str})
async def restart_process(request: web.Request, call: Call[None, None]) -> Any:
    name = str(call.path["name"])
    await asyncio.to_thread(_hand_over, request.app[SETTINGS],
                            {"action": "restart", "name": name, "reason": "manual",
                             "requested_by": call.user.username})
    return Accepted(action="restart", target=name)


@api.route("POST", "/api/processes/reload", summary="Rolling, zero-downtime reload of the API group",
           role="admin", response=Accepted, status=202, tags=("processes",), errors=(503,))
async def reload_processes(request: web.Request, call: Call[None, None]) -> Any:
    await asyncio.to_thread(_hand_over, request.app[SETTINGS],
                            {"action": "reload", "requested_by": call.user.username})
    return Accepted(action="reload", target="tp-api")
