"""The production path rehearsed end to end, as a new operator would take it outside any clone:
build the wheel, install it with the lock into a fresh virtualenv, `tp init --prefix`, start
supervisord exactly as the generated unit says (its ExecStartPre/ExecStart lines, its
Environment=/EnvironmentFile= variables, its WorkingDirectory=), in the production profile against
the throwaway PostgreSQL and Redis, then use the platform and look at it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import servers
from conftest import free_port
from harness import Load
from support import eventually, samples, total

import telegram_platform
from telegram_platform.devstack.servers import ThrowawayRedis
from telegram_platform.ops import readiness
from telegram_platform.ops.supervisor import SupervisorClient

REPO = Path(__file__).resolve().parents[2]
# What the wheel is built from: the package and its metadata (a copy, so the build leaves nothing
# in the checkout).
SOURCES = ("pyproject.toml", "setup.cfg", "README.md", "LICENSE", "telegram_platform")
CONSOLE_SCRIPTS = ("tp", "tp-api", "tp-worker", "tp-emulator", "tp-events")
PASSWORD = "rehearsal-password-4821"
PHONE = "+9996671234"  # the emulator's test-DC convention: logs in with the code 77777
LOGIN_CODE = "77777"
MESSAGES = 3
HEALTH_REQUESTS = 30
MEMBER_REQUESTS = 5
# What a unit's Exec line may start with that systemd interprets (none is used: nothing to strip).
EXEC_PREFIXES = "-@:+!|"


def _run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{shlex.join(map(str, result.args))}: {result.stdout}\n{result.stderr}"
    return result.stdout


@dataclass
class Unit:
    """The [Service] settings of a unit file, each key with every value it was given."""

    service: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Unit:
        unit = cls()
        section = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            if section == "[Service]":
                key, _, value = line.partition("=")
                unit.service.setdefault(key.strip(), []).append(value.strip())
        return unit

    def one(self, key: str) -> str:
        values = self.service[key]
        assert len(values) == 1, (key, values)
        return values[0]

    def environment(self) -> dict[str, str]:
        """The environment systemd gives the service: Environment= and EnvironmentFile= (KEY=value
        lines, # comments), nothing inherited."""
        env: dict[str, str] = {}
        for assignment in self.service.get("Environment", []):
            for word in shlex.split(assignment):
                key, _, value = word.partition("=")
                env[key] = value
        for name in self.service.get("EnvironmentFile", []):
            for raw in Path(name.removeprefix("-")).read_text().splitlines():
                line = raw.strip()
                if line and not line.startswith(("#", ";")) and "=" in line:
                    key, _, value = line.partition("=")
                    env[key.strip()] = value.strip()
        return env

    def command(self, line: str) -> list[str]:
        """An Exec line as systemd runs it. Ours use no prefix, no %-specifier and no $VARIABLE, so
        systemd expands nothing: the words are the argv."""
        assert line[0] not in EXEC_PREFIXES and "%" not in line and "$" not in line, line
        return shlex.split(line)


@dataclass
class Installation:
    venv: Path
    wheel: Path

    @property
    def bin_dir(self) -> Path:
        return self.venv / "bin"


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    """The wheel built from a copy of the checkout, installed with the runtime lock into a new
    virtualenv outside the checkout (pip's cache makes this quick)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(REPO / name, source / name)
    dist = work / "dist"
    # The venv's locked setuptools builds it (no build isolation: no unpinned download).
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist),
              str(source)]))
    wheel = next(dist.glob("telegram_platform-*.whl"))
    venv = work / "venv"
    _ok(_run([sys.executable, "-m", "venv", str(venv)]))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _ok(_run([*pip, "--require-hashes", "--no-deps", "-r", str(REPO / "requirements" / "runtime.lock")]))
    _ok(_run([*pip, "--no-deps", str(wheel)]))
    return Installation(venv, wheel)


@contextlib.contextmanager
def emulator_process(installation: Installation, tmp_path: Path) -> Iterator[str]:
    """The installed `tp-emulator` on a free port, stopped at the end."""
    port = free_port()
    with open(tmp_path / "emulator.log", "wb") as log:
        process = subprocess.Popen([str(installation.bin_dir / "tp-emulator"), "--host", "127.0.0.1", "--port",
                                    str(port), "--latency-ms", "1"], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "emulator.log").read_text()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


@dataclass
class Service:
    """supervisord started as the unit says, and what it runs."""

    unit: Unit
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return Path(self.env["TP_SUPERVISOR_SOCKET"])

    def start(self, log: Path) -> None:
        cwd = Path(self.unit.one("WorkingDirectory"))
        for line in self.unit.service["ExecStartPre"]:
            _ok(_run(self.unit.command(line), env=self.env, cwd=cwd, timeout=180))
        with open(log, "wb") as out:
            self.process = subprocess.Popen(self.unit.command(self.unit.one("ExecStart")), env=self.env, cwd=cwd,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        """What `systemctl stop` does with KillMode=mixed: SIGTERM to supervisord, which stops its
        programs; then nothing may outlive the test."""
        if self.process is None:
            return
        pids: list[int] = []
        with contextlib.suppress(OSError):
            pids = [p.pid for p in SupervisorClient(self.socket).processes() if p.pid]
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=int(self.unit.one("TimeoutStopSec")))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for pid in [*pids, self.process.pid]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A directory with a short path for `tp init --prefix` (a unix socket's path is limited)."""
    root = Path(tempfile.mkdtemp(prefix="tp-rehearsal-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def rehearsal_database(database_url: str) -> Iterator[str]:
    """A database of its own on the test server, empty (the rehearsal's `tp migrate` makes the
    schema, as on a new server)."""
    with servers.fresh_database(database_url) as url:
        yield url


@pytest.fixture
def rehearsal_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of its own that requires a password, as production's must (`tp check` refuses one
    that answers without): its URL, with the password."""
    server = ThrowawayRedis(tmp_path / "redis", password=secrets.token_urlsafe(24)).start()
    try:
        yield server.url
    finally:
        server.stop()


def _without(env_file: Path, key: str, copy: Path) -> Path:
    """A copy of the env file without `key`'s line."""
    copy.write_text("".join(line for line in env_file.read_text().splitlines(keepends=True)
                            if not line.startswith(f"{key}=")))
    return copy


async def _call(http: aiohttp.ClientSession, method: str, url: str, token: str | None = None,
                **kwargs: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, url, headers=headers, **kwargs) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body


@pytest.mark.timeout(900)
async def test_the_wheel_deploys_under_the_generated_unit(installation: Installation, tmp_path: Path,
                                                          rehearsal_database: str, rehearsal_redis: str,
                                                          short_root: Path) -> None:
    """Wheel + lock + `tp init --prefix` + the unit's own start lines, production profile: every console
    script answers --version; a user logs in, an account logs in and sends through the emulator named by
    TP_EMULATOR_URL; one /metrics scrape has the worker's tdlib_* and message counters and counts
    exactly the requests sent to every API member; `tp reload` fails no request; `tp check` with the
    env file passes, and fails with the multiprocess directory unset; systemd-analyze accepts the unit."""
    bin_dir = installation.bin_dir
    for script in CONSOLE_SCRIPTS:
        out = _ok(await asyncio.to_thread(_run, [str(bin_dir / script), "--version"]))
        assert out.startswith(f"{script} (telegram-platform) {telegram_platform.__version__}"), out

    port = free_port()
    prefix = short_root  # supervisord's socket path must fit a unix socket's limit
    _ok(await asyncio.to_thread(_run, [
        str(bin_dir / "tp"), "init", "--prefix", str(prefix), "--database-url", rehearsal_database, "--redis-url",
        rehearsal_redis, "--host", "127.0.0.1", "--port", str(port), "--api-processes", "2"]))
    env_file = prefix / "etc/telegram-platform/env"
    unit_file = prefix / "etc/systemd/system/telegram-platform.service"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    again = await asyncio.to_thread(_run, [str(bin_dir / "tp"), "init", "--prefix", str(prefix)])
    assert again.returncode == 1 and "never overwritten" in again.stderr, again.stderr

    if shutil.which("systemd-analyze"):
        verified = await asyncio.to_thread(_run, ["systemd-analyze", "verify", str(unit_file)],
                                           env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
        assert verified.returncode == 0, verified.stdout + verified.stderr

    with emulator_process(installation, tmp_path) as emulator_url:
        # The operator's edits: this rehearsal's Telegram is the emulator, named explicitly.
        with env_file.open("a") as env_out:
            env_out.write(f"TP_EMULATOR_URL={emulator_url}\nTP_WORKER_DRAIN_SECONDS=5\nTP_API_DRAIN_SECONDS=2\n")
        operator_env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}  # nothing else: tp reads --env-file
        tp = [str(bin_dir / "tp"), "--env-file", str(env_file)]
        _ok(await asyncio.to_thread(_run, [*tp, "migrate"], env=operator_env))
        _ok(await asyncio.to_thread(_run, [*tp, "create-user", "--username", "admin", "--password-stdin"],
                                    env=operator_env, stdin=PASSWORD + "\n"))

        unit = Unit.read(unit_file)
        service = Service(unit, unit.environment())
        assert service.env["TP_PROFILE"] == "production" and service.env["PROMETHEUS_MULTIPROC_DIR"]
        try:
            await asyncio.to_thread(service.start, tmp_path / "supervisord.out")
            await _rehearse(service, f"http://127.0.0.1:{port}", tp, operator_env, tmp_path)
        finally:
            await asyncio.to_thread(service.stop)


async def _rehearse(service: Service, base: str, tp: list[str], operator_env: dict[str, str], tmp_path: Path) -> None:
    members = ("tp-api-00", "tp-api-01")
    data_dir = Path(service.env["TP_VAR_DIR"])

    async def serving() -> bool:
        assert service.process is not None and service.process.poll() is None, \
            (tmp_path / "supervisord.out").read_text()
        try:
            processes = await asyncio.to_thread(SupervisorClient(service.socket).processes)
        except OSError:
            return False
        return (len(processes) >= 4 and all(p.state == "RUNNING" for p in processes)
                and all(readiness.probe(readiness.member_socket(data_dir, m), timeout=1.0) for m in members))

    await eventually(serving, timeout=90, interval=0.2)

    async with aiohttp.ClientSession() as http:
        status, tokens = await _call(http, "POST", f"{base}/api/auth/login",
                                     json={"username": "admin", "password": PASSWORD})
        assert status == 200, tokens
        token = tokens["access_token"]
        status, account = await _call(http, "POST", f"{base}/api/accounts", token, json={"phone": PHONE})
        assert status == 201, account
        status, account = await _call(http, "POST", f"{base}/api/accounts/{account['id']}/auth/code", token,
                                      json={"code": LOGIN_CODE})
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

        await eventually(all_sent, timeout=60, interval=0.2)

        # `tp init` generated the metrics token: production refuses an open /metrics.
        async with http.get(f"{base}/metrics") as response:
            assert response.status == 401, await response.text()
        metrics_auth = {"Authorization": f"Bearer {service.env['TP_METRICS_TOKEN']}"}

        async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            async with http.get(f"{base}/metrics", headers=metrics_auth) as response:
                assert response.status == 200, await response.text()
                return samples(await response.text())

        async def worker_counted() -> bool:
            values = await scrape()
            return total(values, "tp_messages_sent_total") >= MESSAGES and total(values, "tdlib_requests_total") > 0

        await eventually(worker_counted, timeout=30, interval=0.5)

        def health_count(values: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> float:
            return total(values, "tp_http_requests_total", route="/api/health", method="GET", status="200")

        # Requests on the shared port (a new connection each: the kernel spreads them) and on each
        # member's own socket, so that every member's count must be in the one scrape.
        before = await scrape()
        for member in members:
            for _ in range(MEMBER_REQUESTS):
                code, _body = await asyncio.to_thread(readiness.request, readiness.member_socket(data_dir, member),
                                                      "GET", "/api/health")
                assert code == 200
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
            statuses = await asyncio.gather(*(_call(fresh, "GET", f"{base}/api/health")
                                              for _ in range(HEALTH_REQUESTS)))
        assert [s for s, _ in statuses] == [200] * HEALTH_REQUESTS
        sent = HEALTH_REQUESTS + MEMBER_REQUESTS * len(members)

        async def counted() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            values = await scrape()  # a member writes its counts within a second (api/journal.py)
            return values if health_count(values) - health_count(before) >= sent else None

        after = await eventually(counted, timeout=10, interval=0.2)
        assert health_count(after) - health_count(before) == sent
        assert total(after, "tp_messages_sent_total") == MESSAGES
        assert total(after, "tp_jobs_processed_total", queue="messages", kind="send_message") == MESSAGES
        assert total(after, "tdlib_sessions_total") >= 1 and total(after, "tdlib_requests_total") >= MESSAGES
        assert total(after, "tp_build_info", version=telegram_platform.__version__) == 1

    # A rolling reload under a steady request loop fails no request.
    async with Load(base) as load:
        await asyncio.sleep(1.0)
        reload = await asyncio.to_thread(_run, [*tp, "reload"], env=operator_env, timeout=180)
        await asyncio.sleep(1.0)
    assert reload.returncode == 0, reload.stdout + reload.stderr
    assert load.result.failures == [], load.result.failures[:5]
    assert load.result.ok > 0

    status_out = _ok(await asyncio.to_thread(_run, [*tp, "status", "--cpu-interval", "0"], env=operator_env))
    assert status_out.startswith(f"telegram-platform {telegram_platform.__version__}"), status_out

    checked = await asyncio.to_thread(_run, [*tp, "check"], env=operator_env, timeout=180)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    env_file = Path(tp[tp.index("--env-file") + 1])
    unset = _without(env_file, "PROMETHEUS_MULTIPROC_DIR", tmp_path / "env-without-metrics")
    failed = await asyncio.to_thread(_run, [tp[0], "--env-file", str(unset), "check"], env=operator_env,
                                     timeout=180)
    assert failed.returncode == 1, failed.stdout
    assert any(line.startswith("FAIL metrics: PROMETHEUS_MULTIPROC_DIR is not set")
               for line in failed.stdout.splitlines()), failed.stdout
    open_metrics = _without(env_file, "TP_METRICS_TOKEN", tmp_path / "env-without-metrics-token")
    failed = await asyncio.to_thread(_run, [tp[0], "--env-file", str(open_metrics), "check"], env=operator_env,
                                     timeout=180)
    assert failed.returncode == 1, failed.stdout
    assert any(line.startswith("FAIL environment: TP_METRICS_TOKEN: is not set: production needs it")
               for line in failed.stdout.splitlines()), failed.stdout
