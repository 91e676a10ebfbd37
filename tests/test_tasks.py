"""Long generations as tasks (io.modelcontextprotocol/tasks, 2026-07-28), through the SDK's Client.

A client-side extension claims the `resultType: "task"` shape; `tasks/get` and `tasks/cancel` go
over the same session. Image requests are held at the OpenAI emulator until the test lets them
through, so a job is running exactly as long as the test needs, with no timing involved. A task is
its job, so the job's record on disk is what a new service, or a new server process (stdio, with
a real SIGKILL for the interrupted case), answers from.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest
from mcp.client import Client
from mcp.client.extension import ClientExtension, ResultClaim
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, Request, RequestParams, Result
from pydantic import SecretStr

from mcp_imagegen.config import EndpointConfig, Settings
from mcp_imagegen.jobs import JobRecord
from mcp_imagegen.server import build_server
from mcp_imagegen.service import ImageService
from mcp_imagegen.tasks import EXTENSION_ID
from tests.emulators.base import DEFAULT_API_KEY
from tests.emulators.openai import OpenAIEmulator
from tests.test_lifecycle import process_gone, server_env

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class TaskHandle(Result):
    """CreateTaskResult as the extension's spec defines it."""

    result_type: Literal["task"]
    task_id: str
    status: str
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None
    status_message: str | None = None


class DetailedTask(Result):
    task_id: str
    status: str
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None
    status_message: str | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class TaskIdParams(RequestParams):
    task_id: str


async def _not_resolved(handle: TaskHandle, _ctx: Any) -> CallToolResult:
    raise AssertionError(f"the test reads task {handle.task_id} itself")


class TasksClient(ClientExtension):
    identifier = EXTENSION_ID

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=TaskHandle, resolve=_not_resolved)]


