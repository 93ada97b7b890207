"""How many idle TDLib clients one process holds, and what they cost: start time, memory, close time.

    python benchmarks/tdlib_clients.py --clients 1000

Starts N real TDLib clients (offline is fine: each stops at WAIT_PHONE / connecting), reports the time
to start them, RSS before/after (VmRSS from /proc/self/status) and memory per idle client, then closes
them all and reports the close time. Data goes to a temporary directory unless --data-dir is given.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from telegram_platform.settings import TdlibSettings
from telegram_platform.telegram.base import AuthState, ConnectionState, SessionConfig, Update
from telegram_platform.telegram.keys import derive_database_key
from telegram_platform.telegram.tdlib.backend import TdlibBackend

TEST_API_ID = 94575
TEST_API_HASH = "a3406de8d171bb422bb6ddf3bbd800e2"


def proc_status(field: str) -> int:
    """A numeric field of /proc/self/status (VmRSS in kB, Threads)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def mib(kb: int) -> str:
    return f"{kb / 1024:.1f} MiB"


async def run(clients: int, data_dir: Path, request_timeout: float) -> None:
    async def ignore(update: Update) -> None:
        return None

    settings = TdlibSettings(api_id=TEST_API_ID, api_hash=TEST_API_HASH, data_dir=data_dir,
                             use_test_dc=False, log_verbosity=1, log_file=data_dir / "tdlib.log",
                             request_timeout=request_timeout, max_clients=max(clients, 1))
    backend = TdlibBackend(settings, on_update=ignore)
    master_key = bytes(range(32))
    rss_before, threads_before = proc_status("VmRSS"), proc_status("Threads")
    print(f"TDLib {backend.version}; {clients} clients; data in {data_dir}")
    print(f"RSS before: {mib(rss_before)} ({threads_before} threads)")

    sessions = [
        await backend.open_session(SessionConfig(account_id=i, phone=f"+1555{i:07d}",
                                                 database_key=derive_database_key(master_key, i)))
        for i in range(1, clients + 1)
    ]
    # One client first: TDLib's fixed cost (its scheduler threads) is paid once, not per client.
    await sessions[0].start(phone_timeout=0)
    await asyncio.sleep(1.0)
    rss_one, threads_one = proc_status("VmRSS"), proc_status("Threads")
    print(f"RSS with 1 client: {mib(rss_one)} ({threads_one} threads): TDLib's fixed cost "
          f"{mib(rss_one - rss_before)}")

    started = time.monotonic()
    # phone_timeout=0: send the phone and return; offline it is never answered.
    states = await asyncio.gather(*(s.start(phone_timeout=0) for s in sessions[1:]), return_exceptions=True)
    at_wait_phone = time.monotonic() - started
    failures = [s for s in states if s is not AuthState.WAIT_PHONE]
    rest = max(clients - 1, 1)
    print(f"start: {clients - 1} more clients at WAIT_PHONE in {at_wait_phone:.2f} s "
          f"({at_wait_phone / rest * 1000:.2f} ms each, {rest / at_wait_phone:.0f}/s); failures: {len(failures)}")
    if failures:
        print(f"  first failure: {failures[0]!r}")
    while not all(s.connection_state is ConnectionState.CONNECTING for s in sessions):
        if time.monotonic() - started > request_timeout:
            break
        await asyncio.sleep(0.05)
    print(f"       all `connecting` after {time.monotonic() - started:.2f} s")

    await asyncio.sleep(3.0)  # let TDLib settle (its connection attempts, caches) before measuring
    rss_after, threads_after = proc_status("VmRSS"), proc_status("Threads")
    print(f"RSS after:  {mib(rss_after)} ({threads_after} threads)")
    print(f"per idle client: {(rss_after - rss_one) / rest / 1024:.2f} MiB marginal, "
          f"{(rss_after - rss_before) / max(clients, 1) / 1024:.2f} MiB all-in")
    stats = backend.stats()
    print(f"stats: clients={stats['clients']} connection={stats['connection']} "
          f"lag_max={stats['receive_loop_lag_seconds']:.4f} s stalled={stats['stalled']}")

    closing = time.monotonic()
    await backend.aclose(time.monotonic() + 120)
    closed_in = time.monotonic() - closing
    unclosed = sum(1 for s in sessions if not s.closed)
    print(f"close: all clients closed in {closed_in:.2f} s; not closed: {unclosed}; "
          f"RSS after close: {mib(proc_status('VmRSS'))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000, help="how many TDLib clients (default 1000)")
    parser.add_argument("--data-dir", type=Path, help="where the databases go (default: a temporary dir)")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds (default 120)")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="tdlib-bench-"))
    try:
        asyncio.run(run(args.clients, data_dir.absolute(), args.request_timeout))
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
