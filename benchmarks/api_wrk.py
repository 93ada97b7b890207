"""The API under wrk, beside a bare aiohttp application, in the same run.

    python benchmarks/api_wrk.py [--processes 2] [--duration 10] [--connections 32] [--rounds 2]

Starts N `tp-api` processes sharing one port (reuse_port, as a deployment without supervisord's
socket does) and N bare aiohttp processes sharing another, then runs wrk against
`GET /api/health` and an authenticated `GET /api/messages/{id}` of each, the two sides back to back
(which goes first alternates from round to round), and prints requests/s and p99 latency (medians
over the rounds), the platform/bare ratio (the median of the rounds' own ratios, with a 95%
confidence interval for that median and the rounds' range: on a shared machine the rate drifts by
more than the difference being measured, and a pair run back to back shares most of the drift;
more, shorter rounds narrow the interval), and the servers' CPU time per request (user+system from
/proc). The bare app does the same work without the platform (no middleware, no auth, no
validation): the same JSON for health, the same asyncpg query for the message. Uses
DATABASE_URL/REDIS_URL when set, else throwaway PostgreSQL and Redis. Needs `wrk` (Debian:
apt-get install -y wrk). Load goes to 127.0.0.1 only, and each wrk run is bounded by --duration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

JWT_SECRET = "benchmark-jwt-secret-0123456789abcdef-0123"
ENCRYPTION_KEY = "7" * 64
PASSWORD = "benchmark-password"
MESSAGE_QUERY = (
    "SELECT id, account_id, peer, text, status, attempts, error, error_class, telegram_message_id, "
    "idempotency_key, not_before, sent_at, created_at, updated_at FROM messages WHERE id = $1"
)


# -- the bare application (run in its own processes) --------------------------------------------------

def bare_server(port: int, database_url: str) -> None:
    """What aiohttp does with nothing of the platform: the floor the platform is compared with."""
    import asyncpg
    import msgspec
    from aiohttp import web

    encoder = msgspec.json.Encoder()

    async def health(request: web.Request) -> web.Response:
        return web.Response(body=encoder.encode({"status": "ok"}), content_type="application/json")

    async def message(request: web.Request) -> web.Response:
        row = await request.app["db"].fetchrow(MESSAGE_QUERY, int(request.match_info["id"]))
        return web.Response(body=encoder.encode(dict(row)), content_type="application/json")

    async def pool(app: web.Application):  # type: ignore[no-untyped-def]
        async with asyncpg.create_pool(database_url, min_size=1, max_size=10) as db:
            app["db"] = db
            yield

    app = web.Application()
    app.cleanup_ctx.append(pool)
    app.router.add_get("/api/health", health)
    app.router.add_get("/api/messages/{id}", message)
    web.run_app(app, host="127.0.0.1", port=port, reuse_port=True, access_log=None, print=None)


# -- orchestration ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def backing_services(tmp: Path) -> Iterator[tuple[str, str]]:
    if os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"):
        yield os.environ["DATABASE_URL"], os.environ["REDIS_URL"]
        return
    from telegram_platform.devstack.servers import ThrowawayPostgres, ThrowawayRedis

    with ThrowawayPostgres(tmp / "postgres") as pg, ThrowawayRedis(tmp / "redis") as rds:
        yield pg.url, rds.url


async def prepare(database_url: str) -> int:
    """Migrate; an admin user, an account and one message to read. Returns the message id."""
    import asyncpg

    from telegram_platform.api.security import Passwords
    from telegram_platform.storage.migrations import migrate

    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
        await conn.execute("DELETE FROM users WHERE username = 'bench'")
        await conn.execute("INSERT INTO users (username, password_hash, role) VALUES ('bench', $1, 'admin')",
                           Passwords().hash_sync(PASSWORD))
        account = await conn.fetchval(
            "INSERT INTO accounts (phone) VALUES ('+99966' || (1000000 + floor(random() * 8999999))::bigint) "
            "RETURNING id")
        return int(await conn.fetchval(
            "INSERT INTO messages (account_id, peer, text) VALUES ($1, '@bench', 'hello') RETURNING id", account))
    finally:
        await conn.close()


def platform_env(database_url: str, redis_url: str, port: int, var_dir: Path) -> dict[str, str]:
    """The environment a benchmarked `tp-api` runs in: JSON lines at info (BENCH_LOG_LEVEL), as under
    supervisord, and access tokens that outlive the run."""
    return {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "JWT_SECRET": JWT_SECRET,
            "ENCRYPTION_KEY": ENCRYPTION_KEY, "PORT": str(port), "TP_HOST": "127.0.0.1",
            "TP_LOG_FORMAT": "json", "TP_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "info"),
            "TP_VAR_DIR": str(var_dir), "TP_AUTO_MIGRATE": "false", "TP_ACCESS_TOKEN_TTL": "3600",
            "APP_MODE": "api"}


def tp_api_path() -> str:
    """The `tp-api` installed beside this interpreter (the project's venv), else the one on PATH."""
    return shutil.which("tp-api", path=str(Path(sys.executable).parent)) or "tp-api"


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout}s")
        time.sleep(0.2)


