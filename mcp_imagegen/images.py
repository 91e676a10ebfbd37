"""Pillow work: sniffing, validation, limits, resizing, masks, previews and data URLs.

Everything here is synchronous CPU work on bytes; callers run it in a worker thread. Two rules keep
it fast and safe: read only the header when only the header is needed (Pillow's `Image.open` is
lazy and our own header parser is cheaper still), and refuse an image's pixel count before any
pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import math
import re
import struct
from typing import Literal, NamedTuple

from PIL import Image, ImageFile, ImageOps, features

from . import b64, svg
from .errors import InvalidRequestError

MAX_PIXELS = 64_000_000  # 8000x8000; larger inputs are almost certainly mistakes or bombs
MAX_INPUT_BYTES = 50 * 1024 * 1024
# Inputs up to this size are fully decoded to prove they are whole; larger ones get the cheap checks.
FULL_VERIFY_PIXELS = 24_000_000

# Our own header check refuses anything over MAX_PIXELS before Pillow sees it, so Pillow's guard
# (warning above the limit, error above twice the limit) is only a backstop for paths that skip
# sniff; it is never reached with a warning for images that go through this module.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

MIME_TYPES: tuple[str, ...] = ("image/png", "image/jpeg", "image/webp", "image/gif")
EXTENSIONS: dict[str, str] = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    svg.SVG_MIME: "svg",  # saved as answered; never decoded here
}
_PIL_FORMAT: dict[str, str] = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}
_FORMAT_ALIASES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "jpg": "image/jpeg",
    "image/jpg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
}
_LOSSY = {"image/jpeg", "image/webp"}
_WEBP_OK: bool = bool(features.check("webp"))
_ACCEPTED = "PNG, JPEG, WebP or GIF"


# --- formats and sizes -----------------------------------------------------------------------


def normalize_format(fmt: str) -> str:
    """'png', 'JPG', 'image/jpeg' -> the MIME type this module uses."""
    f = fmt.strip().lower()
    mime = _FORMAT_ALIASES.get(f, f)
    if mime not in _PIL_FORMAT:
        raise InvalidRequestError(f"unsupported image format {fmt!r}; use png, jpeg, webp or gif")
    return mime


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KB', 4194304 -> '4 MB' (binary units, as gateways state their caps)."""
    for unit, size in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.1f}".removesuffix(".0")


