"""Nothing paid for is lost, whatever the host or the process does.

Real server processes, real signals and a gateway emulator that counts what it served (billed).
The emulator holds its answers (`hold()`) until the test has done what a host does to the
server, then answers (`release()`): every row waits on conditions, none on the clock.
For every row: images saved == images the gateway served, and each is findable afterwards
(files, records, get_image(job_id) from a new server process).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.os.posix.utilities import terminate_posix_process_tree

from mcp_imagegen.jobs import JobRecord
from mcp_imagegen.models import ImageRecord
from tests.emulators import Emulator
from tests.emulators.base import DEFAULT_API_KEY

REPO = Path(__file__).resolve().parent.parent
GENERATIONS = "/images/generations"
CALLS = 4

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="process groups and signals are POSIX"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- the world around the server --------------------------------------------------------------------


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def server_env(tmp_path: Path, emu: Emulator) -> dict[str, str]:
    out = tmp_path / "out"
    config = tmp_path / "mcp-imagegen.toml"
    config.write_text(
        textwrap.dedent(
            f"""\
            output_dir = "{out.as_posix()}"

            [[endpoints]]
            name = "gw"
            provider = "openai"
            base_url = "{emu.base_url}"
            api_key_env = "LIFECYCLE_GATEWAY_KEY"
            timeout_s = 120
            max_concurrency = 8
            """
        ),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    env.update(
        MCP_IMAGEGEN_CONFIG=str(config),
        LIFECYCLE_GATEWAY_KEY=DEFAULT_API_KEY,
        HOME=str(tmp_path / "home"),
        XDG_CONFIG_HOME=str(tmp_path / "xdg"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        PYTHONPATH=str(REPO),
        MCP_IMAGEGEN_LOG_LEVEL="INFO",
    )
    env.pop("MCP_IMAGEGEN_STDIO_WORKER", None)
    env.pop("MCP_IMAGEGEN_OUTPUT_DIR", None)
    return env


def image_records(out: Path) -> list[ImageRecord]:
    """Every image record; each must parse (no torn record) and point at a whole file."""
    meta = out / ".mcp-imagegen"
    records = [ImageRecord.model_validate_json(p.read_bytes()) for p in sorted(meta.glob("*.json"))]
    for record in records:
        assert Path(record.path).is_file(), record.path
        assert Path(record.path).stat().st_size == record.bytes
    return records


def job_records(out: Path) -> list[JobRecord]:
    return [
        JobRecord.model_validate_json(p.read_bytes()) for p in sorted((out / ".mcp-imagegen" / "jobs").glob("*.json"))
    ]


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie nobody reaped yet has finished too
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def wait_until_finished(out: Path, jobs: int, exited: bool = True) -> list[JobRecord]:
    """The worker that kept the jobs has recorded them all (and exited)."""

    def finished() -> list[JobRecord] | None:
        records = job_records(out) if (out / ".mcp-imagegen" / "jobs").is_dir() else []
        if len(records) < jobs or any(r.status == "running" for r in records):
            return None
        return records

    records = wait_for(finished, f"{jobs} finished job records")
    for pid in {r.pid for r in records if r.pid and exited}:
        wait_for(lambda pid=pid: process_gone(pid), f"the worker {pid} to exit")
    return records


def assert_saved_equals_served(out: Path, emu: Emulator, expected: int = CALLS, exited: bool = True) -> list[JobRecord]:
    jobs = wait_until_finished(out, expected, exited)
    served = emu.served(GENERATIONS)
    records = image_records(out)
    assert served == expected, f"the gateway served {served}"
    assert len(records) == served, f"saved {len(records)} of {served} served"
    assert sorted(i for j in jobs for i in j.image_ids) == sorted(r.id for r in records)
    assert all(j.status == "done" for j in jobs), [(j.status, j.error) for j in jobs]
    return jobs


async def assert_findable_from_a_new_server(tmp_path: Path, env: dict[str, str], jobs: list[JobRecord]) -> None:
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_imagegen"], env=env, cwd=tmp_path)
    with (tmp_path / "verify-stderr.log").open("a") as errlog, anyio.fail_after(60):
        async with Client(stdio_client(params, errlog=errlog), mode="legacy") as client:
            listed = {str(r.uri) for r in (await client.list_resources()).resources}
            for job in jobs:
                got = await client.call_tool("get_image", {"job_id": job.id, "wait_s": 0})
                assert not got.is_error, got.content
                assert got.structured_content["status"] == "done"
                images = got.structured_content["images"]
                assert [i["id"] for i in images] == job.image_ids
                for image in images:
                    assert image["uri"] in listed and Path(image["path"]).is_file()


# --- a host that speaks raw JSON-RPC over pipes -------------------------------------------------------


class StdioHost:
    """Starts `python -m mcp_imagegen` as a host does (its own process group) and talks JSON-RPC."""

    def __init__(self, tmp_path: Path, env: dict[str, str], reader: bool = True) -> None:
        self.stderr = (tmp_path / "server-stderr.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mcp_imagegen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            cwd=tmp_path,
            env=env,
            start_new_session=True,
        )
        self.replies: dict[int, dict[str, Any]] = {}
        self._next = 0
        self._reader = reader  # without: the test reads (so it may close stdout under no thread)
        if reader:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            if "id" in message and ("result" in message or "error" in message):
                self.replies[message["id"]] = message

    def send(self, method: str, params: dict[str, Any] | None = None, notify: bool = False) -> int:
        assert self.proc.stdin is not None
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, **({"params": params} if params else {})}
        if not notify:
            self._next += 1
            message["id"] = self._next
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()
        return self._next

    def start(self) -> None:
        rid = self.send(
            "initialize",
            {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "host", "version": "0"}},
        )
        if self._reader:
            wait_for(lambda: rid in self.replies, "the initialize answer")
        else:
            assert self.proc.stdout is not None
            assert json.loads(self.proc.stdout.readline())["id"] == rid
        self.send("notifications/initialized", notify=True)

    def call(self, prompt: str) -> int:
        return self.send(
            "tools/call", {"name": "generate_image", "arguments": {"prompt": prompt, "model": "gpt-image-2"}}
        )

    def close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()  # type: ignore[union-attr]
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


class _Spawned:
    """What the SDK's terminate_posix_process_tree reads of a process: its pid and return code."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()


