"""Connection-level protection for the HTTP transports: what uvicorn leaves open to abuse.

- Slow headers: uvicorn has a keep-alive timeout but nothing that bounds how long a request's
  headers may take, so a client trickling a header byte now and then holds a socket forever.
  Here a connection must finish a request's headers within `read_timeout_s` of connecting (or of
  the first byte of its next request) and its body within `read_timeout_s` plus the time a
  `MIN_BODY_RATE` upload needs; otherwise it gets a 408 and is closed.
- Descriptor exhaustion: every socket costs a file descriptor, and once the process runs out,
  accept() fails, images cannot be saved and asyncio logs each failure with a traceback. Here
  connections are capped below the descriptor limit (a reserve is left for image files and gateway
  connections); at the cap the connection idle longest (no request in flight) is closed to make
  room, and when none is idle the newcomer gets a 503 at once. Accept errors that still happen are
  logged at most once per `ACCEPT_LOG_EVERY_S`, with a count.

uvicorn's h11 protocol is used (h11 ships with uvicorn; httptools is optional), so the guard knows
the parser it hooks into.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("mcp_imagegen.http_guard")

MIN_BODY_RATE = 16 * 1024  # bytes per second a request body must average once read_timeout_s is spent
ACCEPT_LOG_EVERY_S = 10.0
_RESERVED_FDS_MIN = 64  # descriptors kept back for image files, gateway connections, logs


class _Throttled:
    """One log line per kind of event every ACCEPT_LOG_EVERY_S, with a count of those left out:
    under a flood, one line per connection would be a flood of its own."""

    def __init__(self, level: int, message: str) -> None:
        self._level = level
        self._message = message
        self._next = -math.inf
        self._left_out = 0

    def __call__(self, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._left_out += 1
            return
        self._next = now + ACCEPT_LOG_EVERY_S
        suffix = f" ({self._left_out} more since the last report)" if self._left_out else ""
        self._left_out = 0
        log.log(self._level, self._message + suffix, *args)


_log_refused = _Throttled(logging.WARNING, "%d connections open (the cap is %d): refusing new ones")
_log_evicted = _Throttled(logging.INFO, "connection cap reached: closing the connections idle longest (%s)")
_log_slow_headers = _Throttled(logging.INFO, "closing connections whose request headers did not arrive in time (%s)")
_log_slow_body = _Throttled(logging.INFO, "closing connections whose request body did not arrive in time (%s)")


@dataclass(frozen=True)
class ConnectionLimits:
    read_timeout_s: float
    max_connections: int
    # uvicorn's `backlog`, which asyncio also uses as the number of connections it accepts in one
    # go before any of them is seen (and possibly closed) here: kept within the reserve, so a
    # burst cannot run the process out of descriptors before the cap can act.
    backlog: int = 2048


def descriptor_limit() -> int | None:
    """The process's open-file limit, raised to its hard limit where the system allows."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to manage
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux starts processes at 1,024 while allowing far more: a server should use what it may.
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    wanted = min(wanted, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else int(soft)


def connection_limits(read_timeout_s: float) -> ConnectionLimits:
    limit = descriptor_limit()
    if limit is None:
        return ConnectionLimits(read_timeout_s, 10_000)
    reserve = max(_RESERVED_FDS_MIN, limit // 4)
    return ConnectionLimits(read_timeout_s, max(16, limit - reserve), backlog=min(2048, max(16, reserve // 2)))


def _raw_response(status: str, message: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": message}}).encode()
    head = [
        f"HTTP/1.1 {status}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_REQUEST_TIMEOUT = _raw_response(
    "408 Request Timeout", "the request was not sent in time; send the headers and body without pausing"
)
_OVERLOADED = _raw_response("503 Service Unavailable", "the server has too many open connections; retry shortly", 1)


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """An h11 protocol class bound to `limits` (uvicorn takes a protocol class, not an instance)."""

    class GuardedH11Protocol(_GuardedH11Protocol):
        _limits = limits

    return GuardedH11Protocol


class _GuardedH11Protocol(H11Protocol):
    _limits: ConnectionLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = time.monotonic()
        self._body_started = 0.0
        self._body_bytes = 0
        self._partial = False  # bytes of a request arrived, its headers are not complete yet
        self._awaiting_headers = False  # the header clock is running

    # --- state -------------------------------------------------------------------------------

    def _in_flight(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self, delay: float, callback: Callable[[Any], None], cycle: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback, cycle)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close_with(self, response: bytes | None) -> None:
        self._disarm()
        self._awaiting_headers = False
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # The app's later sends become no-ops and its receive() sees a disconnect.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
            if self.cycle.response_started:
                response = None
        if response is not None:
            self.transport.write(response)
        self.transport.close()

    # --- asyncio protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._limits.max_connections and not self._make_room():
            _log_refused(len(self.connections), self._limits.max_connections)
            self._close_with(_OVERLOADED)
            return
        self._awaiting_headers = True
        self._arm(self._limits.read_timeout_s, self._headers_too_slow, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        if not self._in_flight():
            self._partial = True
            if not self._awaiting_headers:
                # The first byte of a following request on a kept-alive connection starts its clock.
                self._awaiting_headers = True
                self._arm(self._limits.read_timeout_s, self._headers_too_slow, before)
        super().data_received(data)
        cycle = self.cycle
        if cycle is not before and cycle is not None:  # headers complete: a new request began
            self._partial = self._awaiting_headers = False
            self._disarm()
            if cycle.more_body:
                self._body_started = time.monotonic()
                self._body_bytes = len(cycle.body)
                self._arm(self._limits.read_timeout_s, self._body_too_slow, cycle)
        elif cycle is not None and self._timer is not None and not self._awaiting_headers:
            self._body_bytes += len(data)
            if not cycle.more_body:
                self._disarm()

    def on_response_complete(self) -> None:
        self._idle_since = time.monotonic()
        super().on_response_complete()

    # --- timeouts ------------------------------------------------------------------------------

    def _headers_too_slow(self, cycle_at_arm: Any) -> None:
        self._timer = None
        self._awaiting_headers = False
        if self.cycle is not cycle_at_arm or self._in_flight():
            return  # headers arrived after all (a request was handled meanwhile)
        _log_slow_headers(self._peer())
        self._close_with(_REQUEST_TIMEOUT if self._partial else None)

    def _body_too_slow(self, cycle: Any) -> None:
        self._timer = None
        if cycle is not self.cycle or not cycle.more_body or cycle.disconnected:
            return
        # The deadline grows with what arrived; a paused read is the server's doing, not the client's.
        allowed = self._limits.read_timeout_s + self._body_bytes / MIN_BODY_RATE
        remaining = self._body_started + allowed - time.monotonic()
        if remaining > 0 or self.flow.read_paused:
            self._arm(max(remaining, 1.0), self._body_too_slow, cycle)
            return
        _log_slow_body(self._peer())
        self._close_with(_REQUEST_TIMEOUT)

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "an unknown peer"

    # --- the connection cap --------------------------------------------------------------------

    def _make_room(self) -> bool:
        """Close the connection idle longest; False when every other connection is busy."""
        idle = [
            c
            for c in self.connections
            if c is not self
            and isinstance(c, _GuardedH11Protocol)
            and not c._in_flight()
            and not c.transport.is_closing()
        ]
        if not idle:
            return False
        # Connections still waiting for a request's headers go first (that is what a slowloris
        # looks like), then kept-alive ones, each oldest first.
        oldest = min(idle, key=lambda c: (not c._awaiting_headers, c._idle_since))
        _log_evicted(oldest._peer())
        oldest._close_with(None)
        return True


class AcceptErrorLog:
    """A loop exception handler that logs accept() failures (EMFILE and kin) at a bounded rate.

    asyncio retries accept() up to `backlog` times per wake-up and reports every failure with a
    traceback: at a descriptor limit that is megabytes of log a second. Other reports pass on.
    """

    _MESSAGE = "socket.accept() out of system resource"

    def __init__(self, previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None) -> None:
        self._previous = previous
        self._count = 0
        self._next_log = -math.inf

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != self._MESSAGE:
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self._count += 1
        now = time.monotonic()
        if now < self._next_log:
            return
        self._next_log = now + ACCEPT_LOG_EVERY_S
        exc = context.get("exception")
        log.warning(
            "cannot accept connections: %s (failed accepts since the last report: %d); "
            "idle connections are being closed, and accepting resumes as descriptors free up",
            getattr(exc, "strerror", None) or exc,
            self._count,
        )
        self._count = 0


def install_accept_error_log(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Install AcceptErrorLog on `loop`; returns a function that restores the previous handler."""
    previous = loop.get_exception_handler()
    loop.set_exception_handler(AcceptErrorLog(previous))
    return lambda: loop.set_exception_handler(previous)
