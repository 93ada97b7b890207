"""Per-account TDLib database keys and directories.

Each account's local TDLib database is encrypted with its own key, derived from the one ENCRYPTION_KEY
with HKDF-SHA256 (salt = the account id), so the derived keys are never stored and a key leaked for one
account says nothing about another's. Changing ENCRYPTION_KEY makes every database unreadable (TDLib
answers 401 "Wrong database encryption key"): the accounts must log in again, setting the databases
they cannot read aside (`set_aside`).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DATABASE_KEY_INFO = b"telegram-platform tdlib database v1"
# The key that seals an account's state snapshot in PostgreSQL (worker/tdstate.py): the same
# derivation with its own info, so a snapshot's key opens no database and a database's no snapshot.
SNAPSHOT_KEY_INFO = b"telegram-platform tdlib state snapshot v1"
DATABASE_KEY_LENGTH = 32
ENCRYPTION_KEY_LENGTH = 32
_MAX_ACCOUNT_ID = 2**63 - 1


def _check_account_id(account_id: int) -> None:
    # bool is an int: refuse it, a True/False here is always a bug.
    if isinstance(account_id, bool) or not isinstance(account_id, int):
        raise TypeError(f"account_id must be an int, not {type(account_id).__name__}")
    if not 0 < account_id <= _MAX_ACCOUNT_ID:
        raise ValueError(f"account_id must be between 1 and {_MAX_ACCOUNT_ID}")


def derive_database_key(encryption_key: bytes, account_id: int) -> bytes:
    """The 32-byte key of one account's TDLib database: HKDF-SHA256(ENCRYPTION_KEY, salt=account id).

    The salt is the account id as 8 big-endian bytes, so the derivation is stable across releases.
    """
    if len(encryption_key) != ENCRYPTION_KEY_LENGTH:
        raise ValueError(f"encryption_key must be {ENCRYPTION_KEY_LENGTH} bytes (got {len(encryption_key)})")
    _check_account_id(account_id)
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=DATABASE_KEY_LENGTH,
        salt=account_id.to_bytes(8, "big"),
        info=DATABASE_KEY_INFO,
    )
    return hkdf.derive(encryption_key)


def derive_snapshot_key(encryption_key: bytes, account_id: int) -> bytes:
    """The 32-byte key that seals one account's state snapshot: HKDF-SHA256(ENCRYPTION_KEY, salt =
    the account id), like the database key but with SNAPSHOT_KEY_INFO."""
    if len(encryption_key) != ENCRYPTION_KEY_LENGTH:
        raise ValueError(f"encryption_key must be {ENCRYPTION_KEY_LENGTH} bytes (got {len(encryption_key)})")
    _check_account_id(account_id)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=DATABASE_KEY_LENGTH, salt=account_id.to_bytes(8, "big"),
                info=SNAPSHOT_KEY_INFO)
    return hkdf.derive(encryption_key)


def account_database_dir(data_dir: Path, account_id: int) -> Path:
    """The one directory that holds an account's TDLib database; only one client may open it at a time."""
    _check_account_id(account_id)
    return data_dir / "accounts" / str(account_id)


SET_ASIDE_MARK = ".set-aside-"


def set_aside(directory: Path, now: dt.datetime | None = None) -> Path | None:
    """Rename an account's database directory to `<name>.set-aside-<UTC time>` beside it, so that a
    new login starts empty and the old database is kept, not deleted: an operator who finds the right
    key again can move it back. None when there is no directory. The caller holds the account's
    lease, so nothing else renames or opens it meanwhile."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    target = directory.with_name(f"{directory.name}{SET_ASIDE_MARK}{stamp}")
    copy = 1
    while target.exists():
        target = directory.with_name(f"{directory.name}{SET_ASIDE_MARK}{stamp}-{copy}")
        copy += 1
    try:
        directory.rename(target)
    except FileNotFoundError:
        return None
    return target


def set_aside_copies(directory: Path) -> list[Path]:
    """The databases `set_aside` kept for this directory's account."""
    return sorted(directory.parent.glob(f"{directory.name}{SET_ASIDE_MARK}*"))
