"""No-op job throughput: this platform's worker against stock RQ and BullMQ, same Redis, same run.

    python benchmarks/queue_throughput.py                 # every contender, printed with ratios
    python benchmarks/queue_throughput.py --only tp,bullmq --jobs 50000 --repeat 3

Contenders (each on a flushed Redis, with the queue filled before its worker starts):
- `tp`: the platform's `QueueConsumer` (what a tp-worker child runs per queue), concurrency 5, in a
  process of its own configured like a deployed worker child: a JSON log line per job to a file,
  Prometheus metrics in multiprocess mode (a file-backed counter and histogram per job);
- `tp-quiet`: the same with `TP_LOG_EACH_JOB=false` (failed and retried jobs still get a line, the
  rest a summary line a minute);
- `rq-fork`: `rq worker-pool -n 5` (a fork per job);
- `rq-simple`: `rq worker-pool -n 5 -w rq.worker.SimpleWorker`;
- `bullmq`: BullMQ from `benchmarks/bullmq` (`npm install` there first), one Node process, concurrency 5.

Throughput is measured from outside, the same way for all: from the moment the first job leaves the
queue to the moment the last one is in the finished registry (polled every 5 ms). RQ is given fewer
jobs (`--rq-jobs`) because it is two orders of magnitude slower. Redis is a throwaway `redis-server`
unless `--redis-url` names one (its database is flushed). The machine's other load shows in the
figures: run it a few times (`--repeat`) and read the spread.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

QUEUE = "bench"
FUNC = "bench_jobs.noop"


# -- the platform's consumer, as a worker child would run it ---------------------------------------

async def _serve_tp(url: str, concurrency: int, log_each_job: bool) -> None:
    import redis.asyncio as aioredis

    from telegram_platform.metrics.definitions import create_metrics
    from telegram_platform.queue.consumer import JobContext, QueueConsumer

    async def noop(ctx: JobContext) -> None:
        return None

    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics = create_metrics(Path(metrics_dir)) if metrics_dir else None
    client = aioredis.Redis.from_url(url)
    consumer = QueueConsumer(client, QUEUE, worker=f"bench-{os.getpid()}", concurrency=concurrency,
                             handlers={FUNC: noop}, metrics=metrics, log_each_job=log_each_job)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, consumer.stop)
    await consumer.run()
    await consumer.drain(time.monotonic() + 5)
    await client.aclose()


def serve_tp(url: str, concurrency: int, log_each_job: bool) -> None:
    from telegram_platform.logs import configure_logging

    configure_logging(level="info", fmt="json", process="bench-tp")
    asyncio.run(_serve_tp(url, concurrency, log_each_job))


# -- filling the queues ------------------------------------------------------------------------------

def fill_rq(url: str, jobs: int) -> None:
    """RQ-format jobs, written the way the platform's Enqueuer writes them (JSON serializer)."""
    import redis.asyncio as aioredis

    from telegram_platform.queue.jobs import JOB_PREFIX, QUEUES_SET, Enqueuer, queue_key

    async def fill() -> None:
        client = aioredis.Redis.from_url(url)
        enqueuer = Enqueuer(client)
        for start in range(0, jobs, 2000):
            async with client.pipeline(transaction=False) as pipe:
                pipe.sadd(QUEUES_SET, queue_key(QUEUE))
                for _ in range(min(2000, jobs - start)):
                    jid, mapping = enqueuer.build(QUEUE, FUNC, [])
                    pipe.hset(JOB_PREFIX + jid, mapping=mapping)  # type: ignore[arg-type]
                    pipe.rpush(queue_key(QUEUE), jid)
                await pipe.execute()
        await client.aclose()

    asyncio.run(fill())


def fill_bullmq(url: str, jobs: int) -> None:
    subprocess.run(["node", str(HERE / "bullmq" / "enqueue.js"), url, str(jobs)], check=True)


# -- measuring ---------------------------------------------------------------------------------------

