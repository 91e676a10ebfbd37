"""Check before paying: a full or read-only output folder is refused before any gateway request,
and a save that fails anyway says why in plain words and keeps the bytes somewhere recoverable.

Read-only is made real even for root (who ignores permission bits): an immutable folder
(chattr +i) or a read-only tmpfs where the machine allows it, permission bits otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client
from mcp_types import TextContent
from pydantic import SecretStr

from mcp_imagegen.config import EndpointConfig, Settings
from mcp_imagegen.server import build_server
from mcp_imagegen.store import MIN_FREE_ENV
from tests.emulators.base import DEFAULT_API_KEY

pytestmark = [pytest.mark.anyio]
GENERATIONS = "/images/generations"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings_for(out: Path, emu: Any) -> Settings:
    endpoint = EndpointConfig(name="gw", provider="openai", base_url=emu.base_url)
    endpoint.api_key = SecretStr(DEFAULT_API_KEY)
    return Settings(output_dir=out, endpoints=[endpoint], allowed_roots=[])


async def call(settings: Settings) -> tuple[bool, str]:
    with anyio.fail_after(60):
        async with Client(build_server(settings), mode="legacy") as client:
            result = await client.call_tool("generate_image", {"prompt": "a fox", "model": "gpt-image-1"})
    text = "\n".join(b.text for b in result.content if isinstance(b, TextContent))
    return bool(result.is_error), text


def _run(*command: str) -> bool:
    if shutil.which(command[0]) is None:
        return False
    return subprocess.run(command, capture_output=True).returncode == 0


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif _run("chattr", "+i", str(folder)):
        yield folder
        _run("chattr", "-i", str(folder))
    elif _run("mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)):
        yield folder
        _run("umount", str(folder))
    else:
        pytest.skip("no way to make a folder read-only for root here (no chattr, no mount)")
    probe = folder / "probe"
    assert not probe.exists()


async def test_read_only_output_folder_is_refused_before_anything_is_sent(
    read_only_folder: Path, emulator: Any
) -> None:
    emu = emulator("openai", serve_retired=True)
    with pytest.raises(OSError):  # really read-only, even for root
        (read_only_folder / "probe").write_bytes(b"x")
    is_error, text = await call(settings_for(read_only_folder, emu))
    assert is_error
    assert f"output_dir {read_only_folder} is not writable" in text and "nothing was sent to the gateway" in text
    assert "ExceptionGroup" not in text
    assert emu.requests_to(GENERATIONS) == []


async def test_full_output_folder_is_refused_before_anything_is_sent(
    tmp_path: Path, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = emulator("openai", serve_retired=True)
    free_mib = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    monkeypatch.setenv(MIN_FREE_ENV, str(free_mib * 2 + 1024))  # more than the disk has
    is_error, text = await call(settings_for(tmp_path / "out", emu))
    assert is_error
    assert f"output_dir {tmp_path / 'out'} has only" in text and "MiB free" in text
    assert "nothing was sent to the gateway" in text
    assert emu.requests_to(GENERATIONS) == []


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB filesystem: room for the check's probe and records, not for a photo-sized image."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if os.geteuid() != 0 or not _run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)):
        pytest.skip("needs a real small filesystem (root and mount)")
    yield folder
    _run("umount", str(folder))


async def test_a_save_that_fails_anyway_keeps_the_bytes_and_says_why(
    tmp_path: Path, tiny_disk: Path, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = emulator("openai", serve_retired=True, image_kind="photo")  # megabytes per image: more than the disk holds
    monkeypatch.setenv(MIN_FREE_ENV, "0")  # the check passes; the disk fills during the save
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    is_error, text = await call(settings_for(tiny_disk, emu))
    assert is_error and emu.served(GENERATIONS) == 1
    assert "was received (and paid for) but could not be saved" in text
    assert "No space left on device" in text and "ExceptionGroup" not in text
    kept = Path(text.split("Its bytes were kept at ", 1)[1].split(". ", 1)[0].rstrip("."))
    assert kept.is_relative_to(tmp_path / "state" / "mcp-imagegen" / "recovered")
    assert kept.stat().st_size > 1024 * 1024 and Path(f"{kept}.json").is_file()
