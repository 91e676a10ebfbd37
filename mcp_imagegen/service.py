"""The engine: one generate or edit, from canonical request to saved images.

Every generation runs as a `Job` (jobs.py) in the service's own task group, not in the caller's
task, so it survives a caller that times out or disconnects: an image that was paid for is always
saved. An explicit cancel drops only the gateway requests not yet sent; a request already sent is
awaited (bounded by its own timeout) and its images are saved under a shield. Before anything is
sent, the output folder must be writable and have room (`ImageStore.check_room`).

Shutting down (`drain`): no new jobs, requests not yet sent are dropped, sent ones are awaited and
saved, and what was kept is logged. A job still running when the process dies is found by its
record ("interrupted") after a restart.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from . import b64, checks
from .catalog import ModelCatalog, Route, missing_key_error
from .config import Settings, user_state_dir
from .errors import (
    BadGatewayResponseError,
    ConfigError,
    ImageGenError,
    InputNotFoundError,
    InvalidRequestError,
    ModelNotFoundError,
)
from .heap import IdleTrim, settle_heap
from .jobs import Job, JobRecord, JobRecorder, ProgressFn, Stopped
from .learning import STATE_FILE, LearnedFacts
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
from .owners import acting_as, current_owner
from .spending import Spending
from .storage import job_alive, keeping_alive, open_storage
from .store import NewImage
from .svg import SVG_MIME
from .work import SharedOnDisk, in_worker, in_worker_unless_small, on_disk, watch_event_loop

if TYPE_CHECKING:
    from .images import Output  # Pillow loads with the first image, not at start-up

log = logging.getLogger("mcp_imagegen.service")

MAX_RESULT_IMAGE_BYTES = 128 * 1024 * 1024  # one downloaded image; anything larger is not an image
KEEP_FINISHED_JOBS = 128
KEEP_PREVIEWS = 64  # previews not yet taken by a result (tens of KB each)
SHUTDOWN_GRACE_S = 30.0
UNKNOWN_IMAGE_BYTES = 16 * 1024 * 1024  # room to want per image when its size is not known yet


@dataclass
class DrainReport:
    """What a shutdown kept: for the log, and for tests."""

    jobs: int = 0
    images_saved: int = 0
    not_sent: int = 0
    interrupted: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{self.jobs} job(s) in flight at shutdown: {self.images_saved} image(s) saved"
        if self.not_sent:
            text += f", {self.not_sent} image(s) not requested (never sent, not paid)"
        if self.interrupted:
            text += f"; {len(self.interrupted)} job(s) still waiting on the gateway were abandoned: {', '.join(self.interrupted)}"
        return text


class ImageService:
    """The engine. `previews=True` (the MCP server) makes each image's inline preview while its
    bytes are still in memory; the command line has no use for previews."""

    def __init__(self, settings: Settings, *, previews: bool = True) -> None:
        self.settings = settings
        self._make_previews = previews
        self._previews: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self.store, spend_book = open_storage(settings)  # a folder, or a bucket and Redis (storage.py)
        self.spending = Spending(settings.spending, spend_book)
        self._stack = AsyncExitStack()
        self._gateway: Any = None  # GatewayClient, imported lazily: start-up does not need httpx
        # What gateways taught about their models, kept beside the image records across restarts.
        # (A bucket store has no folder: each replica then keeps its own lessons on its own disk.)
        meta_dir = getattr(self.store, "meta_dir", None)
        self._learned = LearnedFacts((meta_dir / "state" if meta_dir else user_state_dir()) / STATE_FILE)
        self._catalog = ModelCatalog(settings, None, self._learned)
        self._tasks: TaskGroup | None = None
        self._jobs: dict[str, Job] = {}
        self._records = JobRecorder(self.store.jobs)
        self._free_bytes = SharedOnDisk(self.store.free_bytes)  # calls arriving together share a probe
        self._idle_trim = IdleTrim()
        self._draining = False
        self._in_flight_at_stop: list[Job] = []
        self._answering = 0

    async def __aenter__(self) -> ImageService:
        self._tasks = await self._stack.enter_async_context(anyio.create_task_group())
        self._records.start(self._tasks)
        self.spending.start(self._tasks)
        # Hold the store and put right what a crash left, before the first job can write.
        await on_disk(self.store.open_live)
        self._stack.callback(self.store.close_live)
        if logging.getLogger("mcp_imagegen.loop").isEnabledFor(logging.DEBUG):
            self._tasks.start_soon(watch_event_loop, name="event-loop watchdog")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Running jobs get a grace period to finish and save what they were paid for; the
        # caller's own exception, if any, propagates unchanged (not wrapped by the task group).
        await self.drain(SHUTDOWN_GRACE_S)
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()
        self._tasks = None
        await self._stack.aclose()

    @property
    def draining(self) -> bool:
        return self._draining

    @contextmanager
    def answering(self) -> Iterator[None]:
        """Around a tool call that waits on a job: a drain lets these answer before it ends."""
        self._answering += 1
        try:
            yield
        finally:
            self._answering -= 1

    async def calls_answered(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) until no tool call is still building or sending its answer."""
        with anyio.move_on_after(timeout):
            while self._answering:
                await anyio.sleep(0.02)
        return not self._answering

    def begin_drain(self) -> None:
        """Refuse new jobs from now on (synchronous: safe in a signal handler); the jobs running
        now are the ones the drain reports on, even those that finish before it starts."""
        if not self._draining:
            self._draining = True
            self._in_flight_at_stop = self.running_jobs()

    def running_jobs(self) -> list[Job]:
        return [job for job in self._jobs.values() if job.status == "running"]

    async def drain(self, grace_s: float | None) -> DrainReport:
        """Stop taking jobs, drop requests not yet sent, await sent ones (at most `grace_s`, or
        until each ends by its own timeout when None), save, and say what was kept."""
        self.begin_drain()
        running = list(dict.fromkeys([*self._in_flight_at_stop, *self.running_jobs()]))
        report = DrainReport(jobs=len(running))
        if not running:
            return report
        for job in running:
            job.stop_unsent("shutdown")
        with anyio.CancelScope(shield=True), anyio.move_on_after(grace_s):
            for job in running:
                await job._done.wait()
        report.images_saved = sum(len(job.saved) for job in running)
        report.not_sent = sum(job.not_sent for job in running)
        with anyio.CancelScope(shield=True):
            await self._records.idle()  # no older state of a job lands after "interrupted"
        for job in running:
            if job.status == "running":
                report.interrupted.append(job.id)
                self._persist_now(job, status="interrupted")
        log.warning("shutdown: %s", report.describe())
        return report

    def abandon(self) -> list[str]:
        """Exit at once (a second signal): record every running job as interrupted, synchronously."""
        ids = []
        for job in self.running_jobs():
            self._persist_now(job, status="interrupted")
            ids.append(job.id)
        return ids

    def _persist_now(self, job: Job, *, status: str) -> None:
        record = job.to_record().model_copy(update={"status": status})
        if status == "interrupted":
            record.error = (
                f"the server stopped while this job waited on the gateway; {len(job.saved)} image(s) "
                "received before that were saved"
            )
        self._records.drop(job)
        try:
            self.store.jobs.write(record)
        except OSError:
            log.warning("could not record job %s as %s", job.id, status, exc_info=True)

    async def recorded(self, job: Job) -> None:
        """Wait until the job's record is on disk: before its id is handed to a client."""
        await self._records.durable(job)

    async def _gateway_client(self) -> Any:
        if self._gateway is None:
            from .gateway import GatewayClient

            gateway = GatewayClient(max_retries=self.settings.max_retries)
            self._gateway = await self._stack.enter_async_context(gateway)
            self._catalog = ModelCatalog(self.settings, self._gateway, self._learned)
        return self._gateway

    async def _needs_gateway(self) -> None:
        if any(_is_http(ep.provider) for ep in self.settings.endpoints):
            await self._gateway_client()
            if not self._learned.loaded:  # read off the event loop, before any model is resolved
                await on_disk(self._learned.load)

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
        if self._draining:
            raise ImageGenError(
                "the server is shutting down and takes no new calls; nothing was sent to the gateway. "
                "Call again once the server has restarted."
            )
        job = Job(id=Job.new_id(), request=request, progress=progress)
        self._remember(job)
        self._tasks.start_soon(self._run_job, job, name=f"imagegen {job.id}")
        self._idle_trim.job_started()
        return job

    async def generate(self, request: ImageRequest, *, progress: ProgressFn | None = None) -> GenerationResult:
        """Submit and wait; cancelling the caller (the person's Ctrl-C) drops requests not yet
        sent, and the service's exit awaits the sent ones."""
        job = self.submit(request, progress=progress)
        try:
            result = await job.wait(None)
        except anyio.get_cancelled_exc_class():
            job.cancel()
            raise
        assert result is not None
        return result

    def job(self, job_id: str) -> Job:
        """A job of this process (running or recently finished)."""
        job = self._jobs.get(job_id)
        if job is None or job.owner != current_owner():
            raise self._no_job(job_id)
        return job

    async def find_job(self, job_id: str) -> Job:
        """A job of this process, or one from its record on disk (another process, or before a
        restart): finished, or known to be interrupted, or still running elsewhere."""
        job = self._jobs.get(job_id)
        if job is not None:
            if job.owner != current_owner():  # another person's job is answered as no job at all
                raise self._no_job(job_id)
            return job
        record = await on_disk(lambda: self.store.jobs.read(job_id))
        if record is None or record.owner != current_owner():
            raise self._no_job(job_id)
        return await on_disk(lambda: self._job_from_record(record))

    @staticmethod
    def _no_job(job_id: str) -> InputNotFoundError:
        return InputNotFoundError(
            f"no job with id {job_id!r}; job ids come from results with status 'running'. "
            "Saved images stay readable as imagegen:// resources (resources/list)"
        )

    def _job_from_record(self, record: JobRecord) -> Job:
        """A finished Job rebuilt from its record (blocking: reads image records)."""
        from .models import ImageRequest as Request

        request = Request(operation=record.operation, prompt=record.prompt, n=record.n)  # type: ignore[arg-type]
        job = Job(id=record.id, request=request, warnings=list(record.warnings), owner=record.owner)
        job.usage, job.cost, job.balance, job.created_at = record.usage, record.cost, record.balance, record.created_at
        for image_id in record.image_ids:
            try:
                job.saved.append(SavedImage.model_validate(self.store.get(image_id).model_dump()))
            except ImageGenError:
                job.warnings.append(f"image {image_id} of this job was deleted or moved since")
        status = record.status
        if status == "running" and not job_alive(self.store.jobs, record):
            status = "interrupted"
        if status == "running":
            # Still running in another server process (e.g. one finishing its work after its host
            # quit): no handle to wait on here; its record is rewritten when it ends.
            job.status = "running"
            return job
        job.status = status
        result = GenerationResult(
            images=list(job.saved),
            model=record.model or "unknown",
            endpoint=record.endpoint or "unknown",
            provider=record.provider or "unknown",
            warnings=list(job.warnings),
            usage=record.usage,
            cost=record.cost,
            balance=record.balance,
            job_id=record.id,
        )
        if status == "done":
            job.result = result
        else:
            why = record.error or (
                f"the server stopped while this job was running; {len(job.saved)} image(s) received before "
                "that were saved"
            )
            if status == "interrupted" and "interrupted" not in why:
                why = f"interrupted: {why}"
            job.error = ImageGenError(why)
            job.result = result if job.saved else None
        job._done.set()
        return job

    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        finished = [j for j in self._jobs.values() if j.status != "running"]
        for old in finished[: max(0, len(finished) - KEEP_FINISHED_JOBS)]:
            del self._jobs[old.id]

    async def _run_job(self, job: Job) -> None:
        with acting_as(job.owner):  # its inputs and lineage are read, and its images saved, as its owner's
            async with keeping_alive(self.store.jobs, job.id):  # other replicas see it is alive
                await self._run_job_as_owner(job)

    async def _run_job_as_owner(self, job: Job) -> None:
        # No record yet: nobody outside knows the id until `recorded` writes it, and an image
        # saved meanwhile notes the job (so its images are found after a crash).
        try:
            job.result = await self._execute(job)
            job.status = "done"
        except Stopped as exc:
            job.error, job.status = exc, "cancelled" if job.stop_reason == "cancelled" else "interrupted"
        except ImageGenError as exc:
            job.error, job.status = exc, "failed"
        except Exception as exc:  # a bug must still end the job with an answer
            log.exception("job %s failed unexpectedly", job.id)
            job.error = ImageGenError(f"internal error: {type(exc).__name__}; see the server log")
            job.status = "failed"
        if job.status == "done" and job.not_sent:
            # Stopped part way: what was sent is saved; what was not, was never paid for.
            job.status = "cancelled" if job.stop_reason == "cancelled" else "interrupted"
            job.error = job.stopped_error()
            if job.saved and job.route is not None:
                job.result = self._result(job, job.route)
        job.progress = None
        # A finished job is kept for get_image; its input images (possibly megabytes) are not
        # needed any more.
        job.request.images = []
        job.request.mask = None
        with anyio.CancelScope(shield=True):
            self._records.note(job)
            await self._records.durable(job)
        self._records.forget(job)
        job._done.set()
        settle_heap()  # once per process, after the first job has loaded the lazy modules
        if self._tasks is not None:
            self._idle_trim.job_finished(self._tasks)

    # --- one generation ------------------------------------------------------------------------

    async def _execute(self, job: Job) -> GenerationResult:
        request = job.request
        job.check_not_stopped()
        # Before anything is sent (and paid for): a folder that cannot take the images is refused.
        need = request.n * _image_bytes_estimate(request.size)
        self.store.judge_room(await self._free_bytes(), need)
        await self._needs_gateway()
        routes = await self._catalog.routes(
            model=request.model,
            endpoint=request.endpoint,
            operation=request.operation,
            has_mask=request.mask is not None,
            n_images=len(request.images),
        )
        # Before anything is sent: the estimate must fit the day's limits (spending.py).
        first = routes[0]
        listed = await self._catalog.listed_price(first.endpoint, first.model.id) if self.spending.limited else None
        async with self.spending.hold(job, first.model.id, first.endpoint.provider, listed):
            return await self._on_routes(job, routes)

    async def _on_routes(self, job: Job, routes: list[Route]) -> GenerationResult:
        failures: list[str] = []
        for i, route in enumerate(routes):
            try:
                result = await self._on_route(job, route)
            except ImageGenError as exc:
                can_move = (
                    self.settings.failover
                    and exc.retryable
                    and not job.saved
                    and job.stop_reason is None
                    and i + 1 < len(routes)
                )
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
        try:
            return await self._send_on_route(job, route)
        except InvalidRequestError as exc:
            if exc.status is None or job.saved:  # refused here, or part of the work is already paid
                raise
            retry = await self._learn(job, route, exc)
            if retry is None:
                raise
            return await self._send_on_route(job, retry)
        except ModelNotFoundError as exc:
            if exc.status is not None:  # the gateway says the model is not there (any more)
                await self._name_what_works(job, route, exc)
            raise

    async def _learn(self, job: Job, route: Route, exc: InvalidRequestError) -> Route | None:
        """Learn from a gateway's 400; the route to try once more when the server caused it.

        A field the server added (response_format, a default size, n above what the model takes
        per request) is dropped and the call sent again; a field the caller asked for is an error
        that names it and what the model takes. Either way the lesson is kept."""
        from .learning import lesson_from

        lesson = lesson_from(exc.status, exc.gateway_message, exc.gateway_param, exc.gateway_code)
        prepared = job.prepared
        if lesson is None or prepared is None:
            return None
        request, ep, model_id = job.request, route.endpoint, route.model.id
        asked = set(prepared.knobs) | set(prepared.extra) | ({"size"} if request.size else set())
        sent = asked | prepared.added | ({"n"} if "n" not in prepared.removed else set())
        if lesson.field not in sent:
            return None
        await on_disk(lambda: self._learned.add(ep.name, model_id, lesson))
        belief = self._catalog.belief(ep, model_id)
        if lesson.field in asked:
            raise InvalidRequestError(
                f"{lesson.field} was refused by {model_id} on endpoint {ep.name!r}: {lesson.takes()}; "
                f"change or remove {lesson.field}",
                status=exc.status,
                gateway_message=exc.gateway_message,
                endpoint=ep.name,
            ) from None
        if lesson.field == "n" and (belief.spec.max_n or 1) >= max(prepared.batches):
            return None  # nothing would change
        job.warnings.append(
            f"{model_id} on endpoint {ep.name!r} refused {lesson.field}, which the server had added; "
            f"sent once more without it ({lesson.note()})"
        )
        return Route(ep, route.manifest, belief)

    async def _name_what_works(self, job: Job, route: Route, exc: ModelNotFoundError) -> None:
        """Re-read the endpoint's models (the one asked for may be gone) and name one that works."""
        ep = route.endpoint
        self._catalog.mark_gone(ep, route.model.id)
        try:
            await self._catalog.refresh(ep, force=True)
        except ImageGenError:
            pass
        request = job.request
        need = {request.operation, *(["mask"] if request.mask is not None else [])}
        if len(request.images) > 1:
            need.add("multi_image")
        instead = self._catalog.replacement_for(ep, need, route.model.id)  # type: ignore[arg-type]
        if instead:
            exc.message = f"{exc.message}. Model {instead!r} works on endpoint {ep.name!r}; ask for it instead"
            exc.args = (exc.message,)

    async def _send_on_route(self, job: Job, route: Route) -> GenerationResult:
        request = job.request
        job.route = route
        belief = route.belief
        prepared = checks.prepare(
            request,
            route.manifest,
            route.model,
            endpoint=route.endpoint.name,
            endpoint_models=self._catalog.specs(route.endpoint),
            takes={lesson.field: lesson.takes() for lesson in belief.lessons},
        )
        job.prepared = prepared
        deprecation = belief.deprecation(instead=self._catalog.successor(route.endpoint, belief))
        if deprecation:
            job.warnings.append(deprecation)
        elif belief.shut_down():  # recorded as shut down, but this gateway cannot say (no discovery)
            instead = f"; {belief.spec.replacement} replaces it" if belief.spec.replacement else ""
            job.warnings.append(
                f"{belief.id} was shut down by its provider on {belief.spec.shutdown_date}{instead}; "
                f"sent anyway because endpoint {route.endpoint.name!r} may still serve it"
            )
        if belief.notes:
            job.warnings.append(f"applied what endpoint {route.endpoint.name!r} taught: {'; '.join(belief.notes)}")
        job.warnings.extend(prepared.warnings)
        total = sum(prepared.batches)
        await job._report(0, total, f"sending to {route.endpoint.name} ({route.model.id})")

        wire_inputs: tuple[list[InputImage], bytes | None, list[Any]] = ([], None, [])
        if route.manifest.transport == "http":
            inputs, mask = await self._inputs_for(job, route, prepared)
            wire_inputs = (inputs, mask, await self._lineage(route, request))

        failures: list[ImageGenError] = []

        async def run_batch(first_index: int, batch_n: int) -> None:
            if job.stop_reason is not None:
                job.not_sent += batch_n
                return
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
        if not job.saved and job.not_sent:
            raise Stopped(job.stopped_error().message)
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

        # Until it is sent, a stop (the person's cancel, a shutdown) may drop the request; once
        # sent it is paid for, so only the gateway call's own timeout ends the wait.
        with job.unsent_scope() as unsent:
            answer = await gateway.send(
                route.endpoint, route.manifest, wire, on_retry=on_retry, on_send=lambda: job.mark_sent(unsent)
            )
        if unsent.cancelled_caught:
            job.not_sent += batch_n
            return
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
            if job.stop_reason is not None:
                job.not_sent += first_index + batch_n - index
                return
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
    def _examine(payload: bytes | str, source: str) -> tuple[bytes, Output]:
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
            output = images.inspect_output(data, source=source)
        except InvalidRequestError as exc:
            raise BadGatewayResponseError(
                f"the gateway returned something that is not a usable image: {exc.message}"
            ) from None
        return data, output

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
            data, output = await in_worker_unless_small(lambda: self._examine(payload, source), len(payload))
        except BadGatewayResponseError as exc:
            exc.endpoint = route.endpoint.name
            raise
        parameters: dict[str, Any] = {"n": request.n, "size": request.size, **request.knobs}
        if request.extra:
            parameters["extra"] = request.extra

        about = NewImage(
            mime_type=output.mime,
            width=output.width,
            height=output.height,
            frames=output.frames,
            prompt=request.prompt,
            operation=request.operation,
            model=route.model.id,
            endpoint=route.endpoint.name,
            provider=route.endpoint.provider,
            parameters={k: v for k, v in parameters.items() if v is not None},
            parent_ids=[img.image_id for img in request.images if img.image_id],
            revised_prompt=revised_prompt or None,
            job_id=job.id,
            owner=job.owner,
        )

        def save() -> ImageRecord:
            return self.store.save(data, about)

        async def save_or_keep() -> ImageRecord:
            try:
                return await on_disk(save)
            except ImageGenError as exc:  # the folder filled up or went away since the check
                raise await self._kept_elsewhere(job, route, data, output.mime, exc) from None

        # A small file is its own preview (no thread needed); otherwise the preview's decode and
        # encode (CPU) overlap the fsync'd write (disk). An SVG document gets none: it is not rendered.
        make_previews = self._make_previews and output.mime != SVG_MIME
        preview_made = self._as_is_preview(data, request.n) if make_previews else None
        if preview_made is not None or not make_previews:
            record = await save_or_keep()
        else:

            async def make_preview() -> None:
                nonlocal preview_made
                preview_made = await in_worker(lambda: self._preview(data, request.n))

            failed: ImageGenError | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(make_preview)
                try:
                    record = await save_or_keep()
                except ImageGenError as exc:  # raised after the group, not wrapped in an ExceptionGroup
                    failed = exc
            if failed is not None:
                raise failed
        if preview_made is not None:
            self._previews[record.id] = preview_made
            while len(self._previews) > KEEP_PREVIEWS:
                self._previews.popitem(last=False)
        if output.active_content:
            job.warnings.append(
                f"the SVG document saved at {record.path} contains scripts or links to other documents; "
                "the server never renders it, but open it only in a viewer you trust"
            )
        job.saved.append(SavedImage.model_validate(record.model_dump()))
        if len(job.saved) < total or self._records.ever_noted(job):
            # So a crash from here on still knows this image is the job's. The last image of a
            # job nobody outside knows of waits for the job's final record, a moment later.
            self._records.note(job)
        await job._report(len(job.saved), total, f"saved image {len(job.saved)} of {total}: {record.path}")

    async def _kept_elsewhere(
        self, job: Job, route: Route, data: bytes, mime: str, error: ImageGenError
    ) -> ImageGenError:
        """A save failed after the gateway was paid: keep the bytes where they can be recovered."""
        from .images import EXTENSIONS
        from .recovery import keep_unsaved

        name = f"{job.id}_{len(job.saved) + 1}_{secrets.token_hex(3)}.{EXTENSIONS.get(mime, 'bin')}"
        about = {
            "job_id": job.id,
            "prompt": job.request.prompt,
            "model": route.model.id,
            "endpoint": route.endpoint.name,
        }
        kept = await on_disk(lambda: keep_unsaved(data, name, about))
        where = f"Its bytes were kept at {kept}" if kept else "No other folder could take its bytes either"
        log.error("could not save an image of job %s: %s; %s", job.id, error.message, where)
        return ConfigError(f"the image was received (and paid for) but could not be saved: {error.message}. {where}.")


def _image_bytes_estimate(size: str | None) -> int:
    """An upper bound for one saved image: 4 bytes a pixel (what PNG at worst comes near)."""
    w, _, h = (size or "").partition("x")
    if w.isdigit() and h.isdigit():
        return int(w) * int(h) * 4
    return UNKNOWN_IMAGE_BYTES


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