# --- header parsing: dimensions without Pillow, so a bomb is refused before it is opened ----------

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def magic_mime(data: bytes) -> str | None:
    """The MIME type the first bytes announce (PNG, JPEG, WebP, GIF), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def _header_size(data: bytes, mime: str) -> tuple[int, int] | None:
    """Width and height from the header, or None when the header is cut short or malformed."""
    try:
        if mime == "image/png":
            if data[12:16] != b"IHDR":
                return None
            w, h = struct.unpack(">II", data[16:24])
            return w, h
        if mime == "image/gif":
            w, h = struct.unpack("<HH", data[6:10])
            return w, h
        if mime == "image/webp":
            chunk = data[12:16]
            if chunk == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return w, h
            if chunk == b"VP8L":
                if data[20] != 0x2F:
                    return None
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8 ":
                if data[23:26] != b"\x9d\x01\x2a":
                    return None
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            return None
        if mime == "image/jpeg":
            i, n = 2, len(data)
            while i + 4 <= n:
                if data[i] != 0xFF:
                    return None
                marker = data[i + 1]
                if marker == 0xFF:  # fill byte
                    i += 1
                    continue
                if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers carry no length
                    i += 2
                    continue
                if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
                    return None
                length = struct.unpack(">H", data[i + 2 : i + 4])[0]
                if marker in _JPEG_SOF:
                    h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                    return w, h
                i += 2 + length
            return None
    except (struct.error, IndexError):
        return None
    return None


def _describe_non_image(data: bytes) -> str:
    """A hint about what the bytes are instead, so the agent can tell an HTML error page apart."""
    head = data[:512].lstrip()
    low = head.lower()
    if not data:
        return "it is empty"
    if low.startswith((b"<!doctype html", b"<html")) or b"<html" in low[:200]:
        return "it looks like an HTML page"
    if low.startswith(b"<?xml") or low.startswith(b"<svg") or b"<svg" in low:
        return "it looks like SVG/XML; convert it to PNG first"
    if low.startswith((b"{", b"[")):
        return "it looks like JSON"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1"):
        return "it is a HEIC/HEIF image; convert it to PNG or JPEG first"
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "it is an AVIF image; convert it to PNG or JPEG first"
    if data[:2] == b"BM":
        return "it is a BMP image; convert it to PNG first"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "it is a TIFF image; convert it to PNG or JPEG first"
    if data.startswith(b"%PDF"):
        return "it is a PDF"
    try:
        text = data[:60].decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with bytes {data[:8].hex(' ')}"
    if text.isprintable() or all(c.isprintable() or c.isspace() for c in text):
        return f"it looks like text ({text[:40]!r})"
    return f"it starts with bytes {data[:8].hex(' ')}"


def _skip_sub_blocks(data: bytes, i: int) -> int:
    """Past a GIF data sub-block chain (size byte, data, ..., a zero size byte)."""
    while i < len(data):
        size = data[i]
        i += 1 + size
        if size == 0:
            break
    return i


def gif_frames(data: bytes) -> int:
    """How many frames a GIF holds, from its block structure alone (no pixel is decoded)."""
    if len(data) < 13:
        return 0
    flags = data[10]
    i = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # past the global colour table
    frames = 0
    while i < len(data):
        block = data[i]
        if block == 0x2C:  # image descriptor: one frame
            frames += 1
            if i + 10 > len(data):
                break
            flags = data[i + 9]
            i += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            i = _skip_sub_blocks(data, i + 1)  # past the LZW code size, then the pixel data
        elif block == 0x21:  # extension: label, then sub-blocks
            i = _skip_sub_blocks(data, i + 2)
        else:  # the trailer (0x3B) or bytes that are not GIF blocks
            break
    return frames


def _too_many_pixels(source: str, w: int, h: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"{source} has {_megapixels(w * h)} megapixels ({w}x{h}), more than the "
        f"{_megapixels(MAX_PIXELS)} allowed; downscale it first"
    )


def _corrupt(source: str, exc: BaseException | str) -> InvalidRequestError:
    return InvalidRequestError(f"{source} is truncated or corrupt and cannot be read as an image ({exc})")


# --- opening and decoding ---------------------------------------------------------------------


def _open(data: bytes, source: str) -> tuple[Image.Image, str]:
    """A lazily opened image whose size is already checked against MAX_PIXELS; no pixels decoded."""
    mime = magic_mime(data)
    if mime is None:
        raise InvalidRequestError(f"{source} is not an image ({_ACCEPTED}): {_describe_non_image(data)}")
    size = _header_size(data, mime)
    if size is None:
        raise _corrupt(source, "the header is incomplete")
    if size[0] < 1 or size[1] < 1:
        raise _corrupt(source, f"the header says {size[0]}x{size[1]}")
    if size[0] * size[1] > MAX_PIXELS:
        raise _too_many_pixels(source, *size)
    try:
        im = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[mime]])
    except Image.DecompressionBombError:
        raise _too_many_pixels(source, *size) from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError...)
        raise _corrupt(source, exc) from None
    if im.width * im.height > MAX_PIXELS:
        raise _too_many_pixels(source, im.width, im.height)
    return im, mime


def _load(im: Image.Image, source: str) -> None:
    try:
        im.load()
    except Image.DecompressionBombError:
        raise _too_many_pixels(source, im.width, im.height) from None
    except Exception as exc:
        raise _corrupt(source, exc) from None


def decode(data: bytes, source: str = "image", *, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """The first frame, decoded and turned upright (EXIF orientation) for pixel work.

    `draft_size` lets JPEG decode at 1/2..1/8 scale when only a smaller picture is needed.
    """
    im, _ = _open(data, source)
    if draft_size is not None:
        im.draft("RGB", draft_size)  # a no-op except for JPEG, where it is the big speed-up
    _load(im, source)
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block should not make a readable image unusable
        out = im
    return out if out is not None else im


def sniff(data: bytes, source: str = "image", *, verify: bool = True) -> tuple[str, int, int]:
    """(MIME type, width, height) from the bytes' magic and header; refuses non-images and bombs.

    verify=True (inputs) decodes the whole image when it is not huge, so truncation anywhere is
    found. verify=False (gateway outputs, already trusted to be images) does the cheap checks:
    PNG chunk CRCs, a JPEG decode at 1/8 scale, WebP's RIFF length, GIF's trailer.
    """
    im, mime = _open(data, source)
    w, h = im.size
    if verify and w * h <= FULL_VERIFY_PIXELS and mime != "image/jpeg":
        if mime == "image/png":
            # Decoding alone misses a lost tail (CRCs, IEND) once the pixels are in; verify() does not.
            try:
                im.verify()
            except Exception as exc:
                raise _corrupt(source, exc) from None
            im, _ = _open(data, source)
        _load(im, source)
        return mime, w, h
    if mime == "image/png":
        try:
            im.verify()
        except Exception as exc:
            raise _corrupt(source, exc) from None
    elif mime == "image/jpeg":
        # Entropy decoding at 1/8 scale still walks the whole bitstream, at a fraction of the cost.
        im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        _load(im, source)
    elif mime == "image/webp":
        riff_size = struct.unpack("<I", data[4:8])[0]
        if len(data) < riff_size + 8:
            raise _corrupt(source, f"the file is {len(data)} bytes, its header says {riff_size + 8}")
    elif mime == "image/gif":
        if not data.rstrip(b"\x00").endswith(b"\x3b"):
            raise _corrupt(source, "the GIF trailer is missing")
    return mime, w, h


class Output(NamedTuple):
    """What a gateway answered, as the store and the results describe it."""

    mime: str
    width: int
    height: int
    frames: int | None = None  # GIFs: how many frames (more than 1: animated)
    active_content: bool = False  # SVG with scripts or external references


def inspect_output(data: bytes, source: str = "image") -> Output:
    """A gateway's answer: a raster (the cheap checks of sniff(verify=False)), a GIF with its frame
    count, or an SVG document (svg.inspect: its size, never rendered)."""
    if magic_mime(data) is None and svg.is_svg(data):
        info = svg.inspect(data, source)
        return Output(svg.SVG_MIME, info.width, info.height, active_content=info.active_content)
    mime, width, height = sniff(data, source, verify=False)
    return Output(mime, width, height, gif_frames(data) if mime == "image/gif" else None)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _normalize_mode(im: Image.Image, *, keep_alpha: bool = True) -> Image.Image:
    """RGB, or RGBA when the image has transparency worth keeping."""
    if keep_alpha and _has_alpha(im):
        return im if im.mode == "RGBA" else im.convert("RGBA")
    if im.mode == "RGB":
        return im
    if _has_alpha(im):
        return _flatten(im.convert("RGBA"))
    return im.convert("RGB")


def _flatten(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGBA -> RGB over a plain background (JPEG has no alpha)."""
    base = Image.new("RGB", im.size, background)
    base.paste(im, mask=im.getchannel("A"))
    return base


