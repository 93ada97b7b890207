"""An account's state as a snapshot (telegram/snapshots.py): packed, sealed, marked and put back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from telegram_platform.telegram.base import WrongDatabaseKey
from telegram_platform.telegram.snapshots import (
    MARK_NAME,
    BadSnapshot,
    Mark,
    digest,
    install,
    open_sealed,
    pack,
    read_mark,
    seal,
    unpack,
    write_mark,
)

KEY = bytes(range(32))
NAMES = ("td.binlog", "td_test.binlog")


def test_only_the_named_files_are_packed_and_they_come_back_whole(tmp_path: Path) -> None:
    """pack takes the named files that exist (not the caches beside them); unpack gives them back."""
    binlog = os.urandom(10_000)
    (tmp_path / "td.binlog").write_bytes(binlog)
    (tmp_path / "db.sqlite").write_bytes(b"a cache")
    packed = pack(tmp_path, NAMES)
    assert packed is not None
    assert unpack(packed, NAMES) == {"td.binlog": binlog}
    assert pack(tmp_path, ("session.bin",)) is None


@pytest.mark.parametrize("name", ["../escape", "db.sqlite", ".", "a/b"])
def test_a_snapshot_naming_a_file_the_backend_does_not_keep_is_refused(tmp_path: Path, name: str) -> None:
    """Unpacking never writes outside the backend's state files: any other name is a BadSnapshot."""
    (tmp_path / "x").write_bytes(b"data")
    packed = pack(tmp_path, ["x"])
    assert packed is not None
    forged = packed.replace(b"\x00\x01x", len(name).to_bytes(2, "big") + name.encode())
    with pytest.raises(BadSnapshot):
        unpack(forged, NAMES)


def test_bytes_that_are_not_a_whole_snapshot_are_refused(tmp_path: Path) -> None:
    """Another format or a truncated snapshot is a BadSnapshot, not a partial restore."""
    (tmp_path / "td.binlog").write_bytes(b"0123456789")
    packed = pack(tmp_path, NAMES)
    assert packed is not None
    for damaged in (b"TAR?" + packed[4:], packed[:-3], packed[:7]):
        with pytest.raises(BadSnapshot):
            unpack(damaged, NAMES)


def test_a_sealed_snapshot_opens_for_its_own_account_generation_and_key_only() -> None:
    """The seal binds the account and the generation: another of either, another ENCRYPTION_KEY or
    one changed byte is WrongDatabaseKey."""
    packed = b"TPS1 some state"
    sealed = seal(KEY, 7, 3, packed)
    assert open_sealed(KEY, 7, 3, sealed) == packed
    assert packed not in sealed
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for account_id, generation, key, blob in ((8, 3, KEY, sealed), (7, 4, KEY, sealed),
                                              (7, 3, bytes(32), sealed), (7, 3, KEY, flipped)):
        with pytest.raises(WrongDatabaseKey):
            open_sealed(key, account_id, generation, blob)


def test_install_leaves_exactly_the_snapshot_and_its_mark(tmp_path: Path) -> None:
    """Restoring replaces the whole directory: the caches of the old state go, the files and the
    mark (generation, sha256) are what the snapshot says; an empty snapshot leaves only the mark."""
    directory = tmp_path / "accounts" / "1"
    (directory / "files").mkdir(parents=True)
    (directory / "db.sqlite").write_bytes(b"old cache")
    (directory / "td.binlog").write_bytes(b"old binlog")
    mark = Mark(5, digest(b"packed"))
    install(directory, {"td.binlog": b"new binlog"}, mark)
    assert sorted(p.name for p in directory.iterdir()) == [MARK_NAME, "td.binlog"]
    assert (directory / "td.binlog").read_bytes() == b"new binlog"
    assert read_mark(directory) == mark
    assert sorted(p.name for p in directory.parent.iterdir()) == ["1"]  # nothing staged is left
    install(directory, {}, Mark(6, None))
    assert sorted(p.name for p in directory.iterdir()) == [MARK_NAME]
    assert read_mark(directory) == Mark(6, None)


def test_a_missing_or_unreadable_mark_counts_as_none(tmp_path: Path) -> None:
    """No mark, or one that does not parse, means the copy's generation is unknown (None)."""
    assert read_mark(tmp_path) is None
    (tmp_path / MARK_NAME).write_text("{not json")
    assert read_mark(tmp_path) is None
    write_mark(tmp_path / "new", Mark(2, None))
    assert read_mark(tmp_path / "new") == Mark(2, None)
