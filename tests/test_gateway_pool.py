"""The gateway transport: its idle-connection check and its several pools, against real servers on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import anyio
import httpx2
import pytest

from mcp_imagegen.gateway_pool import CHECK_EVERY_S, SHARD_FILL, SHARDS, PollingBackend, gateway_transport

pytestmark = pytest.mark.anyio

LIMITS = httpx2.Limits(max_connections=8, max_keepalive_connections=8, keepalive_expiry=30.0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


ANSWER_BODY = b'{"ok": true}'
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
    b"Content-Length: " + str(len(ANSWER_BODY)).encode() + b"\r\n\r\n" + ANSWER_BODY
)


def read_request(conn: socket.socket, pending: bytes = b"") -> bytes | None:
    """Read one bodiless request's head; what follows it, or None when the client closed."""
    while b"\r\n\r\n" not in pending:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        pending += chunk
    return pending.split(b"\r\n\r\n", 1)[1]


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
                if read_request(conn) is not None:
                    conn.sendall(ANSWER)
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
    assert len(transport.shards) == SHARDS
    for shard in transport.shards:
        assert isinstance(shard._pool._network_backend, PollingBackend)  # type: ignore[attr-defined]


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


class HoldingServer:
    """HTTP/1.1 keep-alive on 127.0.0.1, a thread per connection, that holds every answer until
    the test lets them go: so a test can look at the client while its requests are in flight."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.arrived = 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            rest = read_request(conn)
            while rest is not None:
                with self._lock:
                    self.arrived += 1
                self.release.wait(10)
                conn.sendall(ANSWER)
                rest = read_request(conn, rest)

    def close(self) -> None:
        self.release.set()
        self.sock.close()


@pytest.fixture
def holding_server() -> Iterator[HoldingServer]:
    server = HoldingServer()
    yield server
    server.close()


WIDE = httpx2.Limits(max_connections=512, max_keepalive_connections=128, keepalive_expiry=30.0)


async def test_one_caller_at_a_time_keeps_reusing_one_connection(holding_server: HoldingServer) -> None:
    holding_server.release.set()
    transport = gateway_transport(WIDE)
    async with httpx2.AsyncClient(transport=transport) as client:
        for _ in range(12):
            response = await client.get(f"http://127.0.0.1:{holding_server.port}/v1/models")
            assert response.json() == {"ok": True}
        assert transport.in_flight == [0] * SHARDS
    assert holding_server.connections == 1


async def test_many_calls_at_once_spread_over_pools_and_are_released(holding_server: HoldingServer) -> None:
    calls = 3 * SHARD_FILL + 2
    transport = gateway_transport(WIDE)
    async with httpx2.AsyncClient(transport=transport) as client:
        answers: list[object] = []

        async def one() -> None:
            response = await client.get(f"http://127.0.0.1:{holding_server.port}/v1/models")
            answers.append(response.json())

        async with anyio.create_task_group() as tg:
            for _ in range(calls):
                tg.start_soon(one)
            with anyio.fail_after(10):
                while holding_server.arrived < calls:
                    await anyio.sleep(0.01)
            # Every pool fills to SHARD_FILL before the next one takes requests.
            assert transport.in_flight[:4] == [SHARD_FILL, SHARD_FILL, SHARD_FILL, 2]
            assert sum(transport.in_flight) == calls
            holding_server.release.set()
        assert answers == [{"ok": True}] * calls
        # Closing each answer gave its pool its place back.
        assert transport.in_flight == [0] * SHARDS
    assert holding_server.connections == calls


async def test_a_request_that_fails_gives_its_place_back() -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]  # closed below: nothing listens there any more
    transport = gateway_transport(WIDE)
    async with httpx2.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx2.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/v1/models")
        assert transport.in_flight == [0] * SHARDS


async def test_an_answer_closed_unread_gives_its_place_back(holding_server: HoldingServer) -> None:
    holding_server.release.set()
    transport = gateway_transport(WIDE)
    async with httpx2.AsyncClient(transport=transport) as client:
        async with client.stream("GET", f"http://127.0.0.1:{holding_server.port}/v1/models") as response:
            assert response.status_code == 200
            assert sum(transport.in_flight) == 1
        assert transport.in_flight == [0] * SHARDS


async def test_a_big_answer_is_read_in_the_pieces_the_event_loop_received() -> None:
    """A body that waited in the socket comes up in pieces of up to 256 KiB, not httpcore2's 64 KiB."""
    body = bytes(range(256)) * 1024  # 256 KiB
    written = threading.Event()

    def serve(sock: socket.socket) -> None:
        conn, _ = sock.accept()
        with conn:
            read_request(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            written.set()
            read_request(conn)  # until the client closes

    with socket.create_server(("127.0.0.1", 0)) as sock:
        threading.Thread(target=serve, args=(sock,), daemon=True).start()
        pieces: list[int] = []
        async with httpx2.AsyncClient(transport=gateway_transport(LIMITS)) as client:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/images"
            async with client.stream("GET", url) as response:
                # Hold the event loop (no await) until the whole body is in the sockets' buffers.
                assert written.wait(timeout=30)
                async for piece in response.aiter_raw():
                    pieces.append(len(piece))
    assert sum(pieces) == len(body)
    assert max(pieces) > 64 * 1024
