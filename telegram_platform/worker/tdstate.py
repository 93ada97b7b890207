"""Portable Telegram state: an account's login follows it to whichever host owns it next.

Each account's local state (the files its backend names in `state_files`: TDLib's binlog, which
holds the authorization key and the update state; the emulator backend's login file) is kept in
PostgreSQL as a sealed snapshot (telegram/snapshots.py, storage/snapshots.py). The owner takes one
when the account becomes READY, when its session closes, and every TDLIB_SNAPSHOT_SECONDS while it
is open (a snapshot whose files did not change is skipped without a round trip); it discards it when
the account logs out. The next owner restores it, under the account's lease, before it opens the
session, whenever its own copy is missing or older than what PostgreSQL holds.

What a crash loses is what changed since the last snapshot: the update state moved on, which the
next owner catches up on from Telegram (a re-sync of updates). The authorization key is in the
snapshot taken at READY and does not change while the session lives, so never a login.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from ..storage import snapshots as snapshot_store
from ..telegram import snapshots
from ..telegram.base import TelegramBackend, TransientError

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Restored:
    """What `restore` did: `action` is "kept" (the local copy is current), "restored", "discarded"
    (PostgreSQL holds a logout: the local copy is emptied) or "none" (nothing stored)."""

    action: str
    generation: int | None = None
    size_bytes: int = 0


class StateSnapshots:
    """Takes, restores and discards the snapshots of the accounts this process hosts."""

    def __init__(self, pool: asyncpg.Pool, encryption_key: bytes, backend: TelegramBackend) -> None:
        self._pool = pool
        self._key = encryption_key
        self._backend = backend
        # One snapshot operation per account at a time: a periodic round and a close must not race
        # for the same generation (PostgreSQL would refuse the second anyway).
        self._locks: dict[int, asyncio.Lock] = {}
        # The size of each account's latest snapshot, as this process last stored or restored it.
        self.sizes: dict[int, int] = {}
        self.counts: Counter[str] = Counter()
        self.last_taken_seconds = 0.0

    def _lock(self, account_id: int) -> asyncio.Lock:
        return self._locks.setdefault(account_id, asyncio.Lock())

    async def restore(self, account_id: int) -> Restored:
        """Bring the account's local copy up to PostgreSQL's snapshot, if it is behind (the caller
        holds the account's lease and has no session of it open). WrongDatabaseKey when the stored
        snapshot does not open with this ENCRYPTION_KEY."""
        directory = self._backend.database_dir(account_id)
        async with self._lock(account_id):
            stored = await snapshot_store.latest(self._pool, account_id)
            if stored is None:
                return Restored("none")
            mark = snapshots.read_mark(directory)
            if mark is not None and mark.generation >= stored.generation:
                if not stored.discarded:
                    self.sizes.setdefault(account_id, stored.size_bytes)
                return Restored("kept", mark.generation, self.sizes.get(account_id, 0))
            if stored.backend != self._backend.name:
                log.warning("state snapshot of another backend ignored", account_id=account_id,
                            stored_backend=stored.backend)
                return Restored("none")
            if stored.discarded:
                await asyncio.to_thread(snapshots.install, directory, {}, snapshots.Mark(stored.generation, None))
                self.sizes.pop(account_id, None)
                self.counts["discarded_locally"] += 1
                log.info("local state emptied: the account logged out elsewhere", account_id=account_id,
                         generation=stored.generation)
                return Restored("discarded", stored.generation)
            sealed = await snapshot_store.sealed_bytes(self._pool, account_id, stored.generation)
            if sealed is None:  # replaced or discarded since it was listed: the next open tries again
                raise _Moved(account_id)
            packed = snapshots.open_sealed(self._key, account_id, stored.generation, sealed)
            if snapshots.digest(packed) != stored.sha256:
                raise snapshots.BadSnapshot(f"account {account_id}: snapshot {stored.generation} does not "
                                            "match its sha256")
            files = snapshots.unpack(packed, self._backend.state_files)
            mark = snapshots.Mark(stored.generation, stored.sha256)
            await asyncio.to_thread(snapshots.install, directory, files, mark)
            self.sizes[account_id] = len(sealed)
            self.counts["restored"] += 1
            log.info("account state restored from its snapshot", account_id=account_id,
                     generation=stored.generation, size_bytes=len(sealed))
            return Restored("restored", stored.generation, len(sealed))

    async def take(self, account_id: int, owner_token: int) -> int | None:
        """Store the account's local state as its owner `owner_token`, unless unchanged since the
        snapshot it last matched. The generation stored, or None: unchanged, no state files yet, or
        refused (another host owns the account now)."""
        directory = self._backend.database_dir(account_id)
        async with self._lock(account_id):
            started = time.perf_counter()
            packed = await asyncio.to_thread(snapshots.pack, directory, self._backend.state_files)
            if packed is None:
                return None
            sha = snapshots.digest(packed)
            mark = snapshots.read_mark(directory)
            if mark is not None and mark.sha256 == sha:
                self.counts["unchanged"] += 1
                return None
            stored = await snapshot_store.latest(self._pool, account_id)
            generation = (stored.generation if stored is not None else 0) + 1
            sealed = snapshots.seal(self._key, account_id, generation, packed)
            if not await snapshot_store.put(self._pool, account_id, owner_token=owner_token, generation=generation,
                                            backend=self._backend.name, sealed=sealed, sha256=sha):
                self.counts["refused"] += 1
                log.warning("state snapshot refused: the account has a newer owner", account_id=account_id)
                return None
            await asyncio.to_thread(functools.partial(snapshots.write_mark, directory, snapshots.Mark(generation, sha),
                                                      durable=False))
            self.sizes[account_id] = len(sealed)
            self.counts["taken"] += 1
            self.last_taken_seconds = time.perf_counter() - started
            return generation

    async def discard(self, account_id: int, owner_token: int) -> int | None:
        """Forget the account's stored state as its owner (it logged out, or a login starts over
        from an empty database), so no host resumes it. The new generation, or None (nothing
        stored, or refused)."""
        directory = self._backend.database_dir(account_id)
        async with self._lock(account_id):
            generation = await snapshot_store.discard(self._pool, account_id, owner_token=owner_token)
            self.sizes.pop(account_id, None)
            if generation is not None:
                await asyncio.to_thread(snapshots.write_mark, directory, snapshots.Mark(generation, None))
                self.counts["discarded"] += 1
                log.info("state snapshot discarded", account_id=account_id, generation=generation)
            return generation

    def forget(self, account_id: int) -> None:
        """The account is no longer hosted here: its size leaves the stats."""
        self.sizes.pop(account_id, None)
        self._locks.pop(account_id, None)

    def stats(self, hosted: list[int]) -> dict[str, Any]:
        """For /api/tdlib/health: the snapshot sizes of the accounts hosted here, and the counts."""
        sizes = [self.sizes[a] for a in hosted if a in self.sizes]
        return {"bytes": sum(sizes), "max_bytes": max(sizes, default=0), "accounts": len(sizes),
                "last_take_seconds": round(self.last_taken_seconds, 6),
                **{f"{name}_total": self.counts.get(name, 0)
                   for name in ("taken", "unchanged", "refused", "restored", "discarded", "discarded_locally")}}


class _Moved(TransientError):
    def __init__(self, account_id: int) -> None:
        super().__init__(503, f"account {account_id}: its snapshot changed while it was being restored")
