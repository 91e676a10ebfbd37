"""The HTTP transports under abuse, with real servers and real sockets on loopback.

A legitimate client (the SDK's own client, at another peer address: 127.0.0.2 is loopback too)
keeps completing tool calls while another client floods sessions, trickles headers or bodies, or
the process runs short of file descriptors. Small timeouts come from the settings; every wait is a
condition polled with a generous limit, never a duration that is asserted.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types.version import LATEST_MODERN_VERSION

from mcp_imagegen.config import Settings
from mcp_imagegen.http_guard import AcceptErrorLog
from mcp_imagegen.http_sessions import client_key
from mcp_imagegen.transports import http_app, sse_app
from tests.test_transports import INIT, JSON_HEADERS, REPO, TOKEN, bound_socket, serve, settings_for, texts

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

OTHER_PEER = "127.0.0.2"  # the legitimate client's own address; the abuser stays on 127.0.0.1
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextmanager
def running(app_for: Callable[..., Any], settings: Settings, token: str | None = TOKEN) -> Iterator[tuple[str, Any]]:
    sock = bound_socket()
    app = app_for(settings, host="127.0.0.1", port=sock.getsockname()[1], auth_token=token)
    with serve(app, sock) as origin:
        yield origin, app


def http_from(peer: str, **kwargs: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        transport=httpx2.AsyncHTTPTransport(local_address=peer),
        timeout=httpx2.Timeout(30, read=120),
        **kwargs,
    )


def legit_http_client(origin: str, mode: str = "legacy") -> Client:
    # "legacy" opens a session (the 2026-07-28 era has none): the session limits apply to it too.
    http = http_from(OTHER_PEER, headers=AUTH)
    return Client(streamable_http_client(f"{origin}/mcp", http_client=http), mode=mode)


def key_of(peer: str) -> tuple[str, str]:
    """How the server names a client holding the test token at `peer`."""
    return client_key(
        {"type": "http", "headers": [(b"authorization", AUTH["Authorization"].encode())], "client": (peer, 1)}
    )


async def call_works(client: Client, prompt: str) -> None:
    result = await client.call_tool("generate_image", {"prompt": prompt, "size": "32x32"})
    assert not result.is_error, texts(result)
    assert Path(result.structured_content["images"][0]["path"]).is_file()


async def open_session(http: httpx2.AsyncClient, origin: str) -> httpx2.Response:
    return await http.post(f"{origin}/mcp", json=INIT, headers={**JSON_HEADERS, **AUTH})


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


# --- session floods ----------------------------------------------------------------------------------


async def test_a_session_flood_is_refused_for_the_flooder_only(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, max_sessions_per_client=5)
    with running(http_app, settings) as (origin, app), anyio.fail_after(90):
        async with httpx2.AsyncClient(timeout=30) as flooder:
            opened = [await open_session(flooder, origin) for _ in range(5)]
            assert all(r.status_code == 200 and r.headers.get("mcp-session-id") for r in opened)
            refused = await open_session(flooder, origin)
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            body = refused.json()
            assert body["jsonrpc"] == "2.0" and body["error"]["code"] == -32000
            assert "5 open MCP sessions" in body["error"]["message"]

            async with legit_http_client(origin) as client:
                legit = key_of(OTHER_PEER)
                assert app.state.session_manager.sessions_of(legit) == 1  # a session of its own, beside the full ones
                # The flood goes on while the other client works.
                async with anyio.create_task_group() as tg:

                    async def flood() -> None:
                        for _ in range(200):
                            assert (await open_session(flooder, origin)).status_code == 429

                    tg.start_soon(flood)
                    for i in range(3):
                        await call_works(client, f"legit {i}")

            # A session the flooder closes (DELETE) makes room for one more of its own.
            sid = opened[0].headers["mcp-session-id"]
            closed = await flooder.delete(
                f"{origin}/mcp", headers={**AUTH, "mcp-session-id": sid, "mcp-protocol-version": "2025-11-25"}
            )
            assert closed.status_code == 200
            assert (await open_session(flooder, origin)).status_code == 200
            assert (await open_session(flooder, origin)).status_code == 429


async def test_idle_sessions_expire_and_free_their_clients_room(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, max_sessions_per_client=2, session_idle_timeout_s=1.0)
    me = key_of("127.0.0.1")
    with running(http_app, settings) as (origin, app), anyio.fail_after(60):
        manager = app.state.session_manager
        async with httpx2.AsyncClient(timeout=30) as http:
            sids = [(await open_session(http, origin)).headers["mcp-session-id"] for _ in range(2)]
            ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}

            async def expired(sid: str) -> bool:
                headers = {**JSON_HEADERS, **AUTH, "mcp-session-id": sid, "mcp-protocol-version": "2025-11-25"}
                return (await http.post(f"{origin}/mcp", json=ping, headers=headers)).status_code == 404

            assert manager.sessions_of(me) == 2
            while manager.sessions_of(me):  # no request touches them meanwhile: that would keep them alive
                await anyio.sleep(0.1)
            for sid in sids:
                assert await expired(sid)
            for _ in range(2):
                assert (await open_session(http, origin)).status_code == 200


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_default_settings_hold_64_concurrent_calls_from_one_client(tmp_path: Path, mode: str) -> None:
    with running(http_app, settings_for(tmp_path)) as (origin, _app), anyio.fail_after(240):
        http = httpx2.AsyncClient(
            headers=AUTH,
            timeout=httpx2.Timeout(30, read=200),
            limits=httpx2.Limits(max_connections=128, max_keepalive_connections=128),
        )
        async with Client(streamable_http_client(f"{origin}/mcp", http_client=http), mode=mode) as client:
            done: list[int] = []

            async def one(i: int) -> None:
                await call_works(client, f"concurrent {i}")
                done.append(i)

            async with anyio.create_task_group() as tg:
                for i in range(64):
                    tg.start_soon(one, i)
            assert sorted(done) == list(range(64))


async def test_sse_streams_are_limited_per_client(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, max_sessions_per_client=2)
    with running(sse_app, settings) as (origin, _app), anyio.fail_after(60):
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(30), headers=AUTH) as flooder:
            async with (
                flooder.stream("GET", f"{origin}/sse") as first,
                flooder.stream("GET", f"{origin}/sse") as second,
            ):
                assert first.status_code == second.status_code == 200
                third = await flooder.get(f"{origin}/sse")
                assert third.status_code == 429 and third.headers["retry-after"]
                assert third.json()["error"]["code"] == -32000
                assert "2 open SSE streams" in third.json()["error"]["message"]

                def factory(headers: Any = None, timeout: Any = None, auth: Any = None) -> httpx2.AsyncClient:
                    return http_from(OTHER_PEER, headers=headers)

                transport = sse_client(f"{origin}/sse", headers=AUTH, httpx_client_factory=factory)
                async with Client(transport, mode="legacy") as client:
                    await call_works(client, "legit over sse")
            # Streams that ended free their room (once the server has seen them go).
            while True:
                async with flooder.stream("GET", f"{origin}/sse") as again:
                    if again.status_code == 200:
                        break
                    assert again.status_code == 429
                await anyio.sleep(0.1)


# --- slow requests ----------------------------------------------------------------------------------


def read_until_closed(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection (fails if it never does)."""
    sock.settimeout(timeout)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            pytest.fail("the server kept a stalled connection open")
        if not chunk:
            return received
        received += chunk


