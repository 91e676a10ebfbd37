"""Shared machinery of the benchmark suite: results, processes, emulators, servers, clients.

Everything the suite starts is a subprocess in its own process group (emulators, HTTP servers,
probes; stdio servers are started by the MCP SDK, also in their own session) so that client,
server and gateway never share a GIL, and `ProcessRegistry.kill_all` can end every one of them.
Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import json
import os
import platform
import queue
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TextIO

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
PYTHON = sys.executable
HOST = "127.0.0.1"

MODEL = "gpt-image-2"  # a live model: the benchmark measures the server, not the model world
SIZE = "1024x1024"
PROMPT = "a lighthouse on a cliff at dusk, benchmark run"
KEY_ENV = "BENCH_KEY"
MIB = 1024 * 1024

# The streamable-HTTP client's default cap on one SSE event is 1 MiB; a generate result with an
# inline preview can be larger. None lifts it so the benchmark measures speed, not that limit
# (the limit itself is reported by `overhead` through the result sizes it records).
SSE_EVENT_LIMIT: int | None = None

ImageKind = Literal["photo", "flat"]


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Target:
    """A pass/fail rule: `on` the metric's value or its ratio to the baseline, at most `limit`."""

    on: Literal["value", "ratio"]
    limit: float

    def check(self, metric: Metric) -> bool | None:
        subject = metric.value if self.on == "value" else metric.ratio
        return None if subject is None else subject <= self.limit

    def describe(self, unit: str) -> str:
        if self.on == "ratio":
            return f"ratio <= {self.limit:g}x"
        return f"<= {self.limit:g} {unit}".rstrip()


@dataclass
class Metric:
    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""  # what the baseline is, e.g. "direct httpx2"
    baseline_unit: str | None = None  # defaults to `unit`
    target: Target | None = None
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def passed(self) -> bool | None:
        if self.error is not None:
            return False
        return None if self.target is None else self.target.check(self)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = (
            None
            if self.target is None
            else {"on": self.target.on, "limit": self.target.limit, "text": self.target.describe(self.unit)}
        )
        data["ratio"] = self.ratio
        data["passed"] = self.passed
        data["baseline_unit"] = self.baseline_unit or self.unit
        return data


@dataclass
class RatioMetric(Metric):
    """A metric whose ratio is not value/baseline but given (e.g. mcp time / direct time while the
    value shown is the added milliseconds)."""

    given_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        return self.given_ratio


def failed_metric(name: str, error: str) -> Metric:
    return Metric(name=name, value=None, unit="", error=error)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# ---------------------------------------------------------------------------------------------
# The machine


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = round(int(line.split()[1]) / 1024 / 1024, 1)
    versions: dict[str, str | None] = {}
    for dist in ("mcp", "httpx2", "pillow", "mcp-imagegen", "pydantic", "anyio", "starlette", "uvicorn"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        commit = out.stdout.strip() or None
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "mem_total_gib": mem_total,
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": commit,
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------------------------
# Memory of a process


@dataclass(frozen=True)
class Rss:
    rss_mib: float  # VmRSS: resident now
    hwm_mib: float  # VmHWM: the peak resident set since the process started


def read_rss(pid: int) -> Rss | None:
    """VmRSS/VmHWM of `pid` from /proc, or None where /proc is not available (not Linux)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    if "VmRSS" not in values:
        return None
    return Rss(values["VmRSS"], values.get("VmHWM", values["VmRSS"]))


@dataclass(frozen=True)
class CpuTimes:
    process_s: float  # user + system, every thread
    main_thread_s: float  # user + system of the main thread: the event loop's, in the servers


def read_cpu(pid: int) -> CpuTimes | None:
    """CPU time used so far by `pid` and by its main thread, from /proc (None without /proc)."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(stat_path: str) -> float:
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)

    try:
        return CpuTimes(used(f"/proc/{pid}/stat"), used(f"/proc/{pid}/task/{pid}/stat"))
    except (OSError, IndexError, ValueError):
        return None