@pytest.fixture
def gateway(emulator: Any) -> Iterator[Emulator]:
    emu = emulator("openai")
    emu.hold()
    try:
        yield emu
    finally:
        emu.release()


def start_calls(host: StdioHost, emu: Emulator, n: int = CALLS) -> None:
    host.start()
    for i in range(n):
        host.call(f"call {i}")
    wait_for(lambda: len(emu.requests_to(GENERATIONS)) == n, f"{n} requests at the gateway")


# --- stdio --------------------------------------------------------------------------------------------


async def test_stdio_host_closes_stdin_with_calls_in_flight(tmp_path: Path, gateway: Emulator) -> None:
    env = server_env(tmp_path, gateway)
    host = StdioHost(tmp_path, env)
    try:
        start_calls(host, gateway)
        assert host.proc.stdin is not None
        host.proc.stdin.close()  # a spec-compliant shutdown
        wait_for(lambda: host.proc.poll() is not None, "the process the host started to exit")
        gateway.release()  # only now does the gateway answer: nobody is listening any more
        jobs = assert_saved_equals_served(tmp_path / "out", gateway)
    finally:
        host.close()
    log = (tmp_path / "server-stderr.log").read_text()
    assert "finishing 4 job(s)" in log and "4 image(s) saved" in log
    await assert_findable_from_a_new_server(tmp_path, env, jobs)


async def test_stdio_process_group_gets_sigterm_then_sigkill_as_the_sdk_sends(
    tmp_path: Path, gateway: Emulator
) -> None:
    env = server_env(tmp_path, gateway)
    host = StdioHost(tmp_path, env)
    try:
        start_calls(host, gateway)
        # The SDK client's own escalation: SIGTERM to the whole group, SIGKILL 2 s later.
        await terminate_posix_process_tree(_Spawned(host.proc), 2.0)  # type: ignore[arg-type]
        wait_for(lambda: host.proc.poll() is not None, "the process group to be gone")
        gateway.release()
        jobs = assert_saved_equals_served(tmp_path / "out", gateway)
    finally:
        host.close()
    await assert_findable_from_a_new_server(tmp_path, env, jobs)


