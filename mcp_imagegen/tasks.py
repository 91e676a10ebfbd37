"""Long generations as tasks: the `io.modelcontextprotocol/tasks` extension (SEP-2663, 2026-07-28).

When a `generate_image` / `edit_image` request declares the extension, the call waits only
`TASK_AFTER_S` for its job; a job still running then is answered with a `CreateTaskResult`
(`resultType: "task"`) whose task id is the job id. Requests that do not declare it are untouched.

A task has no state of its own: it is its job (jobs.py). The job's record is flushed to disk
before the task id is returned, `tasks/get` reads the job as `get_image(job_id)` does (from this
process's memory, or from its record after a restart or from another process), and `tasks/cancel`
is the job's cancel: requests not yet sent are dropped, sent ones are awaited and their images
saved. A job becomes a task like this:

- running: `working`, with how many images are saved so far;
- done, or failed with a gateway/tool error: `completed` with the tool's own result (the spec
  keeps `failed` for JSON-RPC errors; a tool error is a result with `isError`);
- cancelled: `cancelled`, the message naming the images received before the cancel;
- interrupted (the process ended while the job waited on the gateway): `failed` with an internal
  error naming the images it saved; the tool call itself never produced a result.

The wire shapes follow the extension's spec, so the SDK's own implementation can replace this
module when it ships.
"""

from __future__ import annotations

import functools
import logging
from contextvars import ContextVar
from typing import Any, Protocol

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver.server import require_client_extension
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, CallToolRequestParams, CallToolResult, RequestParams
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field

from . import results
from .errors import InputNotFoundError
from .jobs import Job, JobRecord
from .owners import current_owner
from .work import on_disk

log = logging.getLogger("mcp_imagegen.tasks")

EXTENSION_ID = "io.modelcontextprotocol/tasks"
TASK_TOOLS = frozenset({"generate_image", "edit_image"})
TASK_AFTER_S = 2.0  # a job not done by then becomes a task (a fast one answers as usual)
POLL_INTERVAL_MS = 2000
# A task lives as long as its job's record, which the server never deletes: no time limit.
TTL_MS: int | None = None
_TOOL_OF = {"generate": "generate_image", "edit": "edit_image"}

# Set while a tools/call that may be answered with a task runs: the tool then waits less.
_may_answer_with_task: ContextVar[bool] = ContextVar("may_answer_with_task", default=False)


def answer_within(deadline_s: float) -> float:
    """How long generate/edit wait for their job before answering (shorter when a task may answer)."""
    return min(deadline_s, TASK_AFTER_S) if _may_answer_with_task.get() else deadline_s


class _Holder(Protocol):
    settings: Any

    def get(self) -> Any: ...


class TaskIdParams(RequestParams):
    task_id: str = Field(description="The task's id, as the CreateTaskResult gave it.")


class UpdateParams(TaskIdParams):
    input_responses: dict[str, Any] = Field(default_factory=dict)


def _declared(ctx: ServerRequestContext[Any, Any]) -> bool:
    capabilities = ctx.session.client_capabilities
    return bool(capabilities and capabilities.extensions and EXTENSION_ID in capabilities.extensions)


def _running_job_id(result: HandlerResult) -> str | None:
    structured = result.structured_content if isinstance(result, CallToolResult) else None
    if structured and structured.get("status") == "running" and structured.get("job_id"):
        return str(structured["job_id"])
    return None


def _dump(result: CallToolResult) -> dict[str, Any]:
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


def _unknown(task_id: str) -> MCPError:
    return MCPError(
        code=INVALID_PARAMS,
        message=f"Failed to retrieve task: Task not found (no job {task_id!r} in this server's output folder)",
    )


def _tool(job: Job) -> str:
    return _TOOL_OF.get(job.request.operation, job.request.operation)


def _saved_images(job: Job) -> str:
    return ", ".join(f"{image.uri} ({image.path})" for image in job.saved)


def _same_state(a: JobRecord, b: JobRecord) -> bool:
    return a.model_dump(exclude={"updated_at"}) == b.model_dump(exclude={"updated_at"})


async def _make_durable(svc: Any, job: Job) -> JobRecord:
    """Write the job's record and flush it to disk. The job writes its own record meanwhile (after
    each image, and when it ends); if it moved on while ours was written, ours may have landed on
    top of a newer one, so it is written again until what is on disk is the job as it is now."""
    while True:
        record = job.to_record()
        await on_disk(functools.partial(svc.store.jobs.write_durable, record))
        if _same_state(record, job.to_record()):
            return record


async def _find(svc: Any, task_id: str) -> tuple[Job, JobRecord | None]:
    """The task's job (this process's, or rebuilt from its record) and its record, if on disk."""
    record = await on_disk(lambda: svc.store.jobs.read(task_id))
    try:
        return svc.job(task_id), record
    except InputNotFoundError:
        pass
    if record is None:
        raise _unknown(task_id)
    try:
        return await svc.find_job(task_id), record
    except InputNotFoundError:  # someone else's job: answered as no task at all
        raise _unknown(task_id) from None


