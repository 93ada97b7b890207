"""Memory a CSV recipients import holds while it is read and parsed, beside the straightforward way.

    python benchmarks/csv_import_memory.py [--rows 100000] [--cell 620]

Builds a CSV at the import's limits (by default 100,000 rows of about 640 bytes: ~64 MB, the
largest body `POST /api/campaigns/{id}/recipients/import` takes) and reads it, in 64 KiB chunks as
aiohttp hands them over, two ways, each in a fresh process:

* `straightforward`: what the route did until this benchmark was written, and what most code does:
  the body gathered into a bytearray, decoded whole, wrapped in a StringIO for csv.reader.
* `platform`: the route's own `read_csv_body` (UTF-8 checked chunk by chunk, the text not kept)
  and `parse_csv` reading lines from a TextIOWrapper over the bytes.

Prints, for each, the peak of Python's allocations (tracemalloc), the growth of the process's
peak resident memory (VmHWM), the time taken, and the platform/straightforward ratios. Both parse
the same rows with the same `parse_csv`; the run fails if their rows differ. Once ASCII text, once
text with a character outside Latin-1 in every row (Python then stores decoded text at 2 bytes a
character, and StringIO at 4 whatever the text).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

CHUNK = 1 << 16


def make_csv(rows: int, cell: int, wide: bool) -> bytes:
    """`rows` rows whose note is `cell` bytes of UTF-8 at most."""
    filler = ("Grüße aus Köln € " if wide else "Greetings from Cologne ") * (cell // 10 + 1)
    note = filler.encode()[:cell].decode(errors="ignore")  # a character cut in two is dropped
    lines = ["peer,first_name,note\n"]
    lines += [f"@user{i},Name{i},{note}\n" for i in range(rows)]
    return "".join(lines).encode()


async def chunks_of(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start:start + CHUNK]


async def straightforward(data: bytes) -> list[tuple[str, dict[str, str]]]:
    from telegram_platform.api.routes.campaigns import parse_csv

    raw = bytearray()
    async for chunk in chunks_of(data):
        raw.extend(chunk)
    text = raw.decode("utf-8-sig")
    return parse_csv(io.StringIO(text, newline=""))


async def platform(data: bytes) -> list[tuple[str, dict[str, str]]]:
    from telegram_platform.api.routes.campaigns import parse_csv, read_csv_body

    body = await read_csv_body(chunks_of(data))
    rows = parse_csv(io.TextIOWrapper(io.BytesIO(body), encoding="utf-8-sig", newline=""))
    del body
    return rows


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(way: str, rows: int, cell: int, wide: bool) -> dict[str, float | str]:
    """One way, in this (fresh) process: the CSV is built first, so only the import's own growth counts."""
    data = make_csv(rows, cell, wide)
    import telegram_platform.api.routes.campaigns  # noqa: F401  (imported before measuring)

    reader = {"straightforward": straightforward, "platform": platform}[way]
    rss_before = peak_rss_kib()
    tracemalloc.start()
    started = time.perf_counter()
    parsed = asyncio.run(reader(data))
    elapsed = time.perf_counter() - started
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    digest = hashlib.sha256(json.dumps(parsed).encode()).hexdigest()
    return {"body_mib": len(data) / 2**20, "traced_peak_mib": traced_peak / 2**20,
            "rss_growth_mib": (peak_rss_kib() - rss_before) / 1024, "seconds": elapsed, "rows": digest}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--cell", type=int, default=620, help="characters in each row's note")
    parser.add_argument("--measure", nargs=2, metavar=("WAY", "WIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.rows, args.cell, args.measure[1] == "wide")))
        return 0

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    print(f"{'text':<7} {'way':<16} {'body MiB':>9} {'traced peak MiB':>16} {'RSS growth MiB':>15} {'seconds':>8}")
    for wide in ("ascii", "wide"):
        results = {}
        for way in ("straightforward", "platform"):
            out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--cell", str(args.cell),
                                  "--measure", way, wide], env=env, capture_output=True, text=True, check=True)
            result = results[way] = json.loads(out.stdout)
            print(f"{wide:<7} {way:<16} {result['body_mib']:>9.1f} {result['traced_peak_mib']:>16.1f} "
                  f"{result['rss_growth_mib']:>15.1f} {result['seconds']:>8.2f}")
        if results["platform"]["rows"] != results["straightforward"]["rows"]:
            print("the two ways parsed different rows", file=sys.stderr)
            return 1
        mine, theirs = results["platform"], results["straightforward"]
        traced = mine["traced_peak_mib"] / theirs["traced_peak_mib"]
        print(f"{wide:<7} {'platform/straightforward':<26} traced peak {traced:.2f}"
              f", RSS growth {mine['rss_growth_mib'] / max(theirs['rss_growth_mib'], 0.1):.2f}"
              f", time {mine['seconds'] / theirs['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
