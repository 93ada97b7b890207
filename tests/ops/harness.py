"""A real deployment for the supervision tests: the repository's supervisord.conf, copied into a
temporary root (so var/ lands there), run by a real supervisord in the foreground with the real
programs (tp-api members, tp-worker, the tp-events listener), pointed at the test servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from telegram_platform.ops import readiness
from telegram_platform.ops.readiness import member_socket
from telegram_platform.ops.restarts import Book, read_book
from telegram_platform.ops.supervisor import ProcessInfo, SupervisorClient

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent


def set_option(conf: str, section: str, option: str, value: str) -> str:
    """Replace (or add) `option=value` in one [section] of a supervisord.conf text."""
    start = conf.index(f"[{section}]")
    end = conf.find("\n[", start + 1)
    end = len(conf) if end == -1 else end
    body = conf[start:end]
    pattern = re.compile(rf"^{re.escape(option)}=.*$", re.MULTILINE)
    if pattern.search(body):
        body = pattern.sub(f"{option}={value}", body)
    else:
        body = body.rstrip("\n") + f"\n{option}={value}\n"
    return conf[:start] + body + conf[end:]


@dataclass
class Deployment:
    root: Path
    env: dict[str, str]
    api_processes: int
    process: subprocess.Popen[bytes] | None = None
    tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, tmp_path: Path, platform_env: dict[str, str], *, api_processes: int = 2,
               env: dict[str, str] | None = None, edit: Callable[[str], str] | None = None) -> Deployment:
        root = tmp_path / "deploy"
        for sub in ("var/run", "var/log", "var/supervisor.d"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        conf = (REPO / "supervisord.conf").read_text()
        (root / "supervisord.conf").write_text(edit(conf) if edit else conf)
        full_env = {
            **platform_env,
            "PATH": f"{BIN_DIR}{os.pathsep}{platform_env.get('PATH', '')}",
            "TP_HOST": "127.0.0.1",
            "TP_API_PROCESSES": str(api_processes),
            "TP_VAR_DIR": str(root / "var"),
            "TP_SUPERVISOR_SOCKET": str(root / "var/run/supervisor.sock"),
            "TP_DEBUG_ENDPOINTS": "1",
            "TP_WATCHDOG_INTERVAL": "1",
            "TP_API_DRAIN_SECONDS": "5",
            "TP_LOG_LEVEL": "info",
            **(env or {}),
        }
        return cls(root, full_env, api_processes)

    # -- life cycle -----------------------------------------------------------------------------

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> Deployment:
        log = open(self.root / "supervisord.stdout", "wb")  # noqa: SIM115 - kept by the child
        self.process = subprocess.Popen(["supervisord", "-n", "-c", str(self.root / "supervisord.conf")],
                                        env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        if wait:
            self.wait_serving(timeout)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        pids: list[int] = []
        with contextlib.suppress(OSError):
            pids = [p.pid for p in self.client().processes() if p.pid]
        with contextlib.suppress(OSError):
            self.client().rpc.shutdown()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        finally:
            # Nothing may outlive the test: each program leads a process group of its own.
            for pid in [*pids, self.process.pid]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None

    # -- looking -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['PORT']}"

    @property
    def socket(self) -> Path:
        return self.root / "var/run/supervisor.sock"

    def client(self) -> SupervisorClient:
        return SupervisorClient(self.socket)

    def processes(self) -> dict[str, ProcessInfo]:
        return {p.name: p for p in self.client().processes()}

    def members(self) -> list[str]:
        return [f"tp-api:tp-api-{i:02d}" for i in range(self.api_processes)]

    def member_socket(self, name: str) -> Path:
        return member_socket(self.root / "var", name.split(":")[-1])

    def ready(self, name: str) -> bool:
        return readiness.probe(self.member_socket(name), timeout=1.0)

    def book(self) -> Book:
        book = read_book(self.root / "var/run/tp-processes.json")
        assert book is not None, "the listener wrote no book"
        return book

    def log(self, name: str, err: bool = True) -> str:
        path = self.root / "var/log" / f"{name}.{'err' if err else 'out'}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Until supervisord answers, every API member is ready and the worker and listener run."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                processes = self.processes()
            except OSError as exc:
                last = exc
            else:
                last = {n: p.state for n, p in processes.items()}
                running = all(p.state == "RUNNING" for p in processes.values())
                if running and all(self.ready(m) for m in self.members()):
                    return
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"supervisord exited: {(self.root / 'supervisord.stdout').read_text()}")
            time.sleep(0.1)
        raise AssertionError(f"deployment not serving within {timeout}s: {last}; "
                             f"api-00 err: {self.log('tp-api-00')[-2000:]}")

    def tp(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "telegram_platform.cli.tp", *args], env=self.env,
                              cwd=self.root, capture_output=True, text=True, timeout=timeout, check=False)

    def member_request(self, name: str, method: str, path: str, body: bytes | None = None,
                       token: str | None = None) -> tuple[int, bytes]:
        """One request to exactly this member, on its own socket."""
        return readiness.request(self.member_socket(name), method, path, body=body, token=token)


@dataclass
class LoadResult:
    ok: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    started: float = 0.0


class Load:
    """A steady request loop on the shared port: `concurrency` clients, each one request after another
    on keep-alive connections, as a load tool would; every failure is recorded with its time."""

    def __init__(self, url: str, concurrency: int = 6, path: str = "/api/health") -> None:
        self.url = url + path
        self.concurrency = concurrency
        self.result = LoadResult()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20),
                                              connector=aiohttp.TCPConnector(limit=self.concurrency))
        self.result.started = time.monotonic()
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.concurrency)]
        return self

    async def _client(self) -> None:
        assert self._session is not None
        while not self._stop.is_set():
            try:
                async with self._session.get(self.url) as response:
                    await response.read()
                    if response.status == 200:
                        self.result.ok += 1
                    else:
                        self.result.failures.append((time.monotonic(), f"HTTP {response.status}"))
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self.result.failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
                await asyncio.sleep(0.01)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        assert self._session is not None
        await self._session.close()
