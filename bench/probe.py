"""Event-loop probe: a separate process that sends a cheap MCP request to a streamable-HTTP server
at a fixed interval and records each round trip.

The server cannot be instrumented from outside, so its longest event-loop stall is estimated as
the longest round trip of this request during a load minus its idle median: the request needs
nothing but the server's event loop, so a round trip that is far longer than usual waited for a
loop that was busy (or for a CPU: on a small machine the probe competes with everything else).
Running it in its own process keeps the benchmark client's own stalls out of the numbers.

    python -m bench.probe URL [--method list_tools|list_models] [--interval 0.01] [--max-seconds 300]

Prints `READY` once connected and warmed up, then probes until a line arrives on stdin (or
max-seconds pass), then prints one JSON line: {"samples": [[t_monotonic_sent, seconds], ...]}.
CLOCK_MONOTONIC is system-wide on Linux, so the caller can match samples to its own time windows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

MAX_SAMPLES = 100_000


async def probe(url: str, method: str, interval: float, max_seconds: float) -> list[tuple[float, float]]:
    samples: list[tuple[float, float]] = []
    stop = anyio.Event()

    async def wait_stdin() -> None:
        await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        stop.set()

    async with (
        httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=120)) as http,
        Client(streamable_http_client(url, http_client=http), cache=None) as client,
    ):
        request = _request(client, method)
        for _ in range(20):  # warm-up: connection, caches, discovery behind list_models
            await request()
        print("READY", flush=True)
        deadline = time.monotonic() + max_seconds
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_stdin)
            next_at = time.monotonic()
            while not stop.is_set() and time.monotonic() < deadline and len(samples) < MAX_SAMPLES:
                sent = time.monotonic()
                await request()
                samples.append((sent, time.monotonic() - sent))
                next_at = max(next_at + interval, time.monotonic())
                with anyio.move_on_after(max(0.0, next_at - time.monotonic())):
                    await stop.wait()
            tg.cancel_scope.cancel()
    return samples


def _request(client: Client, method: str) -> Callable[[], Awaitable[Any]]:
    if method == "list_models":
        return lambda: client.call_tool("list_models", {})
    return lambda: client.list_tools()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url")
    parser.add_argument("--method", choices=("list_tools", "list_models"), default="list_tools")
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args(argv)
    samples = anyio.run(probe, args.url, args.method, args.interval, args.max_seconds)
    print(json.dumps({"samples": samples}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
