"""The HTTP client every gateway call goes through: auth, timeouts, retries, pacing, error mapping.

One `httpx2.AsyncClient` (HTTP/1.1 keep-alive) serves all endpoints; each endpoint has its own
`AdaptiveLimit` (pacing.py) so a slow gateway cannot starve the others, a fast one is not held
back and a rate-limiting one is not hammered. Retry policy (DESIGN §5):

- retried: 408, 409, 429 and 5xx answers, connection failures, and errors a 2xx body reports with
  such a status; never 400/401/402/403/404/413/422 nor a 429 that says the quota is used up;
- at most `max_retries` retries per call; a timeout after the request was sent (the gateway may be
  generating, and an image costs money) is retried at most once, and never once the answer's
  headers have arrived; a 429 or 503 to a request sent above the limit the endpoint has since
  backed off to is not counted: the request waits its turn under the lower limit;
- waits honour `retry-after-ms` / `Retry-After` (seconds or HTTP date) up to `max_wait_s`; a
  longer ask fails at once with the time to retry; otherwise exponential backoff with jitter;
- `timeout_s` is the whole call: from its first request being sent to its last answer, retries
  and waits included (connect at most 10 s). Time queued before the first send is not counted.

The API key is only ever put into a request header: no message, log line or repr carries it.
"""

from __future__ import annotations

import logging
import random
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property, partial
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import anyio
import httpx2

from . import b64, dialects, pacing
from .catalog import missing_key_error
from .config import EndpointConfig
from .errors import (
    BadGatewayResponseError,
    ConfigError,
    GatewayError,
    GatewayTimeoutError,
    ImageGenError,
    RateLimitedError,
)
from .gateway_pool import gateway_transport
from .manifests import Manifest
from .models import WireResult
from .work import in_worker_unless_small

log = logging.getLogger("mcp_imagegen.gateway")
T = TypeVar("T")

MAX_BODY_BYTES = 128 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 1024 * 1024  # error bodies are messages; keep the start of a huge one
CONNECT_TIMEOUT_S = 10.0
FETCH_TIMEOUT_S = 120.0
USER_AGENT = "mcp-imagegen"


