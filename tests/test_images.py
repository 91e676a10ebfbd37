"""images.py: sniffing, limits, previews, fitting, masks, data URLs."""

from __future__ import annotations

import base64
import functools
import io
import struct
import warnings
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageChops

from mcp_imagegen import b64, images, svg
from mcp_imagegen.errors import InvalidRequestError


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@functools.cache
def photo_like(w: int, h: int, fmt: str = "PNG", sigma: float = 40, **kw: object) -> bytes:
    """Gradients plus noise: compresses like a photo, unlike a flat test card. (Cached: slow.)"""
    tile = Image.merge("RGB", [Image.effect_noise((min(w, 512), min(h, 512)), sigma * f) for f in (1, 0.9, 1.1)])
    noise = Image.new("RGB", (w, h))
    for y in range(0, h, tile.height):
        for x in range(0, w, tile.width):
            noise.paste(tile, (x, y))
    grad = Image.merge("RGB", [Image.linear_gradient("L").rotate(30 * i).resize((w, h)) for i in range(3)])
    im = ImageChops.add(ImageChops.multiply(grad, Image.new("RGB", (w, h), (200, 200, 200))), noise, scale=1.4)
    return encode(im, fmt, **kw)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose valid header claims width x height, with a tiny (wrong) body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


# --- sniff --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime", "mode"),
    [
        ("PNG", "image/png", "RGB"),
        ("PNG", "image/png", "RGBA"),
        ("JPEG", "image/jpeg", "RGB"),
        ("WEBP", "image/webp", "RGB"),
        ("WEBP", "image/webp", "RGBA"),
        ("GIF", "image/gif", "P"),
    ],
)
@pytest.mark.parametrize("verify", [True, False])
def test_sniff_each_format(fmt: str, mime: str, mode: str, verify: bool) -> None:
    data = encode(Image.new(mode, (37, 21), 100 if mode == "P" else None), fmt)
    assert images.sniff(data, "test", verify=verify) == (mime, 37, 21)


def test_sniff_lossless_webp_header() -> None:
    data = encode(Image.new("RGB", (300, 77), (1, 2, 3)), "WEBP", lossless=True)
    assert images.sniff(data) == ("image/webp", 300, 77)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
