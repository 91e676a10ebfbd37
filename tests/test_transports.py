"""The transports as clients reach them: stdio subprocesses, streamable HTTP and legacy SSE on
loopback, with auth, DNS-rebinding protection and the request body limit."""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import uvicorn
from mcp.client import Client
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, ImageContent, ResourceLink, TextContent
from PIL import Image
from pydantic import SecretStr

from mcp_imagegen.config import EndpointConfig, Settings
from mcp_imagegen.errors import ConfigError
from mcp_imagegen.transports import http_app, sse_app, uvicorn_config

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789abcdef"

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def texts(result: CallToolResult) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, TextContent))


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    values: dict[str, Any] = {
        "output_dir": tmp_path / "out",
        "endpoints": [EndpointConfig(name="offline", provider="offline")],
        "allowed_roots": [tmp_path / "inputs"],
    }
    values.update(overrides)
    return Settings(**values)


# --- stdio -------------------------------------------------------------------------------------------


def stdio_env(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "mcp-imagegen.toml"
    config.write_text(
        f'output_dir = "{(tmp_path / "out").as_posix()}"\n\n[[endpoints]]\nname = "offline"\nprovider = "offline"\n',
        encoding="utf-8",
    )
    return {
        "MCP_IMAGEGEN_CONFIG": str(config),
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "PYTHONPATH": str(REPO),
        "MCP_IMAGEGEN_LOG_LEVEL": "INFO",  # plenty on stderr, none of it on stdout
    }


class RawStdioServer:
    """`python -m mcp_imagegen` with pipes, reading stdout line by line as it arrives."""

    def __init__(self, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
        env.update(stdio_env(tmp_path))
        self.stderr_path = tmp_path / "stderr.log"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mcp_imagegen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=tmp_path,
            env=env,
        )
        self.lines: list[bytes] = []
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._next_id = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def request(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> dict[str, Any]:
        self._next_id += 1
        rid = self._next_id
        self.send({"jsonrpc": "2.0", "id": rid, "method": method, **({"params": params} if params is not None else {})})
        deadline = time.monotonic() + timeout
        while True:
            line = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"server closed stdout; stderr: {self.stderr_path.read_text()[-2000:]}"
            message = json.loads(line)
            if message.get("id") == rid and ("result" in message or "error" in message):
                return message

    def close(self) -> int:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._stderr.close()
        return code


def test_stdio_stdout_carries_only_json_rpc(tmp_path: Path) -> None:
    server = RawStdioServer(tmp_path)
    try:
        init = server.request(
            "initialize",
            {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
        )
        assert init["result"]["serverInfo"]["name"] == "mcp-imagegen"
        server.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        tools = server.request("tools/list")["result"]["tools"]
        assert {t["name"] for t in tools} >= {"generate_image", "edit_image", "list_models"}
        call = server.request(
            "tools/call",
            {
                "name": "generate_image",
                "arguments": {"prompt": "a stdio fox", "size": "64x48", "n": 2},
                "_meta": {"progressToken": "p1"},
            },
        )
        result = call["result"]
        assert not result.get("isError"), result
        images = result["structuredContent"]["images"]
        assert len(images) == 2 and all(Path(i["path"]).is_file() for i in images)
        assert any(b["type"] == "image" for b in result["content"])
        assert any(b["type"] == "resource_link" for b in result["content"])
        read = server.request("resources/read", {"uri": images[0]["uri"]})["result"]
        assert base64.b64decode(read["contents"][0]["blob"]) == Path(images[0]["path"]).read_bytes()
        bad = server.request("tools/call", {"name": "generate_image", "arguments": {"prompt": "x", "n": 99}})
        assert bad["result"]["isError"] is True
    finally:
        code = server.close()
    assert code == 0, server.stderr_path.read_text()[-2000:]
    assert server.lines, "no output"
    progress = 0
    for raw in server.lines:
        message = json.loads(raw)  # every line is one JSON-RPC message
        assert message.get("jsonrpc") == "2.0", raw[:200]
        progress += message.get("method") == "notifications/progress"
    assert progress >= 2
    assert server.stderr_path.stat().st_size > 0, "logs go to stderr"


@asynccontextmanager
async def stdio_client_for(tmp_path: Path, mode: str = "auto") -> AsyncIterator[Client]:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "mcp_imagegen"], env=stdio_env(tmp_path), cwd=tmp_path
    )
    with (tmp_path / "client-stderr.log").open("a") as errlog:
        from mcp.client.stdio import stdio_client

        async with Client(stdio_client(params, errlog=errlog), mode=mode) as client:
            yield client


async def test_stdio_images_survive_a_restart(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with stdio_client_for(tmp_path) as client:
            result = await client.call_tool("generate_image", {"prompt": "kept", "size": "80x60"})
            assert not result.is_error, texts(result)
            [image] = result.structured_content["images"]
        async with stdio_client_for(tmp_path, mode="legacy") as client:
            read = await client.read_resource(image["uri"])
            assert base64.b64decode(read.contents[0].blob) == Path(image["path"]).read_bytes()
            listed = {str(r.uri) for r in (await client.list_resources()).resources}
            assert image["uri"] in listed
            edited = await client.call_tool("edit_image", {"prompt": "again", "images": image["uri"]})
            assert not edited.is_error, texts(edited)


# --- HTTP transports in-process ----------------------------------------------------------------------


@contextmanager
def serve(app: Any, sock: socket.socket) -> Iterator[str]:
    config = uvicorn_config(app, *sock.getsockname()[:2])  # what `serve` runs, with the socket bound here
    config.timeout_graceful_shutdown = 2
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    host, port = sock.getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_idle_client_connections_outlive_client_and_proxy_idle_timeouts(tmp_path: Path) -> None:
    # httpx expires idle connections after 5 s and load balancers after 60 s; uvicorn's own 5 s
    # default raced the first and made clients calling ~5 s apart fail with read errors.
    config = uvicorn_config(http_app(settings_for(tmp_path), host="127.0.0.1", port=8000), "127.0.0.1", 8000)
    assert config.timeout_keep_alive > 60


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def http_server(settings: Settings, *, token: str | None = TOKEN, stateless: bool = False) -> Iterator[str]:
    sock = bound_socket()
    app = http_app(settings, host="127.0.0.1", port=sock.getsockname()[1], auth_token=token, stateless=stateless)
    with serve(app, sock) as origin:
        yield origin


@contextmanager
def sse_server(settings: Settings, *, token: str | None = TOKEN) -> Iterator[str]:
    sock = bound_socket()
    app = sse_app(settings, host="127.0.0.1", port=sock.getsockname()[1], auth_token=token)
    with serve(app, sock) as origin:
        yield origin


def http_client(origin: str, mode: str, token: str = TOKEN) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30, read=120))
    return Client(streamable_http_client(f"{origin}/mcp", http_client=http), mode=mode)


