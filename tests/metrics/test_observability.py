"""The platform as operators run it (supervisord, 2 API members, the worker), seen through /metrics,
a real Prometheus and the log files.

One supervisord for the module: a full run (password login, account login with code and 2FA
password, sends, a campaign when its routes exist) feeds every test here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import servers
from conftest import TEST_ENCRYPTION_KEY, TEST_JWT_SECRET, free_port
from support import EmulatorHandle, samples, total
from test_metrics import SEED_METRICS

from telegram_platform.api.security import Passwords
from telegram_platform.metrics.files import wipe
from telegram_platform.queue.registry import base_queue
from telegram_platform.settings import Settings
from telegram_platform.storage import users
from telegram_platform.storage.db import open_pool
from telegram_platform.storage.migrations import migrate
from telegram_platform.telegram.keys import derive_database_key

REPO = Path(__file__).resolve().parents[2]
ADMIN_PASSWORD = "Adm1n-obs-password-9f3c"
TWO_FA_PASSWORD = "2fa-obs-secret-77b1"
METRICS_TOKEN = "metrics-obs-token-5d2e8a41c0"
PHONE = "+9996671234"  # test-DC convention: logs in with the code 77777
LOGIN_CODE = "77777"
MESSAGES = 5
HEALTH_REQUESTS = 40
HOST_ID = "obs-host"


@dataclass
class Platform:
    root: Path
    env: dict[str, str]
    base_url: str
    supervisord: subprocess.Popen[bytes]
    secrets: dict[str, str] = field(default_factory=dict)
    messages_sent: int = 0
    account_id: int = 0

    @property
    def log_dir(self) -> Path:
        return self.root / "var" / "log"

    def logs(self) -> dict[str, str]:
        return {p.name: p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log"))}

    def json_lines(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in (self.log_dir / name).read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def worker_trouble(self) -> list[str]:
        """The worker's warnings and errors, for a failure's message."""
        return [f"{line.get('timestamp')} {line.get('level')} {line.get('event')} "
                f"{ {k: v for k, v in line.items() if k not in ('timestamp', 'level', 'event')} }"
                for line in self.json_lines("tp-worker.out.log") if line.get("level") in ("warning", "error")]

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with aiohttp.ClientSession() as http, http.get(
                f"{self.base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}) as response:
            assert response.status == 200, await response.text()
            return samples(await response.text())


async def _wait(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except (aiohttp.ClientError, OSError) as exc:
            last = repr(exc)  # not up yet
        else:
            if last:
                return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


@pytest.fixture(scope="module")
async def platform(tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str,
                   emulator: EmulatorHandle) -> AsyncIterator[Platform]:
    """supervisord with the shipped supervisord.conf: 2 API members on one socket and the worker."""
    root = tmp_path_factory.mktemp("obs")
    shutil.copy(REPO / "supervisord.conf", root / "supervisord.conf")
    for sub in ("run", "log", "supervisor.d"):
        (root / "var" / sub).mkdir(parents=True, exist_ok=True)
    metrics_dir = root / "var" / "run" / "metrics"
    wipe(metrics_dir)  # what scripts/run does before supervisord starts
    port = free_port()
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "DATABASE_URL": database_url, "REDIS_URL": redis_url,
        "JWT_SECRET": TEST_JWT_SECRET, "ENCRYPTION_KEY": TEST_ENCRYPTION_KEY,
        "TP_EMULATOR_URL": emulator.url, "TP_VAR_DIR": str(root / "var"), "TP_LOG_FORMAT": "json",
        "TP_HOST": "127.0.0.1", "PORT": str(port), "TP_API_PROCESSES": "2", "TP_HOST_ID": HOST_ID,
        "TP_SUPERVISOR_SOCKET": str(root / "var" / "run" / "supervisor.sock"),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "TP_METRICS_TOKEN": METRICS_TOKEN,
        "TP_WORKER_DRAIN_SECONDS": "5", "TP_API_DRAIN_SECONDS": "2",
    }
    servers.flush_redis(redis_url)
    settings = Settings.from_env(env, app_mode="cli")
    async with open_pool(settings, min_size=1, max_size=2) as pool:
        async with pool.acquire() as conn:
            await migrate(conn)
            await conn.execute("TRUNCATE users, refresh_tokens, accounts, messages, incoming_messages "
                               "RESTART IDENTITY CASCADE")
        await users.create_user(pool, "admin", await Passwords().hash(ADMIN_PASSWORD), "admin")
    process = _start_supervisord(root, env)
    handle = Platform(root, env, f"http://127.0.0.1:{port}", process)
    try:
        async def serving() -> bool:
            async with aiohttp.ClientSession() as http, http.get(f"{handle.base_url}/api/health") as r:
                return r.status == 200

        await _wait(serving, 60, "the API answers")

        async def worker_alive() -> bool:
            return total(await handle.metrics(), "tp_queue_workers") >= 1

        await _wait(worker_alive, 60, "a worker child heartbeats")
        yield handle
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def _start_supervisord(root: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(root / "supervisord.stdout", "wb") as out:
        return subprocess.Popen(["supervisord", "-n", "-c", str(root / "supervisord.conf")], env=env, cwd=root,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def _call(http: aiohttp.ClientSession, method: str, url: str, token: str | None = None,
                **kwargs: Any) -> tuple[int, Any]:
    headers = dict(kwargs.pop("headers", {}))
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with http.request(method, url, headers=headers, **kwargs) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body


@pytest.fixture(scope="module")
async def full_run(platform: Platform, emulator: EmulatorHandle) -> Platform:
    """Log in with a password, log an account in with code and 2FA password, send MESSAGES messages."""
    emulator.telegram.user_for_phone(PHONE).password = TWO_FA_PASSWORD
    base = platform.base_url
    async with aiohttp.ClientSession() as http:
        status, tokens = await _call(http, "POST", f"{base}/api/auth/login",
                                     json={"username": "admin", "password": ADMIN_PASSWORD})
        assert status == 200, tokens
        status, refreshed = await _call(http, "POST", f"{base}/api/auth/refresh",
                                        json={"refresh_token": tokens["refresh_token"]})
        assert status == 200, refreshed
        token = refreshed["access_token"]
        status, account = await _call(http, "POST", f"{base}/api/accounts", token, json={"phone": PHONE})
        assert status == 201, account
        status, account = await _call(http, "POST", f"{base}/api/accounts/{account['id']}/auth/code", token,
                                      json={"code": LOGIN_CODE})
        assert status == 200 and account["auth_state"] == "wait_password", account
        status, account = await _call(http, "POST", f"{base}/api/accounts/{account['id']}/auth/password", token,
                                      json={"password": TWO_FA_PASSWORD})
        assert status == 200 and account["auth_state"] == "ready", account
        ids = []
        for i in range(MESSAGES):
            status, message = await _call(http, "POST", f"{base}/api/messages", token,
                                          json={"account_id": account["id"], "peer": "@alice", "text": f"hi {i}"})
            assert status == 202, message
            ids.append(message["id"])

        async def all_sent() -> bool:
            for message_id in ids:
                _, body = await _call(http, "GET", f"{base}/api/messages/{message_id}", token)
                if body["status"] != "sent":
                    return False
            return True

        await _wait(all_sent, 30, "every message sent")
    key = derive_database_key(bytes.fromhex(TEST_ENCRYPTION_KEY), account["id"])
    platform.secrets = {
        "admin password": ADMIN_PASSWORD, "2FA password": TWO_FA_PASSWORD, "JWT_SECRET": TEST_JWT_SECRET,
        "ENCRYPTION_KEY": TEST_ENCRYPTION_KEY, "metrics token": METRICS_TOKEN,
        "access token": tokens["access_token"], "refresh token": tokens["refresh_token"],
        "refreshed access token": refreshed["access_token"], "new refresh token": refreshed["refresh_token"],
        "TDLib key (hex)": key.hex(), "TDLib key (base64)": base64.b64encode(key).decode(),
        "TDLib key (urlsafe base64)": base64.urlsafe_b64encode(key).decode().rstrip("="),
    }
    platform.secrets["token signature"] = tokens["access_token"].rsplit(".", 1)[-1]
    platform.messages_sent = MESSAGES
    platform.account_id = account["id"]
    return platform


async def test_metrics_sum_every_process_exactly(full_run: Platform) -> None:
    """Requests spread over 2 API members and the worker's jobs are counted exactly, in one /metrics."""
    p = full_run

    async def jobs_counted() -> bool:
        values = await p.metrics()
        # Telegram clients come from the stats each host publishes every 5 s.
        return (total(values, "tp_jobs_processed_total", queue="messages", kind="send_message") >= MESSAGES
                and total(values, "tdlib_active_clients") >= 1)

    await _wait(jobs_counted, 20, "the worker's jobs and clients show in /metrics")
    before = await p.metrics()
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time: both members serve
    async with aiohttp.ClientSession(connector=connector) as http:
        async def one(i: int) -> int:
            async with http.get(f"{p.base_url}/api/health", headers={"X-Request-ID": f"obs-health-{i}"}) as r:
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(HEALTH_REQUESTS)))
    assert statuses == [200] * HEALTH_REQUESTS

    Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

    def health_count(values: Samples) -> float:
        return total(values, "tp_http_requests_total", route="/api/health", method="GET", status="200")

    async def counted() -> Samples | None:
        values = await p.metrics()  # the other member writes its counts within a second (api/journal.py)
        return values if health_count(values) - health_count(before) >= HEALTH_REQUESTS else None

    after = await _wait(counted, 5, "the health requests counted")
    assert health_count(after) - health_count(before) == HEALTH_REQUESTS

    def per_member() -> dict[str, int]:
        return {name: sum(1 for line in p.json_lines(name) if str(line.get("request_id", "")).startswith(
            "obs-health-") and line.get("event") == "request") for name in ("tp-api-00.out.log", "tp-api-01.out.log")}

    async def all_lines_written() -> bool:
        return sum(per_member().values()) >= HEALTH_REQUESTS

    await _wait(all_lines_written, 5, "the request lines")
    lines = per_member()
    assert sum(lines.values()) == HEALTH_REQUESTS and all(lines.values()), lines

    # The worker: exactly one processed send job per message, each confirmed by Telegram once.
    assert total(after, "tp_jobs_processed_total", queue="messages", kind="send_message") == MESSAGES
    assert total(after, "tp_jobs_failed_total") == 0
    assert total(after, "tp_messages_sent_total") == MESSAGES
    assert total(after, "tp_job_duration_seconds_count", queue="messages", kind="send_message") == MESSAGES
    assert total(after, "tp_telegram_call_duration_seconds_count", method="send") == MESSAGES
    names = {n for n, _ in after}
    for name in SEED_METRICS:
        assert name in names, name
    if total(after, "tdlib_active_clients") < 1:
        # The clients come from stats each worker child publishes every 5 s (15 s TTL), not from the
        # files summed above: a round late, or a session reopened, shows them again within seconds.
        async def clients_shown() -> bool:
            return total(await p.metrics(), "tdlib_active_clients") >= 1

        try:
            await _wait(clients_shown, 20, "a Telegram client in /metrics")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the worker's warnings: {p.worker_trouble()}") from exc
    assert total(after, "tdlib_sessions_total") >= 1
    assert total(after, "tdlib_requests_total") >= MESSAGES

    # Processes: supervisord's programs and the pool's child, with memory and uptime.
    assert total(after, "tp_supervisor_up") == 1
    for program in ("tp-api-00", "tp-api-01", "tp-worker"):
        assert total(after, "tp_process_state", program=program, state="RUNNING") == 1, program
        assert total(after, "tp_process_resident_memory_bytes", program=program) > 10_000_000, program
        assert total(after, "tp_process_uptime_seconds", program=program) > 0, program
    child = [dict(lbl)["program"] for n, lbl in after if n == "tp_process_resident_memory_bytes"
             and dict(lbl)["program"].startswith("tp-worker-w")]
    assert child, "the worker pool's child is listed"
    assert total(after, "tp_health_ok") == 1
    assert total(after, "tp_http_requests_in_flight") == 1  # the scrape itself


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
async def test_promtool_accepts_the_platform_exposition(full_run: Platform) -> None:
    """`promtool check metrics` accepts the multiprocess exposition of the running platform."""
    async with aiohttp.ClientSession() as http, http.get(
            f"{full_run.base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}) as response:
        text = await response.read()
    (full_run.root / "metrics.txt").write_bytes(text)  # kept with the run's logs, for a human to read
    result = await asyncio.to_thread(subprocess.run, ["promtool", "check", "metrics"], input=text,
                                     capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


@pytest.fixture
def prometheus(full_run: Platform, tmp_path: Path) -> Any:
    """A real Prometheus (Debian's package) started with the shipped scrape configuration, pointed at
    the platform's port, scraping every second, with the platform's metrics token."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    shipped = REPO / "telegram_platform" / "deploy" / "prometheus"
    token_file = tmp_path / "token"
    token_file.write_text(METRICS_TOKEN)
    config = (shipped / "prometheus.yml").read_text()
    port = full_run.base_url.rsplit(":", 1)[1]
    replacements = {
        "scrape_interval: 15s": "scrape_interval: 1s",
        "evaluation_interval: 15s": "evaluation_interval: 1s",
        "scrape_timeout: 10s": "scrape_timeout: 1s",
        '"127.0.0.1:3000"': f'"127.0.0.1:{port}"',
        "    # authorization:\n    #   type: Bearer\n    #   credentials_file: /etc/prometheus/telegram-platform.token":
            f"    authorization:\n      type: Bearer\n      credentials_file: {token_file}",
    }
    for old, new in replacements.items():
        assert old in config, old
        config = config.replace(old, new)
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(shipped / "alerts.yml", tmp_path / "alerts.yml")
    web_port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as out:
        process = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web_port}"], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{web_port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


async def _query(http: aiohttp.ClientSession, prometheus: str, expr: str) -> list[dict[str, Any]]:
    async with http.get(f"{prometheus}/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


async def _scalar(http: aiohttp.ClientSession, prometheus: str, expr: str) -> float | None:
    result = await _query(http, prometheus, expr)
    return float(result[0]["value"][1]) if result else None


async def test_real_prometheus_scrapes_the_platform(full_run: Platform, prometheus: str) -> None:
    """Prometheus with the shipped configuration: the target is up, the seed's five metrics are there,
    request counters rise by exactly the requests sent over both API members, and the worker's job
    counter equals the jobs run."""
    p = full_run
    async with aiohttp.ClientSession() as http:
        async def target_up() -> bool:
            return await _scalar(http, prometheus, 'up{job="telegram-platform"}') == 1.0

        await _wait(target_up, 30, "Prometheus scrapes the platform")
        names = {r["metric"]["__name__"] for r in await _query(
            http, prometheus, '{__name__=~"' + "|".join(SEED_METRICS) + '"}')}
        assert names == set(SEED_METRICS)
        expr = 'sum(tp_http_requests_total{job="telegram-platform",route="/api/health"})'

        async def settled() -> float | None:
            # Two scrapes apart with no request in between: the value Prometheus holds is current.
            first = await _scalar(http, prometheus, expr)
            await asyncio.sleep(2.5)
            second = await _scalar(http, prometheus, expr)
            return second if first == second and second is not None else None

        before = await _wait(settled, 30, "a settled request count")
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as fresh:
            statuses = await asyncio.gather(*(_call(fresh, "GET", f"{p.base_url}/api/health")
                                              for _ in range(HEALTH_REQUESTS)))
        assert [s for s, _ in statuses] == [200] * HEALTH_REQUESTS
        after = await _wait(settled, 30, "the new request count")
        assert after - before == HEALTH_REQUESTS
        jobs = await _scalar(http, prometheus,
                             'sum(tp_jobs_processed_total{queue="messages",kind="send_message"})')
        assert jobs == p.messages_sent
        assert await _scalar(http, prometheus, "tp_health_ok") == 1.0
        rules = await _query(http, prometheus, 'ALERTS{alertname="TpProgramFatal"}')
        assert rules == []


async def test_real_prometheus_sees_the_platform_per_host_and_every_dashboard_query_answers(
        full_run: Platform, prometheus: str) -> None:
    """In a real Prometheus, the host's recorded and process families carry its TP_HOST_ID, the
    host gauges list it up with its account, the per-host sends add up to the total, every query of
    the shipped dashboard is accepted, and no host alert fires on a healthy platform."""
    async with aiohttp.ClientSession() as http:
        async def host_listed() -> bool:
            return await _scalar(http, prometheus, f'max(tp_host_state{{host="{HOST_ID}",state="up"}})') == 1.0

        await _wait(host_listed, 30, "Prometheus sees the host up")
        assert await _scalar(http, prometheus, f'max(tp_host_accounts{{host="{HOST_ID}"}})') == 1.0
        assert await _scalar(http, prometheus, "max(tp_accounts_without_owner)") == 0.0
        assert await _scalar(http, prometheus, f'max(tp_host_telegram_clients{{host="{HOST_ID}"}})') == 1.0
        sent = await _query(http, prometheus, "sum by (host) (tp_messages_sent_total)")
        assert [(r["metric"], float(r["value"][1])) for r in sent] == [({"host": HOST_ID}, float(MESSAGES))]
        programs = await _query(http, prometheus, 'tp_process_state{state="RUNNING"}')
        assert programs and {r["metric"]["host"] for r in programs} == {HOST_ID}
        dashboard = json.loads((REPO / "telegram_platform" / "deploy" / "prometheus"
                                / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
        assert any("by (host)" in e for e in exprs)
        for expr in exprs:
            await _query(http, prometheus, expr.replace("$job", "telegram-platform")
                         .replace("$__rate_interval", "1m"))
        for alert in ("TpHostGone", "TpAccountsWithoutOwner", "TpHostsUnbalanced", "TpRebalanceMovesFailing"):
            assert await _query(http, prometheus, f'ALERTS{{alertname="{alert}"}}') == [], alert


def test_request_and_job_lines_carry_their_ids(full_run: Platform) -> None:
    """Each request logs one line (method, route, status, duration, request id, user); each job one line
    (queue, kind, job id, account, outcome, duration); API and worker write separate files."""
    p = full_run
    api_lines = p.json_lines("tp-api-00.out.log") + p.json_lines("tp-api-01.out.log")
    sends = [line for line in api_lines if line.get("event") == "request" and line.get("route") == "/api/messages"
             and line.get("method") == "POST"]
    assert len(sends) == MESSAGES
    for line in sends:
        assert line["status"] == 202 and line["user"] == "admin" and line["request_id"]
        assert isinstance(line["duration_ms"], float | int)
    worker_lines = p.json_lines("tp-worker.out.log")
    assert not [line for line in worker_lines if line.get("event") == "request"]
    done = [line for line in worker_lines if line.get("event") == "job done"]
    assert len(done) == MESSAGES
    for line in done:
        # Taken from the owning child's own queue, `messages@<host>/<slot>` (queue/routing.py).
        assert base_queue(line["queue"]) == "messages" and line["kind"] == "send_message" and line["outcome"] == "ok"
        assert line["job_id"].startswith("msg-") and line["account_id"] == p.account_id
        assert isinstance(line["duration_ms"], float | int)


async def test_a_campaign_when_the_routes_exist(full_run: Platform) -> None:
    """A small campaign runs to completion, so that its lines are in the logs the secret grep reads."""
    p = full_run
    async with aiohttp.ClientSession() as http:
        _, tokens = await _call(http, "POST", f"{p.base_url}/api/auth/login",
                                json={"username": "admin", "password": ADMIN_PASSWORD})
        token = tokens["access_token"]
        p.secrets["campaign access token"] = token
        status, campaign = await _call(http, "POST", f"{p.base_url}/api/campaigns", token, json={
            "name": "obs", "account_ids": [p.account_id], "template": "hello {first_name}",
            "recipients": [{"peer": f"@user{i}", "variables": {"first_name": f"N{i}"}} for i in range(3)]})
        if status in (404, 405) and "no route" in json.dumps(campaign):
            pytest.skip("no campaign routes on this branch yet")
        assert status == 201, campaign
        status, _ = await _call(http, "POST", f"{p.base_url}/api/campaigns/{campaign['id']}/start", token)
        assert status in (200, 202)

        async def completed() -> bool:
            _, body = await _call(http, "GET", f"{p.base_url}/api/campaigns/{campaign['id']}", token)
            return bool(body["status"] == "completed")

        await _wait(completed, 60, "the campaign completes")


def test_logs_hold_no_secret_and_only_masked_phones(full_run: Platform) -> None:
    """No password, login code, token, ENCRYPTION_KEY, JWT_SECRET or TDLib key in any log file of the
    run; the account's phone number appears only masked."""
    p = full_run
    logs = p.logs()
    assert {"tp-api-00.out.log", "tp-api-01.out.log", "tp-worker.out.log"} <= set(logs)
    everything = "\n".join(logs.values())
    assert "POST" in everything and "send_message" in everything  # the grep reads real logs
    for what, secret in p.secrets.items():
        assert secret not in everything, f"{what} appears in the logs"
        assert secret.upper() not in everything.upper() or len(secret) < 16, f"{what} appears in the logs"
    digits = PHONE.lstrip("+")
    assert digits not in everything, "an unmasked phone number appears in the logs"
    # The login code is short: look for it as a value (timestamps and random ids may hold the digits).
    for name in logs:
        if not name.endswith(".out.log"):
            assert LOGIN_CODE not in logs[name], f"the login code appears in {name}"
            continue
        for line in p.json_lines(name):
            for key, value in line.items():
                if key in ("timestamp", "request_id"):
                    continue
                assert LOGIN_CODE not in json.dumps(value), f"the login code appears in {name}: {line}"
