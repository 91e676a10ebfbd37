"""The README's reference tables are kept in step with the code they describe.

When a setting or a manifest changes, these tests fail and print the table to paste.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from mcp_imagegen.config import EndpointConfig, OAuthScopes, OAuthSettings, Settings, SpendingSettings, StorageSettings
from mcp_imagegen.manifests import available_providers, load_manifest
from mcp_imagegen.models import CAPABILITIES
from mcp_imagegen.resolution import resolve

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _default(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "`{}`" if isinstance(field.default_factory(), dict) else "`[]`"  # type: ignore[call-arg]
    value = field.default
    if value is None:
        return "-"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def settings_table() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.exclude or name in ("endpoints", "oauth", "spending", "storage"):  # tables documented in their own sections
            continue
        rows.append(f"| `{name}` | {_default(Settings, name)} | {field.description} |")
    rows.append("| `[[endpoints]]` | see below | one table per gateway endpoint |")
    for name, field in EndpointConfig.model_fields.items():
        if field.exclude:
            continue
        rows.append(f"| `endpoints.{name}` | {_default(EndpointConfig, name)} | {field.description} |")
    return "\n".join(rows)


def gateways_table() -> str:
    rows = [
        "| provider | gateway | default model | generate | edit | mask | several inputs | discovery | key variable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for provider in available_providers():
        m = load_manifest(provider)
        # What the models the manifest knows can do (resolved with their families), shut-down
        # ones aside; a gateway that takes any id can do what any model there does.
        known = [m.default_model] if m.default_model else []
        beliefs = [resolve(i, m) for i in dict.fromkeys([*known, *(model.id for model in m.models)])]
        caps = {c for b in beliefs if not b.shut_down() for c in b.spec.capabilities or ()}
        if m.unknown_models is not None:
            caps |= set(CAPABILITIES)
        mark = {True: "yes", False: "-"}
        rows.append(
            f"| `{m.id}` | {m.name} | {f'`{m.default_model}`' if m.default_model else 'discovered'} | "
            f"{mark['generate' in caps]} | {mark['edit' in caps]} | "
            f"{mark['mask' in caps]} | {mark['multi_image' in caps]} | {mark[m.discovery is not None]} | "
            f"{f'`{m.key_env}`' if m.key_env else '-'} |"
        )
    return "\n".join(rows)


def test_configuration_reference_matches_the_settings_model() -> None:
    table = settings_table()
    assert table in README, "README's configuration table is out of date; expected:\n" + table


def test_serving_a_team_documents_every_team_setting() -> None:
    section = README.split("## Serving a team", 1)[1].split("\n## ", 1)[0]
    keys = [name for name in OAuthSettings.model_fields if name != "scopes"] + [f"scopes.{n}" for n in OAuthScopes.model_fields]
    for key in keys + list(SpendingSettings.model_fields) + list(StorageSettings.model_fields):
        assert f"`{key}`" in section, f"README's 'Serving a team' does not describe the setting {key}"


def test_gateway_table_matches_the_manifests() -> None:
    table = gateways_table()
    assert table in README, "README's gateway table is out of date; expected:\n" + table


def test_readme_opens_with_the_two_commands() -> None:
    blocks = README.split("```bash\n")
    assert "pip install . && mcp-imagegen generate" in blocks[1]
    assert "pip install '.[test]' && python -m pytest" in blocks[2]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install '.[test]' && python -m pytest" in ci


# --- the first ten minutes: every command works as written, from a clone ---------------------------

CLONE_COMMAND = "/path/to/mcp-imagegen/.venv/bin/mcp-imagegen"
PYPI_MARK = "first release on PyPI"


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def installed_command() -> str:
    """The `mcp-imagegen` that `pip install .` put beside this Python: what CLONE_COMMAND names."""
    script = Path(sys.executable).parent / ("mcp-imagegen.exe" if os.name == "nt" else "mcp-imagegen")
    assert script.is_file(), f"{script} is missing: install the project (pip install -e '.[test]') first"
    return str(script)


def server_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and not k.startswith("MCP_IMAGEGEN_")}
    return {**env, "MCP_IMAGEGEN_OUTPUT_DIR": str(tmp_path / "out"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}


def test_readme_names_the_four_tools() -> None:
    intro = README[: README.index("## Quickstarts")]
    assert "Four tools" in intro
    for tool in ("generate_image", "edit_image", "get_image", "list_models"):
        assert f"`{tool}`" in intro
    assert "three tools" not in README.lower()


def test_readme_points_only_at_files_in_the_repository() -> None:
    named = set(re.findall(r"`((?:manifests|scripts|tests|bench|mcp_imagegen)/[\w./-]+)`", README))
    named |= {link for link in re.findall(r"\]\(([^)#:]+)\)", README)}
    assert named, "expected the README to name some files"
    for path in named - {"bench/results/latest.json", "tests/artifacts/"}:  # (written by the bench and the browser tests)
        assert (ROOT / path).exists(), f"README names {path}, which is not in the repository"
    assert "design notes" not in README.lower()


def test_quickstarts_lead_with_a_form_that_works_from_a_clone() -> None:
    quick = section("Quickstarts")
    for block in code_blocks(quick, "json") + code_blocks(quick, "bash") + code_blocks(quick, "python"):
        assert '["mcp-imagegen"]' not in block.replace(" ", "") or PYPI_MARK in block, block
        assert "uvx mcp-imagegen" not in block and "pip install mcp-imagegen" not in block, block
    # Every PyPI form in the prose says it is for after the first release.
    for found in re.finditer(r"uvx mcp-imagegen|pip install mcp-imagegen|\[\"mcp-imagegen\"\]", quick):
        before = quick[max(0, found.start() - 250) : found.start()]
        assert PYPI_MARK in before or "PyPI" in quick[found.start() - 80 : found.start()], quick[
            found.start() - 250 : found.end()
        ]


def client_configurations() -> list[tuple[str, dict[str, Any]]]:
    """(client, server entry) for every JSON configuration in the quickstarts."""
    found = []
    quick = section("Quickstarts")
    for client in re.findall(r"\n### (.+)\n", quick):
        part = quick.split(f"\n### {client}\n", 1)[1].split("\n### ", 1)[0]
        for block in code_blocks(part, "json"):
            config = json.loads(block)
            servers = config.get("mcpServers") or config.get("servers")
            found.extend((client, entry) for entry in servers.values())
    return found


def test_every_client_configuration_is_json_naming_the_clone_command() -> None:
    configs = client_configurations()
    assert {client for client, _ in configs} == {"Claude Desktop", "Cursor", "VS Code"}
    for client, entry in configs:
        assert entry["command"] == CLONE_COMMAND, client


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_client_configurations_start_a_working_server(tmp_path: Path, anyio_backend: str) -> None:
    import anyio
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    for client, entry in client_configurations():
        env = {k: ("" if "${" in v else v) for k, v in entry.get("env", {}).items()}  # the client fills these
        params = StdioServerParameters(
            command=entry["command"].replace(CLONE_COMMAND, installed_command()),
            args=entry.get("args", []),
            env={**server_env(tmp_path), **env},
        )
        with anyio.fail_after(60), (tmp_path / "stderr.log").open("a") as errlog:
            async with Client(stdio_client(params, errlog=errlog)) as session:
                tools = {t.name for t in (await session.list_tools()).tools}
        assert tools == {"generate_image", "edit_image", "get_image", "list_models"}, client


def test_the_sdk_stdio_snippet_runs(tmp_path: Path) -> None:
    [snippet] = [b for b in code_blocks(section("Quickstarts"), "python") if "StdioServerParameters(" in b]
    script = tmp_path / "agent.py"
    script.write_text(snippet.replace(CLONE_COMMAND, installed_command()))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=server_env(tmp_path)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'images'" in done.stdout and "'endpoint': 'offline'" in done.stdout


def test_the_http_quickstart_runs(tmp_path: Path) -> None:
    quick = section("Quickstarts")
    [command] = [b.strip() for b in code_blocks(quick, "bash") if "--transport http" in b]
    [snippet] = [b for b in code_blocks(quick, "python") if "streamable_http_client" in b]
    # Port 0: the server binds a free port itself and says which (no race for a port picked here).
    command = command.replace(CLONE_COMMAND, installed_command()).replace("--port 8000", "--port 0")
    server = subprocess.Popen(
        ["bash", "-c", f"exec env {command}"],  # (env: runs `VAR=value cmd` as the shell would)
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=server_env(tmp_path),
    )
    try:
        assert server.stderr is not None
        said = b""
        while b"serving MCP" not in said:  # the server says where it listens once it does
            line = server.stderr.readline()
            assert line, f"server exited: {said.decode()}"
            said += line
        found = re.search(rb"http://127\.0\.0\.1:(\d+)/mcp", said)
        assert found is not None, said.decode()
        port = found.group(1).decode()
        script = tmp_path / "agent.py"
        script.write_text(snippet.replace("8000", port))
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=server_env(tmp_path)
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "'models'" in done.stdout and "'offline'" in done.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
