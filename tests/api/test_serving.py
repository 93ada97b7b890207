"""`tp-api` as it serves: HTTPS and wss with its own certificate (on its own port or on the socket
supervisord hands it), and GET /metrics on TP_METRICS_LISTEN, shared by every member."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
from conftest import free_port
from support import SelfSigned, eventually, run_to_exit, samples, self_signed, total

from telegram_platform.settings import EXIT_CONFIG

API_MAIN = "from telegram_platform.cli.api import main; main()"


@contextlib.asynccontextmanager
async def tp_api(env: dict[str, str], ready_url: str, *, ssl_context: ssl.SSLContext | None = None,
                 pass_fds: tuple[int, ...] = ()) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real `tp-api` process, once `ready_url` answers 200; SIGTERM and wait at the end."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", API_MAIN, env=env, pass_fds=pass_fds,
                                                   stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)

    async def ready() -> bool:
        if process.returncode is not None:
            assert process.stderr is not None
            raise AssertionError(f"tp-api exited {process.returncode}: {(await process.stderr.read()).decode()}")
        try:
            async with aiohttp.ClientSession() as http, http.get(ready_url, ssl=ssl_context or True) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await eventually(ready, timeout=30, interval=0.1)
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()


def verifying(cert: SelfSigned) -> ssl.SSLContext:
    """A client context that trusts only the test's own certificate, and checks the host name."""
    return ssl.create_default_context(cafile=str(cert.cert))


def tls_env(platform_env: dict[str, str], cert: SelfSigned) -> dict[str, str]:
    return {**platform_env, "TP_HOST": "127.0.0.1", "TP_TLS_CERT": str(cert.cert), "TP_TLS_KEY": str(cert.key)}


async def _plain_http_refused(port: int) -> None:
    """A plain HTTP request on the TLS port gets no HTTP answer: the handshake fails and it is closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(1024), 10)
    writer.close()
    assert not answer.startswith(b"HTTP/"), answer
    async with aiohttp.ClientSession() as http:
        try:
            async with http.get(f"http://127.0.0.1:{port}/api/health") as response:
                raise AssertionError(f"plain HTTP was answered: {response.status}")
        except aiohttp.ClientError:
            pass


async def _https_and_wss(port: int, client_tls: ssl.SSLContext, token: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"https://127.0.0.1:{port}/api/health", ssl=client_tls) as response:
            assert response.status == 200
        async with http.ws_connect(f"wss://127.0.0.1:{port}/api/ws?token={token}&topics=all",
                                   ssl=client_tls) as ws:
            hello = json.loads((await ws.receive(timeout=10)).data)
            assert hello["type"] == "subscribed", hello
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls)
    assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    writer.close()


async def test_tp_api_serves_https_and_wss_with_its_certificate(
        platform_env: dict[str, str], db: asyncpg.Pool, admin_token: str, tmp_path: Path) -> None:
    """With TP_TLS_CERT/TP_TLS_KEY, `tp-api` answers HTTPS and wss to a client that verifies the
    certificate (TLS 1.2 or newer), and plain HTTP on the same port is refused."""
    cert = self_signed(tmp_path / "tls")
    port = int(platform_env["PORT"])
    client_tls = verifying(cert)
    async with tp_api(tls_env(platform_env, cert), f"https://127.0.0.1:{port}/api/health", ssl_context=client_tls):
        await _https_and_wss(port, client_tls, admin_token)
        await _plain_http_refused(port)
        # A client that does not trust the certificate is refused: it is the certificate served.
        async with aiohttp.ClientSession() as http:
            try:
                async with http.get(f"https://127.0.0.1:{port}/api/health", ssl=ssl.create_default_context()):
                    raise AssertionError("an unverified certificate was accepted")
            except aiohttp.ClientConnectorCertificateError:
                pass


async def test_tls_on_the_socket_supervisord_hands_over(
        platform_env: dict[str, str], db: asyncpg.Pool, admin_token: str, tmp_path: Path) -> None:
    """Given a listening socket as TP_LISTEN_FD (supervisord's [fcgi-program]), `tp-api` serves TLS on
    it: HTTPS and wss verified, plain HTTP refused."""
    cert = self_signed(tmp_path / "tls")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    client_tls = verifying(cert)
    env = {**tls_env(platform_env, cert), "TP_LISTEN_FD": str(listener.fileno()), "TP_INSTANCE": "tp-api-tls"}
    try:
        async with tp_api(env, f"https://127.0.0.1:{port}/api/health", ssl_context=client_tls,
                          pass_fds=(listener.fileno(),)):
            await _https_and_wss(port, client_tls, admin_token)
            await _plain_http_refused(port)
    finally:
        listener.close()


async def test_metrics_listen_is_shared_by_every_member_and_off_the_api_port(
        platform_env: dict[str, str], db: asyncpg.Pool) -> None:
    """With TP_METRICS_LISTEN, two `tp-api` processes both serve GET /metrics there (SO_REUSEPORT: no
    member fails to start for the port), the API ports answer 404 for /metrics, the metrics address
    serves nothing else, and when one member stops the other keeps answering scrapes."""
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    ports = [free_port(), free_port()]
    envs = [{**platform_env, "TP_HOST": "127.0.0.1", "PORT": str(port), "TP_INSTANCE": f"member-{i}",
             "TP_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"} for i, port in enumerate(ports)]
    async with (
        tp_api(envs[0], f"http://127.0.0.1:{ports[0]}/api/health") as first,
        tp_api(envs[1], f"http://127.0.0.1:{ports[1]}/api/health"),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
    ):
        for port in ports:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 404
        async with http.get(f"http://127.0.0.1:{metrics_port}/api/health") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"
        for _ in range(6):
            async with http.get(metrics_url) as response:
                assert response.status == 200
                values = samples(await response.text())
                assert total(values, "tp_metrics_collector_success", collector="database") == 1
        first.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.wait(), 20) == 0
        for _ in range(6):
            async with http.get(metrics_url) as response:
                assert response.status == 200


async def test_metrics_listen_still_wants_the_token_when_both_are_set(
        platform_env: dict[str, str], db: asyncpg.Pool) -> None:
    """TP_METRICS_TOKEN with TP_METRICS_LISTEN: the metrics address asks for the token too."""
    metrics_port, port = free_port(), int(platform_env["PORT"])
    env = {**platform_env, "TP_HOST": "127.0.0.1", "TP_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
           "TP_METRICS_TOKEN": "metrics-token-for-the-listener"}
    async with tp_api(env, f"http://127.0.0.1:{port}/api/health"), aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            assert response.status == 401
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics",
                            headers={"Authorization": "Bearer metrics-token-for-the-listener"}) as response:
            assert response.status == 200


async def test_a_metrics_address_held_by_another_program_stops_tp_api_naming_it(
        platform_env: dict[str, str], db: asyncpg.Pool) -> None:
    """TP_METRICS_LISTEN on a port another program holds (without SO_REUSEPORT): `tp-api` exits 78
    with one line naming the variable, not a traceback."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        env = {**platform_env, "TP_HOST": "127.0.0.1",
               "TP_METRICS_LISTEN": f"127.0.0.1:{squatter.getsockname()[1]}"}
        status, _, stderr = await run_to_exit(API_MAIN, env)
    lines = stderr.strip().splitlines()
    assert status == EXIT_CONFIG, stderr
    assert len(lines) == 1 and "TP_METRICS_LISTEN" in lines[0] and "cannot listen" in lines[0], lines
