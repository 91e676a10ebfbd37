"""Real outside services the tests start on 127.0.0.1: each on a free port, ended by the test.

Outside CI a missing component skips its tests with the reason and the command that installs it;
in CI (`CI=true`) it fails them, so a broken CI image cannot pass by skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest

TESTS = Path(__file__).resolve().parent
AUTHSERVER_DIR = TESTS / "authserver"


def missing(component: str, how: str) -> None:
    """Skip (or, in CI, fail) a test whose outside component is not installed."""
    message = f"{component} is not available: {how}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class AuthServer:
    """oidc-provider (npm) issuing JWT access tokens through the client_credentials grant."""

    issuer: str
    process: subprocess.Popen[str]
    secrets: dict[str, str] = field(default_factory=dict)

    def token(self, client_id: str, resource: str, scope: str) -> str:
        response = httpx2.post(
            f"{self.issuer}/token",
            data={
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": self.secrets[client_id],
                "resource": resource,
                "scope": scope,
            },
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


def _clients(clients: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"client_secret": f"{c['client_id']}-secret-0123456789abcdef", **c} for c in clients]


@contextmanager
def auth_server(clients: list[dict[str, Any]], port: int = 0) -> Iterator[AuthServer]:
    """Start the authorization server with these clients ({client_id, scope, ttl?}) until the block ends."""
    node = shutil.which("node")
    if node is None:
        missing("node", "install Node.js (apt-get install nodejs npm)")
    if not (AUTHSERVER_DIR / "node_modules" / "oidc-provider").is_dir():
        missing("oidc-provider", f"run `npm ci` in {AUTHSERVER_DIR.relative_to(TESTS.parent)}")
    clients = _clients(clients)
    config = json.dumps({"port": port, "clients": clients})
    process = subprocess.Popen(
        [str(node), "server.mjs", config],
        cwd=AUTHSERVER_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Its stderr is drained on a thread, so warnings cannot fill the pipe and stall it.
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(process.stderr or []), daemon=True).start()
    try:
        line = process.stdout.readline() if process.stdout else ""
        if not line:
            process.wait(timeout=30)
            raise AssertionError(f"the authorization server did not start: {''.join(errors)}")
        server = AuthServer(json.loads(line)["issuer"], process, {c["client_id"]: c["client_secret"] for c in clients})
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen[Any]

    def stop(self) -> None:
        _stop(self.process)


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Debian's redis-server on a free loopback port, nothing saved to disk, until the block ends."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server", "apt-get install redis-server")
    for _attempt in range(5):  # the port is free when chosen; another process may take it first
        port = _free_port()
        process = subprocess.Popen(
            [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            import redis

            client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
            deadline = time.monotonic() + 30
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            if process.poll() is not None:
                continue
            yield RedisServer(f"redis://127.0.0.1:{port}/0", process)
            return
        finally:
            _stop(process)
    raise AssertionError("redis-server did not start on any of five free ports")


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")


@contextmanager
def s3_server(monkeypatch: pytest.MonkeyPatch, bucket: str = "team-images") -> Iterator[S3Server]:
    """moto's S3 server (PyPI moto[server]) on a free loopback port, with one bucket."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:
        missing("moto[server] and boto3", "pip install -e '.[test]'")
    for name, value in (("AWS_ACCESS_KEY_ID", "test-access"), ("AWS_SECRET_ACCESS_KEY", "test-secret")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        port = None
        for line in process.stdout or []:
            found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port is not None, "moto's S3 server did not start"
        threading.Thread(target=lambda: [None for _ in process.stdout or []], daemon=True).start()
        server = S3Server(f"http://127.0.0.1:{port}", bucket)
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        _stop(process)
