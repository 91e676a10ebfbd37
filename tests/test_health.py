"""/healthz and /readyz: answered without a token, ready only while the replica should get traffic."""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest

from mcp_imagegen.transports import http_app, sse_app
from tests.services import redis_server
from tests.test_transports import TOKEN, bound_socket, serve, settings_for

pytestmark = [pytest.mark.slow]


@pytest.mark.parametrize("app_for", [http_app, sse_app])
def test_probes_need_no_token_and_readiness_ends_with_the_drain(tmp_path: Path, app_for: object) -> None:
    sock = bound_socket()
    app = app_for(settings_for(tmp_path), host="127.0.0.1", port=sock.getsockname()[1], auth_token=TOKEN)  # type: ignore[operator]
    with serve(app, sock) as origin:
        assert httpx2.get(f"{origin}/healthz", timeout=30).json() == {"status": "ok"}
        assert httpx2.get(f"{origin}/readyz", timeout=30).status_code == 200
        assert httpx2.get(f"{origin}/mcp" if app_for is http_app else f"{origin}/sse", timeout=30).status_code == 401
        app.state.imagegen_service.begin_drain()
        ready = httpx2.get(f"{origin}/readyz", timeout=30)
        assert ready.status_code == 503 and "draining" in ready.json()["reason"]
        assert httpx2.get(f"{origin}/healthz", timeout=30).status_code == 200


def test_not_ready_while_redis_does_not_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with redis_server() as redis:
        monkeypatch.setenv("MCP_IMAGEGEN_REDIS_URL", redis.url)
        sock = bound_socket()
        app = http_app(settings_for(tmp_path), host="127.0.0.1", port=sock.getsockname()[1], auth_token=TOKEN)
        with serve(app, sock) as origin:
            assert httpx2.get(f"{origin}/readyz", timeout=30).status_code == 200
            redis.stop()
            ready = httpx2.get(f"{origin}/readyz", timeout=30)
            assert ready.status_code == 503 and "storage does not answer" in ready.json()["reason"]
