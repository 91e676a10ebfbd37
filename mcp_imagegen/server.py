"""The MCP surface: tools, resources and results, on top of the engine in service.py.

Tools: generate_image, edit_image, get_image and list_models. Every failure an agent can act on
comes back as a tool result with isError set and a message that says what to change; a call that
outlives `settings.tool_deadline_s` returns a job handle instead of an error, and the work goes on
in the service's own task group, so no image that was paid for is lost.

Resources: every saved image at `imagegen://images/{id}` (blob, with the image's own MIME type),
`imagegen://images` (the recent images as JSON), and resources/list pages through every saved
image, newest first, with cursors.

(No `from __future__ import annotations` here: the SDK reads the tools' signatures, including
the `Context` parameter, at registration.)
"""

import functools
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, CallToolResult, ListResourcesResult, PaginatedRequestParams, ToolAnnotations
from mcp_types import Resource as MCPResource
from mcp_types import ResourceTemplate as MCPResourceTemplate
from pydantic import AnyUrl, Field, ValidationError

from . import __version__, results, studio, tasks
from .config import Settings
from .errors import ImageGenError, InputNotFoundError, InvalidRequestError
from .models import ImageRecord, ImageRequest, given_knobs
from .results import ImageToolResult, ModelList
from .work import on_disk

log = logging.getLogger("mcp_imagegen.server")

IMAGE_URI_PREFIX = "imagegen://images/"
IMAGE_TEMPLATE = IMAGE_URI_PREFIX + "{image_id}"
RECENT_URI = "imagegen://images"
RECENT_LIMIT = 50
RESOURCE_PAGE_SIZE = 100  # images per resources/list page
HEARTBEAT_S = 5.0

INSTRUCTIONS = """\
Image generation and editing through the configured image gateways.
- list_models shows each endpoint's models with their capabilities, sizes and max n.
- generate_image makes images from a prompt; edit_image changes existing images (paths, URLs, data \
URLs, base64, or imagegen:// URIs from earlier results).
- Every result gives each image as a small preview, a resource link (imagegen://images/{id}) and the \
saved file path. Pass the imagegen:// URI to edit_image to keep working on an image.
- A slow generation returns status "running" with a job_id: call get_image(job_id=...) to collect it.
"""

# --- argument types: what an agent reads in the schema ----------------------------------------------

Prompt = Annotated[str, Field(min_length=1, description="What the image should show (or, for edits, what to change).")]
ModelArg = Annotated[
    str | None,
    Field(
        description="Model id, e.g. 'gpt-image-2'. Omit for the default model. Call list_models to see which "
        "models each endpoint has, their sizes and max n."
    ),
]
EndpointArg = Annotated[
    str | None,
    Field(
        description="Name of a configured endpoint (gateway) to use. Omit to let the server pick one that "
        "serves the model. list_models shows the endpoint of every model."
    ),
]
NArg = Annotated[int, Field(ge=1, le=10, description="How many images to make (1-10; each model has its own max n).")]
SizeArg = Annotated[
    str | None,
    Field(
        description="Image size as WIDTHxHEIGHT, e.g. '1024x1024' or '1536x1024'; 'auto' where the model "
        "takes it. Omit for the model's default. list_models shows the sizes each model accepts."
    ),
]
QualityArg = Annotated[
    str | None,
    Field(description="Model-specific quality, e.g. 'low'|'medium'|'high'|'auto' (gpt-image) or 'standard'|'hd'."),
]
StyleArg = Annotated[str | None, Field(description="Model-specific style, e.g. 'vivid' or 'natural' (dall-e-3).")]
SeedArg = Annotated[int | None, Field(ge=0, description="Seed for reproducible results, where the model takes one.")]
NegativeArg = Annotated[str | None, Field(description="What the image should not show (diffusion models).")]
BackgroundArg = Annotated[
    str | None, Field(description="'transparent', 'opaque' or 'auto', where the model supports it (gpt-image).")
]
FormatArg = Annotated[
    Literal["png", "jpeg", "webp"] | None,
    Field(description="File format of the saved image, where the model lets you choose."),
]
GuidanceArg = Annotated[
    float | None, Field(ge=0, description="Prompt guidance scale (CFG), for diffusion models that take it.")
]
StepsArg = Annotated[int | None, Field(ge=1, description="Denoising steps, for diffusion models that take it.")]
StrengthArg = Annotated[
    float | None,
    Field(ge=0, le=1, description="How strongly to repaint (0-1; inside the mask if one is given), where supported."),
]
ExtraArg = Annotated[
    dict[str, Any] | None,
    Field(
        description="Gateway-specific parameters with no canonical argument, passed to the gateway as they are, "
        'under their wire names (e.g. {"moderation": "low"}). A value of null removes that field from what '
        'the server would send (e.g. {"response_format": null}).'
    ),
]
InlineFullArg = Annotated[
    bool,
    Field(
        description="Inline the full image (downscaled to fit the client's 1 MiB result limit) instead of a "
        "small preview. The full-size file is always saved either way."
    ),
]
ImagesArg = Annotated[
    list[str] | str,
    Field(
        description="The image(s) to edit: each a file path on the server, an http(s) URL, a data URL, raw "
        "base64, or an imagegen://images/... URI from an earlier result. One string or a list (several "
        "images need a model with the multi_image capability)."
    ),
]
MaskArg = Annotated[
    str | None,
    Field(
        description="Optional mask, given like an image. With an alpha channel, transparent pixels mark the area "
        "to change; without one, white pixels mark it. Needs a model with the 'mask' capability."
    ),
]

