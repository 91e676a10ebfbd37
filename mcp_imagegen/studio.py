"""The image studio: an MCP App (`io.modelcontextprotocol/ui`) that shows results in the chat.

Hosts that render MCP Apps show `studio.html` (shipped in the package) for `generate_image` and
`edit_image` results: full-size images, a gallery, compare, mask painting, bringing an image in,
following a running job. The app reaches the server only through its host (`tools/call`,
`resources/read`), so it needs nothing beyond the default CSP.

Three tools exist for the app alone (`_meta.ui.visibility = ["app"]`): hosts keep them from the
model, and `hide_app_parts` keeps them, and the page itself, out of `tools/list` and
`resources/list` for clients that did not declare Apps, so those list what they listed before.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Annotated, Any, Protocol

from mcp.server.apps import Apps, ResourceCsp, client_supports_apps
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from . import results
from .errors import ImageGenError, InvalidRequestError
from .models import ImageRecord
from .store import NewImage
from .work import in_worker, on_disk

APP_URI = "ui://mcp-imagegen/studio.html"
TOOL_META: dict[str, Any] = {"ui": {"resourceUri": APP_URI}}
"""`_meta` for the model-facing tools whose results the studio renders."""

GALLERY_SCAN = 1000  # the gallery pages through at most this many recent images
MAX_PAGE_SIZE = 60
RELATIVES_SCAN = 200  # how far back to look for an image's siblings (same job) and children

_APP_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
_IMPORT = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)


class _Holder(Protocol):
    def get(self) -> Any: ...


def app_html() -> str:
    return resources.files("mcp_imagegen").joinpath("app/studio.html").read_text(encoding="utf-8")


def _card(record: ImageRecord) -> dict[str, Any]:
    """What the app shows of a saved image (its generation parameters stay on the server)."""
    return record.model_dump(mode="json", exclude={"parameters"})


def _answer(structured: dict[str, Any], text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=structured)


def _answers_errors(tool: Callable[..., Awaitable[CallToolResult]]) -> Callable[..., Awaitable[CallToolResult]]:
    @functools.wraps(tool)
    async def answer(*args: Any, **kwargs: Any) -> CallToolResult:
        try:
            return await tool(*args, **kwargs)
        except ImageGenError as exc:
            return results.error_result(exc.agent_text())

    return answer


def studio_app(holder: _Holder) -> Apps:
    """The Apps extension: the studio's HTML resource and its app-only tools."""
    apps = Apps()
    apps.add_html_resource(
        APP_URI,
        app_html(),
        name="image-studio",
        title="Image studio",
        description="Shows generate_image / edit_image results full size, with a gallery, compare, mask "
        "painting and image import.",
        # Everything arrives through the host (tools/call, resources/read): no outside origins at all.
        csp=ResourceCsp(connect_domains=[], resource_domains=[]),
        prefers_border=True,
    )

    @apps.tool(
        resource_uri=APP_URI,
        visibility=["app"],
        name="studio_gallery",
        title="Gallery page",
        annotations=_APP_ONLY,
    )
    @_answers_errors
    async def studio_gallery(
        page: Annotated[int, Field(ge=1, description="Page number, from 1.")] = 1,
        page_size: Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE, description="Images per page.")] = 12,
        model: Annotated[str | None, Field(description="Only images made by this model.")] = None,
        text: Annotated[str | None, Field(description="Only images whose prompt contains this text.")] = None,
    ) -> CallToolResult:
        """One page of recently saved images, newest first, for the image studio."""
        store = holder.get().store
        records = await on_disk(lambda: store.recent(GALLERY_SCAN))
        models = sorted({r.model for r in records})
        needle = (text or "").strip().casefold()
        chosen = [
            r
            for r in records
            if (not model or r.model == model)
            and (not needle or needle in r.prompt.casefold() or needle in (r.revised_prompt or "").casefold())
        ]
        pages = max(1, -(-len(chosen) // page_size))
        start = (page - 1) * page_size
        shown = chosen[start : start + page_size]
        structured = {
            "images": [_card(r) for r in shown],
            "page": page,
            "pages": pages,
            "total": len(chosen),
            "models": models,
        }
        return _answer(structured, f"Page {page} of {pages}: {len(shown)} of {len(chosen)} image(s).")

    @apps.tool(
        resource_uri=APP_URI,
        visibility=["app"],
        name="studio_image",
        title="Image and its relatives",
        annotations=_APP_ONLY,
    )
    @_answers_errors
    async def studio_image(
        image: Annotated[str, Field(description="An imagegen://images/{id} URI.")],
    ) -> CallToolResult:
        """A saved image with its lineage (oldest first) and its siblings from the same job."""
        store = holder.get().store
        uri = image.strip()

        def relatives() -> dict[str, Any]:
            record = store.resolve_uri(uri)
            lineage = store.lineage(record.id)
            recent = store.recent(RELATIVES_SCAN) if record.job_id else []
            siblings = [r for r in recent if r.job_id == record.job_id]
            siblings.sort(key=lambda r: r.created_at)
            return {
                "image": _card(record),
                "lineage": [_card(r) for r in lineage],
                "siblings": [_card(r) for r in siblings] or [_card(record)],
            }

        structured = await on_disk(relatives)
        return _answer(structured, f"{uri}: {len(structured['lineage']) - 1} ancestor(s).")

    @apps.tool(
        resource_uri=APP_URI,
        visibility=["app"],
        name="studio_import",
        title="Bring an image in",
        annotations=_IMPORT,
    )
    @_answers_errors
    async def studio_import(
        data: Annotated[str, Field(description="The image as a data URL (data:image/png;base64,...).")],
        name: Annotated[str | None, Field(max_length=200, description="The file's name, if it had one.")] = None,
    ) -> CallToolResult:
        """Store an image the person brought into the studio, so the agent can name it by URI."""
        from . import images  # Pillow loads on first use, not at start-up

        svc = holder.get()
        if not data.strip().lower().startswith("data:"):
            raise InvalidRequestError("`data` must be a data URL (data:image/...;base64,...) of the image's bytes")
        label = f"imported image{f' {name!r}' if name else ''}"
        # The same checks as any input: size cap, real image, decodable, not a pixel bomb.
        raw, _declared = await in_worker(lambda: images.parse_data_url(data.strip(), label))
        mime, width, height = await in_worker(lambda: images.sniff(raw, label, verify=True))
        prompt = f"imported {name}" if name else "imported image"
        record = await on_disk(
            lambda: svc.store.save(
                raw,
                NewImage(
                    mime_type=mime,
                    width=width,
                    height=height,
                    prompt=prompt,
                    operation="import",
                    model="(imported)",
                    endpoint="studio",
                    provider="studio",
                    parameters={"file_name": name} if name else {},
                ),
            )
        )
        text = f"Stored {label} as {record.uri} ({width}x{height}, saved at {record.path})."
        return _answer({"image": _card(record)}, text)

    return apps


def _is_app_only(tool: Any) -> bool:
    meta = tool.get("_meta") if isinstance(tool, dict) else getattr(tool, "meta", None)
    ui = (meta or {}).get("ui") or {}
    visibility = ui.get("visibility")
    return isinstance(visibility, list) and "model" not in visibility


def _is_app_page(resource: Any) -> bool:
    uri = resource.get("uri") if isinstance(resource, dict) else getattr(resource, "uri", "")
    return str(uri).startswith("ui://")


# What a client that did not declare Apps is not shown: list method -> (field, is hidden).
_HIDDEN: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "tools/list": ("tools", _is_app_only),
    "resources/list": ("resources", _is_app_page),
}


async def hide_app_parts(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Middleware: for clients that did not declare Apps, `tools/list` leaves out the app-only
    tools and `resources/list` the studio's page, so they list what they listed before."""
    result = await call_next(ctx)
    hidden = _HIDDEN.get(ctx.method)
    if hidden is None or result is None or client_supports_apps(ctx):
        return result
    field, is_hidden = hidden
    if isinstance(result, dict):
        return {**result, field: [x for x in result.get(field, []) if not is_hidden(x)]}
    items = getattr(result, field, None)
    if items is None:
        return result
    return result.model_copy(update={field: [x for x in items if not is_hidden(x)]})
