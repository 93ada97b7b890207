"""The cost of one worker log line (`job done`), as a tp-worker child writes it: JSON, redacted.

    python benchmarks/log_line.py            # best of 5 runs of 50,000 lines, in µs per line

Run it from two checkouts (each with its own editable install) to compare a change to the log
processors; lines go to /dev/null, so only the processors and the renderer are measured.
"""

from __future__ import annotations

import os
import sys
import time

import structlog

from telegram_platform.logs import configure_logging


def main() -> None:
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the process's stdout, for its whole life
    configure_logging(level="info", fmt="json", process="bench")
    log = structlog.get_logger("telegram_platform.queue.consumer")
    lines = 50_000
    best: float | None = None
    for _ in range(5):
        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars(queue="messages", job_id="msg-123456", account_id=42):
            for _ in range(lines):
                log.info("job done", kind="send_message", outcome="ok", duration_ms=1.234)
        per_line = (time.perf_counter() - started) / lines * 1e6
        best = per_line if best is None else min(best, per_line)
    sys.stderr.write(f"{best:.2f} µs per job line (best of 5 x {lines:,})\n")


if __name__ == "__main__":
    main()
