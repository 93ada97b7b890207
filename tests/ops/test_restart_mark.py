"""The mark a restart of the worker leaves for it (ops/restart_mark.py): it names the pool being
restarted, only while the restart's stop runs, and only that pool reads itself restarting."""

from __future__ import annotations

from pathlib import Path

from telegram_platform.ops.restart_mark import is_restarting, mark_path, restarting


def test_the_mark_names_the_restarted_pool_only_while_its_stop_runs(tmp_path: Path) -> None:
    """Inside the block the pool with that pid is restarting and any other pool (a later one, or
    none known) is not; after it the mark is gone, and a later restart's mark is left in place."""
    assert not is_restarting(tmp_path, 4242)
    with restarting(tmp_path, 4242):
        assert is_restarting(tmp_path, 4242)
        assert not is_restarting(tmp_path, 4243) and not is_restarting(tmp_path, None)
    assert not mark_path(tmp_path).exists() and not is_restarting(tmp_path, 4242)
    first, second = restarting(tmp_path, 1), restarting(tmp_path, 2)  # two restarts overlapping
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert is_restarting(tmp_path, 2)  # the later restart's mark stays
    second.__exit__(None, None, None)
    assert list(mark_path(tmp_path).parent.iterdir()) == []  # gone, and no temporary file left behind
