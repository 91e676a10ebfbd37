"""Pillow helpers for the emulators: test images, encoding, sniffing and data URLs.

Encoding a large PNG takes a noticeable fraction of a second, so every rendered image is cached
per (kind, size, format, variant, transparency) for the life of the process.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
from typing import Literal, NamedTuple

from PIL import Image, ImageDraw

ImageKind = Literal["flat", "photo"]
ImageFormat = Literal["png", "jpeg", "webp", "gif", "svg"]

MIME_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "svg": "image/svg+xml",
}
EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp", "gif": "gif", "svg": "svg"}
GIF_FRAMES = 4  # frames in an animated answer (gpt-image-2.6 `output_format: gif`)

# Distinct background colours so that the n images of one answer are not byte-identical.
_PALETTE = [(52, 101, 164), (204, 0, 0), (78, 154, 6), (196, 160, 0), (117, 80, 123)]


def photo_like(width: int, height: int, transparent: bool = False) -> Image.Image:
    """Gradients blended with Gaussian noise: compresses about as badly as a real photo.

    A 1024x1024 PNG of this comes out around 2.8 MB, which is what real gateways return.
    """
    gx = Image.linear_gradient("L").rotate(90).resize((width, height))
    gy = Image.linear_gradient("L").resize((width, height))
    gr = Image.radial_gradient("L").resize((width, height))
    base = Image.merge("RGB", (gx, gy, gr))
    noise = Image.merge("RGB", [Image.effect_noise((width, height), 48) for _ in range(3)])
    img = Image.blend(base, noise, 0.5)
    if transparent:
        img.putalpha(Image.radial_gradient("L").resize((width, height)).point(lambda v: 255 - v))
    return img


def flat(width: int, height: int, variant: int = 0, transparent: bool = False) -> Image.Image:
    """A solid background with two simple shapes: a PNG of a few kilobytes."""
    bg = _PALETTE[variant % len(_PALETTE)]
    mode = "RGBA" if transparent else "RGB"
    img = Image.new(mode, (width, height), (*bg, 0) if transparent else bg)
    draw = ImageDraw.Draw(img)
    w, h = width, height
    draw.rectangle((w // 8, h // 8, w // 2, h // 2), fill=(255, 255, 255, 255) if transparent else (255, 255, 255))
    draw.ellipse((w // 2, h // 2, w - w // 8, h - h // 8), fill=(20, 20, 20, 255) if transparent else (20, 20, 20))
    return img


def svg_document(width: int, height: int, variant: int = 0) -> bytes:
    """A small vector answer as a gateway sends it: an XML prolog, then an <svg> with a viewBox."""
    r, g, b = _PALETTE[variant % len(_PALETTE)]
    w, h = width, height
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">\n'
        f'  <rect width="{w}" height="{h}" fill="rgb({r},{g},{b})"/>\n'
        f'  <rect x="{w // 8}" y="{h // 8}" width="{w // 2 - w // 8}" height="{h // 2 - h // 8}" fill="#ffffff"/>\n'
        f'  <circle cx="{w * 11 // 16}" cy="{h * 11 // 16}" r="{min(w, h) * 3 // 16}" fill="#141414"/>\n'
        "</svg>\n"
    ).encode()


def animated_gif(width: int, height: int, variant: int = 0, frames: int = GIF_FRAMES) -> bytes:
    """An animated GIF of `frames` frames, each a different colour, looping forever."""
    pictures = [flat(width, height, variant + i).convert("P", palette=Image.Palette.ADAPTIVE) for i in range(frames)]
    buf = io.BytesIO()
    pictures[0].save(buf, "GIF", save_all=True, append_images=pictures[1:], duration=120, loop=0)
    return buf.getvalue()


def encode(img: Image.Image, fmt: str = "png", quality: int | None = None) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.convert("RGB").save(buf, "JPEG", quality=quality or 90)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality or 90)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


_cache: dict[tuple, bytes] = {}
_key_locks: dict[tuple, threading.Lock] = {}
_locks_guard = threading.Lock()


def render(
    kind: str,
    width: int,
    height: int,
    fmt: str = "png",
    variant: int = 0,
    transparent: bool = False,
    quality: int | None = None,
) -> bytes:
    """Encoded image bytes, cached. Thread-safe: concurrent callers of one key render it once."""
    if kind == "photo":
        variant = 0  # one photo per size is enough; rendering several would only cost time
    key = (kind, width, height, fmt, variant, transparent, quality)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    with _locks_guard:
        lock = _key_locks.setdefault(key, threading.Lock())
    with lock:
        cached = _cache.get(key)
        if cached is None:
            if fmt == "svg":  # vector and animated answers look alike whatever the image kind
                cached = _cache[key] = svg_document(width, height, variant)
                return cached
            if fmt == "gif":
                cached = _cache[key] = animated_gif(width, height, variant)
                return cached
            if kind == "photo":
                img = photo_like(width, height, transparent)
            elif kind == "flat":
                img = flat(width, height, variant, transparent)
            else:
                raise ValueError(f"unknown image kind {kind!r} (use 'flat' or 'photo')")
            cached = _cache[key] = encode(img, fmt, quality)
    return cached


def sniff(data: bytes) -> str | None:
    """The image format from magic bytes, or None when the bytes are not a known image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    head = data[:512].lstrip()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "svg"
    return None


class ImageInfo(NamedTuple):
    format: str  # "png", "jpeg", ... as Pillow names it, lower-cased
    width: int
    height: int
    mode: str
    alpha: bool  # an alpha channel, or a palette with a transparent entry


def image_info(data: bytes) -> ImageInfo | None:
    """What the header says about an image; None when Pillow cannot open the bytes."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
            return ImageInfo((img.format or "").lower(), img.width, img.height, img.mode, alpha)
    except Exception:
        return None


_DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]+);base64,(.*)$", re.IGNORECASE | re.DOTALL)


def parse_data_url(value: object) -> tuple[str, bytes]:
    """(mime type, bytes) of a `data:image/...;base64,...` URL whose bytes are a real image.

    Raises ValueError with a short reason otherwise.
    """
    if not isinstance(value, str):
        raise ValueError("expected a string")
    m = _DATA_URL.match(value)
    if not m:
        raise ValueError("expected a data:image/<type>;base64,<data> URL")
    try:
        data = base64.b64decode(m.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64 data") from None
    if sniff(data) in (None, "svg"):
        raise ValueError("the data is not a PNG, JPEG, WebP or GIF image")
    return m.group(1).lower(), data


def to_data_url(data: bytes, mime: str | None = None) -> str:
    mime = mime or MIME_TYPES.get(sniff(data) or "png", "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
