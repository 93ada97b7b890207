"""PostgreSQL and Redis servers for development and tests: how each is initialised and run (the
command lines scripts/run hands supervisord), and throwaway instances a test session starts and
stops itself."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

from ..ops.dev_artifacts import DATABASE_NAME, SUPERUSER
from .binaries import PgBinaries, require_binaries
from .errors import DevStackError
from .users import ServiceUser, as_user, child_env, current_user, pdeathsig, prepare_owned_dir, service_user

_UNIX_SOCKET_MAX = 100  # sun_path is 108 bytes; keep a margin for ".s.PGSQL.NNNNN"


# --------------------------------------------------------------------------------------------
# PostgreSQL


def init_postgres(
    data_dir: Path,
    *,
    throwaway: bool = False,
    databases: Sequence[str] = (),
    user: ServiceUser | None = None,
    binaries: PgBinaries | None = None,
) -> bool:
    """Create a cluster in `data_dir` (trust auth; superuser `telegram_platform`) unless one is there.

    Creates `databases` right after initdb (single-user mode, no server needed). A throwaway cluster
    skips the fsyncs. Returns True when a new cluster was made.
    """
    data_dir = data_dir.absolute()
    user = user or service_user()
    if binaries is None:
        binaries, _ = require_binaries(postgres=True, redis=False)
        assert binaries is not None
    marker = data_dir / ".telegram-platform-initialized"
    created = False
    if not (data_dir / "PG_VERSION").exists():
        prepare_owned_dir(data_dir, user)
        argv = [
            str(binaries.initdb),
            "--pgdata",
            str(data_dir),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-locale",
        ]
        if throwaway:
            argv.append("--no-sync")
        result = subprocess.run(
            argv,
            cwd="/",
            env=child_env(user),
            capture_output=True,
            text=True,
            check=False,
            **as_user(user),
        )
        if result.returncode != 0:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
            raise DevStackError(f"initdb failed in {data_dir}: {' '.join(last) or result.returncode}")
        created = True
    if databases and not marker.exists():
        _create_databases_single_user(data_dir, databases, user, binaries)
        marker.write_text("databases created\n")
        if not user.is_current:
            os.chown(marker, user.uid, user.gid)
    return created


def _create_databases_single_user(
    data_dir: Path, databases: Sequence[str], user: ServiceUser, binaries: PgBinaries
) -> None:
    for name in databases:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise DevStackError(f"invalid database name {name!r}")
        result = subprocess.run(
            [str(binaries.postgres), "--single", "-D", str(data_dir), "template1"],
            input=f'CREATE DATABASE "{name}";\n',
            cwd="/",
            env=child_env(user),
            capture_output=True,
            text=True,
            check=False,
            **as_user(user),
        )
        problems = [
            line
            for line in result.stderr.splitlines()
            if re.match(r"\s*(ERROR|FATAL|PANIC):", line) and "already exists" not in line
        ]
        if result.returncode != 0 or problems:
            detail = " ".join(problems[:1]) or f"exit code {result.returncode}"
            raise DevStackError(f"could not create database {name} in {data_dir}: {detail}")


def postgres_argv(
    data_dir: Path,
    port: int,
    socket_dir: Path,
    *,
    throwaway: bool = False,
    host: str = "127.0.0.1",
    max_connections: int = 200,
    binaries: PgBinaries | None = None,
) -> list[str]:
    """The command line that runs PostgreSQL in the foreground (for supervisord or a test)."""
    if binaries is None:
        binaries, _ = require_binaries(postgres=True, redis=False)
        assert binaries is not None
    argv = [
        str(binaries.postgres),
        "-D",
        str(data_dir.absolute()),
        "-p",
        str(port),
        "-k",
        str(socket_dir.absolute()),
        "-c",
        f"listen_addresses={host}",
        "-c",
        f"max_connections={max_connections}",
        "-c",
        "logging_collector=off",
    ]
    if throwaway:
        for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
            argv += ["-c", setting]
    return argv


def postgres_url(port: int, database: str = DATABASE_NAME, host: str = "127.0.0.1") -> str:
    return f"postgresql://{SUPERUSER}@{host}:{port}/{database}"


def postmaster_ready(data_dir: Path) -> bool:
    """True once postmaster.pid says the server accepts connections."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return False
    return len(lines) >= 8 and lines[7].strip() == "ready"


