"""Configuration: the file, the environment-only fallback, the offline default, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcp_imagegen.config import CONFIG_ENV, WELL_KNOWN_KEY_ENVS, load_settings
from mcp_imagegen.errors import ConfigError


def write(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "mcp-imagegen.toml"
    path.write_text(text, encoding="utf-8")
    return {CONFIG_ENV: str(path)}


def test_no_file_and_no_keys_serves_the_offline_endpoint(tmp_path: Path) -> None:
    settings = load_settings({"XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path)})
    assert [(e.name, e.provider) for e in settings.endpoints] == [("offline", "offline")]
    assert settings.source is None


@pytest.mark.parametrize("provider", sorted(WELL_KNOWN_KEY_ENVS))
def test_each_well_known_key_variable_makes_an_endpoint(tmp_path: Path, provider: str) -> None:
    key_env, _ = WELL_KNOWN_KEY_ENVS[provider]
    settings = load_settings({"XDG_CONFIG_HOME": str(tmp_path), key_env: "sk-test-value-123"})
    [endpoint] = settings.endpoints
    assert endpoint.provider == provider
    assert endpoint.api_key is not None and endpoint.api_key.get_secret_value() == "sk-test-value-123"
    assert "sk-test-value-123" not in repr(settings)
    assert "sk-test-value-123" not in settings.model_dump_json()


def test_openai_base_url_variable_is_honoured(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path), "OPENAI_API_KEY": "sk-x-12345678", "OPENAI_BASE_URL": "http://relay:9/v1/"}
    [endpoint] = load_settings(env).endpoints
    assert endpoint.base_url == "http://relay:9/v1"


def test_file_endpoints_with_all_fields(tmp_path: Path) -> None:
    env = write(
        tmp_path,
        f"""
output_dir = "{tmp_path / "out"}"
allowed_roots = ["{tmp_path}"]

[[endpoints]]
name = "nano"
provider = "nano-gpt"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "MY_NANO_KEY"
models = ["hidream"]
timeout_s = 30
max_concurrency = 2
priority = 5
""",
    )
    env["MY_NANO_KEY"] = "nano-secret-999"
    settings = load_settings(env)
    [ep] = settings.endpoints
    assert (ep.name, ep.provider, ep.models, ep.timeout_s, ep.max_concurrency, ep.priority) == (
        "nano",
        "nano-gpt",
        ["hidream"],
        30,
        2,
        5,
    )
    assert ep.api_key is not None and ep.api_key.get_secret_value() == "nano-secret-999"
    assert settings.output_dir == tmp_path / "out"
    assert settings.source == tmp_path / "mcp-imagegen.toml"


def test_output_dir_variable_overrides_the_file(tmp_path: Path) -> None:
    env = write(tmp_path, 'output_dir = "/somewhere/else"\n')
    env["MCP_IMAGEGEN_OUTPUT_DIR"] = str(tmp_path / "images")
    assert load_settings(env).output_dir == tmp_path / "images"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[endpoints]]\nname = 'a'\nprovider = 'nope'\n", ["endpoints[0].provider", "'nope'", "known providers"]),
        ("[[endpoints]]\nname = 'a'\n", ["endpoints[0].provider", "Field required"]),
        ("[[endpoints]]\nname = 'a'\nprovider = 'openai'\ntimeout_s = -1\n", ["endpoints[0].timeout_s"]),
        ("[[endpoints]]\nname = 'a'\nprovider = 'openai'\nbase_url = 'ftp://x'\n", ["endpoints[0].base_url", "http"]),
        ("[[endpoints]]\nname = 'a'\nprovider = 'openai'\napi_kee_env = 'X'\n", ["endpoints[0].api_kee_env"]),
        (
            "[[endpoints]]\nname = 'a'\nprovider = 'openai'\n[[endpoints]]\nname = 'a'\nprovider = 'openai'\n",
            ["'a' is used twice"],
        ),
        (
            "[[endpoints]]\nname = 'x'\nprovider = 'openai-compatible'\n",
            ["endpoints[0].base_url", "no default base URL"],
        ),
        ("output_dir = [1, 2]\n", ["output_dir"]),
        ("this is = not toml [\n", ["not valid TOML"]),
    ],
)
def test_bad_file_names_the_file_the_key_and_the_problem(tmp_path: Path, text: str, expected: list[str]) -> None:
    env = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    message = info.value.message
    assert str(tmp_path / "mcp-imagegen.toml") in message
    for part in expected:
        assert part in message


def test_named_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings({CONFIG_ENV: str(tmp_path / "missing.toml")})


def test_key_variable_named_but_unset_is_not_fatal(tmp_path: Path) -> None:
    env = write(tmp_path, "[[endpoints]]\nname = 'o'\nprovider = 'openai'\napi_key_env = 'UNSET_KEY_VAR'\n")
    [ep] = load_settings(env).endpoints
    assert ep.api_key is None


def test_default_file_in_the_user_config_folder_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "mcp-imagegen"
    folder.mkdir()
    (folder / "mcp-imagegen.toml").write_text(f'output_dir = "{tmp_path / "pics"}"\n', encoding="utf-8")
    settings = load_settings({"XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path)})
    assert settings.output_dir == tmp_path / "pics"
    assert settings.source == folder / "mcp-imagegen.toml"


def test_unexpanded_placeholders_count_as_unset(tmp_path: Path) -> None:
    # Some hosts pass a bundle's blank optional field through as its literal placeholder.
    env = {
        "XDG_CONFIG_HOME": str(tmp_path),
        "OPENAI_API_KEY": "${user_config.openai_api_key}",
        "MCP_IMAGEGEN_OUTPUT_DIR": "${user_config.output_dir}",
    }
    settings = load_settings(env)
    assert [e.provider for e in settings.endpoints] == ["offline"]
    assert "user_config" not in str(settings.output_dir)


def test_output_dir_expands_home_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    env = write(tmp_path, 'output_dir = "${HOME}/pics"\n')
    assert load_settings(env).output_dir == tmp_path / "pics"
