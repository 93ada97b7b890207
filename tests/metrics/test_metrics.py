"""GET /metrics in one process, its auth, promtool's verdict, and the multiprocess bookkeeping."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import platform
import random
import shutil
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from conftest import free_port
from support import ApiClient, samples, total

import telegram_platform
from telegram_platform import events
from telegram_platform.api import scrape
from telegram_platform.api.app import create_app
from telegram_platform.metrics import definitions as metrics_mod
from telegram_platform.metrics import exposition
from telegram_platform.metrics import files as metric_files
from telegram_platform.metrics.exposition import render
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.redis_keys import WEBHOOKS_CURSOR
from telegram_platform.settings import Settings
from telegram_platform.system.process_identity import ProcessId
from telegram_platform.telegram.base import IncomingMessage
from telegram_platform.worker.spool import IncomingSpool, spool_directory

SEED_METRICS = ("tdlib_active_clients", "tdlib_sessions_total", "tdlib_queue_depth", "tdlib_requests_total",
                "tdlib_errors_total")


async def test_metrics_count_requests_by_route_template(api: ApiClient) -> None:
    """Requests are counted by route template, method and status, and the seed's five metrics are there."""
    for _ in range(3):
        assert (await api.call("GET", "/api/health"))[0] == 200
    status, _ = await api.call("GET", "/api/messages/12345")  # 401: counted under the template
    assert status == 401
    status, text = await api.call("GET", "/metrics")
    assert status == 200
    values = samples(text)
    assert total(values, "tp_http_requests_total", route="/api/health", method="GET", status="200") == 3
    assert total(values, "tp_http_requests_total", route="/api/messages/{id}", status="401") == 1
    assert total(values, "tp_http_request_duration_seconds_count", route="/api/health") == 3
    names = {n for n, _ in values}
    for name in SEED_METRICS:
        assert name in names, name
    assert total(values, "tp_metrics_collector_success", collector="redis") == 1
    assert total(values, "tp_metrics_collector_success", collector="database") == 1
    # No worker runs in this test: the platform says it is degraded.
    assert total(values, "tp_health_ok") == 0


async def test_build_info_names_the_versions(api: ApiClient) -> None:
    """tp_build_info says which build answers: the package, the bundled TDLib and Python."""
    values = samples((await api.call("GET", "/metrics"))[1])
    assert total(values, "tp_build_info", version=telegram_platform.__version__,
                 tdlib_version=metadata.version("tdjson"), python=platform.python_version()) == 1


async def test_the_event_log_and_the_webhook_cursor_are_measured(api: ApiClient, redis: aioredis.Redis,
                                                                 redis_auth: RedisAuth) -> None:
    """A scrape shows how many events the log keeps and how far the webhook listeners' cursor
    trails the newest one (0 before any listener has saved one)."""
    ids = [await events.publish(redis, redis_auth, "account.state", {"account_id": 1, "n": n}) for n in range(3)]
    values = samples((await api.call("GET", "/metrics"))[1])
    assert total(values, "tp_event_log_events") == 3
    assert total(values, "tp_webhook_events_behind_seconds") == 0
    newest_ms = events.parse_id(ids[-1])[0]
    await redis.set(WEBHOOKS_CURSOR, f"{newest_ms - 5000}-0")
    await asyncio.sleep(scrape.SCRAPE_CACHE_SECONDS)  # the first scrape's reads are kept that long
    values = samples((await api.call("GET", "/metrics"))[1])
    assert total(values, "tp_webhook_events_behind_seconds") == 5.0


async def test_spooled_incoming_messages_are_measured(api: ApiClient, settings: Settings) -> None:
    """Messages a worker spooled to this machine's disk show in the scrape until handed over."""
    values = samples((await api.call("GET", "/metrics"))[1])
    assert total(values, "tp_incoming_spooled_messages") == 0
    spool = IncomingSpool(spool_directory(settings.var_dir), owner=ProcessId(4_194_305, 1))
    for n in range(2):
        spool.append(IncomingMessage(1, 42, n, "@eve", "kept", 1_760_000_000))
    await asyncio.sleep(scrape.SCRAPE_CACHE_SECONDS)  # the first scrape's reads are kept that long
    values = samples((await api.call("GET", "/metrics"))[1])
    assert total(values, "tp_incoming_spooled_messages") == 2
    assert total(values, "tp_metrics_collector_success", collector="spool") == 1