def noise_png(side: int) -> bytes:
    img = Image.frombytes("RGB", (side, side), random.Random(side).randbytes(side * side * 3))
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_streamable_http_round_trip_with_progress(tmp_path: Path, mode: str) -> None:
    settings = settings_for(tmp_path)
    big = noise_png(1300)  # base64 in the arguments: over the SDK's 4 MiB default body limit
    assert len(base64.b64encode(big)) > 4 * 1024 * 1024
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    with http_server(settings) as origin:
        with anyio.fail_after(60):
            async with http_client(origin, mode) as client:
                tools = {t.name: t for t in (await client.list_tools()).tools}
                assert tools["generate_image"].output_schema is not None
                result = await client.call_tool(
                    "generate_image", {"prompt": "over http", "n": 3, "size": "96x96"}, progress_callback=on_progress
                )
                assert not result.is_error, texts(result)
                images = result.structured_content["images"]
                assert len(images) == 3
                assert [b for b in result.content if isinstance(b, ImageContent)]
                assert [b for b in result.content if isinstance(b, ResourceLink)]
                assert len(seen) >= 3 and seen == sorted(seen), seen

                edited = await client.call_tool("edit_image", {"prompt": "blue", "images": images[0]["uri"]})
                assert not edited.is_error, texts(edited)
                big_edit = await client.call_tool(
                    "edit_image", {"prompt": "calm", "images": base64.b64encode(big).decode(), "size": "64x64"}
                )
                assert not big_edit.is_error, texts(big_edit)

                read = await client.read_resource(images[1]["uri"])
                assert base64.b64decode(read.contents[0].blob) == Path(images[1]["path"]).read_bytes()
                models = await client.call_tool("list_models", {})
                assert models.structured_content["models"][0]["id"] == "offline"


async def test_streamable_http_stateless(tmp_path: Path) -> None:
    with http_server(settings_for(tmp_path), stateless=True) as origin:
        with anyio.fail_after(30):
            async with http_client(origin, "legacy") as client:
                result = await client.call_tool("generate_image", {"prompt": "replica", "size": "32x32"})
                assert not result.is_error, texts(result)
                [image] = result.structured_content["images"]
                read = await client.read_resource(image["uri"])
                assert read.contents[0].mime_type == image["mime_type"]


INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


