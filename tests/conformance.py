"""Run the official MCP conformance scenarios that apply to this server:

    python -m tests.conformance [--npx npx] [--keep-output DIR]

Starts `mcp-imagegen serve --transport http --port 0` on 127.0.0.1 (offline endpoint, images in a
temporary folder), runs each scenario of the `@modelcontextprotocol/conformance` npm package against
its URL, prints one line per scenario and exits non-zero if any failed. Needs Node.js 22 or later
(the package uses `fs.globSync`) and npm's registry for `npx`; the default test run does not.

The package's other server scenarios call fixture tools, prompts and resources of its reference
server (`test_simple_text`, `test://static-text`, ...) or features this server does not offer
(completions, sampling, elicitation), so they do not apply.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

PACKAGE = "@modelcontextprotocol/conformance@0.1.16"
SCENARIOS = (
    "server-initialize",
    "ping",
    "logging-set-level",
    "tools-list",
    "resources-list",
    "server-sse-multiple-streams",
    "dns-rebinding-protection",
)


def _start_server(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "MCP_IMAGEGEN_OUTPUT_DIR": str(workdir / "images")}
    for name in ("MCP_IMAGEGEN_CONFIG", "MCP_IMAGEGEN_AUTH_TOKEN"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_imagegen", "serve", "--transport", "http", "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # the server says where it listens once it does
        found = re.search(r"at (http://\S+/mcp);", line)
        if found:
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stderr or ()], daemon=True).start()
            return proc, found[1]
    raise SystemExit(f"the server exited before listening (status {proc.wait()})")


def _checks(output: Path) -> list[dict[str, object]]:
    return [c for f in sorted(output.glob("*/checks.json")) for c in json.loads(f.read_text())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--npx", default="npx", help="the npx to run the package with (default: %(default)s)")
    parser.add_argument("--keep-output", type=Path, help="folder for the scenarios' checks.json files")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mcp-imagegen-conformance-") as tmp:
        workdir = Path(tmp)
        proc, url = _start_server(workdir)
        failed: list[str] = []
        try:
            for scenario in SCENARIOS:
                output = (args.keep_output or workdir / "results") / scenario
                done = subprocess.run(
                    [args.npx, "--yes", PACKAGE, "server", "--url", url, "--scenario", scenario, "-o", str(output)],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                checks = _checks(output)
                bad = [c for c in checks if c.get("status") == "FAILURE"]
                ok = done.returncode == 0 and checks and not bad
                print(f"{'pass' if ok else 'FAIL'}  {scenario}  ({len(checks) - len(bad)}/{len(checks)} checks)")
                if not ok:
                    failed.append(scenario)
                    for check in bad:
                        print(f"      {check.get('id')}: {check.get('errorMessage')}")
                    if not checks:
                        print("      " + (done.stderr or done.stdout).strip().replace("\n", "\n      ")[-1500:])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{len(SCENARIOS) - len(failed)} of {len(SCENARIOS)} scenarios passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