@pytest.mark.parametrize("verify", [True, False])
def test_truncated_images_are_refused(fmt: str, verify: bool) -> None:
    im = Image.open(io.BytesIO(photo_like(96, 64))).convert("RGB")
    data = encode(im if fmt != "GIF" else im.convert("P"), fmt)
    cut = data[: len(data) * 2 // 3]
    with pytest.raises(InvalidRequestError, match=r"upload\.x is truncated"):
        images.sniff(cut, "upload.x", verify=verify)


def test_truncated_header() -> None:
    with pytest.raises(InvalidRequestError, match="is truncated"):
        images.sniff(photo_like(32, 32)[:20], "x")


@pytest.mark.parametrize(
    ("data", "hint"),
    [
        (b"hello, this is just a text file\n", "looks like text"),
        (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "HTML page"),
        (b'{"error": "nope"}', "JSON"),
        (b"", "empty"),
        (b"BM" + b"\x00" * 60, "BMP"),
        (b"\x00\x01\x02\x03\xff\xfe", "starts with bytes"),
    ],
)
def test_non_images_are_named(data: bytes, hint: str) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        images.sniff(data, "file notes.txt")
    assert "file notes.txt is not an image (PNG, JPEG, WebP or GIF)" in str(exc.value)
    assert hint in str(exc.value)


def test_header_bomb_refused_without_warning() -> None:
    data = png_claiming(100_000, 100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            InvalidRequestError, match=r"has 10000 megapixels \(100000x100000\), more than the 64 allowed"
        ):
            images.sniff(data, "bomb.png")
        # Between Pillow's warning and error thresholds: still our error, never Pillow's warning.
        with pytest.raises(InvalidRequestError, match="megapixels"):
            images.sniff(png_claiming(10_000, 9_000), "bomb.png", verify=False)
        with pytest.raises(InvalidRequestError, match="megapixels"):
            images.make_preview(data)


def test_real_compressed_bomb_is_refused_fast() -> None:
    # 81 megapixels of one colour: a small file that would take ~250 MB once decoded as RGBA.
    data = encode(Image.new("1", (9000, 9000), 0), "PNG")
    assert len(data) < 200_000
    with pytest.raises(InvalidRequestError, match="megapixels"):
        images.sniff(data, "bomb")


def test_jpeg_header_bomb() -> None:
    data = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    i = 2
    while data[i + 1] not in (0xC0, 0xC2):  # find the frame header and enlarge it
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    data[i + 5 : i + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(InvalidRequestError, match="megapixels"):
        images.sniff(bytes(data), "big.jpg")


# --- previews -----------------------------------------------------------------------------------


def test_preview_of_big_photo_stays_in_budget() -> None:
    data = photo_like(4096, 4096, "JPEG", quality=95)
    assert len(data) > 5_000_000
    out, mime = images.make_preview(data)
    assert mime == "image/jpeg"  # opaque: JPEG, which every client shows
    assert len(out) <= 200_000
    im = Image.open(io.BytesIO(out))
    assert max(im.size) == 512


def test_preview_lowers_quality_to_meet_a_tight_budget() -> None:
    data = photo_like(1024, 768)
    out, _ = images.make_preview(data, max_px=384, max_bytes=6_000)
    assert len(out) <= 6_000
    assert Image.open(io.BytesIO(out)).size[0] <= 384


def test_preview_keeps_transparency_and_aspect() -> None:
    im = Image.new("RGBA", (1000, 400), (255, 0, 0, 255))
    im.paste((0, 0, 0, 0), (0, 0, 500, 400))
    out, mime = images.make_preview(encode(im, "PNG"), max_px=256)
    p = Image.open(io.BytesIO(out))
    assert p.size == (256, 102)
    assert p.mode == "RGBA"
    assert p.getpixel((10, 50))[3] == 0 and p.getpixel((250, 50))[3] == 255


def test_small_file_is_shown_as_it_is_up_to_twice_the_preview_side() -> None:
    flat = encode(Image.new("RGB", (1024, 1024), "teal"), "PNG")
    assert len(flat) < 20_000
    out, mime = images.make_preview(flat, max_px=512, max_bytes=20_000)
    assert (out, mime) == (flat, "image/png")  # not decoded, not re-encoded

    # Beyond twice the preview side, or beyond the byte budget, a real preview is made.
    wide = encode(Image.new("RGB", (1025, 600), "teal"), "PNG")
    out, mime = images.make_preview(wide, max_px=512, max_bytes=20_000)
    assert mime == "image/jpeg" and Image.open(io.BytesIO(out)).size == (512, 300)
    assert images.make_preview(flat, max_px=256, max_bytes=20_000)[1] == "image/jpeg"
    out, mime = images.make_preview(flat, max_px=512, max_bytes=len(flat) - 1)
    assert mime == "image/jpeg" and Image.open(io.BytesIO(out)).size == (512, 512)


def test_preview_of_small_image_is_not_enlarged() -> None:
    out, _ = images.make_preview(encode(Image.new("RGB", (40, 30), "blue"), "GIF"))
    assert Image.open(io.BytesIO(out)).size == (40, 30)


# --- fitting ------------------------------------------------------------------------------------


def test_fit_image_untouched_when_it_already_fits() -> None:
    data = photo_like(64, 64)
    assert images.fit_image(data, 1 << 20, ["image/png", "image/jpeg"]) == (data, "image/png", None)


def test_fit_image_shrinks_png_to_cap_and_says_so() -> None:
    data = photo_like(2048, 1536, compress_level=1)
    cap = 4 * 1024 * 1024
    assert len(data) > cap
    out, mime, note = images.fit_image(data, cap, ["image/png", "image/jpeg", "image/webp"], source="input photo.png")
    assert mime == "image/png" and len(out) <= cap
    w, h = Image.open(io.BytesIO(out)).size
    assert w < 2048 and abs(w / h - 2048 / 1536) < 0.01
    assert note is not None
    assert note.startswith("input photo.png was PNG 2048x1536 (")
    assert f"re-encoded as PNG {w}x{h}" in note and "to fit the gateway's 4 MB cap" in note


def test_fit_image_lossy_lowers_quality_first() -> None:
    data = photo_like(1024, 1024, "JPEG", quality=98)
    out, mime, note = images.fit_image(data, len(data) // 2, ["jpeg", "png"])
    assert mime == "image/jpeg" and len(out) <= len(data) // 2
    assert Image.open(io.BytesIO(out)).size == (1024, 1024)  # quality went down, not resolution
    assert note and "JPEG 1024x1024" in note


def test_fit_image_converts_disallowed_format() -> None:
    data = encode(Image.new("RGB", (50, 40), "green").convert("P"), "GIF")
    out, mime, note = images.fit_image(data, 1 << 20, ["image/png", "image/jpeg"])
    assert mime == "image/png" and images.sniff(out) == ("image/png", 50, 40)
    assert note and "takes only PNG, JPEG" in note


def test_fit_image_square_crop_keeps_alpha() -> None:
    im = Image.new("RGBA", (300, 200), (0, 0, 255, 255))
    im.paste((0, 0, 0, 0), (140, 90, 160, 110))  # a transparent spot in the centre
    out, mime, note = images.fit_image(encode(im, "PNG"), 1 << 20, ["image/png"], square=True)
    sq = Image.open(io.BytesIO(out))
    assert sq.size == (200, 200) and sq.mode == "RGBA"
    assert sq.getpixel((100, 100))[3] == 0 and sq.getpixel((5, 5))[3] == 255
    assert note and "square" in note


def test_downscale_to_fit() -> None:
    small = photo_like(64, 64)
    assert images.downscale_to_fit(small, 1 << 20) == (small, "image/png", 64, 64)
    big = photo_like(2048, 1536, compress_level=1)
    out, mime, w, h = images.downscale_to_fit(big, 300_000)
    assert 0.8 * 300_000 <= len(out) <= 300_000 and mime == "image/jpeg"  # fills the budget; opaque: JPEG
    assert images.sniff(out) == (mime, w, h) and abs(w / h - 4 / 3) < 0.01


# --- masks --------------------------------------------------------------------------------------


def alpha_mask(size: tuple[int, int], hole: tuple[int, int, int, int]) -> bytes:
    """OpenAI style: opaque everywhere, transparent where the image should change."""
    im = Image.new("RGBA", size, (0, 0, 0, 255))
    im.paste((0, 0, 0, 0), hole)
    return encode(im, "PNG")


def white_mask(size: tuple[int, int], hole: tuple[int, int, int, int]) -> bytes:
    im = Image.new("L", size, 0)
    im.paste(255, hole)
    return encode(im, "PNG")


def expected_region(size: tuple[int, int], hole: tuple[int, int, int, int]) -> Image.Image:
    im = Image.new("L", size, 0)
    im.paste(255, hole)
    return im


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and ImageChops.difference(a, b).getbbox() is None


def test_mask_region_reads_both_conventions() -> None:
    hole = (10, 20, 40, 50)
    want = expected_region((64, 64), hole)
    assert same(images.mask_region(alpha_mask((64, 64), hole), 64, 64), want)
    assert same(images.mask_region(white_mask((64, 64), hole), 64, 64), want)


def test_mask_region_opaque_rgba_is_read_by_whiteness() -> None:
    im = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    im.paste((255, 255, 255, 255), (0, 0, 16, 32))
    assert same(images.mask_region(encode(im, "PNG"), 32, 32), expected_region((32, 32), (0, 0, 16, 32)))


def test_alpha_mask_to_white_and_back() -> None:
    hole = (8, 8, 24, 40)
    white = images.convert_mask(alpha_mask((32, 48), hole), width=64, height=96, semantics="white")
    w = Image.open(io.BytesIO(white))
    assert w.size == (64, 96) and w.mode == "L"
    assert same(w, expected_region((64, 96), (16, 16, 48, 80)))  # scaled 2x with NEAREST

    back = images.convert_mask(white, width=64, height=96, semantics="transparent")
    t = Image.open(io.BytesIO(back))
    assert t.mode == "RGBA"
    assert t.getpixel((30, 30))[3] == 0 and t.getpixel((2, 2))[3] == 255
    assert same(t.getchannel("A"), ImageChops.invert(expected_region((64, 96), (16, 16, 48, 80))))
    assert t.getchannel("A").getextrema() == (0, 255)
    assert t.getchannel("A").histogram().count(0) == 254  # only the values 0 and 255 occur


def test_white_mask_to_transparent_and_back() -> None:
    hole = (0, 0, 10, 10)
    t = images.convert_mask(white_mask((20, 20), hole), width=20, height=20, semantics="transparent")
    again = images.convert_mask(t, width=20, height=20, semantics="white")
    assert same(Image.open(io.BytesIO(again)), expected_region((20, 20), hole))


# --- encoding, data URLs, base64 ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "gif", "image/jpeg", "JPG"])
def test_encode_as_handles_modes(fmt: str) -> None:
    out = images.encode_as(Image.new("RGBA", (9, 7), (1, 2, 3, 128)), fmt)
    assert images.sniff(out) == (images.normalize_format(fmt), 9, 7)


def test_data_url_round_trip_and_tolerance() -> None:
    data = photo_like(8, 8)
    url = b64.data_url(data, "image/png")
    assert url.startswith("data:image/png;base64,")
    assert images.parse_data_url(url) == (data, "image/png")
    text = base64.b64encode(data).decode()
    messy = "DATA:Image/PNG;charset=x;base64," + "\n".join(text[i : i + 60] for i in range(0, len(text), 60)).rstrip(
        "="
    )
    assert images.parse_data_url(messy) == (data, "image/png")
    assert images.parse_data_url("data:;base64," + text)[1] == "application/octet-stream"


@pytest.mark.parametrize(
    ("url", "msg"),
    [
        ("image/png;base64,AAAA", "must start with 'data:'"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png,AAAA", "must be base64-encoded"),
        ("data:image png;base64,AAAA", "malformed header"),
        ("data:image/png;base64,", "is empty"),
        ("data:image/png;base64,AA*A", "not valid base64"),
        ("data:image/png;base64,A", "not valid base64"),
        ("data:image/png;base64,AA==AA", "not valid base64"),
    ],
)
def test_malformed_data_urls(url: str, msg: str) -> None:
    with pytest.raises(InvalidRequestError, match=msg):
        images.parse_data_url(url)


def test_decode_base64_variants() -> None:
    raw = bytes(range(256)) * 3
    std = base64.b64encode(raw).decode()
    assert images.decode_base64(std) == raw
    assert images.decode_base64(std.rstrip("=")) == raw
    assert images.decode_base64(" \n".join([std[:100], std[100:]])) == raw
    assert images.decode_base64(base64.urlsafe_b64encode(raw).decode()) == raw
    with pytest.raises(InvalidRequestError, match="image 2 is not valid base64"):
        images.decode_base64("héllo", "image 2")
    with pytest.raises(InvalidRequestError, match="more than"):
        images.decode_base64(base64.b64encode(b"x" * 2000).decode(), max_bytes=1000)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_data_url_only_raises_invalid_request(text: str) -> None:
    for candidate in (text, "data:" + text, "data:image/png;base64," + text):
        try:
            data, mime = images.parse_data_url(candidate)
        except InvalidRequestError:
            continue
        assert isinstance(data, bytes) and data and isinstance(mime, str)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_base64_only_raises_invalid_request(text: str) -> None:
    try:
        assert isinstance(images.decode_base64(text), bytes)
    except InvalidRequestError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.lists(st.integers(0, 400), max_size=5), st.booleans())
def test_decode_base64_round_trips_with_noise(raw: bytes, cuts: list[int], strip: bool) -> None:
    text = base64.b64encode(raw).decode()
    if strip:
        text = text.rstrip("=")
    for c in sorted(cuts, reverse=True):
        text = text[:c] + "\n " + text[c:]
    assert images.decode_base64(text) == raw


# --- outputs that are not plain rasters: SVG documents and animated GIFs ---------------------

SVG_BODY = b'<rect width="10" height="10"/></svg>\n'


def svg_doc(root_attrs: str, prolog: bytes = b"") -> bytes:
    return prolog + b'<svg xmlns="http://www.w3.org/2000/svg" ' + root_attrs.encode() + b">" + SVG_BODY


@pytest.mark.parametrize(
    "prolog",
    [
        b"",
        b'<?xml version="1.0" encoding="UTF-8"?>\n',
        b'\xef\xbb\xbf<?xml version="1.0"?>\n<!-- made by a model -->\n',
        b'<?xml version="1.0"?><!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/svg11.dtd">\n',
        b"  \n\t",
    ],
)
def test_svg_is_recognised_after_any_prolog(prolog: bytes) -> None:
    data = svg_doc('width="300" height="200"', prolog)
    assert svg.is_svg(data)
    out = images.inspect_output(data)
    assert (out.mime, out.width, out.height, out.frames, out.active_content) == ("image/svg+xml", 300, 200, None, False)


@pytest.mark.parametrize(
    "data",
    [
        b"<html><body><svg></svg></body></html>",
        b'<?xml version="1.0"?><feed><svg/></feed>',
        b"<svgx></svgx>",
        b"\x89PNG\r\n\x1a\n<svg>",
        b"",
    ],
)
def test_other_documents_are_not_svg(data: bytes) -> None:
    assert not svg.is_svg(data)


@pytest.mark.parametrize(
    ("attrs", "size"),
    [
        ('width="640" height="480"', (640, 480)),
        ('width="640px" height="480.4px"', (640, 480)),
        ('width="2in" height="1in"', (192, 96)),
        ('width="25.4mm" height="2.54cm"', (96, 96)),
        ('viewBox="0 0 1536 1024"', (1536, 1024)),
        ('viewBox="-10,-10,300,150" width="100%" height="100%"', (300, 150)),
        ("width='600' viewBox='0 0 300 150'", (600, 300)),
        ('height="50" viewBox="0 0 300 150"', (100, 50)),
        ('width="10em" height="5em"', (0, 0)),
        ("", (0, 0)),
    ],
)
def test_svg_size_comes_from_its_attributes_or_viewbox(attrs: str, size: tuple[int, int]) -> None:
    info = svg.inspect(svg_doc(attrs))
    assert (info.width, info.height) == size


def test_a_self_closed_svg_root_is_whole() -> None:
    assert svg.inspect(b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="4"/>')[:2] == (8, 4)


def test_a_truncated_svg_is_refused() -> None:
    whole = svg_doc('width="64" height="64"')
    with pytest.raises(InvalidRequestError, match="truncated SVG"):
        images.inspect_output(whole[: len(whole) - 12], "the answer")


def test_an_oversized_svg_is_refused_before_it_is_read() -> None:
    huge = b'<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1">' + b" " * svg.MAX_SVG_BYTES + b"</svg>"
    with pytest.raises(InvalidRequestError, match="16 MB allowed"):
        svg.inspect(huge)


def test_entities_in_a_hostile_svg_are_never_expanded() -> None:
    # A billion-laughs DTD: expanding it would take gigabytes. Nothing here parses XML.
    dtd = b'<!DOCTYPE svg [<!ENTITY a "ha">' + b"".join(
        b'<!ENTITY %s "%s">' % (b"e%d" % (i + 1), (b"&e%d;" % i if i else b"&a;") * 10) for i in range(9)
    )
    data = (
        b'<?xml version="1.0"?>'
        + dtd
        + b"]>"
        + svg_doc('width="32" height="16"').replace(b"<rect", b"<text>&e9;</text><rect")
    )
    info = svg.inspect(data)
    assert (info.width, info.height, info.active_content) == (32, 16, False)


@pytest.mark.parametrize(
    "inside",
    [
        "<script>alert(1)</script>",
        '<rect onclick="steal()"/>',
        '<image href="https://tracker.example/pixel.png"/>',
        '<use xlink:href="//evil.example/sprite.svg#a"/>',
        '<a href="javascript:alert(1)"><rect/></a>',
    ],
)
def test_scripts_and_external_references_are_flagged(inside: str) -> None:
    data = svg_doc('width="8" height="8"').replace(b"<rect", inside.encode() + b"<rect", 1)
    assert svg.inspect(data).active_content


def test_local_references_are_not_flagged() -> None:
    data = svg_doc('width="8" height="8"').replace(b"<rect", b'<use href="#shape"/><rect', 1)
    assert not svg.inspect(data).active_content


def animated(frames: int, size: tuple[int, int] = (40, 30)) -> bytes:
    colours = [(52, 101, 164), (204, 0, 0), (78, 154, 6), (196, 160, 0)]
    pictures = [Image.new("RGB", size, colours[i % 4]).convert("P") for i in range(frames)]
    buf = io.BytesIO()
    pictures[0].save(buf, "GIF", save_all=True, append_images=pictures[1:], duration=100, loop=0)
    return buf.getvalue()


@pytest.mark.parametrize("frames", [1, 2, 7])
def test_gif_frames_are_counted_from_the_blocks(frames: int) -> None:
    data = animated(frames)
    assert images.gif_frames(data) == frames
    out = images.inspect_output(data)
    assert (out.mime, out.width, out.height, out.frames) == ("image/gif", 40, 30, frames)


def test_gif_frame_count_of_a_cut_file_does_not_fail() -> None:
    data = animated(5)
    for cut in (0, 5, 13, 20, len(data) // 2, len(data) - 1):
        assert 0 <= images.gif_frames(data[:cut]) <= 5


def test_rasters_have_no_frame_count() -> None:
    out = images.inspect_output(encode(Image.new("RGB", (9, 7)), "PNG"))
    assert (out.mime, out.width, out.height, out.frames) == ("image/png", 9, 7, None)


def test_an_animated_gif_is_previewed_by_its_first_frame() -> None:
    preview, mime = images.make_preview(animated(4, (600, 400)), max_px=300, max_bytes=50_000)
    with Image.open(io.BytesIO(preview)) as im:
        assert mime in ("image/jpeg", "image/webp") and im.size == (300, 200)
        assert not getattr(im, "is_animated", False)
        r, g, b = im.convert("RGB").getpixel((150, 100))
        assert abs(r - 52) < 10 and abs(g - 101) < 10 and abs(b - 164) < 10


def test_svg_is_not_an_input_image() -> None:
    with pytest.raises(InvalidRequestError, match="SVG"):
        images.sniff(svg_doc('width="8" height="8"'), "mask")