GENERATE_ANNOTATIONS = ToolAnnotations(
    title="Generate images",
    read_only_hint=False,
    destructive_hint=False,
    idempotent_hint=False,
    open_world_hint=True,
)
EDIT_ANNOTATIONS = GENERATE_ANNOTATIONS.model_copy(update={"title": "Edit images"})
GET_ANNOTATIONS = ToolAnnotations(
    title="Get a generation's images",
    read_only_hint=True,
    destructive_hint=False,
    idempotent_hint=True,
    open_world_hint=False,
)
LIST_ANNOTATIONS = ToolAnnotations(
    title="List image models", read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=True
)


# --- pieces ------------------------------------------------------------------------------------------


class _ServiceHolder:
    """The service the tools use: given by the caller, or made in the lifespan.

    A service's task group must be exited by the task that entered it, so the lifespan that made
    the service owns it; a lifespan entered again meanwhile (legacy SSE enters it per connection
    when no service is given) shares that service. The transports pass their own service.
    """

    def __init__(self, settings: Settings, service: Any | None) -> None:
        self.settings = settings
        self.given = service
        self.service: Any | None = service

    def get(self) -> Any:
        if self.service is None:
            raise ImageGenError("the image service is not running (the server is starting or stopping); try again")
        return self.service

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Any]:
        if self.service is not None:
            yield self.service
            return
        from .service import ImageService

        service = ImageService(self.settings)
        self.service = service
        try:
            async with service:
                yield service
        finally:
            self.service = None


class _Progress:
    """Progress for one tool call: the service's per-image reports plus heartbeats in between.

    MCP wants the progress value to grow with every notification; a heartbeat moves a tenth of the
    way towards the next whole image, so it never claims an image that is not there.
    """

    def __init__(self, ctx: Context | None, total: float | None) -> None:
        self.ctx = ctx
        self.total = total
        self.last = -1.0
        self.saved = 0
        self.closed = False
        self.started = time.monotonic()
        self._lock = anyio.Lock()

    async def _send(self, value: float, total: float | None, message: str) -> None:
        if self.closed or self.ctx is None:
            return
        async with self._lock:
            if value <= self.last:
                value = self._nudge()
            self.last = value
            try:
                await self.ctx.report_progress(value, total if total is not None else self.total, message)
            except Exception:  # the caller may be gone: progress is best effort
                log.debug("progress notification failed", exc_info=True)

    def _nudge(self) -> float:
        base = max(self.last, 0.0)
        ceiling = math.floor(base) + 1
        return base + (ceiling - base) * 0.1

    async def service_report(self, progress: float, total: float | None, message: str) -> None:
        self.saved = max(self.saved, int(progress))
        if total is not None:
            self.total = total
        await self._send(float(progress), total, message)

    async def heartbeat(self, what: str = "working") -> None:
        if self.total and self.last >= self.total:
            # Every image is saved and the result is on its way (its record is being written):
            # a heartbeat could only claim more than the total.
            return
        elapsed = time.monotonic() - self.started
        of = f" of {self.total:g}" if self.total else ""
        await self._send(
            self._nudge() if self.last >= 0 else 0.0, None, f"{what}: {self.saved}{of} image(s) saved, {elapsed:.0f} s"
        )

    def close(self) -> None:
        self.closed = True


