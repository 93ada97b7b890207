"""Readiness of API members: each member also serves the application on a unix socket of its own
(var/run/api/<instance>.sock), because the members share one TCP socket and a request to the port
reaches any of them. A member is ready when its health route answers there, not when it has been
alive for `startsecs`."""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import tempfile
import time
from pathlib import Path

HEALTH_PATH = "/api/health"
_UNIX_SOCKET_MAX = 100  # sun_path is 108 bytes


def member_socket(var_dir: Path, instance: str) -> Path:
    """The unix socket an API member serves its health route on (readiness), by instance name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", instance)
    preferred = var_dir.absolute() / "run" / "api" / f"{safe}.sock"
    if len(str(preferred)) <= _UNIX_SOCKET_MAX:
        return preferred
    digest = hashlib.sha256(str(var_dir.absolute()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"tp-{digest}" / f"{safe}.sock"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def probe(path: Path, timeout: float = 2.0) -> bool:
    """True when the member behind `path` answers its health route with 200."""
    if not path.exists():
        return False
    conn = _UnixConnection(path, timeout)
    try:
        conn.request("GET", HEALTH_PATH, headers={"Connection": "close", "X-Request-ID": "readiness-probe"})
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def wait_ready(path: Path, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if probe(path, timeout=min(2.0, max(0.1, deadline - time.monotonic()))):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def request(path: Path, method: str, url: str, body: bytes | None = None, token: str | None = None,
            timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP request to a given member (tests and operators use it to reach one member)."""
    conn = _UnixConnection(path, timeout)
    headers = {"Connection": "close", "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, url, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