def connect(origin: str) -> socket.socket:
    host, port = origin.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


async def test_slow_headers_are_cut_off_while_others_are_served(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, request_read_timeout_s=1.0)
    with running(http_app, settings) as (origin, _app), anyio.fail_after(90):
        port = origin.rsplit(":", 1)[1]
        silent = [connect(origin) for _ in range(5)]
        partial = [connect(origin) for _ in range(5)]
        for s in partial:
            s.sendall(f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: app".encode())
        trickler = connect(origin)

        async with legit_http_client(origin) as client:
            await call_works(client, "while others stall")

            def trickle() -> bytes:
                # One header byte at a time, each well inside the timeout: the whole still is not.
                trickler.settimeout(30)
                for byte in b"POST /mcp HTTP/1.1\r\nX-Slow: " + b"a" * 10_000:
                    try:
                        trickler.send(bytes([byte]))
                    except OSError:
                        return read_until_closed(trickler)
                    time.sleep(0.05)
                pytest.fail("the server kept reading a header that never ended")

            trickled = await anyio.to_thread.run_sync(trickle)
            partial_answers = [await anyio.to_thread.run_sync(read_until_closed, s) for s in partial]
            silent_answers = [await anyio.to_thread.run_sync(read_until_closed, s) for s in silent]
            await call_works(client, "after the stalls")

        for answer in [*partial_answers, trickled]:
            if answer:  # a reset may beat the answer to the client; a status, when seen, is 408
                assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert any(a.startswith(b"HTTP/1.1 408") for a in partial_answers)
        assert silent_answers == [b""] * 5  # nothing asked, nothing answered: just closed
        for s in [*silent, *partial, trickler]:
            s.close()


async def test_a_slow_body_is_cut_off(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, request_read_timeout_s=1.0)
    with running(http_app, settings) as (origin, _app), anyio.fail_after(60):
        port = origin.rsplit(":", 1)[1]
        slow = connect(origin)
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
            "Content-Length: 100000\r\n\r\n"
        )
        slow.sendall(head.encode() + b'{"jsonrpc": "2.0", ')
        async with legit_http_client(origin) as client:
            await call_works(client, "beside a slow body")
            answer = await anyio.to_thread.run_sync(read_until_closed, slow)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"-32000" in answer
            await call_works(client, "after the slow body")
        slow.close()


