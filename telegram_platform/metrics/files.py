"""prometheus_client's multiprocess files: whose each one is, when it goes, and compaction.

In multiprocess mode every process writes its values to its own `<type>_<id>.db` files, and a
scrape sums every file in the directory. The library leaves two things to its user:

* **Files of dead processes.** A dead process's live gauges go (`mark_process_dead`), but its
  counters and histograms must stay, or totals would go backwards. So they pile up, two files per
  process ever started: worker children recycled after `TP_WORKER_MAX_JOBS` or at their memory
  ceiling, members restarted by the watchdog. Every scrape reads them all (client_python#204: scrapes
  timing out at 5,000 files). `compact` folds the dead processes' counter and histogram files into
  one archive file per type, which the library's collector sums like any other file.
* **The id in a file's name.** The library's default, the pid, can come back: a later process with
  a reused pid would reopen a dead process's files and carry on counting in them, and a compactor
  could fold and delete a file a live process has just reopened (the race that makes compaction
  "not safe" upstream). Here the id is `<pid>-<start time>` (clock ticks since boot, from
  /proc/<pid>/stat), which no later process has: a dead process's files are never written again, and
  "dead" is a fact (its pid gone, or now another process's), which also keeps a reused pid from
  holding a dead process's live gauges in place.

A compaction and the scrapes exclude each other with an flock on `.lock` in the directory (a scrape
holds it shared while it reads), and a compaction interrupted by a crash is finished by the next one
from its journal, so a total is never counted twice or missed. Linux only, like ops/.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict

from ..system.durable import fsync_path, replace_durably
from ..system.process_identity import ProcessId, ProcessIdentity

log = structlog.get_logger(__name__)

# A scrape compacts once this many dead processes' counter and histogram files have piled up.
COMPACT_AFTER = 16
ARCHIVE = "archive"  # the id part of an archive's name: `counter_archive.db`
# Types whose values add up across processes. Gauges here all use live modes, whose files go with
# their process (metrics/definitions.py).
SUMMED_TYPES = ("counter", "histogram")
LOCK_FILE = ".lock"
JOURNAL_FILE = "compaction.journal"
# `<type>[_<gauge mode>]_<pid>[-<start ticks>].db`; a name without ticks is the library's default.
_FILE_NAME = re.compile(r"^(?P<prefix>[a-z]+(?:_[a-z]+)?)_(?P<pid>\d+)(?:-(?P<ticks>\d+))?\.db$")


def name_files_by_process_identity() -> None:
    """Before this process's first metric (`create_metrics`): its files are named by pid and start
    time. The library reads `values.ValueClass` when each metric is built, and documents
    `process_identifier` as its hook for this; done once per process."""
    if not getattr(values.ValueClass, "tp_identity", False):
        value_class = values.MultiProcessValue(process_identifier=ProcessIdentity())  # type: ignore[no-untyped-call]
        value_class.tp_identity = True
        values.ValueClass = value_class


def _owner(path: Path) -> tuple[str, ProcessId] | None:
    """(`<type>` or `gauge_<mode>`, process id) from a metrics file's name; None for an archive."""
    match = _FILE_NAME.match(path.name)
    if match is None:
        return None
    ticks = match.group("ticks")
    return match.group("prefix"), ProcessId(int(match.group("pid")), int(ticks) if ticks else None)


