"""An account's local state as a snapshot: the few files of its database directory a new owner needs
to resume it (the backend names them: `TelegramBackend.state_files`), packed, sealed and put back.

A snapshot is `pack`ed (each file's name and bytes, length-prefixed), hashed (sha256 of the packed
bytes), and `seal`ed with AES-GCM under a key derived per account from ENCRYPTION_KEY
(`keys.derive_snapshot_key`), the account id and the snapshot's generation bound in as associated
data: a snapshot opens for its own account and generation only, so one cannot be swapped for
another account's or replayed as a later generation. The files themselves are already encrypted by
their backend (TDLib's binlog with the database key); the seal also hides their names and sizes.

Beside the files, the directory keeps a mark (`MARK_NAME`): the generation and hash of the snapshot
it last matched, stored or restored. It tells a host whether its copy is behind what PostgreSQL
holds, and lets a snapshot whose files did not change be skipped without asking the database.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..system.durable import fsync_path, replace_durably
from .base import PermanentError, WrongDatabaseKey
from .keys import derive_snapshot_key

MAGIC: Final = b"TPS1"
MARK_NAME: Final = ".tp-snapshot"
_NONCE: Final = 12
_ENTRY: Final = struct.Struct(">HI")  # name length, data length
_MAX_NAME: Final = 255


class BadSnapshot(PermanentError):
    """Packed bytes that are not a snapshot (or name a file the backend does not keep)."""

    def __init__(self, message: str) -> None:
        super().__init__(500, message)


@dataclass(frozen=True, slots=True)
class Mark:
    """What the directory last matched: a snapshot's generation and the sha256 of its packed bytes."""

    generation: int
    sha256: bytes | None


def pack(directory: Path, names: Iterable[str]) -> bytes | None:
    """The named files of `directory` packed in one byte string (None: none of them exists)."""
    out = [MAGIC]
    found = False
    for name in sorted(set(names)):
        try:
            data = (directory / name).read_bytes()
        except FileNotFoundError:
            continue
        encoded = name.encode()
        out.append(_ENTRY.pack(len(encoded), len(data)))
        out.append(encoded)
        out.append(data)
        found = True
    return b"".join(out) if found else None


def unpack(packed: bytes, allowed: Iterable[str]) -> dict[str, bytes]:
    """The files a packed snapshot holds, by name; BadSnapshot unless every name is `allowed` (a
    plain file name the backend keeps: nothing is written outside the account's directory)."""
    allowed_names = set(allowed)
    if not packed.startswith(MAGIC):
        raise BadSnapshot("not a state snapshot")
    files: dict[str, bytes] = {}
    offset = len(MAGIC)
    while offset < len(packed):
        if offset + _ENTRY.size > len(packed):
            raise BadSnapshot("truncated entry")
        name_length, data_length = _ENTRY.unpack_from(packed, offset)
        offset += _ENTRY.size
        end = offset + name_length + data_length
        if name_length > _MAX_NAME or end > len(packed):
            raise BadSnapshot("truncated entry")
        name = packed[offset:offset + name_length].decode()
        if name not in allowed_names or "/" in name or name in (".", ".."):
            raise BadSnapshot(f"unexpected file {name!r}")
        files[name] = packed[offset + name_length:end]
        offset = end
    return files


def digest(packed: bytes) -> bytes:
    return hashlib.sha256(packed).digest()


def _aad(account_id: int, generation: int) -> bytes:
    return f"telegram-platform state snapshot|account {account_id}|generation {generation}".encode()


def seal(encryption_key: bytes, account_id: int, generation: int, packed: bytes) -> bytes:
    """`packed` encrypted for this account and generation: nonce || AES-GCM ciphertext and tag."""
    nonce = os.urandom(_NONCE)
    key = derive_snapshot_key(encryption_key, account_id)
    return nonce + AESGCM(key).encrypt(nonce, packed, _aad(account_id, generation))


def open_sealed(encryption_key: bytes, account_id: int, generation: int, sealed: bytes) -> bytes:
    """The packed bytes back; WrongDatabaseKey when they do not open (another ENCRYPTION_KEY, another
    account's or generation's snapshot, or damaged bytes)."""
    key = derive_snapshot_key(encryption_key, account_id)
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE], sealed[_NONCE:], _aad(account_id, generation))
    except (InvalidTag, ValueError):
        raise WrongDatabaseKey(f"account {account_id}: its stored state snapshot (generation {generation}) "
                               "does not open with the key derived from ENCRYPTION_KEY") from None


def read_mark(directory: Path) -> Mark | None:
    """The directory's mark (None: no mark, or one that does not parse, which counts as none)."""
    try:
        data = json.loads((directory / MARK_NAME).read_text())
        sha = data.get("sha256")
        return Mark(int(data["generation"]), bytes.fromhex(sha) if sha else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _mark_text(mark: Mark) -> str:
    return json.dumps({"generation": mark.generation, "sha256": mark.sha256.hex() if mark.sha256 else None})


def write_mark(directory: Path, mark: Mark, *, durable: bool = True) -> None:
    """Write the directory's mark. Beside files it did not write (a snapshot just taken of the
    backend's own), it need not be `durable`: a mark lost in a crash, or left unreadable, only
    makes the next owner here restore from PostgreSQL."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    body = _mark_text(mark)
    if durable:
        replace_durably(directory / MARK_NAME, body.encode())
        return
    staged = directory / f"{MARK_NAME}.tmp"
    staged.write_text(body)
    staged.replace(directory / MARK_NAME)


def _write_synced(path: Path, data: bytes) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def install(directory: Path, files: Mapping[str, bytes], mark: Mark) -> None:
    """Make `directory` hold exactly `files` and `mark` (an empty `files`: a discarded snapshot).

    Everything else the directory held goes: a backend's caches (TDLib's db.sqlite, files/) belong
    to the state they were built from, not to the one restored. Built beside it and renamed over it,
    so a crash leaves the old directory or the new one. The caller holds the account's lease, so no
    client of the account has the directory open."""
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staged = directory.with_name(f"{directory.name}.restoring")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(mode=0o700)
    for name, data in {**files, MARK_NAME: _mark_text(mark).encode()}.items():
        _write_synced(staged / name, data)
    fsync_path(staged)  # the entries, once for all: the directory is renamed into place only after
    old = directory.with_name(f"{directory.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        directory.rename(old)
    staged.rename(directory)
    fsync_path(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