def safe_url(url: str) -> str:
    """scheme://host[:port]/path: no query (signed URLs), no fragment, no user info."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(unparseable URL)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _scrub(exc: ImageGenError, secret: str | None) -> ImageGenError:
    """Replace the key wherever a gateway may have echoed it (some relays quote the header)."""
    if not secret:
        return exc
    for attr in ("message", "gateway_message"):
        value = getattr(exc, attr, None)
        if isinstance(value, str) and secret in value:
            setattr(exc, attr, value.replace(secret, "***"))
    exc.args = tuple(a.replace(secret, "***") if isinstance(a, str) else a for a in exc.args)
    return exc


class _Failure(Exception):
    """One failed attempt: the typed error, and how far the request got.

    `after_send`: the gateway may be generating (and charging); such a failure is retried at most
    once. `final`: the answer had started to arrive; repeating would pay twice for one image.
    """

    def __init__(self, error: ImageGenError, *, after_send: bool = False, final: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.after_send = after_send
        self.final = final


@dataclass
class _Answer:
    status: int
    headers: Mapping[str, str]
    chunks: list[bytes]
    size: int

    @cached_property
    def body(self) -> bytes:
        # Joined where it is first read: for a big answer that is the worker thread that parses
        # it, so the event loop never copies megabytes (nor faults their fresh pages in).
        return b"".join(self.chunks)


class GatewayClient:
    """Async context manager owning the HTTP connection pool shared by every endpoint."""

    def __init__(
        self,
        max_retries: int = 2,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 8.0,
        max_wait_s: float = 30.0,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        fetch_timeout_s: float = FETCH_TIMEOUT_S,
    ) -> None:
        self.max_retries = max_retries
        self.max_body_bytes = max_body_bytes
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_wait_s = max_wait_s
        self.connect_timeout_s = connect_timeout_s
        self.fetch_timeout_s = fetch_timeout_s
        self._transport = transport
        self._client: httpx2.AsyncClient | None = None
        self._limits: dict[str, pacing.AdaptiveLimit] = {}

    def __repr__(self) -> str:
        return f"GatewayClient(max_retries={self.max_retries}, endpoints={sorted(self._limits)})"

    async def __aenter__(self) -> Self:
        # Many tool calls at once, each fanning out; the per-endpoint limits do the real capping.
        limits = httpx2.Limits(max_connections=512, max_keepalive_connections=128, keepalive_expiry=30.0)
        transport = self._transport or gateway_transport(limits)
        self._client = httpx2.AsyncClient(
            http1=True,
            http2=False,
            limits=limits,
            timeout=None,  # set per call
            transport=transport,
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
        )
        await self._client.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(exc_type, exc, tb)

    # --- helpers -------------------------------------------------------------------------------

    def _http(self) -> httpx2.AsyncClient:
        if self._client is None:
            raise RuntimeError("GatewayClient is not open; use 'async with GatewayClient() as gw'")
        return self._client

    def pacing(self, endpoint: EndpointConfig) -> pacing.AdaptiveLimit:
        """The endpoint's in-flight limit (made anew if its ceiling was reconfigured)."""
        limit = self._limits.get(endpoint.name)
        ceiling = endpoint.max_concurrency if endpoint.max_concurrency is not None else pacing.MOST
        if limit is None or limit.ceiling != ceiling:
            limit = self._limits[endpoint.name] = pacing.AdaptiveLimit(endpoint.max_concurrency)
        return limit

    @staticmethod
    def _base_url(endpoint: EndpointConfig, manifest: Manifest) -> str:
        base = endpoint.base_url or manifest.base_url
        if not base:
            raise ConfigError(f"endpoint {endpoint.name!r} has no base_url; set one in the configuration")
        return base.rstrip("/")

    def _url(
        self, endpoint: EndpointConfig, manifest: Manifest, path: str, relative_to: Literal["base_url", "origin"]
    ) -> str:
        base = self._base_url(endpoint, manifest)
        if relative_to == "origin":
            parts = urllib.parse.urlsplit(base)
            base = f"{parts.scheme}://{parts.netloc}"
        return base + ("" if path.startswith("/") else "/") + path

    @staticmethod
    def _key_env(endpoint: EndpointConfig, manifest: Manifest) -> str | None:
        return endpoint.api_key_env or manifest.key_env

    def _auth_headers(self, endpoint: EndpointConfig, manifest: Manifest, *, use: bool = True) -> dict[str, str]:
        auth = manifest.auth
        if auth.scheme == "none" or not use:
            return {}
        key = endpoint.api_key.get_secret_value() if endpoint.api_key is not None else ""
        if not key:
            missing = missing_key_error(endpoint, manifest)
            if missing is not None:
                raise missing
            return {}
        return {auth.header: f"Bearer {key}" if auth.scheme == "bearer" else key}

    def _backoff(self, retry: int) -> float:
        delay = min(self.backoff_max_s, self.backoff_base_s * (2.0**retry))
        return delay / 2 + random.uniform(0, delay / 2)  # "equal jitter": spread, but never zero

    # --- one attempt ---------------------------------------------------------------------------

    async def _attempt(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        timeout_s: float,
        deadline_s: float,
        endpoint_name: str,
        target: str,
        total_s: float | None = None,
        json: Any = None,
        data: Mapping[str, str] | None = None,
        files: Any = None,
        follow_redirects: bool = False,
        max_body: int | None = None,
    ) -> _Answer:
        limit = self.max_body_bytes if max_body is None else max_body
        timeout = httpx2.Timeout(
            connect=min(self.connect_timeout_s, timeout_s), read=timeout_s, write=timeout_s, pool=timeout_s
        )
        where = safe_url(url)
        within = _whole_seconds(deadline_s if total_s is None else total_s)
        got_headers = False
        try:
            with anyio.fail_after(deadline_s):
                async with self._http().stream(
                    method,
                    url,
                    headers=headers,
                    json=json,
                    data=data,
                    files=files,
                    timeout=timeout,
                    follow_redirects=follow_redirects,
                ) as response:
                    got_headers = True
                    ok = 200 <= response.status_code < 300
                    cap = limit if ok else min(limit, MAX_ERROR_BODY_BYTES)
                    declared = response.headers.get("content-length", "")
                    if ok and declared.isdigit() and int(declared) > cap:
                        raise _Failure(_too_large(endpoint_name, where, int(declared), cap))
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > cap:
                            if not ok:  # the start of an error message is enough
                                chunks.append(chunk[: max(0, cap - (size - len(chunk)))])
                                break
                            raise _Failure(_too_large(endpoint_name, where, size, cap))
                        chunks.append(chunk)
                    return _Answer(response.status_code, response.headers, chunks, sum(map(len, chunks)))
        except TimeoutError:
            raise _Failure(
                GatewayTimeoutError(
                    f"endpoint {endpoint_name!r} did not finish answering within {within}",
                    endpoint=endpoint_name,
                ),
                after_send=True,
                final=got_headers,
            ) from None
        except httpx2.ConnectTimeout:
            raise _Failure(
                GatewayError(f"cannot connect to {target}: connection timed out", endpoint=endpoint_name)
            ) from None
        except httpx2.ConnectError:
            raise _Failure(
                GatewayError(f"cannot connect to {target} (refused or unreachable)", endpoint=endpoint_name)
            ) from None
        except httpx2.PoolTimeout:
            raise _Failure(
                GatewayTimeoutError(f"no free connection to {target} within {within}", endpoint=endpoint_name)
            ) from None
        except httpx2.TimeoutException as exc:
            what = "sending the request" if isinstance(exc, httpx2.WriteTimeout) else "answering"
            raise _Failure(
                GatewayTimeoutError(
                    f"endpoint {endpoint_name!r} did not finish {what} within {within}", endpoint=endpoint_name
                ),
                after_send=True,
                final=got_headers,
            ) from None
        except (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError, httpx2.CloseError) as exc:
            raise _Failure(
                GatewayError(
                    f"endpoint {endpoint_name!r} dropped the connection ({type(exc).__name__})", endpoint=endpoint_name
                ),
                after_send=True,
                final=got_headers,
            ) from None
        except httpx2.TooManyRedirects:
            raise _Failure(
                BadGatewayResponseError(f"{where} redirected too many times", endpoint=endpoint_name)
            ) from None
        except (httpx2.HTTPError, httpx2.InvalidURL) as exc:
            # Never format the library's exception: it may hold the request and its headers.
            raise _Failure(
                GatewayError(f"request to {where} failed ({type(exc).__name__})", endpoint=endpoint_name)
            ) from None

    # --- retry loop ----------------------------------------------------------------------------

    async def _call(
        self,
        endpoint: EndpointConfig,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        handle: Callable[[_Answer], T],
        secret: str | None,
        model: str | None,
        on_retry: Callable[[str], None] | None,
        target: str,
        json: Any = None,
        data: Mapping[str, str] | None = None,
        files: Any = None,
        on_send: Callable[[], None] | None = None,
    ) -> T:
        timeout_s = endpoint.timeout_s
        limit = self.pacing(endpoint)
        started = time.monotonic()
        first_sent: float | None = None  # timeout_s runs from here
        retries = 0  # counted against max_retries
        resent = 0
        repeated_sent = False
        status: int | None = None
        nbytes = 0
        outcome = "ok"
        try:
            while True:
                permit = await limit.acquire()
                now = time.monotonic()
                first_sent = now if first_sent is None else first_sent
                left = timeout_s - (now - first_sent)
                answer: _Answer | None = None
                try:
                    if left <= 0:
                        raise _Failure(_out_of_time(endpoint.name, timeout_s))
                    if on_send is not None:  # the request leaves now: the caller stops cancelling it
                        on_send()
                    answer = await self._attempt(
                        method,
                        url,
                        headers=headers,
                        timeout_s=left,
                        deadline_s=left,
                        total_s=timeout_s,
                        endpoint_name=endpoint.name,
                        target=target,
                        json=json,
                        data=data,
                        files=files,
                    )
                    status, nbytes = answer.status, answer.size
                except _Failure as failure:
                    error, after_send, final = failure.error, failure.after_send, failure.final
                finally:
                    limit.release(permit)
                if answer is not None:
                    try:
                        # Parsing megabytes of JSON (base64 images) would stall the event loop.
                        result = await in_worker_unless_small(partial(handle, answer), nbytes)
                    except ImageGenError as exc:
                        error, after_send, final = exc, isinstance(exc, GatewayTimeoutError), False
                    else:
                        limit.observe(permit, "ok")
                        outcome = "ok"
                        return result
                _scrub(error, secret)
                outcome = error.kind
                slow_down = error.retryable and error.status in (429, 503)
                overreached = limit.observe(
                    permit,
                    "slow_down" if slow_down else "other",
                    min(error.retry_after_s, self.max_wait_s) if slow_down and error.retry_after_s else None,
                )
                counted = not (slow_down and overreached)
                if final or not error.retryable or (after_send and repeated_sent):
                    raise error
                if counted and retries >= self.max_retries:
                    raise error
                wait = error.retry_after_s
                if wait is not None and wait > self.max_wait_s:
                    raise _too_long(error, wait, endpoint.name)
                if wait is None:
                    wait = self._backoff(retries)
                if time.monotonic() - first_sent + wait >= timeout_s:
                    raise error
                retries += counted
                resent += 1
                repeated_sent = repeated_sent or after_send
                reason = f"HTTP {error.status}" if error.status else error.kind.replace("_", " ")
                if counted:
                    note = f"{reason}; retry {retries} of {self.max_retries} in {wait:.1f} s"
                else:
                    note = f"{reason}; {int(limit.limit)} at a time from now on; sent again in {wait:.1f} s"
                log.debug("retrying", extra={"fields": {"endpoint": endpoint.name, "why": note}})
                if on_retry is not None:
                    on_retry(note)
                await anyio.sleep(wait)
        except ImageGenError as exc:
            raise _scrub(exc, secret) from None
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"  # the caller gave up; the request was abandoned, not retried
            raise
        finally:
            log.info(
                "gateway call",
                extra={
                    "fields": {
                        "endpoint": endpoint.name,
                        "model": model or "-",
                        "method": method,
                        "path": urllib.parse.urlsplit(url).path,
                        "status": status if status is not None else "-",
                        "ms": round((time.monotonic() - started) * 1000),
                        "bytes": nbytes,
                        "retries": resent,
                        "outcome": outcome,
                    }
                },
            )

    # --- public API ----------------------------------------------------------------------------

    async def send(
        self,
        endpoint: EndpointConfig,
        manifest: Manifest,
        wire: dialects.WireRequest,
        *,
        on_retry: Callable[[str], None] | None = None,
        on_send: Callable[[], None] | None = None,
    ) -> WireResult:
        """Send one encoded request and decode the answer (retrying per the policy above).

        `on_send` is called each time an attempt is about to go out (after any wait for a free
        slot), so a caller can tell requests not yet sent (free to drop) from sent ones (paid for).
        """
        url = self._url(endpoint, manifest, wire.url_path, wire.relative_to)
        headers = {"Accept": "application/json", **wire.headers, **self._auth_headers(endpoint, manifest)}
        key_env = self._key_env(endpoint, manifest)

        def handle(answer: _Answer) -> WireResult:
            return dialects.decode(
                manifest, answer.status, answer.headers, answer.body, endpoint=endpoint.name, key_env=key_env
            )

        return await self._call(
            endpoint,
            wire.method,
            url,
            headers=headers,
            handle=handle,
            secret=_secret(endpoint),
            model=wire.model,
            on_retry=on_retry,
            target=self._base_url(endpoint, manifest),
            json=wire.json,
            data=wire.data,
            files=wire.files,
            on_send=on_send,
        )

    async def get_json(
        self,
        endpoint: EndpointConfig,
        manifest: Manifest,
        path: str,
        relative_to: Literal["base_url", "origin"] = "base_url",
        auth: bool = True,
    ) -> Any:
        """GET a JSON document from the gateway (model discovery)."""
        url = self._url(endpoint, manifest, path, relative_to)
        headers = {"Accept": "application/json", **self._auth_headers(endpoint, manifest, use=auth)}
        key_env = self._key_env(endpoint, manifest)

        def handle(answer: _Answer) -> Any:
            if not 200 <= answer.status < 300:
                raise dialects.classify_error(
                    manifest, answer.status, answer.headers, answer.body, endpoint=endpoint.name, key_env=key_env
                )
            try:
                import json as _json

                return _json.loads(answer.body)
            except (ValueError, UnicodeDecodeError):
                raise BadGatewayResponseError(
                    f"endpoint {endpoint.name!r} answered {safe_url(url)} with a body that is not JSON: "
                    f"{dialects.excerpt(answer.body)}",
                    status=answer.status,
                    endpoint=endpoint.name,
                ) from None

        return await self._call(
            endpoint,
            "GET",
            url,
            headers=headers,
            handle=handle,
            secret=_secret(endpoint),
            model=None,
            on_retry=None,
            target=self._base_url(endpoint, manifest),
        )

    async def fetch_image(self, url: str, *, max_bytes: int) -> bytes:
        """Download a result image now (gateway URLs expire); `data:` URLs are decoded locally.

        No key is sent: result URLs are signed, and often on another host. A gateway the user
        configured may point at a private address (a self-hosted relay), so none is refused here.
        """
        if url.startswith("data:"):
            return _decode_data_url(url, max_bytes)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise BadGatewayResponseError(f"the gateway returned a result URL with scheme {scheme!r}; expected https")
        where = safe_url(url)
        started = time.monotonic()
        retries = 0
        status: int | None = None
        nbytes = 0
        outcome = "ok"
        try:
            while True:
                try:
                    answer = await self._attempt(
                        "GET",
                        url,
                        headers={"Accept": "image/*,*/*;q=0.5"},
                        timeout_s=self.fetch_timeout_s,
                        deadline_s=self.fetch_timeout_s,
                        endpoint_name=urllib.parse.urlsplit(url).hostname or "result host",
                        target=_origin(url),
                        follow_redirects=True,
                        max_body=max_bytes,
                    )
                    status, nbytes = answer.status, answer.size
                    if 200 <= answer.status < 300:
                        if not answer.body:
                            raise BadGatewayResponseError(f"the result URL {where} returned an empty body")
                        outcome = "ok"
                        return answer.body
                    if answer.status in (403, 404, 410):
                        raise BadGatewayResponseError(
                            f"result URL expired or missing (HTTP {answer.status} from {where}); generate again",
                            status=answer.status,
                        )
                    if 400 <= answer.status < 500 and answer.status not in (408, 429):
                        raise BadGatewayResponseError(
                            f"downloading the result from {where} was refused (HTTP {answer.status})",
                            status=answer.status,
                        )
                    error: ImageGenError = GatewayError(
                        f"downloading the result from {where} failed (HTTP {answer.status})", status=answer.status
                    )
                except _Failure as failure:
                    error = failure.error
                outcome = error.kind
                # Downloading is free and repeatable, so timeouts are retried like anything else.
                if not error.retryable or retries >= self.max_retries:
                    raise error
                retries += 1
                await anyio.sleep(self._backoff(retries - 1))
        except ImageGenError as exc:
            outcome = exc.kind
            raise exc from None
        finally:
            log.info(
                "result download",
                extra={
                    "fields": {
                        "url": where,
                        "status": status if status is not None else "-",
                        "ms": round((time.monotonic() - started) * 1000),
                        "bytes": nbytes,
                        "retries": retries,
                        "outcome": outcome,
                    }
                },
            )


