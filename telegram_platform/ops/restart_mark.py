"""The mark a restart of the worker leaves for it, so that its stop keeps the host's accounts.

supervisord restarts a program by stopping it (SIGTERM) and starting it again: the worker cannot
tell that stop from one meant to take the host out, which hands its accounts off to the other hosts
(worker/account_sessions.py `hand_off`). So every restart the platform makes (`tp restart`, the
memory watchdog, `tp reload --worker` and `systemctl reload`, the API's restart: ops/actions.py
`Operator`) first writes the pid of the worker it is about to stop into `var/run/tp-worker.restart`,
and removes it once the stop is over. A worker child whose pool has that pid keeps its accounts; a
stop without the mark (`supervisorctl stop`, `systemctl stop`), or of another pool, hands them off.
A leaf of `ops/`: the worker reads it without importing the rest.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def mark_path(var_dir: Path) -> Path:
    return var_dir / "run" / "tp-worker.restart"


@contextlib.contextmanager
def restarting(var_dir: Path, pid: int) -> Iterator[None]:
    """While the block stops the worker whose pool is `pid`: that stop is a restart."""
    path = mark_path(var_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}")
    temporary.write_text(f"{pid}\n")
    temporary.replace(path)  # whole, never half-written
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if is_restarting(var_dir, pid):  # another restart's mark (a later pid) is not ours to remove
                path.unlink()


def is_restarting(var_dir: Path, pool_pid: int | None) -> bool:
    """Whether the worker whose pool is `pool_pid` is being restarted (not stopped)."""
    if pool_pid is None:
        return False
    try:
        return mark_path(var_dir).read_text().strip() == str(pool_pid)
    except (OSError, ValueError):
        return False
