"""The process's memory: malloc set for image-sized buffers, freed memory handed back when idle,
and the garbage collector settled once."""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from mcp_imagegen import heap
from tests.conftest import GatedSleep, wait_until

REPO = Path(__file__).resolve().parent.parent
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_heap_is_settled_once_per_process() -> None:
    saved = heap._settled
    try:
        heap._settled = False
        gc.unfreeze()
        heap.settle_heap()
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        heap.settle_heap()  # a second call changes nothing
        assert gc.get_freeze_count() == 0
    finally:
        heap._settled = saved


# Run in a fresh interpreter: malloc's settings are per process and must come before any thread.
PROBE = textwrap.dedent(
    """
    import ctypes, sys, tempfile, threading
    from mcp_imagegen import heap

    configured = heap.configure_malloc() if sys.argv[1] == "configured" else False

    def anonymous_mappings():
        with open("/proc/self/maps") as maps:
            return sum(1 for line in maps if len(line.split()) == 5)

    def rss_mib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))

    # 1. Four threads allocating at once; malloc_info lists one <heap> per arena.
    start = threading.Barrier(4)

    def allocate():
        start.wait()
        for _ in range(50):
            kept = [bytes(4000) for _ in range(100)]
            del kept

    threads = [threading.Thread(target=allocate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile(suffix=".xml") as out:
        stream = libc.fopen(out.name.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        arenas = open(out.name).read().count("<heap nr=")

    # 2. An image-sized buffer: its own mapping, or from the heap.
    before = anonymous_mappings()
    buffer = bytearray(8 << 20)
    own_mapping = anonymous_mappings() > before
    del buffer

    # 3. 48 MiB freed below live blocks (so not trimmed off the top), then handed back.
    blocks = [bytearray(1 << 20) for _ in range(48)]
    pins = [bytearray(1 << 20) for _ in range(4)]
    del blocks
    kept = rss_mib()
    if sys.argv[2] == "release":
        heap.release_free_memory()
    print(configured, arenas, own_mapping, kept - rss_mib())
    """
)


def _probe(mode: str, release: str = "release", **env: str) -> tuple[str, int, str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, release],
        env={**clean, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    configured, arenas, own_mapping, released_mib = done.stdout.split()
    return configured, int(arenas), own_mapping, int(released_mib)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_malloc_is_set_for_image_sized_buffers() -> None:
    # glibc by itself: an arena per thread, and an 8 MiB buffer gets its own mapping.
    _, arenas, own_mapping, _ = _probe("default")
    assert arenas > 1 and own_mapping == "True"
    configured, arenas, own_mapping, _ = _probe("configured")
    assert (configured, arenas, own_mapping) == ("True", 1, "False")


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_memory_freed_inside_the_heap_goes_back_only_when_released() -> None:
    assert _probe("configured", "keep")[3] < 8
    assert _probe("configured", "release")[3] >= 40  # of the 48 MiB freed


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_a_users_own_malloc_settings_are_left_alone() -> None:
    configured, arenas, own_mapping, _ = _probe("configured", MALLOC_ARENA_MAX="4")
    assert configured == "False" and own_mapping == "True"


async def test_freed_memory_is_handed_back_once_when_no_job_ran_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trims: list[int] = []
    monkeypatch.setattr(heap, "release_free_memory", lambda: trims.append(1))  # a worker thread
    sleep = GatedSleep()
    idle = heap.IdleTrim(idle_s=0.2, sleep=sleep)
    async with anyio.create_task_group() as tg:
        idle.job_started()
        idle.job_started()
        idle.job_finished(tg)  # one still running: nothing waits to trim
        await wait_until(lambda: True)
        assert sleep.waiting == []
        idle.job_finished(tg)  # idle from here...
        await wait_until(lambda: len(sleep.waiting) == 1)
        idle.job_started()  # ...until a job comes within the window: that trim is void
        idle.job_finished(tg)
        await wait_until(lambda: len(sleep.waiting) == 2)
        assert [seconds for seconds, _ in sleep.waiting] == [0.2, 0.2]
        sleep.waiting[0][1].set()  # the first window ends after the newer job: no trim
        await wait_until(lambda: True)
        assert trims == []
        sleep.open_all()  # the idle time after the last job is up
        await wait_until(lambda: len(trims) == 1)
    assert trims == [1]
