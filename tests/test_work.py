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
    SharedOnDisk,
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


async def _run_many(run: Callable[[Callable[[], int]], Awaitable[int]], jobs: int, limit: int) -> tuple[int, set[int]]:
    """Run `jobs` blocking jobs through `run` at once: (most running at the same time, their threads).

    Each job holds its thread until `limit` jobs have been seen running together (or 30 s pass),
    so the peak reaches the limit however slowly the threads start, and never passes it unless
    `run` lets more through.
    """
    running = 0
    peak = 0
    lock = threading.Lock()
    reached = threading.Event()

    def job() -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            if running >= limit:
                reached.set()
        reached.wait(timeout=30)
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
    cores = max(2, os.cpu_count() or 2)
    peak, threads = await _run_many(in_worker, 16, cores)
    assert threading.get_ident() not in threads
    assert peak == cpu_limiter().total_tokens == cores


async def test_file_work_runs_off_the_loop_at_most_disk_threads_at_once() -> None:
    peak, threads = await _run_many(on_disk, 3 * DISK_THREADS, DISK_THREADS)
    assert threading.get_ident() not in threads
    assert peak == DISK_THREADS


async def test_work_on_a_small_input_stays_on_the_loop_a_big_one_goes_to_a_worker() -> None:
    loop_thread = threading.get_ident()
    assert await in_worker_unless_small(threading.get_ident, SMALL_INPUT_BYTES) == loop_thread
    assert await in_worker_unless_small(threading.get_ident, SMALL_INPUT_BYTES + 1) != loop_thread


class _ScriptedLoop:
    """Clocks and a sleep for `watch_event_loop` that play back scripted stalls, then stop it.

    Each script entry is (how late the sleep wakes, how much of that the thread computed), in
    seconds. Nothing here depends on how fast the machine is.
    """

    class Done(Exception):
        pass

    def __init__(self, script: list[tuple[float, float]]) -> None:
        self.script = list(script)
        self.now = 0.0
        self.cpu = 0.0

    def clock(self) -> float:
        return self.now

    def cpu_clock(self) -> float:
        return self.cpu

    async def sleep(self, seconds: float) -> None:
        if not self.script:
            raise self.Done
        late, computing = self.script.pop(0)
        self.now += seconds + late
        self.cpu += computing


def _stalls(caplog: pytest.LogCaptureFixture) -> list[tuple[float, float]]:
    return [
        (r.fields["ms"], r.fields["cpu_ms"])  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "mcp_imagegen.loop" and r.getMessage() == "event loop stalled"
    ]


async def test_watchdog_reports_a_blocked_loop_and_how_much_of_it_was_computing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mcp_imagegen.loop")
    loop = _ScriptedLoop(
        [
            (0.0, 0.0),  # on time: nothing to report
            (0.008, 0.008),  # late, but under the 10 ms threshold
            (0.120, 0.118),  # held by CPU work on the loop
            (0.120, 0.0),  # held without computing (waiting for a processor or the GIL)
            (0.050, 0.900),  # more CPU than wall time (other threads counted): capped at the stall
        ]
    )
    with pytest.raises(_ScriptedLoop.Done):
        await watch_event_loop(
            tick_s=0.005, report_over_s=0.01, clock=loop.clock, cpu_clock=loop.cpu_clock, sleep=loop.sleep
        )
    assert _stalls(caplog) == [(120.0, 118.0), (120.0, 0.0), (50.0, 50.0)]


async def test_watchdog_on_the_real_clocks_reports_a_loop_held_by_a_blocking_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The default clocks and sleep are wired up: a loop held for 200 ms is reported (the figures
    depend on the machine, so only that a stall was seen is asserted)."""
    caplog.set_level(logging.DEBUG, logger="mcp_imagegen.loop")
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_event_loop)
        with anyio.fail_after(30):
            while not _stalls(caplog):
                await anyio.sleep(0.01)  # lets the watchdog run (and start, the first time)
                time.sleep(0.2)  # the loop's thread held: the watchdog cannot wake meanwhile
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()


async def test_callers_asking_together_share_one_probe_that_started_after_they_asked() -> None:
    started: list[int] = []
    release = threading.Event()

    def probe() -> int:
        started.append(len(started) + 1)
        release.wait(30)  # the first run lasts until every other caller has asked
        return len(started)

    shared = SharedOnDisk(probe)
    answers: dict[int, int] = {}

    async def ask(i: int) -> None:
        answers[i] = await shared()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, 0)
            while not started:
                await anyio.sleep(0.01)
            for i in range(1, 10):
                tg.start_soon(ask, i)  # they ask while the first run is under way
            await anyio.wait_all_tasks_blocked()
            release.set()
    assert answers[0] == 1
    assert all(answers[i] == 2 for i in range(1, 10))  # one run for the nine, begun after they asked
    assert len(started) == 2


async def test_a_shared_probes_error_reaches_every_caller() -> None:
    def probe() -> int:
        raise PermissionError(13, "permission denied")

    shared = SharedOnDisk(probe)
    errors: list[BaseException] = []

    async def ask() -> None:
        try:
            await shared()
        except PermissionError as exc:
            errors.append(exc)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(ask)
    assert len(errors) == 5
