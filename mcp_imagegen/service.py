"""The engine: one generate or edit, from canonical request to saved images.

Every generation runs as a `Job` in the service's own task group, not in the caller's task, so it
survives a caller that times out or disconnects: an image that was paid for is always saved. A
caller that cancels explicitly cancels the gateway requests not yet answered; answers already
received are decoded and saved under a shield.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup

from . import b64, checks
from .catalog import ModelCatalog, Route, missing_key_error
from .config import Settings
from .errors import (
    BadGatewayResponseError,
    ImageGenError,
    InputNotFoundError,
    InvalidRequestError,
)
from .heap import IdleTrim, settle_heap
from .limits import preview_bytes_for
from .models import (
    CAPABILITIES,
    GenerationResult,
    ImageRecord,
    ImageRequest,
    InputImage,
    ModelInfo,
    SavedImage,
    WireImage,
    WireResult,
)
from .store import ImageStore
from .work import in_worker, in_worker_unless_small, on_disk, watch_event_loop

log = logging.getLogger("mcp_imagegen.service")

ProgressFn = Callable[[float, float | None, str], Awaitable[None]]
JobStatus = Literal["running", "done", "failed", "cancelled"]

MAX_RESULT_IMAGE_BYTES = 128 * 1024 * 1024  # one downloaded image; anything larger is not an image
KEEP_FINISHED_JOBS = 128
KEEP_PREVIEWS = 64  # previews not yet taken by a result (tens of KB each)
SHUTDOWN_GRACE_S = 30.0


@dataclass(eq=False)
class Job:
    """One generation in flight or finished; the handle a slow tool call hands back."""

    id: str
    request: ImageRequest
    status: JobStatus = "running"
    saved: list[SavedImage] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    result: GenerationResult | None = None
    error: ImageGenError | None = None
    progress: ProgressFn | None = None
    route: Route | None = None
    usage: dict[str, Any] | None = None
    cost: float | None = None
    balance: float | None = None
    started: float = field(default_factory=time.monotonic)
    _done: anyio.Event = field(default_factory=anyio.Event)
    _scope: anyio.CancelScope | None = None

    async def wait(self, timeout: float | None) -> GenerationResult | None:
        """The result, or None when the job has not finished within `timeout` seconds."""
        with anyio.move_on_after(timeout):
            await self._done.wait()
        if not self._done.is_set():
            return None
        if self.error is not None:
            raise self.error
        return self.result

    def detach_progress(self) -> None:
        self.progress = None

    def cancel(self) -> None:
        if self._scope is not None and self.status == "running":
            self._scope.cancel()

    async def _report(self, done: float, total: float | None, message: str) -> None:
        progress = self.progress
        if progress is None:
            return
        try:
            await progress(done, total, message)
        except Exception:  # a caller that went away must not break the job
            log.debug("progress report failed; detaching", exc_info=True)
            self.progress = None


class ImageService:
    """The engine. `previews=True` (the MCP server) makes each image's inline preview while its
    bytes are still in memory; the command line has no use for previews."""

    def __init__(self, settings: Settings, *, previews: bool = True) -> None:
        self.settings = settings
        self._make_previews = previews
        self._previews: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self.store = ImageStore(settings.output_dir)
        self._stack = AsyncExitStack()
        self._gateway: Any = None  # GatewayClient, imported lazily: start-up does not need httpx
        self._catalog = ModelCatalog(settings, None)
        self._tasks: TaskGroup | None = None
        self._jobs: dict[str, Job] = {}
        self._idle_trim = IdleTrim()

    async def __aenter__(self) -> ImageService:
        self._tasks = await self._stack.enter_async_context(anyio.create_task_group())
        if logging.getLogger("mcp_imagegen.loop").isEnabledFor(logging.DEBUG):
            self._tasks.start_soon(watch_event_loop, name="event-loop watchdog")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Running jobs get a grace period to finish and save what they were paid for; the
        # caller's own exception, if any, propagates unchanged (not wrapped by the task group).
        with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_GRACE_S):
            for job in list(self._jobs.values()):
                await job._done.wait()
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()
        self._tasks = None
        await self._stack.aclose()

    async def _gateway_client(self) -> Any:
        if self._gateway is None:
            from .gateway import GatewayClient

            gateway = GatewayClient(max_retries=self.settings.max_retries)
            self._gateway = await self._stack.enter_async_context(gateway)
            self._catalog = ModelCatalog(self.settings, self._gateway)
        return self._gateway

    async def _needs_gateway(self) -> None:
        if any(_is_http(ep.provider) for ep in self.settings.endpoints):
            await self._gateway_client()

    # --- inputs --------------------------------------------------------------------------------

    async def resolve_inputs(
        self, specs: list[str], mask: str | None, *, readable: Sequence[Path] = ()
    ) -> tuple[list[InputImage], InputImage | None]:
        """Input images from what a caller gave; `readable` adds files that may be read wherever
        they are (those a person named on the command line, not those an agent sent)."""
        from .inputs import allowed_roots_for, resolve_input

        roots = [*allowed_roots_for(self.settings), *readable]
        resolved = []
        for i, spec in enumerate(specs):
            role = "image" if len(specs) == 1 else f"image {i + 1}"
            resolved.append(
                await resolve_input(
                    spec,
                    store=self.store,
                    allowed_roots=roots,
                    allow_private_urls=self.settings.allow_private_urls,
                    role=role,
                )
            )
        resolved_mask = None
        if mask:
            resolved_mask = await resolve_input(
                mask,
                store=self.store,
                allowed_roots=roots,
                allow_private_urls=self.settings.allow_private_urls,
                role="mask",
            )
        return resolved, resolved_mask

    # --- models --------------------------------------------------------------------------------

    async def list_models(
        self, *, capability: str | None = None, endpoint: str | None = None, refresh: bool = False
    ) -> tuple[list[ModelInfo], list[str]]:
        await self._needs_gateway()
        if capability is not None and capability not in CAPABILITIES:
            raise InvalidRequestError(f"unknown capability {capability!r}; use one of {', '.join(CAPABILITIES)}")
        return await self._catalog.list_models(capability=capability, endpoint=endpoint, refresh=refresh)  # type: ignore[arg-type]

    # --- jobs ----------------------------------------------------------------------------------

    def submit(self, request: ImageRequest, *, progress: ProgressFn | None = None) -> Job:
        if self._tasks is None:
            raise RuntimeError("ImageService must be entered (async with) before submitting work")
        job = Job(id=f"job_{secrets.token_urlsafe(12)}", request=request, progress=progress)
        self._remember(job)
        self._tasks.start_soon(self._run_job, job, name=f"imagegen {job.id}")
        self._idle_trim.job_started()
        return job

    async def generate(self, request: ImageRequest, *, progress: ProgressFn | None = None) -> GenerationResult:
        """Submit and wait; cancelling the caller cancels the job (images received are kept)."""
        job = self.submit(request, progress=progress)
        try:
            result = await job.wait(None)
        except anyio.get_cancelled_exc_class():
            job.cancel()
            raise
        assert result is not None
        return result

    def job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise InputNotFoundError(
                f"no job with id {job_id!r} (jobs are kept while this server runs); "
                "finished images stay readable as imagegen:// resources"
            )
        return job

    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        finished = [j for j in self._jobs.values() if j.status != "running"]
        for old in finished[: max(0, len(finished) - KEEP_FINISHED_JOBS)]:
            del self._jobs[old.id]

    async def _run_job(self, job: Job) -> None:
        with anyio.CancelScope() as scope:
            job._scope = scope
            try:
                job.result = await self._execute(job)
                job.status = "done"
            except ImageGenError as exc:
                job.error, job.status = exc, "failed"
            except Exception as exc:  # a bug must still end the job with an answer
                log.exception("job %s failed unexpectedly", job.id)
                job.error = ImageGenError(f"internal error: {type(exc).__name__}; see the server log")
                job.status = "failed"
        if scope.cancelled_caught:
            job.status = "cancelled"
            job.error = InvalidRequestError(
                f"cancelled; {len(job.saved)} image(s) received before the cancel were saved"
            )
            if job.saved and job.route is not None:
                job.result = self._result(job, job.route)
        job.progress = None
        # A finished job is kept for get_image; its input images (possibly megabytes) are not
        # needed any more.
        job.request.images = []
        job.request.mask = None
        job._done.set()
        settle_heap()  # once per process, after the first job has loaded the lazy modules
        if self._tasks is not None:
            self._idle_trim.job_finished(self._tasks)

    # --- one generation ------------------------------------------------------------------------

    async def _execute(self, job: Job) -> GenerationResult:
        request = job.request
        await self._needs_gateway()
        routes = await self._catalog.routes(
            model=request.model,
            endpoint=request.endpoint,
            operation=request.operation,
            has_mask=request.mask is not None,
            n_images=len(request.images),
        )
        failures: list[str] = []
        for i, route in enumerate(routes):
            try:
                result = await self._on_route(job, route)
            except ImageGenError as exc:
                can_move = self.settings.failover and exc.retryable and not job.saved and i + 1 < len(routes)
                if not can_move:
                    raise
                failures.append(f"endpoint {route.endpoint.name!r} failed ({exc.message})")
                job.warnings.append(
                    f"endpoint {route.endpoint.name!r} failed ({exc.kind}: {exc.message}); "
                    f"moved to endpoint {routes[i + 1].endpoint.name!r}"
                )
                continue
            return result
        raise AssertionError("unreachable: the last route either returns or raises")

    async def _on_route(self, job: Job, route: Route) -> GenerationResult:
        missing = missing_key_error(route.endpoint, route.manifest)
        if missing is not None:
            raise missing  # before anything is prepared or sent
        request = job.request
        job.route = route
        prepared = checks.prepare(
            request,
            route.manifest,
            route.model,
            endpoint=route.endpoint.name,
            endpoint_models=self._catalog.specs(route.endpoint),
        )
        job.warnings.extend(prepared.warnings)
        total = sum(prepared.batches)
        await job._report(0, total, f"sending to {route.endpoint.name} ({route.model.id})")

        wire_inputs: tuple[list[InputImage], bytes | None, list[Any]] = ([], None, [])
        if route.manifest.transport == "http":
            inputs, mask = await self._inputs_for(job, route, prepared)
            wire_inputs = (inputs, mask, await self._lineage(route, request))

        failures: list[ImageGenError] = []

        async def run_batch(first_index: int, batch_n: int) -> None:
            try:
                if route.manifest.transport == "builtin":
                    await self._offline_batch(job, route, prepared, first_index, batch_n, total)
                else:
                    await self._gateway_batch(job, route, prepared, batch_n, total, *wire_inputs)
            except ImageGenError as exc:
                failures.append(exc)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            offset = 0
            for batch_n in prepared.batches:
                tg.start_soon(run_batch, offset, batch_n)
                offset += batch_n
        if failures and not job.saved:
            raise failures[0]
        for exc in failures:
            job.warnings.append(f"part of the request failed: {exc.agent_text()}")
        log.info(
            "generated %d image(s) on %s/%s in %.2fs",
            len(job.saved),
            route.endpoint.name,
            route.model.id,
            time.monotonic() - started,
        )
        return self._result(job, route)

    def _result(self, job: Job, route: Route) -> GenerationResult:
        return GenerationResult(
            images=list(job.saved),
            model=route.model.id,
            endpoint=route.endpoint.name,
            provider=route.endpoint.provider,
            warnings=list(dict.fromkeys(job.warnings)),
            usage=job.usage,
            cost=job.cost,
            balance=job.balance,
            elapsed_s=round(time.monotonic() - job.started, 3),
            job_id=job.id,
        )

    async def _gateway_batch(
        self,
        job: Job,
        route: Route,
        prepared: Any,
        batch_n: int,
        total: int,
        inputs: list[InputImage],
        mask: bytes | None,
        lineage: list[Any],
    ) -> None:
        from .dialects import encode

        request = job.request
        gateway = await self._gateway_client()
        wire = encode(route.manifest, prepared, request, batch_n, images=inputs, mask=mask, lineage=lineage)

        def on_retry(reason: str) -> None:
            job.warnings.append(f"retried endpoint {route.endpoint.name!r}: {reason}")

        answer = await gateway.send(route.endpoint, route.manifest, wire, on_retry=on_retry)
        # Paid for from here on: finish saving even if the caller cancels.
        with anyio.CancelScope(shield=True):
            _accumulate(job, answer)
            for item in answer.images:
                payload = await self._image_payload(gateway, item, route)
                await self._save(job, route, payload, item.revised_prompt, total)

    async def _offline_batch(
        self, job: Job, route: Route, prepared: Any, first_index: int, batch_n: int, total: int
    ) -> None:
        from . import offline

        request = job.request
        width, height = _dimensions(prepared.size, route.model.default_size)
        seed = request.knobs.get("seed")
        fmt = request.knobs.get("output_format", "png")
        mask = request.mask.data if request.mask else None
        sources = [img.data for img in request.images]
        for index in range(first_index, first_index + batch_n):
            if request.operation == "edit":
                data = await in_worker(
                    lambda i=index: offline.edit(
                        sources,
                        request.prompt,
                        mask=mask,
                        # An edit keeps the input's size unless the caller asked for one.
                        width=width if request.size else None,
                        height=height if request.size else None,
                        seed=seed,
                        index=i,
                        strength=request.knobs.get("strength"),
                        output_format=fmt,
                    )
                )
            else:
                data = await in_worker(
                    lambda i=index: offline.render(request.prompt, width, height, seed=seed, index=i, output_format=fmt)
                )
            with anyio.CancelScope(shield=True):
                await self._save(job, route, data, None, total)

    async def _inputs_for(self, job: Job, route: Route, prepared: Any) -> tuple[list[InputImage], bytes | None]:
        from . import images

        request = job.request
        if request.operation != "edit":
            return [], None
        fitted, notes = await in_worker(lambda: checks.fit_inputs(request.images, route.manifest, route.model))
        job.warnings.extend(notes)
        mask_bytes = None
        if request.mask is not None:
            first = fitted[0]
            mask_source = request.mask.data
            if route.model.edit_square:
                # The image was centre-cropped to a square; crop the mask the same way so the
                # area to change stays where the caller painted it.
                mask_source = await in_worker(
                    lambda: images.fit_image(mask_source, images.MAX_INPUT_BYTES, ["image/png"], square=True)[0]
                )
            mask_bytes = await in_worker(
                lambda: images.convert_mask(
                    mask_source, width=first.width, height=first.height, semantics=prepared.mask_semantics
                )
            )
        return fitted, mask_bytes

    async def _lineage(self, route: Route, request: ImageRequest) -> list[Any]:
        """Earlier turns for an image this server made, for gateways that take conversations."""
        ops = route.manifest.operations.get("edit")
        if request.operation != "edit" or ops is None or ops.inputs is None:
            return []
        if ops.inputs.encoding != "gemini_contents" or not request.images or not request.images[0].image_id:
            return []
        from .dialects import Turn

        records = await on_disk(
            lambda: self.store.lineage(request.images[0].image_id, ops.inputs.max_lineage_turns)  # type: ignore[union-attr,arg-type]
        )
        turns: list[Turn] = []
        # Oldest first: each image this server made answered the prompt that produced it.
        for record in reversed(records):
            data, mime = await on_disk(lambda r=record: self.store.read_bytes(r.id))
            turns.append(Turn(role="user", text=record.prompt, images=[]))
            turns.append(Turn(role="model", text="Generated 1 image", images=[(data, mime)]))
        return turns[-2 * ops.inputs.max_lineage_turns :]

    async def _image_payload(self, gateway: Any, item: WireImage, route: Route) -> bytes | str:
        """The image's bytes, or its base64 text (decoded later, in a worker thread)."""
        if item.b64:
            return item.b64
        if item.url:
            return await gateway.fetch_image(item.url, max_bytes=MAX_RESULT_IMAGE_BYTES)
        raise BadGatewayResponseError(
            "the gateway returned an image entry with neither data nor URL", endpoint=route.endpoint.name
        )

    @staticmethod
    def _examine(payload: bytes | str, source: str) -> tuple[bytes, str, int, int]:
        """Decode and check one received image (CPU work: run in a worker)."""
        from . import images  # Pillow loads with the first image, not at start-up

        if isinstance(payload, str):
            try:
                data = b64.decode(payload)
            except ValueError as exc:
                raise BadGatewayResponseError(f"the gateway returned invalid base64 image data ({exc})") from None
        else:
            data = payload
        try:
            # Gateway outputs get the cheap checks (PNG CRCs, a JPEG walk at 1/8 scale): the full
            # decode happens once, in the preview.
            mime, width, height = images.sniff(data, source=source, verify=False)
        except InvalidRequestError as exc:
            raise BadGatewayResponseError(
                f"the gateway returned something that is not a usable image: {exc.message}"
            ) from None
        return data, mime, width, height

    def _as_is_preview(self, data: bytes, n: int) -> tuple[bytes, str] | None:
        from . import images

        return images.as_is_preview(data, self.settings.preview_max_px, preview_bytes_for(n))

    def _preview(self, data: bytes, n: int) -> tuple[bytes, str] | None:
        from . import images

        try:
            return images.make_preview(data, max_px=self.settings.preview_max_px, max_bytes=preview_bytes_for(n))
        except Exception:  # a preview is a convenience; results.py tries again from the file
            log.debug("preview failed", exc_info=True)
            return None

    def take_preview(self, image_id: str) -> tuple[bytes, str] | None:
        """The preview made when the image arrived, handed over once: (bytes, mime type).

        Results take it as they are built; later views of the image make a new one from the
        file, so memory holds previews only between an image's arrival and its result.
        """
        return self._previews.pop(image_id, None)

    async def _save(self, job: Job, route: Route, payload: bytes | str, revised_prompt: str | None, total: int) -> None:
        request = job.request
        source = f"the image from endpoint {route.endpoint.name!r}"
        try:
            data, mime, width, height = await in_worker_unless_small(
                lambda: self._examine(payload, source), len(payload)
            )
        except BadGatewayResponseError as exc:
            exc.endpoint = route.endpoint.name
            raise
        parameters: dict[str, Any] = {"n": request.n, "size": request.size, **request.knobs}
        if request.extra:
            parameters["extra"] = request.extra

        def save() -> ImageRecord:
            return self.store.save(
                data,
                mime_type=mime,
                width=width,
                height=height,
                prompt=request.prompt,
                operation=request.operation,
                model=route.model.id,
                endpoint=route.endpoint.name,
                provider=route.endpoint.provider,
                parameters={k: v for k, v in parameters.items() if v is not None},
                parent_ids=[img.image_id for img in request.images if img.image_id],
                revised_prompt=revised_prompt or None,
                job_id=job.id,
            )

        # A small file is its own preview (no thread needed); otherwise the preview's decode and
        # encode (CPU) overlap the fsync'd write (disk).
        preview_made = self._as_is_preview(data, request.n) if self._make_previews else None
        if preview_made is not None or not self._make_previews:
            record = await on_disk(save)
        else:

            async def make_preview() -> None:
                nonlocal preview_made
                preview_made = await in_worker(lambda: self._preview(data, request.n))

            async with anyio.create_task_group() as tg:
                tg.start_soon(make_preview)
                record = await on_disk(save)
        if preview_made is not None:
            self._previews[record.id] = preview_made
            while len(self._previews) > KEEP_PREVIEWS:
                self._previews.popitem(last=False)
        job.saved.append(SavedImage.model_validate(record.model_dump()))
        await job._report(len(job.saved), total, f"saved image {len(job.saved)} of {total}: {record.path}")


def _is_http(provider: str) -> bool:
    from .manifests import load_manifest

    return load_manifest(provider).transport == "http"


def _dimensions(size: str | None, default: str | None) -> tuple[int, int]:
    chosen = size if size and size != "auto" else (default or "1024x1024")
    w, _, h = chosen.partition("x")
    return int(w), int(h)


def _accumulate(job: Job, answer: WireResult) -> None:
    """Add one gateway answer's usage and cost to the job's; the latest balance wins."""
    if answer.usage:
        usage = job.usage or {}
        for key, value in answer.usage.items():
            if isinstance(value, (int, float)) and isinstance(usage.get(key, 0), (int, float)):
                usage[key] = usage.get(key, 0) + value
            else:
                usage.setdefault(key, value)
        job.usage = usage
    if answer.cost is not None:
        job.cost = (job.cost or 0.0) + answer.cost
    if answer.balance is not None:
        job.balance = answer.balance
