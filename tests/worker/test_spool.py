"""The incoming-message spool: written through to disk, drained by its writer or by whoever outlives
it, each message handed over once, the rest kept when the outage comes back."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from telegram_platform.system.process_identity import ProcessId, parse, state_and_start, this_process
from telegram_platform.telegram.base import IncomingMessage
from telegram_platform.telegram.content import Entity
from telegram_platform.worker.spool import IncomingSpool, count_waiting, spool_directory


def _message(n: int, text: str = "hello") -> IncomingMessage:
    return IncomingMessage(7, 1000 + n, n, "@eve", f"{text} {n}", 1_760_000_000 + n)


class Recorder:
    """A hand-over that takes `accept` messages, then refuses (the outage again)."""

    def __init__(self, accept: int = 1 << 30) -> None:
        self.accept = accept
        self.taken: list[IncomingMessage] = []

    async def __call__(self, message: IncomingMessage) -> bool:
        if len(self.taken) >= self.accept:
            return False
        self.taken.append(message)
        await asyncio.sleep(0)
        return True


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return spool_directory(tmp_path / "var")


@pytest.fixture
def other_process() -> Iterator[subprocess.Popen[bytes]]:
    """Another process, alive until the test kills it."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child
    child.kill()
    child.wait()


def _files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _identity(child: subprocess.Popen[bytes]) -> ProcessId:
    ticks = None
    while ticks is None:
        ticks = state_and_start(child.pid)[1]
    return ProcessId(child.pid, ticks)


async def test_own_messages_are_written_through_privately_and_handed_over_in_order(directory: Path) -> None:
    """A spooled message survives in a 0600 file of a 0700 directory; the writer's drain hands
    them over in arrival order and leaves nothing behind."""
    spool = IncomingSpool(directory)
    for n in range(3):
        spool.append(_message(n, "привет +15551234567"))
    assert _files(directory) == [f"{this_process()}.jsonl"]
    assert _mode(directory / f"{this_process()}.jsonl") == 0o600 and _mode(directory) == 0o700
    assert spool.waiting() == 3
    recorder = Recorder()
    assert await spool.drain(recorder) == 3
    assert recorder.taken == [_message(n, "привет +15551234567") for n in range(3)]
    assert _files(directory) == [] and spool.waiting() == 0


async def test_a_drain_that_meets_the_outage_keeps_the_rest_for_the_next(directory: Path) -> None:
    """Handed over one, refused the second: two wait in the claimed file, and the next drain
    hands those two over, in order, once each."""
    spool = IncomingSpool(directory)
    for n in range(3):
        spool.append(_message(n))
    first = Recorder(accept=1)
    assert await spool.drain(first) == 1
    assert spool.waiting() == 2
    (claimed,) = _files(directory)
    assert claimed.startswith(f"{this_process()}.jsonl.{this_process()}.") and claimed.endswith(".claimed")
    spool.append(_message(3))  # arrives meanwhile: a new live file
    second = Recorder()
    assert await spool.drain(second) == 3
    assert [m.telegram_message_id for m in first.taken + second.taken] == [0, 1, 2, 3]
    assert _files(directory) == []


async def test_a_live_writers_file_is_left_to_it_and_taken_once_it_dies(
        directory: Path, other_process: subprocess.Popen[bytes]) -> None:
    """Another process's spool is not touched while it runs; once it is dead, the next drain of
    any process hands its messages over."""
    theirs = IncomingSpool(directory, owner=_identity(other_process))
    theirs.append(_message(1))
    mine = IncomingSpool(directory)
    recorder = Recorder()
    assert await mine.drain(recorder) == 0 and recorder.taken == []
    other_process.kill()
    other_process.wait()
    assert await mine.drain(recorder) == 1 and recorder.taken == [_message(1)]
    assert _files(directory) == []