async def test_http_refuses_bad_tokens_hosts_origins_and_big_bodies(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, max_request_body_mb=4)
    with http_server(settings) as origin:
        url = f"{origin}/mcp"
        async with httpx2.AsyncClient(timeout=30) as http:
            none = await http.post(url, json=INIT, headers=JSON_HEADERS)
            assert none.status_code == 401
            assert none.headers["www-authenticate"].lower().startswith("bearer")
            wrong = await http.post(url, json=INIT, headers={**JSON_HEADERS, "Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and "bearer" in wrong.headers["www-authenticate"].lower()
            basic = await http.post(url, json=INIT, headers={**JSON_HEADERS, "Authorization": f"Basic {TOKEN}"})
            assert basic.status_code == 401
            elsewhere = await http.get(f"{origin}/anything", headers={})
            assert elsewhere.status_code == 401  # every request, not only /mcp

            auth = {**JSON_HEADERS, "Authorization": f"Bearer {TOKEN}"}
            good = await http.post(url, json=INIT, headers=auth)
            assert good.status_code == 200, good.text
            bad_host = await http.post(url, json=INIT, headers={**auth, "Host": "evil.example:80"})
            assert bad_host.status_code == 421
            bad_origin = await http.post(url, json=INIT, headers={**auth, "Origin": "http://evil.example"})
            assert bad_origin.status_code == 403
            local_origin = await http.post(url, json=INIT, headers={**auth, "Origin": origin})
            assert local_origin.status_code == 200

            body = json.dumps({**INIT, "padding": "x" * (5 * 1024 * 1024)})
            too_big = await http.post(url, content=body, headers=auth)
            assert too_big.status_code == 413


def test_network_binds_need_a_token_unless_allowed(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    for build in (http_app, sse_app):
        with pytest.raises(ConfigError) as err:
            build(settings, host="0.0.0.0", port=8000, auth_token=None)
        assert "--auth-token" in str(err.value)
        assert build(settings, host="0.0.0.0", port=8000, auth_token=TOKEN) is not None
        assert build(settings, host="0.0.0.0", port=8000, auth_token=None, allow_unauthenticated=True) is not None
        assert build(settings, host="127.0.0.1", port=8000, auth_token=None) is not None


async def test_http_without_token_on_loopback_serves(tmp_path: Path) -> None:
    with http_server(settings_for(tmp_path), token=None) as origin:
        async with httpx2.AsyncClient(timeout=30) as http:
            response = await http.post(f"{origin}/mcp", json=INIT, headers=JSON_HEADERS)
            assert response.status_code == 200


async def test_sse_round_trip_with_token(tmp_path: Path) -> None:
    with sse_server(settings_for(tmp_path)) as origin:
        async with httpx2.AsyncClient(timeout=10) as http:
            denied = await http.get(f"{origin}/sse")
            assert denied.status_code == 401
        with anyio.fail_after(60):
            transport = sse_client(f"{origin}/sse", headers={"Authorization": f"Bearer {TOKEN}"})
            async with Client(transport, mode="legacy") as client:
                tools = {t.name for t in (await client.list_tools()).tools}
                assert "generate_image" in tools
                result = await client.call_tool("generate_image", {"prompt": "over sse", "size": "64x64"})
                assert not result.is_error, texts(result)
                [image] = result.structured_content["images"]
                read = await client.read_resource(image["uri"])
                assert base64.b64decode(read.contents[0].blob) == Path(image["path"]).read_bytes()


@pytest.mark.parametrize("transport", ["http", "sse"])
async def test_slow_generation_is_recovered_over_the_network(tmp_path: Path, emulator: Any, transport: str) -> None:
    """A generation that outlives the call returns a handle; get_image collects the image later."""
    slow = emulator("openai", serve_retired=True, api_key=TOKEN, latency_s=2.0)
    endpoint = EndpointConfig(name="slow", provider="openai", base_url=slow.base_url, api_key=SecretStr(TOKEN))
    settings = settings_for(tmp_path, endpoints=[endpoint], tool_deadline_s=0.5)
    server = http_server if transport == "http" else sse_server
    with server(settings) as origin, anyio.fail_after(60):
        if transport == "http":
            client = http_client(origin, "auto")
        else:
            client = Client(sse_client(f"{origin}/sse", headers={"Authorization": f"Bearer {TOKEN}"}), mode="legacy")
        async with client:
            first = await client.call_tool("generate_image", {"prompt": "slow", "model": "gpt-image-1"})
            assert not first.is_error, texts(first)
            assert first.structured_content["status"] == "running"
            job_id = first.structured_content["job_id"]
            assert f'get_image(job_id="{job_id}")' in texts(first)
            # get_image waits at most the deadline too, so the agent asks again until it is done.
            for _ in range(40):
                later = await client.call_tool("get_image", {"job_id": job_id, "wait_s": 20})
                assert not later.is_error, texts(later)
                if later.structured_content["status"] == "done":
                    break
            assert later.structured_content["status"] == "done"
            [image] = later.structured_content["images"]
            assert Path(image["path"]).is_file()
            read = await client.read_resource(image["uri"])
            assert base64.b64decode(read.contents[0].blob) == Path(image["path"]).read_bytes()
