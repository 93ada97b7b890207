"""Graceful operations on supervised processes: restart one, roll a group, stop.

A restart is stop (SIGTERM: the program drains as it does on any SIGTERM) then start; the worker's
is marked as one (restart_mark.py), so it keeps the host's accounts instead of handing them off. An API member
is stopped only while the other members serve, and counted back only once it answers its health
route on its own socket. Restarts of the API group's members are serialised across processes (the
listener's watchdog, `tp reload`, `tp restart`) by a lock file next to supervisord's socket.

Before each stop the operator tells the listener why (an intent), so the restart is counted under
the right reason. Everything here blocks: run it in a thread or a command, never on an event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..settings import SupervisionSettings
from . import readiness, restart_mark
from .supervisor import Fault, Faults, ProcessInfo, SupervisorClient

Progress = Callable[[str], None]
Intent = Callable[[str, str], None]


class ActionError(Exception):
    """An operation could not be done safely; the message says why and what to look at."""


@contextlib.contextmanager
def group_lock(lock_dir: Path, group: str, timeout: float) -> Iterator[None]:
    path = lock_dir / f".tp-{group}.lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ActionError(f"another restart or reload of {group} is still running "
                                      f"(waited {timeout:.0f}s)") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


class Operator:
    def __init__(self, client: SupervisorClient, config: SupervisionSettings, *, intent: Intent | None = None,
                 progress: Progress | None = None) -> None:
        self.client = client
        self.config = config
        self._intent = intent or self._notify_listener
        self._progress = progress or (lambda _line: None)

    def _notify_listener(self, name: str, reason: str) -> None:
        self.client.notify({"action": "intent", "name": name, "reason": reason})

    def _lock(self, group: str) -> contextlib.AbstractContextManager[None]:
        return group_lock(self.config.supervisor_socket.parent, group, self.config.ready_timeout * 2)

    def is_api_member(self, process: ProcessInfo) -> bool:
        return process.group == self.config.api_group

    def member_socket(self, process: ProcessInfo) -> Path:
        return readiness.member_socket(self.config.var_dir, process.member)

    def ready(self, process: ProcessInfo) -> bool:
        return readiness.probe(self.member_socket(process))

    # -- the operations ---------------------------------------------------------------------

    def restart(self, name: str, reason: str = "manual") -> list[str]:
        """Restart what `name` means: a whole API group rolls, one member or program restarts."""
        targets = self.client.resolve(name)
        if len(targets) > 1 or (targets[0].group == name and targets[0].name != name):
            if targets[0].group == self.config.api_group:
                return self.reload(targets[0].group, reason=reason)
            for target in targets:
                self.restart_one(target, reason)
            return [t.name for t in targets]
        self.restart_one(targets[0], reason)
        return [targets[0].name]

    def restart_one(self, process: ProcessInfo, reason: str) -> None:
        if not self.is_api_member(process):
            self._cycle(process, reason, wait_running=True)
            return
        with self._lock(process.group):
            self._replace_member(self.client.info(process.name), reason)

    def reload(self, group: str | None = None, reason: str = "reload") -> list[str]:
        """Replace the group's members one at a time; stop at the first member that fails."""
        group = group or self.config.api_group
        done: list[str] = []
        with self._lock(group):
            members = self.client.group_members(group)
            if not members:
                raise ActionError(f"no process group named {group}")
            if len(members) == 1:
                self._progress(f"warning: {group} has one member: while it restarts, connections are "
                               "refused (run at least 2: TP_API_PROCESSES)")
            for member in members:
                current = self.client.info(member.name)
                if current.state == "STOPPED":
                    self._progress(f"{current.name}: stopped by an operator, left alone")
                    continue
                self._replace_member(current, reason)
                done.append(current.name)
        return done

    def stop(self, name: str) -> list[str]:
        targets = self.client.resolve(name)
        for target in targets:
            self._intent(target.name, "stop")
            try:
                self.client.stop(target.name, wait=True)
            except Fault as fault:
                if fault.faultCode != Faults.NOT_RUNNING:
                    raise ActionError(f"{target.name}: {fault.faultString}") from None
            self._progress(f"{target.name}: stopped")
        return [t.name for t in targets]

    def start(self, name: str) -> list[str]:
        targets = self.client.resolve(name)
        for target in targets:
            self._start(target, wait=not self.is_api_member(target))
            if self.is_api_member(target) and not readiness.wait_ready(
                    self.member_socket(target), self.config.ready_timeout):
                raise ActionError(self._not_ready(target))
            self._progress(f"{target.name}: started")
        return [t.name for t in targets]

    # -- the steps ----------------------------------------------------------------------------

    def _replace_member(self, process: ProcessInfo, reason: str) -> None:
        started = time.monotonic()
        self._wait_others_ready(process)
        old_pid = process.pid
        self._cycle(process, reason, wait_running=False)
        if not readiness.wait_ready(self.member_socket(process), self.config.ready_timeout):
            raise ActionError(self._not_ready(process))
        new_pid = self.client.info(process.name).pid
        self._progress(f"{process.name}: replaced (pid {old_pid or '-'} -> {new_pid}), "
                       f"serving again after {time.monotonic() - started:.1f}s")

    def _wait_others_ready(self, process: ProcessInfo) -> None:
        """Block until every other live member answers (at least one must), or fail."""
        deadline = time.monotonic() + self.config.ready_timeout
        while True:
            others = [m for m in self.client.group_members(process.group) if m.name != process.name]
            if not others:
                return  # a lone member: nobody else could serve anyway
            live = [m for m in others if m.state in ("RUNNING", "STARTING", "BACKOFF")]
            ready = [m for m in live if m.state == "RUNNING" and self.ready(m)]
            if ready and len(ready) == len(live):
                return
            if time.monotonic() >= deadline:
                if ready:
                    return  # some serve; the stragglers are not coming back by waiting
                raise ActionError(f"refusing to stop {process.name}: no other member of {process.group} "
                                  f"answers {readiness.HEALTH_PATH} (waited {self.config.ready_timeout:.0f}s)")
            time.sleep(0.1)

    def _cycle(self, process: ProcessInfo, reason: str, *, wait_running: bool) -> None:
        self._intent(process.name, reason)
        # A restart of the worker keeps the host's accounts: its stop must not hand them off.
        marked = (restart_mark.restarting(self.config.var_dir, self.client.info(process.name).pid)
                  if process.name == self.config.worker_program else contextlib.nullcontext())
        try:
            with marked:
                self.client.stop(process.name, wait=True)
        except Fault as fault:
            if fault.faultCode != Faults.NOT_RUNNING:
                raise ActionError(f"{process.name}: stop failed: {fault.faultString}") from None
        self._start(process, wait=wait_running)
        if wait_running:
            self._progress(f"{process.name}: restarted (pid {self.client.info(process.name).pid})")

    def _start(self, process: ProcessInfo, *, wait: bool) -> None:
        try:
            self.client.start(process.name, wait=wait)
        except Fault as fault:
            if fault.faultCode == Faults.ALREADY_STARTED:
                return
            raise ActionError(f"{process.name}: start failed: {fault.faultString}; "
                              f"see {process.stderr_logfile}") from None

    def _not_ready(self, process: ProcessInfo) -> str:
        return (f"{process.name} did not answer {readiness.HEALTH_PATH} within {self.config.ready_timeout:.0f}s "
                f"after its start; see {process.stderr_logfile}")
