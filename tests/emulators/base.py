"""Shared machinery of the gateway emulators.

An `Emulator` is a Starlette app served by uvicorn on 127.0.0.1 in a background thread (or in the
foreground for `python -m tests.emulators`). Subclasses describe one gateway's dialect: its routes,
validation, success bodies and error bodies. Everything else lives here: request recording, auth,
latency, fault injection, image production and the signed-URL file store.

Request pipeline of every gateway route:
    record -> latency_s -> "delay" fault -> replacing fault (status, drop, ...) or the handler
           -> wire fault (drip, truncated JSON) -> response
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, NamedTuple

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import images

DEFAULT_API_KEY = "sk-emulator-test-key"

# Bytes served for the "not_image" fault: they decode fine but are HTML, as a misrouted CDN answers.
NOT_AN_IMAGE = b"<html><body><h1>Access denied</h1><p>This is not an image.</p></body></html>"
# Characters outside the base64 alphabet, so a strict decoder must fail.
INVALID_B64 = "iVBORw0KGgo!!!not*base64###"


# ---------------------------------------------------------------------------------------------
# Recorded requests


class UploadedFile(NamedTuple):
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class RecordedRequest:
    """One request as the emulator saw it. Appended to `Emulator.requests` on arrival."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    json: Any = None  # the parsed JSON body, when the body was JSON
    json_error: str | None = None  # why a body sent as JSON did not parse
    form: dict[str, str] = field(default_factory=dict)  # text fields of a form (last value wins)
    files: dict[str, list[UploadedFile]] = field(default_factory=dict)  # file parts by field name
    form_fields: list[str] = field(default_factory=list)  # every part's name, in order
    form_error: str | None = None
    received_at: float = field(default_factory=time.time)
    status: int | None = None  # status answered; stays None when the connection was dropped
    faults: list[str] = field(default_factory=list)  # kinds of the faults applied to this request

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


# ---------------------------------------------------------------------------------------------
# Faults