async def _await_job(job: Any, seconds: float, progress: _Progress | None, what: str) -> Any:
    """The job's result, or None if it is still running after `seconds`; heartbeats meanwhile."""
    end = anyio.current_time() + max(seconds, 0.0)
    while True:
        remaining = end - anyio.current_time()
        result = await job.wait(max(0.0, min(remaining, HEARTBEAT_S)))
        if result is not None:
            return result
        if job.finished:
            # wait() raised for failures; a finished job without a result is a bug upstream. (Its
            # status may say "done" a moment before it finishes: its final record is being written.)
            raise ImageGenError(f"job {job.id} ended ({job.status}) without a result")
        if end - anyio.current_time() <= 0:
            return None
        if progress is not None:
            await progress.heartbeat(what)


def _peer_cancelled(ctx: Context | None) -> bool:
    """Whether the client sent `notifications/cancelled` for this call (an explicit cancel, which
    an SDK read timeout also sends), as opposed to the connection going away.

    The SDK sets the request's `cancel_requested` event before it cancels the handler; the event
    sits on the request's dispatch context, which the per-request session holds.
    """
    try:
        dispatch = ctx.request_context.session._request_outbound  # type: ignore[union-attr]
        return bool(dispatch.cancel_requested.is_set())
    except (AttributeError, ValueError):
        return False  # unknown: treat as a disconnect, which never drops work


def _describe_validation(tool: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        name = loc[0] if loc else "(arguments)"
        # Unions add the branch type to the location (`images.list[str]`); the argument name is enough.
        if err["type"] == "missing":
            problems.append(f"`{name}` is required but was not given")
            continue
        if err["type"] == "extra_forbidden":
            problems.append(
                f"`{name}` is not an argument of {tool}; remove it (gateway-specific parameters go in `extra`)"
            )
            continue
        shown = repr(err.get("input"))
        if len(shown) > 60:
            shown = shown[:57] + "..."
        problems.append(f"`{name}`: {err['msg']} (got {shown})")
    unique = list(dict.fromkeys(problems))
    return f"Invalid arguments for {tool}: " + "; ".join(unique) + ". Fix these and call again."


class _Tool(Tool):
    """A tool whose argument errors name each bad argument and say what to change, and whose
    description is its docstring without the source's indentation (what an agent reads)."""

    @classmethod
    def from_function(cls, fn: Callable[..., Any], *args: Any, description: str | None = None, **kwargs: Any) -> Any:
        return super().from_function(fn, *args, description=description or inspect.cleandoc(fn.__doc__ or ""), **kwargs)

    async def run(self, arguments: dict[str, Any], context: Any, convert_result: bool = False) -> Any:
        fields = self.fn_metadata.arg_model.model_fields
        known = {f.alias or name for name, f in fields.items()} | set(fields)
        unknown = sorted(k for k in arguments if k not in known)
        if unknown:
            names = ", ".join(f"`{k}`" for k in unknown)
            hint = " (gateway-specific parameters go in `extra`)" if "extra" in known else ""
            raise ToolError(
                f"Invalid arguments for {self.name}: {names} {'is not an argument' if len(unknown) == 1 else 'are not arguments'}"
                f" of {self.name}{hint}. Its arguments are: {', '.join(sorted(known))}."
            )
        try:
            return await super().run(arguments, context, convert_result)
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):
                raise ToolError(_describe_validation(self.name, exc.__cause__)) from exc.__cause__
            raise


def _image_id(value: str) -> str:
    value = value.strip().removeprefix(IMAGE_URI_PREFIX)
    value = value.split("?", 1)[0].split("#", 1)[0].strip("/")
    if not value or "/" in value:
        raise InvalidRequestError(
            f"{value!r} is not an image id or {IMAGE_URI_PREFIX}{{id}} URI; use the uri of an image from an earlier result"
        )
    return value


