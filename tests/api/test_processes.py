"""/api/processes without supervisord: what the API refuses to restart, and the outage answer."""

from __future__ import annotations

import pytest
from support import ApiClient


@pytest.mark.parametrize("name", ["postgres", "redis:redis", "tp-emulator", "tp-events"])
async def test_backing_services_and_the_listener_are_not_restarted_from_the_api(api: ApiClient, admin_token: str,
                                                                                name: str) -> None:
    """A restart of the database, Redis, the emulator or the listener is a 409 naming it, whatever
    supervisord's state: restarting those from the API would take the API (or the restart) down."""
    status, body = await api.call("POST", f"/api/processes/{name}/restart", admin_token)
    assert status == 409, body
    assert body["error"]["code"] == "conflict" and body["error"]["details"] == {"name": name}
    assert f"tp restart {name.split(':')[0]}" in body["error"]["message"]


async def test_a_platform_process_goes_to_supervisord(api: ApiClient, admin_token: str) -> None:
    """The platform's own processes are not refused: here, with no supervisord, their restart is a
    503 with Retry-After, like the listing."""
    for method, path in (("POST", "/api/processes/tp-worker/restart"), ("GET", "/api/processes")):
        async with api.client.request(method, path, headers={"Authorization": f"Bearer {admin_token}"}) as response:
            assert response.status == 503, await response.text()
            assert response.headers["Retry-After"] == "5"
            assert (await response.json())["error"]["code"] == "service_unavailable"
