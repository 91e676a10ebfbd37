"""Concurrency: N concurrent `generate_image` calls against an emulator that takes 1 s per answer,
vs the same N direct parallel httpx2 calls (POST, base64-decode, write) to the same emulator.

Over streamable HTTP all N calls share one client session (one `Client`, one httpx2 pool: an
agent host multiplexes its tool calls this way); over stdio they necessarily share the one pipe.
The value is the wall time of the whole batch (median over rounds); 1.0x would mean the server
adds nothing to the slowest call.

The event-loop stall is what the server's own watchdog logs (at DEBUG) during the timed MCP
batches. Its baseline is the same watchdog in `bench/bare_http_server.py`, a bare `MCPServer` whose
tool only makes the direct call, during the same batches sent to it in the same rounds: the stall
that the SDK, uvicorn and httpx2 alone cause on this machine. As a black-box cross-check, after the timed rounds `bench/probe.py` (its own process)
sends a cheap MCP request every 10 ms to the same server while each HTTP scenario runs once more;
its longest round trip during that batch minus its idle median estimates the same stall (see
probe.py). The probe's 100 requests a second are load of their own, so they stay out of the timed
rounds. Stdio has one client by construction, so it gets no probe.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client

from .harness import (
    PYTHON,
    REGISTRY,
    REPO_ROOT,
    BenchContext,
    Budget,
    CpuTimes,
    EndpointSpec,
    ImageKind,
    LineReader,
    Metric,
    RatioMetric,
    Target,
    ToolCallFailed,
    call_generate,
    http_session,
    imagegen_stdio_args,
    median,
    p,
    read_cpu,
    start_bare_http_server,
    start_http_server,
    start_limited_emulator,
    stdio_server,
)

NAME = "concurrency"
LATENCY_S = 1.0
PROBE_INTERVAL_S = 0.01
PROBE_IDLE_S = 1.0
BATCH_TIMEOUT_S = 120.0
# The rate-limited gateway: serves this many requests at once (each in LATENCY_S), 429 beyond.
LIMITED_CAPACITY = 4
LIMITED_RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class Scenario:
    transport: str  # "http" | "stdio"
    n: int
    kind: ImageKind
    target_ratio: float | None
    full_only: bool = False
    rounds: int | None = None  # None: the run's default (1 quick, 5 full)

    @property
    def label(self) -> str:
        return f"{self.n}x {self.kind} over {self.transport}"


SCENARIOS = (
    Scenario("http", 8, "photo", 1.1),
    Scenario("http", 64, "flat", 1.2),
    Scenario("stdio", 8, "photo", 1.1),
    Scenario("http", 8, "flat", None, full_only=True),
    Scenario("http", 64, "photo", None, full_only=True, rounds=1),  # ~20 s: 200 MB of base64 each way
)


@dataclass
class CpuUse:
    """CPU a server used during its timed batches of one scenario."""

    calls: int = 0
    process_s: float = 0.0
    main_thread_s: float = 0.0

    def add(self, before: CpuTimes | None, after: CpuTimes | None, calls: int) -> None:
        if before is not None and after is not None:
            self.calls += calls
            self.process_s += after.process_s - before.process_s
            self.main_thread_s += after.main_thread_s - before.main_thread_s

    def per_call_ms(self) -> tuple[float, float] | None:
        """(whole process, main thread) in ms per call."""
        if not self.calls:
            return None
        return self.process_s * 1000 / self.calls, self.main_thread_s * 1000 / self.calls


async def _timed_batch(
    n: int, call: Callable[[], Coroutine[Any, Any, object]], pid: int, cpu: CpuUse
) -> tuple[float, float, float]:
    before = read_cpu(pid)
    timing = await _batch(n, call)
    cpu.add(before, read_cpu(pid), n)
    return timing


@dataclass
class Windows:
    """Time windows (CLOCK_MONOTONIC) of each scenario's MCP and direct batches."""

    mcp: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    direct: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    bare: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


