"""GET /api/incoming: newest first with a cursor, forward from an id for catching up, filters."""

from __future__ import annotations

import asyncpg
from support import ApiClient

from telegram_platform.storage import incoming as incoming_store
from telegram_platform.telegram.base import IncomingMessage

GROUP = -1001234567890


async def _received(db: asyncpg.Pool) -> tuple[int, int, list[int]]:
    """Two accounts; five messages to the first (two in a group chat), one to the second. Returns the
    account ids and the first account's message ids in arrival order."""
    first, second = [int(await db.fetchval("INSERT INTO accounts (phone) VALUES ($1) RETURNING id", phone))
                     for phone in ("+9996681234", "+9996691234")]
    ids = []
    for n, chat in enumerate((42, GROUP, 42, GROUP, 42), start=1):
        message = IncomingMessage(first, chat, n << 20, "@eve", f"text {n}", 1_700_000_000 + n)
        row = await incoming_store.store(db, message)
        assert row is not None
        ids.append(row["id"])
    await incoming_store.store(db, IncomingMessage(second, 42, 1, "@bob", "elsewhere", 1_700_000_000))
    return first, second, ids


async def test_pages_newest_first_and_forward_from_an_id(api: ApiClient, db: asyncpg.Pool) -> None:
    """Newest first, two at a time, to the end; then oldest first after an id a client last saw."""
    viewer = await api.user_token("vic", "viewer", db)
    first, _, ids = await _received(db)
    seen: list[int] = []
    cursor = ""
    while True:
        status, page = await api.call("GET", f"/api/incoming?account_id={first}&limit=2{cursor}", viewer)
        assert status == 200, page
        seen += [item["id"] for item in page["items"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == ids[::-1]
    status, page = await api.call("GET", f"/api/incoming?account_id={first}&order=asc&after_id={ids[1]}&limit=2",
                                  viewer)
    assert status == 200 and [item["id"] for item in page["items"]] == ids[2:4]
    status, page = await api.call(
        "GET", f"/api/incoming?account_id={first}&order=asc&after_id={ids[1]}&cursor={page['next_cursor']}", viewer)
    assert [item["id"] for item in page["items"]] == ids[4:] and page["next_cursor"] is None
    item = page["items"][0]
    assert (item["chat_id"], item["sender"], item["text"]) == (42, "@eve", "text 5")
    assert item["telegram_message_id"] == 5 << 20
    assert item["sent_at"].startswith("2023-11-14T22:13:25")


async def test_filters_by_chat_and_account(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """A group's negative chat id filters; no account filter lists every account's messages."""
    first, second, ids = await _received(db)
    status, page = await api.call("GET", f"/api/incoming?chat_id={GROUP}", admin_token)
    assert status == 200 and [item["id"] for item in page["items"]] == [ids[3], ids[1]]
    status, page = await api.call("GET", "/api/incoming?chat_id=42&order=asc", admin_token)
    assert [item["account_id"] for item in page["items"]] == [first, first, first, second]


async def test_bad_queries_name_the_field(api: ApiClient, admin_token: str) -> None:
    """A malformed filter gets 422 naming it; unknown parameters are refused too."""
    for query, field in (("order=sideways", "order"), ("chat_id=abc", "chat_id"), ("after_id=-1", "after_id"),
                         ("limit=501", "limit"), ("cursor=x", "cursor"), ("since=1", "since")):
        status, body = await api.call("GET", f"/api/incoming?{query}", admin_token)
        assert status == 422, (query, body)
        assert [error["field"] for error in body["error"]["details"]["errors"]] == [field], (query, body)