# --- running out of file descriptors -----------------------------------------------------------------


SERVING_AT = re.compile(rb"serving MCP \(streamable HTTP\) at http://127\.0\.0\.1:(\d+)/mcp")


def limit_descriptors(n: int) -> Callable[[], None]:
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return apply


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX")
async def test_more_sockets_than_descriptors_leave_the_server_serving(tmp_path: Path) -> None:
    limit = 256
    config = tmp_path / "mcp-imagegen.toml"
    config.write_text(
        f'output_dir = "{(tmp_path / "out").as_posix()}"\nrequest_read_timeout_s = 120\n\n'
        '[[endpoints]]\nname = "offline"\nprovider = "offline"\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    env.update({"MCP_IMAGEGEN_CONFIG": str(config), "PYTHONPATH": str(REPO), "MCP_IMAGEGEN_LOG_LEVEL": "INFO"})
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            # Port 0: the server binds a free port itself and says which on stderr.
            [sys.executable, "-m", "mcp_imagegen", "serve", "--transport", "http", "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            cwd=tmp_path,
            preexec_fn=limit_descriptors(limit),
        )
    stalled: list[socket.socket] = []
    try:

        def announced() -> bool:
            assert proc.poll() is None, stderr_path.read_text()[-3000:]
            return SERVING_AT.search(stderr_path.read_bytes()) is not None

        wait_for(announced, "the server to say where it listens")
        found = SERVING_AT.search(stderr_path.read_bytes())
        assert found is not None
        port = int(found.group(1))
        origin = f"http://127.0.0.1:{port}"
        with anyio.fail_after(120):
            # Far more stalled connections (half-sent headers, never finished) than descriptors.
            for _ in range(limit * 2):
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=10)
                    s.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                except OSError:
                    continue
                stalled.append(s)
            assert proc.poll() is None, stderr_path.read_text()[-3000:]
            # While they hang there, a real client is still let in.
            async with Client(streamable_http_client(f"{origin}/mcp", http_client=http_from(OTHER_PEER))) as client:
                await call_works(client, "under a descriptor siege")
            for s in stalled:
                s.close()
            stalled.clear()
            async with Client(streamable_http_client(f"{origin}/mcp", http_client=http_from(OTHER_PEER))) as client:
                await call_works(client, "after the siege")
        assert proc.poll() is None
        log = stderr_path.read_text()
        assert "connection cap reached" in log
        assert stderr_path.stat().st_size < 1_000_000, f"{stderr_path.stat().st_size} bytes of log"
    finally:
        for s in stalled:
            s.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_accept_errors_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import errno

    passed_on: list[dict[str, Any]] = []
    handler = AcceptErrorLog(lambda loop, context: passed_on.append(context))
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level("WARNING", logger="mcp_imagegen.http_guard"):
            for _ in range(5000):  # what asyncio reports when accept() keeps failing with EMFILE
                error = OSError(errno.EMFILE, "Too many open files")
                handler(loop, {"message": "socket.accept() out of system resource", "exception": error})
            handler(loop, {"message": "something else"})
    finally:
        loop.close()
    lines = [r for r in caplog.records if r.name == "mcp_imagegen.http_guard"]
    assert len(lines) == 1 and "Too many open files" in lines[0].getMessage()
    assert passed_on == [{"message": "something else"}]


# --- invalid JSON-RPC gets an answer --------------------------------------------------------------

