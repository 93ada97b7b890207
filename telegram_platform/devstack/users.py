"""The unprivileged user PostgreSQL runs as, and how a server process is started as it.

PostgreSQL refuses to run as root: when this process is root, every PostgreSQL process runs as an
unprivileged system user (`telegram-platform`, created on demand; `nobody` as a fall-back) that
owns the data directory.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypedDict

from .errors import DevStackError

SERVICE_USER = "telegram-platform"
FALLBACK_USER = "nobody"


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
        raise DevStackError(
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


def as_user(user: ServiceUser) -> _Credentials:
    """Popen keyword arguments that run the child as `user` (no change when it is ourselves)."""
    if user.is_current:
        return {"user": None, "group": None, "extra_groups": None}
    return {"user": user.uid, "group": user.gid, "extra_groups": []}


def child_env(user: ServiceUser) -> dict[str, str]:
    """A minimal environment: servers need none of ours (least of all the secrets)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    env["USER"] = env["LOGNAME"] = user.name
    env["HOME"] = "/"
    return env


_PR_SET_PDEATHSIG = 1


def pdeathsig(sig: int) -> Callable[[], None] | None:
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