async def test_a_dead_claimers_claim_is_taken_over(directory: Path, other_process: subprocess.Popen[bytes]) -> None:
    """A drainer that died holding a claim does not strand it: its claimed file is claimed again."""
    dead_writer = ProcessId(4_194_305, 1)  # above Linux's highest pid: never alive
    IncomingSpool(directory, owner=dead_writer).append(_message(5))
    live = directory / f"{dead_writer}.jsonl"
    claimer = _identity(other_process)
    live.rename(directory / f"{live.name}.{claimer}.1796000000000000000.claimed")
    mine = IncomingSpool(directory)
    recorder = Recorder()
    assert await mine.drain(recorder) == 0  # its claimer is alive
    other_process.kill()
    other_process.wait()
    assert await mine.drain(recorder) == 1 and recorder.taken == [_message(5)]


async def test_two_drainers_hand_each_message_over_once(directory: Path,
                                                        other_process: subprocess.Popen[bytes]) -> None:
    """Two live processes draining dead writers' files at the same moment: the rename lets one of
    them claim each file, so no message goes twice."""
    for writer in range(6):
        spool = IncomingSpool(directory, owner=ProcessId(4_194_305 + writer, 1))
        for n in range(20):
            spool.append(_message(writer * 100 + n))
    a, b = Recorder(), Recorder()
    handed = await asyncio.gather(IncomingSpool(directory).drain(a),
                                  IncomingSpool(directory, owner=_identity(other_process)).drain(b))
    ids = sorted(m.telegram_message_id for m in a.taken + b.taken)
    assert sum(handed) == 120 and ids == sorted(w * 100 + n for w in range(6) for n in range(20))


async def test_a_torn_last_line_is_skipped_and_the_rest_handed_over(directory: Path) -> None:
    """A write a crash cut short (never fsynced, never counted as stored) does not block the
    messages before it."""
    spool = IncomingSpool(directory)
    spool.append(_message(1))
    spool.append(_message(2))
    with (directory / f"{this_process()}.jsonl").open("ab") as file:
        file.write(b'[7, 1003, 3, "@eve", "cut sh')
    recorder = Recorder()
    assert await spool.drain(recorder) == 2
    assert [m.telegram_message_id for m in recorder.taken] == [1, 2]
    assert count_waiting(directory) == 0


def test_process_identities_round_trip_and_tell_the_dead() -> None:
    """`<pid>-<ticks>` parses back to itself; a pid with another start time is a dead process."""
    me = this_process()
    assert parse(str(me)) == me and not me.is_dead()
    assert ProcessId(me.pid, (me.start_ticks or 0) + 1).is_dead()
    assert parse("12-x") is None and parse("abc") is None


async def test_messages_spooled_while_a_drain_runs_are_not_lost(directory: Path) -> None:
    """Appends (in threads, as `accept` makes them) racing the process's own drains: every message
    is handed over exactly once, none lands in a file a drain has already read."""
    spool = IncomingSpool(directory)
    recorder = Recorder()
    count = 400

    async def appends() -> None:
        for n in range(0, count, 8):
            await asyncio.gather(*(asyncio.to_thread(spool.append, _message(n + i)) for i in range(8)))

    async def drains(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await spool.drain(recorder)

    stop = asyncio.Event()
    draining = asyncio.create_task(drains(stop))
    await appends()
    stop.set()
    await draining
    await spool.drain(recorder)
    ids = [m.telegram_message_id for m in recorder.taken]
    assert sorted(ids) == list(range(count)) and _files(directory) == []


async def test_entities_replies_and_forwards_survive_the_spool(directory: Path) -> None:
    """A message's entities, reply and forward origin are spooled and handed over whole; a line
    spooled before messages carried them (six fields) still reads as a plain text message."""
    spool = IncomingSpool(directory)
    whole = IncomingMessage(7, 99, 5, "@eve", "😀 hi", 1_760_000_000, entities=(Entity("bold", 3, 2),),
                            reply_to=4, forward_from={"type": "user", "id": 42})
    spool.append(whole)
    old_line = '[7, 99, 6, "@eve", "old", 1760000001]\n'
    with (directory / f"{spool.owner}.jsonl").open("a") as file:
        file.write(old_line)
    recorder = Recorder()
    assert await spool.drain(recorder) == 2
    assert recorder.taken == [whole, IncomingMessage(7, 99, 6, "@eve", "old", 1_760_000_001)]
