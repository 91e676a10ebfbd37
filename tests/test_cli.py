"""The command line, run as a user runs it: a real process, stdout and stderr kept apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import SECRET_KEY

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mcp_imagegen", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_generate_offline_prints_each_path_and_progress_on_stderr(tmp_path: Path) -> None:
    out_dir = tmp_path / "pics"
    done = cli("generate", "a red fox", "--n", "2", "--size", "256x128", "--out", str(out_dir))
    assert done.returncode == 0, done.stderr
    paths = done.stdout.splitlines()
    assert len(paths) == 2
    for line in paths:
        path = Path(line)
        assert path.parent == out_dir and path.suffix == ".png"
        with Image.open(path) as im:
            assert im.size == (256, 128)
    assert "[2/2]" in done.stderr


def test_generate_json_is_the_structured_result(tmp_path: Path) -> None:
    done = cli("generate", "a boat", "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["endpoint"] == "offline" and result["model"] == "offline"
    [image] = result["images"]
    assert set(image) >= {"uri", "path", "mime_type", "width", "height", "bytes"}
    assert image["uri"].startswith("imagegen://images/")
    assert done.stderr == ""


def test_edit_takes_a_path_and_a_mask(tmp_path: Path) -> None:
    made = cli("generate", "a house", "--size", "200x200", "--quiet")
    source = made.stdout.strip()
    mask = tmp_path / "mask.png"
    Image.new("L", (200, 200), 0).save(mask)
    (tmp_path / "cwd").mkdir()
    done = cli(
        "edit",
        "add snow",
        source,
        "--mask",
        str(mask),
        "--quiet",
        env={"MCP_IMAGEGEN_OUTPUT_DIR": str(Path(source).parent)},
    )
    # The mask sits outside the output folder and the working directory: refused by name.
    assert done.returncode == 1
    assert "mask.png" in done.stderr and "allowed" in done.stderr
    inside = Path(source).parent / "mask.png"
    Image.new("L", (200, 200), 0).save(inside)
    done = cli("edit", "add snow", source, "--mask", str(inside), "--quiet")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_file()


def test_failure_exits_non_zero_with_the_error_on_stderr() -> None:
    done = cli("generate", "x", "--size", "99999x2")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "size" in done.stderr and "4096" in done.stderr


def test_models_table_and_json() -> None:
    table = cli("models")
    assert table.returncode == 0
    header, row = table.stdout.splitlines()[:2]
    assert header.split() == ["ENDPOINT", "MODEL", "CAPABILITIES", "SIZES", "MAX", "N"]
    assert row.split()[:2] == ["offline", "offline"]
    data = json.loads(cli("models", "--json").stdout)
    assert data["models"][0]["capabilities"] == ["generate", "edit", "mask", "multi_image"]


def test_gateway_calls_are_logged_one_line_each_without_secrets(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("nano-gpt", api_key=SECRET_KEY)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[[endpoints]]\nname = "nano"\nprovider = "nano-gpt"\nbase_url = "{emu.base_url}"\napi_key_env = "K"\n'
    )
    env = {"MCP_IMAGEGEN_CONFIG": str(config), "K": SECRET_KEY}
    done = cli("--log-level", "INFO", "generate", "a fox", "--model", "hidream", "--n", "2", "--quiet", env=env)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "gateway call" in line]
    assert len(lines) == 1
    for field in ("endpoint=nano", "model=hidream", "status=200", "ms=", "bytes=", "retries=0"):
        assert field in lines[0]
    assert SECRET_KEY not in done.stderr + done.stdout
    assert "iVBOR" not in done.stderr  # no image data in logs

    quiet = cli("generate", "a fox", "--model", "hidream", "--quiet", env={**env, "MCP_IMAGEGEN_LOG_LEVEL": "ERROR"})
    assert "gateway call" not in quiet.stderr


def test_bad_configuration_is_reported_with_the_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[[endpoints]]\nname = 'a'\nprovider = 'openai'\ntimeout_s = 'soon'\n")
    done = cli("generate", "x", env={"MCP_IMAGEGEN_CONFIG": str(config)})
    assert done.returncode == 2
    assert str(config) in done.stderr and "endpoints[0].timeout_s" in done.stderr


@pytest.mark.parametrize("argv", [["--version"], ["serve", "--help"]])
def test_version_and_help(argv: list[str]) -> None:
    done = cli(*argv)
    assert done.returncode == 0 and "mcp-imagegen" in done.stdout


def test_public_bind_without_a_token_is_refused_cleanly() -> None:
    done = cli("serve", "--transport", "http", "--host", "0.0.0.0", "--port", "0", timeout=30)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "token" in done.stderr.lower()