async def _batch(n: int, call: Callable[[], Coroutine[Any, Any, object]]) -> tuple[float, float, float]:
    """Run `call` n times concurrently; (seconds, start, end) on the monotonic clock."""
    start = time.monotonic()
    with anyio.fail_after(BATCH_TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(call)
    end = time.monotonic()
    return end - start, start, end


class Probe:
    def __init__(self, url: str, log_path: str) -> None:
        self._err = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = REGISTRY.spawn(
            [PYTHON, "-m", "bench.probe", url, "--interval", str(PROBE_INTERVAL_S), "--max-seconds", "400"],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
        )
        assert self.proc.stdout is not None
        self.reader = LineReader(self.proc.stdout)
        self.reader.wait_for(lambda s: s == "READY", 60, alive=lambda: self.proc.poll() is None)

    def stop(self) -> list[tuple[float, float]]:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            line = self.reader.wait_for(lambda s: s.startswith("{"), 30, alive=lambda: self.proc.poll() is None)
            return [(float(a), float(b)) for a, b in json.loads(line)["samples"]]
        finally:
            REGISTRY.kill(self.proc)
            self._err.close()


def _in(windows: list[tuple[float, float]], t: float) -> bool:
    return any(a <= t <= b for a, b in windows)


async def run(ctx: BenchContext) -> list[Metric]:
    rounds = 1 if ctx.quick else 5  # a median of 5: the direct calls alone vary by ~5% between batches
    budget = Budget(60 if ctx.quick else 200)
    scenarios = [s for s in SCENARIOS if not (s.full_only and ctx.quick)]
    photo = ctx.emulators.get("photo", LATENCY_S)
    flat = ctx.emulators.get("flat", LATENCY_S)
    limited = start_limited_emulator(LIMITED_CAPACITY, LIMITED_RETRY_AFTER_S, LATENCY_S, ctx.api_key, ctx.workdir)
    ctx.log(f"concurrency: rate-limited emulator ({LIMITED_CAPACITY} at a time) at {limited.base_url}")
    urls = {"photo": photo.base_url, "flat": flat.base_url}
    config = ctx.config(
        "concurrency",
        [
            EndpointSpec("photo", photo.base_url),
            EndpointSpec("flat", flat.base_url),
            EndpointSpec("limited", limited.base_url),
        ],
    )
    # The server's event-loop watchdog (its log lines give the in-server stall) is on; the rest of
    # its logging stays at the default level.
    server = start_http_server(config, ctx.api_key, ctx.workdir, watchdog=True)
    ctx.log(f"concurrency: HTTP server at {server.url} (pid {server.pid})")
    bare = start_bare_http_server(urls, ctx.api_key, ctx.workdir, ctx.output_dir)
    ctx.log(f"concurrency: bare SDK HTTP server at {bare.url} (pid {bare.pid})")
    results: dict[str, tuple[list[float], list[float]]] = {}
    bare_times: dict[str, list[float]] = {}
    cpu: dict[str, CpuUse] = {}  # our HTTP server, per scenario
    bare_cpu: dict[str, CpuUse] = {}
    windows = Windows()
    probed = Windows()  # the extra batches run while the probe pings the server
    probe: Probe | None = None
    samples: list[tuple[float, float]] = []
    probe_error = ""
    probe_started = idle_until = 0.0
    direct = ctx.direct()
    limited_runs: list[LimitedRun] = []

    async def one_mcp(client: Client, s: Scenario) -> None:
        await call_generate(client, s.kind, 1)

    async def one_direct(s: Scenario) -> None:
        await direct.generate(urls[s.kind], 1)

    async def measure(s: Scenario, client: Client, bare_client: Client | None = None) -> None:
        mcp_times: list[float] = []
        direct_times: list[float] = []
        await _batch(s.n, lambda: one_mcp(client, s))  # warm-up: connections to the gateway, lazy imports
        if bare_client is not None:
            await _batch(s.n, lambda: one_mcp(bare_client, s))
        if not ctx.quick:
            await _batch(s.n, lambda: one_direct(s))
        for _ in range(s.rounds or rounds):
            if budget.expired and mcp_times:
                break
            if s.transport == "http":
                secs, a, b = await _timed_batch(
                    s.n, lambda: one_mcp(client, s), server.pid, cpu.setdefault(s.label, CpuUse())
                )
            else:
                secs, a, b = await _batch(s.n, lambda: one_mcp(client, s))
            mcp_times.append(secs)
            windows.mcp.setdefault(s.label, []).append((a, b))
            secs, a, b = await _batch(s.n, lambda: one_direct(s))
            direct_times.append(secs)
            windows.direct.setdefault(s.label, []).append((a, b))
            if bare_client is not None:
                secs, a, b = await _timed_batch(
                    s.n, lambda: one_mcp(bare_client, s), bare.pid, bare_cpu.setdefault(s.label, CpuUse())
                )
                bare_times.setdefault(s.label, []).append(secs)
                windows.bare.setdefault(s.label, []).append((a, b))
            ctx.clear_images()
        results[s.label] = (mcp_times, direct_times)
        ctx.log(
            f"concurrency {s.label}: mcp {[round(x, 2) for x in mcp_times]} s, "
            f"direct {[round(x, 2) for x in direct_times]} s"
        )

    try:
        async with http_session(server.url) as client, http_session(bare.url) as bare_client:
            # The scenarios with a target first, so that the informational ones (64 photos take
            # long on a busy machine) cannot use up the time budget of their rounds.
            for s in sorted(scenarios, key=lambda s: s.target_ratio is None):
                if s.transport == "http":
                    await measure(s, client, bare_client)
                elif s.transport == "stdio":
                    with ctx.errlog("concurrency-stdio") as errlog:
                        async with stdio_server(imagegen_stdio_args(), ctx.stdio_env(config), errlog) as stdio:
                            await measure(s, stdio.client)
            limited_runs = await _rate_limited(client, limited.base_url, 16 if ctx.quick else 32, ctx)
            # The probe's own requests load the server, so it pings during extra batches only:
            # the timed rounds above measure the calls alone.
            try:
                probe = Probe(server.url, str(ctx.workdir / "probe.stderr.log"))
            except (TimeoutError, RuntimeError) as exc:
                probe_error = f"probe did not start: {exc}"
                ctx.log(probe_error)
            if probe is not None:
                probe_started = time.monotonic()
                await anyio.sleep(PROBE_IDLE_S)  # idle samples: the server has nothing else to do
                idle_until = time.monotonic()
                for s in scenarios:
                    if s.transport == "http":
                        _, a, b = await _batch(s.n, lambda s=s: one_mcp(client, s))
                        probed.mcp.setdefault(s.label, []).append((a, b))
                        _, a, b = await _batch(s.n, lambda s=s: one_direct(s))
                        probed.direct.setdefault(s.label, []).append((a, b))
                        ctx.clear_images()
                samples = probe.stop()
                probe = None
    finally:
        if probe is not None:
            probe.stop()
        await direct.aclose()
        REGISTRY.kill(limited.proc)
        REGISTRY.kill(server.proc)
        REGISTRY.kill(bare.proc)
        ctx.clear_images()

    metrics: list[Metric] = []
    for s in scenarios:
        if s.label not in results:
            continue
        mcp_times, direct_times = results[s.label]
        session = "one shared session" if s.transport == "http" else "one stdio session"
        bare_note = ""
        if s.label in bare_times:
            bare_note = f"; the bare SDK server: median {median(bare_times[s.label]):.3f} s"
        metrics.append(
            Metric(
                f"concurrency {s.label}",
                median(mcp_times),
                "s",
                baseline=median(direct_times),
                baseline_label=f"{s.n} direct parallel httpx2",
                target=None if s.target_ratio is None else Target("ratio", s.target_ratio),
                notes=f"emulator latency {LATENCY_S:g}s; {session}; batch wall time, median of {len(mcp_times)}"
                + bare_note,
                details={"mcp_s": mcp_times, "direct_s": direct_times, "bare_sdk_s": bare_times.get(s.label)},
            )
        )
    metrics += _rate_limited_metrics(limited_runs)
    metrics += _watchdog_metrics(scenarios, windows, server.log, bare.log)
    metrics += _cpu_metrics(scenarios, cpu, bare_cpu)
    metrics += _loop_metrics(scenarios, samples, probed, probe_started, idle_until, probe_error)
    return metrics


@dataclass
class LimitedRun:
    label: str
    calls: int
    completed: int
    seconds: float
    rejected: int  # 429s the gateway sent during the batch
    peak: int  # most requests the gateway had at once
    errors: list[str]


async def _limited_stats(base_url: str, reset: bool = False) -> dict[str, int]:
    origin = base_url.removesuffix("/v1")
    async with httpx2.AsyncClient() as http:
        answer = await http.get(f"{origin}/_stats", params={"reset": "1"} if reset else None)
        answer.raise_for_status()
        stats: dict[str, int] = answer.json()
        return stats


async def _rate_limited(client: Client, base_url: str, calls: int, ctx: BenchContext) -> list[LimitedRun]:
    """Two batches of `calls` concurrent calls, over HTTP at the default settings, to a gateway that
    serves LIMITED_CAPACITY at once: the first meets a server that knows nothing of the limit yet,
    the second one that has learnt it."""
    runs: list[LimitedRun] = []
    for label in ("first batch", "next batch"):
        await _limited_stats(base_url, reset=True)
        errors: list[str] = []

        async def one(errors: list[str] = errors) -> None:
            try:
                await call_generate(client, "limited", 1)
            except ToolCallFailed as exc:
                errors.append(str(exc)[:200])

        secs, _, _ = await _batch(calls, one)
        stats = await _limited_stats(base_url)
        run = LimitedRun(label, calls, calls - len(errors), secs, stats["rejected"], stats["max_in_flight"], errors)
        ctx.log(f"concurrency rate-limited {label}: {run}")
        runs.append(run)
        ctx.clear_images()
    return runs


def _rate_limited_metrics(runs: list[LimitedRun]) -> list[Metric]:
    out: list[Metric] = []
    for run in runs:
        ideal = math.ceil(run.calls / LIMITED_CAPACITY) * LATENCY_S
        name = f"rate-limited gateway ({LIMITED_CAPACITY} at a time), {run.calls}x flat over http, {run.label}"
        notes = (
            f"{run.completed} of {run.calls} calls completed; the gateway sent {run.rejected} 429s "
            f"(Retry-After {LIMITED_RETRY_AFTER_S:g} s) and had at most {run.peak} requests at once; "
            f"emulator latency {LATENCY_S:g}s; one shared session"
        )
        out.append(
            Metric(
                name,
                run.seconds,
                "s",
                baseline=ideal,
                baseline_label=f"ideal schedule: {run.calls}/{LIMITED_CAPACITY} rounds of {LATENCY_S:g} s",
                notes=notes,
                details={"completed": run.completed, "calls": run.calls, "429s": run.rejected, "peak": run.peak},
                error=None if not run.errors else f"{len(run.errors)} calls failed: {run.errors[0]}; {notes}",
            )
        )
    return out


_STALL_LINE = re.compile(r"^(\S+)Z DEBUG\s+mcp_imagegen\.loop event loop stalled ms=([0-9.]+)(?: cpu_ms=([0-9.]+))?")


def _stalls(log: Path) -> list[tuple[float, float, float]]:
    """(when on the monotonic clock, ms, of which the loop's thread computed) per watchdog line."""
    # Log lines carry UTC wall-clock times; the batch windows are on the monotonic clock.
    offset = time.time() - time.monotonic()
    stalls: list[tuple[float, float, float]] = []
    for line in log.read_text(errors="replace").splitlines():
        match = _STALL_LINE.match(line)
        if match:
            at = datetime.fromisoformat(match.group(1)).replace(tzinfo=UTC).timestamp() - offset
            stalls.append((at, float(match.group(2)), float(match.group(3) or "nan")))
    return stalls


def _worst(stalls: list[tuple[float, float, float]], windows: list[tuple[float, float]]) -> tuple[int, float, float]:
    """(stalls inside the windows, the longest, its computing part)."""
    during = [(ms, cpu) for at, ms, cpu in stalls if _in(windows, at)]
    worst, worst_cpu = max(during, default=(0.0, 0.0))
    return len(during), worst, worst_cpu


def _watchdog_metrics(scenarios: list[Scenario], windows: Windows, log: Path, bare_log: Path) -> list[Metric]:
    """The longest stall the server's own watchdog logged inside each scenario's MCP batches,
    against the longest the bare SDK server's watchdog logged inside its batches of the same rounds."""
    ours, floor = _stalls(log), _stalls(bare_log)
    out: list[Metric] = []
    for s in scenarios:
        if s.transport != "http" or s.label not in windows.mcp:
            continue
        count, worst, worst_cpu = _worst(ours, windows.mcp[s.label])
        bare_count, bare_worst, bare_cpu = _worst(floor, windows.bare.get(s.label, []))
        measured_bare = s.label in windows.bare
        out.append(
            Metric(
                f"event-loop stall in server, {s.label}",
                worst,
                "ms",
                baseline=bare_worst if measured_bare else None,
                baseline_label="bare SDK server, same batches",
                # The scenarios carry the 50 ms target; the extra ones are information.
                target=Target("value", 50.0) if s.target_ratio is not None else None,
                notes=(
                    f"the server's watchdog (wakes every 5 ms, logs lateness over 10 ms at DEBUG): "
                    f"{count} stalls over 10 ms during the MCP batches, longest {worst:.0f} ms, of which "
                    f"the loop's thread computed {worst_cpu:.0f} ms (the rest it waited for a processor)"
                    + (
                        f"; bare SDK server (bench/bare_http_server.py): {bare_count} stalls over 10 ms, "
                        f"longest {bare_worst:.0f} ms, of which computing {bare_cpu:.0f} ms"
                        if measured_bare
                        else ""
                    )
                ),
                details={
                    "stalls_over_10ms": count,
                    "max_ms": worst,
                    "max_stall_cpu_ms": worst_cpu,
                    "bare_sdk_stalls_over_10ms": bare_count if measured_bare else None,
                    "bare_sdk_max_ms": bare_worst if measured_bare else None,
                    "bare_sdk_max_stall_cpu_ms": bare_cpu if measured_bare else None,
                },
            )
        )
    return out


def _cpu_metrics(scenarios: list[Scenario], cpu: dict[str, CpuUse], bare_cpu: dict[str, CpuUse]) -> list[Metric]:
    """CPU per call of the HTTP server (and of its event loop) against the bare SDK server's."""
    out: list[Metric] = []
    for s in scenarios:
        ours = cpu[s.label].per_call_ms() if s.label in cpu else None
        if ours is None:
            continue
        floor = bare_cpu[s.label].per_call_ms() if s.label in bare_cpu else None
        out.append(
            Metric(
                f"server CPU per call, {s.label}",
                ours[0],
                "ms",
                baseline=floor[0] if floor else None,
                baseline_label="bare SDK server, same batches",
                notes=(
                    f"user + system CPU of the server process over its timed batches, per call; of which "
                    f"the main thread (the event loop) {ours[1]:.2f} ms"
                    + (f"; bare SDK server {floor[0]:.2f} ms, of which main thread {floor[1]:.2f} ms" if floor else "")
                ),
                details={
                    "process_ms": ours[0],
                    "main_thread_ms": ours[1],
                    "bare_sdk_process_ms": floor[0] if floor else None,
                    "bare_sdk_main_thread_ms": floor[1] if floor else None,
                },
            )
        )
    return out


def _loop_metrics(
    scenarios: list[Scenario],
    samples: list[tuple[float, float]],
    windows: Windows,
    idle_from: float,
    idle_until: float,
    error: str,
) -> list[Metric]:
    idle = [lat for t, lat in samples if idle_from <= t <= idle_until]
    out: list[Metric] = []
    for s in scenarios:
        if s.transport != "http":
            continue
        name = f"probe round-trip stall, {s.label}"
        if not samples or not idle:
            out.append(Metric(name, None, "ms", error=error or "the probe recorded no samples"))
            continue
        during = [lat for t, lat in samples if _in(windows.mcp.get(s.label, []), t)]
        during_direct = [lat for t, lat in samples if _in(windows.direct.get(s.label, []), t)]
        idle_med = median(idle)
        if not during:
            out.append(Metric(name, None, "ms", error="no probe sample fell inside the MCP batches"))
            continue
        stall = (max(during) - idle_med) * 1000
        out.append(
            RatioMetric(
                name,
                stall,
                "ms",
                baseline=idle_med * 1000,
                baseline_label="probe idle median",
                notes=(
                    f"list_tools every {PROBE_INTERVAL_S * 1000:g} ms from another process: max {max(during) * 1000:.0f}"
                    f" ms, p99 {p(during, 0.99) * 1000:.0f} ms over {len(during)} probes minus idle median; "
                    f"max while only the direct calls ran (server idle, machine busy): "
                    f"{(max(during_direct) * 1000 if during_direct else float('nan')):.0f} ms"
                ),
                details={
                    "probe_max_ms": max(during) * 1000,
                    "probe_p99_ms": p(during, 0.99) * 1000,
                    "probe_p50_ms": median(during) * 1000,
                    "probes": len(during),
                    "idle_median_ms": idle_med * 1000,
                    "idle_samples": len(idle),
                    "direct_window_max_ms": max(during_direct) * 1000 if during_direct else None,
                },
            )
        )
    return out
