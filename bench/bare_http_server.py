"""The floor for the event-loop stall: a bare `MCPServer` over streamable HTTP whose one tool does
what `DirectCaller` does (POST to the gateway with httpx2, base64-decode, write the file) and
returns the gateway's base64 as image content.

Same SDK, same uvicorn, same watchdog (`mcp_imagegen.work.watch_event_loop`, logged in the same
format), and nothing else: no validation, no preview, no fsync, no records. Its stall during the
same batches is what the SDK and httpx2 alone cost the loop on this machine.

    python -m bench.bare_http_server PORT     (from the repository root)
    env: BARE_GATEWAYS='{"photo": "http://127.0.0.1:PORT/v1", ...}', BARE_API_KEY, BARE_OUTPUT_DIR
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import sys
from pathlib import Path

import anyio
import httpx2
import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.types import ImageContent

from mcp_imagegen.logs import configure_logging
from mcp_imagegen.work import watch_event_loop

GATEWAYS: dict[str, str] = json.loads(os.environ.get("BARE_GATEWAYS", "{}"))
API_KEY = os.environ.get("BARE_API_KEY", "")
OUTPUT_DIR = Path(os.environ.get("BARE_OUTPUT_DIR", "."))

server: MCPServer = MCPServer("bench-bare-http")
_http: httpx2.AsyncClient | None = None
_background: set[asyncio.Task[None]] = set()


def _client() -> httpx2.AsyncClient:
    global _http
    if _http is None:
        # Started here, inside the serving loop, on the warm-up call (before any timed batch).
        _background.add(asyncio.get_running_loop().create_task(watch_event_loop()))
        _http = httpx2.AsyncClient(
            timeout=httpx2.Timeout(30, read=300),
            limits=httpx2.Limits(max_connections=512, max_keepalive_connections=128),
        )
    return _http


@server.tool()
async def generate_image(
    prompt: str, model: str, endpoint: str, n: int = 1, size: str = "1024x1024"
) -> list[ImageContent]:
    """POST the prompt to the named gateway; return its images."""
    response = await _client().post(
        f"{GATEWAYS[endpoint]}/images/generations",
        json={"model": model, "prompt": prompt, "n": n, "size": size},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    response.raise_for_status()
    images = []
    for item in response.json()["data"]:
        (OUTPUT_DIR / f"bare-{secrets.token_hex(6)}.png").write_bytes(base64.b64decode(item["b64_json"]))
        images.append(ImageContent(type="image", data=item["b64_json"], mime_type="image/png"))
    return images


if __name__ == "__main__":
    configure_logging("DEBUG")  # the watchdog's lines; httpx2 and the SDK stay at WARNING
    app = server.streamable_http_app(json_response=False)
    # Served as mcp-imagegen serves: uvicorn's Server on an anyio-run asyncio loop.
    config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="on")
    anyio.run(uvicorn.Server(config).serve)
