"""The worker threads for CPU-bound steps and for files, and the event-loop watchdog."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable

import anyio
import pytest

from mcp_imagegen.work import (
    DISK_THREADS,
    SMALL_INPUT_BYTES,
    cpu_limiter,
    in_worker,
    in_worker_unless_small,
    on_disk,
    watch_event_loop,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _run_many(run: Callable[[Callable[[], int]], Awaitable[int]], jobs: int) -> tuple[int, set[int]]:
    """Run `jobs` blocking jobs of 20 ms through `run` at once: (most at the same time, their threads)."""
    running = 0
    peak = 0
    lock = threading.Lock()

    def job() -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return threading.get_ident()

    threads: set[int] = set()

    async def one() -> None:
        threads.add(await run(job))

    async with anyio.create_task_group() as tg:
        for _ in range(jobs):
            tg.start_soon(one)
    return peak, threads


async def test_cpu_work_runs_off_the_loop_at_most_one_thread_per_core() -> None:
    peak, threads = await _run_many(in_worker, 16)
    assert threading.get_ident() not in threads
    assert peak == cpu_limiter().total_tokens == max(2, os.cpu_count() or 2)


async def test_file_work_runs_off_the_loop_at_most_disk_threads_at_once() -> None:
    peak, threads = await _run_many(on_disk, 3 * DISK_THREADS)
    assert threading.get_ident() not in threads
    assert peak == DISK_THREADS


async def test_work_on_a_small_input_stays_on_the_loop_a_big_one_goes_to_a_worker() -> None:
    loop_thread = threading.get_ident()
    assert await in_worker_unless_small(threading.get_ident, SMALL_INPUT_BYTES) == loop_thread
    assert await in_worker_unless_small(threading.get_ident, SMALL_INPUT_BYTES + 1) != loop_thread


async def test_watchdog_reports_a_blocked_loop_and_how_much_of_it_was_computing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mcp_imagegen.loop")

    async def stall(busy: bool) -> tuple[float, float]:
        caplog.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_event_loop)
            await anyio.sleep(0.05)
            end = time.monotonic() + 0.12
            if busy:
                while time.monotonic() < end:  # CPU work on the loop
                    pass
            else:
                time.sleep(0.12)  # the loop's thread held without computing
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        records = [r for r in caplog.records if r.getMessage() == "event loop stalled"]
        worst = max(records, key=lambda r: r.fields["ms"])  # type: ignore[attr-defined]
        return worst.fields["ms"], worst.fields["cpu_ms"]  # type: ignore[attr-defined]

    ms, cpu_ms = await stall(busy=True)
    assert ms >= 100 and cpu_ms >= 80
    ms, cpu_ms = await stall(busy=False)
    assert ms >= 100 and cpu_ms < 50