async def _record(service: Any, image_id: str) -> ImageRecord:
    try:
        record = await on_disk(lambda: service.store.get(image_id))
    except (KeyError, FileNotFoundError):
        record = None
    if record is None:
        raise InputNotFoundError(
            f"no saved image with id {image_id!r}; use the uri of an image from an earlier result "
            f"(resources/list or the {RECENT_URI} resource lists recent images)"
        )
    return record


def _answers_errors(tool: Callable[..., Awaitable[CallToolResult]]) -> Callable[..., Awaitable[CallToolResult]]:
    """Tool failures become results the agent can act on, never protocol errors.

    An ImageGenError (bad argument, gateway failure) is returned as an isError result with its
    agent text; anything else is a bug, logged with its traceback and answered generically.
    """

    @functools.wraps(tool)
    async def answer(*args: Any, **kwargs: Any) -> CallToolResult:
        try:
            return await tool(*args, **kwargs)
        except ImageGenError as exc:
            return results.error_result(exc.agent_text())
        except Exception:  # noqa: BLE001 - logged with its traceback; the agent gets a generic message
            return _internal_error(tool.__name__)

    return answer


def _internal_error(tool: str) -> CallToolResult:
    log.exception("%s failed unexpectedly", tool)
    return results.error_result(
        f"{tool} failed with an internal error; the details are in the server's log. "
        "Images already received are saved; list them with the imagegen://images resource."
    )


# --- the server -----------------------------------------------------------------------------------


class ImageGenServer(MCPServer):
    """MCPServer whose resource list and reads come from the image store."""

    def __init__(self, holder: _ServiceHolder, **kwargs: Any) -> None:
        self._holder = holder
        super().__init__(**kwargs)

    async def _handle_list_resources(self, ctx: Any, params: PaginatedRequestParams | None) -> ListResourcesResult:
        """resources/list: the fixed resources, then every saved image, newest first, in pages."""
        cursor = params.cursor if params is not None else None
        listed = await super().list_resources() if cursor is None else []
        try:
            service = self._holder.get()
            records, next_cursor = await on_disk(lambda: service.store.page(cursor, RESOURCE_PAGE_SIZE))
        except InvalidRequestError as exc:
            raise MCPError(INVALID_PARAMS, exc.agent_text()) from None
        except Exception:
            log.warning("could not list saved images", exc_info=True)
            return ListResourcesResult(resources=listed)
        listed.extend(_image_resource(r) for r in records)
        return ListResourcesResult(resources=listed, next_cursor=next_cursor)

    async def list_resources(self) -> list[MCPResource]:
        """The first page of resources/list."""
        return (await self._handle_list_resources(None, None)).resources

    async def list_resource_templates(self) -> list[MCPResourceTemplate]:
        templates = await super().list_resource_templates()
        # Saved images have different types; a template's mimeType is only for one shared type.
        return [t.model_copy(update={"mime_type": None}) if t.uri_template == IMAGE_TEMPLATE else t for t in templates]

    async def read_resource(self, uri: AnyUrl | str, context: Any = None) -> Iterable[ReadResourceContents] | Any:
        text = str(uri)
        if text.startswith(IMAGE_URI_PREFIX):
            try:
                image_id = _image_id(text)
                service = self._holder.get()
                record = await _record(service, image_id)
                data, mime = await on_disk(lambda: service.store.read_bytes(image_id))
            except ImageGenError as exc:
                raise ResourceNotFoundError(exc.agent_text()) from None
            return [ReadResourceContents(content=data, mime_type=mime or record.mime_type)]
        return await super().read_resource(uri, context)


