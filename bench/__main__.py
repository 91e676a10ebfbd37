"""Run the benchmark suite: `python -m bench [--quick] [--only NAME[,NAME]]`.

Prints a table (metric | value | baseline | ratio | target | pass/fail) and writes
bench/results/latest.json with the machine it ran on. Exit status: 0 when every metric with a
target passed, 1 when one failed or a measurement could not run, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import anyio

from . import coldstart, concurrency, memory, overhead
from .harness import (
    REGISTRY,
    BenchContext,
    Metric,
    failed_metric,
    machine_info,
    make_context,
)

MODULES: dict[str, ModuleType] = {m.NAME: m for m in (coldstart, overhead, concurrency, memory)}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "s":
        text = f"{value:.3f}"
    elif abs(value) >= 100 or unit in ("modules",):
        text = f"{value:.0f}"
    else:
        text = f"{value:.1f}"
    return f"{text} {unit}".strip()


def format_table(metrics: list[Metric]) -> str:
    header = ("metric", "value", "baseline", "ratio", "target", "pass/fail")
    rows: list[tuple[str, ...]] = [header]
    for m in metrics:
        if m.error is not None:
            rows.append((m.name, "ERROR", "-", "-", m.target.describe(m.unit) if m.target else "-", "FAIL"))
            continue
        ratio = m.ratio
        passed = m.passed
        rows.append(
            (
                m.name,
                _fmt(m.value, m.unit),
                _fmt(m.baseline, m.baseline_unit or m.unit) if m.baseline is not None else "-",
                f"{ratio:.2f}x" if ratio is not None and not math.isnan(ratio) else "-",
                m.target.describe(m.unit) if m.target else "info",
                "-" if passed is None else ("pass" if passed else "FAIL"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1])] + [row[-1]]
        lines.append(" | ".join(cells))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def format_notes(metrics: list[Metric]) -> str:
    out = []
    for m in metrics:
        text = m.error if m.error is not None else m.notes
        extra = f" (baseline: {m.baseline_label})" if m.baseline_label and m.error is None else ""
        if text or extra:
            out.append(f"- {m.name}{extra}: {text}")
    return "\n".join(out)


async def _run_all(ctx: BenchContext, names: list[str]) -> tuple[list[Metric], dict[str, Any]]:
    metrics: list[Metric] = []
    timings: dict[str, Any] = {}
    for name in names:
        module = MODULES[name]
        run: Callable[[BenchContext], Awaitable[list[Metric]]] = module.run
        _log(f"== {name}")
        t0 = time.monotonic()
        try:
            metrics += await run(ctx)
        except Exception as exc:  # noqa: BLE001 (one measurement failing must not hide the others)
            _log(f"{name} failed: {exc!r}")
            tb = traceback.format_exc()
            (ctx.workdir / f"{name}.traceback.txt").write_text(tb)
            metrics.append(failed_metric(name, f"{type(exc).__name__}: {str(exc)[:300]}"))
            timings[f"{name}_traceback"] = tb
        timings[name] = round(time.monotonic() - t0, 1)
        _log(f"== {name} done in {timings[name]:.0f}s")
    return metrics, timings


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run under ~90 s")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(MODULES)}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "latest.json", help="where to write the JSON")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and configs of the run")
    args = parser.parse_args(argv)
    names = list(MODULES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in MODULES]
        if unknown:
            parser.error(f"unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    machine = machine_info()
    ctx = make_context(args.quick, _log)
    _log(f"mcp-imagegen bench ({'quick' if args.quick else 'full'}): {', '.join(names)}; workdir {ctx.workdir}")
    started = time.time()
    t0 = time.monotonic()
    try:
        metrics, timings = anyio.run(_run_all, ctx, names)
    except KeyboardInterrupt as exc:
        _log(f"interrupted ({exc or 'Ctrl-C'}): every process the run started is being stopped")
        return 130
    finally:
        ctx.emulators.close()
        REGISTRY.kill_all()
        if not args.keep_workdir:
            shutil.rmtree(ctx.workdir, ignore_errors=True)
    duration = time.monotonic() - t0

    print()
    print(format_table(metrics))
    print()
    print(format_notes(metrics))
    failed = [m for m in metrics if m.passed is False]
    print()
    print(
        f"{len(metrics)} metrics, {sum(1 for m in metrics if m.passed)} passed, {len(failed)} failed "
        f"in {duration:.0f}s on {machine['cpu_model']} x{machine['cpu_count']}, Python {machine['python']}"
    )

    report = {
        "mode": "quick" if args.quick else "full",
        "measurements": names,
        "started_unix": started,
        "duration_s": round(duration, 1),
        "module_seconds": {k: v for k, v in timings.items() if not k.endswith("_traceback")},
        "machine": machine,
        "metrics": [m.to_json() for m in metrics],
        "tracebacks": {k: v for k, v in timings.items() if k.endswith("_traceback")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    if args.keep_workdir:
        print(f"logs and configs kept in {ctx.workdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
