"""Per-account TDLib database keys and directories.

Each account's local TDLib database is encrypted with its own key, derived from the one ENCRYPTION_KEY
with HKDF-SHA256 (salt = the account id), so the derived keys are never stored and a key leaked for one
account says nothing about another's. Changing ENCRYPTION_KEY makes every database unreadable (TDLib
answers 401 "Wrong database encryption key"): the accounts must log in again.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DATABASE_KEY_INFO = b"telegram-platform tdlib database v1"
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


def account_database_dir(data_dir: Path, account_id: int) -> Path:
    """The one directory that holds an account's TDLib database; only one client may open it at a time."""
    _check_account_id(account_id)
    return data_dir / "accounts" / str(account_id)
