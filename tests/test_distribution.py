"""Distribution metadata: the MCP Registry server.json, the MCPB manifest and the Claude Desktop snippet.

Each document is checked twice: against the published JSON schema it claims (copies in
tests/schemas/, see the README there), and against this project (name, version and key variables
from pyproject.toml and the server's configuration contract). Every check is a function that
returns a list of problems, so the negative tests below can show each one failing on a broken copy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator
from jsonschema.validators import validator_for

from mcp_imagegen.config import WELL_KNOWN_KEY_ENVS

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).resolve().parent / "schemas"

# The variables that hold gateway keys, as the server reads them (its configuration contract).
KEY_ENVS = tuple(key for key, _ in WELL_KNOWN_KEY_ENVS.values())
# Non-secret variables of the configuration contract that server.json documents.
PLAIN_ENVS = ("OPENAI_BASE_URL", "MCP_IMAGEGEN_OUTPUT_DIR", "MCP_IMAGEGEN_CONFIG", "MCP_IMAGEGEN_LOG_LEVEL")
TOOLS = ("generate_image", "edit_image", "get_image", "list_models")

REGISTRY_SCHEMA_FILE = SCHEMAS / "server.schema.2025-12-11.json"
REGISTRY_SCHEMA_URL = "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json"
# sha256 of the published file at REGISTRY_SCHEMA_URL; moving to a newer schema changes both.
REGISTRY_SCHEMA_SHA256 = "3fba09590c99f61735d234822279f4223fab9e300c0a81e81c91ab62a4114de0"
MCPB_SCHEMA_FILE = SCHEMAS / "mcpb-manifest-v0.4.schema.json"
MCPB_MANIFEST_VERSION = "0.4"

SERVER_JSON = ROOT / "manifests" / "server.json"
MCPB_MANIFEST = ROOT / "manifests" / "manifest.json"
DESKTOP_SNIPPET = ROOT / "manifests" / "claude_desktop_config.json"
README = ROOT / "README.md"

USER_CONFIG_REF = re.compile(r"^\$\{user_config\.([A-Za-z0-9_]+)\}$")


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def pyproject() -> dict[str, Any]:
    """`[project]` of pyproject.toml, with `version` filled in when it is dynamic.

    A dynamic version is read the way hatch reads it: from the file `[tool.hatch.version] path`
    names (its `__version__ = "..."` line), without importing the package.
    """
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = dict(data["project"])
    if "version" not in project:
        assert "version" in project.get("dynamic", []), "pyproject has neither a version nor a dynamic one"
        source = ROOT / data["tool"]["hatch"]["version"]["path"]
        found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", source.read_text(encoding="utf-8"), re.M)
        assert found, f"no __version__ in {source}"
        project["version"] = found[1]
    return project


def schema_errors(document: Any, schema: dict[str, Any]) -> list[str]:
    """Validation errors, using the draft the schema declares in its `$schema`."""
    cls = validator_for(schema, default=None)
    if cls is None:
        return [f"schema declares no known draft: {schema.get('$schema')!r}"]
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [
        f"schema: /{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    ]


# ---------------------------------------------------------------------------------- server.json


def server_json_problems(doc: dict[str, Any]) -> list[str]:
    problems = schema_errors(doc, load_json(REGISTRY_SCHEMA_FILE))
    project = pyproject()
    if doc.get("$schema") != REGISTRY_SCHEMA_URL:
        problems.append(f"$schema is {doc.get('$schema')!r}, not the vendored {REGISTRY_SCHEMA_URL}")
    if doc.get("version") != project["version"]:
        problems.append(f"version {doc.get('version')!r} != pyproject {project['version']!r}")
    repo_url = doc.get("repository", {}).get("url", "")
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+)", repo_url)
    if not match:
        problems.append(f"repository.url {repo_url!r} is not a GitHub repository URL")
    elif doc.get("name") != f"io.github.{match[1]}/{match[2]}":
        problems.append(f"name {doc.get('name')!r} is not io.github.{match[1]}/{match[2]}")

    pypi = [p for p in doc.get("packages", []) if p.get("registryType") == "pypi"]
    if len(pypi) != 1:
        return [*problems, f"expected one pypi package, found {len(pypi)}"]
    package = pypi[0]
    if package.get("identifier") != project["name"]:
        problems.append(f"package identifier {package.get('identifier')!r} != pyproject {project['name']!r}")
    if package.get("version") != project["version"]:
        problems.append(f"package version {package.get('version')!r} != pyproject {project['version']!r}")
    if package.get("transport", {}).get("type") != "stdio":
        problems.append("package transport is not stdio")

    env = {v.get("name"): v for v in package.get("environmentVariables", [])}
    for name in KEY_ENVS:
        var = env.get(name)
        if var is None:
            problems.append(f"key variable {name} is missing")
            continue
        if var.get("isSecret") is not True:
            problems.append(f"key variable {name} is not isSecret: true")
        if var.get("isRequired") is not False:
            problems.append(f"key variable {name} must say isRequired: false (the offline endpoint needs no key)")
    for name in PLAIN_ENVS:
        if name not in env:
            problems.append(f"variable {name} is missing")
        elif env[name].get("isSecret"):
            problems.append(f"variable {name} is not a secret")
    for name, var in env.items():
        if var.get("isSecret") and name not in KEY_ENVS:
            problems.append(f"{name} is marked secret but is not a key variable")
    return problems


# ---------------------------------------------------------------------------------- MCPB manifest


def mcpb_problems(manifest: dict[str, Any]) -> list[str]:
    problems = schema_errors(manifest, load_json(MCPB_SCHEMA_FILE))
    project = pyproject()
    if manifest.get("manifest_version") != MCPB_MANIFEST_VERSION:
        problems.append(f"manifest_version {manifest.get('manifest_version')!r} != {MCPB_MANIFEST_VERSION!r}")
    if manifest.get("name") != project["name"]:
        problems.append(f"name {manifest.get('name')!r} != pyproject {project['name']!r}")
    if manifest.get("version") != project["version"]:
        problems.append(f"version {manifest.get('version')!r} != pyproject {project['version']!r}")
    runtime = manifest.get("compatibility", {}).get("runtimes", {}).get("python")
    if runtime != project["requires-python"]:
        problems.append(f"python runtime {runtime!r} != pyproject requires-python {project['requires-python']!r}")

    server = manifest.get("server", {})
    package_dir = "mcp_imagegen"
    if not str(server.get("entry_point", "")).startswith(f"{package_dir}/"):
        problems.append(f"entry_point {server.get('entry_point')!r} is not inside {package_dir}/")
    mcp_config = server.get("mcp_config", {})
    args = mcp_config.get("args", [])
    if ["-m", package_dir] != args[-2:]:
        problems.append(f"mcp_config args {args!r} do not end with ['-m', '{package_dir}']")

    user_config = manifest.get("user_config", {})
    env = mcp_config.get("env", {})
    for var, value in env.items():
        ref = USER_CONFIG_REF.match(value)
        if ref and ref[1] not in user_config:
            problems.append(f"env {var} refers to undeclared user_config.{ref[1]}")
    for name in KEY_ENVS:
        ref = USER_CONFIG_REF.match(env.get(name, ""))
        if not ref:
            problems.append(f"mcp_config.env does not map {name} to a ${{user_config.*}} value")
            continue
        option = user_config.get(ref[1], {})
        if option.get("type") != "string":
            problems.append(f"user_config.{ref[1]} ({name}) is not a string")
        if option.get("sensitive") is not True:
            problems.append(f"user_config.{ref[1]} ({name}) is not sensitive: true")
        if option.get("required") is not False:
            problems.append(f"user_config.{ref[1]} ({name}) is not required: false")
    for key, option in user_config.items():
        if option.get("sensitive") and not any(env.get(k) == f"${{user_config.{key}}}" for k in KEY_ENVS):
            problems.append(f"user_config.{key} is sensitive but feeds no key variable")
    out = USER_CONFIG_REF.match(env.get("MCP_IMAGEGEN_OUTPUT_DIR", ""))
    if not out:
        problems.append("mcp_config.env does not map MCP_IMAGEGEN_OUTPUT_DIR to a ${user_config.*} value")
    elif user_config.get(out[1], {}).get("type") != "directory":
        problems.append(f"user_config.{out[1]} (MCP_IMAGEGEN_OUTPUT_DIR) is not of type directory")

    tools = {t.get("name"): t for t in manifest.get("tools", [])}
    if set(tools) != set(TOOLS):
        problems.append(f"tools {sorted(tools)} != {sorted(TOOLS)}")
    for name, tool in tools.items():
        if not tool.get("description"):
            problems.append(f"tool {name} has no description")
    return problems


# ---------------------------------------------------------------------------------- Claude Desktop


def desktop_snippet_problems(text: str) -> list[str]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"not JSON: {exc}"]
    servers = config.get("mcpServers") if isinstance(config, dict) else None
    if not isinstance(servers, dict) or len(servers) != 1:
        return ["expected exactly one entry under mcpServers"]
    (entry,) = servers.values()
    problems = []
    script = "mcp-imagegen"
    if script not in pyproject().get("scripts", {}):
        problems.append(f"pyproject declares no console script {script!r}")
    if entry.get("command") != "uvx" or entry.get("args") != [script]:
        problems.append(f"command {entry.get('command')!r} {entry.get('args')!r} is not `uvx {script}`")
    env = entry.get("env", {})
    if len(env) != 1 or next(iter(env)) not in KEY_ENVS:
        problems.append(f"env {sorted(env)} should show exactly one key variable")
    elif next(iter(env.values())) != "":
        problems.append("the key in the env block must be an empty placeholder")
    return problems


# ---------------------------------------------------------------------------------- tests: schemas


@pytest.mark.parametrize("path", [REGISTRY_SCHEMA_FILE, MCPB_SCHEMA_FILE], ids=lambda p: p.name)
def test_schema_is_self_contained_draft7(path: Path) -> None:
    schema = load_json(path)
    assert validator_for(schema, default=None) is Draft7Validator
    Draft7Validator.check_schema(schema)
    refs = re.findall(r'"\$ref":\s*"([^"]*)"', path.read_text(encoding="utf-8"))
    assert refs, "expected internal references"
    assert all(ref.startswith("#/") for ref in refs), [r for r in refs if not r.startswith("#/")]


def test_registry_schema_is_the_published_copy() -> None:
    assert hashlib.sha256(REGISTRY_SCHEMA_FILE.read_bytes()).hexdigest() == REGISTRY_SCHEMA_SHA256
    assert load_json(REGISTRY_SCHEMA_FILE)["$id"] == REGISTRY_SCHEMA_URL


def test_mcpb_schema_is_for_the_manifest_version() -> None:
    schema = load_json(MCPB_SCHEMA_FILE)
    assert schema["properties"]["manifest_version"]["const"] == MCPB_MANIFEST_VERSION


# ---------------------------------------------------------------------------------- tests: documents


def test_server_json() -> None:
    assert server_json_problems(load_json(SERVER_JSON)) == []


def test_mcpb_manifest() -> None:
    assert mcpb_problems(load_json(MCPB_MANIFEST)) == []


def test_claude_desktop_snippet() -> None:
    assert desktop_snippet_problems(DESKTOP_SNIPPET.read_text(encoding="utf-8")) == []


def test_readme_declares_registry_name() -> None:
    """PyPI ownership check of the MCP Registry: `mcp-name: <name>` in the package README, matched in full."""
    name = load_json(SERVER_JSON)["name"]
    readme = README.read_text(encoding="utf-8")
    assert re.search(rf"mcp-name: {re.escape(name)}(?![A-Za-z0-9._/-])", readme)
    assert pyproject()["readme"] == README.name


def test_mcpb_entry_point_exists() -> None:
    entry = ROOT / load_json(MCPB_MANIFEST)["server"]["entry_point"]
    if not (ROOT / "mcp_imagegen" / "cli.py").exists():
        pytest.skip("server code (mcp_imagegen/cli.py, __main__.py) has not landed yet")
    assert entry.is_file(), f"{entry} is missing: `python -m mcp_imagegen` is a contract"


# ---------------------------------------------------------------------------------- tests: each check can fail


Mutation = Callable[[dict[str, Any]], None]


def _pypi(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["packages"][0]


def _var(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in _pypi(doc)["environmentVariables"] if v["name"] == name)


SERVER_JSON_BREAKAGES: dict[str, tuple[Mutation, str]] = {
    "key not secret": (lambda d: _var(d, "NANOGPT_API_KEY").update(isSecret=False), "NANOGPT_API_KEY is not isSecret"),
    "key required": (lambda d: _var(d, "OPENAI_API_KEY").update(isRequired=True), "OPENAI_API_KEY must say isRequired"),
    "key missing": (
        lambda d: _pypi(d).update(
            environmentVariables=[v for v in _pypi(d)["environmentVariables"] if v["name"] != "MODELMAX_API_KEY"]
        ),
        "MODELMAX_API_KEY is missing",
    ),
    "plain var secret": (lambda d: _var(d, "OPENAI_BASE_URL").update(isSecret=True), "OPENAI_BASE_URL is not a secret"),
    "isSecret not boolean": (lambda d: _var(d, "LLMVIN_API_KEY").update(isSecret="true"), "schema: /packages/0/"),
    "variable without name": (
        lambda d: _var(d, "NEXLLM_API_KEY").pop("name"),
        "schema: /packages/0/environmentVariables",
    ),
    "version drift": (lambda d: d.update(version="0.0.9"), "version '0.0.9' != pyproject"),
    "package version drift": (lambda d: _pypi(d).update(version="0.0.9"), "package version '0.0.9'"),
    "package version latest": (lambda d: _pypi(d).update(version="latest"), "schema: /packages/0/version"),
    "wrong package": (lambda d: _pypi(d).update(identifier="mcp-imagegen2"), "package identifier"),
    "not reverse-DNS": (lambda d: d.update(name="mcp-imagegen"), "schema: /name"),
    "name not the repo": (
        lambda d: d.update(name="io.github.someone/else"),
        "is not io.github.mcp-imagegen/mcp-imagegen",
    ),
    "description too long": (lambda d: d.update(description="x" * 101), "schema: /description"),
    "other schema": (lambda d: d.update({"$schema": "https://example.com/s.json"}), "$schema is"),
    "not stdio": (
        lambda d: _pypi(d).update(transport={"type": "sse", "url": "http://x/sse"}),
        "transport is not stdio",
    ),
}


@pytest.mark.parametrize("breakage", SERVER_JSON_BREAKAGES, ids=str)
def test_server_json_breakage_is_caught(breakage: str) -> None:
    mutate, expected = SERVER_JSON_BREAKAGES[breakage]
    doc = copy.deepcopy(load_json(SERVER_JSON))
    mutate(doc)
    problems = server_json_problems(doc)
    assert any(expected in p for p in problems), problems


def _user(m: dict[str, Any], key: str) -> dict[str, Any]:
    return m["user_config"][key]


MCPB_BREAKAGES: dict[str, tuple[Mutation, str]] = {
    "sensitive missing": (lambda m: _user(m, "openai_api_key").pop("sensitive"), "(OPENAI_API_KEY) is not sensitive"),
    "sensitive false": (
        lambda m: _user(m, "nanogpt_api_key").update(sensitive=False),
        "(NANOGPT_API_KEY) is not sensitive",
    ),
    "key required": (
        lambda m: _user(m, "modelmax_api_key").update(required=True),
        "(MODELMAX_API_KEY) is not required",
    ),
    "key not mapped": (lambda m: m["server"]["mcp_config"]["env"].pop("AI_NEBULA_API_KEY"), "map AI_NEBULA_API_KEY"),
    "undeclared option": (
        lambda m: m["server"]["mcp_config"]["env"].update(LLMVIN_API_KEY="${user_config.nope}"),
        "undeclared user_config.nope",
    ),
    "output dir not a directory": (lambda m: _user(m, "output_dir").update(type="string"), "is not of type directory"),
    "option without description": (lambda m: _user(m, "nexllm_api_key").pop("description"), "schema: /user_config/"),
    "sensitive not boolean": (lambda m: _user(m, "llmvin_api_key").update(sensitive="yes"), "schema: /user_config/"),
    "old manifest version": (lambda m: m.update(manifest_version="0.3"), "schema: /manifest_version"),
    "unknown server type": (lambda m: m["server"].update(type="deno"), "schema: /server"),
    "version drift": (lambda m: m.update(version="0.2.0"), "version '0.2.0' != pyproject"),
    "name drift": (lambda m: m.update(name="imagegen"), "name 'imagegen' != pyproject"),
    "runtime drift": (lambda m: m["compatibility"]["runtimes"].update(python=">=3.10"), "python runtime"),
    "tool missing": (lambda m: m.update(tools=m["tools"][:2]), "tools ["),
    "tool undescribed": (lambda m: m["tools"][0].pop("description"), "has no description"),
    "wrong module": (lambda m: m["server"]["mcp_config"].update(args=["run", "server.py"]), "do not end with"),
}


@pytest.mark.parametrize("breakage", MCPB_BREAKAGES, ids=str)
def test_mcpb_breakage_is_caught(breakage: str) -> None:
    mutate, expected = MCPB_BREAKAGES[breakage]
    manifest = copy.deepcopy(load_json(MCPB_MANIFEST))
    mutate(manifest)
    problems = mcpb_problems(manifest)
    assert any(expected in p for p in problems), problems


DESKTOP_BREAKAGES: dict[str, tuple[Callable[[str], str], str]] = {
    "not JSON": (lambda t: t.rstrip().rstrip("}"), "not JSON"),
    "other command": (lambda t: t.replace('"uvx"', '"npx"'), "is not `uvx mcp-imagegen`"),
    "other package": (lambda t: t.replace('["mcp-imagegen"]', '["mcp-imagegen-x"]'), "is not `uvx mcp-imagegen`"),
    "real-looking key": (
        lambda t: t.replace('"OPENAI_API_KEY": ""', '"OPENAI_API_KEY": "sk-123"'),
        "empty placeholder",
    ),
    "not a key variable": (lambda t: t.replace('"OPENAI_API_KEY"', '"OPENAI_KEY"'), "exactly one key variable"),
    "no servers": (lambda t: t.replace('"mcpServers"', '"servers"'), "exactly one entry"),
}


@pytest.mark.parametrize("breakage", DESKTOP_BREAKAGES, ids=str)
def test_desktop_snippet_breakage_is_caught(breakage: str) -> None:
    mutate, expected = DESKTOP_BREAKAGES[breakage]
    text = DESKTOP_SNIPPET.read_text(encoding="utf-8")
    broken = mutate(text)
    assert broken != text, "the mutation did not apply"
    problems = desktop_snippet_problems(broken)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------- the built bundle


def _build_script() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_script", ROOT / "scripts" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bundle_holds_the_manifest_and_a_runnable_server(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import zipfile

    bundle = _build_script().build_bundle(tmp_path / "dist")
    manifest = load_json(MCPB_MANIFEST)
    assert bundle.name == f"{manifest['name']}-{manifest['version']}.mcpb"
    with zipfile.ZipFile(bundle) as z:
        names = z.namelist()
        assert names[0] == "manifest.json"
        assert json.loads(z.read("manifest.json")) == manifest
        assert mcpb_problems(json.loads(z.read("manifest.json"))) == []
        assert manifest["server"]["entry_point"] in names
        assert {"pyproject.toml", "README.md"} <= set(names)
        providers = {p.relative_to(ROOT / "manifests").as_posix() for p in (ROOT / "manifests").rglob("*.toml")}
        assert "mcp_imagegen/app/studio.html" in names  # the image studio ships with the server
        assert {n.removeprefix("manifests/") for n in names if n.startswith("manifests/")} == providers
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        z.extractall(tmp_path / "unpacked")
    # What `uv run --directory <bundle> python -m mcp_imagegen` runs, minus uv: the unpacked
    # bundle alone must make a working server (its own package, its own provider manifests).
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "unpacked"), "MCP_IMAGEGEN_OUTPUT_DIR": str(tmp_path / "out")}
    done = subprocess.run(
        [sys.executable, "-m", "mcp_imagegen", "generate", "a red fox", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_file()
    check = "import mcp_imagegen, mcp_imagegen.manifests as m; print(mcp_imagegen.__file__, m.manifest_dir())"
    where = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.stdout.startswith(str(tmp_path / "unpacked")), where.stdout + where.stderr
