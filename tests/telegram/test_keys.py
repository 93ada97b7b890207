from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from pathlib import Path

import pytest

from telegram_platform.telegram.keys import (
    DATABASE_KEY_INFO,
    SNAPSHOT_KEY_INFO,
    account_database_dir,
    derive_database_key,
    derive_snapshot_key,
    set_aside,
    set_aside_copies,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def _rfc5869(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 written out from RFC 5869, to check the derivation independently of `cryptography`."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def test_key_is_hkdf_sha256_of_the_encryption_key_salted_with_the_account_id() -> None:
    """The derived key is exactly HKDF-SHA256(ENCRYPTION_KEY, salt=8-byte account id, info=v1 label)."""
    expected = _rfc5869(KEY_A, (42).to_bytes(8, "big"), b"telegram-platform tdlib database v1", 32)
    assert DATABASE_KEY_INFO == b"telegram-platform tdlib database v1"
    assert derive_database_key(KEY_A, 42) == expected
    assert len(expected) == 32


def test_the_snapshot_key_is_the_same_derivation_with_its_own_info() -> None:
    """A state snapshot's key is HKDF-SHA256 with its own info label: it differs from the account's
    database key, and from other accounts' snapshot keys."""
    expected = _rfc5869(KEY_A, (42).to_bytes(8, "big"), b"telegram-platform tdlib state snapshot v1", 32)
    assert SNAPSHOT_KEY_INFO == b"telegram-platform tdlib state snapshot v1"
    assert derive_snapshot_key(KEY_A, 42) == expected
    assert derive_snapshot_key(KEY_A, 42) != derive_database_key(KEY_A, 42)
    assert derive_snapshot_key(KEY_A, 43) != expected


def test_keys_differ_per_account_and_per_encryption_key_and_are_stable() -> None:
    """Each account gets its own key, a new ENCRYPTION_KEY changes it, and the same inputs repeat it."""
    assert derive_database_key(KEY_A, 1) == derive_database_key(KEY_A, 1)
    assert derive_database_key(KEY_A, 1) != derive_database_key(KEY_A, 2)
    assert derive_database_key(KEY_A, 1) != derive_database_key(KEY_B, 1)


@pytest.mark.parametrize("key", [b"", bytes(16), bytes(33)])
def test_an_encryption_key_of_the_wrong_size_is_refused(key: bytes) -> None:
    """Only a 32-byte ENCRYPTION_KEY is accepted, so a truncated key cannot weaken every database."""
    with pytest.raises(ValueError, match="32 bytes"):
        derive_database_key(key, 1)


@pytest.mark.parametrize("account_id", [0, -1, 2**63])
def test_out_of_range_account_ids_are_refused(account_id: int) -> None:
    """Ids outside 1..2**63-1 cannot name a key or a directory."""
    with pytest.raises(ValueError):
        derive_database_key(KEY_A, account_id)
    with pytest.raises(ValueError):
        account_database_dir(Path("/data"), account_id)


def test_a_bool_is_not_an_account_id() -> None:
    """True/False passed as an account id is a bug, refused instead of silently meaning account 1/0."""
    with pytest.raises(TypeError):
        derive_database_key(KEY_A, True)


def test_each_account_has_its_own_database_directory(tmp_path: Path) -> None:
    """The directory is <data_dir>/accounts/<id>: one per account, never shared."""
    assert account_database_dir(tmp_path, 7) == tmp_path / "accounts" / "7"
    assert account_database_dir(tmp_path, 7) != account_database_dir(tmp_path, 8)


def test_set_aside_renames_the_directory_beside_itself_and_keeps_it_whole(tmp_path: Path) -> None:
    """A database set aside is renamed to <id>.set-aside-<UTC time>, contents intact; a second one in
    the same second gets its own name; a missing directory is None."""
    database = account_database_dir(tmp_path, 7)
    database.mkdir(parents=True)
    (database / "td.binlog").write_bytes(b"old login")
    now = dt.datetime(2026, 11, 30, 12, 0, 5, tzinfo=dt.UTC)
    kept = set_aside(database, now)
    assert kept == tmp_path / "accounts" / "7.set-aside-20261130T120005Z"
    assert (kept / "td.binlog").read_bytes() == b"old login" and not database.exists()
    assert set_aside(database, now) is None

    database.mkdir()
    (database / "td.binlog").write_bytes(b"second login")
    again = set_aside(database, now)
    assert again == tmp_path / "accounts" / "7.set-aside-20261130T120005Z-1"
    other = account_database_dir(tmp_path, 70)
    other.mkdir()
    assert set_aside(other, now) is not None
    assert set_aside_copies(database) == [kept, again]  # account 70's copy is not account 7's
