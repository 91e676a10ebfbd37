"""`mcp-imagegen doctor` explains each misconfiguration and never shows a key."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from mcp_imagegen.cli import main
from tests.conftest import SECRET_KEY


def configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("MCP_IMAGEGEN_CONFIG", str(path))


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["doctor", *args])
    out, err = capsys.readouterr()
    assert SECRET_KEY not in out + err
    return code, out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_setup_passes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = doctor(capsys)
    assert code == 0
    assert "offline" in out and "not an AI model" in out and "is writable" in out


def test_missing_key_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any, emulator: Any
) -> None:
    emu = emulator("modelmax", api_key=SECRET_KEY)
    configure(
        tmp_path, monkeypatch, f'[[endpoints]]\nname = "mm"\nprovider = "modelmax"\nbase_url = "{emu.base_url}"\n'
    )
    code, out = doctor(capsys)
    assert code == 1
    assert "[FAIL] endpoint mm: no key: $MODELMAX_API_KEY is not set" in out
    assert "hint: export MODELMAX_API_KEY=" in out


def test_wrong_key_is_reported_as_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any, emulator: Any
) -> None:
    emu = emulator("openai", api_key="sk-the-right-key-000000")
    configure(
        tmp_path,
        monkeypatch,
        f'[[endpoints]]\nname = "o"\nprovider = "openai"\nbase_url = "{emu.base_url}"\napi_key_env = "K"\n',
    )
    monkeypatch.setenv("K", SECRET_KEY)
    code, out = doctor(capsys)
    assert code == 1
    assert "refused the key" in out and "hint: check the value of $K" in out
    assert "[ok  ] endpoint o: key present in $K" in out


def test_unreachable_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    configure(tmp_path, monkeypatch, f'[[endpoints]]\nname = "gone"\nprovider = "llm-vin"\nbase_url = "{url}"\n')
    code, out = doctor(capsys)
    assert code == 1
    assert "[FAIL] endpoint gone:" in out and "not reachable" in out and "hint: check base_url" in out


def test_reachable_gateway_reports_latency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any, emulator: Any
) -> None:
    emu = emulator("nano-gpt", api_key=SECRET_KEY)
    configure(
        tmp_path,
        monkeypatch,
        f'[[endpoints]]\nname = "nano"\nprovider = "nano-gpt"\nbase_url = "{emu.base_url}"\napi_key_env = "K"\n',
    )
    monkeypatch.setenv("K", SECRET_KEY)
    code, out = doctor(capsys, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True
    reach = [c for c in report["checks"] if c["subject"] == "endpoint nano" and "answered" in c["detail"]]
    assert reach and reach[0]["detail"].endswith(" ms")


def test_output_dir_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MCP_IMAGEGEN_OUTPUT_DIR", str(blocker / "images"))
    code, out = doctor(capsys, "--offline")
    assert code == 1
    assert "[FAIL] output_dir:" in out and "MCP_IMAGEGEN_OUTPUT_DIR" in out


def test_broken_configuration_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    configure(tmp_path, monkeypatch, '[[endpoints]]\nname = "x"\nprovider = "dall-e"\n')
    code, out = doctor(capsys)
    assert code == 1
    assert "[FAIL] configuration:" in out and "endpoints[0].provider" in out and "'dall-e'" in out


def test_a_toml_syntax_error_gets_its_line_and_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    configure(tmp_path, monkeypatch, 'output_dir = "~/pics"\n[[endpoints]\nname = "x"\n')
    code, out = doctor(capsys)
    assert code == 1
    assert "[FAIL] configuration:" in out and "not valid TOML" in out
    [hint] = [line for line in out.splitlines() if "hint:" in line]
    assert "fix the syntax at line 2, column" in hint and str(tmp_path / "config.toml") in hint
    assert "named key" not in hint


def test_a_missing_configuration_file_names_the_path_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    missing = tmp_path / "nowhere" / "mcp-imagegen.toml"
    monkeypatch.setenv("MCP_IMAGEGEN_CONFIG", str(missing))
    code, out = doctor(capsys)
    assert code == 1
    [hint] = [line for line in out.splitlines() if "hint:" in line]
    assert f"create {missing}" in hint and "unset MCP_IMAGEGEN_CONFIG" in hint


def test_an_endpoint_without_its_key_is_not_contacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any, emulator: Any
) -> None:
    emu = emulator("nano-gpt", api_key=SECRET_KEY)
    configure(
        tmp_path,
        monkeypatch,
        f'[[endpoints]]\nname = "nano"\nprovider = "nano-gpt"\nbase_url = "{emu.base_url}"\n'
        'api_key_env = "NANOGPT_API_KEY"\n',
    )
    code, out = doctor(capsys)
    assert code == 1 and "no key: $NANOGPT_API_KEY is not set" in out
    assert emu.requests == []
