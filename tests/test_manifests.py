"""Provider manifests: every shipped one loads, and a broken one is refused with file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcp_imagegen.errors import ManifestError
from mcp_imagegen.manifests import available_providers, load_manifest, parse_manifest
from mcp_imagegen.resolution import resolve

PROVIDERS = ["ai-nebula", "llm-vin", "modelmax", "nano-gpt", "nexllm", "offline", "openai", "openai-compatible"]


def test_every_contract_provider_has_a_manifest() -> None:
    assert available_providers() == PROVIDERS


@pytest.mark.parametrize("provider", PROVIDERS)
def test_shipped_manifest_loads(provider: str) -> None:
    manifest = load_manifest(provider)
    assert manifest.id == provider
    for model in manifest.models:
        # Every listed model's capabilities are known, from its entry or its family.
        belief = resolve(model.id, manifest)
        assert belief.spec.capabilities and belief.known("capabilities"), model.id
        if "edit" in belief.spec.capabilities and manifest.transport == "http":
            assert manifest.operations["edit"].inputs is not None


def test_seed_dialect_facts_are_declared() -> None:
    nebula = load_manifest("ai-nebula")
    assert nebula.response.envelope == "code_msg_data"
    assert nebula.operations["edit"].inputs.encoding == "gemini_contents"
    nano = load_manifest("nano-gpt")
    assert nano.response.default_format == "b64_json"
    inputs = nano.operations["edit"].inputs
    assert (inputs.image_field, inputs.multi_image_field, inputs.mask_field) == (
        "imageDataUrl",
        "imageDataUrls",
        "maskDataUrl",
    )
    assert inputs.max_input_bytes == 4_000_000 and inputs.mask_semantics == "white"
    assert nano.discovery is not None and nano.discovery.relative_to == "origin"
    openai = load_manifest("openai")
    assert resolve("gpt-image-2", openai).spec.response_format is False
    assert resolve("gpt-image-1", openai).shut_down()
    assert openai.operations["edit"].inputs.mask_semantics == "transparent"
    assert load_manifest("llm-vin").auth.required is False


def broken(tmp_path: Path, body: str, name: str = "custom") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(body, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('id = "custom"\nname = "x"\n', "operations.generate is required"),
        ('id = "custom"\nname = "x"\n[operations.generate]\npath = "/g"\nsend = ["n"]\n', "operations.generate.send"),
        (
            'id = "custom"\nname = "x"\n[operations.generate]\npath = "/g"\n[[models]]\nid = "m"\n'
            'capabilities = ["paint"]\n',
            "models.0.capabilities.0",
        ),
        (
            'id = "custom"\nname = "x"\n[operations.generate]\npath = "/g"\n[[models]]\nid = "m"\n'
            'capabilities = ["generate"]\nknobs = ["quality"]\n',
            "'quality' is not defined in params",
        ),
        (
            'id = "custom"\nname = "x"\n[operations.generate]\npath = "/g"\n[[models]]\nid = "m"\n'
            'capabilities = ["edit"]\n',
            "operations.edit is missing",
        ),
    ],
)
def test_invalid_manifest_names_file_and_field(tmp_path: Path, body: str, field: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(broken(tmp_path, body))
    assert "custom.toml" in info.value.message
    assert field in info.value.message


def test_manifest_id_must_match_file_name(tmp_path: Path) -> None:
    body = 'id = "other"\nname = "x"\n[operations.generate]\npath = "/g"\n'
    with pytest.raises(ManifestError, match="must match the file name"):
        parse_manifest(broken(tmp_path, body))


def test_a_new_gateway_needs_only_a_manifest(tmp_path: Path) -> None:
    body = """
id = "custom"
name = "Custom relay"
base_url = "https://relay.example/v1"
[operations.generate]
path = "/images/generations"
[params.seed]
type = "integer"
min = 0
[[models]]
id = "painter"
capabilities = ["generate"]
sizes = ["512x512"]
max_n = 2
knobs = ["seed"]
"""
    manifest = parse_manifest(broken(tmp_path, body))
    spec = manifest.model("painter")
    assert spec is not None and manifest.knob(spec, "seed") is not None
    assert manifest.model("unknown") is None
