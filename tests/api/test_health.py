"""Health endpoints: liveness without auth, details that notice a missing worker."""

from __future__ import annotations

import asyncpg
from support import ApiClient

import telegram_platform


async def test_health_is_public(api: ApiClient) -> None:
    """GET /api/health answers 200 {"status": "ok"} without a token."""
    status, body = await api.call("GET", "/api/health")
    assert status == 200 and body == {"status": "ok"}


async def test_detailed_health_is_degraded_without_a_worker(api: ApiClient, admin_token: str) -> None:
    """With no worker alive, the detailed health says degraded with 503 but still reports each part."""
    status, body = await api.call("GET", "/api/health/detailed", admin_token)
    assert status == 503
    assert body["status"] == "degraded"
    assert body["database"]["status"] == "ok" and body["redis"]["status"] == "ok"
    assert body["workers"] == []
    assert set(body["queues"]) >= {"messages"}


async def test_detailed_health_without_a_token_is_the_status_only(api: ApiClient) -> None:
    """A caller without a token (a load balancer, a monitor) gets the overall status and code, no details."""
    status, body = await api.call("GET", "/api/health/detailed")
    assert status == 503 and body == {"status": "degraded"}


async def test_detailed_health_gives_details_to_any_role(api: ApiClient, db: asyncpg.Pool) -> None:
    """Any signed-in role, the lowest included, gets the full details."""
    token = await api.user_token("watcher", "viewer", db)
    status, body = await api.call("GET", "/api/health/detailed", token)
    assert status == 503 and body["status"] == "degraded"
    assert body["database"]["status"] == "ok" and "queues" in body and "processes" in body


async def test_detailed_health_refuses_a_bad_token(api: ApiClient) -> None:
    """A token that is given but invalid is a 401 saying so, not a quiet downgrade to the summary."""
    status, body = await api.call("GET", "/api/health/detailed", "not-a-token")
    assert status == 401 and body["error"]["code"] == "unauthorized"


async def test_detailed_health_names_the_running_version(api: ApiClient, admin_token: str) -> None:
    """The detailed view says which build answers (the package's one version)."""
    _, body = await api.call("GET", "/api/health/detailed", admin_token)
    assert body["version"] == telegram_platform.__version__