class TasksExtension(Extension):
    """Answers long generate/edit calls with tasks, and serves tasks/get, tasks/update, tasks/cancel."""

    identifier = EXTENSION_ID

    def __init__(self, holder: _Holder) -> None:
        self._holder = holder

    def methods(self) -> list[MethodBinding]:
        versions = frozenset(MODERN_PROTOCOL_VERSIONS)
        return [
            MethodBinding("tasks/get", TaskIdParams, self._get, versions),
            MethodBinding("tasks/update", UpdateParams, self._update, versions),
            MethodBinding("tasks/cancel", TaskIdParams, self._cancel, versions),
        ]

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if params.name not in TASK_TOOLS or ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS or not _declared(ctx):
            return await call_next(ctx)
        token = _may_answer_with_task.set(True)
        try:
            result = await call_next(ctx)
        finally:
            _may_answer_with_task.reset(token)
        job_id = _running_job_id(result)
        if job_id is None:
            return result  # done (or failed) in time: the ordinary result
        svc = self._holder.get()
        try:
            job = svc.job(job_id)
            # Durable before the id leaves the server (the spec's requirement).
            record = await _make_durable(svc, job)
        except (InputNotFoundError, OSError) as exc:
            # No task without a durable record; the plain "running" result still leads to the
            # images through get_image(job_id).
            log.warning("job %s answered without a task: its record could not be written (%s)", job_id, exc)
            return result
        return {
            "resultType": "task",
            "taskId": job.id,
            "status": "working",  # the seed state; tasks/get says what happened since
            "statusMessage": (
                f"{params.name} is running ({len(job.saved)} of {job.request.n} image(s) saved); "
                f"poll tasks/get, or call get_image(job_id={job.id!r})"
            ),
            "createdAt": record.created_at,
            "lastUpdatedAt": record.updated_at,
            "ttlMs": TTL_MS,
            "pollIntervalMs": POLL_INTERVAL_MS,
        }

    # --- methods -----------------------------------------------------------------------------

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        require_client_extension(ctx, EXTENSION_ID)
        svc = self._holder.get()
        job, record = await _find(svc, params.task_id)
        return {"resultType": "complete", **await self._detailed(svc, job, record)}

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: UpdateParams) -> dict[str, Any]:
        # Image tasks never ask for input; responses to keys never issued are ignored (the spec's rule).
        require_client_extension(ctx, EXTENSION_ID)
        await _find(self._holder.get(), params.task_id)
        return {"resultType": "complete"}

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        require_client_extension(ctx, EXTENSION_ID)
        svc = self._holder.get()
        try:
            job = svc.job(params.task_id)
        except InputNotFoundError:
            # Not a job of this process: one that ended before (nothing left to stop), or unknown.
            record = await on_disk(lambda: svc.store.jobs.read(params.task_id))
            if record is None or record.owner != current_owner():
                raise _unknown(params.task_id) from None
            return {"resultType": "complete"}
        job.cancel()  # unsent requests are dropped; sent ones are awaited and their images saved
        return {"resultType": "complete"}

    # --- a job as a task -------------------------------------------------------------------------

    async def _detailed(self, svc: Any, job: Job, record: JobRecord | None) -> dict[str, Any]:
        """The DetailedTask for a job: its status and, once it ended, its result or error."""
        fields: dict[str, Any] = {
            "taskId": job.id,
            "createdAt": job.created_at,
            # The record is rewritten whenever the job changes: at its start, per image, at its end.
            "lastUpdatedAt": record.updated_at if record is not None else job.created_at,
            "ttlMs": TTL_MS,
            "pollIntervalMs": POLL_INTERVAL_MS,
        }
        if job.status == "running":
            note = f"{len(job.saved)} of {job.request.n} image(s) saved"
            if job.stop_reason == "cancelled":
                note += "; cancel requested: nothing more is sent, requests already sent are awaited and saved"
            return {**fields, "status": "working", "statusMessage": note}
        if job.status == "cancelled":
            why = job.error.message if job.error is not None else "the call was cancelled"
            saved = f": {_saved_images(job)}" if job.saved else ""
            return {**fields, "status": "cancelled", "statusMessage": f"{why}{saved}"}
        if job.status == "interrupted":
            message = _interrupted_text(job)
            error = {
                "code": INTERNAL_ERROR,
                "message": message,
                "data": {"jobId": job.id, "images": [{"uri": i.uri, "path": i.path} for i in job.saved]},
            }
            return {**fields, "status": "failed", "statusMessage": message, "error": error}
        result = await self._tool_result(svc, job)
        note = "the tool call ended with an error" if result.is_error else f"{len(job.saved)} image(s) saved"
        return {**fields, "status": "completed", "statusMessage": note, "result": _dump(result)}

    async def _tool_result(self, svc: Any, job: Job) -> CallToolResult:
        """What the tool call would have answered had it waited: get_image(job_id)'s result."""
        if job.status != "done" or job.result is None:
            text = job.error.agent_text() if job.error is not None else f"job {job.id} ended without images"
            return results.error_result(text)
        settings = self._holder.settings
        return await results.from_generation(
            job.result,
            read_bytes=lambda image_id: svc.store.read_bytes(image_id),
            cached=svc.take_preview,
            verb="Edited into" if job.request.operation == "edit" else "Generated",
            preview_max_px=settings.preview_max_px,
            inline_full=settings.inline_full_image,
        )


def _interrupted_text(job: Job) -> str:
    tool = _tool(job)
    why = job.error.message.removeprefix("interrupted: ") if job.error is not None else "the server stopped"
    text = f"{tool} job {job.id} was interrupted: {why}."
    if job.saved:
        collect = f"get_image(job_id={job.id!r}) returns them"
        return f"{text} Saved: {_saved_images(job)} ({collect}); call {tool} again for the rest."
    return f"{text} No image was saved; call {tool} again."
