"""Serving the MCP server: stdio, streamable HTTP (`/mcp`) and legacy SSE (`/sse`).

- stdio: stdout carries only the protocol; the SDK diverts file descriptor 1 to stderr while it
  serves, so a stray print cannot corrupt the stream, and every log line goes to stderr.
- streamable HTTP: SSE-framed responses (not `json_response`), so progress notifications reach the
  client; `stateless=True` for replicas behind a load balancer (no session affinity needed).
- legacy SSE: GET `/sse` plus POST `/messages/`.

Both network transports: DNS-rebinding protection (Host and Origin checked) on loopback binds; a
bearer token checked in constant time on every request when one is set (401 with
`WWW-Authenticate: Bearer` otherwise); a refusal to serve a non-loopback address without a token
unless `allow_unauthenticated`; request bodies up to `settings.max_request_body_mb` (413 beyond),
since `edit_image` arguments can carry base64 images; with `[oauth]` configured, OAuth access
tokens instead of the static token (oauth.py), else 404 for OAuth discovery documents. The image service is made and entered once per app in the ASGI lifespan, so background
jobs outlive the requests and sessions that started them. What protects them under abuse lives in
http_guard.py (connections: timeouts, the descriptor cap) and http_sessions.py (sessions per
client); requests the SDK cannot read are answered by rpc_errors.py, on stdio too.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from . import http_sessions
from .config import Settings
from .errors import ConfigError

log = logging.getLogger("mcp_imagegen.transports")

MCP_PATH = "/mcp"
SSE_PATH = "/sse"
MESSAGES_PATH = "/messages/"
WELL_KNOWN_PREFIX = "/.well-known/"


# --- checks ------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth_token: str | None, allow_unauthenticated: bool, oauth: bool = False) -> None:
    """Refuse to serve a non-loopback address without a token, unless explicitly allowed."""
    if auth_token is not None and not auth_token.strip():
        raise ConfigError("the auth token is empty; give a non-empty token or none")
    if auth_token and oauth:
        raise ConfigError(
            "both a static auth token and [oauth] are configured; a server signs people in one way: "
            "drop --auth-token (and MCP_IMAGEGEN_AUTH_TOKEN) or the [oauth] table"
        )
    if auth_token or oauth or is_loopback(host) or allow_unauthenticated:
        return
    raise ConfigError(
        f"refusing to serve {host!r} without authentication: anyone who can reach this address could "
        "spend your image credits. Set --auth-token TOKEN (or MCP_IMAGEGEN_AUTH_TOKEN), bind to 127.0.0.1, "
        "or pass --allow-unauthenticated if an authenticating proxy guards the server."
    )


def transport_security(host: str, port: int) -> TransportSecuritySettings | None:
    """DNS-rebinding protection for loopback binds: only local Host and Origin headers pass.

    Non-loopback binds are reached under names this process cannot know; there the bearer token
    (which a rebinding page does not have) is the guard.
    """
    if not is_loopback(host):
        return None
    p = str(port) if port else "*"
    hosts = ["127.0.0.1", "localhost", "[::1]"]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{h}:{p}" for h in hosts],
        allowed_origins=[f"{scheme}://{h}:{p}" for scheme in ("http", "https") for h in hosts],
    )


class BearerAuthMiddleware:
    """Requires `Authorization: Bearer TOKEN` on every HTTP request (constant-time compare)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and scope["path"].startswith(WELL_KNOWN_PREFIX):
            # No OAuth here: a 401 on the discovery documents sends OAuth-capable clients (MCP
            # Inspector among them) looking for an authorization server that does not exist.
            await JSONResponse({"error": "not_found"}, status_code=404)(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        given = credentials.strip().encode()
        if scheme.lower() == "bearer" and given and hmac.compare_digest(given, self._token):
            await self.app(scope, receive, send)
            return
        error = "invalid_token" if header else "missing_token"
        challenge = 'Bearer realm="mcp-imagegen"' + (', error="invalid_token"' if header else "")
        response = JSONResponse(
            {"error": error, "error_description": "send 'Authorization: Bearer <token>' with the server's auth token"},
            status_code=401,
            headers={"WWW-Authenticate": challenge},
        )
        await response(scope, receive, send)


def _max_body(settings: Settings) -> int:
    return settings.max_request_body_mb * 1024 * 1024


def _with_service(app: Starlette, settings: Settings, service: Any, auth_token: str | None) -> Starlette:
    """Enter the service around the app's own lifespan, and guard every request with the token."""
    from .http_guard import connection_limits, install_accept_error_log  # uvicorn's h11: HTTP only

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        restore = install_accept_error_log(asyncio.get_running_loop())
        try:
            async with service, inner(a) as state:
                yield state
        finally:
            restore()

    app.router.lifespan_context = lifespan
    app.state.imagegen_service = service  # the drain on SIGTERM needs it (shutdown.py)
    from .shutdown import DrainGate

    app.add_middleware(DrainGate, service=service)
    # Read by uvicorn_config: whoever serves this app gets its connection limits.
    app.state.connection_limits = connection_limits(settings.request_read_timeout_s)
    if settings.oauth is not None:
        from .oauth import OAuthMiddleware

        app.add_middleware(OAuthMiddleware, oauth=settings.oauth, max_body=_max_body(settings))
    elif auth_token:
        app.add_middleware(BearerAuthMiddleware, token=auth_token)
    from .health import HealthRoutes

    app.add_middleware(HealthRoutes, service=service)  # outermost: probes carry no token
    return app


def _lowlevel(server: Any) -> Any:
    # The SDK's low-level Server behind MCPServer: the transports below are assembled here (for
    # per-client limits and error answers), and they drive it the way MCPServer's own do.
    return server._lowlevel_server


# --- ASGI apps ---------------------------------------------------------------------------------


def _served(
    settings: Settings, host: str, auth_token: str | None, allow_unauthenticated: bool, service: Any | None
) -> tuple[Any, Any]:
    """The service and MCP server behind a network app, once the bind is known to be safe."""
    from .server import build_server
    from .service import ImageService

    check_bind(host, auth_token, allow_unauthenticated, oauth=settings.oauth is not None)
    service = service or ImageService(settings)
    return service, build_server(settings, service)


def http_app(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    auth_token: str | None = None,
    stateless: bool = False,
    allow_unauthenticated: bool = False,
    service: Any | None = None,
) -> Starlette:
    """Streamable HTTP at /mcp, with SSE-framed responses so progress notifications flow."""
    service, server = _served(settings, host, auth_token, allow_unauthenticated, service)
    app = http_sessions.streamable_http_app(
        _lowlevel(server),
        path=MCP_PATH,
        stateless=stateless,
        max_request_body_size=_max_body(settings),
        security=transport_security(host, port),
        session_idle_timeout_s=settings.session_idle_timeout_s,
        max_sessions_per_client=settings.max_sessions_per_client,
    )
    return _with_service(app, settings, service, auth_token)


def sse_app(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    auth_token: str | None = None,
    allow_unauthenticated: bool = False,
    service: Any | None = None,
) -> Starlette:
    """Legacy SSE: GET /sse opens the stream, POST /messages/?session_id=... carries requests."""
    service, server = _served(settings, host, auth_token, allow_unauthenticated, service)
    app = http_sessions.sse_app(
        _lowlevel(server),
        sse_path=SSE_PATH,
        message_path=MESSAGES_PATH,
        max_request_body_size=_max_body(settings),
        security=transport_security(host, port),
        max_streams_per_client=settings.max_sessions_per_client,
    )
    return _with_service(app, settings, service, auth_token)


# --- running -------------------------------------------------------------------------------------


def uvicorn_log_config() -> dict[str, Any]:
    """Uvicorn's logging with the access log on stderr too (its default puts it on stdout)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for handler in config.get("handlers", {}).values():
        if handler.get("stream") == "ext://sys.stdout":
            handler["stream"] = "ext://sys.stderr"
    return config


async def _serve_uvicorn(app: Starlette, host: str, port: int, *, transport: str, path: str) -> None:
    from .heap import resume_collections
    from .shutdown import draining_server

    resume_collections()  # start-up is over (cli.main paused them)

    def announce(server: Any) -> None:
        # The person who started the server needs to know where it listens (the port may have
        # been 0), whatever the log level; stderr never carries protocol.
        bound = [s.getsockname()[1] for listener in server.servers for s in listener.sockets]
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{bound[0] if bound else port}{path}"
        print(f"mcp-imagegen: serving MCP ({transport}) at {url}; press Ctrl+C to stop", file=sys.stderr)
        sys.stderr.flush()

    await draining_server(uvicorn_config(app, host, port), app.state.imagegen_service, announce).serve()


def uvicorn_config(app: Starlette, host: str, port: int) -> Any:
    """How uvicorn serves the HTTP transports (a uvicorn.Config)."""
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - uvicorn comes with the SDK's HTTP extras
        raise ConfigError("the HTTP transports need uvicorn: pip install uvicorn") from None
    from .http_guard import connection_limits, guarded_protocol

    level = logging.getLogger("mcp_imagegen").getEffectiveLevel()
    limits = getattr(app.state, "connection_limits", None) or connection_limits(20.0)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),  # header and body timeouts, the connection cap (http_guard.py)
        backlog=limits.backlog,
        log_config=uvicorn_log_config(),
        log_level="info" if level <= logging.INFO else "warning",
        lifespan="on",
        timeout_graceful_shutdown=5,
        # uvicorn's 5 s equals httpx's idle expiry, so a client calling again ~5 s after its last
        # call could send on a connection being closed and get a read error. Load balancers idle
        # out after 60 s; staying open longer than clients and proxies leaves the closing to them.
        timeout_keep_alive=75,
    )


async def serve_stdio(settings: Settings) -> None:
    """The stdio server itself (behind the relay on POSIX, see relay.py): when the client goes,
    it finishes and saves the gateway requests already sent before it exits (shutdown.py)."""
    from .shutdown import serve_stdio_until_done

    await serve_stdio_until_done(settings)


async def serve_http(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    auth_token: str | None = None,
    stateless: bool = False,
    allow_unauthenticated: bool = False,
) -> None:
    app = http_app(
        settings,
        host=host,
        port=port,
        auth_token=auth_token,
        stateless=stateless,
        allow_unauthenticated=allow_unauthenticated,
    )
    await _serve_uvicorn(app, host, port, transport="streamable HTTP", path=MCP_PATH)


async def serve_sse(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    auth_token: str | None = None,
    allow_unauthenticated: bool = False,
) -> None:
    app = sse_app(settings, host=host, port=port, auth_token=auth_token, allow_unauthenticated=allow_unauthenticated)
    await _serve_uvicorn(app, host, port, transport="legacy SSE", path=SSE_PATH)


def _run(main: Any, *args: Any, **kwargs: Any) -> None:
    try:
        anyio.run(lambda: main(*args, **kwargs))
    except KeyboardInterrupt:
        pass


def run_stdio(settings: Settings) -> None:
    """Serve MCP over stdin/stdout until the client closes stdin."""
    _run(serve_stdio, settings)


def run_http(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    auth_token: str | None = None,
    stateless: bool = False,
    allow_unauthenticated: bool = False,
) -> None:
    """Serve streamable HTTP at http://HOST:PORT/mcp. Raises ConfigError for an unsafe bind."""
    check_bind(host, auth_token, allow_unauthenticated, oauth=settings.oauth is not None)
    _run(
        serve_http,
        settings,
        host=host,
        port=port,
        auth_token=auth_token,
        stateless=stateless,
        allow_unauthenticated=allow_unauthenticated,
    )


def run_sse(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    auth_token: str | None = None,
    allow_unauthenticated: bool = False,
) -> None:
    """Serve legacy SSE at http://HOST:PORT/sse. Raises ConfigError for an unsafe bind."""
    check_bind(host, auth_token, allow_unauthenticated, oauth=settings.oauth is not None)
    _run(serve_sse, settings, host=host, port=port, auth_token=auth_token, allow_unauthenticated=allow_unauthenticated)
