"""The API's cost per request in CPU instructions, beside a bare aiohttp application, in one run.

    python benchmarks/api_instructions.py [--requests 2000] [--connections 16] [--keep DIR] [--cache-sim]

wrk's requests/s (benchmarks/api_wrk.py) is the figure that matters, but on a shared virtual
machine it moves by ±20% from one run to the next, more than the differences being looked for.
This counts instructions instead, with valgrind's callgrind: the same count for the same work,
whatever else the machine is doing. Each server (one `tp-api`, one bare aiohttp process: the same
as api_wrk.py's) runs under callgrind with counting off; after a warm-up the count is switched on
for exactly `--requests` requests (`GET /api/health`, then an authenticated `GET /api/messages/{id}`)
and off again. Prints instructions per request and the bare/platform ratio. `--keep DIR` keeps the
callgrind dumps there (`callgrind_annotate DIR/callgrind.platform.*.1` shows where a health check's
instructions go, by C function); `--cache-sim` also simulates the caches and prints misses per
request (the instruction counts stay the same; a run takes longer).

Under callgrind a server runs ~50x slower, so a 20 ms batch of request lines holds ~16 requests
where wrk's load gives it hundreds: per-batch costs weigh a little more here than in production.
Needs valgrind (Debian: apt-get install -y valgrind). Uses DATABASE_URL/REDIS_URL when set, else
throwaway servers.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import api_wrk  # the bare application and the set-up, shared with the wrk benchmark


async def drive(port: int, path: str, requests: int, connections: int, token: str | None) -> None:
    """Exactly `requests` keep-alive GETs over `connections` connections; fails on any non-200."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n".encode()

    async def one_connection(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(count):
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"GET {path}: {head.splitlines()[0].decode()}")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                assert length, head
                await reader.readexactly(int(length.group(1)))
        finally:
            writer.close()

    share, extra = divmod(requests, connections)
    await asyncio.gather(*(one_connection(share + (i < extra)) for i in range(connections)))


def callgrind_totals(path: Path, timeout: float = 30.0) -> dict[str, int]:
    """A dump's totals by event (`Ir`, and with --cache-sim `I1mr`, `D1mr`, ...), once callgrind has
    written it to the end (`totals:`)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        events, totals = re.search(r"^events: *(.+)$", text, re.M), re.search(r"^totals: *(.+)$", text, re.M)
        if events and totals:
            return dict(zip(events.group(1).split(), map(int, totals.group(1).split()), strict=True))
        if time.monotonic() > deadline:
            raise RuntimeError(f"no instruction total in {path} after {timeout}s")
        time.sleep(0.1)


def measure(command: list[str], env: dict[str, str], port: int, targets: list[tuple[str, str | None]],
            requests: int, connections: int, out_dir: Path, side: str, cache_sim: bool) -> list[dict[str, float]]:
    """Events (instructions, and cache misses with `cache_sim`) per request for each (path, token) of
    `targets`, served by `command` under callgrind."""
    out_file = out_dir / f"callgrind.{side}"
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--cache-sim={'yes' if cache_sim else 'no'}",
         f"--callgrind-out-file={out_file}.%p", *command],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api_wrk.wait_http(f"http://127.0.0.1:{port}/api/health", timeout=300)
        results = []
        for number, (path, token) in enumerate(targets, start=1):
            asyncio.run(drive(port, path, max(requests // 2, 200), connections, token))  # warm up
            subprocess.run(["callgrind_control", "-i", "on", str(process.pid)], check=True, capture_output=True)
            asyncio.run(drive(port, path, requests, connections, token))
            subprocess.run(["callgrind_control", "-i", "off", str(process.pid)], check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True, capture_output=True)
            totals = callgrind_totals(Path(f"{out_file}.{process.pid}.{number}"))
            results.append({event: count / requests for event, count in totals.items()})
            subprocess.run(["callgrind_control", "-z", str(process.pid)], check=True, capture_output=True)
        return results
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the callgrind dumps in DIR")
    parser.add_argument("--cache-sim", action="store_true",
                        help="simulate the caches too (slower) and print misses per request")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (Debian: apt-get install -y valgrind)", file=sys.stderr)
            return 2

    with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with api_wrk.backing_services(tmp) as (database_url, redis_url):
            message_id = asyncio.run(api_wrk.prepare(database_url))
            api_port, bare_port = api_wrk.free_port(), api_wrk.free_port()
            env = {**api_wrk.platform_env(database_url, redis_url, api_port, tmp / "var"), "TP_INSTANCE": "bench-0"}
            tp_api = api_wrk.tp_api_path()
            # The platform first: its login gives the token both sides send (the bare app ignores it).
            with subprocess.Popen([tp_api], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as api:
                try:
                    api_wrk.wait_http(f"http://127.0.0.1:{api_port}/api/health")
                    token = api_wrk.login(f"http://127.0.0.1:{api_port}")
                finally:
                    api.send_signal(signal.SIGTERM)
            paths = [("/api/health", None), (f"/api/messages/{message_id}", token)]
            bare = measure([sys.executable, api_wrk.__file__, "--bare-server", str(bare_port), database_url], env,
                           bare_port, paths, args.requests, args.connections, tmp, "bare", args.cache_sim)
            platform = measure([sys.executable, tp_api], env, api_port, paths, args.requests, args.connections,
                               tmp, "platform", args.cache_sim)
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                for dump in tmp.glob("callgrind.*"):
                    shutil.copy2(dump, args.keep / dump.name)

    print(f"\ninstructions per request (callgrind), {args.requests} requests over {args.connections} connections")
    print(f"{'route':<24} {'bare':>10} {'platform':>10} {'bare/platform':>14}")
    routes = ("GET /api/health", "GET /api/messages/{id}")
    for route, bare_events, platform_events in zip(routes, bare, platform, strict=True):
        bare_count, platform_count = bare_events["Ir"], platform_events["Ir"]
        print(f"{route:<24} {bare_count:>10.0f} {platform_count:>10.0f} {bare_count / platform_count:>14.3f}")
    if args.cache_sim:
        # Instruction-cache and first-level data misses (reads, writes), and last-level misses of all kinds.
        print("\ncache misses per request (simulated), bare / platform")
        print(f"{'route':<24} {'I1':>15} {'D1 read':>15} {'D1 write':>15} {'last level':>15}")
        for route, bare_events, platform_events in zip(routes, bare, platform, strict=True):
            cells = []
            for events in (("I1mr",), ("D1mr",), ("D1mw",), ("ILmr", "DLmr", "DLmw")):
                pair = [sum(side[event] for event in events) for side in (bare_events, platform_events)]
                cells.append(f"{pair[0]:.0f} / {pair[1]:.0f}")
            print(f"{route:<24} " + " ".join(f"{cell:>15}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
