"""The README's reference tables are kept in step with the code they describe.

When a setting or a manifest changes, these tests fail and print the table to paste.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from mcp_imagegen.config import EndpointConfig, Settings
from mcp_imagegen.manifests import available_providers, load_manifest
from mcp_imagegen.models import CAPABILITIES
from mcp_imagegen.resolution import resolve

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


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
        if field.exclude or name == "endpoints":
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
