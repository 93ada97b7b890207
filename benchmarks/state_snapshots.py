"""What portable Telegram state costs (worker/tdstate.py): each account's snapshot size, the time to
take and to restore one, and what the snapshots occupy in PostgreSQL.

    python benchmarks/state_snapshots.py --accounts 200 [--database-url URL]

Two backends: the emulator (a real login through an in-process emulator, so the login file holds a
session) and the real TDLib offline (clients reach WAIT_PHONE; the binlog then holds no
authorization yet). For each: N accounts' state is taken into PostgreSQL as their owner, taken
again unchanged (skipped without a round trip), then restored into another host's empty data
directory. A throwaway PostgreSQL is started unless --database-url names one.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from telegram_platform.settings import TdlibSettings
from telegram_platform.storage import accounts as account_store
from telegram_platform.storage.migrations import migrate
from telegram_platform.telegram.base import AuthState, SessionConfig, TelegramBackend, Update
from telegram_platform.telegram.keys import derive_database_key
from telegram_platform.worker.tdstate import StateSnapshots

ENCRYPTION_KEY = bytes(range(32))
TEST_API_ID = 94575
TEST_API_HASH = "a3406de8d171bb422bb6ddf3bbd800e2"


async def _ignore(update: Update) -> None:
    return None


@asynccontextmanager
async def database(url: str | None, tmp: Path) -> AsyncIterator[asyncpg.Pool]:
    from telegram_platform.devstack.servers import ThrowawayPostgres

    async with AsyncExitStack() as stack:
        if not url:
            server = stack.enter_context(ThrowawayPostgres(tmp / "pg"))
            conn = await asyncpg.connect(server.url)
            await conn.execute("CREATE DATABASE tp_snapshots")
            await conn.close()
            url = server.url.rsplit("/", 1)[0] + "/tp_snapshots"
        pool = await asyncpg.create_pool(url, min_size=1, max_size=20)
        stack.push_async_callback(pool.close)
        async with pool.acquire() as conn:
            await migrate(conn)
            await conn.execute("TRUNCATE accounts RESTART IDENTITY CASCADE")
        yield pool


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    return (f"p50 {statistics.median(ordered) * 1000:.2f} ms, "
            f"p99 {ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000:.2f} ms")


async def _timed(calls: list[Callable[[], Awaitable[object]]]) -> tuple[list[float], float]:
    """Each call one after another: its own time, and the total."""
    each = []
    started = time.perf_counter()
    for call in calls:
        before = time.perf_counter()
        await call()
        each.append(time.perf_counter() - before)
    return each, time.perf_counter() - started


async def measure(name: str, pool: asyncpg.Pool, backend_a: TelegramBackend, backend_b: TelegramBackend,
                  owners: dict[int, int]) -> None:
    state_a = StateSnapshots(pool, ENCRYPTION_KEY, backend_a)
    state_b = StateSnapshots(pool, ENCRYPTION_KEY, backend_b)
    accounts = sorted(owners)
    taken, total = await _timed([lambda a=a: state_a.take(a, owners[a]) for a in accounts])  # type: ignore[misc]
    sizes = [state_a.sizes[a] for a in accounts]
    unchanged, _ = await _timed([lambda a=a: state_a.take(a, owners[a]) for a in accounts])  # type: ignore[misc]
    restored, restore_total = await _timed([lambda a=a: state_b.restore(a) for a in accounts])  # type: ignore[misc]
    files = sum(len(p.read_bytes()) for a in accounts for p in backend_a.database_dir(a).iterdir() if p.is_file())
    table = await pool.fetchval("SELECT pg_total_relation_size('account_snapshots')")
    print(f"[{name}] {len(accounts)} accounts; local directory {files / len(accounts):,.0f} B/account "
          f"(all files), snapshot sealed {statistics.mean(sizes):,.0f} B/account (min {min(sizes)}, max {max(sizes)})")
    print(f"[{name}] take   : {_ms(taken)}; {len(accounts) / total:,.0f}/s one at a time "
          f"({state_a.counts['taken']} written)")
    print(f"[{name}] take, unchanged (no round trip): {_ms(unchanged)} ({state_a.counts['unchanged']} skipped)")
    print(f"[{name}] restore into an empty directory: {_ms(restored)}; {len(accounts) / restore_total:,.0f}/s "
          f"({state_b.counts['restored']} restored)")
    print(f"[{name}] PostgreSQL account_snapshots: {table:,} B in all, {table / len(accounts):,.0f} B/account")


async def owners_of(pool: asyncpg.Pool, count: int, first_phone: int) -> dict[int, int]:
    owners = {}
    for i in range(count):
        account = await account_store.create_account(pool, f"+99966{first_phone + i:05d}", None)
        owners[int(account["id"])] = await account_store.take_ownership(pool, account["id"], "bench")
    return owners


async def emulator_run(pool: asyncpg.Pool, tmp: Path, count: int) -> None:
    from aiohttp import web

    from telegram_platform.telegram.emulator.backend import EmulatorBackend
    from telegram_platform.telegram.emulator.http import create_emulator_app
    from telegram_platform.telegram.emulator.model import EmulatorConfig, TelegramEmulator

    runner = web.AppRunner(create_emulator_app(TelegramEmulator(EmulatorConfig(latency_ms=0.0))))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # aiohttp keeps the bound socket here
    url = f"http://127.0.0.1:{port}"
    backend_a = EmulatorBackend(url, tmp / "emu-a", on_update=_ignore)
    backend_b = EmulatorBackend(url, tmp / "emu-b", on_update=_ignore)
    try:
        owners = await owners_of(pool, count, 10000)
        for account_id in owners:
            row = await account_store.get_account(pool, account_id)
            session = await backend_a.open_session(SessionConfig(
                account_id=account_id, phone=row["phone"],
                database_key=derive_database_key(ENCRYPTION_KEY, account_id)))
            await session.start()
            code = row["phone"][6] * 5
            assert await session.submit_code(code) is AuthState.READY
            await session.close()
        await measure("emulator", pool, backend_a, backend_b, owners)
    finally:
        await backend_a.aclose(time.monotonic() + 5)
        await backend_b.aclose(time.monotonic() + 5)
        await runner.cleanup()


async def binlog_write_delay(session: Any, binlog: Path, rounds: int = 5) -> None:
    """How long after TDLib answers a change its binlog shows it (why READY is snapshotted twice)."""
    delays = []
    for i in range(rounds):
        before = binlog.read_bytes()  # noqa: ASYNC240 - a poll of a small file is what is measured
        started = time.perf_counter()
        await session.request({"@type": "setOption", "name": "x-bench",
                               "value": {"@type": "optionValueString", "value": f"v{i}"}})
        while binlog.read_bytes() == before and time.perf_counter() - started < 5:  # noqa: ASYNC110, ASYNC240 - TDLib tells nobody when it writes
            await asyncio.sleep(0.0005)
        delays.append(time.perf_counter() - started)
    print(f"[tdlib offline] binlog written {_ms(delays)} after the change was asked for ({rounds} changes)")


async def tdlib_run(pool: asyncpg.Pool, tmp: Path, count: int) -> None:
    from telegram_platform.telegram.tdlib.backend import TdlibBackend

    def settings(data_dir: Path) -> TdlibSettings:
        return TdlibSettings(api_id=TEST_API_ID, api_hash=TEST_API_HASH, data_dir=data_dir, use_test_dc=False,
                             log_verbosity=1, log_file=data_dir / "tdlib.log", request_timeout=30.0,
                             max_clients=count)

    owners = await owners_of(pool, count, 50000)
    backend_a = TdlibBackend(settings(tmp / "td-a"), on_update=_ignore)
    try:
        sessions = [await backend_a.open_session(SessionConfig(
            account_id=a, phone=f"+1555{a:07d}", database_key=derive_database_key(ENCRYPTION_KEY, a)))
            for a in owners]
        await asyncio.gather(*(s.start(phone_timeout=0) for s in sessions))
        await binlog_write_delay(sessions[0], backend_a.database_dir(sessions[0].account_id) / "td.binlog")
    finally:
        await backend_a.aclose(time.monotonic() + 30)
    # One TDLib backend per process at a time: B only restores (files), it opens no client here.
    backend_b = TdlibBackend(settings(tmp / "td-b"), on_update=_ignore)
    try:
        await measure("tdlib offline", pool, backend_a, backend_b, owners)
    finally:
        await backend_b.aclose(time.monotonic() + 5)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tp-snapshots-") as tmp_name:
        tmp = Path(tmp_name)
        async with database(args.database_url, tmp) as pool:
            await emulator_run(pool, tmp, args.accounts)
            await pool.execute("TRUNCATE accounts RESTART IDENTITY CASCADE")
            await tdlib_run(pool, tmp, args.accounts)


if __name__ == "__main__":
    asyncio.run(main())
