"""What the platform costs PostgreSQL and Redis: per send, per minute of idle, per hosted account.

    python benchmarks/substrate_costs.py [--small 10 --large 50 --idle-seconds 30 --sends 500]

The platform runs as platform_bench.py runs it (throwaway PostgreSQL and Redis, the emulator, one
`tp-api` process and one `tp-worker`). Counters read before and after each phase:
- Redis: INFO commandstats (calls and command time per command; a script's own calls are counted
  beside it, and its time includes theirs), INFO stats (network bytes in and out), INFO memory
  (used_memory), INFO cpu (the server's CPU time, network I/O included), DBSIZE;
- PostgreSQL: pg_stat_database (commits, reads included; rows inserted, updated, deleted),
  pg_stat_user_tables (rows written per table), the WAL position (bytes written), and the size of
  the platform's tables (pg_total_relation_size).

Phases: --small accounts logged in, idle for --idle-seconds; --large accounts, idle again (the two
idle rates give a fixed part and a part per hosted account; the memory and table growth between
them, a cost per account); then --sends messages POSTed and waited for until `sent`, the idle
background over that time subtracted, divided by the number of messages. The benchmark's own
reads are left out (INFO is not counted; each PostgreSQL read it makes is one commit, counted and
subtracted). With --capacity, redis-benchmark and pgbench then measure what the same servers
take on this machine, and the commands are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import asyncpg
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))  # platform_bench, a sibling script
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from platform_bench import Platform, platform

SNAPSHOT_SQL = """
SELECT d.xact_commit, d.tup_inserted, d.tup_updated, d.tup_deleted,
       (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint AS lsn,
       (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind = 'r') AS table_bytes,
       (SELECT count(*) FROM messages WHERE status = 'sent') AS sent
  FROM pg_stat_database d WHERE d.datname = current_database()
"""
TABLE_WRITES_SQL = "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del AS written FROM pg_stat_user_tables"


@dataclass
class Counters:
    """One reading of both servers' counters."""

    at: float
    commands: dict[str, tuple[int, int]]  # command -> (calls, usec)
    net_in: int
    net_out: int
    used_memory: int
    keys: int
    cpu: float  # the Redis server's CPU seconds, user and system: command time and network I/O
    xact_commit: int
    tup_inserted: int
    tup_updated: int
    tup_deleted: int
    wal: int
    table_bytes: int
    sent: int
    table_writes: dict[str, int]


@dataclass
class Delta:
    """The difference of two readings, scaled (per send, per minute)."""

    seconds: float
    commands: dict[str, tuple[float, float]] = field(default_factory=dict)
    net_in: float = 0.0
    net_out: float = 0.0
    used_memory: float = 0.0
    xact_commit: float = 0.0
    tup_written: float = 0.0
    wal: float = 0.0
    table_bytes: float = 0.0
    table_writes: dict[str, float] = field(default_factory=dict)
    cpu: float = 0.0

    def scaled(self, factor: float) -> Delta:
        return Delta(self.seconds, {k: (c * factor, u * factor) for k, (c, u) in self.commands.items()},
                     self.net_in * factor, self.net_out * factor, self.used_memory * factor,
                     self.xact_commit * factor, self.tup_written * factor, self.wal * factor,
                     self.table_bytes * factor, {k: v * factor for k, v in self.table_writes.items()},
                     self.cpu * factor)

    def minus(self, other: Delta) -> Delta:
        names = set(self.commands) | set(other.commands)
        commands = {k: (self.commands.get(k, (0.0, 0.0))[0] - other.commands.get(k, (0.0, 0.0))[0],
                        self.commands.get(k, (0.0, 0.0))[1] - other.commands.get(k, (0.0, 0.0))[1])
                    for k in names}
        return Delta(self.seconds, commands, self.net_in - other.net_in, self.net_out - other.net_out,
                     self.used_memory - other.used_memory, self.xact_commit - other.xact_commit,
                     self.tup_written - other.tup_written, self.wal - other.wal,
                     self.table_bytes - other.table_bytes,
                     {k: self.table_writes.get(k, 0.0) - other.table_writes.get(k, 0.0)
                      for k in set(self.table_writes) | set(other.table_writes)},
                     self.cpu - other.cpu)

    @property
    def redis_calls(self) -> float:
        return sum(c for c, _ in self.commands.values())

    @property
    def redis_usec(self) -> float:
        return sum(u for _, u in self.commands.values())


class Meter:
    """Reads the counters; its own PostgreSQL commits are counted so they can be left out."""

    def __init__(self, redis: aioredis.Redis, db: asyncpg.Connection) -> None:
        self.redis = redis
        self.db = db
        self.own_commits = 0

    async def sent(self) -> int:
        self.own_commits += 1
        return int(await self.db.fetchval("SELECT count(*) FROM messages WHERE status = 'sent'"))

    async def read(self) -> Counters:
        # An idle backend's statistics reach pg_stat_database up to 10 s after its last transaction.
        await asyncio.sleep(11)
        self.own_commits += 1
        await self.db.execute("SELECT pg_stat_clear_snapshot()")
        self.own_commits += 1
        row = await self.db.fetchrow(SNAPSHOT_SQL)
        self.own_commits += 1
        tables = {r["relname"]: int(r["written"]) for r in await self.db.fetch(TABLE_WRITES_SQL)}
        stats = await self.redis.info("commandstats")
        commands = {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                    for name, v in stats.items() if name != "cmdstat_info"}
        info = await self.redis.info()
        return Counters(time.monotonic(), commands, int(info["total_net_input_bytes"]),
                        int(info["total_net_output_bytes"]), int(info["used_memory"]),
                        int(await self.redis.dbsize()),
                        float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
                        int(row["xact_commit"]), int(row["tup_inserted"]), int(row["tup_updated"]),
                        int(row["tup_deleted"]), int(row["lsn"]), int(row["table_bytes"]), int(row["sent"]),
                        tables)

    @staticmethod
    def delta(before: Counters, after: Counters, own_commits: int) -> Delta:
        names = set(before.commands) | set(after.commands)
        commands = {k: (float(after.commands.get(k, (0, 0))[0] - before.commands.get(k, (0, 0))[0]),
                        float(after.commands.get(k, (0, 0))[1] - before.commands.get(k, (0, 0))[1]))
                    for k in names}
        return Delta(after.at - before.at, {k: v for k, v in commands.items() if v[0]},
                     after.net_in - before.net_in, after.net_out - before.net_out,
                     after.used_memory - before.used_memory,
                     after.xact_commit - before.xact_commit - own_commits,
                     (after.tup_inserted + after.tup_updated + after.tup_deleted)
                     - (before.tup_inserted + before.tup_updated + before.tup_deleted),
                     after.wal - before.wal, after.table_bytes - before.table_bytes,
                     {k: float(v - before.table_writes.get(k, 0)) for k, v in after.table_writes.items()
                      if v != before.table_writes.get(k, 0)},
                     after.cpu - before.cpu)

    async def measure_idle(self, seconds: float) -> Delta:
        """Counters over `seconds` with nothing sent, per minute."""
        before = await self.read()
        self.own_commits = 0
        await asyncio.sleep(seconds)
        after = await self.read()
        own, self.own_commits = self.own_commits - 1, 0  # the second read's clear_snapshot came after `before`'s row
        return self.delta(before, after, own).scaled(60.0 / (after.at - before.at))


async def send_all(p: Platform, meter: Meter, accounts: list[int], count: int) -> float:
    """POST `count` messages over the accounts (8 at a time) and wait until all are `sent`; the seconds taken."""
    base = await meter.sent()
    started = time.monotonic()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def client() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            await p.call("POST", "/api/messages", json={"account_id": accounts[i % len(accounts)],
                                                         "peer": f"@cost{i}", "text": f"cost {i}"})

    await asyncio.gather(*(client() for _ in range(8)))
    while await meter.sent() - base < count:
        if time.monotonic() - started > 600:
            raise RuntimeError("sends did not finish within 600 s")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


def row(label: str, d: Delta) -> str:
    return (f"  {label:<26} redis {d.redis_calls:8.1f} cmds {d.redis_usec:9.0f} us cmd {d.cpu * 1e6:9.0f} us cpu "
            f"in {d.net_in:9.0f} B out {d.net_out:9.0f} B | pg {d.xact_commit:7.1f} commits "
            f"{d.tup_written:7.1f} rows {d.wal:9.0f} B WAL")


def table_rows(d: Delta) -> str:
    ordered = sorted(d.table_writes.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {rows:.2f}" for name, rows in ordered if abs(rows) >= 0.005)


def top_commands(d: Delta, limit: int = 12) -> str:
    ordered = sorted(d.commands.items(), key=lambda kv: -kv[1][0])[:limit]
    return ", ".join(f"{name} {calls:.2f}" for name, (calls, _) in ordered)


async def log_in(p: Platform, first: int, count: int) -> list[int]:
    return [await p.ready_account(first + i) for i in range(count)]


def run_capacity(p: Platform) -> None:
    """What these servers take on this machine: the commands, then their output."""
    r = urlparse(p.redis_url)
    d = urlparse(p.database_url)
    redis_cmd = ["redis-benchmark", "-h", r.hostname or "127.0.0.1", "-p", str(r.port), "-q", "-n", "200000",
                 "-c", "50", "-t", "ping,set,get,incr,lpush,rpop,zadd,hset"]
    redis_eval = ["redis-benchmark", "-h", r.hostname or "127.0.0.1", "-p", str(r.port), "-q", "-n", "100000",
                  "-c", "50", "eval", "redis.call('set', KEYS[1], ARGV[1]); return redis.call('get', KEYS[1])",
                  "1", "k", "v"]
    env = {**os.environ, "PGPASSWORD": d.password or ""}
    conn = ["-h", d.hostname or "127.0.0.1", "-p", str(d.port), "-U", d.username or "postgres"]
    init = ["pgbench", "-i", "-q", "-s", "1", *conn, (d.path or "/").lstrip("/")]
    bench = ["pgbench", "-N", "-c", "8", "-j", "2", "-T", "20", *conn, (d.path or "/").lstrip("/")]
    print("\ncapacity of these servers on this machine (PostgreSQL here runs fsync=off, synchronous_commit=off):")
    for argv in (redis_cmd, redis_eval, init, bench):
        print("$ " + shlex.join(argv), flush=True)
        out = subprocess.run(argv, env=env, capture_output=True, text=True)
        lines = [ln for ln in (out.stdout + out.stderr).splitlines()
                 if "requests per second" in ln or "tps" in ln or "latency average" in ln or out.returncode]
        print("\n".join("  " + ln.strip() for ln in lines[-12:]), flush=True)


async def bench(p: Platform, args: argparse.Namespace) -> None:
    db = await asyncpg.connect(p.database_url)
    redis = aioredis.Redis.from_url(p.redis_url)
    meter = Meter(redis, db)
    try:
        accounts = await log_in(p, 0, args.small)
        await asyncio.sleep(args.settle)
        small_mem = await meter.read()
        idle_small = await meter.measure_idle(args.idle_seconds)
        accounts += await log_in(p, args.small, args.large - args.small)
        await asyncio.sleep(args.settle)
        large_mem = await meter.read()
        idle_large = await meter.measure_idle(args.idle_seconds)
        added = args.large - args.small
        per_account_mem = (large_mem.used_memory - small_mem.used_memory) / added
        per_account_keys = (large_mem.keys - small_mem.keys) / added
        per_account_pg = (large_mem.table_bytes - small_mem.table_bytes) / added
        per_account_idle = idle_large.minus(idle_small).scaled(1.0 / added)
        fixed_idle = idle_small.minus(per_account_idle.scaled(float(args.small)))

        before = await meter.read()
        meter.own_commits = 0
        elapsed = await send_all(p, meter, accounts, args.sends)
        after = await meter.read()
        own, meter.own_commits = meter.own_commits - 1, 0
        raw = Meter.delta(before, after, own)
        background = idle_large.scaled((after.at - before.at) / 60.0)
        per_send = raw.minus(background).scaled(1.0 / args.sends)
        per_send_bytes = (after.table_bytes - before.table_bytes) / args.sends
    finally:
        await redis.aclose()
        await db.close()

    print(f"\nidle, per minute ({args.idle_seconds:.0f} s measured each):")
    print(row(f"{args.small} accounts hosted", idle_small))
    print(row(f"{args.large} accounts hosted", idle_large))
    print(row("fixed (0 accounts, fitted)", fixed_idle))
    print(row("each hosted account", per_account_idle))
    print(f"  commands, {args.large} accounts: {top_commands(idle_large)}")
    print(f"  rows written, {args.large} accounts: {table_rows(idle_large)}")
    print(f"\nper send ({args.sends} messages over {len(accounts)} accounts in {elapsed:.1f} s, "
          f"{args.sends / elapsed:.0f} msg/s; idle background subtracted):")
    print(row("one message, POST -> sent", per_send))
    print(f"  commands: {top_commands(per_send, 20)}")
    print(f"  rows written: {table_rows(per_send)}")
    print("\nmemory and storage:")
    print(f"  Redis used_memory per hosted account   {per_account_mem:9.0f} B  ({per_account_keys:.1f} keys)")
    print(f"  PostgreSQL tables per account           {per_account_pg:9.0f} B  (login rows, events, snapshot)")
    print(f"  PostgreSQL tables per sent message      {per_send_bytes:9.0f} B  (message, outbox, events)")
    print(f"  Redis used_memory now                    {after.used_memory:9d} B  ({after.keys} keys)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=10, help="accounts hosted in the first idle phase")
    parser.add_argument("--large", type=int, default=50, help="accounts hosted in the second idle phase")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after logins before measuring")
    parser.add_argument("--sends", type=int, default=500)
    parser.add_argument("--capacity", action="store_true", help="then run redis-benchmark and pgbench")
    args = parser.parse_args()
    # what platform() reads
    args.database_url = args.redis_url = None
    args.api_processes, args.env, args.keep_logs = 1, [], False
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}", flush=True)

    async def run() -> None:
        async with platform(args) as p:
            await bench(p, args)
            if args.capacity:
                await asyncio.to_thread(run_capacity, p)

    asyncio.run(run())


if __name__ == "__main__":
    main()