def _whole_seconds(seconds: float) -> str:
    return f"{max(1, round(seconds))} s"


def _out_of_time(endpoint_name: str, timeout_s: float) -> GatewayTimeoutError:
    return GatewayTimeoutError(
        f"endpoint {endpoint_name!r} did not finish answering within {_whole_seconds(timeout_s)}",
        endpoint=endpoint_name,
    )


def _secret(endpoint: EndpointConfig) -> str | None:
    return endpoint.api_key.get_secret_value() if endpoint.api_key is not None else None


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return safe_url(f"{parts.scheme}://{parts.netloc}") or url


def _too_large(endpoint_name: str, where: str, size: int, cap: int) -> BadGatewayResponseError:
    limit = f"{cap / (1024 * 1024):g} MB" if cap >= 1024 * 1024 else f"{cap} bytes"
    return BadGatewayResponseError(
        f"the answer from {where} is larger than {limit} (at least {size} bytes); refused",
        endpoint=endpoint_name,
    )


def _too_long(error: ImageGenError, wait: float, endpoint_name: str) -> ImageGenError:
    if not isinstance(error, RateLimitedError):
        return error
    when = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + wait))
    return RateLimitedError(
        f"endpoint {endpoint_name!r} is rate limiting and asks to wait {wait:.0f} s; retry after {when}",
        status=error.status,
        gateway_message=error.gateway_message,
        endpoint=endpoint_name,
        retry_after_s=wait,
    )


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise BadGatewayResponseError("the gateway returned a malformed data URL (no comma)")
    if header.lower().endswith(";base64"):
        if len(payload) * 3 // 4 > max_bytes + 4096:  # whitespace allowance
            raise BadGatewayResponseError(f"the data URL image is larger than {max_bytes} bytes; refused")
        try:
            data = b64.decode(payload)
        except ValueError as exc:
            raise BadGatewayResponseError(f"the gateway returned a data URL with invalid base64 ({exc})") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise BadGatewayResponseError(f"the data URL image is larger than {max_bytes} bytes; refused")
    if not data:
        raise BadGatewayResponseError("the gateway returned an empty data URL")
    return data