def login(base: str) -> str:
    import json

    request = urllib.request.Request(f"{base}/api/auth/login", method="POST",
                                     data=json.dumps({"username": "bench", "password": PASSWORD}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["access_token"])


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (Linux /proc)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, *, duration: int, connections: int, threads: int, token: str | None,
            pids: list[int]) -> tuple[float, float, float]:
    """(requests/s, p99 ms, server CPU µs per request) of one wrk run; fails on any non-2xx answer."""
    cpu_before = cpu_seconds(pids)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", url]
    if token:
        command[1:1] = ["-H", f"Authorization: Bearer {token}"]
    output = subprocess.run(command, check=True, capture_output=True, text=True,
                            timeout=duration + 30).stdout
    cpu_used = cpu_seconds(pids) - cpu_before
    if "Non-2xx" in output:
        raise RuntimeError(f"non-2xx answers from {url}:\n{output}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    match = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", output)
    assert match, output
    p99 = float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    return rate, p99, cpu_used / total * 1e6


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of `values`: the order statistics
    x(k) and x(n+1-k) for the largest k with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2. With
    fewer than 6 values no k qualifies, and the interval is the whole range."""
    ordered, n = sorted(values), len(values)
    k, below = 0, 0.0  # below = P(Binomial(n, 1/2) < k + 1), the chance that fewer than k+1 fall under the median
    while True:
        below += math.comb(n, k) / 2**n
        if below > (1 - confidence) / 2:
            break
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bare-server", nargs=2, metavar=("PORT", "DATABASE_URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        bare_server(int(args.bare_server[0]), args.bare_server[1])
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with backing_services(tmp) as (database_url, redis_url):
            message_id = asyncio.run(prepare(database_url))
            api_port, bare_port = free_port(), free_port()
            env = platform_env(database_url, redis_url, api_port, tmp / "var")
            tp_api = tp_api_path()
            processes: list[subprocess.Popen[bytes]] = []
            try:
                for i in range(args.processes):
                    # As under supervisord: every request's log line goes to a file.
                    log = open(tmp / f"api-{i}.log", "wb")  # noqa: SIM115 - closed with the process
                    processes.append(subprocess.Popen([tp_api], env={**env, "TP_INSTANCE": f"bench-{i}"},
                                                      stdout=log, stderr=subprocess.STDOUT))
                    processes.append(subprocess.Popen(
                        [sys.executable, __file__, "--bare-server", str(bare_port), database_url],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                api, bare = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{bare_port}"
                wait_http(f"{api}/api/health")
                wait_http(f"{bare}/api/health")
                token = login(api)
                time.sleep(1.0)  # every member up (each has answered at least its start-up)
                platform_pids = [process.pid for process in processes[0::2]]
                bare_pids = [process.pid for process in processes[1::2]]
                targets = [
                    ("GET /api/health", "bare", f"{bare}/api/health", None, bare_pids),
                    ("GET /api/health", "platform", f"{api}/api/health", None, platform_pids),
                    ("GET /api/messages/{id}", "bare", f"{bare}/api/messages/{message_id}", None, bare_pids),
                    ("GET /api/messages/{id}", "platform", f"{api}/api/messages/{message_id}", token,
                     platform_pids),
                ]
                results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
                for number in range(args.rounds):
                    # ABBA: odd rounds run the platform first, so that a machine speeding up or slowing
                    # down within a round favours neither side.
                    order = targets if number % 2 == 0 else [targets[1], targets[0], targets[3], targets[2]]
                    for route, side, url, auth, pids in order:
                        results.setdefault((route, side), []).append(
                            run_wrk(url, duration=args.duration, connections=args.connections,
                                    threads=args.threads, token=auth, pids=pids))
            finally:
                for process in processes:
                    process.send_signal(signal.SIGTERM)
                for process in processes:
                    try:
                        process.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        process.kill()

    print(f"\n{args.processes} processes each side, wrk -t{args.threads} -c{args.connections} "
          f"-d{args.duration}s, {args.rounds} rounds, {os.cpu_count()} CPUs shared with wrk")
    print("req/s, p99 and CPU time: medians over the rounds; ratios: the median of each round's platform/bare "
          "ratio (the two sides run back to back), a 95% confidence interval for it, and the lowest and highest")
    print(f"{'route':<24} {'bare req/s':>11} {'bare p99':>9} {'platform req/s':>15} {'platform p99':>13} "
          f"{'ratio':>6} {'95% CI':>10} {'(range)':>11} {'CPU µs/req bare':>16} {'platform':>9} {'ratio':>6}")
    for route in ("GET /api/health", "GET /api/messages/{id}"):
        bare_runs, platform_runs = results[(route, "bare")], results[(route, "platform")]
        bare_rate, bare_p99, bare_cpu = (statistics.median(run[i] for run in bare_runs) for i in range(3))
        rate, p99, cpu = (statistics.median(run[i] for run in platform_runs) for i in range(3))
        rate_ratios = [platform[0] / bare[0] for bare, platform in zip(bare_runs, platform_runs, strict=True)]
        cpu_ratio = statistics.median(bare[2] / platform[2] for bare, platform in zip(bare_runs, platform_runs,
                                                                                    strict=True))
        spread = f"{min(rate_ratios):.2f}-{max(rate_ratios):.2f}"
        low, high = median_interval(rate_ratios)
        print(f"{route:<24} {bare_rate:>11.0f} {bare_p99:>7.2f}ms {rate:>15.0f} {p99:>11.2f}ms "
              f"{statistics.median(rate_ratios):>6.2f} {f'{low:.2f}-{high:.2f}':>10} {spread:>11} "
              f"{bare_cpu:>16.1f} {cpu:>9.1f} {cpu_ratio:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
