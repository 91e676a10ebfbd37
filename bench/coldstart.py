"""Cold start: spawn the server over stdio until `tools/list` is answered.

Compared with `bench/bare_server.py` (a bare `MCPServer` with one tool: the SDK's floor), runs
interleaved so that machine noise hits both alike. Also reports the import time of
`mcp_imagegen.server` in a fresh interpreter (vs `mcp.server.mcpserver`), and which heavy modules
a serving process has imported by the time it answered `tools/list` (from `-X importtime`).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import TextIO

import anyio
import anyio.to_thread

from .harness import (
    BENCH_DIR,
    PYTHON,
    REPO_ROOT,
    BenchContext,
    Budget,
    EndpointSpec,
    Metric,
    Target,
    median,
    stdio_server,
)

NAME = "coldstart"

# Modules worth loading lazily: a server that answers tools/list should not need them yet.
HEAVY_MODULES = (
    "PIL",
    "PIL.Image",
    "PIL.PngImagePlugin",
    "httpx2",
    "tomllib",
    "mcp_imagegen.manifests",
    "mcp_imagegen.catalog",
    "mcp_imagegen.service",
    "mcp_imagegen.results",
    "mcp_imagegen.images",
    "mcp_imagegen.gateway",
    "mcp_imagegen.store",
    "uvicorn",
    "starlette",
    "sse_starlette",
    "jsonschema",
)

_IMPORTTIME = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)")


async def _spawn_until_tools(args: list[str], env: dict[str, str], errlog: TextIO, expect: str) -> float:
    """Seconds from spawning `python ARGS` over stdio until its tools/list answer (which must list
    `expect`); the shutdown that follows is not counted."""
    t0 = time.perf_counter()
    async with stdio_server(args, env, errlog, read_timeout=60) as server:
        tools = await server.client.list_tools()
        elapsed = time.perf_counter() - t0
    names = [t.name for t in tools.tools]
    if expect not in names:
        raise RuntimeError(f"tools/list did not list {expect!r}: {names}")
    return elapsed


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, *args], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, check=False)


def _import_seconds(module: str) -> float:
    out = _python("-c", f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)")
    if out.returncode != 0:
        raise RuntimeError(f"import {module} failed: {out.stderr.strip()[-500:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _import_metric(runs: int) -> Metric:
    """Import time of mcp_imagegen.server vs the SDK's mcp.server.mcpserver, fresh interpreters."""
    ours: list[float] = []
    sdk: list[float] = []
    for _ in range(runs):  # interleaved, like the spawns
        ours.append(_import_seconds("mcp_imagegen.server"))
        sdk.append(_import_seconds("mcp.server.mcpserver"))
    sdk_table = parse_importtime(_python("-X", "importtime", "-c", "import mcp.server.mcpserver").stderr)
    table = parse_importtime(_python("-X", "importtime", "-c", "import mcp_imagegen.server").stderr)
    beyond = {m: v for m, v in table.items() if m not in sdk_table}
    beyond_ms = sum(s for s, _ in beyond.values()) / 1000
    top = sorted(((m, s) for m, (s, _) in beyond.items()), key=lambda x: -x[1])[:8]
    return Metric(
        "import mcp_imagegen.server",
        median(ours) * 1000,
        "ms",
        baseline=median(sdk) * 1000,
        baseline_label="import mcp.server.mcpserver",
        notes=(
            f"fresh interpreter, median of {len(ours)}; -X importtime: {len(beyond)} modules beyond the SDK's, "
            f"{beyond_ms:.0f} ms of their own: " + ", ".join(f"{m} {s / 1000:.1f}ms" for m, s in top[:5])
        ),
        details={"ours_s": ours, "sdk_s": sdk, "beyond_sdk_self_ms": beyond_ms, "beyond_sdk_top_us": top},
    )


