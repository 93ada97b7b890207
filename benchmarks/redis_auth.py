"""What authenticating Redis traffic adds (telegram_platform/redis_auth.py), per event and per request.

    python benchmarks/redis_auth.py            # best of 5 runs, in µs of CPU per operation

Measured in a loop, against its peer in the same run: `encode_event` (the JSON an event costs
already) and `json.loads` of the published text (what every reader does already). Per event, the
publisher adds one MAC and each reader one check (`open_published`: the id split off and the MAC
compared); per account request, one seal and one open each way; per incoming message, one job MAC
when queued and one check when stored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from telegram_platform import events
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.telegram import rpc

RUNS = 5


def best_us(operation: Callable[[], object], count: int) -> float:
    """CPU time per call (the thread's own, so a busy machine's other processes count less)."""
    best = float("inf")
    for _ in range(RUNS):
        started = time.thread_time()
        for _ in range(count):
            operation()
        best = min(best, (time.thread_time() - started) / count * 1e6)
    return best


def main() -> None:
    auth = RedisAuth(bytes(range(32)))
    # A typical message.status event, as storage/outbox.py publishes it.
    data = {"message_id": 123456, "account_id": 42, "status": "sent", "campaign_id": None,
            "telegram_message_id": 987654321, "error": None, "attempts": 1}
    encoded = events.encode_event("message.status", data)
    published = auth.event_mac(encoded) + events.with_id("1733472000000-0", encoded)
    request = {"id": "0123456789abcdef0123456789abcdef", "op": "password", "account_id": 42,
               "args": {"password": "correct horse battery staple"}, "deadline": time.time() + 10}
    sealed = auth.seal(request, purpose=rpc.REQUEST_PURPOSE)
    job_args: list[object] = [42, 1234567, 7340032, "@eve", "hi there, are you around later today?", 1733472000]
    job_mac = auth.job_mac(job_args)

    rows = [
        ("encode_event (already paid per event)",
         best_us(lambda: events.encode_event("message.status", data), 100_000)),
        ("json.loads of the event (already paid per reader)", best_us(lambda: json.loads(published[32:]), 100_000)),
        ("event MAC (added per publish)", best_us(lambda: auth.event_mac(encoded), 100_000)),
        ("open_published (added per reader)", best_us(lambda: events.open_published(auth, published), 100_000)),
        ("seal a request (added per account request)", best_us(lambda: auth.seal(request, purpose=rpc.REQUEST_PURPOSE),
                                                                20_000)),
        ("open a request (added per account request)", best_us(lambda: auth.open(sealed, purpose=rpc.REQUEST_PURPOSE),
                                                                20_000)),
        ("job MAC (added per incoming message, twice)", best_us(lambda: auth.job_genuine(job_args, job_mac), 100_000)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, micros in rows:
        print(f"{name:<{width}}  {micros:6.2f} µs")
    print(f"event bytes: {len(encoded)} encoded, +{len(published) - len(events.with_id('1733472000000-0', encoded))} "
          "for the MAC on the channel, +32 in the log entry")


if __name__ == "__main__":
    main()