def wipe(directory: Path) -> int:
    """Remove every metrics file: run ONCE before supervisord starts, never by a platform process.

    Returns how many files were removed. Only prometheus_client's `*.db` files and compaction's
    journal and staging files are touched."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    removed = 0
    for path in directory.glob("*.db"):
        path.unlink(missing_ok=True)
        removed += 1
    for path in [directory / JOURNAL_FILE, *directory.glob(".*.staging")]:
        path.unlink(missing_ok=True)
    return removed


def mark_process_dead(pid: int, directory: Path) -> None:
    """A process exited: drop its `live*` gauges (its counters and histograms stay in the totals).

    For the pool, when it reaps a child (a scrape sweeps the other exits: `sweep_dead_processes`)."""
    for path in directory.glob(f"gauge_live*_{pid}*.db"):
        owner = _owner(path)
        if owner is not None and owner[1].pid == pid:
            path.unlink(missing_ok=True)


def sweep_dead_processes(directory: Path) -> list[int]:
    """Drop the live gauges of every dead process whose files remain (SIGKILLed members, a killed
    pool's children): the scrape-time safety net behind the pool's `mark_process_dead` calls."""
    dead: set[int] = set()
    for path in directory.glob("gauge_live*.db"):
        owner = _owner(path)
        if owner is not None and owner[1].is_dead():
            path.unlink(missing_ok=True)
            dead.add(owner[1].pid)
    return sorted(dead)


def dead_summed_files(directory: Path) -> list[Path]:
    """The counter and histogram files of processes that are dead: what `compact` folds."""
    dead = []
    for typ in SUMMED_TYPES:
        for path in directory.glob(f"{typ}_*.db"):
            owner = _owner(path)
            if owner is not None and owner[0] == typ and owner[1].is_dead():
                dead.append(path)
    return sorted(dead)


@contextlib.contextmanager
def locked(directory: Path, *, exclusive: bool) -> Iterator[None]:
    """The directory's lock: shared for reading every file (a scrape), exclusive for `compact`."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass(frozen=True, slots=True)
class Journal:
    """One archive's replacement in progress: written before the new archive takes the old one's
    place, removed once the files folded into it are gone."""

    staging: str
    sources: tuple[str, ...]

    def write(self, directory: Path) -> None:
        replace_durably(directory / JOURNAL_FILE, json.dumps({"staging": self.staging,
                                                              "sources": list(self.sources)}).encode())

    @classmethod
    def read(cls, directory: Path) -> Journal | None:
        try:
            plan = json.loads((directory / JOURNAL_FILE).read_bytes())
        except FileNotFoundError:
            return None
        return cls(str(plan["staging"]), tuple(str(name) for name in plan["sources"]))


def finish_interrupted(directory: Path) -> None:
    """Complete or undo a compaction a crash interrupted (call with the lock held exclusively): if
    its new archive is still staged, the old archive and the sources are intact and the staging
    goes; if it took the old one's place, the sources it holds go."""
    journal = Journal.read(directory)
    if journal is None:
        return
    staging = directory / journal.staging
    if staging.exists():
        staging.unlink()
    else:
        for name in journal.sources:
            (directory / name).unlink(missing_ok=True)
    (directory / JOURNAL_FILE).unlink()
    fsync_path(directory)


def maintain(directory: Path) -> int:
    """Before a scrape reads the files: drop dead processes' live gauges, and compact once
    COMPACT_AFTER dead files have piled up (or a compaction was interrupted). Returns the files
    folded."""
    sweep_dead_processes(directory)
    if not (directory / JOURNAL_FILE).exists() and len(dead_summed_files(directory)) < COMPACT_AFTER:
        return 0
    with locked(directory, exclusive=True):  # another member may be compacting, or reading
        folded = compact(directory)
    if folded:
        log.info("metrics files compacted", folded=folded)
    return folded


def compact(directory: Path) -> int:
    """Fold the dead processes' counter and histogram files into `<type>_archive.db`, one per type;
    returns how many files were folded. Hold the lock exclusively (`locked`)."""
    finish_interrupted(directory)
    dead = dead_summed_files(directory)
    for typ in SUMMED_TYPES:
        sources = [path for path in dead if path.name.startswith(f"{typ}_")]
        if sources:
            _fold(directory, typ, sources)
    return len(dead)


def _fold(directory: Path, typ: str, sources: list[Path]) -> None:
    archive = directory / f"{typ}_{ARCHIVE}.db"
    totals: dict[str, float] = {}
    # Counters and histogram buckets are stored per process as plain sums (the collector accumulates
    # buckets when it reads), so folding is adding by key.
    for path in [archive, *sources] if archive.exists() else sources:
        for key, value, _timestamp, _position in MmapedDict.read_all_values_from_file(str(path)):  # type: ignore[no-untyped-call]
            totals[key] = totals.get(key, 0.0) + value
    staging = directory / f".{typ}_{ARCHIVE}.staging"  # not *.db: no scrape reads it
    staging.unlink(missing_ok=True)
    writer = MmapedDict(str(staging))  # type: ignore[no-untyped-call]
    try:
        for key, value in totals.items():
            writer.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
    finally:
        writer.close()  # type: ignore[no-untyped-call]
    fsync_path(staging)
    Journal(staging.name, tuple(path.name for path in sources)).write(directory)
    os.replace(staging, archive)
    for path in sources:
        path.unlink()
    (directory / JOURNAL_FILE).unlink()
    fsync_path(directory)
