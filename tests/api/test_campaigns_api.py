"""The campaign, opt-out and account-limit routes, against the real app and database (no worker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from support import ApiClient

from telegram_platform.api.routes.campaigns import PayloadTooLarge, read_csv_body
from telegram_platform.errors import BadRequest
from telegram_platform.storage import accounts as account_store


async def _account(db: asyncpg.Pool, phone: str = "+9996611111") -> int:
    account = await account_store.create_account(db, phone, None)
    return int(account["id"])


async def _campaign(api: ApiClient, token: str, account_id: int, **extra: Any) -> dict[str, Any]:
    status, body = await api.call("POST", "/api/campaigns", token, json={
        "name": "c", "account_ids": [account_id], "template": "Hi {first_name}", **extra})
    assert status == 201, body
    return dict(body)


async def test_create_validates_every_field(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """A bad campaign gets 422 naming each bad field: unknown accounts, a stray brace, a naive time."""
    status, body = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "", "account_ids": [], "template": "x", "schedule_at": "2030-01-01T00:00:00"})
    assert status == 422
    fields = {e["field"] for e in body["error"]["details"]["errors"]}
    assert {"name", "account_ids", "schedule_at"} <= fields
    status, body = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "n", "account_ids": [424242], "template": "x"})
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "account_ids"
    account_id = await _account(db)
    status, body = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "n", "account_ids": [account_id], "template": "Hi {name"})
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "template"


async def test_idempotency_key_returns_the_first_campaign(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """The same Idempotency-Key twice (header or body) gives one campaign; a mismatch is refused."""
    account_id = await _account(db)
    payload = {"name": "once", "account_ids": [account_id], "template": "t", "recipients": [{"peer": "@a"}]}
    _, first = await api.call("POST", "/api/campaigns", admin_token, json=payload, headers={"Idempotency-Key": "k1"})
    _, second = await api.call("POST", "/api/campaigns", admin_token, json={**payload, "idempotency_key": "k1"})
    assert first["id"] == second["id"] and second["progress"]["total"] == 1
    status, body = await api.call("POST", "/api/campaigns", admin_token, json={**payload, "idempotency_key": "k2"},
                                  headers={"Idempotency-Key": "k3"})
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "idempotency_key"
    _, page = await api.call("GET", "/api/campaigns", admin_token)
    assert [c["id"] for c in page["items"]] == [first["id"]]


async def test_a_nul_anywhere_in_a_campaign_is_refused_by_name(api: ApiClient, admin_token: str,
                                                               db: asyncpg.Pool) -> None:
    """A NUL in the name, the template or a recipient's variable is a 422 naming that field, not
    PostgreSQL refusing the row (which text and jsonb cannot hold)."""
    account_id = await _account(db)
    base = {"name": "n", "account_ids": [account_id], "template": "Hi {first_name}"}
    for change, field in (({"name": "a\u0000b"}, "name"), ({"template": "Hi\u0000"}, "template"),
                          ({"recipients": [{"peer": "@a", "variables": {"first_name": "x\u0000"}}]}, "recipients")):
        status, body = await api.call("POST", "/api/campaigns", admin_token, json={**base, **change})
        assert status == 422, body
        assert [e["field"] for e in body["error"]["details"]["errors"]] == [field], body
    campaign = await _campaign(api, admin_token, account_id)
    status, body = await api.call("POST", f"/api/campaigns/{campaign['id']}/recipients", admin_token,
                                  json={"recipients": [{"peer": "@b", "variables": {"v": "\u0000"}}]})
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "recipients", body
    status, body = await api.call("POST", "/api/optouts", admin_token, json={"peers": ["@c"], "reason": "\u0000"})
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "reason", body


async def test_csv_import(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """A CSV with a peer column and variables imports; duplicates (in any spelling) are ignored."""
    campaign = await _campaign(api, admin_token, await _account(db))
    csv_body = "Peer,first_name,city\n@Alice,Alice,Paris\n@alice,Again,\n+999 66 1234,Bob,\n\n12345,,Rome\n"
    status, body = await api.call("POST", f"/api/campaigns/{campaign['id']}/recipients/import", admin_token,
                                  data=csv_body.encode(), headers={"Content-Type": "text/csv"})
    assert status == 200, body
    assert body == {"added": 3, "duplicates": 1, "total": 3}
    _, page = await api.call("GET", f"/api/campaigns/{campaign['id']}/recipients", admin_token)
    assert [(r["peer"], r["variables"]) for r in page["items"]] == [
        ("@Alice", {"first_name": "Alice", "city": "Paris"}), ("+999 66 1234", {"first_name": "Bob"}),
        ("12345", {"city": "Rome"})]
    assert all(r["status"] == "pending" and r["message_status"] is None for r in page["items"])


async def test_csv_import_from_a_spreadsheet_export(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """A byte-order mark, CRLF line ends and a quoted cell holding a line break and a comma import as
    written; a body in another encoding (Latin-1) is a 400 naming the first byte that is not UTF-8."""
    campaign = await _campaign(api, admin_token, await _account(db))
    path = f"/api/campaigns/{campaign['id']}/recipients/import"
    csv_body = '\ufeffpeer,note\r\n@a,"two\r\nlines, one cell"\r\n@b,Zoë\r\n'.encode()
    status, body = await api.call("POST", path, admin_token, data=csv_body, headers={"Content-Type": "text/csv"})
    assert status == 200 and body["added"] == 2, body
    _, page = await api.call("GET", f"/api/campaigns/{campaign['id']}/recipients", admin_token)
    assert [(r["peer"], r["variables"]) for r in page["items"]] == [
        ("@a", {"note": "two\r\nlines, one cell"}), ("@b", {"note": "Zoë"})]
    status, body = await api.call("POST", path, admin_token, data="peer,note\n@c,Zoë\n".encode("latin-1"),
                                  headers={"Content-Type": "text/csv"})
    assert status == 400, body
    assert body["error"]["message"] == "the CSV is not UTF-8 (byte 15)" and body["error"]["details"] == {
        "field": "body"}, body


async def _chunks(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_csv_body_is_checked_as_it_arrives() -> None:
    """A character split between two chunks is read whole; a bad byte, or a character cut off at
    the end, is named by its offset in the whole body; the chunk that crosses the limit is a 413."""
    e_acute = "é".encode()
    assert await read_csv_body(_chunks(b"peer\n@a,", e_acute[:1], e_acute[1:] + b"\n")) == b"peer\n@a,\xc3\xa9\n"
    for chunks, offset in (((b"abc", b"de\xff"), 5), ((b"ab" + e_acute[:1], b"x"), 2), ((b"abc" + e_acute[:1],), 3)):
        with pytest.raises(BadRequest) as refused:
            await read_csv_body(_chunks(*chunks))
        assert refused.value.message == f"the CSV is not UTF-8 (byte {offset})", chunks
    assert await read_csv_body(_chunks(b"a" * 5, b"b" * 5), limit=10) == b"a" * 5 + b"b" * 5
    with pytest.raises(PayloadTooLarge) as too_large:
        await read_csv_body(_chunks(b"a" * 5, b"b" * 6), limit=10)
    assert too_large.value.status == 413 and too_large.value.details == {"max_bytes": 10}


async def test_csv_import_errors(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """No peer column, a bad variable name, an empty peer, a non-CSV type: each refused, naming it."""
    campaign = await _campaign(api, admin_token, await _account(db))
    path = f"/api/campaigns/{campaign['id']}/recipients/import"
    csv_headers = {"Content-Type": "text/csv"}
    status, body = await api.call("POST", path, admin_token, data=b"name\nx\n", headers=csv_headers)
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "peer"
    status, body = await api.call("POST", path, admin_token, data=b"peer,1st\n@a,x\n", headers=csv_headers)
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "1st"
    status, body = await api.call("POST", path, admin_token, data=b"peer,v\n@a,1\n,2\n", headers=csv_headers)
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "row 3"
    status, body = await api.call("POST", path, admin_token, data=b"peer\n@a\n",
                                  headers={"Content-Type": "application/json"})
    assert status == 415 and body["error"]["details"]["field"] == "Content-Type"
    status, body = await api.call("POST", "/api/campaigns/999999/recipients/import", admin_token,
                                  data=b"peer\n@a\n", headers=csv_headers)
    assert status == 404


async def test_csv_import_answers_for_the_campaign_before_reading_the_body(api: ApiClient, admin_token: str,
                                                                           db: asyncpg.Pool) -> None:
    """A campaign that does not exist is a 404, and a cancelled one a 409, whatever the body (even
    none): neither waits for a CSV to be read and parsed. The document describes the text/csv body."""
    status, body = await api.call("POST", "/api/campaigns/999999/recipients/import", admin_token)
    assert status == 404, body
    campaign = await _campaign(api, admin_token, await _account(db))
    path = f"/api/campaigns/{campaign['id']}/recipients/import"
    status, body = await api.call("POST", f"/api/campaigns/{campaign['id']}/cancel", admin_token)
    assert status == 200 and body["status"] == "cancelled", body
    status, body = await api.call("POST", path, admin_token, data=b"\xff not even UTF-8",
                                  headers={"Content-Type": "application/json"})
    assert status == 409 and body["error"]["details"] == {"status": "cancelled"}, body
    _, document = await api.call("GET", "/api/openapi.json")
    request_body = document["paths"]["/api/campaigns/{id}/recipients/import"]["post"]["requestBody"]
    assert request_body == {"required": True, "content": {"text/csv": {"schema": {"type": "string"}}}}


async def test_csv_import_of_100k_and_the_ceiling(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """100,000 recipients import in one CSV (above the JSON body limit); one more is refused, all or nothing."""
    campaign = await _campaign(api, admin_token, await _account(db))
    path = f"/api/campaigns/{campaign['id']}/recipients/import"
    rows = "".join(f"@u{i},Name{i}\n" for i in range(100_000))
    status, body = await api.call("POST", path, admin_token, data=("peer,first_name\n" + rows).encode(),
                                  headers={"Content-Type": "text/csv"})
    assert status == 200, body
    assert body["added"] == 100_000
    status, body = await api.call("POST", path, admin_token, data=b"peer\n@one_more\n",
                                  headers={"Content-Type": "text/csv"})
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "recipients"
    _, got = await api.call("GET", f"/api/campaigns/{campaign['id']}", admin_token)
    assert got["progress"]["total"] == 100_000 and got["progress"]["pending"] == 100_000


async def test_state_machine(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """start/pause/resume/cancel move the status as the contract says; a wrong move is 409."""
    campaign = await _campaign(api, admin_token, await _account(db))
    path = f"/api/campaigns/{campaign['id']}"
    status, body = await api.call("POST", f"{path}/resume", admin_token)
    assert status == 409 and body["error"]["details"]["status"] == "draft"
    for action, expected in (("start", "running"), ("pause", "paused"), ("resume", "running"),
                             ("cancel", "cancelled")):
        status, body = await api.call("POST", f"{path}/{action}", admin_token)
        assert status == 200 and body["status"] == expected, (action, body)
    status, body = await api.call("POST", f"{path}/start", admin_token)
    assert status == 409
    status, body = await api.call("POST", f"{path}/recipients", admin_token, json={"recipients": [{"peer": "@z"}]})
    assert status == 409


async def test_viewer_may_read_not_run(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """A viewer reads campaigns but may not create or start one (403)."""
    campaign = await _campaign(api, admin_token, await _account(db))
    viewer = await api.user_token("watcher", "viewer", db)
    status, _ = await api.call("GET", f"/api/campaigns/{campaign['id']}", viewer)
    assert status == 200
    status, _ = await api.call("POST", f"/api/campaigns/{campaign['id']}/start", viewer)
    assert status == 403


async def test_optouts(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """Opt-outs are normalised (case of usernames, spacing of phones), listed, looked up and removed."""
    status, body = await api.call("POST", "/api/optouts", admin_token,
                                  json={"peers": ["@Bob", "+999 661 2345", "@bob"], "reason": "asked"})
    assert status == 201 and body == {"added": 2}
    status, body = await api.call("GET", "/api/optouts/%40BOB", admin_token)
    assert status == 200 and body["peer_key"] == "@bob" and body["reason"] == "asked"
    status, page = await api.call("GET", "/api/optouts?limit=1", admin_token)
    assert len(page["items"]) == 1 and page["next_cursor"]
    status, page2 = await api.call("GET", "/api/optouts", admin_token,
                                   params={"limit": "1", "cursor": page["next_cursor"]})
    assert len(page2["items"]) == 1 and page2["next_cursor"] is None
    status, body = await api.call("GET", "/api/optouts?cursor=%00", admin_token)  # no peer holds a NUL
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "cursor", body
    for method in ("GET", "DELETE"):
        status, body = await api.call(method, "/api/optouts/a%00b", admin_token)
        assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "peer", body
    status, _ = await api.call("DELETE", "/api/optouts/%2B9996612345", admin_token)
    assert status == 204
    status, _ = await api.call("GET", "/api/optouts/+9996612345", admin_token)
    assert status == 404


async def test_account_limits(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """Limits start at the conservative defaults, change field by field, and reset; bad values are 422."""
    account_id = await _account(db)
    status, body = await api.call("GET", f"/api/accounts/{account_id}/limits", admin_token)
    assert status == 200 and body["custom"] is False
    assert body["per_second"] == 1.0 and body["per_day"] == 500 and body["daily_cap_now"] == 20
    status, body = await api.call("PUT", f"/api/accounts/{account_id}/limits", admin_token,
                                  json={"per_second": 8.5, "warmup_days": 0})
    assert status == 200 and body["custom"] is True
    assert body["per_second"] == 8.5 and body["burst"] == 1 and body["daily_cap_now"] == 500
    status, body = await api.call("PUT", f"/api/accounts/{account_id}/limits", admin_token,
                                  json={"per_second": 0, "burst": 0, "bogus": 1})
    assert status == 422
    fields = {e["field"] for e in body["error"]["details"]["errors"]}
    assert {"per_second", "burst"} <= fields
    status, body = await api.call("DELETE", f"/api/accounts/{account_id}/limits", admin_token)
    assert status == 200 and body["custom"] is False
    status, _ = await api.call("GET", "/api/accounts/999999/limits", admin_token)
    assert status == 404