def measure(client: redis.Redis, wait_key: str, done_key: str, jobs: int, start_worker: list[str],
            env: dict[str, str], log_path: Path, timeout: float) -> float:
    """Start the worker; return jobs/s from the first job taken to the last job finished."""
    with open(log_path, "ab") as log:
        worker = subprocess.Popen(start_worker, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        first = None
        while time.monotonic() < deadline:
            waiting = client.llen(wait_key)
            now = time.perf_counter()
            if first is None and waiting < jobs:
                first = now
            if first is not None and client.zcard(done_key) >= jobs:
                return jobs / (now - first)
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited early ({worker.returncode}); see {log_path}")
            time.sleep(0.005)
        raise RuntimeError(f"not done within {timeout}s; see {log_path}")
    finally:
        with_group_signal(worker, signal.SIGTERM)
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            with_group_signal(worker, signal.SIGKILL)
            worker.wait()


def with_group_signal(process: subprocess.Popen[bytes], sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


@contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from telegram_platform.devstack.servers import ThrowawayRedis

    with tempfile.TemporaryDirectory(prefix="tp-bench-redis-") as tmp, ThrowawayRedis(Path(tmp)) as server:
        yield server.url


def run_one(name: str, url: str, jobs: int, log_dir: Path) -> float:
    client = redis.Redis.from_url(url)
    client.flushdb()
    metrics_dir = log_dir / f"metrics-{name}"
    metrics_dir.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{ROOT}", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    rq = shutil.which("rq", path=str(Path(sys.executable).parent)) or "rq"
    timeout = 600.0
    if name == "bullmq":
        fill_bullmq(url, jobs)
        return measure(client, f"bull:{QUEUE}:wait", f"bull:{QUEUE}:completed", jobs,
                       ["node", str(HERE / "bullmq" / "worker.js"), url, "5"], env, log_dir / "bullmq.log", timeout)
    fill_rq(url, jobs)
    wait_key, done_key = f"rq:queue:{QUEUE}", f"rq:finished:{QUEUE}"
    if name in ("tp", "tp-quiet"):
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve-tp", url]
        if name == "tp-quiet":
            argv.append("--quiet")
    elif name == "rq-fork":
        argv = [rq, "worker-pool", "-n", "5", "-u", url, "-S", "json", "-q", QUEUE]
    elif name == "rq-simple":
        argv = [rq, "worker-pool", "-n", "5", "-u", url, "-S", "json", "-q", "-w", "rq.worker.SimpleWorker", QUEUE]
    else:
        raise SystemExit(f"unknown contender {name}")
    return measure(client, wait_key, done_key, jobs, argv, env, log_dir / f"{name}.log", timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="tp,tp-quiet,bullmq,rq-simple,rq-fork")
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs for tp and bullmq")
    parser.add_argument("--rq-jobs", type=int, default=2_000, help="jobs for the RQ pools")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--redis-url")
    parser.add_argument("--serve-tp", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_tp:
        serve_tp(args.serve_tp, args.concurrency, log_each_job=not args.quiet)
        return
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if "bullmq" in names and not (HERE / "bullmq" / "node_modules" / "bullmq").exists():
        raise SystemExit("BullMQ is not installed: (cd benchmarks/bullmq && npm install)")
    results: dict[str, list[float]] = {n: [] for n in names}
    with redis_server(args.redis_url) as url, tempfile.TemporaryDirectory(prefix="tp-bench-logs-") as logs:
        print(f"redis {url.rsplit('@', 1)[-1]}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
        for round_ in range(args.repeat):
            for name in names:
                jobs = args.rq_jobs if name.startswith("rq") else args.jobs
                rate = run_one(name, url, jobs, Path(logs))
                results[name].append(rate)
                print(f"  round {round_ + 1} {name:<10} {jobs:>7} jobs  {rate:>9,.0f} jobs/s", flush=True)
    print("\nmedian jobs/s (min-max) and ratio to each contender:")
    medians = {n: statistics.median(r) for n, r in results.items()}
    for name in names:
        spread = f"{min(results[name]):,.0f}-{max(results[name]):,.0f}"
        ratios = "  ".join(f"x{medians[name] / medians[o]:.2f} vs {o}" for o in names if o != name)
        print(f"  {name:<10} {medians[name]:>9,.0f}  ({spread})  {ratios}")


if __name__ == "__main__":
    main()
