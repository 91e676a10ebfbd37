"""The README's reference tables are kept in step with the code they describe.

When a setting or a manifest changes, these tests fail and print the table to paste.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from mcp_imagegen.config import EndpointConfig, OAuthScopes, OAuthSettings, Settings, SpendingSettings, StorageSettings
from mcp_imagegen.manifests import available_providers, load_manifest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _default(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "`[]`"
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
        "| provider | gateway | generate | edit | mask | several inputs | discovery | key variable |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for provider in available_providers():
        m = load_manifest(provider)
        caps = {c for model in (m.models or []) for c in model.capabilities}
        if m.unknown_models is not None:
            caps |= set(m.unknown_models.capabilities)
        mark = {True: "yes", False: "-"}
        rows.append(
            f"| `{m.id}` | {m.name} | {mark['generate' in caps]} | {mark['edit' in caps]} | "
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
