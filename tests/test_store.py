"""store.py: saved images, their records, ids and URIs."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mcp_imagegen import store as store_mod
from mcp_imagegen.errors import ConfigError, InputNotFoundError, InvalidRequestError
from mcp_imagegen.store import TMP_SUFFIX, ImageStore, NewImage


def png(size: tuple[int, int] = (8, 6), color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def save(st: ImageStore, data: bytes | None = None, **over: Any) -> Any:
    kw: dict[str, Any] = dict(
        mime_type="image/png",
        width=8,
        height=6,
        prompt="A red fox, in the snow!",
        operation="generate",
        model="gpt-image-1",
        endpoint="main",
        provider="openai",
        parameters={"size": "8x6"},
        parent_ids=[],
        revised_prompt=None,
        job_id=None,
    )
    kw.update(over)
    return st.save(data if data is not None else png(), NewImage(**kw))


def test_save_writes_file_and_record(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    st = ImageStore(out)
    assert not out.exists()  # created lazily, on the first save
    data = png()
    rec = save(st, data)
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", rec.id)
    assert rec.uri == f"imagegen://images/{rec.id}"
    path = Path(rec.path)
    assert path.parent == out and path.read_bytes() == data
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}_a-red-fox-in-the-snow_{re.escape(rec.id[:6])}\.png", path.name)
    meta = json.loads((out / ".mcp-imagegen" / f"{rec.id}.json").read_text())
    assert meta["prompt"] == "A red fox, in the snow!" and meta["bytes"] == len(data)
    assert meta["created_at"].endswith("Z")
    assert st.get(rec.id) == rec
    assert st.read_bytes(rec.id) == (data, "image/png")
    assert st.resolve_uri(rec.uri) == rec
    assert not [p for p in out.rglob("*") if p.name.endswith(TMP_SUFFIX)]


def test_ids_are_unguessable(tmp_path: Path) -> None:
    st = ImageStore(tmp_path)
    ids = {save(st).id for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) >= 22 for i in ids)


def test_slug_is_readable_and_bounded(tmp_path: Path) -> None:
    st = ImageStore(tmp_path)
    long = save(st, prompt="Ünïcödé  café — " + "word " * 40)
    name = Path(long.path).name
    slug = name.split("_", 1)[1].removesuffix(f"_{long.id[:6]}.png")  # ids may contain "_" too
    assert slug.startswith("unicode-cafe-word") and len(slug) <= 40
    assert "_image_" in Path(save(st, prompt="🦊🦊").path).name


def test_records_survive_a_new_instance(tmp_path: Path) -> None:
    rec = save(ImageStore(tmp_path), parameters={"seed": 3, "extra": {"a": [1, 2]}})
    again = ImageStore(tmp_path).get(rec.id)
    assert again == rec and again.parameters == {"seed": 3, "extra": {"a": [1, 2]}}


@pytest.mark.parametrize(
    "bad",
    ["../x", "..", "a/b", "", "x" * 100, "abc", "../../etc/passwd", "AAAAAAAAAAAAAAAA\x00", "ok_but_has.dot.json"],
)
def test_bad_ids_are_refused_before_touching_the_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    st = ImageStore(tmp_path)

    def no_fs(*a: object, **k: object) -> None:
        raise AssertionError("the filesystem was touched for an invalid id")

    monkeypatch.setattr(ImageStore, "_read_record", no_fs)
    monkeypatch.setattr(Path, "read_bytes", no_fs)
    with pytest.raises(InputNotFoundError, match="ids come from generate_image/edit_image"):
        st.get(bad)
    with pytest.raises(InputNotFoundError):
        st.resolve_uri("imagegen://images/" + bad)


def test_a_moved_output_dir_still_works(tmp_path: Path) -> None:
    rec = save(ImageStore(tmp_path / "old"))
    (tmp_path / "old").rename(tmp_path / "new")
    moved = ImageStore(tmp_path / "new").get(rec.id)
    assert moved.path == str(tmp_path / "new" / Path(rec.path).name)
    assert ImageStore(tmp_path / "new").read_bytes(rec.id)[0] == png()


def test_unknown_id_and_bad_uri(tmp_path: Path) -> None:
    st = ImageStore(tmp_path)
    with pytest.raises(InputNotFoundError, match="no saved image with id 'AAAAAAAAAAAAAAAAAAAAAA'"):
        st.get("A" * 22)
    with pytest.raises(InvalidRequestError, match="imagegen://images/<id>"):
        st.resolve_uri("https://example.com/x.png")


def test_crash_between_image_and_record_leaves_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = ImageStore(tmp_path)
    real_replace = os.replace

    def crash_on_metadata(src: Any, dst: Any) -> None:
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", crash_on_metadata)
    with pytest.raises(ConfigError, match="No space left on device"):
        save(st)
    monkeypatch.undo()

    meta = tmp_path / ".mcp-imagegen"
    assert list(meta.glob("*.json")) == []
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(TMP_SUFFIX)]  # temp cleaned up
    assert st.recent() == []
    assert ImageStore(tmp_path).recent() == []
    # The image itself may exist, but it is never presented as a saved result.
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".png"]) == 1


def test_crash_while_writing_the_image_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = ImageStore(tmp_path)

    def fail_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(store_mod.os, "fsync", fail_fsync)
    with pytest.raises(ConfigError, match="I/O error"):
        save(st)
    monkeypatch.undo()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_recent_is_newest_first_and_skips_deleted(tmp_path: Path) -> None:
    st = ImageStore(tmp_path)
    recs = [save(st, prompt=f"picture {i}") for i in range(5)]
    assert [r.id for r in st.recent()] == [r.id for r in reversed(recs)]
    assert [r.id for r in st.recent(limit=2)] == [recs[4].id, recs[3].id]
    assert st.recent(limit=0) == []
    Path(recs[4].path).unlink()
    assert [r.id for r in st.recent(limit=2)] == [recs[3].id, recs[2].id]
    with pytest.raises(InputNotFoundError, match="deleted"):
        st.get(recs[4].id)
    (tmp_path / ".mcp-imagegen" / "garbage.json").write_text("{not json")
    assert len(st.recent()) == 4


def test_recent_on_a_fresh_store(tmp_path: Path) -> None:
    assert ImageStore(tmp_path / "missing").recent() == []


def test_lineage_follows_first_parent_oldest_first(tmp_path: Path) -> None:
    st = ImageStore(tmp_path)
    a = save(st, prompt="a")
    b = save(st, prompt="b", operation="edit", parent_ids=[a.id])
    c = save(st, prompt="c", operation="edit", parent_ids=[b.id, a.id])
    d = save(st, prompt="d", operation="edit", parent_ids=[c.id])
    assert [r.id for r in st.lineage(d.id, max_depth=10)] == [a.id, b.id, c.id, d.id]
    assert [r.id for r in st.lineage(d.id, max_depth=2)] == [b.id, c.id, d.id]
    assert [r.id for r in st.lineage(a.id)] == [a.id]
    Path(b.path).unlink()
    assert [r.id for r in st.lineage(d.id)] == [c.id, d.id]


def test_is_inside(tmp_path: Path) -> None:
    out = tmp_path / "out"
    st = ImageStore(out)
    rec = save(st)
    assert st.is_inside(rec.path)
    assert st.is_inside(out / "sub" / "x.png")
    assert not st.is_inside(out / ".." / "x.png")
    assert not st.is_inside(tmp_path / "outside.png")
    (out / "link").symlink_to(tmp_path)
    assert not st.is_inside(out / "link" / "outside.png")


def test_unwritable_output_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    st = ImageStore(blocker / "images")  # cannot mkdir under a regular file (even as root)
    with pytest.raises(ConfigError, match=r"output_dir .*a-file/images is not writable: .*MCP_IMAGEGEN_OUTPUT_DIR"):
        save(st)


def test_unknown_mime_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="image/bmp"):
        save(ImageStore(tmp_path), mime_type="image/bmp")


def test_an_svg_and_a_gif_keep_their_type_extension_and_frames(tmp_path: Path) -> None:
    st = ImageStore(tmp_path / "out")
    doc = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="6"/>'
    vector = save(st, doc, mime_type="image/svg+xml")
    assert vector.path.endswith(".svg") and Path(vector.path).read_bytes() == doc and vector.frames is None
    assert st.read_bytes(vector.id) == (doc, "image/svg+xml")
    gif = save(st, b"GIF89a-not-checked-here", mime_type="image/gif", frames=4)
    assert gif.path.endswith(".gif") and st.get(gif.id).frames == 4
