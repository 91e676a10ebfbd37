"""The process's memory: how malloc treats image-sized buffers, when freed memory goes back to the
system, and start-up's objects kept out of the garbage collector's way.

Every image passes through buffers of megabytes (the answer's base64, the decoded file, Pillow's
pixels), made and freed on the event loop's thread and on worker threads. By default glibc gives
such a buffer its own mapping or trims it off a per-thread heap when freed, so the next image
faults the same pages in again, and each thread's heap keeps what it freed.

`python -m bench --only memory`, against `MALLOC_ARENA_MAX=16 python -m bench --only memory`
(any MALLOC_* variable leaves glibc's defaults in place), two runs each:

- glibc's defaults: 45.5 ms of server CPU per sequential photo call; peak for 8 concurrent
  photos 134-143 MiB.
- One arena for all threads, buffers up to 32 MiB from the heap, the heap's top trimmed beyond
  64 MiB: 37.8-38.6 ms per call; peak 113-115 MiB; RSS after 200 calls 1.01x of after 20.

Kept in the heap, freed memory would stay with the process after a burst, so once no job has run
for IDLE_S it is handed back with `malloc_trim`: 3 s after the 8 photos, 77 MiB (glibc's
defaults: 84-89 MiB).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .work import in_worker

IDLE_S = 2.0
_MIB = 1 << 20
# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 32 * _MIB), (_M_TRIM_THRESHOLD, 64 * _MIB))

_settled = False


@cache
def _glibc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # ~3 ms, paid only where memory is managed

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # musl, or no C library by that name
        return None
    return libc


def configure_malloc() -> bool:
    """Set glibc's malloc for image-sized buffers (see above); call before any thread starts.

    False, and nothing changed, where there is no glibc (macOS, Windows, musl) or where the
    user tuned malloc themselves through glibc's MALLOC_* variables.
    """
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    libc = _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system; nothing where there is no glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class IdleTrim:
    """Calls `release_free_memory` once the server has run no job for `idle_s`."""

    def __init__(self, idle_s: float = IDLE_S, sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> None:
        self.idle_s = idle_s
        self._sleep = sleep  # replaceable, so that a test decides when the idle time is up
        self._running = 0
        self._generation = 0  # jobs started so far: a trim scheduled before a newer job is void

    def job_started(self) -> None:
        self._running += 1
        self._generation += 1

    def job_finished(self, tasks: TaskGroup) -> None:
        self._running -= 1
        if self._running == 0:
            tasks.start_soon(self._trim_if_still_idle, self._generation, name="memory trim when idle")

    async def _trim_if_still_idle(self, generation: int) -> None:
        await self._sleep(self.idle_s)
        if self._running == 0 and generation == self._generation:
            await in_worker(release_free_memory)


def resume_collections() -> None:
    """Start-up is over: collections run again, and what start-up made is frozen out of them.

    `cli.main` turns the collector off first thing: importing the SDK, pydantic and this
    package and building the tools' schemas makes hundreds of thousands of objects and almost
    no garbage, and the collections they trigger cost 40-70 ms of a ~550 ms start.
    """
    gc.freeze()
    gc.enable()


def settle_heap() -> None:
    """Move everything alive now (modules, the SDK, schemas) out of the garbage collector's way.

    A full collection scans every tracked object; with the SDK and pydantic loaded that is a
    pause of 50-70 ms on the event loop every hundred calls or so. Called once, after the first
    generation has loaded the lazy modules, so later collections scan only what calls create.
    No collection first: that would be one such pause itself, and keeping start-up's little
    cyclic garbage costs less. Once per process: what later calls leave behind stays collectable.
    """
    global _settled
    if not _settled:
        _settled = True
        gc.freeze()