@dataclass(frozen=True)
class Fault:
    """A misbehaviour to apply to a coming request. Build with the class methods, e.g.
    `Fault.http(503, retry_after=2)`, `Fault.drip(3.0)`, `Fault.drop()`."""

    kind: str
    status: int = 500  # "status": the HTTP status; "http200_error": the status the body claims
    seconds: float = 0.0  # "delay" and "drip"
    chunks: int = 10  # "drip": how many pieces the body is sent in
    retry_after: float | str | None = None  # "status": Retry-After header value
    retry_after_ms: int | None = None  # "status": retry-after-ms header value
    message: str | None = None  # "status"/"http200_error": overrides the gateway's message
    code: str | None = None  # "status"/"http200_error": error code, e.g. "insufficient_quota"
    body: Any = None  # "status"/"invalid_json": the exact body (dict -> JSON, str/bytes raw)
    size_mb: float = 60.0  # "huge": MiB of JSON to stream
    content_length: bool = False  # "huge": announce the length instead of chunked encoding

    @classmethod
    def http(
        cls,
        status: int,
        *,
        retry_after: float | str | None = None,
        retry_after_ms: int | None = None,
        message: str | None = None,
        code: str | None = None,
        body: Any = None,
    ) -> Fault:
        """Answer `status` with the gateway's own error body (or `body`)."""
        return cls(
            "status",
            status=status,
            retry_after=retry_after,
            retry_after_ms=retry_after_ms,
            message=message,
            code=code,
            body=body,
        )

    @classmethod
    def rate_limit(cls, retry_after: float | str | None = 1, retry_after_ms: int | None = None) -> Fault:
        return cls.http(429, retry_after=retry_after, retry_after_ms=retry_after_ms)

    @classmethod
    def quota(cls) -> Fault:
        """429 that says the quota is exhausted (not worth retrying)."""
        return cls.http(429, code="insufficient_quota")

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Sleep before sending headers, then answer normally."""
        return cls("delay", seconds=seconds)

    @classmethod
    def drip(cls, seconds: float, chunks: int = 10) -> Fault:
        """Send the normal answer's body in `chunks` pieces spread over `seconds`."""
        return cls("drip", seconds=seconds, chunks=max(1, chunks))

    @classmethod
    def truncated_json(cls) -> Fault:
        """The normal answer cut in half (Content-Length matches the cut body)."""
        return cls("truncated_json")

    @classmethod
    def invalid_json(cls, body: str | bytes | None = None) -> Fault:
        """HTTP 200, Content-Type application/json, a body that is not JSON."""
        return cls("invalid_json", body=body)

    @classmethod
    def http200_error(cls, message: str | None = None, code: str | None = None, status: int = 500) -> Fault:
        """Relay style: HTTP 200 whose body is the gateway's error body."""
        return cls("http200_error", status=status, message=message, code=code)

    @classmethod
    def invalid_b64(cls) -> Fault:
        """`b64_json` values that are not valid base64 (b64_json answers only)."""
        return cls("invalid_b64")

    @classmethod
    def not_image(cls) -> Fault:
        """Image payloads (b64 or served at the URL) that decode but are HTML, not an image."""
        return cls("not_image")

    @classmethod
    def url_404(cls) -> Fault:
        """Result URLs that answer 404 NoSuchKey (url answers only)."""
        return cls("url_404")

    @classmethod
    def url_expired(cls) -> Fault:
        """Signed result URLs whose expiry has passed: 403 with S3's XML (url answers only)."""
        return cls("url_expired")

    @classmethod
    def data_url(cls) -> Fault:
        """`url` values that are `data:image/...;base64,...` URLs (url answers only)."""
        return cls("data_url")

    @classmethod
    def url_fallback(cls) -> Fault:
        """`b64_json` instead of the `url` asked for (nano-gpt's presign fallback)."""
        return cls("url_fallback")

    @classmethod
    def huge(cls, size_mb: float = 60.0, content_length: bool = False) -> Fault:
        """A streamed JSON body of `size_mb` MiB (chunked unless content_length=True)."""
        return cls("huge", size_mb=size_mb, content_length=content_length)

    @classmethod
    def drop(cls) -> Fault:
        """Close the connection without sending any response."""
        return cls("drop")


# Which faults act at which step of the pipeline.
DELAY_KINDS = frozenset({"delay"})
REPLACE_KINDS = frozenset({"status", "http200_error", "invalid_json", "huge", "drop"})
WIRE_KINDS = frozenset({"drip", "truncated_json"})
B64_PAYLOAD_KINDS = frozenset({"invalid_b64", "not_image"})
URL_PAYLOAD_KINDS = frozenset({"not_image", "url_404", "url_expired", "data_url", "url_fallback"})
ALL_KINDS = DELAY_KINDS | REPLACE_KINDS | WIRE_KINDS | B64_PAYLOAD_KINDS | URL_PAYLOAD_KINDS


@dataclass
class _Pending:
    fault: Fault
    path: str | None
    remaining: int | None  # None: until cleared


# ---------------------------------------------------------------------------------------------
# Handler plumbing


