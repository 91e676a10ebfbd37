"""Tool results that every MCP client can use, and that never break a client's size limit.

For each saved image a result carries a small inline preview (for clients that show images), a
resource link to the full image, and a text line with the saved path and the imagegen:// URI (for
clients that show neither). The structured content follows `ImageToolResult`, the tools'
`outputSchema`.

The whole serialized result stays under `RESULT_CAP_BYTES` (Claude Desktop refuses results over
1 MiB) whatever the image sizes and however many images: text, links and structured content are
measured first, the rest of the budget is shared among the previews (base64 costs 4/3), previews
are made small enough to fit, and when even small previews do not fit the later ones are left out
(their links and text lines stay) with a warning.

An SVG document is never rendered: its text line says what it is and where it is, in place of a
preview. An animated GIF is previewed by its first frame, and its text line gives the frame count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anyio
from mcp_types import CallToolResult, ContentBlock, ImageContent, ResourceLink, TextContent
from pydantic import BaseModel, Field

from . import b64
from .limits import MIN_PREVIEW_BYTES, PREVIEW_MAX_BYTES, PREVIEWS_TOTAL_BYTES, RESULT_CAP_BYTES
from .models import GenerationResult, ImageRecord, ModelInfo, SavedImage
from .svg import SVG_MIME
from .work import in_worker, on_disk

if TYPE_CHECKING:
    from .service import Job

log = logging.getLogger("mcp_imagegen.results")

# Claude Desktop rejects results over 1 MiB; stay well below it, with room for the JSON-RPC
# envelope and whatever a transport adds.
BLOCK_OVERHEAD = 160  # JSON of an image block around its base64 data
RESERVE_BYTES = 4_000  # warnings added after measuring, and slack

ReadBytes = Callable[[str], tuple[bytes, str]]  # image id -> (bytes, mime type)
CachedPreview = Callable[[str], "tuple[bytes, str] | None"]  # image id -> preview made on arrival


# --- the structured result (outputSchema) ---------------------------------------------------------


class ImageOut(BaseModel):
    """One saved image."""

    id: str = Field(description="Opaque id of the saved image.")
    uri: str = Field(description="imagegen://images/{id}: read it as a resource, or pass it to edit_image.")
    path: str = Field(description="Where the full image is saved on the server's disk.")
    mime_type: str
    width: int
    height: int
    bytes: int = Field(description="Size of the saved file in bytes.")
    revised_prompt: str | None = Field(default=None, description="The prompt as the model rewrote it, if it did.")
    frames: int | None = Field(
        default=None, description="GIFs: the frame count; more than 1 is an animation, previewed by its first frame."
    )
    url: str | None = Field(
        default=None, description="A time-limited link to the full image, where images live in a bucket."
    )


class ImageToolResult(BaseModel):
    """What generate_image, edit_image and get_image return."""

    status: Literal["done", "running"] = Field(
        description="'running': the generation goes on in the background; call get_image(job_id=...) for the rest."
    )
    images: list[ImageOut] = Field(description="Images saved (so far, when status is 'running').")
    model: str | None = Field(description="The model that made the images (null while not yet known).")
    endpoint: str | None = Field(description="The configured endpoint that served the call.")
    provider: str | None = None
    warnings: list[str] = Field(description="Things the agent should know: adjusted arguments, left-out previews...")
    usage: dict[str, Any] | None = Field(default=None, description="Token or image usage, as the gateway reported it.")
    cost: float | None = Field(default=None, description="Cost of the call, where the gateway reports it.")
    balance: float | None = Field(default=None, description="Account balance after the call, where reported.")
    elapsed_s: float | None = None
    job_id: str | None = Field(description="Handle for get_image(job_id=...).")


class ModelList(BaseModel):
    """What list_models returns."""

    models: list[ModelInfo]
    warnings: list[str] = Field(default_factory=list, description="Endpoints that could not be asked, and why.")


# --- helpers ---------------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def _image_out(img: SavedImage) -> ImageOut:
    return ImageOut.model_validate(img.model_dump(include=set(ImageOut.model_fields)))


def _describe(img: SavedImage, label: str) -> str:
    """The text line of one image: what it is, where it is saved, and its resource URI."""
    size = f"{img.width}x{img.height}" if img.width and img.height else "size not stated"
    facts = f"{size}, {img.mime_type}, {human_bytes(img.bytes)}"
    if img.mime_type == SVG_MIME:
        return (
            f"{label}: an SVG vector document (not a raster), saved to {img.path} ({facts}); resource URI "
            f"{img.uri}. It has no inline preview because the server does not render SVG: open the file or "
            "read the resource to see it."
        )
    if img.frames and img.frames > 1:
        return (
            f"{label}: an animated GIF of {img.frames} frames, saved whole to {img.path} ({facts}); resource URI "
            f"{img.uri}. The preview shows its first frame."
        )
    return f"{label}: saved to {img.path} ({facts}); resource URI {img.uri}"


def _file_name(img: SavedImage) -> str:
    return img.path.replace("\\", "/").rsplit("/", 1)[-1] or img.id


def _serialized_size(result: CallToolResult) -> int:
    return len(result.model_dump_json(by_alias=True, exclude_none=True).encode())


def error_result(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True)


def _plan_previews(
    n: int, budget: int, per_cap: int = PREVIEW_MAX_BYTES, total_cap: int | None = PREVIEWS_TOTAL_BYTES
) -> tuple[int, int]:
    """The raw bytes all inline images may take together, and the cap for each one.

    `budget` is in serialized bytes: base64 turns 3 bytes into 4, and each block has some JSON
    around its data. `total_cap` bounds the raw bytes of all inline images together. Each image
    is made to at most max(MIN_PREVIEW_BYTES, total / n); most come out smaller, and the results
    are packed in order until the total is used, so the later ones are left out only when they
    really do not fit.
    """
    if n == 0 or budget <= 0:
        return 0, 0
    raw_total = (budget - n * BLOCK_OVERHEAD) * 3 // 4
    if total_cap is not None:
        raw_total = min(raw_total, total_cap)
    if raw_total < MIN_PREVIEW_BYTES:
        return 0, 0
    per = min(per_cap, max(MIN_PREVIEW_BYTES, raw_total // n))
    return int(raw_total), int(per)


# --- building results ------------------------------------------------------------------------------


async def build_image_result(
    images: Sequence[SavedImage],
    *,
    read_bytes: ReadBytes,
    cached: CachedPreview | None = None,
    status: Literal["done", "running"],
    headline: str,
    model: str | None = None,
    endpoint: str | None = None,
    provider: str | None = None,
    warnings: Sequence[str] = (),
    usage: dict[str, Any] | None = None,
    cost: float | None = None,
    balance: float | None = None,
    elapsed_s: float | None = None,
    job_id: str | None = None,
    preview_max_px: int = 512,
    inline_full: bool = False,
    cap_bytes: int = RESULT_CAP_BYTES,
    previews_total_bytes: int = PREVIEWS_TOTAL_BYTES,
) -> CallToolResult:
    """A tool result for `images`: previews (or downscaled full images), links, text, structure."""
    warnings = list(dict.fromkeys(warnings))
    total = len(images)
    lines: list[TextContent] = []
    links: list[ResourceLink] = []
    for i, img in enumerate(images, 1):
        label = f"Image {i} of {total}" if total > 1 else "Image"
        text = _describe(img, label)
        if img.revised_prompt:
            text += f"; revised prompt: {img.revised_prompt}"
        lines.append(TextContent(type="text", text=text))
        links.append(
            ResourceLink(
                type="resource_link",
                uri=img.uri,
                name=_file_name(img),
                title=f"{label} ({img.width}x{img.height})",
                description=f"Full image saved at {img.path}",
                mime_type=img.mime_type,
                size=img.bytes,
            )
        )

    def assemble(inline: dict[int, ImageContent], notes: list[str]) -> CallToolResult:
        all_warnings = [*warnings, *notes]
        structured = ImageToolResult(
            status=status,
            images=[_image_out(img) for img in images],
            model=model,
            endpoint=endpoint,
            provider=provider,
            warnings=all_warnings,
            usage=usage,
            cost=cost,
            balance=balance,
            elapsed_s=elapsed_s,
            job_id=job_id,
        )
        content: list[ContentBlock] = [TextContent(type="text", text=headline)]
        for i in range(total):
            if i in inline:
                content.append(inline[i])
            content.append(links[i])
            content.append(lines[i])
        if all_warnings:
            content.append(TextContent(type="text", text="Warnings:\n" + "\n".join(f"- {w}" for w in all_warnings)))
        return CallToolResult(content=content, structured_content=structured.model_dump(mode="json"))

    base = _serialized_size(assemble({}, []))
    # A full image may take the whole budget; a preview needs no more than PREVIEW_MAX_BYTES.
    per_cap = cap_bytes if inline_full else PREVIEW_MAX_BYTES
    total_cap = None if inline_full else previews_total_bytes
    shown = [i for i, img in enumerate(images) if img.mime_type != SVG_MIME]  # SVG: its text line instead
    room, per = _plan_previews(len(shown), cap_bytes - base - RESERVE_BYTES, per_cap, total_cap)
    notes: list[str] = []
    inline: dict[int, ImageContent] = {}
    left_out = len(shown)
    if room:
        made, made_notes = await _make_inline(
            [(i, images[i]) for i in shown], read_bytes, cached, per, preview_max_px, inline_full
        )
        used = failed = 0
        for i, (block, size), note in zip(shown, made, made_notes):
            if block is None:  # no preview could be made; the note says so
                failed += 1
            elif used + size > room:
                continue
            else:
                inline[i] = block
                used += size
            if note:
                notes.append(note)
        left_out = len(shown) - len(inline) - failed
    if shown and left_out > 0:
        notes.append(
            f"{left_out} of {len(shown)} previews were left out to keep the result within clients' size limits; "
            "every image is saved: use its path, read its imagegen:// resource, or call get_image(image=uri)"
        )
    result = assemble(inline, notes)
    # Previews are made to a byte budget, but an encoder can overshoot: drop the last ones until
    # the result fits.
    while _serialized_size(result) > cap_bytes and inline:
        dropped = max(inline)
        del inline[dropped]
        notes.append(f"the preview of image {dropped + 1} was left out to keep the result under the size limit")
        result = assemble(inline, notes)
    return result


async def _make_inline(
    images: Sequence[tuple[int, SavedImage]],
    read_bytes: ReadBytes,
    cached: CachedPreview | None,
    max_bytes: int,
    max_px: int,
    inline_full: bool,
) -> tuple[list[tuple[ImageContent | None, int]], list[str | None]]:
    """Previews (or downscaled full images) for `images` (each with its index in the result) with
    their raw sizes, made concurrently in worker threads; and a note per image that needs one, in order."""
    from . import images as imaging  # Pillow is only loaded when a result has images

    out: list[tuple[ImageContent | None, int]] = [(None, 0)] * len(images)
    notes: list[str | None] = [None] * len(images)

    async def one(k: int, i: int, img: SavedImage) -> None:
        # The preview made when the image arrived saves reading and decoding it again.
        early = None if inline_full or cached is None else cached(img.id)
        if early is not None and len(early[0]) <= max_bytes:
            out[k] = (ImageContent(type="image", data=_b64(early[0]), mime_type=early[1]), len(early[0]))
            return
        try:
            data, _mime = await on_disk(lambda: read_bytes(img.id))
            if inline_full:
                small, mime, w, h = await in_worker(lambda: imaging.downscale_to_fit(data, max_bytes))
                if (w, h) != (img.width, img.height) or mime != img.mime_type:
                    notes[k] = (
                        f"image {i + 1} is inlined downscaled to {w}x{h} {mime} to fit the result size limit; "
                        f"the full {img.width}x{img.height} image is at {img.path}"
                    )
            else:
                small, mime = await in_worker(lambda: imaging.make_preview(data, max_px=max_px, max_bytes=max_bytes))
        except Exception as exc:  # a preview is a convenience: the image itself is saved
            log.warning("no preview for %s: %s", img.id, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            notes[k] = f"no preview of image {i + 1} could be made ({type(exc).__name__}); the image is saved"
            return
        out[k] = (ImageContent(type="image", data=_b64(small), mime_type=mime), len(small))

    async with anyio.create_task_group() as tg:
        for k, (i, img) in enumerate(images):
            tg.start_soon(one, k, i, img)
    return out, notes


def _b64(data: bytes) -> str:
    return b64.encode(data)


# --- the three shapes the tools return -------------------------------------------------------------


def _done_headline(result: GenerationResult, verb: str) -> str:
    n = len(result.images)
    what = f"{n} image{'s' if n != 1 else ''}"
    text = f"{verb} {what} with model {result.model!r} on endpoint {result.endpoint!r} in {result.elapsed_s:.1f} s."
    extras = []
    if result.cost is not None:
        extras.append(f"cost {result.cost:g}")
    if result.balance is not None:
        extras.append(f"balance {result.balance:g}")
    if extras:
        text += " " + ", ".join(extras).capitalize() + "."
    vectors = sum(img.mime_type == SVG_MIME for img in result.images)
    if not vectors:
        text += " Each image below has a preview, a resource link and its saved path;"
    else:  # an SVG document is not rendered, and no gateway takes one as an input
        text += " Each image below has a resource link and its saved path, and a preview unless it is an SVG document;"
    if vectors < len(result.images):
        text += " pass its imagegen:// URI to edit_image to change it."
    return text


async def from_generation(
    result: GenerationResult,
    *,
    read_bytes: ReadBytes,
    cached: CachedPreview | None = None,
    verb: str = "Generated",
    preview_max_px: int = 512,
    inline_full: bool = False,
) -> CallToolResult:
    return await build_image_result(
        result.images,
        read_bytes=read_bytes,
        cached=cached,
        status="done",
        headline=_done_headline(result, verb),
        model=result.model,
        endpoint=result.endpoint,
        provider=result.provider,
        warnings=result.warnings,
        usage=result.usage,
        cost=result.cost,
        balance=result.balance,
        elapsed_s=result.elapsed_s,
        job_id=result.job_id,
        preview_max_px=preview_max_px,
        inline_full=inline_full,
    )


async def still_running(
    job: Job,
    *,
    read_bytes: ReadBytes,
    cached: CachedPreview | None = None,
    elapsed_s: float,
    expected: int | None = None,
    preview_max_px: int = 512,
    inline_full: bool = False,
) -> CallToolResult:
    """A normal (not error) result for a job that outlived the call: handle, and images so far."""
    saved: list[SavedImage] = list(job.saved)
    route = job.route
    if expected is None:
        expected = job.request.n
    so_far = f"{len(saved)} of {expected}" if expected else str(len(saved))
    headline = (
        f"The generation is still running (job_id {job.id!r}, {elapsed_s:.0f} s so far); "
        f"{so_far} image(s) are saved so far. The work goes on in the background and every image is kept. "
        f'Call get_image(job_id="{job.id}") to wait for the result.'
    )
    return await build_image_result(
        saved,
        read_bytes=read_bytes,
        cached=cached,
        status="running",
        headline=headline,
        model=route.model.id if route is not None else None,
        endpoint=route.endpoint.name if route is not None else None,
        provider=route.endpoint.provider if route is not None else None,
        warnings=list(job.warnings),
        usage=job.usage,
        cost=job.cost,
        balance=job.balance,
        elapsed_s=round(elapsed_s, 3),
        job_id=job.id,
        preview_max_px=preview_max_px,
        inline_full=inline_full,
    )


async def from_record(
    record: ImageRecord,
    *,
    read_bytes: ReadBytes,
    cached: CachedPreview | None = None,
    preview_max_px: int = 512,
    inline_full: bool = False,
) -> CallToolResult:
    headline = (
        f"Saved image {record.uri}: {record.operation} by model {record.model!r} on endpoint {record.endpoint!r} "
        f"at {record.created_at}, prompt: {record.prompt!r}."
    )
    return await build_image_result(
        [record],
        read_bytes=read_bytes,
        cached=cached,
        status="done",
        headline=headline,
        model=record.model,
        endpoint=record.endpoint,
        provider=record.provider,
        job_id=record.job_id,
        preview_max_px=preview_max_px,
        inline_full=inline_full,
    )


def models_result(models: Sequence[ModelInfo], warnings: Sequence[str] = ()) -> CallToolResult:
    """list_models: structured `{"models": [...]}` plus a compact table an agent can read."""
    rows = [("endpoint", "model", "capabilities", "sizes", "max n", "knobs")]
    notes: list[str] = []
    for m in models:
        sizes = ", ".join(m.sizes) if m.sizes else m.size_rules or "any (the gateway judges)"
        rows.append((m.endpoint, m.id, ",".join(m.capabilities), sizes, str(m.max_n or 1), ",".join(m.parameters)))
        notes += [f"- {m.id} on {m.endpoint}: {note}" for note in m.notes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
    text = f"{len(models)} model(s). Pass `model` and optionally `endpoint` to generate_image / edit_image.\n{table}"
    if notes:  # deprecations, and what gateways taught
        text += "\nNotes:\n" + "\n".join(notes)
    if not models:
        text = "No models match. Call list_models without filters to see every configured endpoint's models."
    if warnings:
        text += "\nWarnings:\n" + "\n".join(f"- {w}" for w in warnings)
    structured = ModelList(models=list(models), warnings=list(warnings))
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=structured.model_dump(mode="json")
    )
