"""SVG answers: recognise a vector document, read its size, and check it is whole.

Some models answer with an SVG document instead of a raster (gpt-image-2.6 with
`output_format: "svg"`). The server saves it as it came and never renders it, so nothing here
parses XML: the root `<svg>` tag is found with a bounded scan of the document's head and its
attributes are read with a regular expression. No entity is expanded, no DTD is read and no
`href` is followed, so a hostile document costs a scan of its head and nothing more.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import InvalidRequestError

SVG_MIME = "image/svg+xml"
MAX_SVG_BYTES = 16 * 1024 * 1024  # a generated drawing is kilobytes; more is a runaway or an attack
_HEAD_BYTES = 64 * 1024  # the root tag must start within this many bytes
_TAIL_BYTES = 4096

# What may come before the root element: whitespace, the XML declaration and other processing
# instructions, comments, and a DOCTYPE (skipped, never read).
_PROLOG_ITEM = re.compile(rb"\s+|<\?.*?\?>|<!--.*?-->|<!DOCTYPE[^\[>]*(?:\[.*?\])?\s*>", re.S | re.I)
_ROOT = re.compile(rb"<svg(?=[\s/>])([^>]*)>", re.S)
_ATTRIBUTE = re.compile(rb"([A-Za-z_][\w:.-]*)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')")
_END = re.compile(rb"</svg\s*>(?:\s|<!--.*?-->)*\Z", re.S)
# Scripts, event handlers and references to other documents: harmless to us, not to a viewer.
_ACTIVE = re.compile(rb"<script|\son[a-z]+\s*=|(?:xlink:)?href\s*=\s*[\"']\s*(?:https?:|//|javascript:)", re.I)

_LENGTH = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(px|pt|pc|mm|cm|in)?\s*$")
_PX_PER_UNIT = {None: 1.0, "px": 1.0, "pt": 4 / 3, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0}


class SvgInfo(NamedTuple):
    width: int  # 0 when the document states no usable size
    height: int
    active_content: bool  # scripts, event handlers or external references


def _strip_bom(data: bytes) -> bytes:
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def _root_tag(data: bytes) -> re.Match[bytes] | None:
    head = _strip_bom(data[:_HEAD_BYTES])
    pos = 0
    while (m := _PROLOG_ITEM.match(head, pos)) is not None and m.end() > pos:
        pos = m.end()
    return _ROOT.match(head, pos)


def is_svg(data: bytes) -> bool:
    """Whether the bytes are an SVG document: its root element, after any prolog, is <svg>."""
    return _root_tag(data) is not None


def _length(value: str | None) -> float | None:
    """An SVG length in CSS pixels; None for percentages, font-relative units or junk."""
    m = _LENGTH.match(value or "")
    if m is None:
        return None
    px = float(m.group(1)) * _PX_PER_UNIT[m.group(2)]
    return px if px > 0 else None


def _view_box(value: str | None) -> tuple[float, float] | None:
    parts = re.split(r"[\s,]+", (value or "").strip())
    try:
        _, _, w, h = (float(p) for p in parts)
    except ValueError:
        return None
    return (w, h) if w > 0 and h > 0 else None


def _size(attrs: dict[str, str]) -> tuple[int, int]:
    width, height = _length(attrs.get("width")), _length(attrs.get("height"))
    box = _view_box(attrs.get("viewBox"))
    if width is None and height is not None and box is not None:
        width = height * box[0] / box[1]  # one side given: the viewBox gives the other
    if height is None and width is not None and box is not None:
        height = width * box[1] / box[0]
    if width is None or height is None:
        width, height = box if box is not None else (0.0, 0.0)
    return max(0, round(width)), max(0, round(height))


def inspect(data: bytes, source: str = "SVG document") -> SvgInfo:
    """Size and risk of an SVG document; InvalidRequestError when it is too big, not SVG or cut short."""
    if len(data) > MAX_SVG_BYTES:
        raise InvalidRequestError(
            f"{source} is an SVG document of {len(data) / 1024 / 1024:.1f} MB, more than the "
            f"{MAX_SVG_BYTES // 1024 // 1024} MB allowed"
        )
    root = _root_tag(data)
    if root is None:
        raise InvalidRequestError(f"{source} is not an SVG document (no <svg> root element)")
    self_closed = root.group(1).rstrip().endswith(b"/")
    if not self_closed and _END.search(data[-_TAIL_BYTES:]) is None:
        raise InvalidRequestError(f"{source} is a truncated SVG document (it does not end with </svg>)")
    attrs = {
        m.group(1).decode("ascii"): (m.group(2) if m.group(2) is not None else m.group(3)).decode("utf-8", "replace")
        for m in _ATTRIBUTE.finditer(root.group(1))
    }
    width, height = _size(attrs)
    return SvgInfo(width, height, _ACTIVE.search(data) is not None)
