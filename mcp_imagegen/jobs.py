"""Jobs: one generation in flight or finished, and its record on disk.

A job belongs to the server, not to the connection that started it. Only an explicit cancel from
the person stops it, and only for gateway requests not yet sent: a request already sent has been
paid for, so its answer is awaited and saved. Disconnects, session ends and client timeouts do
not touch a job.

Each job's record is kept beside the image records (`<output_dir>/.mcp-imagegen/jobs/<id>.json`,
written atomically), so `get_image(job_id)` answers after a restart, and a job whose process died
says "interrupted" with the images it saved.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import anyio
from pydantic import BaseModel, Field, ValidationError

from .errors import ImageGenError, InvalidRequestError
from .models import GenerationResult, ImageRequest, SavedImage
from .owners import LOCAL_OWNER, current_owner
from .work import on_disk

log = logging.getLogger("mcp_imagegen.jobs")

ProgressFn = Callable[[float, float | None, str], Awaitable[None]]
JobStatus = Literal["running", "done", "failed", "cancelled", "interrupted"]
StopReason = Literal["cancelled", "shutdown"]

JOBS_DIR_NAME = "jobs"


class Stopped(InvalidRequestError):
    """A job stopped before any of its requests was sent (cancel or shutdown): nothing was paid."""

    kind = "cancelled"


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
    route: Any = None  # catalog.Route, once chosen
    prepared: Any = None  # checks.PreparedRequest for that route (what will be sent)
    usage: dict[str, Any] | None = None
    cost: float | None = None
    balance: float | None = None
    started: float = field(default_factory=time.monotonic)
    created_at: str = field(default_factory=lambda: _now())
    stop_reason: StopReason | None = None
    not_sent: int = 0  # images never asked for because of a cancel or a shutdown
    sent: int = 0  # gateway requests sent (each paid for once answered)
    owner: str = field(default_factory=current_owner)  # who started it; only they find it (owners.py)
    _unsent: set[anyio.CancelScope] = field(default_factory=set)
    _done: anyio.Event = field(default_factory=anyio.Event)

    @staticmethod
    def new_id() -> str:
        return f"job_{secrets.token_urlsafe(12)}"

    async def wait(self, timeout: float | None) -> GenerationResult | None:
        """The result, or None when the job has not finished within `timeout` seconds."""
        with anyio.move_on_after(timeout):
            await self._done.wait()
        if not self._done.is_set():
            return None
        if self.error is not None:
            raise self.error
        return self.result

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def detach_progress(self) -> None:
        self.progress = None

    def cancel(self) -> None:
        """The person's explicit cancel: requests not yet sent are dropped; sent ones are saved."""
        self.stop_unsent("cancelled")

    def stop_unsent(self, reason: StopReason) -> None:
        if self.status != "running" or self.stop_reason is not None:
            return
        self.stop_reason = reason
        for scope in list(self._unsent):
            scope.cancel()

    def unsent_scope(self) -> anyio.CancelScope:
        """A scope around one gateway request until it is sent; a stop cancels it while unsent."""
        scope = anyio.CancelScope()
        if self.stop_reason is not None:
            scope.cancel()
        self._unsent.add(scope)
        return scope

    def mark_sent(self, scope: anyio.CancelScope) -> None:
        """Called the moment a request goes out: from here on, no stop reaches it."""
        self._unsent.discard(scope)
        self.sent += 1

    def check_not_stopped(self) -> None:
        if self.stop_reason is not None:
            raise Stopped(_stopped_text(self.stop_reason, self.request.n, len(self.saved)))

    def stopped_error(self) -> ImageGenError:
        return InvalidRequestError(_stopped_text(self.stop_reason or "cancelled", self.not_sent, len(self.saved)))

    async def _report(self, done: float, total: float | None, message: str) -> None:
        progress = self.progress
        if progress is None:
            return
        try:
            await progress(done, total, message)
        except Exception:  # a caller that went away must not break the job
            log.debug("progress report failed; detaching", exc_info=True)
            self.progress = None

    def to_record(self) -> JobRecord:
        result = self.result
        route = self.route
        return JobRecord(
            id=self.id,
            status=self.status,
            operation=self.request.operation,
            prompt=self.request.prompt,
            n=self.request.n,
            model=result.model if result else (route.model.id if route else self.request.model),
            endpoint=result.endpoint if result else (route.endpoint.name if route else self.request.endpoint),
            provider=result.provider if result else (route.endpoint.provider if route else None),
            image_ids=[image.id for image in self.saved],
            warnings=list(dict.fromkeys(self.warnings)),
            error=self.error.agent_text() if self.error is not None else None,
            usage=self.usage,
            cost=self.cost,
            balance=self.balance,
            created_at=self.created_at,
            updated_at=_now(),
            pid=os.getpid(),
            owner=self.owner,
        )


