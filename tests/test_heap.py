"""How the server keeps its memory flat: the settled heap, and image buffers returned on free."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mcp_imagegen import heap
from mcp_imagegen.models import ImageRequest
from mcp_imagegen.service import ImageService
from tests.conftest import make_settings

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None


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


# A fresh interpreter frees one big buffer (which raises glibc's dynamic threshold above 2 MiB),
# then fills and frees twenty 2 MiB buffers while one small block stays allocated after them, so
# free() cannot hand the space back by shrinking the heap. Prints how much RSS that left behind.
_LEFT_BEHIND = textwrap.dedent(
    """
    import sys
    from mcp_imagegen import heap
    if sys.argv[1] == "pin":
        assert heap.pin_mmap_threshold()
    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    big = b"\\x01" * (8 << 20)
    del big
    before = rss_mib()
    buffers = [b"\\x01" * (2 << 20) for _ in range(20)]
    pinned = bytearray(b"\\x01" * 4096)
    del buffers
    print(rss_mib() - before)
    """
)


def _left_behind_mib(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _LEFT_BEHIND, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=60,
    )
    return float(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_pinned_threshold_returns_image_sized_buffers_on_free() -> None:
    assert _left_behind_mib("default") > 20  # glibc's own behaviour: the 40 MiB stay
    assert _left_behind_mib("pin") < 8


@pytest.mark.anyio
async def test_the_threshold_is_pinned_before_the_first_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(heap, "pin_mmap_threshold", lambda: calls.append("pinned") or True)
    settings = make_settings(tmp_path, [{"name": "offline", "provider": "offline"}])
    async with ImageService(settings) as service:
        assert calls == []
        await service.generate(ImageRequest(operation="generate", prompt="a red fox", size="64x64"))
    assert calls and calls[0] == "pinned"
