"""Embedded PostgreSQL and Redis for development and tests, and the dev secrets file.

Used by `scripts/run` (through `python -m telegram_platform.ops.embedded prepare`) to run a
self-contained development stack under supervisord, and by the test harness (tests/servers.py)
to start throwaway servers. Importing this module has no side effects.

PostgreSQL refuses to run as root: when this process is root, every PostgreSQL process runs as an
unprivileged system user (`telegram-platform`, created on demand; `nobody` as a fall-back) that
owns the data directory.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import hashlib
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Self, TypedDict

from .config import BACKING_SERVICE_PROGRAMS

SERVICE_USER = "telegram-platform"
FALLBACK_USER = "nobody"
SUPERUSER = "telegram_platform"
DATABASE_NAME = "telegram_platform"
SECRETS_FILE = "secrets.env"
STATE_FILE = "embedded.json"
DEFAULT_PG_PORT = 5433
DEFAULT_REDIS_PORT = 6380
DEFAULT_EMULATOR_URL = "http://127.0.0.1:3900"
DEBIAN_PACKAGES = {"postgres": "postgresql", "redis": "redis-server"}
_UNIX_SOCKET_MAX = 100  # sun_path is 108 bytes; keep a margin for ".s.PGSQL.NNNNN"


class EmbeddedError(RuntimeError):
    """A one-line, user-facing problem (what is missing and what to do)."""


class ProductionRefusal(EmbeddedError):
    """TP_PROFILE=production without explicit servers and secrets."""


# --------------------------------------------------------------------------------------------
# Binaries


@dataclass(frozen=True, slots=True)
class PgBinaries:
    bindir: Path

    @property
    def postgres(self) -> Path:
        return self.bindir / "postgres"

    @property
    def initdb(self) -> Path:
        return self.bindir / "initdb"


def _version_key(path: str) -> tuple[int, ...]:
    name = Path(path).parent.name  # /usr/lib/postgresql/<version>/bin
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)


def _pg_bindir_candidates() -> list[Path]:
    candidates: list[Path] = []
    for tool in ("postgres", "initdb"):
        found = shutil.which(tool)
        if found:
            candidates.append(Path(os.path.realpath(found)).parent)
            candidates.append(Path(found).parent)
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    candidates.extend(Path(p) for p in debian)
    return candidates


def find_postgres() -> PgBinaries | None:
    """PostgreSQL server binaries: PATH first, then /usr/lib/postgresql/*/bin, newest first."""
    for bindir in _pg_bindir_candidates():
        if all(os.access(bindir / tool, os.X_OK) for tool in ("postgres", "initdb")):
            return PgBinaries(bindir)
    return None


def find_redis() -> Path | None:
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    for path in ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server"):
        if os.access(path, os.X_OK):
            return Path(path)
    return None


def install_debian_packages(packages: Sequence[str]) -> None:
    """`apt-get update && apt-get install -y PACKAGES` (root only)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing Debian packages: {' '.join(packages)}", file=sys.stderr)
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EmbeddedError(
            f"could not install {' '.join(packages)} with apt-get ({exc}); install them yourself"
        ) from None


def _missing_message(packages: Sequence[str]) -> str:
    return (
        f"{' and '.join(packages)} not found: install them "
        f"(e.g. `sudo apt-get install -y {' '.join(packages)}`), "
        "or set DATABASE_URL/REDIS_URL to servers of your own"
    )


def require_binaries(
    *, postgres: bool = True, redis: bool = True, install: bool = True
) -> tuple[PgBinaries | None, Path | None]:
    """Find the wanted binaries; install the Debian packages when missing and root, else raise."""
    pg = find_postgres() if postgres else None
    rd = find_redis() if redis else None
    missing = [
        DEBIAN_PACKAGES[name]
        for name, wanted, found in (("postgres", postgres, pg), ("redis", redis, rd))
        if wanted and found is None
    ]
    if not missing:
        return pg, rd
    if not (install and os.geteuid() == 0 and shutil.which("apt-get")):
        raise EmbeddedError(_missing_message(missing))
    install_debian_packages(missing)
    pg = find_postgres() if postgres else None
    rd = find_redis() if redis else None
    if (postgres and pg is None) or (redis and rd is None):
        raise EmbeddedError(_missing_message(missing))
    return pg, rd


# --------------------------------------------------------------------------------------------
# The unprivileged user PostgreSQL runs as


@dataclass(frozen=True, slots=True)
class ServiceUser:
    name: str
    uid: int
    gid: int

    @property
    def is_current(self) -> bool:
        return self.uid == os.geteuid()


def _lookup_user(name: str) -> ServiceUser | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return ServiceUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def current_user() -> ServiceUser:
    entry = pwd.getpwuid(os.geteuid())
    return ServiceUser(entry.pw_name, entry.pw_uid, os.getegid())


@lru_cache(maxsize=1)
def service_user() -> ServiceUser:
    """The user PostgreSQL runs as: ourselves unless root; then `telegram-platform` (or `nobody`)."""
    if os.geteuid() != 0:
        return current_user()
    user = _lookup_user(SERVICE_USER)
    if user is None and shutil.which("useradd"):
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        user = _lookup_user(SERVICE_USER)  # also covers a concurrent creator
    if user is None:
        user = _lookup_user(FALLBACK_USER)
    if user is None:
        raise EmbeddedError(
            f"running as root and no unprivileged user for PostgreSQL: create one (useradd --system {SERVICE_USER})"
        )
    return user


def make_traversable(path: Path) -> None:
    """Give "others" search (x) permission on `path` and its ancestors, so the service user reaches it.

    Only directories lacking it are changed, and only the x bit: nothing becomes listable.
    """
    for directory in [path, *path.parents]:
        try:
            mode = directory.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & stat.S_IXOTH:
            os.chmod(directory, stat.S_IMODE(mode) | stat.S_IXOTH)


def prepare_owned_dir(path: Path, user: ServiceUser, mode: int = 0o700) -> None:
    """Create `path` (mode `mode`) owned by `user`, reachable by it."""
    path.mkdir(parents=True, exist_ok=True)
    if not user.is_current:
        os.chown(path, user.uid, user.gid)
        make_traversable(path.parent)
    os.chmod(path, mode)


class _Credentials(TypedDict):
    user: int | None
    group: int | None
    extra_groups: list[int] | None


def _as_user(user: ServiceUser) -> _Credentials:
    """Popen keyword arguments that run the child as `user` (no change when it is ourselves)."""
    if user.is_current:
        return {"user": None, "group": None, "extra_groups": None}
    return {"user": user.uid, "group": user.gid, "extra_groups": []}


def _child_env(user: ServiceUser) -> dict[str, str]:
    """A minimal environment: servers need none of ours (least of all the secrets)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    env["USER"] = env["LOGNAME"] = user.name
    env["HOME"] = "/"
    return env


_PR_SET_PDEATHSIG = 1


def _pdeathsig(sig: int) -> Callable[[], None] | None:
    """A preexec_fn: the child gets `sig` when its parent dies (a killed test run leaves no server).

    prctl is looked up here, in the parent: the forked child only calls it. None off Linux.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    signum = int(sig)

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)

    return setup


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
            env=_child_env(user),
            capture_output=True,
            text=True,
            check=False,
            **_as_user(user),
        )
        if result.returncode != 0:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
            raise EmbeddedError(f"initdb failed in {data_dir}: {' '.join(last) or result.returncode}")
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
            raise EmbeddedError(f"invalid database name {name!r}")
        result = subprocess.run(
            [str(binaries.postgres), "--single", "-D", str(data_dir), "template1"],
            input=f'CREATE DATABASE "{name}";\n',
            cwd="/",
            env=_child_env(user),
            capture_output=True,
            text=True,
            check=False,
            **_as_user(user),
        )
        problems = [
            line
            for line in result.stderr.splitlines()
            if re.match(r"\s*(ERROR|FATAL|PANIC):", line) and "already exists" not in line
        ]
        if result.returncode != 0 or problems:
            detail = " ".join(problems[:1]) or f"exit code {result.returncode}"
            raise EmbeddedError(f"could not create database {name} in {data_dir}: {detail}")


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
) -> list[str]:
    """The command line that runs redis-server in the foreground.

    The dev instance keeps an append-only file (queued work survives restarts); a throwaway one
    saves nothing. Both refuse writes rather than evict keys when full (queues must not vanish).
    """
    if binary is None:
        _, binary = require_binaries(postgres=False, redis=True)
        assert binary is not None
    argv = [
        str(binary),
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


def redis_url(port: int, host: str = "127.0.0.1", db: int = 0) -> str:
    return f"redis://{host}:{port}/{db}"


def redis_ping(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Secrets


def _parse_env_file(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values


def _valid_secrets(values: Mapping[str, str]) -> bool:
    jwt = values.get("JWT_SECRET", "")
    key = values.get("ENCRYPTION_KEY", "")
    return len(jwt) >= 32 and re.fullmatch(r"[0-9a-fA-F]{64}", key) is not None


def ensure_dev_secrets(var_dir: Path) -> dict[str, str]:
    """JWT_SECRET and ENCRYPTION_KEY for development: generated once into var/secrets.env (0600).

    Later calls read the same values back; a damaged file is reported, never overwritten (the
    encryption key protects stored TDLib keys).
    """
    var_dir = Path(var_dir)
    if not var_dir.exists():
        var_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(var_dir, 0o700)
    path = var_dir / SECRETS_FILE
    if not path.exists():
        values = {"JWT_SECRET": secrets.token_urlsafe(36), "ENCRYPTION_KEY": secrets.token_hex(32)}
        content = (
            "# Development secrets generated by telegram_platform.ops.embedded; keep this file private.\n"
            + "".join(f"{key}={value}\n" for key, value in values.items())
        )
        fd, tmp_name = tempfile.mkstemp(prefix=".secrets-", dir=var_dir)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp_name, 0o600)
            with contextlib.suppress(FileExistsError):  # another process won the race: use its file
                os.link(tmp_name, path)
        finally:
            os.unlink(tmp_name)
    if stat.S_IMODE(path.stat().st_mode) != 0o600:
        os.chmod(path, 0o600)
    values = _parse_env_file(path.read_text())
    if not _valid_secrets(values):
        raise EmbeddedError(
            f"{path} lacks a valid JWT_SECRET (>= 32 chars) or ENCRYPTION_KEY (64 hex): fix it or "
            "set both variables (deleting the file makes stored TDLib keys unreadable)"
        )
    return {"JWT_SECRET": values["JWT_SECRET"], "ENCRYPTION_KEY": values["ENCRYPTION_KEY"]}


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
                    env=_child_env(user),
                    start_new_session=True,
                    preexec_fn=_pdeathsig(self.death_signal),
                    **_as_user(user),
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
        raise EmbeddedError(f"throwaway {self.name} did not start: {last_error or 'timed out'}")

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
    """A redis-server for one test session: saves nothing, free port on 127.0.0.1."""

    name = "redis"

    def __init__(self, base_dir: Path, *, startup_timeout: float = 15.0) -> None:
        super().__init__(base_dir, startup_timeout=startup_timeout)
        self.data_dir = self.base_dir / "data"
        self._binary: Path | None = None

    def _prepare(self) -> None:
        _, self._binary = require_binaries(postgres=False, redis=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _argv(self) -> list[str]:
        return redis_argv(self.data_dir, self.port, throwaway=True, binary=self._binary)

    def _ready(self) -> bool:
        return redis_ping(self.port)

    @property
    def url(self) -> str:
        if not self.running:
            raise RuntimeError("redis is not running")
        return redis_url(self.port)


# --------------------------------------------------------------------------------------------
# The development stack for scripts/run


def _conf_value(text: str) -> str:
    """Escape for supervisord's config parser (which expands %(name)s)."""
    return text.replace("%", "%%")


def _command(argv: Sequence[str]) -> str:
    return _conf_value(shlex.join(argv))


def _program_conf(name: str, options: Mapping[str, str | int]) -> str:
    lines = [
        "; Written by scripts/run (telegram_platform.ops.embedded); rewritten on every run.",
        f"[program:{name}]",
    ]
    lines += [f"{key}={value}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def _load_state(path: Path) -> dict[str, int]:
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, int)} if isinstance(raw, dict) else {}


def _choose_port(state: dict[str, int], key: str, preferred: int, reserved: set[int]) -> int:
    """The port recorded for `key` if still free, else `preferred`, else any free one; never one in
    `reserved` (the API's PORT, the emulator's, the other server's): those are free now only
    because their programs have not started yet. The choice is added to `reserved`."""
    candidates = [state.get(key), preferred]
    port = next((p for p in candidates if p and p not in reserved and port_is_free(p)), None)
    while port is None:
        chosen = free_port()
        port = chosen if chosen not in reserved else None
    state[key] = port
    reserved.add(port)
    return port


def _port_of(url: str) -> int | None:
    try:
        return urllib.parse.urlsplit(url).port
    except ValueError:
        return None


def _reachable_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "*") else host


@dataclass(slots=True)
class Plan:
    """What `prepare` decided: variables to export and supervisord program files to write."""

    exports: dict[str, str]
    programs: dict[str, str]
    notes: list[str]


def plan_dev_stack(root: Path, environ: Mapping[str, str]) -> Plan:
    """Decide the dev stack from the environment; creates var/, secrets and embedded clusters.

    Embedded PostgreSQL/Redis when DATABASE_URL/REDIS_URL are unset, the emulator when
    TDLIB_API_ID is unset, generated secrets when JWT_SECRET/ENCRYPTION_KEY are unset.
    """
    root = root.absolute()
    env = {k: v.strip() for k, v in environ.items() if v.strip()}
    exports: dict[str, str] = {}
    programs: dict[str, str] = {}
    notes: list[str] = []

    profile = env.get("TP_PROFILE", "development").lower()
    if profile == "production":
        missing = [v for v in ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "ENCRYPTION_KEY") if v not in env]
        if missing:
            raise ProductionRefusal(
                f"TP_PROFILE=production refuses embedded servers and generated secrets: set {', '.join(missing)}"
            )

    # supervisord's own files (socket, pid, logs, generated programs) live in <root>/var, where
    # supervisord.conf names them; application data and secrets in TP_VAR_DIR (default the same).
    run_var = root / "var"
    var_dir = Path(env.get("TP_VAR_DIR", str(run_var))).absolute()
    for directory, mode in (
        (run_var, 0o700),
        (run_var / "run", 0o700),
        (run_var / "log", 0o750),
        (run_var / "supervisor.d", 0o700),
        (var_dir, 0o700),
        (var_dir / "run", 0o700),
    ):
        if not directory.exists():
            directory.mkdir(mode=mode, parents=True)
            os.chmod(directory, mode)
    log_dir = run_var / "log"
    exports["TP_VAR_DIR"] = str(var_dir)
    exports["TP_PROFILE"] = profile
    exports["PORT"] = env.get("PORT", "3000")
    exports["TP_HOST"] = env.get("TP_HOST", "0.0.0.0")
    exports["TP_API_PROCESSES"] = env.get("TP_API_PROCESSES", str(len(os.sched_getaffinity(0)) or 1))
    if not exports["TP_API_PROCESSES"].isdigit() or int(exports["TP_API_PROCESSES"]) < 1:
        raise EmbeddedError("TP_API_PROCESSES must be a positive integer")
    exports["TP_SUPERVISOR_SOCKET"] = env.get("TP_SUPERVISOR_SOCKET", str(run_var / "run/supervisor.sock"))
    # prometheus_client's multiprocess files, for every program (wiped by `prepare`; ops/metrics.py).
    exports["PROMETHEUS_MULTIPROC_DIR"] = str(Path(env.get("PROMETHEUS_MULTIPROC_DIR",
                                                           str(run_var / "run/metrics"))).absolute())

    if "JWT_SECRET" not in env or "ENCRYPTION_KEY" not in env:
        generated = ensure_dev_secrets(var_dir)
        for key, value in generated.items():
            if key not in env:
                exports[key] = value
        notes.append(f"secrets: {var_dir / SECRETS_FILE}")

    want_pg = "DATABASE_URL" not in env
    want_redis = "REDIS_URL" not in env
    # Ports the platform's own programs will listen on: an embedded server must not be given one.
    reserved = {port for port in (int(exports["PORT"]) if exports["PORT"].isdigit() else None,
                                  _port_of(env.get("TP_EMULATOR_URL", DEFAULT_EMULATOR_URL))) if port}
    state_path = var_dir / STATE_FILE
    state = _load_state(state_path)
    if want_pg or want_redis:
        pg_bins, redis_bin = require_binaries(postgres=want_pg, redis=want_redis)
        if want_pg:
            assert pg_bins is not None
            user = service_user()
            if not user.is_current:
                # var/ and var/run stay unlistable; the service user may only pass through them.
                make_traversable(var_dir / "run")
            data_dir = var_dir / "postgres"
            socket_dir = socket_dir_for(var_dir / "run" / "postgresql")
            if init_postgres(data_dir, databases=(DATABASE_NAME,), user=user, binaries=pg_bins):
                notes.append(f"initialised PostgreSQL in {data_dir}")
            prepare_owned_dir(socket_dir, user, 0o700)
            port = _choose_port(state, "postgres_port", DEFAULT_PG_PORT, reserved)
            api_processes = int(exports["TP_API_PROCESSES"])
            max_connections = max(200, 25 * (api_processes + 4))
            argv = postgres_argv(data_dir, port, socket_dir, max_connections=max_connections, binaries=pg_bins)
            child_env = [f"{k}={v}" for k, v in _child_env(user).items()]
            options: dict[str, str | int] = {
                "command": _command(["/usr/bin/env", "-i", *child_env, *argv]),
                "directory": "/",
                "priority": 10,
                "autostart": "true",
                "autorestart": "true",
                "startsecs": 3,
                "startretries": 5,
                "stopsignal": "INT",
                "stopwaitsecs": 60,
                "redirect_stderr": "true",
                "stdout_logfile": _conf_value(str(log_dir / "postgres.log")),
                "stdout_logfile_maxbytes": "10MB",
                "stdout_logfile_backups": 30,
            }
            if not user.is_current:
                options["user"] = user.name
            programs["postgres"] = _program_conf("postgres", options)
            exports["DATABASE_URL"] = postgres_url(port)
        if want_redis:
            assert redis_bin is not None
            data_dir = var_dir / "redis"
            data_dir.mkdir(mode=0o700, exist_ok=True)
            port = _choose_port(state, "redis_port", DEFAULT_REDIS_PORT, reserved)
            argv = redis_argv(data_dir, port, binary=redis_bin)
            child_env = [f"{k}={v}" for k, v in _child_env(current_user()).items()]
            programs["redis"] = _program_conf(
                "redis",
                {
                    "command": _command(["/usr/bin/env", "-i", *child_env, *argv]),
                    "directory": _conf_value(str(data_dir)),
                    "priority": 10,
                    "autostart": "true",
                    "autorestart": "true",
                    "startsecs": 1,
                    "startretries": 5,
                    "stopsignal": "TERM",
                    "stopwaitsecs": 30,
                    "redirect_stderr": "true",
                    "stdout_logfile": _conf_value(str(log_dir / "redis.log")),
                    "stdout_logfile_maxbytes": "10MB",
                    "stdout_logfile_backups": 30,
                },
            )
            exports["REDIS_URL"] = redis_url(port)
        state_path.write_text(json.dumps(state, indent=2) + "\n")

    if "TDLIB_API_ID" not in env:
        exports["TP_EMULATOR_URL"] = env.get("TP_EMULATOR_URL", DEFAULT_EMULATOR_URL)
        programs["tp-emulator"] = _program_conf(
            "tp-emulator",
            {
                # The emulated Telegram keeps its users and sessions across restarts, as Telegram does.
                "command": _conf_value(f"tp-emulator --state {shlex.quote(str(root / 'var' / 'emulator.json'))}"),
                "directory": _conf_value(str(root)),
                "environment": 'TP_INSTANCE="tp-emulator"',
                "priority": 50,
                "autostart": "true",
                "autorestart": "true",
                "startsecs": 1,
                "startretries": 16,
                "stopsignal": "TERM",
                "stopwaitsecs": 10,
                "stdout_logfile": _conf_value(str(log_dir / "tp-emulator.out.log")),
                "stdout_logfile_maxbytes": "10MB",
                "stdout_logfile_backups": 30,
                "stderr_logfile": _conf_value(str(log_dir / "tp-emulator.err.log")),
                "stderr_logfile_maxbytes": "10MB",
                "stderr_logfile_backups": 30,
            },
        )
        notes.append("Telegram: emulator (set TDLIB_API_ID and TDLIB_API_HASH for real TDLib)")
    return Plan(exports=exports, programs=programs, notes=notes)


def write_programs(var_dir: Path, programs: Mapping[str, str]) -> None:
    """Write var/supervisor.d/<name>.conf for each program; remove stale generated ones."""
    conf_dir = var_dir / "supervisor.d"
    conf_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Only these files are ours: any other file in var/supervisor.d is left alone.
    for name in BACKING_SERVICE_PROGRAMS:
        path = conf_dir / f"{name}.conf"
        if name in programs:
            tmp = path.with_suffix(".conf.tmp")
            tmp.write_text(programs[name])
            os.chmod(tmp, 0o600)
            tmp.replace(path)
        else:
            path.unlink(missing_ok=True)


def supervisor_running(socket_path: Path) -> bool:
    """True when a supervisord answers on this clone's unix socket."""
    if not socket_path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(socket_path))
        except OSError:
            return False
        return True


def wait_http_ok(url: str, timeout: float) -> bool:
    """Poll `url` until it answers 200 or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    return False


# --------------------------------------------------------------------------------------------
# Command line (used by scripts/run)


def _cmd_prepare(args: argparse.Namespace) -> int:
    root = Path(args.root).absolute()
    plan = plan_dev_stack(root, os.environ)
    write_programs(root / "var", plan.programs)
    # Once, before supervisord starts: the previous run's metrics files go (never wiped by a process
    # at its own start, which would erase the other processes' numbers).
    from .metric_files import wipe

    wipe(Path(plan.exports["PROMETHEUS_MULTIPROC_DIR"]))
    for key, value in plan.exports.items():
        print(f"export {key}={shlex.quote(value)}")
    for note in plan.notes:
        print(note, file=sys.stderr)
    return 0


def _cmd_secrets(args: argparse.Namespace) -> int:
    for key, value in ensure_dev_secrets(Path(args.var_dir)).items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _cmd_running(args: argparse.Namespace) -> int:
    return 0 if supervisor_running(Path(args.socket)) else 1


def _cmd_wait_http(args: argparse.Namespace) -> int:
    return 0 if wait_http_ok(args.url, args.timeout) else 1


def _cmd_health_url(args: argparse.Namespace) -> int:
    host = _reachable_host(os.environ.get("TP_HOST", "0.0.0.0").strip())
    if ":" in host:
        host = f"[{host}]"
    print(f"http://{host}:{os.environ.get('PORT', '3000').strip() or '3000'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m telegram_platform.ops.embedded")
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="set up var/, secrets, embedded servers; print exports")
    prepare.add_argument("--root", default=".", help="the clone's top directory")
    prepare.set_defaults(func=_cmd_prepare)
    secrets_cmd = sub.add_parser("secrets", help="print the dev secrets (generated once) as exports")
    secrets_cmd.add_argument("var_dir")
    secrets_cmd.set_defaults(func=_cmd_secrets)
    running = sub.add_parser("running", help="exit 0 when supervisord answers on SOCKET")
    running.add_argument("socket")
    running.set_defaults(func=_cmd_running)
    wait = sub.add_parser("wait-http", help="exit 0 once URL answers 200")
    wait.add_argument("url")
    wait.add_argument("--timeout", type=float, default=60.0)
    wait.set_defaults(func=_cmd_wait_http)
    base = sub.add_parser("base-url", help="print the local base URL of the API from PORT/TP_HOST")
    base.set_defaults(func=_cmd_health_url)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ProductionRefusal as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except EmbeddedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
