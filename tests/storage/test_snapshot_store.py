"""Accounts' state snapshots in PostgreSQL (storage/snapshots.py): only the current owner writes."""

from __future__ import annotations

import asyncio
import hashlib

import asyncpg

from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import snapshots as snapshot_store


async def _put(db: asyncpg.Pool, account_id: int, token: int, generation: int, data: bytes) -> bool:
    return await snapshot_store.put(db, account_id, owner_token=token, generation=generation, backend="emulator",
                                    sealed=data, sha256=hashlib.sha256(data).digest())


async def test_generations_follow_one_another_and_each_is_taken_once(db: asyncpg.Pool) -> None:
    """The first snapshot is generation 1, each next one the stored one plus 1; a second write of
    the same generation is refused and leaves the first."""
    account = await account_store.create_account(db, "+9996660001", None)
    token = await account_store.take_ownership(db, account["id"], "host-a")
    assert await _put(db, account["id"], token, 1, b"one")
    assert not await _put(db, account["id"], token, 1, b"one again")
    assert not await _put(db, account["id"], token, 3, b"skips two")
    assert await _put(db, account["id"], token, 2, b"two")
    stored = await snapshot_store.latest(db, account["id"])
    assert stored is not None
    assert (stored.generation, stored.size_bytes, stored.sha256) == (2, 3, hashlib.sha256(b"two").digest())
    assert await snapshot_store.sealed_bytes(db, account["id"], 2) == b"two"
    assert await snapshot_store.sealed_bytes(db, account["id"], 1) is None


async def test_a_stale_owners_snapshot_is_refused(db: asyncpg.Pool) -> None:
    """Once another host took the account's ownership, a write carrying the old token changes nothing."""
    account = await account_store.create_account(db, "+9996660002", None)
    old = await account_store.take_ownership(db, account["id"], "host-a")
    assert await _put(db, account["id"], old, 1, b"old owner")
    new = await account_store.take_ownership(db, account["id"], "host-a")
    assert not await _put(db, account["id"], old, 2, b"late write")
    assert await snapshot_store.discard(db, account["id"], owner_token=old) is None
    assert await snapshot_store.sealed_bytes(db, account["id"], 1) == b"old owner"
    assert await _put(db, account["id"], new, 2, b"new owner")


async def test_a_takeover_in_flight_waits_for_the_snapshot_or_refuses_it(db: asyncpg.Pool) -> None:
    """A new owner's take_ownership not yet committed: the old owner's write waits on the row lock,
    then finds its token outdated and is refused (no snapshot slips in after the new owner read)."""
    account = await account_store.create_account(db, "+9996660003", None)
    old = await account_store.take_ownership(db, account["id"], "host-a")
    async with db.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await account_store.take_ownership(conn, account["id"], "host-b")
        write = asyncio.create_task(_put(db, account["id"], old, 1, b"racing"))
        await asyncio.sleep(0.3)
        assert not write.done()  # held by the new owner's row lock
        await transaction.commit()
    assert await write is False
    assert await snapshot_store.latest(db, account["id"]) is None


async def test_discarding_keeps_the_generation_growing_and_forgets_the_bytes(db: asyncpg.Pool) -> None:
    """A logout's discard drops the bytes and bumps the generation (an older copy stays older);
    discarding nothing is None; removing the account removes the row."""
    account = await account_store.create_account(db, "+9996660004", None)
    token = await account_store.take_ownership(db, account["id"], "host-a")
    assert await snapshot_store.discard(db, account["id"], owner_token=token) is None
    assert await _put(db, account["id"], token, 1, b"login")
    assert await snapshot_store.discard(db, account["id"], owner_token=token) == 2
    assert await snapshot_store.discard(db, account["id"], owner_token=token) is None
    stored = await snapshot_store.latest(db, account["id"])
    assert stored is not None and stored.discarded and (stored.generation, stored.size_bytes) == (2, 0)
    assert await _put(db, account["id"], token, 3, b"a new login")
    await account_store.delete_account(db, account["id"])
    assert await snapshot_store.latest(db, account["id"]) is None
