"""Memory of the server process (stdio, as a desktop host runs it), read from /proc/<pid>/status.

- Peak RSS (VmHWM) while 8 concurrent calls each bring back a photo-like 1024x1024 PNG (~3 MB):
  a fresh server per scenario, so VmHWM is that scenario's peak.
- The same with 8 concurrent 4096x4096 results. OpenAI's gpt-image-1 (and so the emulator and the
  `openai` manifest) has no such size, so these go through a `provider = "openai-compatible"`
  endpoint (no size list) to `bench/big_emulator.py`. Flat images: a photo-like 4096 PNG would be
  ~48 MB of noise, which no gateway returns; a flat one is small on the wire but still 48 MiB of
  pixels when decoded, which is what the server's preview work pays for.
- Leak check: VmRSS after 200 sequential calls vs after 20 (photo-like 1024x1024). Its notes add
  the server's CPU per call (user + system, /proc) over the calls after the 20th: what glibc's
  handling of image-sized buffers costs shows there (mcp_imagegen/heap.py).

Baseline: the same server's VmRSS once it answered one small call (warm, idle). The notes add
VmRSS 3 s after each burst, once the server has handed freed memory back (mcp_imagegen/heap.py).
"""

from __future__ import annotations

import time

import anyio

from .harness import (
    MODEL,
    BenchContext,
    Budget,
    CpuTimes,
    EndpointSpec,
    Metric,
    Rss,
    StdioServer,
    Target,
    call_generate,
    children_maxrss_mib,
    imagegen_stdio_args,
    read_cpu,
    read_rss,
    stdio_server,
)

NAME = "memory"
LATENCY_S = 1.0  # long enough that the 8 answers arrive together
BIG_SIZE = "4096x4096"
PEAK_1024_MIB = 170.0
PEAK_4096_MIB = 600.0
LEAK_RATIO = 1.10
SETTLE_S = 3.0  # the server hands freed memory back after 2 s without a job


def _rss(server: StdioServer) -> Rss:
    if server.pid is None:
        raise RuntimeError("the stdio server's pid was not found")
    rss = read_rss(server.pid)
    if rss is None:
        fallback = children_maxrss_mib()
        return Rss(fallback, fallback)
    return rss


async def _peak(
    ctx: BenchContext,
    config_name: str,
    endpoints: list[EndpointSpec],
    endpoint: str,
    size: str,
    concurrent: int,
    last_endpoint_toml: str = "",
    model: str = MODEL,
) -> tuple[Rss, Rss, float, Rss]:
    """(warm idle, after the concurrent calls, seconds, SETTLE_S later) for a fresh server.

    `last_endpoint_toml` is appended to the configuration: tables for its last endpoint."""
    config = ctx.config(config_name, endpoints)
    if last_endpoint_toml:
        config.write_text(config.read_text() + last_endpoint_toml)
    with ctx.errlog(config_name) as errlog:
        async with stdio_server(imagegen_stdio_args(), ctx.stdio_env(config), errlog) as server:
            await call_generate(server.client, endpoint, 1, "1024x1024", model)
            idle = _rss(server)

            async def one() -> None:
                await call_generate(server.client, endpoint, 1, size, model)

            t0 = time.perf_counter()
            with anyio.fail_after(180):
                async with anyio.create_task_group() as tg:
                    for _ in range(concurrent):
                        tg.start_soon(one)
            elapsed = time.perf_counter() - t0
            after = _rss(server)
            await anyio.sleep(SETTLE_S)
            settled = _rss(server)
    ctx.clear_images()
    return idle, after, elapsed, settled


def _burst_details(idle: Rss, after: Rss, settled: Rss) -> dict[str, float]:
    return {
        "idle_rss_mib": idle.rss_mib,
        "hwm_mib": after.hwm_mib,
        "rss_after_mib": after.rss_mib,
        "rss_settled_mib": settled.rss_mib,
    }


