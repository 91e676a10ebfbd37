"""Where blocking work runs: worker threads, at most one per core for CPU, eight for files.

Pillow, base64 and JSON on multi-megabyte bodies would stall the event loop if run on it, and
anyio's default 40 threads would make 64 concurrent calls fight over two cores and starve it
anyway. Every CPU-heavy step goes through `in_worker`, which shares one process-wide limit.
Reading and writing files goes through `on_disk`, which has its own (see there).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")

_limiter: anyio.CapacityLimiter | None = None


def cpu_limiter() -> anyio.CapacityLimiter:
    global _limiter
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
    return _limiter


async def in_worker(fn: Callable[[], T]) -> T:
    """Run `fn` in a worker thread under the process-wide CPU limit."""
    return await anyio.to_thread.run_sync(fn, limiter=cpu_limiter())


DISK_THREADS = 8
_disk_limiter: anyio.CapacityLimiter | None = None


async def on_disk(fn: Callable[[], T]) -> T:
    """Run blocking file work (open, write, fsync, rename, read) in a worker thread, at most
    DISK_THREADS at once.

    Each system call gives the GIL up and takes it back. With anyio's default 40 threads, 64
    images saved at once (~15 calls each) kept the event loop waiting for the GIL: its longest
    stall during 64 concurrent calls was 64-73 ms, against 33-43 ms with 8 threads. Eight still
    let the filesystem commit several fsyncs together; four stalled no less and ran ~2% slower.
    """
    global _disk_limiter
    if _disk_limiter is None:
        _disk_limiter = anyio.CapacityLimiter(DISK_THREADS)
    return await anyio.to_thread.run_sync(fn, limiter=_disk_limiter)


SMALL_INPUT_BYTES = 64 * 1024


async def in_worker_unless_small(fn: Callable[[], T], input_bytes: int) -> T:
    """`in_worker`, except that work on a small input runs right here.

    Handing work to a thread and back costs the event loop ~0.2 ms of scheduling and wake-ups;
    checking and decoding the base64 of a 10 KB image costs 20 us. Only for work whose cost
    follows its input's size (JSON, base64, checksums), not for pixel work that a small file can hide.
    """
    if input_bytes <= SMALL_INPUT_BYTES:
        return fn()
    return await in_worker(fn)


async def watch_event_loop(
    tick_s: float = 0.005,
    report_over_s: float = 0.01,
    *,
    clock: Callable[[], float] = anyio.current_time,
    cpu_clock: Callable[[], float] = time.thread_time,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> None:
    """Log every event-loop stall longer than `report_over_s` (a DEBUG diagnostic).

    A task that should wake every `tick_s` measures how late it wakes: the lateness is how long
    something held the loop. `cpu_ms` is how much of that time the loop's thread was computing;
    the rest it waited for a processor (other processes, or worker threads holding the GIL).
    Runs only while DEBUG logging is on, so it costs nothing otherwise. The clocks and the sleep
    can be replaced, so that a test can script the stalls instead of timing real ones.
    """
    log = logging.getLogger("mcp_imagegen.loop")
    while True:
        start, cpu_start = clock(), cpu_clock()
        await sleep(tick_s)
        late = clock() - start - tick_s
        if late > report_over_s:
            cpu = min(late, cpu_clock() - cpu_start)
            log.debug(
                "event loop stalled", extra={"fields": {"ms": round(late * 1000, 1), "cpu_ms": round(cpu * 1000, 1)}}
            )


class SharedOnDisk(Generic[T]):
    """A blocking probe on the file threads, shared by the callers that ask at the same moment.

    Every caller gets the answer of a run that started after it asked: callers arriving while a
    run is under way share the next one. So 64 calls arriving together cost two trips to the
    file threads instead of 64, and no caller gets an answer older than its question."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._next: _Run[T] | None = None  # the run callers join; it starts once none is running
        self._running: anyio.Event | None = None  # set when the run under way ends

    async def __call__(self) -> T:
        mine = self._next = self._next or _Run()
        while not mine.done:
            if self._running is not None:
                await self._running.wait()
                continue
            self._next, self._running = None, anyio.Event()
            try:
                with anyio.CancelScope(shield=True):  # the others wait on it (and threads finish anyway)
                    mine.value = await on_disk(self._fn)
            except Exception as exc:
                mine.error = exc
            finally:
                mine.done = True
                ended, self._running = self._running, None
                ended.set()
        if mine.error is not None:
            raise mine.error
        return mine.value  # type: ignore[return-value]


class _Run(Generic[T]):
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = False
        self.error: Exception | None = None
        self.value: T | None = None
