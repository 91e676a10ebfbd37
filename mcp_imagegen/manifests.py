"""Provider manifests: the declarative description of one gateway's dialect.

A manifest (one TOML file per provider in the top-level `manifests/` folder, shipped inside the
wheel) says where a gateway lives, how it authenticates, how each operation is encoded, which
models it serves with which limits, how its answers and errors are shaped and how to discover
models. The dialect code reads only these fields, so a new OpenAI-compatible gateway needs a
manifest, not Python.
"""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ManifestError
from .models import CANONICAL_KNOBS, Capability

# What `error_codes` may map a gateway's code or type to (the `kind` of an errors.py class).
ERROR_KINDS: tuple[str, ...] = (
    "invalid_request",
    "authentication",
    "insufficient_balance",
    "rate_limited",
    "quota_exhausted",
    "content_blocked",
    "model_not_found",
    "gateway_failure",
    "gateway_timeout",
    "bad_gateway_response",
)


class _Strict(BaseModel):
    # Unknown keys are typos in a manifest; refuse them so they are found at load time.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuthSpec(_Strict):
    scheme: Literal["bearer", "header", "none"] = "bearer"
    header: str = "Authorization"
    required: bool = True  # False: the gateway serves some models without a key (llm.vin)


class ParamSpec(_Strict):
    """A knob the gateway takes: its wire name, type and range."""

    wire: str | None = None  # defaults to the canonical name
    type: Literal["string", "integer", "number", "boolean"]
    enum: list[Any] | None = None
    min: float | None = None
    max: float | None = None
    description: str = ""

    def wire_name(self, canonical: str) -> str:
        return self.wire or canonical


class InputSpec(_Strict):
    """How input images and masks travel in an edit."""

    encoding: Literal["multipart", "data_url_fields", "gemini_contents"]
    image_field: str = "image"  # one image (multipart part name or JSON field)
    multi_image_field: str | None = None  # several images (`image[]`, `imageDataUrls`)
    mask_field: str | None = None
    # OpenAI edits where the mask is transparent; many diffusion gateways edit where it is white.
    mask_semantics: Literal["transparent", "white"] = "transparent"
    # Cap on one encoded input as sent (a data URL's length, or a multipart part's bytes).
    max_input_bytes: int | None = None
    formats: list[str] = Field(default_factory=lambda: ["image/png", "image/jpeg", "image/webp"])
    max_lineage_turns: int = 4  # gemini_contents: prior turns replayed for images we made


StandardField = Literal["n", "size", "response_format"]


class OperationSpec(_Strict):
    path: str  # relative to base_url
    # Which of the OpenAI standard fields the gateway takes besides model and prompt; a field it
    # does not take is never sent (n is then reached by parallel requests, size is dropped).
    sends: list[StandardField] = Field(default_factory=lambda: ["n", "size", "response_format"])
    inputs: InputSpec | None = None  # edits only


class ResponseSpec(_Strict):
    envelope: Literal["none", "code_msg_data"] = "none"
    # Where the list of images sits after the envelope is removed.
    data_path: list[str] = Field(default_factory=lambda: ["data"])
    default_format: Literal["url", "b64_json"] = "url"
    usage_field: str | None = "usage"
    cost_field: str | None = None
    balance_field: str | None = None


class DiscoverySpec(_Strict):
    path: str
    relative_to: Literal["base_url", "origin"] = "base_url"
    style: Literal["openai_models", "nano_image_models"] = "openai_models"
    # For model lists that mix chat and image models: ids that look like image models.
    image_model_pattern: str | None = None
    auth: bool = True


class ModelSpec(_Strict):
    id: str
    capabilities: list[Capability]
    sizes: list[str] | None = None  # None: any WxH within max_dimension
    default_size: str | None = None
    max_dimension: int | None = None
    min_dimension: int | None = None  # with sizes None: the smallest side a WxH may have
    max_n: int = 1
    max_prompt_chars: int | None = None
    max_input_images: int = 1
    knobs: list[str] = Field(default_factory=list)  # canonical knobs this model takes
    knob_overrides: dict[str, ParamSpec] = Field(default_factory=dict)
    response_format: bool = True  # False: the model rejects `response_format` (gpt-image)
    edit_formats: list[str] | None = None  # input formats the edit accepts, if narrower
    edit_square: bool = False  # dall-e-2 edits want a square image
    description: str = ""
    usd_per_image: float | None = None  # what the gateway lists for one image (discovery); spending.py


