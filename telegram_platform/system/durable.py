"""Files that must survive a crash of this process or of the machine: written, then fsynced, and the
directory that names them fsynced too (a new or renamed entry is only durable once it is)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data` all at once: a crash leaves the old file or the new one, never a mix."""
    staged = path.with_name(path.name + ".tmp")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(staged, path)
    fsync_path(path.parent)
