"""Read the TOML configuration file and the environment into typed settings.

Keys never live in the file: an endpoint names the environment variable that holds its key, and
the key is kept as a `SecretStr` so no repr, log line or error can print it.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .manifests import ModelSpec

CONFIG_ENV = "MCP_IMAGEGEN_CONFIG"
OUTPUT_DIR_ENV = "MCP_IMAGEGEN_OUTPUT_DIR"
CONFIG_FILE_NAME = "mcp-imagegen.toml"
DEFAULT_OUTPUT_DIR = "~/Pictures/mcp-imagegen"

# provider id -> (key variable, base-URL variable) for the environment-only setup.
WELL_KNOWN_KEY_ENVS: dict[str, tuple[str, str | None]] = {
    "openai": ("OPENAI_API_KEY", "OPENAI_BASE_URL"),
    "nexllm": ("NEXLLM_API_KEY", None),
    "ai-nebula": ("AI_NEBULA_API_KEY", None),
    "nano-gpt": ("NANOGPT_API_KEY", None),
    "llm-vin": ("LLMVIN_API_KEY", None),
    "modelmax": ("MODELMAX_API_KEY", None),
}


class EndpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Unique; how tools and results name this endpoint.")
    provider: str = Field(description="A manifest id, or 'openai-compatible' for a plain gateway.")
    base_url: str | None = Field(default=None, description="Optional for known providers.")
    api_key_env: str | None = Field(default=None, description="Environment variable that holds the key.")
    models: list[str] | None = Field(default=None, description="Allowlist of model ids on this endpoint.")
    timeout_s: float = Field(
        default=180.0,
        gt=0,
        description="Total time of one gateway call from its first request sent, retries and their waits included.",
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description=(
            "Hard ceiling on gateway calls in flight at once. Unset: adapts to the gateway, starting at 64, "
            "halving on 429/503 and waiting out Retry-After, growing while answers come back, at most 256."
        ),
    )
    priority: int = Field(default=0, description="Higher is tried first when several endpoints serve a model.")
    model_overrides: dict[str, ModelSpec] = Field(
        default_factory=dict,
        description="Per model id: facts that correct what the server believes (any ModelSpec field; "
        "given fields win).",
    )
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("must be non-empty and use only letters, digits, '-', '_' and '.'")
        return v

    @field_validator("model_overrides", mode="before")
    @classmethod
    def _override_ids(cls, v: Any) -> Any:
        # The table's key is the model id; the table itself holds only the corrected fields.
        if isinstance(v, dict):
            return {k: {**t, "id": k} if isinstance(t, dict) else t for k, t in v.items()}
        return v

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/") if v else v


class OAuthScopes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generate: str = Field(default="images:generate", description="Scope that lets a token generate and edit images.")
    read: str = Field(default="images:read", description="Scope that lets a token read its images and jobs.")


class OAuthSettings(BaseModel):
    """`[oauth]`: the HTTP transports as an OAuth 2.1 resource server (see oauth.py)."""

    model_config = ConfigDict(extra="forbid")

    issuer: str = Field(description="The authorization server's issuer URL, exactly as tokens carry it in `iss`.")
    resource: str = Field(
        description="This server's own URL as clients reach it (e.g. https://images.example.com/mcp); tokens "
        "must carry it in `aud` (RFC 8707)."
    )
    scopes: OAuthScopes = Field(default_factory=OAuthScopes)
    clock_skew_s: float = Field(default=30.0, ge=0, le=300, description="Leeway on `exp` and `nbf`.")

    @field_validator("issuer", "resource")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with https:// (or http:// on a test network)")
        return v


class SpendingSettings(BaseModel):
    """`[spending]`: daily limits in US dollars, checked before anything is sent (see spending.py)."""

    model_config = ConfigDict(extra="forbid")

    person_usd_per_day: float | None = Field(default=None, ge=0, description="What one person may spend per UTC day.")
    server_usd_per_day: float | None = Field(default=None, ge=0, description="What everyone together may spend per UTC day.")
    unpriced_image_usd: float = Field(
        default=0.10, ge=0, description="The estimate for one image of a model in no known price family."
    )


class StorageSettings(BaseModel):
    """`[storage]`: where images, records and jobs live when several replicas share them (storage.py).

    Credentials never go in the file: the S3 client reads the standard AWS variables
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...), and the Redis URL (which may hold a password)
    comes from the variable `redis_url_env` names."""

    model_config = ConfigDict(extra="forbid")

    s3_bucket: str | None = Field(default=None, description="Keep images and records in this S3 bucket.")
    s3_endpoint_url: str | None = Field(default=None, description="For S3-compatible stores (R2, MinIO, Ceph).")
    s3_region: str | None = Field(default=None, description="The bucket's region.")
    s3_prefix: str = Field(default="mcp-imagegen/", description="Key prefix for everything this server writes.")
    presign_ttl_s: int = Field(default=3600, ge=60, le=604800, description="Lifetime of image links in results.")
    redis_url_env: str = Field(
        default="MCP_IMAGEGEN_REDIS_URL", description="Variable holding the Redis URL for shared job state."
    )


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_dir: Path = Field(default=Path(DEFAULT_OUTPUT_DIR), description="Where images are saved.")
    endpoints: list[EndpointConfig] = Field(default_factory=list)
    allowed_roots: list[Path] = Field(
        default_factory=list, description="Extra folders that input file paths may come from."
    )
    allow_private_urls: bool = Field(
        default=False, description="Let tool arguments fetch URLs on private, loopback or link-local addresses."
    )
    tool_deadline_s: float = Field(
        default=50.0,
        gt=0,
        description="A generate/edit call that runs longer returns a job handle; the work goes on.",
    )
    preview_max_px: int = Field(
        default=512,
        ge=64,
        le=1024,
        description="Longest side of inline previews; a small file up to twice this is shown as it is.",
    )
    inline_full_image: bool = Field(
        default=False, description="Inline the full image (downscaled to fit the result cap) instead of a preview."
    )
    failover: bool = Field(
        default=True, description="Move a call to another endpoint serving the same model on retryable errors."
    )
    max_retries: int = Field(default=2, ge=0, le=5, description="Retries of one gateway call on retryable errors.")
    discovery_ttl_s: float = Field(default=3600.0, ge=0, description="How long discovered model lists are kept.")
    max_request_body_mb: int = Field(default=64, ge=4, description="Largest request body the HTTP transports take.")
    request_read_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="HTTP transports: seconds a client may take to send a request's headers, and its body "
        "beyond what a 16 KiB/s upload needs; slower connections are closed.",
    )
    max_sessions_per_client: int = Field(
        default=64,
        ge=1,
        description="HTTP transports: open MCP sessions (or SSE streams) one client may hold; a client is "
        "a token at a peer address. More get HTTP 429.",
    )
    session_idle_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="Streamable HTTP: a session with no request in flight for this long is closed.",
    )
    spending: SpendingSettings = Field(default_factory=SpendingSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    oauth: OAuthSettings | None = Field(
        default=None, description="Sign people in through an OAuth 2.1 authorization server (HTTP transports)."
    )
    source: Path | None = Field(default=None, exclude=True, description="The file these settings came from.")

    @field_validator("output_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        # Hosts do not always expand ${HOME} in the values they pass; do it here.
        return Path(os.path.expandvars(str(v))).expanduser()

    @field_validator("allowed_roots", mode="after")
    @classmethod
    def _expand_roots(cls, v: list[Path]) -> list[Path]:
        return [p.expanduser() for p in v]

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for ep in self.endpoints:
            if ep.name in seen:
                raise ValueError(f"endpoints: the name {ep.name!r} is used twice; names must be unique")
            seen.add(ep.name)
        return self

    def endpoint(self, name: str) -> EndpointConfig | None:
        return next((e for e in self.endpoints if e.name == name), None)


def user_config_dir(env: Mapping[str, str] | None = None) -> Path:
    """The platform's per-user configuration folder (XDG on Linux)."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    if sys.platform == "win32":
        return Path(env.get("APPDATA") or home / "AppData" / "Roaming") / "mcp-imagegen"
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "mcp-imagegen"
    return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "mcp-imagegen"


