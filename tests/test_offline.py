"""offline.py: the built-in deterministic renderer."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageChops

from mcp_imagegen import images, offline
from mcp_imagegen.errors import InvalidRequestError


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def load(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_render_is_deterministic() -> None:
    a = offline.render("a red fox in the snow", 320, 240, seed=7, index=0)
    assert a == offline.render("a red fox in the snow", 320, 240, seed=7, index=0)
    assert images.sniff(a) == ("image/png", 320, 240)


@pytest.mark.parametrize(
    "change",
    [{"seed": 8}, {"index": 1}, {"prompt": "a blue fox in the snow"}, {"seed": None}],
)
def test_render_differs_when_inputs_differ(change: dict[str, object]) -> None:
    args: dict[str, object] = {"prompt": "a red fox in the snow", "seed": 7, "index": 0}
    base = offline.render(args["prompt"], 320, 240, seed=args["seed"], index=args["index"])  # type: ignore[arg-type]
    args.update(change)
    other = offline.render(args["prompt"], 320, 240, seed=args["seed"], index=args["index"])  # type: ignore[arg-type]
    assert other != base


@pytest.mark.parametrize(("fmt", "mime"), [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_render_formats(fmt: str, mime: str) -> None:
    out = offline.render("x", 200, 100, seed=1, index=0, output_format=fmt)
    assert images.sniff(out) == (mime, 200, 100)


@pytest.mark.parametrize(
    "prompt",
    ["", "日本語のプロンプト 🦊", "word " * 2000, "x" * 5000, "  spaced\n\tout  "],
)
def test_render_any_prompt_and_tiny_sizes(prompt: str) -> None:
    for w, h in ((16, 16), (300, 40), (64, 900)):
        assert images.sniff(offline.render(prompt, w, h, seed=None, index=0))[1:] == (w, h)


def test_render_refuses_impossible_size() -> None:
    with pytest.raises(InvalidRequestError, match="1x1 to 8192x8192"):
        offline.render("x", 0, 10, seed=None, index=0)


# --- edit ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base() -> bytes:
    return offline.render("base picture", 256, 192, seed=3, index=0)


def test_edit_changes_only_inside_the_mask(base: bytes) -> None:
    mask = Image.new("L", (256, 192), 0)
    mask.paste(255, (40, 30, 140, 120))  # white = edit here
    out = load(offline.edit([base], "add a hat", mask=png(mask), seed=1, index=0))
    diff = ImageChops.difference(out.convert("RGB"), load(base).convert("RGB"))
    bbox = diff.getbbox()
    assert bbox is not None, "nothing was repainted"
    x0, y0, x1, y1 = bbox
    assert x0 >= 40 and y0 >= 30 and x1 <= 140 and y1 <= 120


def test_edit_with_alpha_mask_and_different_mask_size(base: bytes) -> None:
    # OpenAI convention, at half resolution: transparent = edit here.
    mask = Image.new("RGBA", (128, 96), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (64, 48, 128, 96))
    out = load(offline.edit([base], "paint", mask=png(mask), seed=None, index=0))
    bbox = ImageChops.difference(out.convert("RGB"), load(base).convert("RGB")).getbbox()
    assert bbox is not None and bbox[0] >= 128 and bbox[1] >= 96


def test_edit_is_deterministic_and_strength_matters(base: bytes) -> None:
    a = offline.edit([base], "make it blue", mask=None, seed=5, index=0, strength=0.5)
    assert a == offline.edit([base], "make it blue", mask=None, seed=5, index=0, strength=0.5)
    assert a != offline.edit([base], "make it blue", mask=None, seed=6, index=0, strength=0.5)
    untouched = offline.edit([base], "make it blue", mask=None, seed=5, index=0, strength=0.0)
    assert ImageChops.difference(load(untouched).convert("RGB"), load(base).convert("RGB")).getbbox() is None


def test_edit_resizes_and_shows_other_images(base: bytes) -> None:
    other = png(Image.new("RGB", (50, 50), (255, 0, 0)))
    out = offline.edit(
        [base, other, other],
        "combine",
        mask=None,
        width=400,
        height=300,
        seed=1,
        index=0,
        strength=1.0,
        output_format="webp",
    )
    assert images.sniff(out) == ("image/webp", 400, 300)
    one = offline.edit([base], "combine", mask=None, width=400, height=300, seed=1, index=0, strength=1.0)
    assert load(out).size == load(one).size
    # The red thumbnails sit in the top-right corner.
    r, g, b = load(out).convert("RGB").getpixel((400 - 20, 20))
    assert r > 180 and g < 90 and b < 90


def test_edit_keeps_transparency_of_the_input() -> None:
    im = Image.new("RGBA", (64, 64), (0, 128, 0, 0))
    out = load(offline.edit([png(im)], "x", mask=None, seed=None, index=0, strength=0.5))
    assert out.mode == "RGBA"


def test_edit_needs_an_image() -> None:
    with pytest.raises(InvalidRequestError, match="at least one"):
        offline.edit([], "x", mask=None, seed=None, index=0)
