"""A stand-in for an MCP Apps host, for driving the image studio in a real browser.

Two loopback origins, as a real host keeps them apart:
- the host page (`host_url`) holds the app in an iframe sandboxed with `allow-scripts` only (no
  `allow-same-origin`), answers the app's `ui/*` requests itself, and forwards `tools/call` and
  `resources/read` to `/rpc`, where the SDK's real `Client` passes them to the real server;
- the app origin serves the `ui://` resource's HTML exactly as the server returned it, under the CSP
  a host builds from the resource's declared `_meta.ui.csp` (the spec's default, plus any domains).

`window.host` in the host page records what the app told the host (model context, downloads) and
`window.host.deliver(args, result)` hands the app a tool's input and result, as a host does after
the model called the tool.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from mcp.client import Client
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mcp_imagegen.studio import APP_URI

HOST_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>MCP Apps host stub</title>
<style>body{margin:0;font:13px system-ui} iframe{border:0;width:100%;height:100vh;display:block}</style>
</head><body>
<iframe id="app" sandbox="allow-scripts" src="__APP_URL__" title="image studio"></iframe>
<script>
"use strict";
const frame = document.getElementById("app");
const host = window.host = { initialized: false, modelContext: [], downloads: [], queued: [], sizes: 0 };
function send(message) { frame.contentWindow.postMessage(message, "*"); }
function reply(id, result) { send({ jsonrpc: "2.0", id, result }); }
function fail(id, error) { send({ jsonrpc: "2.0", id, error }); }
host.deliver = (args, result) => {
  const out = [
    { jsonrpc: "2.0", method: "ui/notifications/tool-input", params: { arguments: args } },
    { jsonrpc: "2.0", method: "ui/notifications/tool-result", params: result },
  ];
  if (host.initialized) out.forEach(send); else host.queued.push(...out);
};
window.addEventListener("message", async (event) => {
  if (event.source !== frame.contentWindow) return;
  const m = event.data;
  if (!m || m.jsonrpc !== "2.0" || !m.method) return;
  switch (m.method) {
    case "ui/initialize":
      return reply(m.id, {
        protocolVersion: m.params.protocolVersion,
        hostInfo: { name: "host-stub", version: "1" },
        hostCapabilities: { serverTools: {}, serverResources: {}, updateModelContext: { text: {} }, downloadFile: {} },
        hostContext: { theme: "light", displayMode: "inline" },
      });
    case "ui/notifications/initialized":
      host.initialized = true;
      host.queued.splice(0).forEach(send);
      return;
    case "ui/notifications/size-changed":
      host.sizes += 1;
      return;
    case "ui/update-model-context":
      host.modelContext.push(m.params);
      return reply(m.id, {});
    case "ui/download-file":
      host.downloads.push(m.params);
      return reply(m.id, {});
    case "tools/call":
    case "resources/read": {
      const answer = await (await fetch("/rpc", { method: "POST", body: JSON.stringify({ method: m.method, params: m.params }) })).json();
      return answer.error ? fail(m.id, answer.error) : reply(m.id, answer.result);
    }
    default:
      if (m.id !== undefined) fail(m.id, { code: -32601, message: "host stub: no " + m.method });
  }
});
</script></body></html>
"""


def app_csp(declared: dict[str, Any] | None) -> str:
    """The CSP a host puts on the app's document: the spec's default plus the declared domains."""
    declared = declared or {}
    resources = " ".join(declared.get("resourceDomains") or [])
    connect = " ".join(declared.get("connectDomains") or []) or "'none'"
    return (
        "default-src 'none'; "
        f"script-src 'self' 'unsafe-inline' {resources}; style-src 'self' 'unsafe-inline' {resources}; "
        f"img-src 'self' data: {resources}; font-src 'self' {resources}; media-src 'self' data: {resources}; "
        f"connect-src {connect}; frame-src 'none'; base-uri 'self'"
    )


@dataclass
class HostStub:
    host_url: str
    app_url: str
    csp: str
    calls: list[dict[str, Any]] = field(default_factory=list)  # every tools/call the app made


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def _dump(result: Any) -> dict[str, Any]:
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


@asynccontextmanager
async def host_stub(client: Client) -> AsyncIterator[HostStub]:
    """Serve the host page and the app on two loopback origins, bridged to `client`."""
    page = await client.read_resource(APP_URI)
    [content] = page.contents
    html = content.text
    declared = (content.meta or {}).get("ui", {}).get("csp")
    sockets = [_bound_socket(), _bound_socket()]
    host_port, app_port = (sock.getsockname()[1] for sock in sockets)
    stub = HostStub(
        host_url=f"http://127.0.0.1:{host_port}/",
        app_url=f"http://127.0.0.1:{app_port}/app.html",
        csp=app_csp(declared),
    )

    async def host_page(_: Request) -> Response:
        return HTMLResponse(HOST_PAGE.replace("__APP_URL__", stub.app_url))

    async def rpc(request: Request) -> Response:
        body = json.loads(await request.body())
        params = body.get("params") or {}
        try:
            if body["method"] == "tools/call":
                stub.calls.append({"name": params["name"], "arguments": params.get("arguments") or {}})
                result = await client.call_tool(params["name"], params.get("arguments") or {})
            else:
                result = await client.read_resource(params["uri"])
        except MCPError as exc:
            return JSONResponse({"error": {"code": exc.error.code, "message": exc.error.message}})
        return JSONResponse({"result": await _dump(result)})

    async def app_page(_: Request) -> Response:
        return HTMLResponse(html, headers={"Content-Security-Policy": stub.csp})

    async def no_icon(_: Request) -> Response:
        return Response(status_code=204)  # browsers ask; a 404 would read as an error in the console

    icon = Route("/favicon.ico", no_icon)
    host_app = Starlette(routes=[Route("/", host_page), Route("/rpc", rpc, methods=["POST"]), icon])
    app_app = Starlette(routes=[Route("/app.html", app_page), icon])

    async def by_origin(scope: Any, receive: Any, send: Any) -> None:
        await (host_app if scope["server"][1] == host_port else app_app)(scope, receive, send)

    # One server listening on both origins' sockets: uvicorn saves and restores the process's
    # signal handlers per server, and two at once in one thread would leave a stale handler behind
    # (which sse-starlette then reads as "shutting down" in every later server of the process).
    server = uvicorn.Server(uvicorn.Config(by_origin, log_config=None, log_level="warning", lifespan="off"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: server.serve(sockets=sockets))
        with anyio.fail_after(30):
            while not server.started:
                await anyio.sleep(0.02)
        try:
            yield stub
        finally:
            server.should_exit = True