def _drop_opaque_alpha(im: Image.Image) -> Image.Image:
    # An alpha channel that is all 255 only costs encode time and bytes.
    if im.mode == "RGBA" and im.getchannel("A").getextrema() == (255, 255):
        return im.convert("RGB")
    return im


def encode_as(
    img: Image.Image, fmt: str, *, quality: int | None = None, compress_level: int = 6, method: int = 4
) -> bytes:
    """Encode a Pillow image as png/jpeg/webp/gif (name or MIME), converting the mode as needed."""
    mime = normalize_format(fmt)
    buf = io.BytesIO()
    if mime == "image/png":
        if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
            img = _normalize_mode(img)
        img.save(buf, "PNG", compress_level=compress_level)
    elif mime == "image/jpeg":
        img = _normalize_mode(img, keep_alpha=False) if img.mode not in ("RGB", "L") else img
        img.save(buf, "JPEG", quality=quality or 90, optimize=False)
    elif mime == "image/webp":
        img = _normalize_mode(img)
        img.save(buf, "WEBP", quality=quality or 90, method=method)
    else:
        if img.mode not in ("P", "L", "1"):
            img = _normalize_mode(img).convert("P", palette=Image.Palette.ADAPTIVE)
        img.save(buf, "GIF")
    return buf.getvalue()