def _image_resource(r: ImageRecord) -> MCPResource:
    return MCPResource(
        uri=r.uri,
        name=r.path.replace("\\", "/").rsplit("/", 1)[-1],
        title=_short(r.prompt),
        description=f"{r.operation} by {r.model} on {r.endpoint}, {r.width}x{r.height}, {r.created_at}; saved at {r.path}",
        mime_type=r.mime_type,
        size=r.bytes,
    )


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_server(settings: Settings, service: Any | None = None) -> MCPServer:
    """The MCP server. Without `service`, one is made and entered in the server's lifespan."""
    holder = _ServiceHolder(settings, service)

    @asynccontextmanager
    async def lifespan(_server: MCPServer) -> AsyncIterator[Any]:
        async with holder.running() as running:
            yield running

    def read_bytes(image_id: str) -> tuple[bytes, str]:
        return holder.get().store.read_bytes(image_id)

    def cached(image_id: str) -> tuple[bytes, str] | None:
        return holder.get().take_preview(image_id)

    async def run_request(
        tool: str, ctx: Context | None, request: ImageRequest, inline_full: bool, verb: str
    ) -> CallToolResult:
        svc = holder.get()
        with svc.answering():  # a drain (SIGTERM) lets this call answer before connections close
            return await _run_request(svc, tool, ctx, request, inline_full, verb)

    async def _run_request(
        svc: Any, tool: str, ctx: Context | None, request: ImageRequest, inline_full: bool, verb: str
    ) -> CallToolResult:
        progress = _Progress(ctx, float(request.n))
        job = svc.submit(request, progress=progress.service_report)
        started = time.monotonic()
        try:
            result = await _await_job(job, tasks.answer_within(settings.tool_deadline_s), progress, "generating")
        except anyio.get_cancelled_exc_class():
            # Plain calls, no awaits: nothing here can be interrupted by the cancellation.
            progress.close()
            job.detach_progress()
            if _peer_cancelled(ctx):
                # The person's cancel: requests not yet sent are dropped, sent ones still saved.
                job.cancel()
                log.info("%s cancelled by the client; job %s sends nothing more and saves what was sent", tool, job.id)
            else:
                # A disconnect, a closed session, a transport error: never the person's decision.
                log.info("%s lost its caller; job %s goes on (get_image(job_id) collects it)", tool, job.id)
            raise
        except BaseException:
            progress.close()
            job.detach_progress()
            raise
        progress.close()
        job.detach_progress()
        inline = inline_full or settings.inline_full_image
        if result is None:
            await svc.recorded(job)  # its id leaves the server now: get_image finds it after a restart
            return await results.still_running(
                job,
                read_bytes=read_bytes,
                cached=cached,
                elapsed_s=time.monotonic() - started,
                expected=request.n,
                preview_max_px=settings.preview_max_px,
                inline_full=inline,
            )
        return await results.from_generation(
            result,
            read_bytes=read_bytes,
            cached=cached,
            verb=verb,
            preview_max_px=settings.preview_max_px,
            inline_full=inline,
        )

    @_answers_errors
    async def generate_image(
        prompt: Prompt,
        model: ModelArg = None,
        endpoint: EndpointArg = None,
        n: NArg = 1,
        size: SizeArg = None,
        quality: QualityArg = None,
        style: StyleArg = None,
        seed: SeedArg = None,
        negative_prompt: NegativeArg = None,
        background: BackgroundArg = None,
        output_format: FormatArg = None,
        guidance_scale: GuidanceArg = None,
        num_inference_steps: StepsArg = None,
        extra: ExtraArg = None,
        inline_full: InlineFullArg = False,
        ctx: Context = None,  # type: ignore[assignment]
    ) -> Annotated[CallToolResult, ImageToolResult]:
        """Generate images from a text prompt.

        Returns each image as a small inline preview, a resource link (imagegen://images/{id}) and
        the path where the full image is saved. If the generation takes longer than the server's
        deadline, the result has status "running" and a job_id: call get_image(job_id=...) to
        collect the images; nothing is lost. Call list_models first to see which models each
        endpoint has, their sizes and max n.
        """
        request = ImageRequest(
            operation="generate",
            prompt=prompt,
            model=model,
            endpoint=endpoint,
            n=n,
            size=size,
            knobs=given_knobs(
                quality=quality,
                style=style,
                seed=seed,
                negative_prompt=negative_prompt,
                background=background,
                output_format=output_format,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
            ),
            extra=dict(extra or {}),
        )
        return await run_request("generate_image", ctx, request, inline_full, "Generated")

    @_answers_errors
    async def edit_image(
        prompt: Prompt,
        images: ImagesArg,
        mask: MaskArg = None,
        model: ModelArg = None,
        endpoint: EndpointArg = None,
        n: NArg = 1,
        size: SizeArg = None,
        strength: StrengthArg = None,
        quality: QualityArg = None,
        seed: SeedArg = None,
        negative_prompt: NegativeArg = None,
        background: BackgroundArg = None,
        output_format: FormatArg = None,
        guidance_scale: GuidanceArg = None,
        num_inference_steps: StepsArg = None,
        extra: ExtraArg = None,
        inline_full: InlineFullArg = False,
        ctx: Context = None,  # type: ignore[assignment]
    ) -> Annotated[CallToolResult, ImageToolResult]:
        """Edit one or more images according to a prompt, optionally only inside a mask.

        `images` takes file paths, http(s) URLs, data URLs, base64, or imagegen://images/... URIs
        from earlier results (the easiest way to keep working on an image). A mask with an alpha
        channel marks the area to change with transparent pixels; a mask without one marks it with
        white pixels. Results look like generate_image's (preview, resource link, saved path; a
        job_id with status "running" when the edit outlives the call). list_models shows which
        models can edit (capability 'edit'), take a mask ('mask') or several images ('multi_image').
        """
        specs = [images] if isinstance(images, str) else list(images)
        if not specs:
            raise InvalidRequestError("`images` is empty; give at least one image to edit")
        svc = holder.get()
        inputs, mask_image = await svc.resolve_inputs(specs, mask)
        request = ImageRequest(
            operation="edit",
            prompt=prompt,
            model=model,
            endpoint=endpoint,
            n=n,
            size=size,
            images=inputs,
            mask=mask_image,
            knobs=given_knobs(
                strength=strength,
                quality=quality,
                seed=seed,
                negative_prompt=negative_prompt,
                background=background,
                output_format=output_format,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
            ),
            extra=dict(extra or {}),
        )
        return await run_request("edit_image", ctx, request, inline_full, "Edited into")

    @_answers_errors
    async def get_image(
        job_id: Annotated[
            str | None, Field(description="The job_id of a generation that returned status 'running'.")
        ] = None,
        image: Annotated[
            str | None, Field(description="An imagegen://images/{id} URI (or just the id) of a saved image.")
        ] = None,
        wait_s: Annotated[
            float,
            Field(
                ge=0,
                description="For a job: how long to wait for it to finish, in seconds (capped by the server's deadline).",
            ),
        ] = 20.0,
        inline_full: InlineFullArg = False,
        ctx: Context = None,  # type: ignore[assignment]
    ) -> Annotated[CallToolResult, ImageToolResult]:
        """Collect the images of a generation that was still running, or look at a saved image.

        With job_id: waits up to wait_s for the job and returns its images like generate_image does
        (status "running" again if it is still not finished: call again). With image: returns that
        saved image's preview, resource link, saved path and what made it.
        """
        if (job_id is None) == (image is None):
            raise InvalidRequestError(
                "give exactly one of `job_id` (from a result with status 'running') or `image` "
                "(an imagegen://images/{id} URI)"
            )
        svc = holder.get()
        inline = inline_full or settings.inline_full_image
        if image is not None:
            record = await _record(svc, _image_id(image))
            return await results.from_record(
                record,
                read_bytes=read_bytes,
                cached=cached,
                preview_max_px=settings.preview_max_px,
                inline_full=inline,
            )
        assert job_id is not None
        job = await svc.find_job(job_id.strip())
        progress = _Progress(ctx, float(job.request.n))
        progress.saved = len(job.saved)
        try:
            result = await _await_job(job, min(wait_s, settings.tool_deadline_s), progress, "waiting")
        except ImageGenError:
            if job.status in ("cancelled", "interrupted") and job.result is not None:
                why = job.error.message if job.error is not None else job.status
                result = job.result.model_copy(
                    update={
                        "warnings": [*job.result.warnings, f"the job was {job.status} ({why}); these images were saved"]
                    }
                )
            else:
                raise
        finally:
            progress.close()
        if result is None:
            return await results.still_running(
                job,
                read_bytes=read_bytes,
                cached=cached,
                elapsed_s=time.monotonic() - job.started,
                preview_max_px=settings.preview_max_px,
                inline_full=inline,
            )
        verb = "Edited into" if job.request.operation == "edit" else "Generated"
        return await results.from_generation(
            result,
            read_bytes=read_bytes,
            cached=cached,
            verb=verb,
            preview_max_px=settings.preview_max_px,
            inline_full=inline,
        )

    @_answers_errors
    async def list_models(
        capability: Annotated[
            Literal["generate", "edit", "mask", "multi_image"] | None,
            Field(
                description="Only models with this capability: generate, edit, mask (edits inside a mask) or multi_image (edits of several images)."
            ),
        ] = None,
        endpoint: Annotated[str | None, Field(description="Only this configured endpoint's models.")] = None,
        refresh: Annotated[
            bool, Field(description="Ask the gateways again for their model lists instead of using the cache.")
        ] = False,
    ) -> Annotated[CallToolResult, ModelList]:
        """List the image models of every configured endpoint: capabilities, sizes, max n and knobs.

        Use the `id` as generate_image/edit_image's `model` and the `endpoint` as their `endpoint`.
        """
        models, warnings = await holder.get().list_models(capability=capability, endpoint=endpoint, refresh=refresh)
        return results.models_result(models, warnings)

    tools = [
        _Tool.from_function(
            generate_image, title="Generate images", annotations=GENERATE_ANNOTATIONS, meta=studio.TOOL_META
        ),
        _Tool.from_function(edit_image, title="Edit images", annotations=EDIT_ANNOTATIONS, meta=studio.TOOL_META),
        _Tool.from_function(get_image, title="Get a generation's images", annotations=GET_ANNOTATIONS),
        _Tool.from_function(list_models, title="List image models", annotations=LIST_ANNOTATIONS),
    ]
    server = ImageGenServer(
        holder,
        name="mcp-imagegen",
        title="Image generation",
        version=__version__,
        instructions=INSTRUCTIONS,
        tools=tools,
        lifespan=lifespan,
        # The image studio (MCP Apps) and tasks (2026-07-28) for clients that declare them.
        extensions=[studio.studio_app(holder), tasks.TasksExtension(holder)],
        middleware=[studio.hide_app_parts],
    )

    @server.resource(
        IMAGE_TEMPLATE,
        name="saved-image",
        title="Saved image",
        description="A saved image (full size) by its opaque id, as generate_image and edit_image return it.",
    )
    async def saved_image(image_id: str) -> bytes:
        svc = holder.get()
        await _record(svc, image_id)
        data, _mime = await on_disk(lambda: svc.store.read_bytes(image_id))
        return data

    @server.resource(
        RECENT_URI,
        name="recent-images",
        title="Recent images",
        description=f"The {RECENT_LIMIT} most recently saved images (newest first) as JSON: uri, path, size, prompt, model.",
        mime_type="application/json",
    )
    async def recent_images() -> str:
        svc = holder.get()
        records = await on_disk(lambda: svc.store.recent(RECENT_LIMIT))
        import json

        return json.dumps({"images": [r.model_dump(mode="json", exclude={"parameters"}) for r in records]}, indent=1)

    _serve_logging_level(server)
    _drop_prompts(server)
    return server


