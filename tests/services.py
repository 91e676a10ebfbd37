"""Real outside services the tests start on 127.0.0.1: each on a free port, ended by the test.

Outside CI a missing component skips its tests with the reason and the command that installs it;
in CI (`CI=true`) it fails them, so a broken CI image cannot pass by skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
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
