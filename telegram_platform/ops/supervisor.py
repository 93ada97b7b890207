"""supervisord's XML-RPC interface over its unix socket: what `tp`, the event listener and the
processes endpoints use. Synchronous (xmlrpc.client): call it from threads, never from the event loop.
A client is not thread-safe: make one per thread."""

from __future__ import annotations

import json
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import Faults, SupervisorTransport

from ..settings import API_GROUP
from . import procfs

# REMOTE_COMMUNICATION events of this type carry requests and intents to the tp-events listener.
REMOTE_TYPE = "tp"
Fault = xmlrpc.client.Fault
# Raised by any call when supervisord is not there (socket missing, refused, reset).
SupervisorUnavailable = OSError


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    name: str  # group:name as supervisorctl shows it (just the name when they are equal)
    group: str
    member: str  # the process name inside its group (tp-api-00)
    state: str
    pid: int
    uptime: float
    started_at: float
    exit_status: int
    description: str
    stdout_logfile: str
    stderr_logfile: str

    @property
    def rss_bytes(self) -> int | None:
        return procfs.rss(self.pid) if self.pid else None

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"


def full_name(group: str, name: str) -> str:
    return name if group == name else f"{group}:{name}"


class SupervisorClient:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        transport = SupervisorTransport(None, None, serverurl=f"unix://{socket_path}")
        self._proxy: Any = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    @property
    def rpc(self) -> Any:
        return self._proxy.supervisor

    def state(self) -> str:
        return str(self.rpc.getState()["statename"])

    def pid(self) -> int:
        return int(self.rpc.getPID())

    def processes(self) -> list[ProcessInfo]:
        return [self._info(info) for info in self.rpc.getAllProcessInfo()]

    def info(self, name: str) -> ProcessInfo:
        return self._info(self.rpc.getProcessInfo(name))

    @staticmethod
    def _info(info: dict[str, Any]) -> ProcessInfo:
        running = info["statename"] == "RUNNING" and info["start"]
        # supervisord's own clock (`now`) so that uptime is right even when ours differs.
        uptime = float(info["now"] - info["start"]) if running else 0.0
        return ProcessInfo(full_name(info["group"], info["name"]), info["group"], info["name"],
                           info["statename"], info["pid"], uptime, float(info["start"] or 0),
                           info["exitstatus"], info["description"], info["stdout_logfile"],
                           info["stderr_logfile"])

    def resolve(self, name: str) -> list[ProcessInfo]:
        """Processes a name means: `group:member`, a member's own name, or a whole group."""
        processes = self.processes()
        for attribute in ("name", "member", "group"):
            found = [p for p in processes if getattr(p, attribute) == name]
            if found:
                return found
        raise KeyError(name)

    def group_members(self, group: str = API_GROUP) -> list[ProcessInfo]:
        return sorted((p for p in self.processes() if p.group == group), key=lambda p: p.name)

    def start(self, name: str, wait: bool = True) -> None:
        self.rpc.startProcess(name, wait)

    def stop(self, name: str, wait: bool = True) -> None:
        self.rpc.stopProcess(name, wait)

    def restart(self, name: str, wait: bool = True) -> None:
        """A plain stop-then-start; `ops.actions` does the graceful, readiness-checked kind."""
        try:
            self.stop(name, wait)
        except Fault as fault:
            if fault.faultCode != Faults.NOT_RUNNING:
                raise
        self.start(name, wait)

    def notify(self, message: dict[str, Any]) -> None:
        """Send a request or an intent to the tp-events listener (a REMOTE_COMMUNICATION event)."""
        self.rpc.sendRemoteCommEvent(REMOTE_TYPE, json.dumps(message))

    def tail_stderr(self, name: str, length: int = 4096) -> str:
        data, _offset, _overflow = self.rpc.tailProcessStderrLog(name, 0, length)
        text = str(data)
        if not text.strip():
            data, _offset, _overflow = self.rpc.tailProcessStdoutLog(name, 0, length)
            text = str(data)
        return text

    def log_path(self, name: str, stderr: bool = False) -> list[str]:
        return [p.stderr_logfile if stderr else p.stdout_logfile for p in self.resolve(name)]


def is_fault(exc: BaseException, *codes: int) -> bool:
    return isinstance(exc, Fault) and exc.faultCode in codes


__all__ = ["Fault", "Faults", "ProcessInfo", "SupervisorClient", "SupervisorUnavailable", "full_name", "is_fault"]