def children_maxrss_mib() -> float:
    """Fallback without /proc: the largest peak RSS among waited-for children (ru_maxrss)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / MIB


def child_pids(parent: int | None = None) -> set[int]:
    """Direct children of `parent` (default: this process), from /proc."""
    parent = os.getpid() if parent is None else parent
    pids: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{parent}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(x) for x in (task / "children").read_text().split())
    return pids


# ---------------------------------------------------------------------------------------------
# Processes


class ProcessRegistry:
    """Every subprocess the suite starts, so that all of them are ended on any exit."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []
        self._extra_pgids: set[int] = set()
        self._lock = threading.Lock()

    def spawn(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        text: bool = True,
    ) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(
            list(args), env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, text=text, start_new_session=True
        )
        with self._lock:
            self._procs.append(proc)
        return proc

    def adopt_group(self, pid: int) -> None:
        """Remember a process group started by someone else (the SDK's stdio servers)."""
        with self._lock:
            self._extra_pgids.add(pid)

    def release_group(self, pid: int) -> None:
        with self._lock:
            self._extra_pgids.discard(pid)

    def kill(self, proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
        kill_group(proc, grace)
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)

    def kill_all(self) -> None:
        with self._lock:
            procs, self._procs = self._procs, []
            pgids, self._extra_pgids = self._extra_pgids, set()
        for proc in procs:
            kill_group(proc, 2.0)
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


