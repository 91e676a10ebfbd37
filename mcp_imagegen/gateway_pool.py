"""The httpx2 transport under every gateway call: keep-alive HTTP/1.1 tuned for many calls at once.

Four things differ from httpx2's default transport, each measured with many calls at once:

- TCP_NODELAY. httpcore2 writes the headers and the body separately; with Nagle's algorithm the
  body can wait for the gateway's delayed ACK, ~40 ms on a reused connection.
- A cheap check of idle connections. Each time a request starts or an answer ends, the pool asks
  every idle connection whether the gateway has closed it; httpcore2 answers through anyio's
  socket attributes, which build a dict and call getpeername() every time. With 64 connections
  that is ~4,000 checks per batch of calls, all on the event loop, and bursts of answers kept it
  busy for 50-70 ms at a time. Here the socket is looked up once per connection, a check is one
  poll(), and a check less than CHECK_EVERY_S old is reused: server CPU per 64 calls -15%, the
  longest stall from ~50 to ~35 ms.
- Bigger reads. An answer's body is read in the pieces the event loop received, up to 256 KiB,
  not in httpcore2's 64 KiB: a 3.7 MB image answer takes a quarter of the trips through h11,
  httpcore2 and httpx2.
- Several pools. Even so, each pass over the pool visits every connection it holds, twice per
  request: with 64 connections in one pool, 190 us a pass and 8% of the event loop's time. Requests
  go to the first pool with fewer than SHARD_FILL in flight, so one caller at a time keeps reusing
  one connection, and 64 at once spread over pools of 8.
"""

from __future__ import annotations

import math
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpcore2
import httpx2

SOCKET_OPTIONS = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
# Gateways close idle connections at their keep-alive timeout, seconds after the last answer, so
# a check this recent is as good as a new one. Should one close a connection in between, the
# request sent on it fails before the gateway sees it, and the gateway client retries.
CHECK_EVERY_S = 0.05


READ_BYTES = 256 * 1024  # what asyncio's socket transport receives at most at a time

SHARDS = 8
SHARD_FILL = 8  # requests in flight on a pool before the next pool takes new ones


def gateway_transport(limits: httpx2.Limits) -> ShardedTransport:
    tls = httpx2.create_ssl_context()  # loading the CA bundle takes ~20 ms: once, shared

    def share(total: int | None) -> int | None:
        return None if total is None else max(1, math.ceil(total / SHARDS))

    shard_limits = httpx2.Limits(
        max_connections=share(limits.max_connections),
        max_keepalive_connections=share(limits.max_keepalive_connections),
        keepalive_expiry=limits.keepalive_expiry,
    )
    return ShardedTransport([_pool_transport(tls, shard_limits) for _ in range(SHARDS)])


def _pool_transport(tls: ssl.SSLContext, limits: httpx2.Limits) -> httpx2.AsyncHTTPTransport:
    transport = httpx2.AsyncHTTPTransport(verify=tls, limits=limits, socket_options=SOCKET_OPTIONS)
    if isinstance(getattr(transport, "_pool", None), httpcore2.AsyncConnectionPool):
        # httpx2 does not pass a network backend through, so its pool is made again with the
        # same settings. Should httpx2 rename the attribute, its own pool (slower, not wrong)
        # stays, and tests/test_gateway_pool.py says so.
        transport._pool = httpcore2.AsyncConnectionPool(
            ssl_context=tls,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            socket_options=SOCKET_OPTIONS,
            network_backend=PollingBackend(),
        )
    return transport


class ShardedTransport(httpx2.AsyncBaseTransport):
    """Several connection pools behind one transport, so that no pool grows large (see above)."""

    def __init__(self, shards: list[httpx2.AsyncHTTPTransport]) -> None:
        self.shards = shards
        self.in_flight = [0] * len(shards)

    def _pick(self) -> int:
        for index, count in enumerate(self.in_flight):
            if count < SHARD_FILL:
                return index
        return min(range(len(self.shards)), key=self.in_flight.__getitem__)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        index = self._pick()
        self.in_flight[index] += 1
        try:
            response = await self.shards[index].handle_async_request(request)
        except BaseException:
            self.in_flight[index] -= 1
            raise
        # The request stays in flight until its answer is read and closed.
        response.stream = _ReleasedOnClose(response.stream, lambda: self._release(index))
        return response

    def _release(self, index: int) -> None:
        self.in_flight[index] -= 1

    async def aclose(self) -> None:
        for shard in self.shards:
            await shard.aclose()


class _ReleasedOnClose(httpx2.AsyncByteStream):
    def __init__(self, inner: Any, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


def _readable(sock: socket.socket | None) -> bool:
    """Whether a read would return at once; on an idle connection, that the gateway closed it."""
    if sock is None or sock.fileno() < 0:
        return True
    if not hasattr(select, "poll"):  # Windows
        return bool(select.select([sock], [], [], 0)[0])
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class _Stream(httpcore2.AsyncNetworkStream):
    def __init__(self, inner: httpcore2.AsyncNetworkStream) -> None:
        self._inner = inner
        self._socket: socket.socket | None = inner.get_extra_info("socket")
        self._closed_by_peer = False
        self._checked_at = -CHECK_EVERY_S

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        # httpcore2 asks for 64 KiB; the event loop receives up to 256 KiB at a time, which would
        # pass through h11, httpcore2 and httpx2 in four pieces. h11 buffers whatever it is given.
        return await self._inner.read(max(max_bytes, READ_BYTES), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore2.AsyncNetworkStream:
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            now = time.monotonic()
            if not self._closed_by_peer and now - self._checked_at >= CHECK_EVERY_S:
                self._closed_by_peer, self._checked_at = _readable(self._socket), now
            return self._closed_by_peer
        return self._inner.get_extra_info(info)


class PollingBackend(httpcore2.AsyncNetworkBackend):
    """httpcore2's anyio backend, with streams that answer `is_readable` cheaply (see above)."""

    def __init__(self) -> None:
        self._inner = httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        return _Stream(await self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        return _Stream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
