"""recovery.py: what a crash leaves in the output folder is put right at start, and no live
writer's file is touched."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest

from mcp_imagegen.recovery import LOCK_NAME, keep_unsaved
from mcp_imagegen.store import TMP_SUFFIX, ImageStore
from tests.test_store import png, save


def leftovers(out: Path) -> dict[str, Path]:
    """What a process killed mid-save leaves, named exactly as the store names its files."""
    meta = out / ".mcp-imagegen"
    meta.mkdir(parents=True)
    whole = png((20, 10), "blue")
    made = {
        "whole": out / f".20260101-120000_a-blue-sky_AbCdEf.png.1a2b3c4d{TMP_SUFFIX}",
        "torn": out / f".20260101-120001_a-torn-one_GhIjKl.png.5e6f7a8b{TMP_SUFFIX}",
        "record_whole": meta / f".MnOpQrStUvWxYz0123456789.json.0c1d2e3f{TMP_SUFFIX}",
        "record_torn": meta / f".ZzZzZzZzZzZzZzZzZzZzZz.json.4a5b6c7d{TMP_SUFFIX}",
        "unrecorded": out / "20260101-120002_a-lost-record_QrStUv.png",
        "theirs": out / "holiday.png",
    }
    made["whole"].write_bytes(whole)
    made["torn"].write_bytes(whole[: len(whole) // 2])
    made["record_whole"].write_text(json.dumps({"id": "MnOpQrStUvWxYz0123456789"}))
    made["record_torn"].write_text('{"id": "Zz')
    made["unrecorded"].write_bytes(png((12, 8), "green"))
    made["theirs"].write_bytes(png())
    return made


def test_a_dead_processs_leftovers_are_completed_removed_or_adopted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    made = leftovers(out)
    recorded = save(ImageStore(out))  # an image with its record: left as it is
    store = ImageStore(out)
    store.open_live()
    try:
        assert not made["whole"].exists() and not made["torn"].exists()
        restored = out / "20260101-120000_a-blue-sky_AbCdEf.png"
        assert restored.read_bytes() == png((20, 10), "blue")
        assert not made["record_torn"].exists()
        assert (out / ".mcp-imagegen" / "MnOpQrStUvWxYz0123456789.json").exists()
        by_path = {Path(r.path).name: r for r in store.recent(100)}
        # The completed partial and the image that lost its record are both reachable now.
        assert by_path[restored.name].width == 20 and by_path[restored.name].id.startswith("AbCdEf")
        assert by_path[made["unrecorded"].name].prompt == "a lost record"
        assert store.read_bytes(by_path[restored.name].id)[0] == restored.read_bytes()
        assert recorded.id in {r.id for r in by_path.values()}
        assert "holiday.png" not in by_path and made["theirs"].exists()  # not a name this server makes
        assert not [p for p in out.rglob("*") if p.name.endswith(TMP_SUFFIX)]
    finally:
        store.close_live()
    again = ImageStore(out)  # a second start adopts nothing twice
    again.open_live()
    again.close_live()
    assert len(again.recent(100)) == 3


def test_young_leftovers_are_left_to_a_live_writer(tmp_path: Path) -> None:
    out = tmp_path / "out"
    made = leftovers(out)
    with open(out / ".mcp-imagegen" / LOCK_NAME, "ab") as other:  # another server process is running
        fcntl.flock(other, fcntl.LOCK_SH)
        store = ImageStore(out)
        store.open_live()
        store.close_live()
    assert all(path.exists() for path in made.values())
    assert store.recent(100) == []


def test_bytes_of_a_failed_save_are_kept_in_the_state_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    kept = keep_unsaved(b"\x89PNG...", "job_x_1.png", {"prompt": "a fox"})
    assert kept is not None and kept == tmp_path / "state" / "mcp-imagegen" / "recovered" / "job_x_1.png"
    assert kept.read_bytes() == b"\x89PNG..."
    assert json.loads(Path(f"{kept}.json").read_text())["prompt"] == "a fox"