CLIENT_SCRIPT = """
import os, sys, anyio
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

async def main() -> None:
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_imagegen"], env=dict(os.environ))
    async with Client(stdio_client(params), mode="legacy") as client:
        async with anyio.create_task_group() as tg:
            for i in range({calls}):
                tg.start_soon(client.call_tool, "generate_image", {{"prompt": f"call {{i}}", "model": "gpt-image-2"}})
            print("CALLING", flush=True)

anyio.run(main)
"""


async def test_stdio_client_process_killed(tmp_path: Path, gateway: Emulator) -> None:
    env = server_env(tmp_path, gateway)
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT.format(calls=CALLS))
    with (tmp_path / "client-stderr.log").open("ab") as errlog:
        client = subprocess.Popen(
            [sys.executable, str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=errlog
        )
        try:
            wait_for(lambda: len(gateway.requests_to(GENERATIONS)) == CALLS, "4 requests at the gateway")
            client.kill()  # SIGKILL: no goodbye, the pipes just close
            client.wait()
            gateway.release()
            jobs = assert_saved_equals_served(tmp_path / "out", gateway)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    await assert_findable_from_a_new_server(tmp_path, env, jobs)


async def test_sdk_read_timeout_sends_a_cancel_and_the_sent_request_is_saved(tmp_path: Path, gateway: Emulator) -> None:
    env = server_env(tmp_path, gateway)
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_imagegen"], env=env, cwd=tmp_path)
    with (tmp_path / "stderr.log").open("a") as errlog, anyio.fail_after(90):
        async with Client(stdio_client(params, errlog=errlog), mode="legacy") as client:

            async def release_once_sent() -> None:
                while not gateway.requests_to(GENERATIONS):
                    await anyio.sleep(0.05)

            async with anyio.create_task_group() as tg:
                tg.start_soon(release_once_sent)
                with pytest.raises(Exception, match="(?i)timed out|timeout"):
                    await client.call_tool(
                        "generate_image", {"prompt": "slow", "model": "gpt-image-2"}, read_timeout_seconds=1
                    )
            assert len(gateway.requests_to(GENERATIONS)) == 1  # sent before the cancel
            gateway.release()
            while not (tmp_path / "out" / ".mcp-imagegen" / "jobs").is_dir() or any(
                j.status == "running" for j in job_records(tmp_path / "out")
            ):
                await anyio.sleep(0.05)
            [job] = job_records(tmp_path / "out")
            got = await client.call_tool("get_image", {"job_id": job.id, "wait_s": 0})
            assert got.structured_content["status"] == "done" and len(got.structured_content["images"]) == 1
    jobs = assert_saved_equals_served(tmp_path / "out", gateway, expected=1)
    await assert_findable_from_a_new_server(tmp_path, env, jobs)


# --- streamable HTTP -------------------------------------------------------------------------------------


JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}


SERVING_AT = re.compile(rb"serving MCP \(streamable HTTP\) at (http://\S+/mcp)")


@contextmanager
def http_server(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    # Port 0: the server binds a free port itself and says which (no window for another process
    # to take a port picked in advance).
    log = tmp_path / "http-stderr.log"
    stderr = log.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_imagegen", "--transport", "http", "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        cwd=tmp_path,
        env=env,
    )

    def announced() -> bool:
        assert proc.poll() is None, log.read_text()[-2000:]
        return SERVING_AT.search(log.read_bytes()) is not None

    try:
        wait_for(announced, "the HTTP server to say where it listens")
    except BaseException:
        proc.kill()
        proc.wait()
        stderr.close()
        raise
    found = SERVING_AT.search(log.read_bytes())
    assert found is not None
    url = found.group(1).decode()

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "http-stderr.log").read_text()[-2000:]
        try:
            return httpx2.post(url, json=INIT, headers=JSON_HEADERS, timeout=5).status_code == 200
        except httpx2.TransportError:
            return False

    try:
        wait_for(up, "the HTTP server to answer")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        stderr.close()