async def test_hosts_and_accounts_without_owner_are_measured_from_postgresql(
        api: ApiClient, db: asyncpg.Pool, settings: Settings) -> None:
    """A scrape lists every host with its state and owned accounts, counts the logged-in accounts
    no live host owns (none, or a gone one), and labels this host's own families with TP_HOST_ID."""
    await db.execute("INSERT INTO hosts (id) VALUES ('m-up')")
    await db.execute("INSERT INTO hosts (id, draining_since) VALUES ('m-drain', now())")
    await db.execute("INSERT INTO hosts (id, last_seen) VALUES ('m-gone', now() - interval '1 hour')")
    for n, (state, owner) in enumerate([("ready", "m-up"), ("ready", "m-up"), ("closed", "m-drain"),
                                        ("ready", "m-gone"), ("ready", None), ("wait_code", None)]):
        await db.execute("INSERT INTO accounts (phone, auth_state, owner_host) VALUES ($1, $2, $3)",
                         f"+999663000{n}", state, owner)
    assert (await api.call("GET", "/api/health"))[0] == 200
    values = samples((await api.call("GET", "/metrics"))[1])
    assert total(values, "tp_metrics_collector_success", collector="hosts") == 1
    assert total(values, "tp_host_state", host="m-up", state="up") == 1
    assert total(values, "tp_host_state", host="m-drain", state="draining") == 1
    assert total(values, "tp_host_state", host="m-gone", state="gone") == 1
    assert total(values, "tp_host_state", host="m-gone", state="up") == 0
    assert total(values, "tp_host_accounts", host="m-up") == 2
    assert total(values, "tp_host_accounts", host="m-drain") == 1
    assert total(values, "tp_host_accounts", host="m-gone") == 1
    assert total(values, "tp_hosts", state="up") == 1 and total(values, "tp_hosts", state="gone") == 1
    assert total(values, "tp_host_heartbeat_age_seconds", host="m-gone") >= 3600
    # m-gone's ready account and the ready one nobody opened; not the login in progress.
    assert total(values, "tp_accounts_without_owner") == 2
    # What this API member recorded is this host's.
    assert total(values, "tp_http_requests_total", host=settings.host.id) >= 1
    assert total(values, "tp_http_requests_total") == total(values, "tp_http_requests_total",
                                                            host=settings.host.id)
    assert total(values, "tp_build_info", host=settings.host.id) == 1


@pytest.fixture
async def token_api(settings: Settings, db: asyncpg.Pool) -> AsyncIterator[TestClient[object, object]]:
    api_settings = dataclasses.replace(settings.api, metrics_token="scrape-token-0123456789")
    app = create_app(dataclasses.replace(settings, api=api_settings))
    async with TestServer(app, port=free_port()) as server, TestClient(server) as client:
        yield client


async def test_metrics_token_when_configured(token_api: TestClient[object, object]) -> None:
    """With TP_METRICS_TOKEN set, /metrics answers 401 in the error shape without it and 200 with it."""
    response = await token_api.get("/metrics")
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "unauthorized"
    response = await token_api.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert response.status == 401
    response = await token_api.get("/metrics", headers={"Authorization": "Bearer scrape-token-0123456789"})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
