"""The shipped nginx configuration (telegram_platform/deploy/nginx/) in front of a running `tp-api`:
the real nginx, only its ports, paths and certificate changed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from conftest import free_port
from support import SelfSigned, eventually, self_signed

from telegram_platform import events
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.redis_keys import login_attempts

SHIPPED = Path(__file__).resolve().parents[2] / "telegram_platform" / "deploy" / "nginx" / "telegram-platform.conf"
NGINX = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
# A client on another loopback address than the proxy's, so that the API can tell them apart.
CLIENT_ADDRESS = "127.0.0.2"
FORGED = "203.0.113.66"


def render(https_port: int, http_port: int, api_port: int, cert: SelfSigned) -> str:
    """The shipped file with this test's ports and certificate, each replaced where it stands."""
    text = SHIPPED.read_text()
    replacements = {
        "server 127.0.0.1:3000;": f"server 127.0.0.1:{api_port};",
        "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "/etc/telegram-platform/tls/fullchain.pem": str(cert.cert),
        "/etc/telegram-platform/tls/privkey.pem": str(cert.key),
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def main_conf(directory: Path, site: Path) -> str:
    """nginx's own top-level file for a private instance: everything under `directory`."""
    temp = "\n".join(f"    {kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                              "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (f"{user}worker_processes 1;\ndaemon off;\npid {directory / 'nginx.pid'};\n"
            f"error_log {directory / 'error.log'} info;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n    access_log {directory / 'access.log'};\n{temp}\n    include {site};\n}}\n")


@pytest.fixture
def nginx_dir(tmp_path: Path) -> Path:
    if NGINX is None:
        pytest.skip("nginx not installed (apt-get install nginx; scripts/test installs it as root)")
    directory = tmp_path / "nginx"
    directory.mkdir()
    return directory


@pytest.fixture
async def tp_api(platform_env: dict[str, str], db: asyncpg.Pool) -> AsyncIterator[int]:
    """`tp-api` as production runs it behind the proxy: loopback, the proxy trusted; its port."""
    port = int(platform_env["PORT"])
    env = {**platform_env, "TP_HOST": "127.0.0.1", "TP_TRUSTED_PROXIES": "127.0.0.1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from telegram_platform.cli.api import main; main()", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    async def ready() -> bool:
        assert process.returncode is None, "tp-api exited"
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/api/health") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await eventually(ready, timeout=30, interval=0.1)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 20)


@pytest.fixture
def proxy(nginx_dir: Path, tp_api: int, tmp_path: Path) -> Iterator[tuple[int, int, SelfSigned]]:
    """The real nginx with the rendered file, checked by `nginx -t` first: (https port, http port, cert)."""
    assert NGINX is not None
    cert = self_signed(tmp_path / "tls")
    https_port, http_port = free_port(), free_port()
    site = nginx_dir / "telegram-platform.conf"
    site.write_text(render(https_port, http_port, tp_api, cert))
    conf = nginx_dir / "nginx.conf"
    conf.write_text(main_conf(nginx_dir, site))
    checked = subprocess.run([NGINX, "-t", "-c", str(conf), "-p", str(nginx_dir)], capture_output=True, text=True,
                             timeout=30, check=False)
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(nginx_dir)], stderr=subprocess.DEVNULL)
    try:
        yield https_port, http_port, cert
    finally:
        process.terminate()
        process.wait(timeout=20)


async def test_the_shipped_nginx_conf_fronts_the_api(proxy: tuple[int, int, SelfSigned], admin_token: str,
                                                     redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """Through the shipped nginx: HTTPS with a verified certificate reaches the API, plain HTTP is
    redirected to it, a WebSocket upgrade carries events, /metrics is not exposed, a body above the
    API's limit is refused, and with TP_TRUSTED_PROXIES the API sees the client's own address, not
    the proxy's nor one the client forged in X-Forwarded-For."""
    https_port, http_port, cert = proxy
    client_tls = ssl.create_default_context(cafile=str(cert.cert))
    base = f"https://127.0.0.1:{https_port}"
    connector = aiohttp.TCPConnector(local_addr=(CLIENT_ADDRESS, 0), ssl=client_tls)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def serving() -> bool:
            try:
                async with http.get(f"{base}/api/health") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(serving, timeout=15, interval=0.1)
        async with http.get(f"{base}/api/health") as response:
            assert response.status == 200 and await response.json() == {"status": "ok"}
            assert response.headers["Strict-Transport-Security"].startswith("max-age=")
        async with http.get(f"http://127.0.0.1:{http_port}/api/health", allow_redirects=False) as response:
            assert response.status == 301
            assert response.headers["Location"].startswith("https://")
        async with http.get(f"{base}/metrics") as response:
            assert response.status == 404
        async with http.post(f"{base}/api/auth/login", data=b"x" * (1 << 20 | 1),
                             headers={"Content-Type": "application/json"}) as response:
            assert response.status == 413

        async with http.ws_connect(f"wss://127.0.0.1:{https_port}/api/ws?token={admin_token}&topics=all") as ws:
            hello = json.loads((await ws.receive(timeout=10)).data)
            assert hello["type"] == "subscribed", hello
            await events.publish(redis, redis_auth, "account.state", {"account_id": 7, "auth_state": "ready"})
            event = json.loads((await ws.receive(timeout=10)).data)
            assert event["type"] == "account.state" and event["data"]["account_id"] == 7, event

        username = "nobody-behind-nginx"
        async with http.post(f"{base}/api/auth/login", json={"username": username, "password": "wrong-password"},
                             headers={"X-Forwarded-For": FORGED}) as response:
            assert response.status == 401
    assert await redis.exists(login_attempts(username, CLIENT_ADDRESS)[0]) == 1
    for other in (FORGED, "127.0.0.1"):
        assert await redis.exists(login_attempts(username, other)[0]) == 0