def _stopped_text(reason: StopReason, not_sent: int, saved: int) -> str:
    why = "the call was cancelled" if reason == "cancelled" else "the server was shutting down"
    return (
        f"{why}; {not_sent} image(s) were not requested from the gateway (nothing paid for them); "
        f"{saved} image(s) already received were saved"
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobRecord(BaseModel):
    """What outlives the process: enough for get_image(job_id) after a restart."""

    id: str
    status: JobStatus
    operation: str
    prompt: str
    n: int
    model: str | None = None
    endpoint: str | None = None
    provider: str | None = None
    image_ids: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    error: str | None = None
    usage: dict[str, Any] | None = None
    cost: float | None = None
    balance: float | None = None
    created_at: str
    updated_at: str
    pid: int | None = None  # the process that ran it: a "running" record of a dead one was interrupted
    owner: str = LOCAL_OWNER

    def owner_alive(self) -> bool:
        """Whether another live process may still be running this job. Our own pid means a
        previous life of a process with the same pid (containers reuse pid 1): a job of this
        process is found in its memory before its record is ever read."""
        if self.pid is None or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except (PermissionError, OSError):
            return True  # exists, not ours to signal
        return True


class RemoteJobBookWrites:
    """`write_all` and `write_durable` for job books whose `write` is durable once it returns (an
    object in a bucket, a Redis key): the batched writer and tasks.py use these."""

    def write(self, record: JobRecord) -> None:
        raise NotImplementedError

    def write_all(self, records: list[JobRecord]) -> None:
        for record in records:
            try:
                self.write(record)
            except Exception as exc:  # a job record is a convenience; the image records are the truth
                log.warning("could not write the record of job %s: %s", record.id, type(exc).__name__)

    def write_durable(self, record: JobRecord) -> None:
        self.write(record)


class JobBook:
    """Job records on disk; blocking calls (run them through `on_disk`)."""

    def __init__(self, meta_dir: Path) -> None:
        self.folder = meta_dir / JOBS_DIR_NAME

    def _path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def write(self, record: JobRecord) -> None:
        """Atomic (temp file, rename) but not fsync'd: the image records, which are, stay the truth
        about which images exist; a lost job record only loses the job's summary."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write(record)

    def write_all(self, records: list[JobRecord]) -> None:
        """Each record as `write` does; one that cannot be written does not keep the rest out."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.debug("could not make the job records' folder: %s", exc)
            return
        for record in records:
            try:
                self._write(record)
            except OSError as exc:  # a job record is a convenience; the image records are the truth
                log.debug("could not write the record of job %s: %s", record.id, exc)

    def _write(self, record: JobRecord) -> None:
        from .store import TMP_SUFFIX

        final = self._path(record.id)
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            tmp.write_bytes(record.model_dump_json(indent=1).encode("utf-8"))
            os.replace(tmp, final)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise

    def write_durable(self, record: JobRecord) -> None:
        """Like `write`, and flushed to the disk with its folder before it returns: for a record
        whose id was promised to outlive a crash (a task id, tasks.py)."""
        from .store import ImageStore

        self.folder.mkdir(parents=True, exist_ok=True)
        ImageStore._write_atomic(self._path(record.id), record.model_dump_json(indent=1).encode("utf-8"))
        ImageStore._fsync_dir(self.folder)

    def read(self, job_id: str) -> JobRecord | None:
        if not _valid_job_id(job_id):
            return None
        try:
            return JobRecord.model_validate_json(self._path(job_id).read_bytes())
        except (OSError, ValidationError):
            return None


def _valid_job_id(job_id: str) -> bool:
    rest = job_id.removeprefix("job_")
    return job_id.startswith("job_") and 8 <= len(rest) <= 64 and all(c.isalnum() or c in "-_" for c in rest)


class JobRecorder:
    """Writes job records on the file threads, off the event loop, coalesced.

    A job's record changes a few times (started, each image saved, ended). `note` only marks the
    job; the writer takes each marked job's record when it starts a trip (on the event loop: the
    job's state then includes everything noted before) and writes them all in one trip to the
    file threads, so a job noted three times in quick succession is written once. `durable`
    waits until what was noted of a job is on disk: before its id leaves the server, and when it
    ends. With 64 calls at once this is a thread hop per batch instead of three per call."""

    def __init__(self, book: JobBook) -> None:
        self._book = book
        self._pending: dict[str, Job] = {}
        self._noted: dict[str, int] = {}  # job id -> number of its latest noted state
        self._count = 0  # states noted so far (all jobs)
        self._written = 0  # every state numbered up to this is on disk (or failed to be)
        self._flushed: anyio.Event | None = None  # set after each trip (made on the loop, when needed)
        self._writer_running = False
        self._tasks: Any = None  # the service's task group, which runs the writer

    def start(self, tasks: Any) -> None:
        self._tasks = tasks

    def note(self, job: Job) -> None:
        self._count += 1
        self._pending[job.id] = job
        self._noted[job.id] = self._count
        if not self._writer_running and self._tasks is not None:
            self._writer_running = True
            self._tasks.start_soon(self._write_pending, name="job records")

    async def durable(self, job: Job) -> None:
        """Wait until the latest noted state of `job` is written (noting it first if never noted)."""
        if job.id not in self._noted:
            self.note(job)
        wanted = self._noted[job.id]
        if self._tasks is None:  # not running in a service (tests of the book alone): write here
            await self._write_pending()
        while self._written < wanted:
            await self._trip_ended()

    async def idle(self) -> None:
        """Wait until nothing noted is waiting to be written or being written."""
        while self._writer_running:
            await self._trip_ended()

    async def _trip_ended(self) -> None:
        if self._flushed is None:
            self._flushed = anyio.Event()
        await self._flushed.wait()

    def ever_noted(self, job: Job) -> bool:
        """Whether the job has a record (written or on its way): its id may have left the server."""
        return job.id in self._noted

    def drop(self, job: Job) -> None:
        """Leave the job's noted state unwritten: a state written by other means supersedes it."""
        self._pending.pop(job.id, None)

    def forget(self, job: Job) -> None:
        """A finished job's record is written: nothing to keep about it here."""
        if self._noted.get(job.id, 0) <= self._written:
            self._noted.pop(job.id, None)

    async def _write_pending(self) -> None:
        # Shielded: a record noted must reach the disk even while the service is stopping, or a
        # `durable` waiting on it would wait for ever.
        with anyio.CancelScope(shield=True):
            try:
                while self._pending:
                    records = [job.to_record() for job in self._pending.values()]
                    self._pending = {}
                    upto = self._count
                    try:
                        await on_disk(lambda batch=records: self._book.write_all(batch))
                    finally:
                        self._written = upto
                        if self._flushed is not None:
                            self._flushed.set()
                            self._flushed = None
            finally:
                self._writer_running = False