def parse_importtime(text: str) -> dict[str, tuple[int, int]]:
    """module -> (self us, cumulative us) from `-X importtime` output."""
    modules: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        m = _IMPORTTIME.match(line)
        if m:
            modules[m.group(4)] = (int(m.group(1)), int(m.group(2)))
    return modules


async def run(ctx: BenchContext) -> list[Metric]:
    runs = 2 if ctx.quick else 7
    budget = Budget(30 if ctx.quick else 120)
    emu = ctx.emulators.get("flat", 0.0)  # the config must name a reachable endpoint
    env = ctx.stdio_env(ctx.config("coldstart", [EndpointSpec("emu", emu.base_url)]))
    ours_args = ["-m", "mcp_imagegen"]
    bare_args = [str(BENCH_DIR / "bare_server.py")]

    imagegen: list[float] = []
    bare: list[float] = []
    with ctx.errlog("coldstart") as errlog:
        # One unmeasured spawn of each first: the page cache then holds both interpreters' files.
        await _spawn_until_tools(ours_args, env, errlog, "generate_image")
        await _spawn_until_tools(bare_args, {}, errlog, "echo")
        for _ in range(runs):
            if budget.expired and imagegen:
                break
            imagegen.append(await _spawn_until_tools(ours_args, env, errlog, "generate_image"))
            bare.append(await _spawn_until_tools(bare_args, {}, errlog, "echo"))
    ctx.log(f"coldstart: imagegen {[round(x * 1000) for x in imagegen]} ms, bare {[round(x * 1000) for x in bare]} ms")
    metrics = [
        Metric(
            "cold start stdio -> tools/list",
            median(imagegen) * 1000,
            "ms",
            baseline=median(bare) * 1000,
            baseline_label="bare MCPServer",
            target=Target("ratio", 1.15),
            notes=(
                f"median of {len(imagegen)} spawns, interleaved with the bare server; "
                f"min {min(imagegen) * 1000:.0f} vs {min(bare) * 1000:.0f} ms"
            ),
            details={"imagegen_s": imagegen, "bare_s": bare},
        ),
        await anyio.to_thread.run_sync(_import_metric, 2 if ctx.quick else 5),
    ]

    # What a serving process has imported once it answered tools/list, beyond the bare server.
    with ctx.errlog("coldstart-importtime") as trace:
        await _spawn_until_tools(["-X", "importtime", *ours_args], env, trace, "generate_image")
    with ctx.errlog("coldstart-importtime-bare") as trace_bare:
        await _spawn_until_tools(["-X", "importtime", *bare_args], {}, trace_bare, "echo")
    loaded = parse_importtime(Path(trace.name).read_text(errors="replace"))
    bare_loaded = parse_importtime(Path(trace_bare.name).read_text(errors="replace"))
    ours_only = [m for m in HEAVY_MODULES if m in loaded and m not in bare_loaded]
    sdk_too = [m for m in HEAVY_MODULES if m in loaded and m in bare_loaded]
    lazy = [m for m in HEAVY_MODULES if m not in loaded]
    extra = sorted(set(loaded) - set(bare_loaded))
    extra_self_ms = sum(loaded[m][0] for m in extra) / 1000
    metrics.append(
        Metric(
            "heavy modules imported at start",
            float(len(ours_only)),
            "modules",
            notes=(
                f"beyond the bare server: {', '.join(ours_only) or 'none'} | also imported by the bare SDK "
                f"server: {', '.join(sdk_too) or 'none'} | lazy: {', '.join(lazy) or 'none'}; "
                f"{len(extra)} modules beyond the bare server, {extra_self_ms:.0f} ms of their own import time"
            ),
            details={
                "heavy_ours_only": ours_only,
                "heavy_sdk_too": sdk_too,
                "heavy_lazy": lazy,
                "mcp_imagegen_modules": sorted(m for m in loaded if m.startswith("mcp_imagegen")),
                "extra_modules": extra,
                "extra_self_ms": extra_self_ms,
            },
        )
    )
    return metrics
