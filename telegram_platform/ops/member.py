"""The API member's side of supervision: its readiness socket and a drain that loses no request.

`serve()` in api/app.py calls these. Under supervisord the members share one listening socket, so
each member also serves the application on a unix socket of its own (ops/readiness.py) where the
rolling reload and the watchdog can reach exactly that member.

On SIGTERM a member stops accepting (the shared socket's queue goes to the others), then for a short
grace answers the requests that still arrive on its open keep-alive connections with
`Connection: close`, so clients move to a new connection instead of finding theirs closed under them;
then aiohttp's own shutdown finishes the requests in flight within the drain deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from ..settings import Settings
from .readiness import member_socket

KEEPALIVE_GRACE = 1.0
POLL = 0.05


class MemberLifecycle:
    def __init__(self, settings: Settings, *, on_drain: Callable[[], None]) -> None:
        """`on_drain` makes the application answer with `Connection: close` from then on."""
        self._settings = settings
        self._on_drain = on_drain
        self.socket_path: Path | None = None

    async def start_readiness_site(self, runner: web.AppRunner) -> web.UnixSite | None:
        """Serve the app on var/run/api/<instance>.sock too (only under supervisord's shared socket)."""
        if self._settings.api.listen_fd is None:
            return None
        path = member_socket(self._settings.var_dir, self._settings.instance)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a predecessor killed with -9 leaves its socket file
        site = web.UnixSite(runner, str(path))
        await site.start()
        path.chmod(0o600)
        self.socket_path = path
        return site

    async def drain(self, runner: web.AppRunner) -> None:
        """Stop accepting everywhere, let keep-alive clients leave, then aiohttp's shutdown."""
        self._on_drain()
        for site in list(runner.sites):
            await site.stop()
        grace = min(KEEPALIVE_GRACE, self._settings.api.drain_seconds)
        server = runner.server
        for _ in range(int(grace / POLL)):
            if server is None or not server.connections:
                break
            await asyncio.sleep(POLL)
        await runner.cleanup()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