def _scaled(
    im: Image.Image, size: tuple[int, int], resample: Image.Resampling = Image.Resampling.BILINEAR
) -> Image.Image:
    if im.size == size:
        return im
    # Box-reduce by the whole factor first (a 1024->512 preview is then one cheap pass), and
    # filter only what is left.
    factor = min(im.width // size[0], im.height // size[1])
    if factor >= 2:
        im = im.reduce(factor)
    return im if im.size == size else im.resize(size, resample)


def _fit_within(w: int, h: int, max_px: int) -> tuple[int, int]:
    if max(w, h) <= max_px:
        return w, h
    s = max_px / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


# --- previews and size fitting ----------------------------------------------------------------


# An image whose file already fits the preview's byte budget is shown as it is, up to this many
# times the preview's side. Such files are simple graphics (logos, icons, diagrams, text) that a
# JPEG preview would make blurry and no smaller, and decoding them to make one is most of the
# server's work per image: 8 ms to inflate a flat 1024x1024 PNG. The agent sees at most 4x the
# preview's pixels, and only for images this small.
AS_IS_MAX_SCALE = 2
_SHOWN_AS_IS = {"image/png", "image/jpeg", "image/webp"}


def as_is_preview(data: bytes, max_px: int, max_bytes: int) -> tuple[bytes, str] | None:
    """The image itself, when it can be its own preview (see AS_IS_MAX_SCALE); reads the header only."""
    mime = magic_mime(data)
    size = _header_size(data, mime) if mime in _SHOWN_AS_IS else None
    if size is None or len(data) > max_bytes or min(size) < 1 or max(size) > AS_IS_MAX_SCALE * max_px:
        return None
    return data, mime  # type: ignore[return-value]


def make_preview(data: bytes, max_px: int = 512, max_bytes: int = 200_000) -> tuple[bytes, str]:
    """A small image for inline display: at most max_bytes, longest side <= max_px.

    JPEG for opaque images (every client shows it, and it encodes several times faster than
    WebP); WebP where there is transparency to keep (JPEG where WebP is unavailable). A small
    file within AS_IS_MAX_SCALE * max_px is returned unchanged, with no decoding at all.
    """
    same = as_is_preview(data, max_px, max_bytes)
    if same is not None:
        return same
    im, _ = _open(data, "image")
    target = _fit_within(im.width, im.height, max_px)
    im.draft("RGB", target)
    _load(im, "image")
    im = _normalize_mode(im, keep_alpha=_WEBP_OK)
    im = _drop_opaque_alpha(_scaled(im, target))
    fmt = "image/webp" if _WEBP_OK and _has_alpha(im) else "image/jpeg"
    out = b""
    while True:
        for q in (80, 65, 50, 35):
            # method=0: within ~3% of the default method=4's size at a third of the encode time.
            out = encode_as(im, fmt, quality=q, method=0)
            if len(out) <= max_bytes:
                return out, fmt
        if max(im.size) <= 32:
            return out, fmt  # absurdly small budget: the smallest we can make
        im = _scaled(im, (max(1, im.width * 3 // 4), max(1, im.height * 3 // 4)))


def fit_image(
    data: bytes, max_bytes: int, formats: list[str], *, square: bool = False, source: str = "input image"
) -> tuple[bytes, str, str | None]:
    """Make an input acceptable to a gateway: an allowed format, at most max_bytes, square if asked.

    Returns (bytes, MIME, note); the note is a sentence for the result's warnings, None when the
    bytes go through untouched. A square crop is centred. To keep a mask aligned, give it the same
    square crop (fit_image(mask, ..., square=True)) and then convert_mask it to the fitted image's
    width and height.
    """
    mime, w, h = sniff(data, source, verify=False)
    allowed = [normalize_format(f) for f in formats] or ["image/png"]
    if mime in allowed and len(data) <= max_bytes and (not square or w == h):
        return data, mime, None

    im = decode(data, source)
    reasons: list[str] = []
    if square and im.width != im.height:
        side = min(im.width, im.height)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side))
        reasons.append("cropped to a centred square because this model takes square images only")
    alpha = _has_alpha(im)
    if mime in allowed:
        target = mime
    else:
        order = (
            ["image/png", "image/webp", "image/jpeg"]
            if alpha or mime == "image/gif"
            else ["image/png", "image/jpeg", "image/webp"]
        )
        target = next((m for m in order if m in allowed), allowed[0])
        reasons.append(f"because the gateway takes only {', '.join(_PIL_FORMAT[m] for m in allowed)}")
    im = _normalize_mode(im, keep_alpha=target != "image/jpeg")

    scale = 1.0
    if target == mime and target == "image/png" and len(data) > max_bytes and not reasons:
        scale = math.sqrt(max_bytes / len(data)) * 0.97  # lossless: only fewer pixels make it smaller
    quality = 90
    out = b""
    cur = im
    for _ in range(16):
        cur = _scaled(im, (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
        out = encode_as(cur, target, quality=quality)
        if len(out) <= max_bytes:
            break
        if target in _LOSSY and quality > 60:
            quality -= 15
            continue
        scale *= min(0.95, max(0.5, math.sqrt(max_bytes / len(out)) * 0.97))
        if max(cur.size) < 16:
            break
    if len(out) > max_bytes:
        raise InvalidRequestError(
            f"{source} cannot be made to fit the gateway's {human_bytes(max_bytes)} cap; use a smaller image"
        )
    if len(data) > max_bytes:
        reasons.insert(0, f"to fit the gateway's {human_bytes(max_bytes)} cap")
    note = (
        f"{source} was {_PIL_FORMAT[mime]} {w}x{h} ({human_bytes(len(data))}); re-encoded as "
        f"{_PIL_FORMAT[target]} {cur.width}x{cur.height} ({human_bytes(len(out))}) " + " and ".join(reasons)
    )
    return out, target, note


def downscale_to_fit(data: bytes, max_bytes: int) -> tuple[bytes, str, int, int]:
    """The whole image for inline display: the original if it fits, else a smaller WebP/JPEG."""
    mime, w, h = sniff(data, "image", verify=False)
    if len(data) <= max_bytes:
        return data, mime, w, h
    im = _drop_opaque_alpha(_normalize_mode(decode(data, "image"), keep_alpha=_WEBP_OK))
    fmt = "image/webp" if _WEBP_OK and _has_alpha(im) else "image/jpeg"
    # Guess a scale from a typical ~0.3 bytes per pixel, then correct it from each encode's real
    # size: up when far under the budget (smooth images compress much better), down when over.
    # The largest encode that fits wins.
    scale = min(1.0, math.sqrt(max_bytes / (0.3 * im.width * im.height)))
    best: tuple[bytes, int, int] | None = None
    smallest: tuple[bytes, int, int] | None = None
    for _ in range(8):
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        out = encode_as(_scaled(im, size), fmt, quality=80, method=2)
        if len(out) <= max_bytes:
            if best is None or len(out) > len(best[0]):
                best = (out, *size)
            if scale >= 1.0 or len(out) >= 0.8 * max_bytes:
                break
        elif smallest is None or len(out) < len(smallest[0]):
            smallest = (out, *size)
        if max(size) <= 16:
            break
        step = math.sqrt(max_bytes / len(out)) * 0.95
        scale = min(1.0, scale * min(2.5, max(0.4, step)))
    out, width, height = best or smallest  # type: ignore[misc]
    return out, fmt, width, height


# --- masks ------------------------------------------------------------------------------------


def mask_region(mask: bytes, width: int, height: int) -> Image.Image:
    """The canonical edit region at width x height: mode "L", 255 where the image is to change.

    A mask with an alpha channel marks the area with transparent pixels (alpha < 128); one without
    alpha marks it with white pixels (luminance >= 128). A mask whose alpha channel is entirely
    opaque says nothing through its alpha, so it is read by its whiteness instead: that is what a
    person who painted white strokes into an RGBA file meant.
    """
    im = decode(mask, "mask")
    region: Image.Image | None = None
    if _has_alpha(im):
        alpha = im.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            region = alpha.point(lambda a: 255 if a < 128 else 0)
        else:
            im = im.convert("RGBA").convert("RGB")
    if region is None:
        region = im.convert("L").point(lambda v: 255 if v >= 128 else 0)
    if region.size != (width, height):
        region = region.resize((width, height), Image.Resampling.NEAREST)
    return region


def convert_mask(mask: bytes, *, width: int, height: int, semantics: Literal["transparent", "white"]) -> bytes:
    """A PNG mask at width x height in the target gateway's convention (DESIGN section 3).

    "transparent": RGBA, alpha 0 where the image is to change, 255 elsewhere (OpenAI).
    "white": greyscale, white where the image is to change, black elsewhere (diffusion gateways).
    """
    region = mask_region(mask, width, height)
    if semantics == "white":
        return encode_as(region, "png")
    if semantics != "transparent":
        raise ValueError(f"unknown mask semantics {semantics!r}")
    # The colour is white where transparent too, so a gateway that ignores alpha reads the same area.
    rgba = Image.merge("RGBA", (region, region, region, region.point(lambda v: 255 - v)))
    return encode_as(rgba, "png")


# --- data URLs and base64 ---------------------------------------------------------------------

_DATA_URL_META = re.compile(
    r"^(?P<mime>[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+)?(?P<params>(?:;[a-z0-9!#$&^_.+-]+=[^;,]*)*);base64$",
    re.IGNORECASE,
)


def decode_base64(s: str, source: str = "base64 data", *, max_bytes: int | None = MAX_INPUT_BYTES) -> bytes:
    """Standard or URL-safe base64, with or without padding and whitespace; InvalidRequestError otherwise."""
    if not isinstance(s, str):
        raise InvalidRequestError(f"{source} must be a base64 string")
    if max_bytes is not None and len(s) > (max_bytes * 4) // 3 + 4096:
        raise InvalidRequestError(f"{source} is larger than the {human_bytes(max_bytes)} allowed")
    try:
        out = b64.decode(s)
    except ValueError as exc:
        raise InvalidRequestError(f"{source} is not valid base64 ({exc})") from None
    if not out:
        raise InvalidRequestError(f"{source} is empty")
    if max_bytes is not None and len(out) > max_bytes:
        raise InvalidRequestError(
            f"{source} is {human_bytes(len(out))}, more than the {human_bytes(max_bytes)} allowed"
        )
    return out


def parse_data_url(s: str, source: str = "data URL") -> tuple[bytes, str]:
    """(bytes, declared MIME type) from `data:<mime>;base64,<data>`; strict about the shape."""
    if not isinstance(s, str) or not s[:5].lower() == "data:":
        raise InvalidRequestError(f"{source} must start with 'data:' (data:image/png;base64,...)")
    head, sep, payload = s[5:].partition(",")
    if not sep:
        raise InvalidRequestError(f"{source} has no ',' between its header and its data (data:image/png;base64,...)")
    m = _DATA_URL_META.match(head.strip())
    if m is None:
        if ";base64" not in head.lower():
            raise InvalidRequestError(f"{source} must be base64-encoded (data:image/png;base64,...)")
        raise InvalidRequestError(f"{source} has a malformed header {head[:60]!r} (expected data:image/png;base64,...)")
    mime = (m.group("mime") or "application/octet-stream").lower()
    return decode_base64(payload, source), mime
