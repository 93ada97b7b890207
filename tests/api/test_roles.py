"""Roles: a viewer reads, an operator sends and runs campaigns, an admin manages users, processes, settings."""

from __future__ import annotations

import re

import asyncpg
from support import ApiClient

from telegram_platform.api.endpoints import ENDPOINTS
from telegram_platform.api.security import ROLE_RANK

# The minimum role the contract gives these routes (routes of other modules are checked generically).
EXPECTED_ROLES = {
    ("GET", "/api/accounts"): "viewer",
    ("POST", "/api/accounts"): "operator",
    ("DELETE", "/api/accounts/{id}"): "operator",
    ("GET", "/api/messages"): "viewer",
    ("GET", "/api/messages/{id}"): "viewer",
    ("POST", "/api/messages"): "operator",
    ("GET", "/api/incoming"): "viewer",
    ("GET", "/api/queues"): "viewer",
    ("POST", "/api/queues/{queue}/failed/{job_id}/requeue"): "admin",
    ("GET", "/api/users"): "admin",
    ("POST", "/api/users"): "admin",
    ("PATCH", "/api/users/{id:[0-9]+}"): "admin",
    ("GET", "/api/users/me"): "viewer",
    ("GET", "/api/webhooks"): "admin",
    ("POST", "/api/webhooks"): "admin",
    ("GET", "/api/ws"): "viewer",
    ("GET", "/api/health"): None,
    ("GET", "/api/openapi.json"): None,
    ("GET", "/api/docs"): None,
    ("POST", "/api/auth/login"): None,
}
# Contract: processes are admin-only; campaigns are run by operators (checked when those routes exist).
ADMIN_PREFIXES = ("/api/processes", "/api/users", "/api/webhooks")


def _concrete(path: str) -> str:
    """A request path for a route pattern: ids become 1, other parameters a plausible value."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        return {"queue": "default", "name": "tp-worker"}.get(name, "1")

    return re.sub(r"\{([^}:]+)(?::[^}]*)?\}", value, path)


async def test_declared_roles_match_the_contract(api: ApiClient) -> None:
    """Routes are declared with the roles the contract gives them."""
    declared = {(e.method, e.path): e.role for e in api.app[ENDPOINTS]}
    for route, role in EXPECTED_ROLES.items():
        assert declared[route] == role, route
    for (method, path), role in declared.items():
        if path.startswith(ADMIN_PREFIXES) and path != "/api/users/me":
            assert role == "admin", (method, path)
        if path.startswith("/api/campaigns") and method != "GET":
            assert role in ("operator", "admin"), (method, path)


async def test_each_role_gets_403_where_it_should(api: ApiClient, db: asyncpg.Pool) -> None:
    """Every route that needs more than a role has gives that role 403 (before any validation or
    side effect), and no route ever says 401 or 403 to a role it admits."""
    tokens = {role: await api.user_token(f"role-{role}", role, db) for role in ROLE_RANK}
    checked = 0
    for endpoint in api.app[ENDPOINTS]:
        if endpoint.role is None or endpoint.hidden:
            continue
        path = _concrete(endpoint.path)
        for role, token in tokens.items():
            allowed = ROLE_RANK[role] >= ROLE_RANK[endpoint.role]
            if allowed and endpoint.method != "GET":
                continue  # admitted writes are exercised by their own tests, not fired blindly here
            status, body = await api.call(endpoint.method, path, token, json={})
            if allowed:
                assert status not in (401, 403), (endpoint.method, endpoint.path, role, status, body)
            else:
                assert status == 403, (endpoint.method, endpoint.path, role, status, body)
                assert body["error"]["code"] == "forbidden"
                checked += 1
    assert checked >= 10
    status, _ = await api.call("GET", "/api/users")
    assert status == 401
