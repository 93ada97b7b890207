"""Multiprocess metric files: named by process identity, and dead processes' files compacted
without losing or doubling a count, even across a crash mid-compaction."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import samples, total

from telegram_platform.metrics import definitions as metrics_mod
from telegram_platform.metrics import files as metric_files
from telegram_platform.metrics.exposition import render

_RECORDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from telegram_platform.metrics.definitions import create_metrics
    m = create_metrics(Path(sys.argv[1]))
    m.http_route("GET", "/api/health", [200, 200, 503], [10_000_000, 20_000_000, 3_000_000_000])
    m.job_finished("messages", "send_message", "ok", 0.2)
    m.http_in_flight.inc()
    print("recorded", flush=True)
    if sys.argv[2] == "stay":
        time.sleep(60)
""")


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    directory = tmp_path / "metrics"
    metric_files.wipe(directory)
    return directory


def _env(directory: Path) -> dict[str, str]:
    return {**os.environ, metrics_mod.MULTIPROC_ENV: str(directory)}


def _record_and_exit(directory: Path, processes: int = 1) -> list[int]:
    """`processes` recorders, run one after the other to their end; their pids."""
    pids = []
    for _ in range(processes):
        process = subprocess.Popen([sys.executable, "-c", _RECORDER, str(directory), "exit"], env=_env(directory),
                                   stdout=subprocess.DEVNULL)
        assert process.wait(timeout=60) == 0
        pids.append(process.pid)
    return pids


@pytest.fixture
def live_recorder(directory: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A recorder that stays alive while the test runs."""
    process = subprocess.Popen([sys.executable, "-c", _RECORDER, str(directory), "stay"], env=_env(directory),
                               stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == b"recorded"
        yield process
    finally:
        process.kill()
        process.wait()


def _scrape(directory: Path) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample a scrape shows, but the file count (which compaction changes by design)."""
    body, _ = render(metrics_mod.Metrics(None, directory), [], "", host="test")
    return {key: value for key, value in samples(body.decode()).items() if key[0] != "tp_metrics_files"}


def test_files_are_named_by_pid_and_start_time(directory: Path) -> None:
    """A process's files carry its pid and start time, so a later process with the same pid is
    another process: its files are its own, and the dead one counts as dead."""
    [pid] = _record_and_exit(directory)
    names = sorted(path.name for path in directory.glob("*.db"))
    ticks = {name.rsplit("-", 1)[1].removesuffix(".db") for name in names}
    assert [name.split(f"_{pid}-")[0] for name in names] == ["counter", "gauge_livesum", "histogram"], names
    assert len(ticks) == 1 and ticks.pop().isdigit()
    assert metric_files.sweep_dead_processes(directory) == [pid]  # its live gauge goes, the rest stays
    assert len(list(directory.glob("*.db"))) == 2 and not list(directory.glob("gauge_*"))
    me = metric_files.ProcessIdentity()()
    my_pid, my_ticks = (int(part) for part in me.split("-"))
    assert my_pid == os.getpid()
    assert not metric_files.ProcessId(my_pid, my_ticks).is_dead()
    assert metric_files.ProcessId(my_pid, my_ticks + 1).is_dead()  # the same pid, another process
    assert metric_files.ProcessId(pid, None).is_dead()


def test_compaction_keeps_every_total_and_leaves_live_processes_files(
        directory: Path, live_recorder: subprocess.Popen[bytes]) -> None:
    """Dead processes' counters and histograms fold into one archive per type; the scrape shows
    exactly what it showed before, and a later fold adds to the archive."""
    _record_and_exit(directory, 3)
    before = _scrape(directory)
    assert total(before, "tp_http_requests_total", route="/api/health", status="200") == 8
    assert total(before, "tp_http_request_duration_seconds_bucket", route="/api/health", le="2.5") == 8
    with metric_files.locked(directory, exclusive=True):
        assert metric_files.compact(directory) == 6
    live = next(directory.glob(f"counter_{live_recorder.pid}-*.db")).name.removeprefix("counter_")
    assert {path.name for path in directory.glob("*.db")} == {
        "counter_archive.db", f"counter_{live}", f"gauge_livesum_{live}", "histogram_archive.db", f"histogram_{live}"}
    assert _scrape(directory) == before
    _record_and_exit(directory)
    with metric_files.locked(directory, exclusive=True):
        assert metric_files.compact(directory) == 2
    after = _scrape(directory)
    assert total(after, "tp_http_requests_total", route="/api/health", status="503") == 5
    assert total(after, "tp_jobs_processed_total", queue="messages") == 5
    assert total(after, "tp_http_request_duration_seconds_count", route="/api/health") == 15


def test_a_scrape_compacts_once_enough_dead_files_pile_up(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below COMPACT_AFTER dead files a scrape only reads; at it, the scrape folds them first."""
    monkeypatch.setattr(metric_files, "COMPACT_AFTER", 4)
    _record_and_exit(directory)
    first = _scrape(directory)
    assert not list(directory.glob("*_archive.db")) and len(list(directory.glob("*.db"))) == 2
    _record_and_exit(directory)
    second = _scrape(directory)
    assert sorted(path.name for path in directory.glob("*.db")) == ["counter_archive.db", "histogram_archive.db"]
    assert total(second, "tp_jobs_processed_total") == 2 * total(first, "tp_jobs_processed_total") == 2


@pytest.mark.parametrize("crash", ["before the archive was replaced", "after the archive was replaced"])
def test_an_interrupted_compaction_neither_loses_nor_doubles_a_count(directory: Path, crash: str) -> None:
    """A compaction killed between its steps is undone or finished by the next scrape, from its
    journal: the totals are those of before, never the sources counted beside the archive too."""
    _record_and_exit(directory, 2)
    before = _scrape(directory)
    sources = sorted(path.name for path in directory.glob("counter_*.db"))
    saved = directory.parent / "saved"
    saved.mkdir()
    for name in sources:
        shutil.copy(directory / name, saved / name)
    with metric_files.locked(directory, exclusive=True):
        metric_files.compact(directory)
    staging = ".counter_archive.staging"
    if crash == "before the archive was replaced":
        # The new archive written but not yet in place; the old archive (none) and sources intact.
        (directory / "counter_archive.db").rename(directory / staging)
    for name in sources:  # the sources not yet unlinked
        shutil.copy(saved / name, directory / name)
    metric_files.Journal(staging, tuple(sources)).write(directory)

    assert _scrape(directory) == before
    assert not (directory / staging).exists() and not (directory / metric_files.JOURNAL_FILE).exists()
    assert sorted(path.name for path in directory.glob("counter_*.db")) == ["counter_archive.db"]


def test_mark_process_dead_drops_only_that_processes_live_gauges(
        directory: Path, live_recorder: subprocess.Popen[bytes]) -> None:
    """The pool's call for a reaped child removes that child's live gauge file, by pid, whatever its
    start time; another process's stays."""
    [gauge] = directory.glob(f"gauge_livesum_{live_recorder.pid}-*.db")
    other = directory / f"gauge_livesum_{live_recorder.pid}1-1.db"  # a pid that only starts alike
    shutil.copy(gauge, other)
    metric_files.mark_process_dead(live_recorder.pid, directory)
    assert not gauge.exists() and other.exists()
