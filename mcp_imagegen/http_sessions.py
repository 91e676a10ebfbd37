"""MCP sessions over HTTP, limited per client so one flooding client cannot lock out the others.

A client is a credential (the Authorization header, hashed) at a peer address (after uvicorn's
proxy-header handling, so a local reverse proxy passes the real peer on). Each client may hold
`max_sessions_per_client` streamable HTTP sessions and as many legacy SSE streams; past that it
gets a 429 with a JSON-RPC error body and Retry-After, and nobody else notices. The SDK closes a
streamable HTTP session that has had no request in flight for `session_idle_timeout_s`.

Both apps are built here rather than by `MCPServer`, because the SDK's session manager counts
sessions only in total (10,000 by default: one client could take them all) and its SSE endpoint
drops requests it cannot parse; unreadable requests get their error answer (see rpc_errors.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

import anyio
from mcp.server.auth.middleware.bearer_auth import AuthorizationContext
from mcp.server.sse import SseServerTransport
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from .rpc_errors import AnsweringReadStream, RequestIdInErrors

log = logging.getLogger("mcp_imagegen.http_sessions")

ClientKey = tuple[str, str]  # (credential fingerprint, peer host)
_REFUSAL_LOG_EVERY_S = 60.0


def client_key(scope: Scope) -> ClientKey:
    authorization = Headers(scope=scope).get("authorization", "")
    credential = hashlib.sha256(authorization.encode()).hexdigest()[:16] if authorization else "-"
    client = scope.get("client")
    return credential, (client[0] if client else "unknown")


def too_many_sessions(limit: int, retry_after_s: int, *, streams: bool = False) -> JSONResponse:
    if streams:
        message = (
            f"this client already has {limit} open SSE streams, the most one client may hold; close streams "
            f"it no longer uses, then retry (in {retry_after_s} s at the latest)"
        )
    else:
        message = (
            f"this client already has {limit} open MCP sessions, the most one client may hold; close sessions "
            f"it no longer uses (an SDK client does on exit), or retry in {retry_after_s} s, when an idle one "
            "expires"
        )
    return JSONResponse(
        {"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": message}},
        status_code=429,
        headers={"Retry-After": str(retry_after_s)},
    )


class _RefusalLog:
    """One log line per client per minute: a flood must not flood the log too."""

    def __init__(self) -> None:
        self._next: dict[ClientKey, float] = {}

    def __call__(self, key: ClientKey, what: str, limit: int) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            return
        if len(self._next) > 10_000:
            self._next = {k: t for k, t in self._next.items() if t > now}
        self._next[key] = now + _REFUSAL_LOG_EVERY_S
        log.warning("refusing a new %s from %s: it already holds %d (the limit per client)", what, key[1], limit)


_current_client: ContextVar[ClientKey | None] = ContextVar("mcp_imagegen_http_client", default=None)


class _ClientAtLimit(Exception):
    def __init__(self, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s


class PerClientSessionManager(StreamableHTTPSessionManager):
    """The SDK's session manager, with a session count per client on top of its total.

    Admission is decided in `_admit_session`, which the SDK calls under its session-creation
    lock, so concurrent opening requests from one client cannot overshoot the limit.
    """

    def __init__(self, *args: Any, max_sessions_per_client: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_sessions_per_client = max_sessions_per_client
        self._sessions_of: dict[ClientKey, set[str]] = {}
        self._client_of: dict[str, ClientKey] = {}
        self._refusals = _RefusalLog()

    def sessions_of(self, key: ClientKey) -> int:
        return len(self._sessions_of.get(key, ()))

    async def _handle_stateful_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = client_key(scope)
        token = _current_client.set(key)
        try:
            await super()._handle_stateful_request(scope, receive, send)
        except _ClientAtLimit as refused:
            self._refusals(key, "session", self.max_sessions_per_client)
            await too_many_sessions(self.max_sessions_per_client, refused.retry_after_s)(scope, receive, send)
        finally:
            _current_client.reset(token)

    def _admit_session(self, requestor: AuthorizationContext | None) -> StreamableHTTPServerTransport | None:
        key = _current_client.get()
        held = self._sessions_of.get(key, set()) if key is not None else set()
        if len(held) >= self.max_sessions_per_client:
            raise _ClientAtLimit(self._retry_after(held))
        transport = super()._admit_session(requestor)
        if transport is not None and key is not None and transport.mcp_session_id is not None:
            self._sessions_of.setdefault(key, set()).add(transport.mcp_session_id)
            self._client_of[transport.mcp_session_id] = key
        return transport

    async def _discard_session(self, session_id: str, transport: StreamableHTTPServerTransport) -> None:
        key = self._client_of.pop(session_id, None)
        if key is not None:
            held = self._sessions_of.get(key)
            if held is not None:
                held.discard(session_id)
                if not held:
                    del self._sessions_of[key]
        await super()._discard_session(session_id, transport)

    def _retry_after(self, session_ids: Iterable[str]) -> int:
        """Seconds until the first of these sessions expires if it stays idle."""
        deadlines = []
        for session_id in session_ids:
            transport = self._server_instances.get(session_id)
            scope = transport.idle_scope if transport is not None else None
            if scope is not None:
                deadlines.append(scope.deadline)
        soonest = min(deadlines, default=math.inf)
        if math.isfinite(soonest):
            return max(1, math.ceil(soonest - anyio.current_time()))
        return max(1, math.ceil(self.session_idle_timeout or 60))


def streamable_http_app(
    lowlevel: Any,
    *,
    path: str,
    stateless: bool,
    max_request_body_size: int,
    security: TransportSecuritySettings | None,
    session_idle_timeout_s: float,
    max_sessions_per_client: int,
) -> Starlette:
    """What `MCPServer.streamable_http_app` builds (without OAuth), with the per-client manager."""
    manager = PerClientSessionManager(
        app=lowlevel,
        json_response=False,  # SSE-framed responses, so progress notifications reach the client
        stateless=stateless,
        security_settings=security,
        max_request_body_size=max_request_body_size,
        session_idle_timeout=session_idle_timeout_s,
        max_sessions_per_client=max_sessions_per_client,
    )
    endpoint = RequestIdInErrors(StreamableHTTPASGIApp(manager))
    app = Starlette(routes=[Route(path, endpoint=endpoint)], lifespan=lambda _app: manager.run())
    app.state.session_manager = manager
    return app


class _SseEndpoint:
    """GET /sse: one SSE stream (a session) per request, counted per client."""

    def __init__(self, lowlevel: Any, transport: SseServerTransport, max_streams_per_client: int) -> None:
        self._lowlevel = lowlevel
        self._transport = transport
        self._limit = max_streams_per_client
        self.open_streams: Counter[ClientKey] = Counter()
        self._refusals = _RefusalLog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = client_key(scope)
        if self.open_streams[key] >= self._limit:
            self._refusals(key, "SSE stream", self._limit)
            # A stream ends only when its client goes; nothing expires on a clock to point at.
            await too_many_sessions(self._limit, 60, streams=True)(scope, receive, send)
            return
        self.open_streams[key] += 1
        try:
            async with self._transport.connect_sse(scope, receive, send) as (read, write):
                await self._lowlevel.run(
                    AnsweringReadStream(read, write), write, self._lowlevel.create_initialization_options()
                )
        finally:
            self.open_streams[key] -= 1
            if self.open_streams[key] <= 0:
                del self.open_streams[key]


def sse_app(
    lowlevel: Any,
    *,
    sse_path: str,
    message_path: str,
    max_request_body_size: int,
    security: TransportSecuritySettings | None,
    max_streams_per_client: int,
) -> Starlette:
    """What `MCPServer.sse_app` builds (without OAuth), with per-client stream limits."""
    transport = SseServerTransport(
        message_path, security_settings=security, max_request_body_size=max_request_body_size
    )
    endpoint = _SseEndpoint(lowlevel, transport, max_streams_per_client)
    app = Starlette(
        routes=[
            Route(sse_path, endpoint=endpoint, methods=["GET"]),
            Mount(message_path, app=transport.handle_post_message),
        ]
    )
    app.state.sse_endpoint = endpoint
    return app
