"""The built-in offline endpoint (provider "offline"): a deterministic renderer, not an AI model.

It draws a pleasant abstract picture (gradient sky, a sun, layered waves, a few soft shapes) from a
hash of the prompt, seed and image index, and writes the prompt on it, so a first run, a test or an
agent developer sees the whole flow work with no account and no network. Same inputs, same bytes.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
from functools import cache

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import InvalidRequestError
from .images import decode, encode_as, mask_region, normalize_format

Color = tuple[int, int, int]

# Hand-picked palettes: (sky top, sky bottom, sun, wave 1, wave 2, wave 3, accent).
_PALETTES: tuple[tuple[Color, ...], ...] = (
    ((24, 40, 82), (242, 140, 98), (255, 214, 140), (46, 64, 110), (73, 84, 140), (120, 96, 160), (255, 240, 200)),
    ((14, 75, 99), (153, 214, 207), (255, 247, 214), (16, 110, 120), (40, 150, 140), (120, 190, 160), (250, 250, 235)),
    ((58, 28, 78), (236, 112, 129), (255, 190, 120), (90, 40, 100), (150, 60, 110), (210, 100, 110), (255, 225, 180)),
    ((30, 60, 40), (200, 220, 160), (250, 240, 180), (50, 90, 50), (90, 130, 70), (150, 170, 90), (255, 250, 220)),
    ((10, 20, 45), (60, 90, 160), (230, 235, 255), (20, 35, 80), (40, 60, 120), (90, 110, 170), (200, 220, 255)),
    ((120, 60, 20), (250, 210, 120), (255, 250, 210), (150, 80, 40), (190, 110, 50), (220, 150, 80), (255, 245, 220)),
)
# Measured at 1024x1024 on 2 cores: render + encode ~60 ms at zlib level 6 (53 KB) vs ~37 ms at
# level 3 (71 KB); the default level stays well inside the 150 ms budget.
_PNG_LEVEL = 6


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


# Cached fonts are shared by worker threads; a FreeType face is not safe to use from two at once.
_FONT_LOCK = threading.Lock()


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow built without FreeType: the bitmap font
        return ImageFont.load_default()


def _mix(a: Color, b: Color, t: float) -> Color:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def _gradient(w: int, h: int, top: Color, bottom: Color, angle: float) -> Image.Image:
    # A 64x64 ramp computed in Python, then scaled up: smooth, and cheap at any output size.
    n = 64
    dx, dy = math.sin(angle), math.cos(angle)
    span = abs(dx) + abs(dy)
    ramp = Image.new("L", (n, n))
    ramp.putdata(
        [
            max(0, min(255, round(255 * (((x / (n - 1) - 0.5) * dx + (y / (n - 1) - 0.5) * dy) / span + 0.5))))
            for y in range(n)
            for x in range(n)
        ]
    )
    return ImageOps.colorize(ramp.resize((w, h), Image.Resampling.BILINEAR), top, bottom)


def _scene(w: int, h: int, rng: random.Random) -> Image.Image:
    """Gradient sky, a glowing sun, layered waves and a few soft shapes."""
    pal = rng.choice(_PALETTES)
    im = _gradient(w, h, pal[0], pal[1], rng.uniform(-0.5, 0.5))
    draw = ImageDraw.Draw(im, "RGBA")  # RGBA fills blend onto the RGB picture
    scale = min(w, h)

    # Sun with a halo.
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.15, 0.45) * h
    r = rng.uniform(0.07, 0.14) * scale
    for k, alpha in ((2.2, 40), (1.6, 70), (1.0, 255)):
        draw.ellipse((cx - r * k, cy - r * k, cx + r * k, cy + r * k), fill=(*pal[2], alpha))

    # Soft shapes floating in the sky.
    for _ in range(rng.randint(3, 6)):
        color = (*_mix(rng.choice(pal), (255, 255, 255), 0.3), rng.randint(40, 110))
        x, y = rng.uniform(0, w), rng.uniform(0, h * 0.6)
        s = rng.uniform(0.04, 0.18) * scale
        kind = rng.randrange(3)
        if kind == 0:
            draw.ellipse((x - s, y - s * 0.6, x + s, y + s * 0.6), fill=color)
        elif kind == 1:
            draw.rounded_rectangle((x - s, y - s / 2, x + s, y + s / 2), radius=s / 4, fill=color)
        else:
            a = rng.uniform(0, math.tau)
            pts = [(x + s * math.cos(a + i * math.tau / 3), y + s * math.sin(a + i * math.tau / 3)) for i in range(3)]
            draw.polygon(pts, fill=color)

    # Layered waves across the bottom, like hills or sea.
    steps = 48
    for layer, wave in enumerate(pal[3:6]):
        base = h * (0.55 + 0.13 * layer)
        amp = h * rng.uniform(0.03, 0.08)
        freq = rng.uniform(1.0, 3.0)
        phase = rng.uniform(0, math.tau)
        pts = [(w * i / steps, base + amp * math.sin(phase + freq * math.tau * i / steps)) for i in range(steps + 1)]
        draw.polygon([*pts, (w, h), (0, h)], fill=(*wave, 230))
    return im


Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Font, width: float, max_lines: int) -> list[str]:
    words = text.split()
    lines: list[str] = []
    line = ""
    for word in words:
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
        if len(lines) == max_lines:
            break
    if line and len(lines) < max_lines:
        lines.append(line)
    if len(lines) == max_lines and " ".join(lines) != " ".join(words):
        last = lines[-1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    # A single unbroken word wider than the box: cut it.
    return [ln if draw.textlength(ln, font=font) <= width else _cut(draw, ln, font, width) for ln in lines]


def _cut(draw: ImageDraw.ImageDraw, text: str, font: Font, width: float) -> str:
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[: max(1, len(text) * 9 // 10) - 1] if len(text) > 40 else text[:-1]
    return text + "..."


def _caption(im: Image.Image, text: str, footer: str) -> None:
    """The prompt in a translucent box at the bottom left, and a small footer line."""
    with _FONT_LOCK:
        _caption_locked(im, text, footer)


def _caption_locked(im: Image.Image, text: str, footer: str) -> None:
    w, h = im.size
    draw = ImageDraw.Draw(im, "RGBA")
    size = max(10, min(64, round(min(w, h) / 22)))
    font, small = _font(size), _font(max(8, size * 3 // 5))
    margin = max(4, size // 2)
    lines = _wrap(draw, " ".join(text.split()) or "(empty prompt)", font, w - 4 * margin, max_lines=4)
    line_h = round(size * 1.25)
    box_h = line_h * len(lines) + round(size * 0.9) + margin * 2
    top = h - box_h - margin
    draw.rounded_rectangle((margin, top, w - margin, h - margin), radius=margin, fill=(0, 0, 0, 120))
    y = top + margin
    for line in lines:
        draw.text((2 * margin, y), line, font=font, fill=(255, 255, 255, 240))
        y += line_h
    draw.text((2 * margin, y + size * 0.1), footer, font=small, fill=(255, 255, 255, 170))


def _encode(im: Image.Image, output_format: str) -> bytes:
    fmt = normalize_format(output_format)
    if fmt == "image/png":
        return encode_as(im, fmt, compress_level=_PNG_LEVEL)
    return encode_as(im, fmt, quality=90, method=2)


def _check_size(width: int, height: int) -> None:
    if not (1 <= width <= 8192 and 1 <= height <= 8192):
        raise InvalidRequestError(f"the offline renderer draws sizes from 1x1 to 8192x8192, not {width}x{height}")


def render(prompt: str, width: int, height: int, *, seed: int | None, index: int, output_format: str = "png") -> bytes:
    """A deterministic picture for (prompt, seed, index) at width x height, encoded as asked."""
    _check_size(width, height)
    rng = _rng("render", prompt, seed, index)
    im = _scene(width, height, rng)
    footer = f"offline renderer - seed {seed if seed is not None else 'none'} - image {index + 1}"
    _caption(im, prompt, footer)
    return _encode(im, output_format)


def _target_size(w: int, h: int, width: int | None, height: int | None) -> tuple[int, int]:
    if width and height:
        return width, height
    if width:
        return width, max(1, round(h * width / w))
    if height:
        return max(1, round(w * height / h)), height
    return w, h


def edit(
    images: list[bytes],
    prompt: str,
    *,
    mask: bytes | None = None,
    width: int | None = None,
    height: int | None = None,
    seed: int | None = None,
    index: int = 0,
    strength: float | None = None,
    output_format: str = "png",
) -> bytes:
    """Repaint the first image with a pattern from the prompt; other images appear as thumbnails.

    With a mask only its region changes (pixels outside are kept exactly); `strength` (0..1,
    default 0.8) is the opacity of the new paint.
    """
    if not images:
        raise InvalidRequestError("an edit needs at least one input image")
    base = decode(images[0], "image 1")
    base = (
        base.convert("RGBA")
        if base.mode in ("RGBA", "LA", "PA") or "transparency" in base.info
        else base.convert("RGB")
    )
    size = _target_size(base.width, base.height, width, height)
    _check_size(*size)
    if base.size != size:
        base = ImageOps.fit(base, size, Image.Resampling.BILINEAR)
    w, h = size

    rng = _rng("edit", prompt, seed, index)
    paint = _scene(w, h, rng)
    draw = ImageDraw.Draw(paint, "RGBA")
    # Diagonal stripes mark the paint as an edit at a glance.
    step = max(8, min(w, h) // 12)
    stripe = (*rng.choice(_PALETTES)[6], 60)
    for x in range(-h, w, step * 2):
        draw.polygon([(x, 0), (x + step, 0), (x + step + h, h), (x + h, h)], fill=stripe)

    # Further images: thumbnails along the top edge, right to left (the caption owns the bottom).
    if len(images) > 1:
        tile = max(8, min(w, h) // 4)
        pad = max(2, tile // 16)
        x = w - pad
        for n, data in enumerate(images[1:], start=2):
            thumb = decode(data, f"image {n}", draft_size=(tile, tile)).convert("RGB")
            thumb.thumbnail((tile, tile), Image.Resampling.BILINEAR)
            x -= thumb.width + pad
            if x < 0:
                break
            paint.paste(
                (255, 255, 255), (x - pad // 2, pad // 2, x + thumb.width + pad // 2, thumb.height + pad + pad // 2)
            )
            paint.paste(thumb, (x, pad))

    _caption(
        paint, f"edit: {prompt}", f"offline renderer - seed {seed if seed is not None else 'none'} - image {index + 1}"
    )

    s = 0.8 if strength is None else max(0.0, min(1.0, float(strength)))
    region = mask_region(mask, w, h) if mask is not None else Image.new("L", size, 255)
    alpha = region.point(lambda v: round(v * s))
    if base.mode == "RGBA":
        paint = paint.convert("RGBA")
    # Where alpha is 0 the base pixel is copied exactly: an edit never touches outside its mask.
    out = Image.composite(paint, base, alpha)
    return _encode(out, output_format)
