"""Users: admins create, list, change the role of and disable users; the last admin stays."""

from __future__ import annotations

import asyncpg
import pytest
from support import ApiClient

from telegram_platform.errors import Conflict
from telegram_platform.storage import users


async def test_admin_creates_a_user_who_logs_in(api: ApiClient, admin_token: str) -> None:
    """A created user appears in the list, logs in, and sees itself at /api/users/me."""
    status, user = await api.call("POST", "/api/users", admin_token,
                                  json={"username": "olga", "password": "olga-password", "role": "operator"})
    assert status == 201 and user["role"] == "operator" and not user["disabled"]
    assert "password" not in user and "password_hash" not in user
    status, listing = await api.call("GET", "/api/users", admin_token)
    assert status == 200 and "olga" in {u["username"] for u in listing["items"]}
    status, tokens = await api.call("POST", "/api/auth/login", json={"username": "olga", "password": "olga-password"})
    assert status == 200
    status, me = await api.call("GET", "/api/users/me", tokens["access_token"])
    assert status == 200 and me["username"] == "olga" and me["id"] == user["id"]
    status, body = await api.call("POST", "/api/users", admin_token,
                                  json={"username": "olga", "password": "other-password", "role": "viewer"})
    assert status == 409 and body["error"]["code"] == "conflict"


async def test_bad_user_input_names_the_fields(api: ApiClient, admin_token: str) -> None:
    """A short password and an unknown role are both named; an empty change is refused."""
    status, body = await api.call("POST", "/api/users", admin_token,
                                  json={"username": "x", "password": "short", "role": "root"})
    assert status == 422
    assert {e["field"] for e in body["error"]["details"]["errors"]} == {"password", "role"}
    status, body = await api.call("PATCH", "/api/users/1", admin_token, json={})
    assert status == 422
    status, body = await api.call("PATCH", "/api/users/987654", admin_token, json={"disabled": True})
    assert status == 404


async def test_disable_revokes_and_refuses_login(api: ApiClient, admin_token: str) -> None:
    """A disabled user cannot log in, and their refresh token stops working."""
    await api.call("POST", "/api/users", admin_token,
                   json={"username": "pete", "password": "pete-password", "role": "viewer"})
    _, tokens = await api.call("POST", "/api/auth/login", json={"username": "pete", "password": "pete-password"})
    _, users = await api.call("GET", "/api/users", admin_token)
    pete = next(u for u in users["items"] if u["username"] == "pete")
    status, changed = await api.call("PATCH", f"/api/users/{pete['id']}", admin_token,
                                     json={"disabled": True, "role": "operator"})
    assert status == 200 and changed["disabled"] and changed["role"] == "operator"
    status, _ = await api.call("POST", "/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert status == 401
    status, _ = await api.call("POST", "/api/auth/login", json={"username": "pete", "password": "pete-password"})
    assert status == 401
    status, _ = await api.call("PATCH", f"/api/users/{pete['id']}", admin_token, json={"disabled": False})
    assert status == 200
    status, _ = await api.call("POST", "/api/auth/login", json={"username": "pete", "password": "pete-password"})
    assert status == 200


async def test_last_admin_cannot_be_demoted_or_disabled(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """The only enabled admin cannot be demoted or disabled by anyone (Conflict from the store, which
    locks the admins' rows: two admins demoting each other at once leave one); with another it works."""
    admin_id = await db.fetchval("SELECT id FROM users WHERE username = 'admin'")
    for change in ({"role": "viewer"}, {"disabled": True}):
        with pytest.raises(Conflict):
            await users.update_user(db, admin_id, **change)
    await api.user_token("second", "admin", db)
    user = await users.update_user(db, admin_id, role="operator")
    assert user is not None and user.role == "operator"


async def test_an_admin_cannot_demote_or_disable_themselves(api: ApiClient, admin_token: str,
                                                            db: asyncpg.Pool) -> None:
    """Their own demotion or disabling is a 409 naming the field, even with other admins about, and
    their session goes on; another admin can do it, and they may change their own password."""
    admin_id = await db.fetchval("SELECT id FROM users WHERE username = 'admin'")
    second_token = await api.user_token("second", "admin", db)
    for change, field in (({"role": "operator"}, "role"), ({"disabled": True}, "disabled")):
        status, body = await api.call("PATCH", f"/api/users/{admin_id}", admin_token, json=change)
        assert status == 409 and body["error"]["details"] == {"field": field}, body
    status, body = await api.call("PATCH", f"/api/users/{admin_id}", admin_token,
                                  json={"role": "admin", "password": "a-new-password-1"})
    assert status == 200 and body["role"] == "admin"
    status, _ = await api.call("GET", "/api/users", admin_token)
    assert status == 200
    status, body = await api.call("PATCH", f"/api/users/{admin_id}", second_token, json={"role": "operator"})
    assert status == 200 and body["role"] == "operator"
