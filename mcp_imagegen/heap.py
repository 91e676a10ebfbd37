"""How the server keeps its memory flat: start-up's objects out of the garbage collector's way,
and image-sized buffers given back to the system as soon as they are freed.

Every image passes through buffers of megabytes: the answer's base64, the decoded file, Pillow's
pixels. glibc serves the first such buffer with its own mapping and unmaps it on free, but then
raises its mmap threshold to the size just freed (up to 32 MiB). From then on these buffers come
from the heap, one arena per worker thread, and their memory stays with the process: the server
settled at ~110 MiB instead of ~78 MiB, after a step of ~8 MiB that came at a different call in
each run. Pinning the threshold costs each photo-sized answer ~15 ms of fresh page faults, next
to a gateway call of 10 s and more (python -m bench --only memory,overhead).
"""

from __future__ import annotations

import gc
import sys
from functools import cache

# Buffers from this size up get their own mapping. Previews and JSON of small answers stay below.
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h

_settled = False


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


@cache
def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES (which also stops its dynamic rise).

    Once per process; False where there is no glibc (macOS, Windows, musl), which manage large
    blocks their own way.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # here, not at start-up

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
