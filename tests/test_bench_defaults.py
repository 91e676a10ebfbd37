"""The benchmark measures the server as a user gets it: its configurations hold only what a user
must write, so every limit and deadline is the default."""

from __future__ import annotations

import tomllib
from pathlib import Path

from bench.harness import EndpointSpec, write_config
from mcp_imagegen.config import EndpointConfig, Settings


def test_benchmark_configurations_raise_no_setting_a_user_does_not_write(tmp_path: Path) -> None:
    specs = [
        EndpointSpec("photo", "http://127.0.0.1:9/v1"),
        EndpointSpec("big", "http://127.0.0.1:9/v1", provider="openai-compatible", models=("gpt-image-1",)),
    ]
    raw = tomllib.loads(write_config(tmp_path / "bench.toml", tmp_path / "images", specs).read_text())

    assert set(raw) == {"output_dir", "endpoints"}
    assert [set(ep) for ep in raw["endpoints"]] == [
        {"name", "provider", "base_url", "api_key_env"},
        {"name", "provider", "base_url", "api_key_env", "models"},  # which model the endpoint serves
    ]
    settings = Settings.model_validate(raw)
    for endpoint in settings.endpoints:
        assert endpoint.max_concurrency is None  # the adaptive default, not a raised ceiling
        assert endpoint.timeout_s == EndpointConfig.model_fields["timeout_s"].default
    assert settings.tool_deadline_s == Settings.model_fields["tool_deadline_s"].default
