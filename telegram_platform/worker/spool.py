"""The last resort for an incoming message: a file on this machine's disk, while Redis and
PostgreSQL are both out of reach.

Telegram delivers an update once. The `updates` queue takes it (worker/updates.py), or with Redis
away PostgreSQL does; with both away there is nowhere else to put it, and TDLib will not deliver it
again. So it is appended here, one JSON line, written through to the disk (fsync) before the update
counts as handled, and handed to the queue again once a backing service answers.

Files live in `<TP_VAR_DIR>/spool/incoming/`, mode 0600 (they hold message texts), one per writing
process, named by its process identity (`<pid>-<start ticks>.jsonl`, ops/process_identity.py). A
process drains its own file, and the file of any writer that is dead (a child killed mid-outage and
restarted under a new pid): it first renames the file to `<file>.<its identity>.<ns>.claimed`,
which only one process can do, so two drainers never hand a message over twice. A claim whose claimer
died is taken over the same way. A drain that meets the outage again keeps what it has not handed
over in the claimed file, for the next drain; a line torn by a crash mid-write (never fsynced, so
never counted as stored) is skipped with a warning.

Order: while a process has messages in the spool, it spools the next ones too, behind them, instead
of trying Redis and PostgreSQL again for each (which, were they unreachable by timeout rather than
refusal, would also hold every update up by that timeout); its drain hands them over in arrival
order. A dead process's spool is taken over by the first drain of a live one (at its start, then
every 5 s), and its messages may land after ones the live process received meanwhile;
`GET /api/incoming` numbers rows in the order they were stored, and `date` keeps Telegram's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from ..system.durable import fsync_path, replace_durably
from ..system.process_identity import ProcessId, parse, this_process
from ..telegram.base import IncomingMessage

log = structlog.get_logger(__name__)

LIVE_SUFFIX = ".jsonl"
CLAIMED_SUFFIX = ".claimed"

# Hands one message over; False when neither Redis nor PostgreSQL took it (stop, keep the rest).
HandOver = Callable[[IncomingMessage], Awaitable[bool]]


def spool_directory(var_dir: Path) -> Path:
    return var_dir / "spool" / "incoming"


class IncomingSpool:
    """One per worker child; `owner` is this process (tests give another)."""

    def __init__(self, directory: Path, owner: ProcessId | None = None) -> None:
        self.directory = directory
        self.owner = owner or this_process()
        self._live = directory / f"{self.owner}{LIVE_SUFFIX}"
        # Messages of this process wait here: the next ones queue up behind them (`IncomingUpdates`).
        self.backlog = False
        # Appends and claims run in threads (to_thread): an append that opened the live file just
        # before a claim renamed it would write into a file the drain may already have read.
        self._lock = threading.Lock()

    def append(self, message: IncomingMessage) -> None:
        """Write the message through to the disk; returns once a crash can no longer lose it."""
        line = json.dumps([message.account_id, message.chat_id, message.telegram_message_id, message.sender,
                           message.text, message.date, message.extra_json()], ensure_ascii=False) + "\n"
        with self._lock:
            created = not self._live.exists()
            if created:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self._live, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_path(self.directory)  # the new file's name survives a crash too
            self.backlog = True

    def waiting(self) -> int:
        """Messages spooled and not handed over yet, in every file here."""
        return count_waiting(self.directory)

    async def drain(self, hand_over: HandOver) -> int:
        """Hand over what this process and dead ones spooled; the number handed over."""
        handed = 0
        complete = True
        for claimed in await asyncio.to_thread(self._claim):
            done, complete = await _drain_file(claimed, hand_over)
            handed += done
            if not complete:
                break  # the outage is back: the rest waits for the next drain
        # Appended while draining: a file the next drain takes.
        self.backlog = not complete or await asyncio.to_thread(self._live.exists)
        if handed:
            log.info("spooled incoming messages handed over", messages=handed)
        return handed

    def _claim(self) -> list[Path]:
        """This process's claims, oldest first: the claims it already holds (a drain cut short), then
        its own live file and the files of dead writers and of dead claimers."""
        with self._lock:
            return self._claim_locked()

    def _claim_locked(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        held: list[tuple[int, Path]] = []
        taken: list[Path] = []
        me = str(self.owner)
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if name.endswith(CLAIMED_SUFFIX):
                # <source>.<claimer>.<claimed at, ns>.claimed
                rest, _, stamp = name[: -len(CLAIMED_SUFFIX)].rpartition(".")
                source, _, claimer = rest.rpartition(".")
                if claimer == me:
                    held.append((int(stamp) if stamp.isdigit() else 0, path))
                    continue
                holder = parse(claimer)
                if holder is None or not holder.is_dead():
                    continue
            elif name.endswith(LIVE_SUFFIX):
                source = name
                writer = parse(name[: -len(LIVE_SUFFIX)])
                if writer is None or (writer != self.owner and not writer.is_dead()):
                    continue
            else:
                continue
            # A name of its own (the claim time), so a claim never replaces another.
            target = self.directory / f"{source}.{me}.{time.time_ns()}{CLAIMED_SUFFIX}"
            try:
                os.rename(path, target)  # atomic: of two claimers, one finds the file gone
            except FileNotFoundError:
                continue
            taken.append(target)
        if taken:
            fsync_path(self.directory)
        return [path for _, path in sorted(held)] + taken


def count_waiting(directory: Path) -> int:
    """Lines in the spool files of `directory` (none when it does not exist): what a scrape shows."""
    try:
        paths = [p for p in directory.iterdir() if p.name.endswith((LIVE_SUFFIX, CLAIMED_SUFFIX))]
    except FileNotFoundError:
        return 0
    total = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # claimed or drained meanwhile
            total += path.read_bytes().count(b"\n")
    return total


async def _drain_file(path: Path, hand_over: HandOver) -> tuple[int, bool]:
    """(handed over, whether the file is done): a done file is deleted, another keeps the rest."""
    # File work off the event loop (a Telegram client's receive loop shares it); the files are small.
    lines = (await asyncio.to_thread(path.read_bytes)).splitlines(keepends=True)
    handed = 0
    for index, line in enumerate(lines):
        message = _parse_line(line)
        if message is None:
            log.warning("torn line in the incoming spool skipped", file=path.name, line=index + 1)
            continue
        if not await hand_over(message):
            await asyncio.to_thread(replace_durably, path, b"".join(lines[index:]))
            return handed, False
        handed += 1
    await asyncio.to_thread(path.unlink)
    return handed, True


def _parse_line(line: bytes) -> IncomingMessage | None:
    if not line.endswith(b"\n"):
        return None  # the write a crash cut short
    try:
        # Six fields in a line spooled before messages carried entities, replies and forwards.
        account_id, chat_id, message_id, sender, text, date, *extra = json.loads(line)
        message = IncomingMessage(int(account_id), int(chat_id), int(message_id), str(sender), str(text), int(date))
        return message.with_extra(extra[0] if extra else None)
    except (ValueError, TypeError, KeyError):
        return None
