"""What each per-request feature of the API costs inside a running server, and in a loop.

    python benchmarks/api_features.py [--rounds 10] [--duration 2] [--connections 32]

api_wrk.py compares the platform with a bare aiohttp application in other processes. This asks
where the difference goes. One `tp-api` process (the platform's own `create_app`) serves, beside
`GET /api/health`, the bare benchmark's health handler (`/bench/bare`) and that handler with one
piece of the request pipeline's work added:

  /bench/header   the X-Request-ID response header
  /bench/context  the request context (one ContextVar set)
  /bench/reads    reading the X-Request-ID and Authorization request headers
  /bench/held     two clock reads and one held tuple (what the journal keeps; never written)
  /bench/journal  the request journal itself: the held tuple, then its line and counts per batch

wrk loads each route in turn (the order rotates every round) and the process's CPU time per
request comes from /proc, so every route runs in the same process, heap and event loop; the rate
ratio is paired with `/bench/bare` in the same round. api_wrk.py's bare application runs too, in
a process of its own, to show whether a `tp-api` process is itself any slower. `loop µs` is what
the same handler costs called in a tight loop (no server), less the bare handler's. On a 2-core
virtual machine, the pipeline cost 2-4 times as much inside the server as in the loop; likely
because its code and data leave the CPU's caches between two requests, and because a slower
answer leaves wrk asleep more often, so that each answer also pays for waking it. Single figures
move by ±1 µs from run to run: compare routes within a run. Uses DATABASE_URL/REDIS_URL when set,
else throwaway servers; needs `wrk`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import api_wrk  # the bare handler's shape, the set-up and wrk, shared with the wrk benchmark

ID = "0123456789abcdef0123456789abcdef"
VARIANTS = ("bare", "header", "context", "reads", "held", "journal")


def routes(journal: Any) -> dict[str, Callable[[Any], Awaitable[Any]]]:
    """The bare handler, and the bare handler plus each feature (`journal`: the app's own)."""
    import msgspec
    from aiohttp import hdrs, web

    from telegram_platform.api.endpoints import JSON
    from telegram_platform.api.pipeline import REQUEST_ID_HEADER
    from telegram_platform.logs import REQUEST_CONTEXT

    encode, clock = msgspec.json.Encoder().encode, time.perf_counter_ns
    held_here: list[tuple[Any, ...]] = []
    tally = journal.tally("GET", "/bench/journal")

    def answer() -> web.Response:
        return web.Response(body=encode({"status": "ok"}), content_type=JSON)

    async def bare(request: web.Request) -> web.Response:
        return answer()

    async def header(request: web.Request) -> web.Response:
        return web.Response(body=encode({"status": "ok"}), headers={hdrs.CONTENT_TYPE: JSON, REQUEST_ID_HEADER: ID})

    async def context(request: web.Request) -> web.Response:
        REQUEST_CONTEXT.set((ID, None))
        return answer()

    async def reads(request: web.Request) -> web.Response:
        headers = request.headers
        headers.get(REQUEST_ID_HEADER), headers.get(hdrs.AUTHORIZATION)
        return answer()

    async def held(request: web.Request) -> web.Response:
        started = clock()
        response = answer()
        held_here.append((None, 200, clock() - started, ID, None))
        if len(held_here) > 512:
            held_here.clear()
        return response

    async def journaled(request: web.Request) -> web.Response:
        started = clock()
        response = answer()
        elapsed = clock() - started
        if not journal.held:
            journal.start_batch()
        journal.held.append((tally, 200, elapsed, ID, None))
        return response

    return {"bare": bare, "header": header, "context": context, "reads": reads, "held": held, "journal": journaled}


def serve() -> int:
    """The server: `tp-api` with the /bench routes added."""
    from telegram_platform.api.app import create_app
    from telegram_platform.api.app import serve as serve_app
    from telegram_platform.api.keys import JOURNAL
    from telegram_platform.cli.common import load_settings

    settings = load_settings("tp-api", "api")
    app = create_app(settings)
    for name, handler in routes(app[JOURNAL]).items():
        app.router.add_route("GET", f"/bench/{name}", handler)
    return asyncio.run(serve_app(settings, app))


def loop_costs() -> dict[str, float]:
    """µs per call of each handler in a tight loop, less the bare handler's, in this process."""
    from aiohttp.test_utils import make_mocked_request

    from telegram_platform.api.app import create_app
    from telegram_platform.api.keys import JOURNAL
    from telegram_platform.logs import configure_logging
    from telegram_platform.settings import Settings

    settings = Settings.from_env({"DATABASE_URL": "postgresql://unused@127.0.0.1/unused",
                                  "REDIS_URL": "redis://127.0.0.1:1/0", "JWT_SECRET": api_wrk.JWT_SECRET,
                                  "ENCRYPTION_KEY": api_wrk.ENCRYPTION_KEY}, app_mode="api")
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            configure_logging(level="info", fmt="json", process="loop")  # lines rendered, written nowhere
            app = create_app(settings)  # opens nothing until started
            journal = app[JOURNAL]
            handlers: dict[str, Callable[[Any], Awaitable[Any]]] = dict(routes(journal))
            handlers["platform"] = next(route.handler for route in app.router.routes()
                                        if route.resource is not None and route.method == "GET"
                                        and route.resource.canonical == "/api/health")
            request = make_mocked_request("GET", "/api/health", headers={"Host": "bench", "User-Agent": "wrk"},
                                          app=app)
            costs: dict[str, float] = {}
            for name, handler in handlers.items():
                best = float("inf")
                for _ in range(5):
                    started = time.perf_counter()
                    for _ in range(50_000):
                        coroutine = handler(request)
                        try:  # noqa: SIM105 - suppress() would add its own cost to each call timed
                            coroutine.send(None)  # type: ignore[attr-defined]
                        except StopIteration:
                            pass
                        if len(journal.held) >= 512:
                            journal.write_lines()  # what the journal's timer does in the server
                    best = min(best, (time.perf_counter() - started) / 50_000 * 1e6)
                costs[name] = best
        finally:
            sys.stdout = stdout
    return {name: cost - costs["bare"] for name, cost in costs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=int, default=2, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve()
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    in_loop = loop_costs()
    in_loop["bare process"] = 0.0  # the same handler as /bench/bare
    paths = {name: f"/bench/{name}" for name in VARIANTS} | {"platform": "/api/health", "bare process": "/api/health"}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in paths}
    with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with api_wrk.backing_services(tmp) as (database_url, redis_url):
            asyncio.run(api_wrk.prepare(database_url))
            port, bare_port = api_wrk.free_port(), api_wrk.free_port()
            env = {**api_wrk.platform_env(database_url, redis_url, port, tmp / "var"), "TP_INSTANCE": "features"}
            with open(tmp / "api.log", "wb") as log:  # as under supervisord: the lines go to a file
                server = subprocess.Popen([sys.executable, __file__, "--serve"], env=env, stdout=log,
                                          stderr=subprocess.STDOUT)
                # api_wrk.py's bare application in its own process: is a tp-api process itself slower?
                bare = subprocess.Popen([sys.executable, api_wrk.__file__, "--bare-server", str(bare_port),
                                         database_url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    base, bare_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{bare_port}"
                    api_wrk.wait_http(f"{base}/api/health")
                    api_wrk.wait_http(f"{bare_base}/api/health")
                    time.sleep(1.0)
                    names = list(paths)
                    for number in range(args.rounds):
                        shift = number % len(names)  # each route first in turn: drift favours none
                        for name in names[shift:] + names[:shift]:
                            process, url = (bare, bare_base) if name == "bare process" else (server, base)
                            results[name].append(api_wrk.run_wrk(
                                f"{url}{paths[name]}", duration=args.duration, connections=args.connections,
                                threads=1, token=None, pids=[process.pid]))
                finally:
                    for process in (server, bare):
                        process.terminate()
                        process.wait(timeout=30)

    print(f"\none tp-api process and one bare process, wrk -t1 -c{args.connections} -d{args.duration}s per route, "
          f"{args.rounds} rounds, {os.cpu_count()} CPUs shared with wrk; medians over the rounds; ratio: the median "
          "of each round's rate over /bench/bare's")
    print(f"{'route':<16} {'req/s':>8} {'ratio':>6} {'CPU µs/req':>11} {'added':>6} {'loop µs':>8}")
    bare_runs = results["bare"]
    bare_cpu = statistics.median(run[2] for run in bare_runs)
    for name, runs in results.items():
        cpu = statistics.median(run[2] for run in runs)
        ratio = statistics.median(run[0] / bare[0] for run, bare in zip(runs, bare_runs, strict=True))
        label = paths[name] if name != "bare process" else "(bare process)"
        print(f"{label:<16} {statistics.median(run[0] for run in runs):>8.0f} {ratio:>6.3f} {cpu:>11.2f} "
              f"{cpu - bare_cpu:>+6.2f} {in_loop[name]:>+8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