class GatewayError(Exception):
    """Raised by handlers; each emulator renders it in its gateway's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


@dataclass
class Reply:
    """What a handler answers; turned into a Starlette response after wire faults."""

    status: int = 200
    body: Any = None  # dict/list -> JSON; bytes/str -> sent as is
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    stream: Callable[[], AsyncIterator[bytes]] | None = None  # a streamed body instead of `body`

    def encoded(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body, separators=(",", ":")).encode()


@dataclass
class Call:
    """One request being handled."""

    request: Request
    rec: RecordedRequest
    image_route: bool

    @property
    def path(self) -> str:
        return self.rec.path


Handler = Callable[[Call], Awaitable[Reply]]


@dataclass
class _StoredFile:
    data: bytes
    content_type: str
    signature: str
    expires_at: float | None  # None: valid while the emulator runs


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_size(size: str) -> tuple[int, int]:
    w, _, h = size.partition("x")
    return int(w), int(h)


def mask_key(key: str) -> str:
    """How gateways echo a wrong key: never in full."""
    return key[:3] + "***" if len(key) > 6 else "***"


def _s3_error(code: str, message: str, **extra: str) -> bytes:
    parts = "".join(f"<{k}>{v}</{k}>" for k, v in extra.items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>{parts}"
        f"<RequestId>{secrets.token_hex(8).upper()}</RequestId></Error>"
    ).encode()


def _amz_date(t: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


class _Server(uvicorn.Server):
    """uvicorn server that reports when it is listening."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_ready()


# ---------------------------------------------------------------------------------------------
# The emulator


