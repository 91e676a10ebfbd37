"""Long generations as tasks: the `io.modelcontextprotocol/tasks` extension (SEP-2663, 2026-07-28).

When a `generate_image` / `edit_image` request declares the extension, the call waits only
`TASK_AFTER_S` for its job; a job still running then is answered with a `CreateTaskResult`
(`resultType: "task"`) whose task id is the job id, so `tasks/get`, `tasks/cancel` and
`get_image(job_id=...)` all see the same job. Requests that do not declare it are untouched.

A task's record is written (fsync'd) to `<output_dir>/.mcp-imagegen/tasks/` before its id is
returned, so `tasks/get` answers for it from any connection and after a restart: a job no longer
in memory is answered from the images the store holds for it. The wire shapes follow the
extension's spec, so the SDK's own implementation can replace this module when it ships.
"""

from __future__ import annotations

import os
import re
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver.server import require_client_extension
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, CallToolRequestParams, CallToolResult, RequestParams
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import results
from .errors import ImageGenError, InputNotFoundError
from .store import META_DIR_NAME, ImageStore
from .work import on_disk

EXTENSION_ID = "io.modelcontextprotocol/tasks"
TASK_TOOLS = frozenset({"generate_image", "edit_image"})
TASK_AFTER_S = 2.0  # a job not done by then becomes a task (a fast one answers as usual)
TTL_MS = 7 * 24 * 3600 * 1000  # task records are kept this long
POLL_INTERVAL_MS = 2000
_TASK_ID_RE = re.compile(r"^job_[A-Za-z0-9_-]{8,64}$")

TaskStatus = Literal["working", "completed", "cancelled", "failed"]

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