def socket_dir_for(preferred: Path) -> Path:
    """`preferred` unless its socket path would be too long for sun_path; then a short /tmp dir."""
    if len(str(preferred.absolute())) + len("/.s.PGSQL.65535") <= _UNIX_SOCKET_MAX:
        return preferred.absolute()
    digest = hashlib.sha256(str(preferred.absolute()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"telegram-platform-{digest}"


# --------------------------------------------------------------------------------------------
# Redis


def redis_argv(
    data_dir: Path,
    port: int,
    *,
    throwaway: bool = False,
    host: str = "127.0.0.1",
    binary: Path | None = None,
    config_file: Path | None = None,
) -> list[str]:
    """The command line that runs redis-server in the foreground.

    The dev instance keeps an append-only file (queued work survives restarts); a throwaway one
    saves nothing. Both refuse writes rather than evict keys when full (queues must not vanish).
    `config_file` (the dev instance's, with its password: dev_secrets.ensure_redis_password) is
    read first; the options here override the rest of it.
    """
    if binary is None:
        _, binary = require_binaries(postgres=False, redis=True)
        assert binary is not None
    argv = [
        str(binary),
        *([str(config_file.absolute())] if config_file is not None else []),
        "--port",
        str(port),
        "--bind",
        host,
        "--dir",
        str(data_dir.absolute()),
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        "--maxmemory-policy",
        "noeviction",
        "--logfile",
        "",
    ]
    if throwaway:
        argv += ["--appendonly", "no", "--save", ""]
    else:
        argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
    return argv


def redis_url(port: int, host: str = "127.0.0.1", db: int = 0, password: str | None = None) -> str:
    credentials = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{credentials}{host}:{port}/{db}"


def redis_ping(port: int, host: str = "127.0.0.1", timeout: float = 0.5, password: str | None = None) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            if password is not None:
                secret = password.encode()
                conn.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret))
                if not conn.recv(64).startswith(b"+OK"):
                    return False
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Ports and processes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Could a server listen on `port`? Bound as PostgreSQL and Redis bind (SO_REUSEADDR), so the
    TIME_WAIT connections a stopped server leaves behind do not count as the port being in use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Signal the process, wait, then SIGKILL its whole process group; always reaps it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Anything left in its group (it was started in a session of its own) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


class _Throwaway:
    """Common start/stop logic; subclasses build the argv and the readiness check."""

    name = "server"
    stop_signal = signal.SIGTERM
    death_signal = signal.SIGTERM  # sent by the kernel if the test process dies first

    def __init__(self, base_dir: Path, *, startup_timeout: float = 30.0) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.startup_timeout = startup_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.base_dir / f"{self.name}.log"

    # Subclass hooks
    def _prepare(self) -> None: ...

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _user(self) -> ServiceUser:
        return current_user()

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        if self._proc is not None:
            return self
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        last_error = ""
        for _attempt in range(3):  # a free port may be taken between choosing and binding it
            self.port = free_port()
            user = self._user()
            with open(self._log, "ab") as log:
                self._proc = subprocess.Popen(
                    self._argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    env=child_env(user),
                    start_new_session=True,
                    preexec_fn=pdeathsig(self.death_signal),
                    **as_user(user),
                )
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                if self._ready():
                    return self
                time.sleep(0.05)
            last_error = _log_tail(self._log)
            self._kill()
            if "in use" not in last_error:
                break
        raise DevStackError(f"throwaway {self.name} did not start: {last_error or 'timed out'}")

    def _kill(self) -> None:
        if self._proc is not None:
            _stop_process(self._proc, signal.SIGKILL, 5)
            self._proc = None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and reap it; no process is left behind."""
        if self._proc is not None:
            _stop_process(self._proc, self.stop_signal, timeout)
            self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ThrowawayPostgres(_Throwaway):
    """A PostgreSQL cluster in `base_dir` for one test session: trust auth, fsync off, free port.

    `.url` points at the `postgres` maintenance database; `.url_for(name)` at any other.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown
    death_signal = signal.SIGQUIT  # "immediate" shutdown

    def __init__(self, base_dir: Path, *, startup_timeout: float = 30.0) -> None:
        super().__init__(base_dir, startup_timeout=startup_timeout)
        self.data_dir = self.base_dir / "data"
        self.socket_dir = socket_dir_for(self.base_dir / "run")
        self._binaries: PgBinaries | None = None

    def _user(self) -> ServiceUser:
        return service_user()

    def _prepare(self) -> None:
        self._binaries, _ = require_binaries(postgres=True, redis=False)
        user = self._user()
        init_postgres(self.data_dir, throwaway=True, user=user, binaries=self._binaries)
        prepare_owned_dir(self.socket_dir, user, 0o700)

    def _argv(self) -> list[str]:
        return postgres_argv(self.data_dir, self.port, self.socket_dir, throwaway=True, binaries=self._binaries)

    def _ready(self) -> bool:
        return postmaster_ready(self.data_dir)

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        if not self.running:
            raise RuntimeError("postgres is not running")
        return postgres_url(self.port, database)


class ThrowawayRedis(_Throwaway):
    """A redis-server for one test session: saves nothing, free port on 127.0.0.1; with `password`,
    it requires it (given in a 0600 config file, as the dev instance's), and `url` carries it."""

    name = "redis"

    def __init__(self, base_dir: Path, *, startup_timeout: float = 15.0, password: str | None = None) -> None:
        super().__init__(base_dir, startup_timeout=startup_timeout)
        self.data_dir = self.base_dir / "data"
        self.password = password
        self._binary: Path | None = None

    def _prepare(self) -> None:
        _, self._binary = require_binaries(postgres=False, redis=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.password is not None:
            fd = os.open(self._config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(f"requirepass {self.password}\n")

    @property
    def _config_file(self) -> Path:
        return self.base_dir / "redis.conf"

    def _argv(self) -> list[str]:
        return redis_argv(self.data_dir, self.port, throwaway=True, binary=self._binary,
                          config_file=self._config_file if self.password is not None else None)

    def _ready(self) -> bool:
        return redis_ping(self.port, password=self.password)

    @property
    def url(self) -> str:
        if not self.running:
            raise RuntimeError("redis is not running")
        return redis_url(self.port, password=self.password)