def user_state_dir() -> Path:
    """The per-user folder for what this machine keeps for itself (XDG state on Linux)."""
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "mcp-imagegen"
    return Path(os.environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "mcp-imagegen"


def config_path(env: Mapping[str, str]) -> tuple[Path, bool]:
    """The configuration file to read, and whether the user named it explicitly."""
    named = _env_value(env, CONFIG_ENV)
    if named:
        return Path(named).expanduser(), True
    return user_config_dir(env) / CONFIG_FILE_NAME, False


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f"configuration file {path}" if path else "configuration"
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        key = ""
        for part in loc:
            key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
        lines.append(f"{key or '(top level)'}: {err['msg']}")
    return f"{where}: " + "; ".join(lines)


def _env_value(env: Mapping[str, str], name: str) -> str | None:
    """A variable's value, or None when empty or an unexpanded `${...}` placeholder.

    Some MCP hosts pass a bundle's blank optional field through as its literal placeholder
    (`${user_config.openai_api_key}`); taking that as a key would hide the offline fallback.
    """
    value = env.get(name, "").strip()
    if not value or (value.startswith("${") and value.endswith("}")):
        return None
    return value


def _env_endpoints(env: Mapping[str, str]) -> list[dict[str, Any]]:
    endpoints: list[dict[str, Any]] = []
    for provider, (key_env, url_env) in WELL_KNOWN_KEY_ENVS.items():
        if _env_value(env, key_env):
            entry: dict[str, Any] = {"name": provider, "provider": provider, "api_key_env": key_env}
            base_url = _env_value(env, url_env) if url_env else None
            if base_url:
                entry["base_url"] = base_url
            endpoints.append(entry)
    return endpoints


OFFLINE_ENDPOINT: dict[str, Any] = {"name": "offline", "provider": "offline"}


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from the file (if any), else the well-known variables, else the offline endpoint."""
    env = os.environ if env is None else env
    path, explicit = config_path(env)
    raw: dict[str, Any] = {}
    source: Path | None = None
    if path.is_file():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            at = re.search(r"\(at (line \d+, column \d+)\)", str(exc))
            raise ConfigError(
                f"configuration file {path} is not valid TOML: {exc}",
                hint=f"fix the syntax{f' at {at[1]}' if at else ''} of {path} (keys as `name = value`, "
                "strings in quotes, tables as [name] or [[endpoints]])",
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"configuration file {path} cannot be read: {exc.strerror}",
                hint=f"make {path} readable by this user, or point {CONFIG_ENV} at another file",
            ) from None
        source = path
    elif explicit:
        raise ConfigError(
            f"configuration file {path} (named by {CONFIG_ENV}) does not exist",
            hint=f"create {path}, point {CONFIG_ENV} at an existing file, or unset {CONFIG_ENV} to use "
            "the keys in the environment (or the offline endpoint)",
        )

    if not raw.get("endpoints"):
        raw["endpoints"] = _env_endpoints(env) or [dict(OFFLINE_ENDPOINT)]
    output_dir = _env_value(env, OUTPUT_DIR_ENV)
    if output_dir:
        raw["output_dir"] = output_dir
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    settings.source = source
    _check_providers_and_keys(settings, env, source)
    return settings


def _check_providers_and_keys(settings: Settings, env: Mapping[str, str], source: Path | None) -> None:
    # Imported here: reading a manifest is only needed once settings exist.
    from .manifests import available_providers, load_manifest

    where = f"configuration file {source}" if source else "configuration"
    known = available_providers()
    for i, ep in enumerate(settings.endpoints):
        if ep.provider not in known:
            raise ConfigError(
                f"{where}: endpoints[{i}].provider: unknown provider {ep.provider!r} "
                f"(endpoint {ep.name!r}); known providers: {', '.join(known)}",
                hint=f"set endpoints[{i}].provider in {source or 'the configuration'} to one of the known providers",
            )
        manifest = load_manifest(ep.provider)
        if manifest.transport == "http" and not (ep.base_url or manifest.base_url):
            raise ConfigError(
                f"{where}: endpoints[{i}].base_url: provider {ep.provider!r} has no default base URL; "
                f"set base_url for endpoint {ep.name!r}",
                hint=f'add base_url = "https://..." to endpoint {ep.name!r} in {source or "the configuration"}',
            )
        from .manifests import family, load_families

        for model_id, override in ep.model_overrides.items():
            if override.family is not None and family(override.family) is None:
                names = ", ".join(f.id for f in load_families())
                raise ConfigError(
                    f"{where}: endpoints[{i}].model_overrides.{model_id!r}.family: unknown family "
                    f"{override.family!r} (endpoint {ep.name!r}); known families: {names}"
                )
        key_env = ep.api_key_env or manifest.key_env
        key = _env_value(env, key_env) if key_env else None
        if key:
            ep.api_key = SecretStr(key)
        # A missing key is not fatal here: doctor reports it, and a call says which variable to set.
