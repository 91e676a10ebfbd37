"""The gateway transport: its own idle-connection check, against a real server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import anyio
import httpx2
import pytest

from mcp_imagegen.gateway_pool import CHECK_EVERY_S, PollingBackend, gateway_transport

pytestmark = pytest.mark.anyio

LIMITS = httpx2.Limits(max_connections=8, max_keepalive_connections=8, keepalive_expiry=30.0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class ClosingServer:
    """HTTP/1.1 on 127.0.0.1 that answers one request per connection with keep-alive headers,
    then closes the connection while the client holds it idle, as a gateway's keep-alive
    timeout does."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    request += chunk
                body = b'{"ok": true}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                time.sleep(0.05)  # the client now holds the connection idle in its pool
            self.closed.set()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def closing_server() -> Iterator[ClosingServer]:
    server = ClosingServer()
    yield server
    server.close()


def test_the_pool_uses_the_polling_backend() -> None:
    # If an httpx2 release renames its pool attribute, the transport silently keeps httpx2's own
    # (slower) pool; this test is where that shows.
    transport = gateway_transport(LIMITS)
    assert isinstance(transport._pool._network_backend, PollingBackend)  # type: ignore[attr-defined]


async def test_a_connection_the_gateway_closed_while_idle_is_not_reused(closing_server: ClosingServer) -> None:
    async with httpx2.AsyncClient(transport=gateway_transport(LIMITS)) as client:
        url = f"http://127.0.0.1:{closing_server.port}/v1/models"
        first = await client.get(url)
        assert first.json() == {"ok": True}
        with anyio.fail_after(5):
            while not closing_server.closed.is_set():
                await anyio.sleep(0.01)
        # The FIN has reached the client's socket, and the last check (made when the first
        # answer ended, before the close) is too old to be reused.
        await anyio.sleep(CHECK_EVERY_S + 0.02)
        # Reusing the closed connection would fail with "server disconnected"; the idle check
        # sees the end of the stream and opens a new connection instead.
        second = await client.get(url)
        assert second.json() == {"ok": True}
    assert closing_server.connections == 2
