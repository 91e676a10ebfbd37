"""How the server ends without losing what was paid for.

stdio (the worker behind relay.py): on stdin EOF, a broken stdout or SIGTERM/SIGINT it stops
taking calls, closes its stdout (so the relay, and with it the host, sees the server gone at
once), then awaits the gateway requests already sent (each bounded by its own timeout), saves
their images, logs what it kept and exits. A second signal exits at once; the jobs still waiting
are recorded as interrupted.

HTTP and SSE: the first SIGTERM/SIGINT drains: new requests get 503, in-flight calls finish and
answer within `HTTP_DRAIN_S`, then uvicorn closes the connections (its own 5 s) and the process
exits, inside the ~30 s a container gets. A second signal exits at once, as above.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

log = logging.getLogger("mcp_imagegen.shutdown")

HTTP_DRAIN_S = 20.0  # plus uvicorn's 5 s to close connections: under a container's 30 s
STDIO_DRAIN_MARGIN_S = 60.0  # on top of the longest gateway call: a backstop, never the rule
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_now(service: Any, why: str) -> None:
    """The second signal: record running jobs as interrupted and leave without waiting."""
    ids = service.abandon()
    log.warning(
        "%s: exiting now; %d job(s) left waiting on the gateway were recorded as interrupted: %s",
        why,
        len(ids),
        ", ".join(ids) or "none",
    )
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
    os._exit(1)


# --- stdio -------------------------------------------------------------------------------------------


class _Wire:
    """The protocol's own copies of stdin and stdout, read and written without blocking, so a stop
    (a signal) is never stuck behind a read from a host that says nothing. Meanwhile fd 0 and 1
    point elsewhere: a stray read gets EOF and a stray print lands on stderr, never on the wire."""

    def __init__(self) -> None:
        self.in_fd = os.dup(0)
        self.out_fd = os.dup(1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(2, 1)
        os.set_blocking(self.in_fd, False)
        os.set_blocking(self.out_fd, False)
        self.broken = False
        self.on_broken: Any = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        pending = b""
        while True:
            while b"\n" not in pending:
                await anyio.wait_readable(self.in_fd)
                try:
                    chunk = os.read(self.in_fd, 256 * 1024)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:  # end of input
                    if pending.strip():
                        yield pending.decode("utf-8", errors="replace")
                    return
                pending += chunk
            line, _, pending = pending.partition(b"\n")
            yield line.decode("utf-8", errors="replace") + "\n"

    async def write(self, text: str) -> None:
        view = memoryview(text.encode("utf-8"))
        while view and not self.broken:
            try:
                view = view[os.write(self.out_fd, view) :]
            except BlockingIOError:
                await anyio.wait_writable(self.out_fd)
            except OSError:  # the peer is gone (EPIPE): stop serving, never crash
                self.broken = True
                if self.on_broken is not None:
                    self.on_broken()

    async def flush(self) -> None:
        pass

    def close_out(self) -> None:
        """Nothing more will be written: let the reader (the relay) see EOF."""
        if self.out_fd >= 0:
            try:
                os.close(self.out_fd)
            except OSError:
                pass
            self.out_fd = -1


async def serve_stdio_until_done(settings: Any) -> None:
    """Serve over stdin/stdout; when that ends for any reason, finish and save sent work."""
    from mcp.server.stdio import stdio_server

    from .rpc_errors import AnsweringReadStream
    from .server import build_server
    from .service import ImageService

    service = ImageService(settings)
    async with service:
        server = build_server(settings, service)
        from .heap import resume_collections

        resume_collections()  # start-up is over (cli.main paused them)
        if sys.platform == "win32":  # no relay there (see relay.py): the SDK's own stdio as before
            try:
                await server.run_stdio_async()
            finally:
                await service.drain(None)
            return
        lowlevel = server._lowlevel_server  # the SDK's own run_stdio_async, with our wire
        wire = _Wire()
        stopping = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, service, stopping)
            with anyio.CancelScope() as serving:
                wire.on_broken = serving.cancel
                tg.start_soon(_cancel_when, stopping, serving)
                try:
                    async with stdio_server(stdin=wire, stdout=wire) as (r, w):  # type: ignore[arg-type]
                        # A request the SDK cannot read is answered, not dropped (rpc_errors.py).
                        await lowlevel.run(AnsweringReadStream(r, w), w, lowlevel.create_initialization_options())
                except Exception as exc:  # a transport failure ends serving, never the jobs
                    log.warning("stdio transport failed (%s); finishing the work in flight", type(exc).__name__)
            why = (
                "the client closed stdin"
                if not stopping.is_set() and not wire.broken
                else ("stdout is gone" if wire.broken else "a signal")
            )
            wire.close_out()
            running = service.running_jobs()
            if running:
                log.warning(
                    "stopping (%s): finishing %d job(s) in flight (what was sent is awaited and saved)",
                    why,
                    len(running),
                )
            longest = max((ep.timeout_s for ep in settings.endpoints), default=0.0)
            await service.drain(2 * longest + STDIO_DRAIN_MARGIN_S)
            tg.cancel_scope.cancel()


async def _cancel_when(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _watch_signals(service: Any, stopping: anyio.Event) -> None:
    if sys.platform == "win32":
        return
    with anyio.open_signal_receiver(*EXIT_SIGNALS) as signals:
        async for signum in signals:
            if stopping.is_set():
                exit_now(service, f"second signal ({signal.Signals(signum).name})")
            log.warning("%s received: no new calls; finishing the work in flight", signal.Signals(signum).name)
            stopping.set()


# --- HTTP and SSE ------------------------------------------------------------------------------------


def draining_server(config: Any, service: Any, on_started: Callable[[Any], None] | None = None) -> Any:
    """A uvicorn.Server whose first signal drains the service before the connections close;
    `on_started(server)` runs once it listens."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    # sse-starlette ends every SSE response (a tool call's answer travels in one) the moment
    # uvicorn sees a signal; the answers in flight must get through first, so the drain says when.
    AppStatus.disable_automatic_graceful_drain()

    class DrainingServer(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if not self.should_exit and on_started is not None:
                on_started(self)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:
                exit_now(service, f"second signal ({signal.Signals(sig).name})")
            service.begin_drain()  # from this instant new calls are refused
            log.warning(
                "%s received: no new calls; finishing the work in flight (at most %.0f s)",
                signal.Signals(sig).name,
                HTTP_DRAIN_S,
            )
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Any = None) -> None:
            # In-flight calls answer on their open connections while the jobs finish.
            await service.drain(HTTP_DRAIN_S)
            await service.calls_answered(5.0)
            AppStatus.should_exit = True  # now the remaining SSE streams (idle GETs) may end
            await super().shutdown(sockets)

    return DrainingServer(config)


class DrainGate:
    """While the server drains, a new request is answered 503 (in-flight ones are untouched)."""

    def __init__(self, app: Any, service: Any) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.service.draining:
            from starlette.responses import JSONResponse

            response = JSONResponse(
                {
                    "error": "shutting_down",
                    "error_description": "the server is shutting down; call again after it restarts",
                },
                status_code=503,
                headers={"Retry-After": "5", "Connection": "close"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