class Emulator:
    """Base of the gateway emulators. Subclasses set `provider_id`, `routes_spec()`,
    `render_error()` and `status_error()`."""

    provider_id: ClassVar[str] = ""
    api_prefix: ClassVar[str] = "/v1"
    default_auth_required: ClassVar[bool] = True

    def __init__(
        self,
        api_key: str | None = DEFAULT_API_KEY,
        *,
        auth_required: bool | None = None,
        latency_s: float = 0.0,
        image_kind: str = "flat",
        host: str = "127.0.0.1",
        port: int = 0,
        max_recorded: int = 500,
        log_level: str = "warning",
    ) -> None:
        self.api_key = api_key  # None: any non-empty bearer token is accepted
        self.auth_required = self.default_auth_required if auth_required is None else auth_required
        self.latency_s = latency_s
        self.image_kind = image_kind  # "flat" (tiny PNGs) or "photo" (~2.8 MB per 1024x1024 PNG)
        self.host = host
        self.port = port
        self.max_recorded = max_recorded
        self.log_level = log_level

        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._faults: list[_Pending] = []
        self._override: tuple[bytes, int | None] | None = None
        self._files: dict[str, _StoredFile] = {}
        self.in_flight = 0
        self.max_in_flight = 0  # highest number of concurrent requests seen (for client-limit tests)
        self._open = threading.Event()  # cleared by hold(): gateway answers wait for release()
        self._open.set()

        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.app = Starlette(routes=self._build_routes())

    @property
    def image_kind(self) -> str:
        return self._image_kind

    @image_kind.setter
    def image_kind(self, kind: str) -> None:
        if kind not in ("flat", "photo"):
            raise ValueError(f"image_kind must be 'flat' or 'photo', not {kind!r}")
        self._image_kind = kind

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.origin + self.api_prefix

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Real gateways' front ends send small answers at once. Without this, Nagle's algorithm
        # holds the body behind the headers until the client's delayed ACK (~40 ms) on a reused
        # connection, which would dwarf everything the benchmarks measure. Accepted sockets
        # inherit the option on Linux.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]  # the real port when 0 was asked for
        return sock

    def _make_server(self, on_ready: Callable[[], None]) -> _Server:
        config = uvicorn.Config(
            self._asgi,
            log_config=None,  # leave the host process's logging alone
            log_level=self.log_level,
            access_log=False,
            lifespan="off",
            interface="asgi3",
            proxy_headers=False,
            http="h11",
            ws="none",
            timeout_graceful_shutdown=1,
            # Real front ends keep idle connections for about a minute (nginx: 75 s). uvicorn's
            # 5 s would close them between a benchmark's batches, racing the client's reuse.
            timeout_keep_alive=75,
        )
        return _Server(config, on_ready)

    def start(self) -> Emulator:
        if self._thread is not None:
            return self
        sock = self._bind()
        self._ready.clear()
        self._server = self._make_server(self._ready.set)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"emulator-{self.provider_id}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._ready.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._thread = None
                raise RuntimeError(f"{type(self).__name__} failed to start")
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(5)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5)
        self._thread = None
        self._server = None

    def serve_forever(self, on_ready: Callable[[Emulator], None] | None = None) -> None:
        """Run in the calling (main) thread until SIGINT/SIGTERM."""
        sock = self._bind()
        server = self._make_server(lambda: on_ready(self) if on_ready else None)
        server.run(sockets=[sock])

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state shared with the test thread ------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests, oldest first (file downloads included)."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path_part: str) -> list[RecordedRequest]:
        return [r for r in self.requests if path_part in r.path]

    @property
    def last_request(self) -> RecordedRequest | None:
        with self._lock:
            return self._requests[-1] if self._requests else None

    def inject(self, fault: Fault | str, times: int | None = 1, path: str | None = None, **params: Any) -> Fault:
        """Queue `fault` for the next `times` matching requests (None: until `clear_faults`).

        `path=None` matches the image routes (generations, edits); any other string matches
        requests whose path contains it (e.g. "/files/" for downloads, "/models"), "*" matches all.
        A string fault is a kind with keyword parameters: `inject("drip", seconds=2)`.
        """
        if isinstance(fault, str):
            fault = Fault(kind=fault, **params)
        elif params:
            fault = replace(fault, **params)
        if fault.kind not in ALL_KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}; known: {sorted(ALL_KINDS)}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1, or None for 'until cleared'")
        with self._lock:
            self._faults.append(_Pending(fault, path, times))
        return fault

    @property
    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return [p.fault for p in self._faults]

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def set_image(self, data: bytes | None, times: int | None = None) -> None:
        """Answer the next `times` image requests (None: all, until cleared) with `data` as every
        image, instead of a generated one. `set_image(None)` clears it."""
        with self._lock:
            self._override = None if data is None else (data, times)

    def hold(self) -> None:
        """Keep every gateway answer (not file downloads) waiting until `release()`: a test can then
        act while requests are certainly in flight, without guessing how long they take."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def served(self, path_part: str) -> int:
        """How many requests to `path_part` were answered 200 (billed, by a real gateway)."""
        return sum(1 for r in self.requests_to(path_part) if r.status == 200)

    def reset(self) -> None:
        """Forget recorded requests, queued faults and the image override (settings stay)."""
        with self._lock:
            self._requests.clear()
            self._faults.clear()
            self._override = None
            self.max_in_flight = self.in_flight

    def _take_fault(self, call: Call, kinds: frozenset[str]) -> Fault | None:
        with self._lock:
            for i, pending in enumerate(self._faults):
                if pending.fault.kind not in kinds:
                    continue
                if pending.path is None:
                    if not call.image_route:
                        continue
                elif pending.path != "*" and pending.path not in call.path:
                    continue
                if pending.remaining is not None:
                    pending.remaining -= 1
                    if pending.remaining <= 0:
                        del self._faults[i]
                call.rec.faults.append(pending.fault.kind)
                return pending.fault
        return None

    def _take_override(self) -> bytes | None:
        with self._lock:
            if self._override is None:
                return None
            data, times = self._override
            if times is not None:
                self._override = (data, times - 1) if times > 1 else None
            return data

    # -- routing --------------------------------------------------------------------------------

    def routes_spec(self) -> list[tuple[str, list[str], Handler, bool]]:
        """(path, methods, handler, is_image_route) for each gateway route."""
        raise NotImplementedError

    def _build_routes(self) -> list[Route]:
        routes = [
            Route(path, _Endpoint(self, handler, image_route), methods=methods)
            for path, methods, handler, image_route in self.routes_spec()
        ]
        routes.append(Route("/files/{name}", _Endpoint(self, self._serve_file, False), methods=["GET", "HEAD"]))
        # Anything else is answered in the gateway's own error shape, like the real thing.
        all_methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
        routes.append(Route("/{rest:path}", _Endpoint(self, self._not_found, False), methods=all_methods))
        return routes

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Keep uvicorn's own `send` reachable: its cycle holds the transport the "drop" fault closes.
        scope["emulator.raw_send"] = send
        await self.app(scope, receive, send)

    async def _not_found(self, call: Call) -> Reply:
        return self.render_error(self.route_not_found(call))

    def route_not_found(self, call: Call) -> GatewayError:
        return GatewayError(404, f"Invalid URL ({call.rec.method} {call.path})", type="invalid_request_error")

    # -- dialect hooks ----------------------------------------------------------------------------

    def render_error(self, err: GatewayError) -> Reply:
        """The gateway's error body for `err`."""
        raise NotImplementedError

    def status_error(self, status: int, code: str | None, message: str | None) -> GatewayError:
        """The error the gateway sends with `status` (used by `Fault.http`)."""
        return GatewayError(status, message or f"HTTP {status}", code=code)

    def auth_error(self, token: str | None) -> GatewayError:
        """Missing (token None) or wrong key."""
        return GatewayError(401, "Invalid API key", type="authentication_error")

    # -- helpers for handlers -------------------------------------------------------------------

    def bearer_token(self, call: Call) -> str | None:
        header = call.request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""

    def check_auth(self, call: Call) -> bool:
        """Raise the gateway's 401 unless the request may proceed; True when a valid key was sent.

        With `auth_required=False` a request without a key passes, but a wrong key still fails."""
        token = self.bearer_token(call)
        if token is None:
            if self.auth_required:
                raise self.auth_error(None)
            return False
        if not token or (self.api_key is not None and token != self.api_key):
            raise self.auth_error(token)
        return True

    async def make_images(
        self,
        call: Call,
        *,
        n: int,
        width: int,
        height: int,
        response_format: str = "b64_json",
        fmt: str = "png",
        transparent: bool = False,
        quality: int | None = None,
    ) -> list[dict[str, str]]:
        """`n` result entries, each `{"b64_json": ...}` or `{"url": ...}`, with payload faults applied."""
        override = self._take_override()
        want_url = response_format == "url"
        fault = self._take_fault(call, URL_PAYLOAD_KINDS if want_url else B64_PAYLOAD_KINDS)
        kind = fault.kind if fault else None
        items: list[dict[str, str]] = []
        for i in range(n):
            if override is not None:
                data = override
            else:
                data = await anyio.to_thread.run_sync(
                    images.render, self.image_kind, width, height, fmt, i, transparent, quality
                )
            if kind == "not_image":
                data = NOT_AN_IMAGE
            if not want_url or kind == "url_fallback" or self.url_falls_back():
                b64 = INVALID_B64 if kind == "invalid_b64" else base64.b64encode(data).decode("ascii")
                items.append({"b64_json": b64})
            elif kind == "data_url":
                items.append({"url": images.to_data_url(data, images.MIME_TYPES.get(fmt))})
            else:
                content_type = images.MIME_TYPES.get(images.sniff(data) or fmt, "image/png")
                items.append(
                    {"url": self.publish(data, content_type, expired=kind == "url_expired", missing=kind == "url_404")}
                )
        return items

    def url_falls_back(self) -> bool:
        """Whether url requests get b64_json anyway (a gateway setting; nano-gpt only)."""
        return False

    def publish(
        self, data: bytes, content_type: str = "image/png", *, expired: bool = False, missing: bool = False
    ) -> str:
        """Store `data` and return a signed-looking URL for it on this emulator."""
        token = secrets.token_hex(16)
        signature = secrets.token_hex(32)
        now = time.time()
        signed_at = now - 7200 if expired else now
        if not missing:
            with self._lock:
                self._files[token] = _StoredFile(data, content_type, signature, now - 3600 if expired else None)
        ext = {v: k for k, v in images.MIME_TYPES.items()}.get(content_type, "png")
        day = time.strftime("%Y%m%d", time.gmtime(signed_at))
        return (
            f"{self.origin}/files/{token}.{images.EXTENSIONS.get(ext, 'png')}"
            f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=EMULATOR%2F{day}%2Fauto%2Fs3%2Faws4_request"
            f"&X-Amz-Date={_amz_date(signed_at)}&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
            f"&X-Amz-Signature={signature}"
        )

    async def _serve_file(self, call: Call) -> Reply:
        name = call.request.path_params["name"]
        token = name.rsplit(".", 1)[0]
        with self._lock:
            stored = self._files.get(token)
        xml = "application/xml"
        if stored is None:
            return Reply(404, _s3_error("NoSuchKey", "The specified key does not exist.", Key=name), xml)
        if call.rec.query.get("X-Amz-Signature") != stored.signature:
            return Reply(
                403,
                _s3_error(
                    "SignatureDoesNotMatch",
                    "The request signature we calculated does not match the signature you provided.",
                ),
                xml,
            )
        if stored.expires_at is not None and time.time() > stored.expires_at:
            expired_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stored.expires_at))
            return Reply(
                403,
                _s3_error(
                    "AccessDenied",
                    "Request has expired",
                    **{
                        "X-Amz-Expires": "3600",
                        "Expires": expired_at,
                        "ServerTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                ),
                xml,
            )
        return Reply(200, stored.data, stored.content_type, headers={"ETag": f'"{token}"'})

    # -- the pipeline ---------------------------------------------------------------------------

    async def _record(self, request: Request) -> RecordedRequest:
        body = await request.body()
        rec = RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=dict(request.query_params),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        ctype = rec.content_type.split(";")[0].strip().lower()
        if body and (ctype == "application/json" or ctype.endswith("+json")):
            try:
                rec.json = json.loads(body)
            except ValueError as exc:
                rec.json_error = str(exc)
        elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            try:
                form = await request.form(max_files=100, max_fields=100, max_part_size=8 * 1024 * 1024)
                for name, value in form.multi_items():
                    rec.form_fields.append(name)
                    if isinstance(value, UploadFile):
                        data = await value.read()
                        rec.files.setdefault(name, []).append(UploadedFile(value.filename, value.content_type, data))
                    else:
                        rec.form[name] = value
                await form.close()
            except Exception as exc:  # malformed multipart: the handler answers 400
                rec.form_error = str(exc) or type(exc).__name__
        with self._lock:
            self._requests.append(rec)
            if len(self._requests) > self.max_recorded:
                del self._requests[: len(self._requests) - self.max_recorded]
        return rec

    async def _run(self, request: Request, handler: Handler, image_route: bool, send: Send) -> Response | None:
        rec = await self._record(request)
        call = Call(request, rec, image_route)
        if handler != self._serve_file and self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        while handler != self._serve_file and not self._open.is_set():
            await asyncio.sleep(0.01)
        delay = self._take_fault(call, DELAY_KINDS)
        if delay is not None:
            await asyncio.sleep(delay.seconds)
        fault = self._take_fault(call, REPLACE_KINDS)
        if fault is not None and fault.kind == "drop":
            await _drop_connection(request.scope)
            return None
        if fault is not None:
            reply = self._fault_reply(fault)
        else:
            try:
                reply = await handler(call)
            except GatewayError as err:
                reply = self.render_error(err)
                reply.headers.update(err.headers)
        wire = self._take_fault(call, WIRE_KINDS)
        rec.status = reply.status
        return self._to_response(reply, wire)

    def _fault_reply(self, fault: Fault) -> Reply:
        if fault.kind == "status":
            if fault.body is not None:
                reply = Reply(
                    fault.status,
                    fault.body,
                    "application/json" if isinstance(fault.body, (dict, list)) else "text/plain",
                )
            else:
                err = self.status_error(fault.status, fault.code, fault.message)
                reply = self.render_error(err)
                reply.status = fault.status
                reply.headers.update(err.headers)
            if fault.retry_after is not None:
                ra = fault.retry_after
                reply.headers["Retry-After"] = str(int(ra)) if isinstance(ra, float) and ra.is_integer() else str(ra)
            if fault.retry_after_ms is not None:
                reply.headers["retry-after-ms"] = str(fault.retry_after_ms)
            return reply
        if fault.kind == "http200_error":
            reply = self.render_error(self.relay_error(fault))
            reply.status = 200
            return reply
        if fault.kind == "invalid_json":
            body = (
                fault.body if fault.body is not None else b'{"created": 1700000000, "data": [{"b64_json": undefined}]}'
            )
            return Reply(200, body, "application/json")
        if fault.kind == "huge":
            return self._huge_reply(fault)
        raise AssertionError(fault.kind)

    def relay_error(self, fault: Fault) -> GatewayError:
        """The error a relay wraps in an HTTP 200 (`Fault.http200_error`)."""
        return GatewayError(
            fault.status,
            fault.message or "upstream error: bad response from the provider",
            type="upstream_error",
            code=fault.code or "bad_response_status_code",
        )

    def _huge_reply(self, fault: Fault) -> Reply:
        head = b'{"created":%d,"data":[{"b64_json":"' % int(time.time())
        tail = b'"}]}'
        chunk = b"A" * (1024 * 1024)
        whole, rest = divmod(int(fault.size_mb * 1024 * 1024), len(chunk))

        async def gen() -> AsyncIterator[bytes]:
            yield head
            for _ in range(whole):
                yield chunk
            if rest:
                yield chunk[:rest]
            yield tail

        headers = {}
        if fault.content_length:
            headers["Content-Length"] = str(len(head) + whole * len(chunk) + rest + len(tail))
        return Reply(200, None, "application/json", headers, stream=gen)

    def _to_response(self, reply: Reply, wire: Fault | None) -> Response:
        if reply.stream is not None:
            return StreamingResponse(reply.stream(), reply.status, reply.headers, reply.media_type)
        body = reply.encoded()
        if wire is not None and wire.kind == "truncated_json":
            body = body[: max(1, len(body) // 2)]
        if wire is not None and wire.kind == "drip":
            headers = dict(reply.headers)
            headers["Content-Length"] = str(len(body))
            return StreamingResponse(_drip(body, wire.seconds, wire.chunks), reply.status, headers, reply.media_type)
        return Response(body, reply.status, reply.headers, reply.media_type)


class _Endpoint:
    """A raw ASGI endpoint, so that a handler may also answer with no response at all."""

    def __init__(self, emulator: Emulator, handler: Handler, image_route: bool) -> None:
        self.emulator = emulator
        self.handler = handler
        self.image_route = image_route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        emu = self.emulator
        with emu._lock:
            emu.in_flight += 1
            emu.max_in_flight = max(emu.max_in_flight, emu.in_flight)
        try:
            response = await emu._run(Request(scope, receive), self.handler, self.image_route, send)
            if response is not None:
                await response(scope, receive, send)
        finally:
            with emu._lock:
                emu.in_flight -= 1


async def _drip(body: bytes, seconds: float, chunks: int) -> AsyncIterator[bytes]:
    size = max(1, -(-len(body) // chunks))
    pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    pause = seconds / len(pieces)
    for piece in pieces:
        await asyncio.sleep(pause)
        yield piece


async def _drop_connection(scope: Scope) -> None:
    """Close the TCP connection before any response byte is sent."""
    send = scope.get("emulator.raw_send")
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:  # not uvicorn's h11 cycle: the best we can do is an aborted request
        raise ConnectionAbortedError("emulator: drop")
    transport.close()
    # Let connection_lost run so uvicorn marks the cycle disconnected and sends no 500.
    for _ in range(3):
        await asyncio.sleep(0)
