"""What supervision needs from the environment: where supervisord is, which programs it watches,
memory limits, restart back-off. Read by the event listener (which must not depend on the database
or the secrets), `tp` and `tp check`; validated like Settings (ConfigError names the variable)."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..settings import ConfigError, _Env

API_GROUP = "tp-api"
WORKER_PROGRAM = "tp-worker"
LISTENER_PROGRAM = "tp-events"
# The services the platform runs on, when scripts/run embeds them (devstack/plan.py writes their
# programs into var/supervisor.d): restarted on the host, never through the API.
BACKING_SERVICE_PROGRAMS = ("postgres", "redis", "tp-emulator")
STATE_FILE = "tp-processes.json"
_UNIX_SOCKET_MAX = 100  # sun_path is 108 bytes
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'1GB', '512MB', '1.5g', '1073741824' -> bytes (binary units, as memmon and PM2 use)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 1GB, 512MB, 1073741824)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(size: float) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{int(size)} B"


def socket_from_url(url: str) -> Path | None:
    """supervisord hands its children SUPERVISOR_SERVER_URL=unix:///path/supervisor.sock."""
    return Path(url.removeprefix("unix://")) if url.startswith("unix://") else None


@dataclass(frozen=True, slots=True)
class OpsConfig:
    supervisor_socket: Path
    var_dir: Path
    api_group: str = API_GROUP
    worker_program: str = WORKER_PROGRAM
    # Programs whose crashes the listener restarts (with back-off): they run with autorestart=false.
    managed: tuple[str, ...] = (API_GROUP, WORKER_PROGRAM)
    api_memory_limit: int = 1 << 30
    worker_memory_limit: int = 2 << 30
    watchdog_interval: float = 2.0
    backoff_initial: float = 0.1
    backoff_factor: float = 1.5
    backoff_max: float = 15.0
    backoff_reset_after: float = 30.0
    ready_timeout: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OpsConfig:
        env = _Env(os.environ if environ is None else environ)
        var_dir = Path(env.get("TP_VAR_DIR", "var")).absolute()
        explicit = env.get("TP_SUPERVISOR_SOCKET")
        socket = (Path(explicit) if explicit else socket_from_url(env.get("SUPERVISOR_SERVER_URL"))
                  or var_dir / "run" / "supervisor.sock")
        return cls(
            supervisor_socket=socket.absolute(),
            var_dir=var_dir,
            api_group=env.get("TP_API_GROUP", API_GROUP),
            worker_program=env.get("TP_WORKER_PROGRAM", WORKER_PROGRAM),
            managed=tuple(p.strip() for p in env.get("TP_MANAGED_PROGRAMS", f"{API_GROUP},{WORKER_PROGRAM}")
                          .split(",") if p.strip()),
            api_memory_limit=_size(env, "TP_API_MEMORY_LIMIT", 1 << 30),
            worker_memory_limit=_size(env, "TP_WORKER_MEMORY_LIMIT", 2 << 30),
            watchdog_interval=env.number("TP_WATCHDOG_INTERVAL", 2.0, 0.2, 5.0),
            backoff_initial=env.number("TP_RESTART_DELAY", 0.1, 0.0, 60.0),
            backoff_max=env.number("TP_RESTART_DELAY_MAX", 15.0, 0.0, 3600.0),
            backoff_reset_after=env.number("TP_RESTART_RESET_AFTER", 30.0, 1.0, 86_400.0),
            ready_timeout=env.number("TP_READY_TIMEOUT", 60.0, 1.0, 3600.0),
        )

    @property
    def state_path(self) -> Path:
        """The listener's book of restarts, next to supervisord's socket: every party finds it."""
        return self.supervisor_socket.parent / STATE_FILE

    def member_socket(self, instance: str) -> Path:
        return member_socket(self.var_dir, instance)

    def backoff_delay(self, consecutive_crashes: int) -> float:
        """PM2's exp_backoff_restart_delay: initial x factor^(n-1), capped."""
        if consecutive_crashes <= 0:
            return 0.0
        return float(min(self.backoff_max, self.backoff_initial * self.backoff_factor ** (consecutive_crashes - 1)))

    def memory_limit(self, group: str) -> tuple[int, bool] | None:
        """(limit in bytes, count the process's children too) for a program, or None."""
        if group == self.api_group:
            return self.api_memory_limit, False
        if group == self.worker_program:
            return self.worker_memory_limit, True
        return None


def _size(env: _Env, name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = parse_size(raw)
    except ValueError as exc:
        raise ConfigError(name, str(exc)) from None
    if value < 1 << 20:
        raise ConfigError(name, f"must be at least 1MB (got {value} bytes)")
    return value


def member_socket(var_dir: Path, instance: str) -> Path:
    """The unix socket an API member serves its health route on (readiness), by instance name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", instance)
    preferred = var_dir.absolute() / "run" / "api" / f"{safe}.sock"
    if len(str(preferred)) <= _UNIX_SOCKET_MAX:
        return preferred
    digest = hashlib.sha256(str(var_dir.absolute()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"tp-{digest}" / f"{safe}.sock"
