"""The process's memory: start-up's objects kept out of the garbage collector's way, and one
malloc arena shared by every thread.

Every image passes through buffers of megabytes (the answer's base64, the decoded file, Pillow's
pixels), made and freed on the event loop's thread and on worker threads. glibc gives each
thread that allocates at the same time as another its own arena, and each arena keeps what its
thread freed. With the default, the server settled at ~95 MiB after a step of ~8 MiB that came at
a different call in each run, so RSS after 200 calls against after 20 read 1.01x to 1.11x. With
one arena it holds ~80 MiB from the first call, and the peak for 8 concurrent photos fell from
143 to 117 MiB (`python -m bench --only memory`). The price, ~7 ms per photo-sized image for
pages given back and faulted in again, is small next to a gateway call.
"""

from __future__ import annotations

import gc
import os
import sys

_M_ARENA_MAX = -8  # glibc's malloc.h
_settled = False


def use_one_malloc_arena() -> bool:
    """Make every thread allocate from glibc's main arena; call before any thread starts.

    False, and nothing changed, where there is no glibc (macOS, Windows, musl) or where the
    user chose for themselves with glibc's own MALLOC_ARENA_MAX.
    """
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    import ctypes  # ~3 ms, paid only by a serving process

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_ARENA_MAX, 1) == 1


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
