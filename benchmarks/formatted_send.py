"""What a formatted message costs beside a plain one: in the API that accepts it, and in a loop.

    python benchmarks/formatted_send.py [--rounds 5] [--requests 400] [--concurrency 8]

A `tp-api` process (the platform's own, as supervisord runs it) takes `POST /api/messages` in four
variants of the same visible text (about 120 characters): plain; MarkdownV2 (`parse_mode:
markdown`: bold, italic, a link, an emoji before it), parsed by TDLib's `parseTextEntities` through
`td_execute`; the same as HTML; and the same entities given explicitly. Each round sends every
variant `--requests` times (`--concurrency` at once; the order rotates every round) and reads the
process's CPU time per request from /proc, and the requests' median latency; the ratio to plain is
taken within each round, and the median over rounds is printed. No worker runs: each message is
parsed, checked and stored as `queued`, which is all a send costs in the API.

Then, with no server, the parts a formatted send adds, each called in a tight loop: the API's text
handling (`api.routes.messages.formatted`: parse or entities, then Telegram's rules) and the
session's query builder (`tdlib.messages.send_message_query`). Uses DATABASE_URL/REDIS_URL when set,
else throwaway PostgreSQL and Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import api_wrk  # the throwaway services, tp-api's environment and login, shared with the wrk benchmark

TEXT = "Hello there, this is the weekly update 😀 read it here: the link, and reply if anything looks wrong."
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"text": TEXT},
    "markdown": {"text": "*Hello there*, this is the _weekly update_ 😀 read it here: "
                         "[the link](https://example.com/), and reply if anything looks wrong\\.",
                 "parse_mode": "markdown"},
    "html": {"text": "<b>Hello there</b>, this is the <i>weekly update</i> 😀 read it here: "
                     "<a href=\"https://example.com/\">the link</a>, and reply if anything looks wrong.",
             "parse_mode": "html"},
    "entities": {"text": TEXT, "entities": [
        {"type": "bold", "offset": 0, "length": 11}, {"type": "italic", "offset": 25, "length": 13},
        {"type": "text_link", "offset": 55, "length": 8, "url": "https://example.com/"}]},
}


async def send_round(base: str, token: str, account_id: int, variant: str, requests: int,
                     concurrency: int, pid: int) -> tuple[float, float]:
    """(server CPU µs per request, median latency ms) of `requests` sends of one variant."""
    import aiohttp

    body = {"account_id": account_id, "peer": "@bench", **VARIANTS[variant]}
    latencies: list[float] = []
    queue = iter(range(requests))
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(base, headers=headers) as http:
        async def client() -> None:
            for _ in queue:
                started = time.perf_counter()
                async with http.post("/api/messages", json=body) as response:
                    await response.read()
                    if response.status != 202:
                        raise RuntimeError(f"{variant}: {response.status} {await response.text()}")
                latencies.append(time.perf_counter() - started)

        cpu_before = api_wrk.cpu_seconds([pid])
        await asyncio.gather(*(client() for _ in range(concurrency)))
        cpu = api_wrk.cpu_seconds([pid]) - cpu_before
    return cpu / requests * 1e6, statistics.median(latencies) * 1e3


def loop_costs(iterations: int) -> dict[str, tuple[float, float]]:
    """Per variant: (µs of the API's text handling, µs of building the sendMessage query)."""
    from telegram_platform.api.routes.messages import formatted
    from telegram_platform.api.schemas.messages import Entity
    from telegram_platform.telegram.content import OutgoingMessage
    from telegram_platform.telegram.formatting import configure_logging
    from telegram_platform.telegram.tdlib.messages import send_message_query

    configure_logging(0)
    out = {}
    for variant, body in VARIANTS.items():
        entities = [Entity(**e) for e in body["entities"]] if "entities" in body else None
        args = (body["text"], body.get("parse_mode"), entities)
        started = time.perf_counter()
        for _ in range(iterations):
            text = formatted(*args)
        handling = (time.perf_counter() - started) / iterations * 1e6
        message = OutgoingMessage(text)
        started = time.perf_counter()
        for _ in range(iterations):
            send_message_query(1, message)
        building = (time.perf_counter() - started) / iterations * 1e6
        out[variant] = (handling, building)
    return out


async def account_for(database_url: str) -> int:
    import asyncpg

    await api_wrk.prepare(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT max(id) FROM accounts"))
    finally:
        await conn.close()


async def measure(args: argparse.Namespace, base: str, token: str, account_id: int, pid: int) -> None:
    names = list(VARIANTS)
    # A warm-up round: connections, caches, TDLib loaded.
    for name in names:
        await send_round(base, token, account_id, name, 100, args.concurrency, pid)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    latency: dict[str, list[float]] = {n: [] for n in names}
    for round_no in range(args.rounds):
        order = names[round_no % len(names):] + names[:round_no % len(names)]
        for name in order:
            us, ms = await send_round(base, token, account_id, name, args.requests, args.concurrency, pid)
            cpu[name].append(us)
            latency[name].append(ms)
    print(f"tp-api, POST /api/messages, {args.rounds} rounds x {args.requests} requests, "
          f"{args.concurrency} at once (median over rounds; ratio to plain within each round)")
    print(f"{'variant':10} {'CPU µs/req':>11} {'ratio':>6} {'latency ms':>11} {'ratio':>6}")
    for name in names:
        cpu_ratio = statistics.median(c / p for c, p in zip(cpu[name], cpu["plain"], strict=True))
        lat_ratio = statistics.median(c / p for c, p in zip(latency[name], latency["plain"], strict=True))
        print(f"{name:10} {statistics.median(cpu[name]):11.0f} {cpu_ratio:6.2f} "
              f"{statistics.median(latency[name]):11.2f} {lat_ratio:6.2f}")


def run(args: argparse.Namespace, database_url: str, redis_url: str, var_dir: Path) -> None:
    account_id = asyncio.run(account_for(database_url))
    port = api_wrk.free_port()
    env = api_wrk.platform_env(database_url, redis_url, port, var_dir)
    env["TP_LOG_LEVEL"] = "warning"  # the request lines alike for every variant; not what is measured
    server = subprocess.Popen([api_wrk.tp_api_path()], env=env, stdout=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        api_wrk.wait_http(f"{base}/api/health")
        asyncio.run(measure(args, base, api_wrk.login(base), account_id, server.pid))
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, api_wrk.backing_services(Path(tmp)) as (database_url, redis_url):
        run(args, database_url, redis_url, Path(tmp) / "var")
    print(f"\nIn a loop, {args.iterations} calls each (no server):")
    print(f"{'variant':10} {'text handling µs':>17} {'sendMessage query µs':>21}")
    for name, (handling, building) in loop_costs(args.iterations).items():
        print(f"{name:10} {handling:17.1f} {building:21.1f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
