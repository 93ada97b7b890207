"""Bad input: one JSON error shape, every bad field named, request ids on every response."""

from __future__ import annotations

import asyncpg
import yarl
from support import ApiClient


async def test_unknown_route_is_json_404(api: ApiClient) -> None:
    """An unknown path answers 404 in the error shape, with a request id, even one that holds a
    percent-encoded newline (which a route pattern's `.` does not match)."""
    for path in ("/api/nothing-here", "/api/users/%C2%BAo%0A", "/%0A%0D"):
        async with api.client.get(yarl.URL(path, encoded=True)) as response:
            assert response.status == 404, path
            body = await response.json()
            assert body["error"]["code"] == "not_found", path
            assert response.headers["X-Request-ID"]


async def test_request_id_is_echoed(api: ApiClient) -> None:
    """A client's X-Request-ID comes back unchanged."""
    async with api.client.get("/api/health", headers={"X-Request-ID": "trace-42"}) as response:
        assert response.status == 200
        assert response.headers["X-Request-ID"] == "trace-42"


async def test_validation_names_every_bad_field(api: ApiClient, admin_token: str) -> None:
    """Three bad fields and an unknown one in one body are all reported, each by name."""
    status, body = await api.call("POST", "/api/messages", admin_token,
                                  json={"account_id": "one", "peer": "", "text": 5, "colour": "red"})
    assert status == 422
    assert body["error"]["code"] == "validation_error"
    errors = {e["field"]: e["message"] for e in body["error"]["details"]["errors"]}
    assert set(errors) == {"account_id", "peer", "text", "colour"}
    assert errors["colour"] == "is not a known field"


async def test_a_phone_that_is_not_e164_is_refused_here(api: ApiClient, admin_token: str) -> None:
    """A phone no country code can start, too short or too long is a 422 naming `phone`, answered
    without a worker (none runs here: asking one would time out) and leaving no account."""
    for phone in ("0000000", "+0123456789", "+123456", "+1234567890123456", "+44 20 7946 0000"):
        status, body = await api.call("POST", "/api/accounts", admin_token, json={"phone": phone})
        assert status == 422, (phone, body)
        assert [e["field"] for e in body["error"]["details"]["errors"]] == ["phone"]
    status, body = await api.call("GET", "/api/accounts", admin_token)
    assert status == 200 and body["items"] == []


async def test_missing_fields_and_bad_json(api: ApiClient, admin_token: str) -> None:
    """Missing required fields are named (text when there is no media); a body that is not JSON gets
    400 naming the body."""
    status, body = await api.call("POST", "/api/messages", admin_token, json={})
    assert status == 422
    # `peer` may be left out (a reply to an incoming message goes to its chat), and `text` for a file
    # (its caption): each named once the rest is valid.
    assert {e["field"] for e in body["error"]["details"]["errors"]} == {"account_id"}
    status, body = await api.call("POST", "/api/messages", admin_token, json={"account_id": 1, "peer": "@x"})
    assert status == 422 and [e["field"] for e in body["error"]["details"]["errors"]] == ["text"]
    status, body = await api.call("POST", "/api/messages", admin_token, data=b"{not json",
                                  headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["details"]["field"] == "body"


async def test_oversized_body_is_413(api: ApiClient, admin_token: str) -> None:
    """A body above TP_MAX_BODY_BYTES gets 413 in the error shape."""
    big = b'{"text": "' + b"x" * (2 << 20) + b'"}'
    status, body = await api.call("POST", "/api/messages", admin_token, data=big,
                                  headers={"Content-Type": "application/json"})
    assert status == 413 and body["error"]["code"] == "payload_too_large"


async def test_unknown_message_is_404(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """A message id that does not exist gives 404; a malformed one gives 422 naming `id`."""
    status, body = await api.call("GET", "/api/messages/999999", admin_token)
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await api.call("GET", "/api/messages/abc", admin_token)
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "id"


async def test_a_query_parameter_given_twice_is_refused(api: ApiClient, admin_token: str) -> None:
    """`?account_id=1&account_id=2` is a 422 naming the parameter, not one of the two picked quietly;
    each other bad parameter is still named beside it."""
    status, body = await api.call("GET", "/api/messages?account_id=1&account_id=2&limit=5&limit=5&status=nope",
                                  admin_token)
    assert status == 422, body
    errors = {e["field"]: e["message"] for e in body["error"]["details"]["errors"]}
    assert errors.keys() == {"account_id", "limit", "status"}
    assert errors["account_id"] == errors["limit"] == "is given more than once"
    status, body = await api.call("GET", "/api/messages?account_id=1&limit=5", admin_token)
    assert status == 200 and body["items"] == []


async def test_deeply_nested_json_is_400(api: ApiClient, admin_token: str) -> None:
    """A body nested past any reasonable depth (arrays or objects) is a 400 in the error shape, never
    a 500 from the parser's recursion limit; so is an in-band WebSocket frame."""
    for body in ("[" * 100_000, '{"a":' * 50_000, '{"text": ' + "[" * 10_000 + "]" * 10_000 + "}"):
        for path, token in (("/api/messages", admin_token), ("/api/auth/login", None)):
            headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
            async with api.client.post(path, data=body, headers=headers) as response:
                answer = await response.json()
            assert response.status == 400, (path, body[:20], answer)
            assert answer["error"]["code"] == "bad_request" and answer["error"]["details"]["field"] == "body"
    async with api.client.ws_connect(f"/api/ws?token={admin_token}") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "subscribed"
        await ws.send_str("[" * 60_000)
        assert (await ws.receive_json(timeout=5))["type"] == "error"
        await ws.send_json({"action": "ping"})
        assert (await ws.receive_json(timeout=5))["type"] == "pong"


async def test_an_oversized_idempotency_key_header_is_400(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """An Idempotency-Key header over 200 characters is refused with 400 naming the header; 200 pass."""
    account_id = int(await db.fetchval("INSERT INTO accounts (phone) VALUES ('+9996601234') RETURNING id"))
    payload = {"account_id": account_id, "peer": "@x", "text": "hi"}
    status, body = await api.call("POST", "/api/messages", admin_token, json=payload,
                                  headers={"Idempotency-Key": "k" * 201})
    assert status == 400 and body["error"]["code"] == "bad_request", body
    assert body["error"]["details"]["header"] == "Idempotency-Key"
    status, body = await api.call("POST", "/api/messages", admin_token, json=payload,
                                  headers={"Idempotency-Key": "k" * 200})
    assert status == 202, body
