"""What the hosts' membership costs PostgreSQL: a heartbeat, and listing the hosts with the
accounts each owns, on a throwaway server.

    python benchmarks/hosts_table.py [--hosts 100] [--accounts 100000] [--heartbeats 2000]

Times `storage.hosts.announce` (one worker child's heartbeat, a single-row upsert) `--heartbeats`
times over `--hosts` hosts, then gives `--accounts` accounts an owner host, spread evenly, and times
`storage.hosts.list_hosts` (what `GET /api/hosts` and `tp hosts` query), the median of 50.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg

from telegram_platform.devstack.servers import ThrowawayPostgres
from telegram_platform.storage import hosts as host_store
from telegram_platform.storage.migrations import migrate


async def measure(url: str, hosts: int, accounts: int, heartbeats: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        latencies = []
        for i in range(heartbeats):
            started = time.perf_counter()
            await host_store.announce(conn, f"host-{i % hosts}")
            latencies.append(time.perf_counter() - started)
        latencies.sort()
        print(f"heartbeat (announce): p50 {latencies[len(latencies) // 2] * 1e3:.3f} ms, "
              f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.3f} ms")
        await conn.execute("""INSERT INTO accounts (phone, owner_host)
                              SELECT '+1' || g, 'host-' || (g % $2) FROM generate_series(1, $1) g""",
                           accounts, hosts)
        await conn.execute("VACUUM ANALYZE accounts")
        listings = []
        for _ in range(50):
            started = time.perf_counter()
            rows = await host_store.list_hosts(conn, gone_after=30)
            listings.append(time.perf_counter() - started)
        owned = sum(row["accounts_owned"] for row in rows)
        print(f"list_hosts: {len(rows)} hosts, {owned} accounts owned: median "
              f"{statistics.median(listings) * 1e3:.1f} ms")
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--heartbeats", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tp-bench-hosts-") as tmp, ThrowawayPostgres(Path(tmp)) as server:
        asyncio.run(measure(server.url_for("postgres"), args.hosts, args.accounts, args.heartbeats))


if __name__ == "__main__":
    main()