async def open_session(http: httpx2.AsyncClient, url: str) -> dict[str, str]:
    first = await http.post(url, json=INIT, headers=JSON_HEADERS)
    headers = {**JSON_HEADERS, "mcp-session-id": first.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
    await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    return headers


async def raw_call(http: httpx2.AsyncClient, url: str, headers: dict[str, str], i: int) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 100 + i,
        "method": "tools/call",
        "params": {"name": "generate_image", "arguments": {"prompt": f"call {i}", "model": "gpt-image-2"}},
    }
    try:
        async with http.stream("POST", url, json=body, headers=headers) as response:
            async for _ in response.aiter_bytes():
                pass
    except httpx2.TransportError:
        pass  # the session went away under it: that is the point


async def wait_async(condition: Callable[[], Any], what: str, timeout: float = 90) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.05)


async def test_http_session_deleted_with_calls_in_flight(tmp_path: Path, gateway: Emulator) -> None:
    env = server_env(tmp_path, gateway)
    with http_server(tmp_path, env) as (proc, url):
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=None)) as http:
            headers = await open_session(http, url)
            async with anyio.create_task_group() as tg:
                for i in range(CALLS):
                    tg.start_soon(raw_call, http, url, headers, i)
                await wait_async(lambda: len(gateway.requests_to(GENERATIONS)) == CALLS, "4 requests at the gateway")
                deleted = await http.delete(url, headers=headers)
                assert deleted.status_code in (200, 204)
                tg.cancel_scope.cancel()
        gateway.release()
        jobs = assert_saved_equals_served(tmp_path / "out", gateway, exited=False)
        assert proc.poll() is None  # the server itself never noticed anything worth dying for
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: proc.poll() is not None, "the HTTP server to exit")
    await assert_findable_from_a_new_server(tmp_path, env, jobs)


async def test_http_sigterm_drains_in_flight_calls(tmp_path: Path, gateway: Emulator) -> None:
    env = server_env(tmp_path, gateway)
    answers: list[Any] = []
    with http_server(tmp_path, env) as (proc, url):
        http = httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=120))
        transport = streamable_http_client(url, http_client=http, terminate_on_close=False)
        async with Client(transport, mode="legacy") as client:
            await client.list_tools()  # the client checks results against the tools' schemas

            async def call(i: int) -> None:
                answers.append(
                    await client.call_tool("generate_image", {"prompt": f"call {i}", "model": "gpt-image-2"})
                )

            async with anyio.create_task_group() as tg:
                for i in range(CALLS):
                    tg.start_soon(call, i)
                await wait_async(lambda: len(gateway.requests_to(GENERATIONS)) == CALLS, "4 requests at the gateway")
                proc.send_signal(signal.SIGTERM)
                # Draining (the gateway still holds every answer): a new call is turned away.
                async with httpx2.AsyncClient(timeout=10) as other:

                    async def refused() -> bool:
                        return (await other.post(url, json=INIT, headers=JSON_HEADERS)).status_code == 503

                    with anyio.fail_after(30):
                        while not await refused():
                            await anyio.sleep(0.05)
                gateway.release()
        wait_for(lambda: proc.poll() is not None, "the HTTP server to exit after draining")
    assert len(answers) == CALLS and not any(a.is_error for a in answers), answers
    jobs = assert_saved_equals_served(tmp_path / "out", gateway)
    assert sorted(a.structured_content["job_id"] for a in answers) == sorted(j.id for j in jobs)
    log = (tmp_path / "http-stderr.log").read_text()
    assert "SIGTERM received" in log and "4 image(s) saved" in log
    await assert_findable_from_a_new_server(tmp_path, env, jobs)


