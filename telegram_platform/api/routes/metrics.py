"""GET /metrics: the whole platform in one Prometheus scrape, from any API member.

Auth: outside /api on purpose (the contract), because scrapers rarely hold a JWT. With
TP_METRICS_TOKEN set it needs `Authorization: Bearer <TP_METRICS_TOKEN>` (Prometheus:
`authorization: {credentials_file: ...}`). With TP_METRICS_LISTEN set it is served on that address
only, not on the API port (api/app.py). Production needs one of the two (settings.py): metric labels
carry no account ids, phones or users, but queue depths and process names are worth keeping to
operators, and each scrape reads PostgreSQL, Redis and supervisord (once a second at most per
process: api/scrape.py's ScrapeCache).
"""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path
from typing import Any

from aiohttp import web

from ...errors import Unauthorized
from ...metrics.exposition import render
from ...ops.restarts import read_counters
from ...worker.spool import spool_directory
from ..endpoints import Api, Call
from ..keys import DB, JOURNAL, METRICS, REDIS, SCRAPES, SETTINGS
from ..scrape import ScrapeSources

api = Api()

# What a scrape gets: Prometheus' text format, or OpenMetrics when the Accept header asks for it.
PROMETHEUS_TEXT = "text/plain"
OPENMETRICS_TEXT = "application/openmetrics-text"


@api.route("GET", "/metrics", summary="Prometheus metrics for every API process and the worker", role=None,
           tags=("operations",), errors=(401,), content_type=(PROMETHEUS_TEXT, OPENMETRICS_TEXT))
async def metrics(request: web.Request, call: Call[None, None]) -> Any:
    settings = request.app[SETTINGS]
    if settings.api.metrics_token is not None:
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {settings.api.metrics_token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthorized("GET /metrics needs Authorization: Bearer <TP_METRICS_TOKEN>")
    sources = ScrapeSources(redis=request.app.get(REDIS), db=request.app.get(DB),
                            supervisor_socket=settings.supervision.supervisor_socket,
                            restart_counts=lambda: _restart_counts(settings.supervision.supervisor_socket),
                            spool_dir=spool_directory(settings.var_dir), host_id=settings.host.id,
                            host_gone_after=settings.host.gone_after)
    request.app[JOURNAL].flush()  # this process's own requests are counted up to now
    families = await request.app[SCRAPES].collect(sources)
    # Summing the processes' files is blocking file I/O: off the event loop.
    body, content_type = await asyncio.to_thread(render, request.app[METRICS], families,
                                                 request.headers.get("Accept", ""), host=settings.host.id)
    return web.Response(body=body, headers={"Content-Type": content_type})


def _restart_counts(socket: Path) -> dict[tuple[str, str], int]:
    """{(program, cause): restarts} from the tp-events listener's book (ops/restarts.py)."""
    return {(name.split(":", 1)[-1], cause): count
            for name, counters in read_counters(socket).items() for cause, count in counters.by_reason.items()}