def kill_group(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM to the process group, SIGKILL after `grace` seconds, then reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # The group may outlive its leader (a worker thread's child); kill it regardless.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(2.0)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


REGISTRY = ProcessRegistry()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {HOST}:{port} within {timeout:g}s")


class LineReader:
    """Drains a text pipe on a thread so the child never blocks on a full pipe."""

    def __init__(self, stream: IO[str], keep: int = 200) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self._keep = keep
        self.tail: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[str]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in stream:
                self.lines.put(line.rstrip("\n"))
                self.tail.append(line.rstrip("\n"))
                del self.tail[: -self._keep]

    def wait_for(
        self, predicate: Callable[[str], bool], timeout: float, alive: Callable[[], bool] | None = None
    ) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no expected line within {timeout:g}s; last lines: {self.tail[-5:]}")
            try:
                line = self.lines.get(timeout=min(0.2, remaining))
            except queue.Empty:
                if alive is not None and not alive():
                    raise RuntimeError(f"process exited; last lines: {self.tail[-5:]}") from None
                continue
            if predicate(line):
                return line


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# ---------------------------------------------------------------------------------------------
# Gateway emulators (tests/emulators), each in its own process


@dataclass
class EmulatorProc:
    kind: ImageKind
    latency_s: float
    big: bool  # bench/big_emulator.py: gpt-image-1 also at 2048x2048 and 4096x4096
    proc: subprocess.Popen[str]
    base_url: str
    log: Path


class EmulatorPool:
    """OpenAI-dialect emulators keyed by (image kind, latency, big), started on first use."""

    def __init__(self, workdir: Path, api_key: str, log: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.api_key = api_key
        self._log = log
        self._emulators: dict[tuple[str, float, bool], EmulatorProc] = {}

    def get(self, kind: ImageKind, latency_s: float, big: bool = False) -> EmulatorProc:
        key = (kind, latency_s, big)
        emu = self._emulators.get(key)
        if emu is not None and emu.proc.poll() is None:
            return emu
        emu = start_emulator(kind, latency_s, self.api_key, self.workdir, big=big)
        self._log(
            f"emulator {kind}{' big' if big else ''} latency={latency_s:g}s at {emu.base_url} (pid {emu.proc.pid})"
        )
        self._emulators[key] = emu
        return emu

    def close(self) -> None:
        for emu in self._emulators.values():
            REGISTRY.kill(emu.proc)
        self._emulators.clear()


def start_emulator(
    kind: ImageKind, latency_s: float, api_key: str, workdir: Path, *, big: bool = False, timeout: float = 45.0
) -> EmulatorProc:
    program = ["bench.big_emulator"] if big else ["tests.emulators", "openai"]
    port = free_port()
    log = workdir / f"emulator-{kind}-{latency_s:g}-{port}.log"
    options = ["--latency", f"{latency_s:g}", "--image", kind, "--api-key", api_key]
    proc, base_url = _spawn_emulator([*program, "--port", str(port), *options], log, timeout)
    return EmulatorProc(kind, latency_s, big, proc, base_url, log)


def start_limited_emulator(
    capacity: int, retry_after_s: float, latency_s: float, api_key: str, workdir: Path, timeout: float = 45.0
) -> EmulatorProc:
    """`bench/limited_emulator.py`: serves `capacity` requests at once, 429 + Retry-After beyond."""
    port = free_port()
    log = workdir / f"emulator-limited-{capacity}-{port}.log"
    args = ["bench.limited_emulator", "--port", str(port), "--capacity", str(capacity)]
    args += ["--retry-after", f"{retry_after_s:g}", "--latency", f"{latency_s:g}", "--api-key", api_key]
    proc, base_url = _spawn_emulator(args, log, timeout)
    return EmulatorProc("flat", latency_s, False, proc, base_url, log)


def _spawn_emulator(args: list[str], log: Path, timeout: float) -> tuple[subprocess.Popen[str], str]:
    with open(log, "w") as errfile:
        proc = REGISTRY.spawn(
            [PYTHON, "-m", *args], cwd=REPO_ROOT, env=_clean_env(), stdout=subprocess.PIPE, stderr=errfile
        )
    assert proc.stdout is not None
    reader = LineReader(proc.stdout)
    try:
        line = reader.wait_for(lambda s: s.startswith("READY"), timeout, alive=lambda: proc.poll() is None)
    except (TimeoutError, RuntimeError) as exc:
        REGISTRY.kill(proc)
        raise RuntimeError(f"emulator did not start: {exc}\n{tail(log)}") from None
    return proc, line.split(maxsplit=1)[1].strip().rstrip("/")


# ---------------------------------------------------------------------------------------------
# Server configuration


@dataclass(frozen=True)
class EndpointSpec:
    """One endpoint of a benchmark configuration: only what a user must write (name, provider,
    base URL, key variable). Every other setting stays at its default, as a user gets it."""

    name: str
    base_url: str
    provider: str = "openai"
    models: tuple[str, ...] | None = None


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string for these values


def write_config(path: Path, output_dir: Path, endpoints: Iterable[EndpointSpec]) -> Path:
    lines = [f"output_dir = {_toml_str(str(output_dir))}", ""]
    for ep in endpoints:
        lines += [
            "[[endpoints]]",
            f"name = {_toml_str(ep.name)}",
            f"provider = {_toml_str(ep.provider)}",
            f"base_url = {_toml_str(ep.base_url)}",
            f"api_key_env = {_toml_str(KEY_ENV)}",
        ]
        if ep.models is not None:
            lines.append("models = [" + ", ".join(_toml_str(m) for m in ep.models) + "]")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


_DROPPED_ENV = ("MCP_IMAGEGEN_OUTPUT_DIR", "MCP_IMAGEGEN_AUTH_TOKEN", "MCP_IMAGEGEN_CONFIG")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def server_env(config: Path, api_key: str, full: bool = False) -> dict[str, str]:
    """The server's environment: the whole (cleaned) environment when `full`, else only what the
    SDK's stdio client adds to its safe defaults."""
    extra = {"MCP_IMAGEGEN_CONFIG": str(config), KEY_ENV: api_key}
    # glibc's own malloc variables reach every server: with any set, the server leaves malloc as
    # given, so `MALLOC_ARENA_MAX=16 python -m bench` measures glibc's defaults.
    extra.update({k: v for k, v in os.environ.items() if k.startswith("MALLOC_")})
    return {**_clean_env(), **extra} if full else extra


# ---------------------------------------------------------------------------------------------
# MCP servers and clients


@dataclass
class StdioServer:
    client: Client
    pid: int | None  # the server process, found as the new child of this process


@contextlib.asynccontextmanager
async def stdio_server(
    args: Sequence[str], env: dict[str, str], errlog: TextIO, read_timeout: float = 300.0
) -> AsyncIterator[StdioServer]:
    """An MCP client over stdio to `python ARGS`, spawned by the SDK as a real host does."""
    before = child_pids()
    params = StdioServerParameters(command=PYTHON, args=list(args), env=env, cwd=str(REPO_ROOT))
    client = Client(stdio_client(params, errlog=errlog), cache=None, read_timeout_seconds=read_timeout)
    async with client:
        new = sorted(child_pids() - before)
        pid = new[-1] if new else None
        groups = []
        if pid is not None:
            groups.append(pid)  # the SDK starts it in its own session: pgid == pid
            # On POSIX that process is the stdio relay; the server is its child, in a session
            # of its own (and answered `initialize`, so it runs by now). Measure the server.
            worker = sorted(child_pids(pid))
            if worker:
                pid = worker[-1]
                groups.append(pid)
        for group in groups:
            REGISTRY.adopt_group(group)
        try:
            yield StdioServer(client, pid)
        finally:
            for group in groups:
                REGISTRY.release_group(group)


def imagegen_stdio_args() -> list[str]:
    return ["-m", "mcp_imagegen"]


@dataclass
class HttpServer:
    proc: subprocess.Popen[str]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_http_server(
    config: Path, api_key: str, workdir: Path, timeout: float = 45.0, watchdog: bool = False
) -> HttpServer:
    """The server over streamable HTTP at its default settings; `watchdog` turns on its event-loop
    watchdog alone (`bench/watched_server.py`), not DEBUG logging."""
    port = free_port()
    program = "bench.watched_server" if watchdog else "mcp_imagegen"
    args = [PYTHON, "-m", program, "serve", "--transport", "http", "--host", HOST, "--port", str(port)]
    return _start_http(args, server_env(config, api_key, full=True), port, workdir / f"server-http-{port}.log", timeout)


def start_bare_http_server(
    gateways: dict[str, str], api_key: str, workdir: Path, output_dir: Path, timeout: float = 45.0
) -> HttpServer:
    """`bench/bare_http_server.py`: the bare-SDK floor for the event-loop stall."""
    port = free_port()
    env = {
        **_clean_env(),
        "BARE_GATEWAYS": json.dumps(gateways),
        "BARE_API_KEY": api_key,
        "BARE_OUTPUT_DIR": str(output_dir),
    }
    args = [PYTHON, "-m", "bench.bare_http_server", str(port)]
    return _start_http(args, env, port, workdir / f"bare-http-{port}.log", timeout)


def _start_http(args: list[str], env: dict[str, str], port: int, log: Path, timeout: float) -> HttpServer:
    with open(log, "w") as errfile:
        proc = REGISTRY.spawn(args, cwd=REPO_ROOT, env=env, stdout=errfile, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, timeout)
    except (TimeoutError, RuntimeError) as exc:
        REGISTRY.kill(proc)
        raise RuntimeError(f"HTTP server did not start: {exc}\n{tail(log)}") from None
    return HttpServer(proc, f"http://{HOST}:{port}/mcp", log)


def http_client_for_mcp(max_connections: int = 256) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        timeout=httpx2.Timeout(30, read=300),
        limits=httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


@contextlib.asynccontextmanager
async def http_session(url: str) -> AsyncIterator[Client]:
    """One MCP client session over streamable HTTP (callers may share it concurrently)."""
    async with http_client_for_mcp() as http:
        transport = streamable_http_client(url, http_client=http, max_sse_event_size=SSE_EVENT_LIMIT)
        async with Client(transport, cache=None, read_timeout_seconds=300) as client:
            yield client


def generate_args(endpoint: str, n: int = 1, size: str = SIZE, model: str = MODEL) -> dict[str, Any]:
    return {"prompt": PROMPT, "model": model, "endpoint": endpoint, "n": n, "size": size}


class ToolCallFailed(RuntimeError):
    pass


def check_result(result: CallToolResult, n: int) -> CallToolResult:
    if result.is_error:
        text = " ".join(getattr(c, "text", "") for c in result.content)[:500]
        raise ToolCallFailed(f"generate_image returned an error: {text}")
    images = (result.structured_content or {}).get("images") if isinstance(result.structured_content, dict) else None
    if images is not None and len(images) != n:
        raise ToolCallFailed(f"expected {n} images, got {len(images)}: {str(result.structured_content)[:300]}")
    return result


def result_inline_bytes(result: CallToolResult) -> int:
    """Bytes of base64 data inlined in a result's content blocks (previews, full images)."""
    total = 0
    for block in result.content:
        data = getattr(block, "data", None)
        if isinstance(data, str):
            total += len(data)
        resource_ = getattr(block, "resource", None)
        blob = getattr(resource_, "blob", None)
        if isinstance(blob, str):
            total += len(blob)
    return total


async def call_generate(
    client: Client, endpoint: str, n: int = 1, size: str = SIZE, model: str = MODEL
) -> CallToolResult:
    result = await client.call_tool("generate_image", generate_args(endpoint, n, size, model))
    return check_result(result, n)


# ---------------------------------------------------------------------------------------------
# The baseline: what a caller minimally does without MCP


class DirectCaller:
    """POST /images/generations with httpx2, base64-decode each image, write it to a file."""

    def __init__(self, api_key: str, out_dir: Path, max_connections: int = 256) -> None:
        self.api_key = api_key
        self.out_dir = out_dir
        self.http = httpx2.AsyncClient(
            timeout=httpx2.Timeout(30, read=300),
            limits=httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def generate(self, base_url: str, n: int = 1, size: str = SIZE) -> None:
        body = {"model": MODEL, "prompt": PROMPT, "n": n, "size": size}
        response = await self.http.post(
            f"{base_url}/images/generations", json=body, headers={"Authorization": f"Bearer {self.api_key}"}
        )
        response.raise_for_status()
        items = response.json()["data"]
        if len(items) != n:
            raise RuntimeError(f"direct call: expected {n} images, got {len(items)}")
        for item in items:
            data = base64.b64decode(item["b64_json"])
            (self.out_dir / f"direct-{secrets.token_hex(6)}.png").write_bytes(data)

    async def aclose(self) -> None:
        await self.http.aclose()


# ---------------------------------------------------------------------------------------------
# The run's shared state


@dataclass
class BenchContext:
    quick: bool
    workdir: Path
    api_key: str
    emulators: EmulatorPool
    log: Callable[[str], None]
    output_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.output_dir = self.workdir / "images"
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def config(self, name: str, endpoints: Iterable[EndpointSpec]) -> Path:
        return write_config(self.workdir / f"{name}.toml", self.output_dir, endpoints)

    def stdio_env(self, config: Path) -> dict[str, str]:
        return server_env(config, self.api_key)

    def errlog(self, name: str) -> TextIO:
        return open(self.workdir / f"{name}.stderr.log", "a")  # closed by the caller

    def clear_images(self) -> None:
        """Generated files pile up (hundreds of MiB over a run): drop them between measurements."""
        for path in self.output_dir.rglob("*"):
            if path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()

    def direct(self) -> DirectCaller:
        out = self.output_dir / "direct"
        out.mkdir(exist_ok=True)
        return DirectCaller(self.api_key, out)


def make_context(quick: bool, log: Callable[[str], None]) -> BenchContext:
    workdir = Path(tempfile.mkdtemp(prefix="mcp-imagegen-bench-"))
    api_key = "sk-bench-" + secrets.token_hex(8)
    return BenchContext(
        quick=quick, workdir=workdir, api_key=api_key, emulators=EmulatorPool(workdir, api_key, log), log=log
    )


class Budget:
    """A wall-clock allowance that bounds a measurement loop in time (its count bounds it too)."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    @property
    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())