class Gate:
    """Holds the emulator's image requests until let through (one at a time) or released (all)."""

    def __init__(self, emu: OpenAIEmulator) -> None:
        self._state = threading.Condition()
        self._open = False
        self._passes = 0
        self.arrived = 0  # requests that reached the gateway (sent: paid for once answered)
        inner = emu.app

        async def gated(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and "/images/" in scope["path"]:
                await anyio.to_thread.run_sync(self._wait)
            await inner(scope, receive, send)

        emu.app = gated  # type: ignore[assignment]

    def _wait(self) -> None:
        with self._state:
            self.arrived += 1
            self._state.notify_all()
            self._state.wait_for(lambda: self._open or self._passes > 0)
            if not self._open:
                self._passes -= 1

    def let_through(self, count: int = 1) -> None:
        with self._state:
            self._passes += count
            self._state.notify_all()

    def release(self) -> None:
        with self._state:
            self._open = True
            self._state.notify_all()


@pytest.fixture
def emu() -> Iterator[OpenAIEmulator]:
    with OpenAIEmulator() as emulator:
        yield emulator


@pytest.fixture
def retired_emu() -> Iterator[OpenAIEmulator]:
    with OpenAIEmulator(serve_retired=True) as emulator:
        yield emulator


@pytest.fixture
def gate(emu: OpenAIEmulator) -> Iterator[Gate]:
    g = Gate(emu)
    try:
        yield g
    finally:
        g.release()


def settings_for(tmp_path: Path, emu: OpenAIEmulator, deadline_s: float = 1.0, **endpoint: Any) -> Settings:
    oa = EndpointConfig(name="oa", provider="openai", base_url=emu.base_url, **endpoint)
    oa.api_key = SecretStr(DEFAULT_API_KEY)
    return Settings(output_dir=tmp_path / "out", endpoints=[oa], tool_deadline_s=deadline_s)


@asynccontextmanager
async def connect(settings: Settings, service: ImageService | None = None, **kwargs: Any) -> AsyncIterator[Client]:
    async with Client(build_server(settings, service), **kwargs) as client:
        yield client


async def start_task(client: Client, prompt: str = "a slow harbour", **arguments: Any) -> TaskHandle:
    handle = await client.session.call_tool("generate_image", {"prompt": prompt, **arguments}, allow_claimed=True)
    assert isinstance(handle, TaskHandle), handle
    return handle


async def task_get(client: Client, task_id: str) -> DetailedTask:
    return await client.session.send_request(
        Request(method="tasks/get", params=TaskIdParams(task_id=task_id)), DetailedTask
    )


async def task_cancel(client: Client, task_id: str) -> None:
    await client.session.send_request(Request(method="tasks/cancel", params=TaskIdParams(task_id=task_id)), Result)


async def until(client: Client, task_id: str, done: Callable[[DetailedTask], bool]) -> DetailedTask:
    with anyio.fail_after(30):
        while True:
            task = await task_get(client, task_id)
            if done(task):
                return task
            await anyio.sleep(0.05)


async def condition(check: Callable[[], Any], what: str) -> Any:
    try:
        with anyio.fail_after(30):
            while not (value := check()):
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None
    return value


def terminal(task: DetailedTask) -> bool:
    return task.status in ("completed", "failed", "cancelled")


def job_record(out: Path, job_id: str) -> JobRecord | None:
    try:
        return JobRecord.model_validate_json((out / ".mcp-imagegen" / "jobs" / f"{job_id}.json").read_bytes())
    except (OSError, ValueError):
        return None


def images_of(task: DetailedTask) -> list[dict[str, Any]]:
    assert task.result is not None, task
    return task.result["structuredContent"]["images"]


async def test_a_declaring_client_gets_a_task_it_can_follow_to_the_images(
    tmp_path: Path, emu: OpenAIEmulator, gate: Gate
) -> None:
    # A tool deadline far beyond the wait below: the task answer must not wait for the deadline.
    settings = settings_for(tmp_path, emu, deadline_s=600)
    async with connect(settings, extensions=[TasksClient()]) as client:
        with anyio.fail_after(60):
            handle = await start_task(client)
        # The task is its job, whose record was on disk before the id was returned.
        record = job_record(tmp_path / "out", handle.task_id)
        assert record is not None and record.status == "running" and record.created_at == handle.created_at
        assert handle.status == "working" and handle.poll_interval_ms
        assert handle.ttl_ms is None  # kept as long as the job's record: no time limit
        working = await task_get(client, handle.task_id)
        assert working.status == "working" and working.result is None and working.error is None
        assert working.created_at == handle.created_at and working.status_message == "0 of 1 image(s) saved"

        gate.release()
        done = await until(client, handle.task_id, terminal)
        assert done.status == "completed" and done.error is None
        result = CallToolResult.model_validate(done.result)
        assert not result.is_error, result.content
        [image] = result.structured_content["images"]
        assert Path(image["path"]).is_file()
        assert done.last_updated_at >= done.created_at
        # The same job through get_image.
        same = await client.call_tool("get_image", {"job_id": handle.task_id})
        assert [i["uri"] for i in same.structured_content["images"]] == [image["uri"]]
        for unknown in ("job_doesnotexist000", "../../etc/passwd"):
            with pytest.raises(MCPError) as missing:
                await task_get(client, unknown)
            assert missing.value.error.code == -32602 and "Task not found" in missing.value.error.message


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_client_that_does_not_declare_tasks_keeps_todays_results(
    tmp_path: Path, emu: OpenAIEmulator, gate: Gate, mode: str
) -> None:
    # Legacy: the extension is declared, but tasks exist only on the 2026-07-28 wire.
    extensions = [TasksClient()] if mode == "legacy" else None
    async with connect(settings_for(tmp_path, emu), mode=mode, extensions=extensions) as client:
        result = await client.call_tool("generate_image", {"prompt": "a slow harbour"})
        assert isinstance(result, CallToolResult)
        assert result.structured_content["status"] == "running"
        job_id = result.structured_content["job_id"]
        if mode == "auto":
            with pytest.raises(MCPError) as refused:
                await task_get(client, job_id)
            assert refused.value.error.code == -32021
        gate.release()
        with anyio.fail_after(30):
            while result.structured_content["status"] == "running":
                result = await client.call_tool("get_image", {"job_id": job_id, "wait_s": 1})
    assert len(result.structured_content["images"]) == 1


async def test_cancel_drops_a_task_whose_request_was_not_sent(tmp_path: Path, emu: OpenAIEmulator, gate: Gate) -> None:
    # One request at a time on this endpoint: the second task waits, unsent, behind the first.
    settings = settings_for(tmp_path, emu, max_concurrency=1)
    async with connect(settings, extensions=[TasksClient()]) as client:
        first = await start_task(client, "first")
        second = await start_task(client, "second")
        await task_cancel(client, second.task_id)
        cancelled = await until(client, second.task_id, terminal)
        assert cancelled.status == "cancelled" and cancelled.result is None
        assert "1 image(s) were not requested from the gateway" in (cancelled.status_message or "")
        gate.release()
        done = await until(client, first.task_id, terminal)
        assert done.status == "completed"
        assert [r.json["prompt"] for r in emu.requests_to("/images/generations")] == ["first"]
        # The job says the same, on disk and through get_image.
        assert job_record(tmp_path / "out", second.task_id).status == "cancelled"  # type: ignore[union-attr]
        collected = await client.call_tool("get_image", {"job_id": second.task_id, "wait_s": 0})
        assert collected.is_error and "cancelled" in collected.content[0].text  # type: ignore[union-attr]
        # Cancelling again, or a finished task, is acknowledged; an unknown one is not.
        await task_cancel(client, second.task_id)
        await task_cancel(client, first.task_id)
        assert (await task_get(client, first.task_id)).status == "completed"
        with pytest.raises(MCPError) as unknown:
            await task_cancel(client, "job_doesnotexist000")
        assert unknown.value.error.code == -32602


async def test_cancel_after_the_request_was_sent_awaits_it_and_saves_the_image(
    tmp_path: Path, emu: OpenAIEmulator, gate: Gate
) -> None:
    async with connect(settings_for(tmp_path, emu), extensions=[TasksClient()]) as client:
        handle = await start_task(client, "already paid for")
        await condition(lambda: gate.arrived == 1, "the request at the gateway")
        await task_cancel(client, handle.task_id)
        # The sent request is awaited: the task keeps working, and says why.
        still = await task_get(client, handle.task_id)
        assert still.status == "working" and "cancel requested" in (still.status_message or "")
        gate.release()
        done = await until(client, handle.task_id, terminal)
    # Everything was sent before the cancel, so the task completes with what was paid for.
    assert done.status == "completed"
    [image] = images_of(done)
    assert Path(image["path"]).is_file()
    assert len(emu.requests_to("/images/generations")) == 1
    record = job_record(tmp_path / "out", handle.task_id)
    assert record is not None and record.image_ids == [image["uri"].rsplit("/", 1)[-1]]


async def test_a_task_outlives_the_connection_and_the_service(tmp_path: Path, emu: OpenAIEmulator, gate: Gate) -> None:
    settings = settings_for(tmp_path, emu)
    async with ImageService(settings) as service:
        async with connect(settings, service, extensions=[TasksClient()]) as first_connection:
            handle = await start_task(first_connection)
        gate.release()  # the first client is gone; its task goes on
        async with connect(settings, service, extensions=[TasksClient()]) as second_connection:
            done = await until(second_connection, handle.task_id, terminal)
        assert done.status == "completed"
        uris = [i["uri"] for i in images_of(done)]

    # A new service over the same folder (a restarted server) answers from the job's record.
    async with connect(settings, extensions=[TasksClient()]) as after_restart:
        again = await task_get(after_restart, handle.task_id)
        await task_cancel(after_restart, handle.task_id)  # ended long ago: acknowledged, nothing to stop
    assert again.status == "completed" and again.created_at == handle.created_at
    assert again.last_updated_at == done.last_updated_at
    assert [i["uri"] for i in images_of(again)] == uris


# --- real server processes ---------------------------------------------------------------------------


@asynccontextmanager
async def stdio_server(tmp_path: Path, env: dict[str, str], name: str) -> AsyncIterator[Client]:
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_imagegen"], env=env, cwd=tmp_path)
    with (tmp_path / f"{name}-stderr.log").open("a") as errlog:
        async with Client(stdio_client(params, errlog=errlog), extensions=[TasksClient()]) as client:
            yield client


@pytest.mark.skipif(os.name != "posix", reason="signals and the stdio worker are POSIX")
async def test_a_task_outlives_its_server_process(tmp_path: Path, emu: OpenAIEmulator, gate: Gate) -> None:
    env = server_env(tmp_path, emu)
    out = tmp_path / "out"
    with anyio.fail_after(120):
        async with stdio_server(tmp_path, env, "first") as first:
            handle = await start_task(first, "outlives its host")
            await condition(lambda: gate.arrived == 1, "the request at the gateway")
        # The host closed the first server; its worker still waits on the request it sent.
        async with stdio_server(tmp_path, env, "second") as second:
            working = await task_get(second, handle.task_id)
            gate.release()
            record = await condition(
                lambda: (r := job_record(out, handle.task_id)) is not None and r.status == "done" and r,
                "the first server to save the image",
            )
            done = await task_get(second, handle.task_id)
        await condition(lambda: process_gone(record.pid), "the first server process to exit")
    # Another process answered for the job while it ran, then with its images.
    assert working.status == "working" and working.status_message == "0 of 1 image(s) saved"
    assert done.status == "completed" and done.created_at == handle.created_at
    [image] = images_of(done)
    assert Path(image["path"]).is_file() and image["uri"].endswith(record.image_ids[0])


@pytest.mark.skipif(os.name != "posix", reason="signals and the stdio worker are POSIX")
async def test_an_interrupted_job_is_a_failed_task_naming_the_images_it_saved(
    tmp_path: Path, retired_emu: OpenAIEmulator
) -> None:
    gate = Gate(retired_emu)
    env = server_env(tmp_path, retired_emu)
    out = tmp_path / "out"
    try:
        with anyio.fail_after(120):
            async with stdio_server(tmp_path, env, "first") as first:
                # dall-e-3 makes one image per request: two requests, of which one is answered.
                handle = await start_task(first, "half done", model="dall-e-3", n=2)
                await condition(lambda: gate.arrived == 2, "both requests at the gateway")
                gate.let_through(1)
                record = await condition(
                    lambda: (r := job_record(out, handle.task_id)) is not None and len(r.image_ids) == 1 and r,
                    "the first image saved",
                )
                os.kill(record.pid, signal.SIGKILL)  # the process dies with a request still out
                await condition(lambda: process_gone(record.pid), "the server process to die")
            async with stdio_server(tmp_path, env, "second") as second:
                failed = await task_get(second, handle.task_id)
                collected = await second.call_tool("get_image", {"job_id": handle.task_id, "wait_s": 0})
    finally:
        gate.release()
    [image_id] = record.image_ids
    assert failed.status == "failed" and failed.result is None and failed.error is not None
    assert failed.error["code"] == -32603
    message = failed.error["message"]
    assert "interrupted" in message and f"imagegen://images/{image_id}" in message
    assert failed.status_message == message
    [saved] = failed.error["data"]["images"]
    assert saved["uri"] == f"imagegen://images/{image_id}" and Path(saved["path"]).is_file()
    # get_image(job_id) returns the same image, with the same story as a warning.
    assert [i["uri"] for i in collected.structured_content["images"]] == [saved["uri"]]
    assert any("interrupted" in w for w in collected.structured_content["warnings"])
