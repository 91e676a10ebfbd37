"""Added time per call: `generate_image` through a real MCP client over stdio, against the same
request sent directly with httpx2 (POST /v1/images/generations, base64-decode, write the file:
what a caller minimally does without the server).

Both go to the same emulator process (latency 0, so the gateway's own time is the same small
constant in both) with warm connections. MCP and direct calls alternate so that drift in machine
load falls on both alike. Reported per scenario: added ms per image = (mcp - direct) / n.
"""

from __future__ import annotations

import time

from .harness import (
    BenchContext,
    Budget,
    EndpointSpec,
    ImageKind,
    Metric,
    RatioMetric,
    Target,
    call_generate,
    imagegen_stdio_args,
    median,
    result_inline_bytes,
    stdio_server,
)

NAME = "overhead"

TARGET_MS: dict[str, float] = {"photo": 60.0, "flat": 15.0}
SCENARIOS: tuple[tuple[ImageKind, int], ...] = (("photo", 1), ("photo", 4), ("flat", 1), ("flat", 4))


async def run(ctx: BenchContext) -> list[Metric]:
    reps = 5 if ctx.quick else 10
    warmup = 1 if ctx.quick else 2
    budget = Budget(40 if ctx.quick else 120)
    photo = ctx.emulators.get("photo", 0.0)
    flat = ctx.emulators.get("flat", 0.0)
    urls = {"photo": photo.base_url, "flat": flat.base_url}
    config = ctx.config("overhead", [EndpointSpec("photo", photo.base_url), EndpointSpec("flat", flat.base_url)])
    metrics: list[Metric] = []
    direct = ctx.direct()
    try:
        with ctx.errlog("overhead") as errlog:
            async with stdio_server(imagegen_stdio_args(), ctx.stdio_env(config), errlog) as server:
                client = server.client
                # The first call pays for lazy imports and connection setup: report it, then warm up.
                t0 = time.perf_counter()
                await call_generate(client, "flat", 1)
                first_call_ms = (time.perf_counter() - t0) * 1000
                for kind, n in SCENARIOS:
                    for _ in range(warmup):
                        await call_generate(client, kind, n)
                        await direct.generate(urls[kind], n)
                    mcp_s: list[float] = []
                    direct_s: list[float] = []
                    inline = 0
                    for _ in range(reps):
                        if budget.expired and mcp_s:
                            break
                        t0 = time.perf_counter()
                        result = await call_generate(client, kind, n)
                        mcp_s.append(time.perf_counter() - t0)
                        inline = result_inline_bytes(result)
                        t0 = time.perf_counter()
                        await direct.generate(urls[kind], n)
                        direct_s.append(time.perf_counter() - t0)
                    ctx.clear_images()
                    mcp_ms, direct_ms = median(mcp_s) * 1000, median(direct_s) * 1000
                    added = (mcp_ms - direct_ms) / n
                    ctx.log(
                        f"overhead {kind} n={n}: mcp {mcp_ms:.1f} ms, direct {direct_ms:.1f} ms, "
                        f"added {added:.1f} ms/image, inline {inline / 1024:.0f} KiB"
                    )
                    metrics.append(
                        RatioMetric(
                            f"added per image, {kind} n={n} (stdio)",
                            added,
                            "ms",
                            baseline=direct_ms,
                            baseline_label="direct httpx2 call",
                            target=Target("value", TARGET_MS[kind]),
                            given_ratio=mcp_ms / direct_ms if direct_ms else None,
                            notes=f"mcp call {mcp_ms:.1f} ms vs direct {direct_ms:.1f} ms, median of {len(mcp_s)}; "
                            f"result inlines {inline / 1024:.0f} KiB of base64",
                            details={"mcp_s": mcp_s, "direct_s": direct_s, "inline_b64_bytes": inline, "n": n},
                        )
                    )
    finally:
        await direct.aclose()
        ctx.clear_images()
    metrics.append(
        Metric(
            "first generate_image call (stdio, flat)",
            first_call_ms,
            "ms",
            notes="includes lazy imports and the first gateway connection",
        )
    )
    return metrics
