"""Health endpoints: liveness without auth, details that notice a missing worker."""

from __future__ import annotations

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


async def test_detailed_health_names_the_running_version(api: ApiClient, admin_token: str) -> None:
    """The detailed view says which build answers (the package's one version)."""
    _, body = await api.call("GET", "/api/health/detailed", admin_token)
    assert body["version"] == telegram_platform.__version__


async def test_detailed_health_needs_auth(api: ApiClient) -> None:
    """The detailed view is for authenticated users only."""
    status, _ = await api.call("GET", "/api/health/detailed")
    assert status == 401
