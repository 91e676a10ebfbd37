"""Provider manifests: the declarative description of one gateway's dialect.

A manifest (one TOML file per provider in the top-level `manifests/` folder, shipped inside the
wheel) says where a gateway lives, how it authenticates, how each operation is encoded, which
models it serves with which limits, how its answers and errors are shaped and how to discover
models. The dialect code reads only these fields, so a new OpenAI-compatible gateway needs a
manifest, not Python.
"""

from __future__ import annotations

import re
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


class SizeRule(_Strict):
    """Sizes a model takes by rule rather than by list (the gpt-image-2 family, Qwen, Seedream).

    A WxH passes when every bound given holds; `auto`, aspect-ratio tokens ("16:9") and resolution
    tokens ("2K") pass when listed. A bound left out is not checked: the gateway judges it.
    """

    auto: bool = False
    multiple_of: int | None = Field(default=None, ge=1)
    min_side: int | None = Field(default=None, ge=1)
    max_side: int | None = Field(default=None, ge=1)  # the longest side
    max_aspect: float | None = Field(default=None, ge=1)  # longest side / shortest side
    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)
    aspect_ratios: list[str] | None = None  # tokens sent as they are, e.g. "16:9"
    resolutions: list[str] | None = None  # tokens sent as they are, e.g. "2K"


class ModelSpec(_Strict):
    """What is believed about one model. In a manifest, a family or an override, a field left out
    is unknown there and comes from a less specific layer (see resolution.py); after resolution
    the spec is complete, and None means that nothing is known (the gateway judges)."""

    id: str
    family: str | None = None  # a family id from families.toml: treat the model as its member
    capabilities: list[Capability] | None = None
    sizes: list[str] | None = None  # None: any size the size rule (if any) allows
    size_rule: SizeRule | None = None
    default_size: str | None = None
    max_dimension: int | None = None
    min_dimension: int | None = None  # with sizes None: the smallest side a WxH may have
    max_n: int | None = Field(default=None, ge=1)
    max_prompt_chars: int | None = None
    max_input_images: int | None = Field(default=None, ge=1)
    knobs: list[str] | None = None  # canonical knobs this model takes; None: not known
    knob_overrides: dict[str, ParamSpec] = Field(default_factory=dict)
    response_format: bool | None = None  # True: takes it; False: rejects it (gpt-image); None: unknown
    refused_fields: list[str] = Field(default_factory=list)  # wire fields the model is known to refuse
    # Values known to be taken by wire fields that have no canonical knob (passed in `extra`).
    accepted_values: dict[str, list[Any]] = Field(default_factory=dict)
    edit_formats: list[str] | None = None  # input formats the edit accepts, if narrower
    edit_square: bool = False  # dall-e-2 edits want a square image
    shutdown_date: str | None = Field(default=None, pattern=r"^\d{4}-\d{2}-\d{2}$")  # the provider's date
    replacement: str | None = None  # what the provider names instead of a deprecated model
    description: str = ""
    usd_per_image: float | None = None  # what the gateway lists for one image (discovery); spending.py

    def set_fields(self) -> dict[str, Any]:
        """The fields this layer states (given in its source), without the id."""
        return {name: getattr(self, name) for name in self.model_fields_set if name != "id"}


class Family(ModelSpec):
    """Models whose ids match one of `patterns` share this spec, on every gateway serving them."""

    patterns: list[str] = Field(min_length=1)
    extends: str | None = None  # another family whose facts this one starts from

    def matches(self, model_id: str) -> bool:
        return any(re.search(p, model_id, re.I) for p in self.patterns)

    def set_fields(self) -> dict[str, Any]:
        fields = super().set_fields()
        for name in ("patterns", "extends", "family"):
            fields.pop(name, None)
        return fields


class _Families(_Strict):
    families: list[Family]


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
    # The default when the endpoint's served models are not known (no discovery): a current id.
    default_model: str | None = None
    # With discovery: the first served model matching the first pattern that matches any, so the
    # default follows what the gateway serves now instead of an id that may be gone.
    default_preference: list[str] = Field(default_factory=list)
    # Set on gateways that serve ids nobody can list: any id is sent, with these facts (if any).
    unknown_models: ModelSpec | None = None
    # Facts the gateway states for every model it serves, whatever the model's family says
    # (e.g. a gateway that takes `response_format` itself for every model).
    model_defaults: ModelSpec | None = None

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
            for knob in m.knobs or ():
                if knob not in self.params and knob not in m.knob_overrides:
                    raise ValueError(f"models[{m.id}].knobs: {knob!r} is not defined in params")
            if "edit" in (m.capabilities or ()) and "edit" not in self.operations and self.transport == "http":
                raise ValueError(f"models[{m.id}]: can edit but operations.edit is missing")
        for code, kind in self.error_codes.items():
            if kind not in ERROR_KINDS:
                raise ValueError(f"error_codes.{code}: {kind!r} is not one of {', '.join(ERROR_KINDS)}")
        for pattern in self.default_preference:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"default_preference: {pattern!r} is not a regular expression ({exc})") from None
        return self

    def model(self, model_id: str) -> ModelSpec | None:
        """The manifest's own entry for a model (not resolved: see resolution.py)."""
        for m in self.models:
            if m.id == model_id:
                return m
        return None

    def knob(self, model: ModelSpec, name: str) -> ParamSpec | None:
        if model.knobs is None or name not in model.knobs:
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
    return sorted(p.stem for p in manifest_dir().glob("*.toml") if p.name != FAMILIES_FILE)


@cache
def load_manifest(provider: str) -> Manifest:
    """Load one provider's manifest; only the providers in use are ever read."""
    path = manifest_dir() / f"{provider}.toml"
    if not path.is_file() or path.name == FAMILIES_FILE:
        raise ManifestError(f"unknown provider {provider!r}; known providers: {', '.join(available_providers())}")
    return parse_manifest(path)


FAMILIES_FILE = "families.toml"


@cache
def load_families() -> tuple[Family, ...]:
    """The model families, in match order (the first family with a matching pattern wins)."""
    path = manifest_dir() / FAMILIES_FILE
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        families = _Families.model_validate(raw).families
    except FileNotFoundError:
        raise ManifestError(f"model families file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"model families file {path.name} is not valid TOML: {exc}") from None
    except ValidationError as exc:
        raise ManifestError(
            _format_validation_error(path, exc).replace("provider manifest", "model families file")
        ) from None
    ids = [f.id for f in families]
    if len(ids) != len(set(ids)):
        raise ManifestError(f"model families file {path.name}: duplicate family id")
    for f in families:
        seen, parent = {f.id}, f.extends
        while parent is not None:
            if parent not in ids or parent in seen:
                raise ManifestError(f"model families file {path.name}: {f.id} extends {parent!r}: unknown or circular")
            seen.add(parent)
            parent = families[ids.index(parent)].extends
        for p in f.patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ManifestError(f"model families file {path.name}: {f.id}: bad pattern {p!r} ({exc})") from None
    return tuple(families)


def family(family_id: str) -> Family | None:
    return next((f for f in load_families() if f.id == family_id), None)
