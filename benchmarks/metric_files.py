"""What dead processes' metric files cost a scrape, before and after compaction, in one run.

    python benchmarks/metric_files.py [--dead 2000] [--repeat 5]

Records one process's metrics the way an API member and a worker child do (HTTP routes, jobs, a
histogram per route), then gives `--dead` dead processes the same files under identities no live
process has (as recycled worker children and restarted members leave them), and times a scrape
(`metrics.exposition.render`, the median of `--repeat`) with them all in place, then after
`metrics.files.compact` has folded them, and checks that both scrapes show the same totals.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

RECORDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from telegram_platform.metrics.definitions import create_metrics
    m = create_metrics(Path(sys.argv[1]))
    for route in ("/api/health", "/api/messages/{id}", "/api/messages", "/api/campaigns/{id}", "/api/accounts"):
        m.http_route("GET", route, [200] * 50 + [404, 503], [2_000_000 * i for i in range(52)])
    for kind in ("send_message", "run_campaign", "deliver_webhook"):
        m.job_finished("messages", kind, "ok", 0.2)
        m.job_finished("messages", kind, "failed", 2.0)
""")


def scrape_seconds(directory: Path, repeat: int) -> tuple[float, bytes]:
    from telegram_platform.metrics.definitions import Metrics
    from telegram_platform.metrics.exposition import render

    reader = Metrics(None, directory)
    times, body = [], b""
    for _ in range(repeat):
        started = time.perf_counter()
        body, _ = render(reader, [], "", host="test")
        times.append(time.perf_counter() - started)
    return statistics.median(times), body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dead", type=int, default=2000, help="dead processes whose files are in place")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from telegram_platform.metrics import files as metric_files

    with tempfile.TemporaryDirectory(prefix="tp-metric-files-") as tmp:
        directory = Path(tmp) / "metrics"
        metric_files.wipe(directory)
        subprocess.run([sys.executable, "-c", RECORDER, str(directory)], check=True, timeout=60,
                       env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)})
        originals = [*directory.glob("counter_*.db"), *directory.glob("histogram_*.db")]
        for n in range(args.dead):  # pids above the kernel's highest (4,194,304 at most): certainly dead
            for path in originals:
                typ = path.name.split("_")[0]
                shutil.copy(path, directory / f"{typ}_{4_200_000 + n}-1.db")
        for path in directory.glob("*.db"):
            if not path.name.startswith(tuple(f"{typ}_42" for typ in metric_files.SUMMED_TYPES)):
                path.unlink()  # the recorder's own (its live gauge would be swept anyway)
        files_before = len(list(directory.glob("*.db")))
        maintain = metric_files.maintain
        metric_files.maintain = lambda directory: 0  # scrapes that only read, as before compaction existed
        before, body_before = scrape_seconds(directory, args.repeat)
        metric_files.maintain = maintain
        started = time.perf_counter()
        with metric_files.locked(directory, exclusive=True):
            folded = metric_files.compact(directory)
        compaction = time.perf_counter() - started
        after, body_after = scrape_seconds(directory, args.repeat)
        same = _without_file_count(body_before) == _without_file_count(body_after)
        print(f"dead processes: {args.dead}  files: {files_before} -> {len(list(directory.glob('*.db')))}"
              f"  (folded {folded} in {compaction * 1000:.0f} ms)")
        print(f"scrape, median of {args.repeat}: {before * 1000:.1f} ms before, {after * 1000:.1f} ms after"
              f"  ({before / after:.0f}x)")
        print(f"same totals before and after: {same}")
        return 0 if same else 1


def _without_file_count(body: bytes) -> list[bytes]:
    return sorted(line for line in body.splitlines() if b"tp_metrics_files" not in line)


if __name__ == "__main__":
    sys.exit(main())