BAD_REQUESTS = [
    ({"jsonrpc": "2.0", "id": 41, "method": 5}, -32600),
    ({"jsonrpc": "1.0", "id": "forty-two", "method": "ping"}, -32600),
    ({"jsonrpc": "2.0", "id": 43, "method": "tools/call", "params": "not an object"}, -32602),
]


def test_invalid_json_rpc_over_stdio_is_answered(tmp_path: Path) -> None:
    from tests.test_transports import RawStdioServer

    server = RawStdioServer(tmp_path)
    try:
        server.request(
            "initialize",
            {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
        )
        server.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        for message, code in BAD_REQUESTS:
            server.send(message)
            reply = server_reply(server, message["id"])
            assert reply["error"]["code"] == code, reply
        server.proc.stdin.write(b"{not json\n")
        server.proc.stdin.flush()
        assert server_reply(server, None)["error"]["code"] == -32700
        assert "tools" in server.request("tools/list")["result"]  # and the server goes on
    finally:
        assert server.close() == 0


def server_reply(server: Any, request_id: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        line = server._queue.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "server closed stdout"
        message = json.loads(line)
        if "error" in message and message.get("id") == request_id:
            return message


async def test_invalid_json_rpc_over_sse_is_answered_on_the_stream(tmp_path: Path) -> None:
    with running(sse_app, settings_for(tmp_path)) as (origin, _app), anyio.fail_after(60):
        async with httpx2.AsyncClient(timeout=30, headers=AUTH) as http:
            async with http.stream("GET", f"{origin}/sse") as stream:
                events = stream.aiter_lines()

                async def next_data() -> dict[str, Any] | str:
                    async for line in events:
                        if line.startswith("data: "):
                            data = line.removeprefix("data: ")
                            return json.loads(data) if data.startswith("{") else data
                    raise AssertionError("stream ended")

                endpoint = await next_data()
                assert isinstance(endpoint, str)
                post_url = f"{origin}{endpoint}"
                await http.post(post_url, json=INIT)
                assert (await next_data())["id"] == 1
                await http.post(post_url, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
                for message, code in BAD_REQUESTS:
                    await http.post(post_url, json=message)
                    reply = await next_data()
                    assert reply["id"] == message["id"] and reply["error"]["code"] == code, reply
                await http.post(post_url, json={"jsonrpc": "2.0", "id": 50, "method": "ping"})
                assert (await next_data()) == {"jsonrpc": "2.0", "id": 50, "result": {}}


@pytest.mark.parametrize("era", ["sessions (2025-11-25)", "per request (2026-07-28)"])
async def test_invalid_json_rpc_over_streamable_http_is_answered(tmp_path: Path, era: str) -> None:
    with running(http_app, settings_for(tmp_path)) as (origin, _app), anyio.fail_after(60):
        async with httpx2.AsyncClient(timeout=30, headers={**JSON_HEADERS, **AUTH}) as http:
            if era.startswith("sessions"):
                opened = await http.post(f"{origin}/mcp", json=INIT)
                session = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
            else:
                session = {"mcp-protocol-version": LATEST_MODERN_VERSION}
            for message, code in [*BAD_REQUESTS, ("{not json", -32700)]:
                body = message if isinstance(message, str) else json.dumps(message)
                answer = await http.post(f"{origin}/mcp", content=body, headers=session)
                assert answer.status_code == 400
                error = answer.json()
                assert error["jsonrpc"] == "2.0" and error["error"]["code"] == code, error
                assert error.get("id") == (None if isinstance(message, str) else message["id"]), error
                assert int(answer.headers["content-length"]) == len(answer.content)


# --- OAuth discovery ----------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [TOKEN, None])
async def test_oauth_discovery_is_404_without_oauth(tmp_path: Path, token: str | None) -> None:
    with running(http_app, settings_for(tmp_path), token=token) as (origin, _app):
        async with httpx2.AsyncClient(timeout=30) as http:
            for path in (
                "/.well-known/oauth-protected-resource",
                "/.well-known/oauth-protected-resource/mcp",
                "/.well-known/oauth-authorization-server",
                "/.well-known/openid-configuration",
            ):
                for headers in ({}, AUTH):
                    answer = await http.get(f"{origin}{path}", headers=headers)
                    assert answer.status_code == 404, (path, headers, answer.status_code)
            unauthenticated = await http.post(f"{origin}/mcp", json=INIT, headers=JSON_HEADERS)
            assert unauthenticated.status_code == (401 if token else 200)