async def test_http_second_signal_exits_at_once_and_records_the_jobs_as_interrupted(
    tmp_path: Path, gateway: Emulator
) -> None:
    env = server_env(tmp_path, gateway)
    with http_server(tmp_path, env) as (proc, url):
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=None)) as http:
            headers = await open_session(http, url)
            async with anyio.create_task_group() as tg:
                for i in range(2):
                    tg.start_soon(raw_call, http, url, headers, i)
                await wait_async(lambda: len(gateway.requests_to(GENERATIONS)) == 2, "2 requests at the gateway")
                proc.send_signal(signal.SIGTERM)
                await wait_async(lambda: "SIGTERM received" in (tmp_path / "http-stderr.log").read_text(), "the drain")
                proc.send_signal(signal.SIGTERM)
                await wait_async(lambda: proc.poll() is not None, "the server to exit at the second signal")
                tg.cancel_scope.cancel()
    jobs = job_records(tmp_path / "out")
    assert len(jobs) == 2 and all(j.status == "interrupted" for j in jobs), jobs
    assert "recorded as interrupted" in (tmp_path / "http-stderr.log").read_text()
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_imagegen"], env=env, cwd=tmp_path)
    with (tmp_path / "verify-stderr.log").open("a") as errlog, anyio.fail_after(60):
        async with Client(stdio_client(params, errlog=errlog), mode="legacy") as client:
            got = await client.call_tool("get_image", {"job_id": jobs[0].id})
            assert got.is_error and "interrupted" in got.content[0].text  # type: ignore[union-attr]


# --- kill -9 and a restart ----------------------------------------------------------------------------


async def test_restart_after_kill_9_finds_every_whole_image_and_no_torn_record(
    tmp_path: Path, gateway: Emulator
) -> None:
    from tests.test_store import png

    env = server_env(tmp_path, gateway)
    out = tmp_path / "out"
    host = StdioHost(tmp_path, env)
    try:
        host.start()
        gateway.release()
        first = host.call("done before the kill")
        wait_for(lambda: first in host.replies, "the first call's answer")
        done_job = host.replies[first]["result"]["structuredContent"]["job_id"]
        gateway.hold()
        for i in range(2):
            host.call(f"in flight {i}")
        wait_for(lambda: len(gateway.requests_to(GENERATIONS)) == 3, "2 more requests at the gateway")
        running = wait_for(lambda: [j for j in job_records(out) if j.status == "running"], "running job records")
        [worker] = {j.pid for j in running}
        os.kill(worker, signal.SIGKILL)  # no chance to save or record anything
        wait_for(lambda: process_gone(worker), "the worker to die")
    finally:
        host.close()
        gateway.release()
    # What a kill in the middle of a save leaves: a whole temp file and a torn one.
    whole = png((16, 16), "purple")
    (out / ".20260101-000000_mid-save_KiLlEd.png.0a0b0c0d.mcpimg-partial").write_bytes(whole)
    (out / ".20260101-000001_torn_ToRnNn.png.0e0f0a0b.mcpimg-partial").write_bytes(whole[:40])

    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_imagegen"], env=env, cwd=tmp_path)
    with (tmp_path / "verify-stderr.log").open("a") as errlog, anyio.fail_after(60):
        async with Client(stdio_client(params, errlog=errlog), mode="legacy") as client:
            kept = await client.call_tool("get_image", {"job_id": done_job, "wait_s": 0})
            assert kept.structured_content["status"] == "done" and len(kept.structured_content["images"]) == 1
            for job in running:
                lost = await client.call_tool("get_image", {"job_id": job.id, "wait_s": 0})
                assert lost.is_error and "interrupted" in lost.content[0].text  # type: ignore[union-attr]
            listed = {str(r.uri): r for r in (await client.list_resources()).resources}
            records = image_records(out)  # every record parses and points at a whole file
            assert {r.uri for r in records} <= set(listed)
            recovered = [r for r in records if Path(r.path).name == "20260101-000000_mid-save_KiLlEd.png"]
            assert len(recovered) == 1
            read = await client.read_resource(recovered[0].uri)
            assert read.contents[0].blob  # type: ignore[union-attr]
    assert not [p for p in out.rglob("*.mcpimg-partial")]


