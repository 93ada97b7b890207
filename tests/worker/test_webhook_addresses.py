"""Webhook SSRF: deliveries reach public addresses only (or allow-listed networks), whatever the
spelling of the host, and the address checked is the one connected to. Nothing here sends a packet
anywhere but loopback: a refused address is refused before any connection."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from conftest import free_port
from support import ApiClient

from telegram_platform.redis_auth import RedisAuth
from telegram_platform.settings import ConfigError, Settings
from telegram_platform.worker.webhook_addresses import PublicOnlyResolver, address_refusal
from telegram_platform.worker.webhooks import WebhookService


@pytest.fixture
def settings(platform_env: dict[str, str]) -> Settings:
    """The platform's settings without the fixtures' loopback allow-list."""
    return Settings.from_env({**platform_env, "TP_WEBHOOK_ALLOW_NETWORKS": ""}, app_mode="api")


NON_PUBLIC = ["127.0.0.1", "127.255.0.9", "0.0.0.0", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
              "100.64.0.1", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "198.18.0.1",
              "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
              "::ffff:10.0.0.1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "::127.0.0.1"]
PUBLIC = ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


def test_non_public_addresses_are_refused_and_public_ones_taken() -> None:
    """Loopback, unspecified, private, link-local (cloud metadata), CGNAT, multicast, reserved and
    IPv6 forms embedding them are refused; public addresses pass."""
    for text in NON_PUBLIC:
        assert address_refusal(ipaddress.ip_address(text), ()) is not None, text
    for text in PUBLIC:
        assert address_refusal(ipaddress.ip_address(text), ()) is None, text


def test_the_allow_list_admits_its_networks_only() -> None:
    """An address inside TP_WEBHOOK_ALLOW_NETWORKS passes; one outside it still does not."""
    allowed = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert address_refusal(ipaddress.ip_address("10.9.9.9"), allowed) is None
    assert address_refusal(ipaddress.ip_address("::1"), allowed) is None
    assert address_refusal(ipaddress.ip_address("::ffff:10.9.9.9"), allowed) is None
    assert address_refusal(ipaddress.ip_address("192.168.0.1"), allowed) is not None


def test_the_allow_list_setting_takes_cidrs() -> None:
    """TP_WEBHOOK_ALLOW_NETWORKS lists CIDRs; anything else is a configuration error naming it."""
    env = {"DATABASE_URL": "postgresql://h/d", "REDIS_URL": "redis://h", "JWT_SECRET": "j" * 32,
           "ENCRYPTION_KEY": "5" * 64}
    assert Settings.from_env(env).webhooks.allow_networks == ()
    parsed = Settings.from_env({**env, "TP_WEBHOOK_ALLOW_NETWORKS": "10.0.0.0/8, fd00::/8"})
    assert parsed.webhooks.allow_networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    with pytest.raises(ConfigError, match="TP_WEBHOOK_ALLOW_NETWORKS"):
        Settings.from_env({**env, "TP_WEBHOOK_ALLOW_NETWORKS": "internal.example"})


async def test_the_resolver_refuses_numeric_spellings_of_loopback() -> None:
    """Names and numeric spellings resolve to what the system makes of them, then are checked."""
    resolver = PublicOnlyResolver(())
    try:
        for host in ("127.0.0.1", "2130706433", "0x7f.1", "0177.0.0.1", "localhost", "0"):
            with pytest.raises(OSError, match="not a public address"):
                await resolver.resolve(host, 80)
    finally:
        await resolver.close()


@pytest.fixture
async def loopback_receiver() -> AsyncIterator[tuple[int, list[bytes]]]:
    """An HTTP receiver on 127.0.0.1 that records every request and answers 500 with a long body."""
    port, received = free_port(), []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=500, text="internal-detail " * 10_000 + "\x1b[31m")

    app = web.Application()
    app.router.add_post("/{tail:.*}", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port, received
    await runner.cleanup()


async def test_every_spelling_of_loopback_is_refused_before_connecting(
        settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis,
        loopback_receiver: tuple[int, list[bytes]], redis_auth: RedisAuth) -> None:
    """Without an allow-list, no spelling of a loopback address reaches the receiver on 127.0.0.1."""
    port, received = loopback_receiver
    webhooks = dataclasses.replace(settings.webhooks, allow_networks=())
    service = WebhookService(dataclasses.replace(settings, webhooks=webhooks), db, redis, redis_auth)
    try:
        for host in ("127.0.0.1", "2130706433", "0x7f.1", "0177.0.0.01", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
                     "0.0.0.0", "0", "localhost", "[::1]", "127.1"):
            status, error = await service.attempt(f"http://{host}:{port}/hook", b"{}", {})
            assert status is None and error is not None and "not a public address" in error, (host, error)
        assert received == []
    finally:
        await service.aclose()


async def test_an_allowed_receiver_gets_a_bounded_sanitised_reason(
        settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis,
        loopback_receiver: tuple[int, list[bytes]], redis_auth: RedisAuth) -> None:
    """Allow-listed, the receiver is reached; its error body is not stored, only the status and reason."""
    port, received = loopback_receiver
    allowed = (ipaddress.ip_network("127.0.0.0/8"),)
    webhooks = dataclasses.replace(settings.webhooks, allow_networks=allowed)
    service = WebhookService(dataclasses.replace(settings, webhooks=webhooks), db, redis, redis_auth)
    try:
        status, error = await service.attempt(f"http://127.0.0.1:{port}/hook", b"{}", {})
    finally:
        await service.aclose()
    assert len(received) == 1 and status == 500
    assert error == "HTTP 500 Internal Server Error"


async def test_a_url_naming_a_non_public_address_is_refused_when_given(api: ApiClient, admin_token: str) -> None:
    """On creation and on change, a URL whose host is a non-public address is a 422 naming `url`
    (a name's addresses are checked at each delivery)."""
    for host in ("127.0.0.1", "169.254.169.254", "[::ffff:127.0.0.1]", "0.0.0.0", "10.0.0.1", "[fe80::1]",
                 "2130706433", "0x7f.1", "100.64.1.1", "224.0.0.1"):
        status, body = await api.call("POST", "/api/webhooks", admin_token, json={"url": f"http://{host}/hook"})
        assert status == 422 and [e["field"] for e in body["error"]["details"]["errors"]] == ["url"], (host, body)
    status, hook = await api.call("POST", "/api/webhooks", admin_token, json={"url": "https://hooks.example.com/x"})
    assert status == 201, hook
    status, body = await api.call("PATCH", f"/api/webhooks/{hook['id']}", admin_token,
                                  json={"url": "http://169.254.169.254/latest/meta-data/"})
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "url", body