async def run(ctx: BenchContext) -> list[Metric]:
    metrics: list[Metric] = []
    concurrent = 8

    # 1. 8 concurrent photo-like 1024x1024 results.
    photo = ctx.emulators.get("photo", LATENCY_S)
    idle, after, secs, settled = await _peak(
        ctx, "memory-photo", [EndpointSpec("photo", photo.base_url)], "photo", "1024x1024", concurrent
    )
    ctx.log(f"memory 8x photo 1024: idle {idle.rss_mib:.0f} MiB, peak {after.hwm_mib:.0f} MiB ({secs:.1f}s)")
    metrics.append(
        Metric(
            "peak RSS, 8 concurrent photo 1024x1024",
            after.hwm_mib,
            "MiB",
            baseline=idle.rss_mib,
            baseline_label="warm idle RSS",
            target=Target("value", PEAK_1024_MIB),
            notes=f"VmHWM of a fresh stdio server; batch took {secs:.1f}s; RSS after: {after.rss_mib:.0f} MiB, "
            f"{SETTLE_S:g} s later: {settled.rss_mib:.0f} MiB",
            details=_burst_details(idle, after, settled),
        )
    )

    # 2. 8 concurrent 4096x4096 results (flat) through an openai-compatible endpoint.
    big = ctx.emulators.get("flat", LATENCY_S, big=True)
    endpoints = [EndpointSpec("big", big.base_url, provider="openai-compatible", models=("gpt-image-1",))]
    # The gpt-image-1 family's sizes stop at 1536 px; this gateway takes more, as configured.
    override = f'[endpoints.model_overrides."gpt-image-1"]\nsizes = ["1024x1024", "2048x2048", "{BIG_SIZE}", "auto"]\n'
    idle, after, secs, settled = await _peak(
        ctx, "memory-big", endpoints, "big", BIG_SIZE, concurrent, override, model="gpt-image-1"
    )
    ctx.log(f"memory 8x flat 4096: idle {idle.rss_mib:.0f} MiB, peak {after.hwm_mib:.0f} MiB ({secs:.1f}s)")
    metrics.append(
        Metric(
            "peak RSS, 8 concurrent 4096x4096 (flat)",
            after.hwm_mib,
            "MiB",
            baseline=idle.rss_mib,
            baseline_label="warm idle RSS",
            target=Target("value", PEAK_4096_MIB),
            notes=f"openai-compatible endpoint -> bench/big_emulator.py; batch took {secs:.1f}s; "
            f"RSS after: {after.rss_mib:.0f} MiB, {SETTLE_S:g} s later: {settled.rss_mib:.0f} MiB",
            details=_burst_details(idle, after, settled),
        )
    )

    # 3. Leak check: RSS after many sequential calls vs after a few.
    total, early = (60, 20) if ctx.quick else (200, 20)
    budget = Budget(45 if ctx.quick else 120)
    fast = ctx.emulators.get("photo", 0.0)
    config = ctx.config("memory-leak", [EndpointSpec("photo", fast.base_url)])
    curve: list[tuple[int, float]] = []
    early_rss: float | None = None
    cpu_from: CpuTimes | None = None
    done = 0
    with ctx.errlog("memory-leak") as errlog:
        async with stdio_server(imagegen_stdio_args(), ctx.stdio_env(config), errlog) as server:
            for i in range(1, total + 1):
                if budget.expired:
                    break
                await call_generate(server.client, "photo", 1)
                done = i
                if i % 10 == 0:
                    curve.append((i, _rss(server).rss_mib))
                    ctx.clear_images()
                if i == early:
                    early_rss = _rss(server).rss_mib
                    cpu_from = read_cpu(server.pid) if server.pid else None
            late = _rss(server)
            cpu_to = read_cpu(server.pid) if server.pid else None
    cpu_ms = None
    if cpu_from and cpu_to and done > early:
        cpu_ms = (cpu_to.process_s - cpu_from.process_s) * 1000 / (done - early)
    ctx.clear_images()
    ctx.log(f"memory leak check: {early_rss} MiB after {early}, {late.rss_mib:.0f} MiB after {done}")
    complete = done == total
    metrics.append(
        Metric(
            f"RSS after {done} calls vs after {early}",
            late.rss_mib,
            "MiB",
            baseline=early_rss,
            baseline_label=f"RSS after {early} calls",
            target=Target("ratio", LEAK_RATIO),
            notes="sequential photo 1024x1024, emulator latency 0"
            + ("" if cpu_ms is None else f"; server CPU per call after the {early}th: {cpu_ms:.1f} ms")
            + ("" if complete else f"; stopped at {done} of {total} calls by the time budget"),
            details={"curve_mib": curve, "calls": done, "peak_hwm_mib": late.hwm_mib, "server_cpu_ms_per_call": cpu_ms},
        )
    )
    return metrics
