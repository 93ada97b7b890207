"""End-to-end figures of the whole platform: messages per second, POST→sent latency, campaign utilization.

    python benchmarks/platform_bench.py messages [--messages 3000] [--accounts 5]
    python benchmarks/platform_bench.py campaign [--accounts 20 --recipients 10000 --rate 5]
    python benchmarks/platform_bench.py campaign --accounts 1000 --rate 1 --recipients 30000 --login-concurrency 16

Everything runs on this machine, as a deployment would: throwaway PostgreSQL and Redis (or
--database-url / --redis-url), the emulator in a process of its own, `tp-api` (--api-processes
processes sharing the port) and `tp-worker`, started the way supervisord starts them.

`messages`: with the emulator answering at once and no limits, N messages are POSTed by 32
concurrent clients over several accounts; the rate is N over the time from the first POST to the
last message recorded `sent`. Then, on the idle platform, messages are POSTed one at a time and
the latency from the POST to its `message.status: sent` event (what a WebSocket client sees) is
measured: p50 and p99.

`campaign`: N accounts each limited to --rate messages/s (burst 1) in the platform, while the
emulator's Telegram allows each account the same rate with a burst of 2 (limits "set right": the
platform's are within Telegram's). One campaign of --recipients recipients (imported as CSV) runs
to completion. Utilization is the achieved send rate over the rate the limits permit
(accounts x rate), measured between the first and the last accepted message (with 1,000 accounts
at 1/s: the fraction of 1,000 sends/s one host reaches); flood rejections
(429 and PEER_FLOOD answered by the emulator), duplicates and losses are counted at the emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from telegram_platform import events  # noqa: E402
from telegram_platform.redis_auth import RedisAuth  # noqa: E402
from telegram_platform.redis_keys import EVENTS_CHANNEL  # noqa: E402

PASSWORD = "bench-password-" + "x" * 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Platform:
    api: str
    emulator: str
    database_url: str
    redis_url: str
    token: str
    http: aiohttp.ClientSession
    redis_auth: RedisAuth  # to read the events as the platform's processes do (MAC checked)

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        async with self.http.request(method, self.api + path, headers=headers, **kwargs) as response:
            body = await response.json()
            if response.status >= 400:
                raise RuntimeError(f"{method} {path}: {response.status} {body}")
            return body

    async def control(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.http.request(method, self.emulator + path, **kwargs) as response:
            return await response.json()

    async def ready_account(self, index: int) -> int:
        digit = 1 + index % 9
        phone = f"+99966{digit}{2000 + index:04d}"
        account = await self.call("POST", "/api/accounts", json={"phone": phone})
        account = await self.call("POST", f"/api/accounts/{account['id']}/auth/code", json={"code": str(digit) * 5})
        assert account["auth_state"] == "ready", account
        return int(account["id"])


@asynccontextmanager
async def platform(args: argparse.Namespace) -> AsyncIterator[Platform]:
    from telegram_platform.devstack.servers import ThrowawayPostgres, ThrowawayRedis

    async with AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tp-bench-")))
        database_url = args.database_url
        if not database_url:
            server = stack.enter_context(ThrowawayPostgres(tmp / "pg"))
            conn = await asyncpg.connect(server.url)
            await conn.execute("CREATE DATABASE tp_bench")
            await conn.close()
            database_url = server.url.rsplit("/", 1)[0] + "/tp_bench"
        redis_url = args.redis_url or stack.enter_context(ThrowawayRedis(tmp / "redis")).url
        emulator_port, api_port = free_port(), free_port()
        env = {
            "PATH": os.environ.get("PATH", ""), "DATABASE_URL": database_url, "REDIS_URL": redis_url,
            "JWT_SECRET": secrets.token_hex(32), "ENCRYPTION_KEY": secrets.token_hex(32),
            "TP_EMULATOR_URL": f"http://127.0.0.1:{emulator_port}", "TP_VAR_DIR": str(tmp / "var"),
            "TP_LOG_FORMAT": "json", "PORT": str(api_port), "TP_HOST": "127.0.0.1", "TP_DB_POOL_MAX": "20",
            **dict(kv.split("=", 1) for kv in args.env),
        }
        logs = tmp / "logs"
        logs.mkdir()
        processes: list[subprocess.Popen[bytes]] = []

        def start(name: str, code: str, *argv: str, extra: dict[str, str] | None = None) -> None:
            log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            stack.callback(log.close)
            processes.append(subprocess.Popen([sys.executable, "-c", code, *argv], env={**env, **(extra or {})},
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

        def stop_all() -> None:
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)

        stack.callback(stop_all)
        start("emulator", "import sys; sys.argv[0]='tp-emulator'; from telegram_platform.cli.emulator import main; "
              "main()", "--port", str(emulator_port), "--latency-ms", "0")
        tp = [sys.executable, "-c", "from telegram_platform.cli.tp import main; main()"]
        await asyncio.to_thread(subprocess.run, [*tp, "migrate"], env=env, check=True, capture_output=True)
        create = await asyncio.to_thread(
            subprocess.run, [*tp, "create-user", "--username", "bench", "--role", "admin", "--password-stdin"],
            env=env, input=PASSWORD.encode(), capture_output=True)
        if create.returncode != 0:
            raise RuntimeError(create.stderr.decode())
        for i in range(args.api_processes):
            start(f"api-{i}", "from telegram_platform.cli.api import main; main()", extra={"TP_INSTANCE": f"api-{i}"})
        start("worker", "from telegram_platform.cli.worker import main; main()", extra={"TP_INSTANCE": "tp-worker"})
        http = await stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200), timeout=aiohttp.ClientTimeout(total=60)))
        api = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                async with http.post(api + "/api/auth/login", json={"username": "bench", "password": PASSWORD}) as r:
                    if r.status == 200:
                        token = (await r.json())["access_token"]
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not come up; logs in {logs}")
            await asyncio.sleep(0.2)
        bench = Platform(api, f"http://127.0.0.1:{emulator_port}", database_url, redis_url, token, http,
                         RedisAuth(bytes.fromhex(env["ENCRYPTION_KEY"])))
        for _ in range(100):  # the worker answers account requests once it is up
            try:
                await bench.call("GET", "/api/health/detailed")
                break
            except RuntimeError:
                await asyncio.sleep(0.2)
        print(f"platform up: {args.api_processes} API process(es), 1 worker; logs in {logs}", flush=True)
        yield bench
        if args.keep_logs:
            kept = Path(tempfile.mkdtemp(prefix="tp-bench-logs-"))
            for f in logs.iterdir():
                (kept / f.name).write_bytes(f.read_bytes())
            print(f"logs kept in {kept}")


async def bench_messages(p: Platform, args: argparse.Namespace) -> None:
    accounts = [await p.ready_account(i) for i in range(args.accounts)]
    db = await asyncpg.connect(p.database_url)
    # Throughput: N messages as fast as 32 clients can POST them.
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.messages):
        queue.put_nowait(i)
    posted: list[float] = []

    async def client() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            await p.call("POST", "/api/messages", json={"account_id": accounts[i % len(accounts)],
                                                         "peer": f"@m{i}", "text": f"message {i}"})
            posted.append(time.perf_counter())

    base = await db.fetchval("SELECT count(*) FROM messages WHERE status = 'sent'")
    started = time.perf_counter()
    clients = [asyncio.create_task(client()) for _ in range(32)]
    while True:
        sent = await db.fetchval("SELECT count(*) FROM messages WHERE status = 'sent'") - base
        if sent >= args.messages:
            break
        if time.perf_counter() - started > 600:
            raise RuntimeError(f"only {sent} of {args.messages} sent in 600 s")
        await asyncio.sleep(0.02)
    finished = time.perf_counter()
    await asyncio.gather(*clients)
    accepted = (max(posted) - started)
    print(f"\nmessages end to end: {args.messages} messages, {len(accounts)} accounts, 32 clients")
    print(f"  accepted by the API  {args.messages / accepted:8.0f} msg/s  (last 202 after {accepted:.2f} s)")
    print(f"  POST -> sent         {args.messages / (finished - started):8.0f} msg/s  "
          f"(all sent after {finished - started:.2f} s)")

    # Latency on an idle platform, POST -> the `sent` event.
    await asyncio.sleep(2)
    redis = aioredis.Redis.from_url(p.redis_url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(EVENTS_CHANNEL)
    latencies = []
    for i in range(args.latency_samples):
        t0 = time.perf_counter()
        message = await p.call("POST", "/api/messages", json={"account_id": accounts[0], "peer": f"@lat{i}",
                                                              "text": "latency"})
        deadline = time.monotonic() + 10
        while True:
            event = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if event is None:  # a timeout, or the subscription's own confirmation
                if time.monotonic() > deadline:
                    raise RuntimeError("no `sent` event within 10 s")
                continue
            text = events.open_published(p.redis_auth, event["data"])
            if text is None:
                continue
            data = json.loads(text)
            if data["type"] == "message.status" and data["data"]["message_id"] == message["id"] \
                    and data["data"]["status"] == "sent":
                break
        latencies.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.05)
    await pubsub.aclose()
    await redis.aclose()
    await db.close()
    print(f"  idle latency POST -> sent event, {len(latencies)} samples: p50 {percentile(latencies, 50):.1f} ms, "
          f"p99 {percentile(latencies, 99):.1f} ms, max {max(latencies):.1f} ms")


async def bench_campaign(p: Platform, args: argparse.Namespace) -> None:
    await p.control("POST", "/control/config", json={"account_rate": args.rate, "account_burst": 2,
                                                      "latency_ms": args.latency_ms})
    slots = asyncio.Semaphore(args.login_concurrency)

    async def ready(index: int) -> int:
        async with slots:
            account_id = await p.ready_account(100 + index)
            await p.call("PUT", f"/api/accounts/{account_id}/limits", json={
                "per_second": args.rate, "burst": 1, "per_chat_seconds": 0, "per_day": 10_000_000, "warmup_days": 0})
            return account_id

    logging_in = time.perf_counter()
    accounts = list(await asyncio.gather(*(ready(i) for i in range(args.accounts))))
    print(f"{args.accounts} accounts logged in in {time.perf_counter() - logging_in:.1f} s", flush=True)
    campaign = await p.call("POST", "/api/campaigns", json={"name": "utilization", "account_ids": accounts,
                                                            "template": "Hello {first_name}!"})
    csv_body = "peer,first_name\n" + "".join(f"@r{i},Name{i}\n" for i in range(args.recipients))
    await p.call("POST", f"/api/campaigns/{campaign['id']}/recipients/import", data=csv_body.encode(),
                 headers={"Content-Type": "text/csv"})
    started = time.perf_counter()
    await p.call("POST", f"/api/campaigns/{campaign['id']}/start")
    while True:
        state = await p.call("GET", f"/api/campaigns/{campaign['id']}")
        if state["status"] != "running":
            break
        await asyncio.sleep(0.5)
    elapsed = time.perf_counter() - started
    received = (await p.control("GET", "/control/received"))["messages"]
    stats = await p.control("GET", "/control/stats")
    deliveries = (await p.control("GET", "/control/deliveries"))["recipients"]
    times = sorted(m["at"] for m in received)
    permitted = args.accounts * args.rate
    steady = (len(times) - args.accounts) / (times[-1] - times[0]) if len(times) > args.accounts else 0.0
    counters = stats["counters"]
    lost = sum(1 for i in range(args.recipients) if deliveries.get(f"@r{i}", 0) == 0)
    print(f"\ncampaign: {args.recipients} recipients, {args.accounts} accounts x {args.rate}/s "
          f"(permitted {permitted:.0f}/s), status {state['status']}, progress {state['progress']}")
    print(f"  achieved {steady:7.1f} msg/s between first and last send = {steady / permitted:6.1%} of permitted")
    print(f"  end to end (start -> completed seen) {elapsed:.1f} s = "
          f"{args.recipients / elapsed / permitted:6.1%} of permitted")
    print(f"  flood rejections: 429 {counters.get('rate_limited', 0)}, PEER_FLOOD {counters.get('peer_flood', 0)}; "
          f"duplicates {stats['duplicates']}; losses {lost}; deduplicated re-sends {counters.get('deduplicated', 0)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["messages", "campaign"])
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--api-processes", type=int, default=2)
    parser.add_argument("--accounts", type=int)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=5.0, help="per-account messages/s (campaign)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="emulator latency (campaign)")
    parser.add_argument("--login-concurrency", type=int, default=1,
                        help="accounts logged in at once (campaign; 16 for --accounts 1000)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the platform's processes (e.g. TP_LOG_EACH_JOB=false)")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if args.accounts is None:
        args.accounts = 5 if args.scenario == "messages" else 20
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}", flush=True)

    async def run() -> None:
        async with platform(args) as p:
            await (bench_messages(p, args) if args.scenario == "messages" else bench_campaign(p, args))

    asyncio.run(run())


if __name__ == "__main__":
    main()
