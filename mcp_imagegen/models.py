"""Canonical data types that flow between the stages: request in, saved images out.

Nothing here knows a gateway's dialect or MCP; the dialects translate to and from these, and the
MCP surface and the command line build them from their arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Operation = Literal["generate", "edit"]
# How a saved image came to be: made by a gateway, or brought in by the person (the studio app).
Origin = Literal["generate", "edit", "import"]
Capability = Literal["generate", "edit", "mask", "multi_image"]
CAPABILITIES: tuple[Capability, ...] = ("generate", "edit", "mask", "multi_image")

# Knobs with a canonical name. Anything else travels in `extra`, passed to the gateway as is.
CANONICAL_KNOBS: tuple[str, ...] = (
    "quality",
    "style",
    "seed",
    "strength",
    "guidance_scale",
    "num_inference_steps",
    "negative_prompt",
    "background",
    "output_format",
)


def given_knobs(**values: Any) -> dict[str, Any]:
    """The canonical knobs a caller actually set (None means not given)."""
    unknown = set(values) - set(CANONICAL_KNOBS)
    if unknown:
        raise ValueError(f"not canonical knobs: {sorted(unknown)}")
    return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True, slots=True)
class InputImage:
    """An image given to an edit, already read and sniffed (see images.sniff)."""

    data: bytes
    mime_type: str
    width: int
    height: int
    source: str  # where it came from, for messages ("file photo.png", "imagegen://images/..")
    image_id: str | None = None  # set when it is an image this server saved (for lineage)


@dataclass(slots=True)
class ImageRequest:
    """One canonical request, validated field by field before any gateway sees it."""

    operation: Operation
    prompt: str
    model: str | None = None
    endpoint: str | None = None
    n: int = 1
    size: str | None = None
    images: list[InputImage] = field(default_factory=list)
    mask: InputImage | None = None
    knobs: dict[str, Any] = field(default_factory=dict)  # canonical knob name -> value
    extra: dict[str, Any] = field(default_factory=dict)  # passed through under wire names


@dataclass(frozen=True, slots=True)
class WireImage:
    """One image as a gateway returned it, after the envelope is removed."""

    b64: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


@dataclass(slots=True)
class WireResult:
    """A decoded gateway answer: images still in transport form, plus accounting."""

    images: list[WireImage]
    usage: dict[str, Any] | None = None
    cost: float | None = None
    balance: float | None = None
    raw_extra: dict[str, Any] = field(default_factory=dict)


class SavedImage(BaseModel):
    """An image written to the store, as results and resources describe it."""

    model_config = ConfigDict(extra="ignore")

    id: str
    uri: str
    path: str
    mime_type: str
    width: int
    height: int
    bytes: int
    revised_prompt: str | None = None
    frames: int | None = None  # GIFs: the frame count (more than 1: animated)
    url: str | None = None  # a presigned link where images live in a bucket, made fresh on each read


class ImageRecord(SavedImage):
    """A saved image with the metadata that outlives the process."""

    prompt: str
    operation: Origin
    model: str
    endpoint: str
    provider: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    parent_ids: list[str] = Field(default_factory=list)
    created_at: str  # ISO 8601, UTC
    job_id: str | None = None
    owner: str = "local"  # owners.py: the person it belongs to; older records are the local owner's


class ModelInfo(BaseModel):
    """One model on one endpoint, as list_models returns it."""

    id: str
    endpoint: str
    provider: str
    capabilities: list[Capability]
    sizes: list[str] | None = None
    size_rules: str | None = Field(default=None, description="sizes taken by rule (multiples, bounds, tokens)")
    max_n: int | None = None
    max_input_images: int | None = None
    parameters: list[str] = Field(default_factory=list, description="canonical knobs the model takes")
    source: Literal["manifest", "discovered", "configured"] = "manifest"
    family: str | None = Field(default=None, description="the model family whose rules apply")
    facts: dict[str, str] = Field(
        default_factory=dict,
        description="where each fact comes from: manifest, family, discovered, learned, configured or assumed",
    )
    notes: list[str] = Field(default_factory=list, description="deprecation and what the gateway taught")


class GenerationResult(BaseModel):
    """What generate and edit hand back; the structured content of the tools."""

    images: list[SavedImage]
    model: str
    endpoint: str
    provider: str
    warnings: list[str] = Field(default_factory=list)
    usage: dict[str, Any] | None = None
    cost: float | None = None
    balance: float | None = None
    elapsed_s: float = 0.0
    job_id: str | None = None
