"""PostgreSQL and Redis server binaries: found on PATH or in Debian's places, installed with apt-get
when missing and this process is root."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DevStackError

DEBIAN_PACKAGES = {"postgres": "postgresql", "redis": "redis-server"}


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
        raise DevStackError(
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
        raise DevStackError(_missing_message(missing))
    install_debian_packages(missing)
    pg = find_postgres() if postgres else None
    rd = find_redis() if redis else None
    if (postgres and pg is None) or (redis and rd is None):
        raise DevStackError(_missing_message(missing))
    return pg, rd
