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


def test_edit_reads_the_files_a_person_names_wherever_they_are(tmp_path: Path) -> None:
    made = cli("generate", "a house", "--size", "200x200", "--quiet")
    source = made.stdout.strip()
    # Outside the output folder and the working directory: the allowed-roots fence is for paths
    # agents send through the tools, not for files named at the keyboard.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mask = elsewhere / "mask.png"
    Image.new("L", (200, 200), 0).save(mask)
    done = cli("edit", "add snow", source, "--mask", str(mask), "--quiet")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_file()


def test_edit_names_a_missing_file(tmp_path: Path) -> None:
    made = cli("generate", "a house", "--size", "64x64", "--quiet")
    done = cli("edit", "add snow", made.stdout.strip(), "--mask", str(tmp_path / "no-such-mask.png"), "--quiet")
    assert done.returncode == 1
    assert "no-such-mask.png" in done.stderr and "does not exist" in done.stderr
    assert "allowed" not in done.stderr and "Traceback" not in done.stderr


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


# --- the command line as a person expects it ---------------------------------------------------


def _all_parsers() -> list[Any]:
    import argparse

    from mcp_imagegen.cli import _parser

    top = _parser()
    parsers = [top]
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers.extend(action.choices.values())
    return parsers


def test_every_option_is_described_and_defaults_are_shown() -> None:
    for parser in _all_parsers():
        for action in parser._actions:
            if action.option_strings:
                assert action.help, f"{parser.prog} {action.option_strings} has no help text"
    generate_help = cli("generate", "--help").stdout
    assert "how many images (default: 1)" in " ".join(generate_help.split())
    for argv in (["--help"], ["serve", "--help"]):
        serve_help = " ".join(cli(*argv).stdout.split())
        assert "(default: stdio)" in serve_help and "(default: 8000)" in serve_help, argv
        assert "(default: 127.0.0.1)" in serve_help and "(default: None)" not in serve_help, argv


def test_log_level_works_after_the_command_too() -> None:
    before = cli("--log-level", "INFO", "generate", "a fox", "--quiet")
    after = cli("generate", "a fox", "--quiet", "--log-level", "info")
    for done in (before, after):
        assert done.returncode == 0, done.stderr
        assert " INFO " in done.stderr and "generated 1 image(s)" in done.stderr


def test_a_bad_log_level_in_the_environment_is_refused_with_the_valid_ones() -> None:
    done = cli("models", env={"MCP_IMAGEGEN_LOG_LEVEL": "verbose"})
    assert done.returncode == 2 and done.stdout == ""
    assert "MCP_IMAGEGEN_LOG_LEVEL='verbose'" in done.stderr
    assert "DEBUG, INFO, WARNING, ERROR" in done.stderr


@pytest.mark.parametrize(
    ("extra", "expected"),
    [("{bad", "not valid JSON (Expecting property name"), ("[1, 2]", "must be a JSON object")],
)
def test_extra_that_is_not_a_json_object_is_explained(extra: str, expected: str) -> None:
    done = cli("generate", "x", "--extra", extra)
    assert done.returncode == 2
    assert "argument --extra" in done.stderr and expected in done.stderr
    assert "invalid loads value" not in done.stderr


def test_errors_name_the_command_not_the_tool() -> None:
    done = cli("generate", "x", "--model", "no-such-model")
    assert done.returncode == 1
    assert "mcp-imagegen models" in done.stderr and "list_models" not in done.stderr


def test_a_refused_key_says_http_401_once(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("nano-gpt", api_key=SECRET_KEY)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[[endpoints]]\nname = "nano"\nprovider = "nano-gpt"\nbase_url = "{emu.base_url}"\napi_key_env = "K"\n'
    )
    done = cli("generate", "a fox", "--quiet", env={"MCP_IMAGEGEN_CONFIG": str(config), "K": "sk-wrong-0000000000"})
    assert done.returncode == 1
    assert "$K" in done.stderr and done.stderr.count("HTTP 401") == 1
    assert "sk-wrong-0000000000" not in done.stderr


def test_nothing_is_sent_to_an_endpoint_whose_key_is_missing(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("nano-gpt", api_key=SECRET_KEY)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[[endpoints]]\nname = "nano"\nprovider = "nano-gpt"\nbase_url = "{emu.base_url}"\n'
        'api_key_env = "NANOGPT_API_KEY"\n'
    )
    env = {"MCP_IMAGEGEN_CONFIG": str(config)}
    for argv in (["models"], ["generate", "a fox"], ["generate", "a fox", "--model", "gpt-image-1"], ["doctor"]):
        done = cli(*argv, env=env)
        assert done.returncode == 1, (argv, done.stderr)
        assert "NANOGPT_API_KEY" in done.stdout + done.stderr, argv
    assert emu.requests == []  # not even the key-less model discovery


def _read_stderr_until(proc: subprocess.Popen[bytes], marker: bytes, timeout_s: float = 30) -> bytes:
    """stderr of a running process up to the line holding `marker` (a thread reads, so a silent
    process cannot hang the test past `timeout_s`)."""
    import queue
    import threading

    lines: queue.Queue[bytes] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in iter(proc.stderr.readline, b""):
            lines.put(line)
        lines.put(b"")

    threading.Thread(target=read, daemon=True).start()
    seen = b""
    while True:
        line = lines.get(timeout=timeout_s)
        seen += line
        if marker in line or not line:
            return seen


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("transport", "path"), [("http", "/mcp"), ("sse", "/sse")])
def test_serve_over_the_network_says_where_it_listens(transport: str, path: str) -> None:
    import re

    import httpx2

    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_imagegen", "serve", "--transport", transport, "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        said = _read_stderr_until(proc, b"serving MCP").decode()
        found = re.search(r"at (http://127\.0\.0\.1:(\d+)(/\w+));", said)
        assert found, said
        assert found[3] == path and "Ctrl+C" in said
        # The URL it printed is where it answers.
        with httpx2.Client(timeout=30) as http:
            answer = http.post(found[1], json={}, headers={"Accept": "application/json, text/event-stream"})
        assert answer.status_code < 500
    finally:
        _stop(proc)


def test_serve_stdio_on_a_terminal_says_it_waits_for_an_mcp_client() -> None:
    import pty

    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_imagegen"],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    os.close(terminal)
    try:
        said = _read_stderr_until(proc, b"waiting for an MCP client").decode()
        assert "stdin/stdout" in said and "Ctrl+C" in said
    finally:
        os.close(controller)
        _stop(proc)
    assert proc.stdout is not None and proc.stdout.read() == b""  # stdout stays the protocol's


def test_serve_stdio_from_a_client_prints_nothing_extra(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mcp_imagegen"],
        input=b"",
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert done.stdout == b"" and b"waiting for an MCP client" not in done.stderr
