"""storage/outbox.py: what the claims return, so a send asks nothing more of PostgreSQL than it must."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg

from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import outbox as outbox_store
from telegram_platform.storage.files import FileStore


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_a_claim_says_whether_its_message_carries_files(db: asyncpg.Pool) -> None:
    """claim_for_send returns has_files: False for a text message (its send makes no files query),
    True for one with a file (whose send then reads its files); a second claim still gets nothing."""
    account_id = int((await account_store.create_account(db, "+9996640001", None))["id"])
    plain, _ = await outbox_store.create_message(db, account_id=account_id, peer="@a", text="hi",
                                                  idempotency_key=None, created_by=None)
    with_file, _ = await outbox_store.create_message(db, account_id=account_id, peer="@a", text="see",
                                                      idempotency_key=None, created_by=None)
    stored, _ = await FileStore(db).put(_one(b"x" * 100), file_name="a.txt", mime_type="text/plain",
                                        max_size=1 << 20, created_by=None)
    await db.execute("INSERT INTO message_files (message_id, position, file_id, kind) VALUES ($1, 0, $2, 'document')",
                     with_file["id"], stored["id"])
    claimed_plain = await outbox_store.claim_for_send(db, plain["id"], "w")
    claimed_file = await outbox_store.claim_for_send(db, with_file["id"], "w")
    assert claimed_plain is not None and claimed_plain["has_files"] is False
    assert claimed_file is not None and claimed_file["has_files"] is True
    assert await outbox_store.claim_for_send(db, plain["id"], "w") is None  # exactly once, as before