class Manifest(_Strict):
    id: str
    name: str
    docs_url: str | None = None
    transport: Literal["http", "builtin"] = "http"
    base_url: str | None = None
    key_env: str | None = None  # the well-known variable for the environment-only setup
    base_url_env: str | None = None
    auth: AuthSpec = AuthSpec()
    operations: dict[Literal["generate", "edit"], OperationSpec] = Field(default_factory=dict)
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    response: ResponseSpec = ResponseSpec()
    discovery: DiscoverySpec | None = None
    # Gateway error codes or types -> our error kinds, beyond what status codes say.
    error_codes: dict[str, str] = Field(default_factory=dict)
    models: list[ModelSpec] = Field(default_factory=list)
    default_model: str | None = None
    # Applies to models the manifest does not list (discovered or named in configuration).
    unknown_models: ModelSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.transport == "http" and "generate" not in self.operations:
            raise ValueError("operations.generate is required for an http gateway")
        for name in self.params:
            if name not in CANONICAL_KNOBS:
                raise ValueError(f"params.{name}: not a canonical knob (one of {', '.join(CANONICAL_KNOBS)})")
        ids = [m.id for m in self.models]
        if len(ids) != len(set(ids)):
            raise ValueError("models: duplicate model id")
        for m in self.models:
            for knob in m.knobs:
                if knob not in self.params and knob not in m.knob_overrides:
                    raise ValueError(f"models[{m.id}].knobs: {knob!r} is not defined in params")
            if ("edit" in m.capabilities) and "edit" not in self.operations and self.transport == "http":
                raise ValueError(f"models[{m.id}]: can edit but operations.edit is missing")
        for code, kind in self.error_codes.items():
            if kind not in ERROR_KINDS:
                raise ValueError(f"error_codes.{code}: {kind!r} is not one of {', '.join(ERROR_KINDS)}")
        if self.default_model and self.default_model not in ids:
            raise ValueError(f"default_model: {self.default_model!r} is not among models")
        return self

    def model(self, model_id: str) -> ModelSpec | None:
        """The manifest's spec for a model, or the unknown-model template renamed to it."""
        for m in self.models:
            if m.id == model_id:
                return m
        if self.unknown_models is not None:
            return self.unknown_models.model_copy(update={"id": model_id})
        return None

    def knob(self, model: ModelSpec, name: str) -> ParamSpec | None:
        if name not in model.knobs:
            return None
        return model.knob_overrides.get(name) or self.params.get(name)


def manifest_dir() -> Path:
    """Installed wheels carry the manifests inside the package; a source tree has them beside it."""
    here = Path(__file__).resolve().parent
    packaged = here / "manifests"
    return packaged if packaged.is_dir() else here.parent / "manifests"


def _format_validation_error(path: Path, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        problems.append(f"{loc}: {err['msg']}")
    return f"invalid provider manifest {path.name}: " + "; ".join(problems)


def parse_manifest(path: Path) -> Manifest:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"provider manifest {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"provider manifest {path.name} is not valid TOML: {exc}") from None
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(_format_validation_error(path, exc)) from None
    if manifest.id != path.stem:
        raise ManifestError(f"provider manifest {path.name}: id {manifest.id!r} must match the file name")
    return manifest


def available_providers() -> list[str]:
    return sorted(p.stem for p in manifest_dir().glob("*.toml"))


@cache
def load_manifest(provider: str) -> Manifest:
    """Load one provider's manifest; only the providers in use are ever read."""
    path = manifest_dir() / f"{provider}.toml"
    if not path.is_file():
        raise ManifestError(f"unknown provider {provider!r}; known providers: {', '.join(available_providers())}")
    return parse_manifest(path)
