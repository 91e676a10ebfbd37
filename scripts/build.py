"""Build what is released: the wheel, the sdist and the MCP Bundle (.mcpb), into dist/.

    python scripts/build.py [--out dist] [--bundle-only]

The wheel and sdist come from the project's own build backend (hatchling, as pyproject.toml
declares), installed by pip into a temporary folder the way `pip install .` does; no build tool
has to be installed first. The bundle is a zip of `manifests/manifest.json` (as `manifest.json`
at the top) and what `uv run --directory <bundle> python -m mcp_imagegen` needs: pyproject.toml,
README.md (pyproject names it), the package and the provider manifests. Claude Desktop installs a
.mcpb by opening it (or through Settings > Extensions); its `uv` server type needs `uv` on the
machine. `npx @anthropic-ai/mcpb pack` (the official packer) makes the same bundle from a folder
with the same files; this script needs only Python.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLE_MANIFEST = ROOT / "manifests" / "manifest.json"
# The files `uv run` needs to install and start the server from an unpacked bundle.
BUNDLE_FILES = ("pyproject.toml", "README.md")
BUNDLE_TREES = (("mcp_imagegen", "*.py"), ("mcp_imagegen", "*.html"), ("manifests", "*.toml"))


def bundle_members(root: Path = ROOT) -> dict[str, Path]:
    """Name inside the bundle -> file to put there (manifest.json first)."""
    members = {"manifest.json": root / "manifests" / "manifest.json"}
    for name in BUNDLE_FILES:
        members[name] = root / name
    for folder, pattern in BUNDLE_TREES:
        for path in sorted((root / folder).rglob(pattern)):
            if "__pycache__" not in path.parts:
                members[path.relative_to(root).as_posix()] = path
    return members


def build_bundle(out: Path, root: Path = ROOT) -> Path:
    manifest = json.loads((root / "manifests" / "manifest.json").read_text(encoding="utf-8"))
    target = out / f"{manifest['name']}-{manifest['version']}.mcpb"
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, path in bundle_members(root).items():
            bundle.write(path, name)
    return target


def build_packages(out: Path, root: Path = ROOT) -> list[Path]:
    """The wheel and the sdist, built by the backend pyproject.toml names (PEP 517)."""
    import tomllib

    system = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    with tempfile.TemporaryDirectory(prefix="mcp-imagegen-build-") as backend_dir:
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--target", backend_dir, *system["requires"]]
        subprocess.run(pip, check=True)
        hooks = (
            "import sys, importlib\n"
            f"backend = importlib.import_module({system['build-backend']!r})\n"
            "backend.build_sdist(sys.argv[1])\n"
            "backend.build_wheel(sys.argv[1])\n"
        )
        env = {**os.environ, "PYTHONPATH": backend_dir}
        subprocess.run([sys.executable, "-c", hooks, str(out.resolve())], check=True, cwd=root, env=env)
    return sorted(set(out.iterdir()) - before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/build.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    parser.add_argument("--bundle-only", action="store_true", help="only the .mcpb (no network needed)")
    args = parser.parse_args(argv)
    built = [] if args.bundle_only else build_packages(args.out)
    built.append(build_bundle(args.out))
    for path in built:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