# MCP's eight levels onto Python's: `notice` ("normal but significant") is shown from WARNING.
_MCP_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "alert": logging.CRITICAL,
    "emergency": logging.CRITICAL,
}


def _serve_logging_level(server: MCPServer) -> None:
    """`logging/setLevel` sets how much the server logs (on stderr: on stdio, stdout is the protocol's).

    Served so that clients and the conformance suite that send it get `{}` rather than "method not
    found"; the server's logs stay on stderr, where they are kept and grepped. The method exists
    through protocol 2025-11-25 (it is deprecated after), so a 2026 session never sees it.
    """
    from mcp_types import EmptyResult, SetLevelRequestParams

    ours = logging.getLogger("mcp_imagegen")

    async def set_level(_ctx: Any, params: SetLevelRequestParams) -> EmptyResult:
        ours.setLevel(_MCP_LEVELS[params.level])
        log.info("log level set by the client", extra={"fields": {"level": params.level}})
        return EmptyResult()

    # The SDK's high-level server has no parameter for it; the low-level server advertises the
    # `logging` capability once the handler is there.
    server._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)


def _drop_prompts(server: MCPServer) -> None:
    """No `prompts` capability: this server has no prompts, and an empty list advertised invites
    clients to ask (an unknown name then answered with error code 0). Without the handlers, the
    capability is not advertised and prompts/* answer "method not found"."""
    handlers = server._lowlevel_server._request_handlers  # the SDK registers them unconditionally
    for method in ("prompts/list", "prompts/get"):
        handlers.pop(method, None)