class TaskRecord(BaseModel):
    """What is kept on disk of one task; enough to answer tasks/get after a restart."""

    model_config = ConfigDict(extra="ignore")

    task_id: str
    tool: str
    created_at: str
    last_updated_at: str
    status: TaskStatus = "working"
    status_message: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TaskRecords:
    """Task records, one small JSON file each, written atomically and durably."""

    def __init__(self, output_dir: Path) -> None:
        self.folder = Path(output_dir).expanduser() / META_DIR_NAME / "tasks"

    def _path(self, task_id: str) -> Path:
        if not _TASK_ID_RE.match(task_id):
            raise KeyError(task_id)
        return self.folder / f"{task_id}.json"

    def write(self, record: TaskRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # The store's write: temp file, fsync, rename; then the folder, so the name is durable too.
        ImageStore._write_atomic(self._path(record.task_id), record.model_dump_json().encode("utf-8"))
        ImageStore._fsync_dir(self.folder)

    def read(self, task_id: str) -> TaskRecord | None:
        try:
            path = self._path(task_id)
            if time.time() - path.stat().st_mtime > TTL_MS / 1000:
                return None  # expired: the spec lets a server forget it
            return TaskRecord.model_validate_json(path.read_bytes())
        except (KeyError, OSError, ValidationError):
            return None

    def prune(self) -> None:
        """Forget records past their time to live (called when a task is created)."""
        cutoff = time.time() - TTL_MS / 1000
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return
        for entry in entries:
            try:
                if entry.name.endswith(".json") and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass


def _declared(ctx: ServerRequestContext[Any, Any]) -> bool:
    capabilities = ctx.session.client_capabilities
    return bool(capabilities and capabilities.extensions and EXTENSION_ID in capabilities.extensions)


def _task_fields(record: TaskRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "taskId": record.task_id,
        "status": record.status,
        "createdAt": record.created_at,
        "lastUpdatedAt": record.last_updated_at,
        "ttlMs": TTL_MS,
        "pollIntervalMs": POLL_INTERVAL_MS,
    }
    if record.status_message:
        fields["statusMessage"] = record.status_message
    return fields


def _running_job_id(result: HandlerResult) -> str | None:
    structured = result.structured_content if isinstance(result, CallToolResult) else None
    if structured and structured.get("status") == "running" and structured.get("job_id"):
        return str(structured["job_id"])
    return None


def _dump(result: CallToolResult) -> dict[str, Any]:
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


def _unknown(task_id: str) -> MCPError:
    return MCPError(code=INVALID_PARAMS, message=f"Failed to retrieve task: no task {task_id!r} (unknown or expired)")


class TasksExtension(Extension):
    """Answers long generate/edit calls with tasks, and serves tasks/get, tasks/update, tasks/cancel."""

    identifier = EXTENSION_ID

    def __init__(self, holder: _Holder) -> None:
        self._holder = holder
        self._records: TaskRecords | None = None

    @property
    def records(self) -> TaskRecords:
        if self._records is None:
            self._records = TaskRecords(self._holder.settings.output_dir)
        return self._records

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
        now = _now()
        record = TaskRecord(
            task_id=job_id,
            tool=params.name,
            created_at=now,
            last_updated_at=now,
            status_message=f"{params.name} is running; poll tasks/get",
        )
        # Durable before the id leaves the server (the spec's requirement).
        await on_disk(lambda: (self.records.prune(), self.records.write(record)))
        return {"resultType": "task", **_task_fields(record)}

    # --- methods -----------------------------------------------------------------------------

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        require_client_extension(ctx, EXTENSION_ID)
        record = await on_disk(lambda: self.records.read(params.task_id))
        if record is None:
            raise _unknown(params.task_id)
        svc = self._holder.get()
        try:
            job = svc.job(params.task_id)
        except InputNotFoundError:
            job = None
        if job is None:
            detailed = await self._after_restart(svc, record)
        else:
            detailed = await self._from_job(svc, job, record)
        return {"resultType": "complete", **detailed}

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: UpdateParams) -> dict[str, Any]:
        # Image tasks never ask for input; responses to keys never issued are ignored (the spec's rule).
        require_client_extension(ctx, EXTENSION_ID)
        if await on_disk(lambda: self.records.read(params.task_id)) is None:
            raise _unknown(params.task_id)
        return {"resultType": "complete"}

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        require_client_extension(ctx, EXTENSION_ID)
        if await on_disk(lambda: self.records.read(params.task_id)) is None:
            raise _unknown(params.task_id)
        try:
            job = self._holder.get().job(params.task_id)
        except InputNotFoundError:
            job = None  # it ended with an earlier process: nothing left to stop
        if job is not None:
            job.cancel()  # cooperative: images already received stay saved
        return {"resultType": "complete"}

    # --- task state ------------------------------------------------------------------------------

    async def _settle(self, record: TaskRecord, status: TaskStatus, message: str) -> TaskRecord:
        """Record a terminal status once, so a later process answers the same."""
        if record.status == status and record.status_message == message:
            return record
        settled = record.model_copy(update={"status": status, "status_message": message, "last_updated_at": _now()})
        await on_disk(lambda: self.records.write(settled))
        return settled

    async def _from_job(self, svc: Any, job: Any, record: TaskRecord) -> dict[str, Any]:
        settings = self._holder.settings

        def read_bytes(image_id: str) -> tuple[bytes, str]:
            return svc.store.read_bytes(image_id)

        if job.status == "running":
            working = record.model_copy(
                update={
                    "status_message": f"{len(job.saved)} of {job.request.n} image(s) saved",
                    "last_updated_at": record.last_updated_at,
                }
            )
            return _task_fields(working)
        if job.status == "cancelled":
            settled = await self._settle(
                record, "cancelled", f"cancelled; {len(job.saved)} image(s) received were saved"
            )
            return _task_fields(settled)
        if job.status == "failed" or job.result is None:
            # A tool error is a completed task whose result has isError (the spec keeps "failed"
            # for JSON-RPC errors).
            error = job.error if isinstance(job.error, ImageGenError) else ImageGenError("the job ended without images")
            result = results.error_result(error.agent_text())
            settled = await self._settle(record, "completed", "the tool call ended with an error")
            return {**_task_fields(settled), "result": _dump(result)}
        verb = "Edited into" if job.request.operation == "edit" else "Generated"
        result = await results.from_generation(
            job.result,
            read_bytes=read_bytes,
            cached=svc.take_preview,
            verb=verb,
            preview_max_px=settings.preview_max_px,
            inline_full=settings.inline_full_image,
        )
        settled = await self._settle(record, "completed", f"{len(job.result.images)} image(s) saved")
        return {**_task_fields(settled), "result": _dump(result)}

    async def _after_restart(self, svc: Any, record: TaskRecord) -> dict[str, Any]:
        """A task whose job is not in memory any more: answer from the store's images of that job."""
        if record.status == "cancelled":
            return _task_fields(record)
        settings = self._holder.settings
        saved = [r for r in await on_disk(lambda: svc.store.recent(1000)) if r.job_id == record.task_id]
        saved.sort(key=lambda r: r.created_at)
        if not saved:
            result = results.error_result(
                f"{record.tool} job {record.task_id} ended when the server stopped, before any image was saved; "
                "call the tool again"
            )
            settled = await self._settle(record, "completed", "no image was saved")
            return {**_task_fields(settled), "result": _dump(result)}
        first = saved[0]
        result = await results.build_image_result(
            saved,
            read_bytes=lambda image_id: svc.store.read_bytes(image_id),
            status="done",
            headline=f"{len(saved)} image(s) of job {record.task_id} (collected from the saved images).",
            model=first.model,
            endpoint=first.endpoint,
            provider=first.provider,
            job_id=record.task_id,
            preview_max_px=settings.preview_max_px,
            inline_full=settings.inline_full_image,
        )
        settled = await self._settle(record, "completed", f"{len(saved)} image(s) saved")
        return {**_task_fields(settled), "result": _dump(result)}