async def test_promtool_accepts_the_exposition(api: ApiClient) -> None:
    """`promtool check metrics` finds no problem in the output (names, units, _total, help)."""
    await api.call("GET", "/api/health")
    _, text = await api.call("GET", "/metrics")
    result = await asyncio.to_thread(subprocess.run, ["promtool", "check", "metrics"], input=text.encode(),
                                     capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_shipped_prometheus_files_are_valid() -> None:
    """The shipped scrape configuration and alert rules pass `promtool check config` (which checks the rules)."""
    config = Path(__file__).resolve().parents[2] / "telegram_platform" / "deploy" / "prometheus" / "prometheus.yml"
    result = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_host_alerts_fire_when_they_should_and_only_then() -> None:
    """`promtool test rules` passes the host alerts' unit tests (host gone with accounts, accounts
    without an owner, unbalanced hosts, rebalancing moves failing), each with a case that fires and
    one that must not."""
    tests = Path(__file__).resolve().parent / "host_alerts_test.yml"
    result = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"SUCCESS" in result.stdout


_RECORDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from telegram_platform.metrics.definitions import create_metrics
    m = create_metrics(Path(sys.argv[1]))
    m.http_route("GET", "/api/health", [200], [10_000_000])
    m.job_finished("messages", "send_message", "ok", 0.2)
    m.http_in_flight.inc()  # a live gauge left behind by a process that dies
    print("recorded", flush=True)
    if sys.argv[2] == "stay":
        time.sleep(60)
""")


def test_multiprocess_sums_processes_and_forgets_dead_gauges(tmp_path: Path) -> None:
    """Counters from every process are summed (dead ones included); a dead process's live gauges go."""
    directory = tmp_path / "metrics"
    metric_files.wipe(directory)
    env = {**os.environ, metrics_mod.MULTIPROC_ENV: str(directory)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", _RECORDER, str(directory), "exit"], env=env, check=True, timeout=60)
    stay = subprocess.Popen([sys.executable, "-c", _RECORDER, str(directory), "stay"], env=env,
                            stdout=subprocess.PIPE)
    try:
        assert stay.stdout is not None and stay.stdout.readline().strip() == b"recorded"
        reader = metrics_mod.Metrics(None, directory)
        body, _ = render(reader, [], "", host="test")
        values = samples(body.decode())
        assert total(values, "tp_http_requests_total", route="/api/health") == 3
        assert total(values, "tp_jobs_processed_total", queue="messages", kind="send_message") == 3
        assert total(values, "tp_job_duration_seconds_count", queue="messages") == 3
        # Two recorders are dead: their in-flight gauges were swept; the live one's remains.
        assert total(values, "tp_http_requests_in_flight") == 1
        assert not list(directory.glob(f"gauge_livesum_{os.getpid()}.db"))
    finally:
        stay.kill()
        stay.wait()
    metric_files.mark_process_dead(stay.pid, directory)
    body, _ = render(metrics_mod.Metrics(None, directory), [], "", host="test")
    values = samples(body.decode())
    assert total(values, "tp_http_requests_in_flight") == 0
    assert total(values, "tp_http_requests_total", route="/api/health") == 3


def test_create_metrics_refuses_a_directory_the_library_does_not_use(tmp_path: Path) -> None:
    """A PROMETHEUS_MULTIPROC_DIR that prometheus_client did not see at import is refused, not ignored."""
    if os.environ.get(metrics_mod.MULTIPROC_ENV):
        pytest.skip("the test process itself runs in multiprocess mode")
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        metrics_mod.create_metrics(tmp_path)


def test_dashboard_and_alerts_name_only_defined_metrics() -> None:
    """Every metric the shipped alert rules and Grafana dashboard use is one the platform defines."""
    import re

    shipped = Path(__file__).resolve().parents[2] / "telegram_platform" / "deploy" / "prometheus"
    source = "".join(Path(module.__file__).read_text() for module in (metrics_mod, exposition, scrape))
    text = (shipped / "alerts.yml").read_text() + (shipped / "grafana-dashboard.json").read_text()
    used = set(re.findall(r"\b((?:tp|tdlib)_[a-z_]+)", text))
    assert used
    for name in sorted(used):
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert f'"{base}"' in source, f"{name} is defined nowhere in metrics/ or api/scrape.py"


def test_observe_all_is_observe_for_each_value() -> None:
    """The batched histogram update leaves every bucket, the sum and the count where `observe` would,
    bucket bounds included (a bound belongs to its own bucket), so batching cannot skew a histogram."""
    from prometheus_client import CollectorRegistry, Histogram

    values = [0.0, 0.005, 0.0051, 0.01, 0.3, 2.5, 61.0, 1e-9, 0.049999, 0.05, 120.0, 0.005, 0.3]
    rng = random.Random(7)
    values += [rng.lognormvariate(-5, 2) for _ in range(1000)]  # a batch under load, all buckets
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h", "h", ("route",), buckets=metrics_mod.LATENCY_BUCKETS, registry=one_by_one)
    candidate = Histogram("h", "h", ("route",), buckets=metrics_mod.LATENCY_BUCKETS, registry=batched)
    for value in values:
        reference.labels("/r").observe(value)
    metrics_mod.observe_all(candidate.labels("/r"), values)

    def without_created(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {(s.name, frozenset(s.labels.items())): s.value for family in registry.collect()
                for s in family.samples if not s.name.endswith("_created")}

    expected = without_created(one_by_one)
    assert expected[("h_count", frozenset({("route", "/r")}))] == len(values)
    assert without_created(batched) == pytest.approx(expected)


def _nanosecond_batches() -> dict[str, list[int]]:
    first_bound = round(metrics_mod.LATENCY_BUCKETS[0] * 1e9)
    mixed = [0, 1, 120 * 10**9]
    for bound in metrics_mod.LATENCY_BUCKETS:
        at = round(bound * 1e9)
        mixed += [at - 1, at, at + 1]
    rng = random.Random(11)
    mixed += [int(rng.lognormvariate(-5, 2) * 1e9) for _ in range(1000)]
    return {"mixed": mixed, "all in the first bucket": [first_bound, 0, 1, first_bound - 1, 40_000] * 20,
            "one past the first bucket": [0, first_bound + 1, 1]}


@pytest.mark.parametrize("batch", list(_nanosecond_batches()))
def test_observe_all_in_nanoseconds_is_observe_of_the_seconds(batch: str) -> None:
    """Durations kept in nanoseconds (the API's journal) land in the bucket their value in seconds
    would, a nanosecond either side of every bound included, on the all-in-the-first-bucket path too."""
    from prometheus_client import CollectorRegistry, Histogram

    nanoseconds = _nanosecond_batches()[batch]
    bounds_ns = metrics_mod.nanosecond_bounds(metrics_mod.LATENCY_BUCKETS)
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h", "h", buckets=metrics_mod.LATENCY_BUCKETS, registry=one_by_one)
    candidate = Histogram("h", "h", buckets=metrics_mod.LATENCY_BUCKETS, registry=batched)
    for value in nanoseconds:
        reference.observe(value / 1e9)
    metrics_mod.observe_all(candidate, list(nanoseconds), bounds_ns, 1e9)

    def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        return {(s.name, s.labels.get("le", "")): s.value for family in registry.collect()
                for s in family.samples if not s.name.endswith("_created")}

    expected = samples(one_by_one)
    assert expected[("h_count", "")] == len(nanoseconds)
    assert {key: value for key, value in samples(batched).items() if key[0] != "h_sum"} == {
        key: value for key, value in expected.items() if key[0] != "h_sum"}
    assert samples(batched)[("h_sum", "")] == pytest.approx(expected[("h_sum", "")])


async def _xlen_calls(redis: aioredis.Redis) -> int:
    """XLEN commands the Redis server has run: a scrape's Redis reader sends one (the event log's length)."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_xlen", {}).get("calls", 0))


async def test_concurrent_and_back_to_back_scrapes_share_one_round_of_reads(
        api: ApiClient, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twenty scrapes at once, then more within the second, cost PostgreSQL and Redis one round of
    reads (counted by the Redis server itself and around the database reader); a second later the
    next scrape reads again; every scrape is answered in full."""
    database_rounds = 0
    read_database = scrape._read_database

    async def counted(pool: asyncpg.Pool) -> list[Any]:
        nonlocal database_rounds
        database_rounds += 1
        return await read_database(pool)

    monkeypatch.setattr(scrape, "_read_database", counted)
    await redis.config_resetstat()
    answers = await asyncio.gather(*(api.call("GET", "/metrics") for _ in range(20)))
    assert [status for status, _ in answers] == [200] * 20
    for _, text in answers:
        values = samples(text)
        assert total(values, "tp_metrics_collector_success", collector="database") == 1
        assert total(values, "tp_metrics_collector_success", collector="redis") == 1
    assert (database_rounds, await _xlen_calls(redis)) == (1, 1)
    for _ in range(3):
        assert (await api.call("GET", "/metrics"))[0] == 200
    assert (database_rounds, await _xlen_calls(redis)) == (1, 1)
    await asyncio.sleep(scrape.SCRAPE_CACHE_SECONDS)
    assert (await api.call("GET", "/metrics"))[0] == 200
    assert (database_rounds, await _xlen_calls(redis)) == (2, 2)


async def test_a_scraper_that_gives_up_does_not_cancel_the_round_others_wait_for(
        settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """A scrape cancelled mid-read (Prometheus' timeout) leaves the shared round running: the scrape
    waiting beside it gets the whole answer, from that one round."""
    cache = scrape.ScrapeCache()
    sources = scrape.ScrapeSources(redis=redis, db=db, supervisor_socket=None)
    await redis.config_resetstat()
    first = asyncio.ensure_future(cache.collect(sources))
    second = asyncio.ensure_future(cache.collect(sources))
    await asyncio.sleep(0)
    first.cancel()
    families = await second
    assert first.cancelled()
    assert {f.name for f in families} >= {"tp_queue_depth", "tp_database_up", "tp_metrics_collector_success"}
    assert await _xlen_calls(redis) == 1
