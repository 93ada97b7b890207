"""supervisord's XML-RPC interface over its unix socket: what `tp status|reload|restart` and the
processes endpoints use."""

from __future__ import annotations

import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

API_GROUP = "tp-api"


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    name: str  # group:name as supervisorctl shows it
    group: str
    state: str
    pid: int
    uptime: float
    exit_status: int
    description: str

    @property
    def rss_bytes(self) -> int | None:
        return process_rss(self.pid) if self.pid else None


def process_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class SupervisorClient:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        transport = SupervisorTransport(None, None, serverurl=f"unix://{socket_path}")
        self._proxy: Any = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def processes(self) -> list[ProcessInfo]:
        now = time.time()
        result = []
        for info in self._proxy.supervisor.getAllProcessInfo():
            name = info["name"] if info["group"] == info["name"] else f"{info['group']}:{info['name']}"
            uptime = now - info["start"] if info["statename"] == "RUNNING" and info["start"] else 0.0
            result.append(ProcessInfo(name, info["group"], info["statename"], info["pid"], uptime,
                                      info["exitstatus"], info["description"]))
        return result

    def restart(self, name: str, wait: bool = True) -> None:
        self._proxy.supervisor.stopProcess(name, wait)
        self._proxy.supervisor.startProcess(name, wait)

    def stop(self, name: str, wait: bool = True) -> None:
        self._proxy.supervisor.stopProcess(name, wait)

    def start(self, name: str, wait: bool = True) -> None:
        self._proxy.supervisor.startProcess(name, wait)

    def log_path(self, name: str, stderr: bool = False) -> str:
        for info in self._proxy.supervisor.getAllProcessInfo():
            full = info["name"] if info["group"] == info["name"] else f"{info['group']}:{info['name']}"
            if name in (full, info["name"], info["group"]):
                return str(info["stderr_logfile" if stderr else "stdout_logfile"])
        raise KeyError(name)

    def rolling_restart(self, group: str = API_GROUP, settle: float = 1.0) -> list[str]:
        """Restart a group's members one at a time, so the others serve meanwhile."""
        done = []
        for process in self.processes():
            if process.group != group:
                continue
            self.restart(process.name)
            time.sleep(settle)
            done.append(process.name)
        return done