# --- the relay ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["module", "console script"])
def test_both_entry_points_serve_from_a_worker_outside_the_hosts_process_group(
    tmp_path: Path, entry: str, emulator: Any
) -> None:
    children = Path("/proc/self/task")
    if not children.is_dir():
        pytest.skip("needs /proc to find the worker")
    env = server_env(tmp_path, emulator("openai"))
    script = Path(sys.executable).parent / "mcp-imagegen"
    command = [sys.executable, "-m", "mcp_imagegen"] if entry == "module" else [str(script)]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(INIT).encode() + b"\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["result"]["serverInfo"]["name"] == "mcp-imagegen"
        [worker] = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert os.getpgid(worker) != os.getpgid(proc.pid)  # a group kill of the host's child misses it
        assert os.getsid(worker) == worker
        proc.stdin.close()
        assert proc.wait(60) == 0
        wait_for(lambda: process_gone(worker), "the worker to exit on end of input")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_stdio_worker_sigterm_finishes_sent_work(tmp_path: Path, gateway: Emulator) -> None:
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc to find the worker")
    env = server_env(tmp_path, gateway)
    host = StdioHost(tmp_path, env)
    try:
        start_calls(host, gateway, 2)
        [worker] = [int(p) for p in Path(f"/proc/{host.proc.pid}/task/{host.proc.pid}/children").read_text().split()]
        os.kill(worker, signal.SIGTERM)  # e.g. a service manager stopping it
        log = tmp_path / "server-stderr.log"
        wait_for(lambda: "SIGTERM received" in log.read_text(), "the worker to stop taking calls")
        gateway.release()
        jobs = assert_saved_equals_served(tmp_path / "out", gateway, expected=2)
        assert "2 image(s) saved" in log.read_text()
    finally:
        host.close()
    await assert_findable_from_a_new_server(tmp_path, env, jobs)


async def test_a_dead_stdout_never_crashes_the_server_and_loses_nothing(tmp_path: Path, gateway: Emulator) -> None:
    # The server alone (no relay), as a host that stopped reading would leave it: its answers
    # meet a broken pipe (EPIPE), the case that used to end in a BrokenPipe ExceptionGroup.
    env = {**server_env(tmp_path, gateway), "MCP_IMAGEGEN_STDIO_WORKER": "1"}
    host = StdioHost(tmp_path, env, reader=False)
    try:
        start_calls(host, gateway, 2)
        assert host.proc.stdout is not None
        host.proc.stdout.close()  # nobody reads the answers any more; stdin stays open
        gateway.release()
        jobs = assert_saved_equals_served(tmp_path / "out", gateway, expected=2)
        assert host.proc.wait(60) == 0
    finally:
        host.close()
    log = (tmp_path / "server-stderr.log").read_text()
    assert "Traceback" not in log and "ExceptionGroup" not in log, log[-3000:]
    await assert_findable_from_a_new_server(
        tmp_path, env={k: v for k, v in env.items() if k != "MCP_IMAGEGEN_STDIO_WORKER"}, jobs=jobs
    )


# --- start-up ---------------------------------------------------------------------------------------------

# The real command line, with heap.resume_collections watched: what the collector's state is when
# start-up ends, and after.
COLLECTIONS_PROBE = textwrap.dedent(
    """
    import gc, sys
    from mcp_imagegen import cli, heap

    resume = heap.resume_collections

    def watched():
        print(f"collections before resuming: {gc.isenabled()}", file=sys.stderr, flush=True)
        resume()
        print(f"collections after resuming: {gc.isenabled()}", file=sys.stderr, flush=True)

    heap.resume_collections = watched
    sys.exit(cli.main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_collections_pause_during_start_up_and_run_while_serving(
    tmp_path: Path, emulator: Any, transport: str
) -> None:
    env = server_env(tmp_path, emulator("openai"))
    command = [sys.executable, "-c", COLLECTIONS_PROBE, "serve", "--transport", transport]
    if transport == "http":
        command += ["--port", "0"]
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        if transport == "stdio":
            proc.stdin.write(json.dumps(INIT).encode() + b"\n")
            proc.stdin.flush()
            assert json.loads(proc.stdout.readline())["result"]["serverInfo"]["name"] == "mcp-imagegen"
            proc.stdin.close()
        else:
            said = b""
            while b"serving MCP" not in said:
                line = proc.stderr.readline()
                assert line, said.decode(errors="replace")
                said += line
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        assert code == 0 or transport == "http"  # a signal that early may end it as a signal does
        said_all = proc.stderr.read().decode(errors="replace")
        if transport == "http":
            said_all = said.decode() + said_all
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "collections before resuming: False" in said_all, said_all[-2000:]
    assert "collections after resuming: True" in said_all
