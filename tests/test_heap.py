"""The process's memory: the garbage collector settled once, and one malloc arena for all threads."""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mcp_imagegen import heap

REPO = Path(__file__).resolve().parent.parent


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


# Four threads allocate at once; then glibc's malloc_info says how many arenas the process has.
ARENAS_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys, tempfile, threading
    from mcp_imagegen.heap import use_one_malloc_arena

    changed = use_one_malloc_arena() if sys.argv[1] == "one" else False
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
        print(changed, open(out.name).read().count("<heap nr="))
    """
)


def _arenas(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", ARENAS_SCRIPT, mode], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    changed, count = done.stdout.split()
    return changed, int(count)


def _has_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _has_glibc(), reason="glibc's arenas only")
def test_every_thread_allocates_from_one_arena() -> None:
    assert _arenas("default")[1] > 1  # what glibc does by itself: an arena per thread
    assert _arenas("one") == ("True", 1)


def test_a_users_own_malloc_arena_max_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert heap.use_one_malloc_arena() is False
