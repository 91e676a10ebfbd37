"""Long generations as tasks (io.modelcontextprotocol/tasks, 2026-07-28), through the SDK's Client.

A client-side extension claims the `resultType: "task"` shape; `tasks/get` and `tasks/cancel` go
over the same session. Image requests are held at the OpenAI emulator until the test releases
them, so a job is running exactly as long as the test needs, with no timing involved.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest
from mcp.client import Client
from mcp.client.extension import ClientExtension, ResultClaim
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, Request, RequestParams, Result
from pydantic import SecretStr

from mcp_imagegen.config import EndpointConfig, Settings
from mcp_imagegen.server import build_server
from mcp_imagegen.service import ImageService
from mcp_imagegen.tasks import EXTENSION_ID
from tests.emulators.base import DEFAULT_API_KEY
from tests.emulators.openai import OpenAIEmulator

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
    status_message: str | None = None
    result: dict[str, Any] | None = None


class TaskIdParams(RequestParams):
    task_id: str


async def _not_resolved(handle: TaskHandle, _ctx: Any) -> CallToolResult:
    raise AssertionError(f"the test reads task {handle.task_id} itself")


class TasksClient(ClientExtension):
    identifier = EXTENSION_ID

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=TaskHandle, resolve=_not_resolved)]


class Gate:
    """Holds the emulator's image requests until released."""

    def __init__(self, emu: OpenAIEmulator) -> None:
        self.released = threading.Event()
        inner = emu.app

        async def gated(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and "/images/" in scope["path"]:
                await anyio.to_thread.run_sync(self.released.wait)
            await inner(scope, receive, send)

        emu.app = gated  # type: ignore[assignment]

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def emu() -> Iterator[OpenAIEmulator]:
    with OpenAIEmulator() as emulator:
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


async def start_task(client: Client, prompt: str = "a slow harbour") -> TaskHandle:
    handle = await client.session.call_tool("generate_image", {"prompt": prompt}, allow_claimed=True)
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


def terminal(task: DetailedTask) -> bool:
    return task.status in ("completed", "failed", "cancelled")


async def test_a_declaring_client_gets_a_task_it_can_follow_to_the_images(
    tmp_path: Path, emu: OpenAIEmulator, gate: Gate
) -> None:
    # A tool deadline far beyond the wait below: the task answer must not wait for the deadline.
    settings = settings_for(tmp_path, emu, deadline_s=600)
    async with connect(settings, extensions=[TasksClient()]) as client:
        with anyio.fail_after(60):
            handle = await start_task(client)
        # Durable before its id was returned: the record is on disk already.
        assert (tmp_path / "out" / ".mcp-imagegen" / "tasks" / f"{handle.task_id}.json").is_file()
        assert handle.status == "working" and handle.ttl_ms and handle.poll_interval_ms
        working = await task_get(client, handle.task_id)
        assert working.status == "working" and working.result is None
        assert working.created_at == handle.created_at

        gate.release()
        done = await until(client, handle.task_id, terminal)
        assert done.status == "completed"
        result = CallToolResult.model_validate(done.result)
        assert not result.is_error, result.content
        [image] = result.structured_content["images"]
        assert Path(image["path"]).is_file()
        # The same job through get_image.
        same = await client.call_tool("get_image", {"job_id": handle.task_id})
        assert [i["uri"] for i in same.structured_content["images"]] == [image["uri"]]
        with pytest.raises(MCPError) as missing:
            await task_get(client, "job_doesnotexist000")
        assert missing.value.error.code == -32602


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
    assert not (tmp_path / "out" / ".mcp-imagegen" / "tasks").exists()


async def test_cancel_stops_a_task_whose_request_was_not_sent(tmp_path: Path, emu: OpenAIEmulator, gate: Gate) -> None:
    # One request at a time on this endpoint: the second task waits, unsent, behind the first.
    settings = settings_for(tmp_path, emu, max_concurrency=1)
    async with connect(settings, extensions=[TasksClient()]) as client:
        first = await start_task(client, "first")
        second = await start_task(client, "second")
        await task_cancel(client, second.task_id)
        cancelled = await until(client, second.task_id, terminal)
        assert cancelled.status == "cancelled" and cancelled.result is None
        gate.release()
        done = await until(client, first.task_id, terminal)
        assert done.status == "completed"
        assert [r.json["prompt"] for r in emu.requests_to("/images/generations")] == ["first"]
        # Cancelling again, or a finished task, is acknowledged; an unknown one is not.
        await task_cancel(client, second.task_id)
        await task_cancel(client, first.task_id)
        assert (await task_get(client, first.task_id)).status == "completed"
        with pytest.raises(MCPError) as unknown:
            await task_cancel(client, "job_doesnotexist000")
        assert unknown.value.error.code == -32602


async def test_a_task_outlives_the_connection_and_the_server_process(
    tmp_path: Path, emu: OpenAIEmulator, gate: Gate
) -> None:
    settings = settings_for(tmp_path, emu)
    async with ImageService(settings) as service:
        async with connect(settings, service, extensions=[TasksClient()]) as first_connection:
            handle = await start_task(first_connection)
        gate.release()  # the first client is gone; its task goes on
        async with connect(settings, service, extensions=[TasksClient()]) as second_connection:
            done = await until(second_connection, handle.task_id, terminal)
        assert done.status == "completed"
        uris = [i["uri"] for i in done.result["structuredContent"]["images"]]

    # A new service (a restarted server) answers from the task's record and the saved images.
    async with connect(settings, extensions=[TasksClient()]) as after_restart:
        again = await task_get(after_restart, handle.task_id)
    assert again.status == "completed" and again.created_at == handle.created_at
    assert [i["uri"] for i in again.result["structuredContent"]["images"]] == uris
