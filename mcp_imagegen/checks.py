"""Check a canonical request against a gateway's manifest before any money is spent.

`prepare` turns an `ImageRequest` plus the chosen manifest and model into a `PreparedRequest`: the
size to send, how `n` is split across gateway requests, the knobs under their wire names, and the
warnings for whatever was dropped. Everything that cannot work raises `InvalidRequestError` with a
message that says what is allowed. `fit_inputs` re-encodes input images that a gateway would refuse
(too large, wrong format, not square).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .errors import InvalidRequestError
from .manifests import InputSpec, Manifest, ModelSpec, OperationSpec, ParamSpec, SizeRule
from .models import CANONICAL_KNOBS, CAPABILITIES, ImageRequest, InputImage, Operation

MaskSemantics = Literal["transparent", "white"]

# Standard fields every dialect sets itself; `extra` may not override them.
RESERVED_FIELDS: frozenset[str] = frozenset({"model", "prompt", "n", "size", "response_format"})
# A builtin transport has no operation spec; it takes n and size directly.
_BUILTIN_SENDS: tuple[str, ...] = ("n", "size")
# Cap used when only the format or shape must change (no byte cap in the manifest).
_UNCAPPED_INPUT_BYTES = 64 * 1024 * 1024
_SIZE_RE = re.compile(r"^\s*(\d{1,6})\s*[xX×*]\s*(\d{1,6})\s*$")


@dataclass(slots=True)
class PreparedRequest:
    """A request that passed every check, in the shape the dialect encoder needs."""

    model: ModelSpec
    size: str | None  # the size to send; None when the gateway does not take one
    batches: list[int]  # n per gateway request, sent in parallel
    knobs: dict[str, Any]  # wire name -> validated value
    send_response_format: bool  # ask for b64_json (URLs expire and cost a second download)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # pass-through fields, cleaned
    mask_semantics: MaskSemantics | None = None  # what the gateway's mask marks; None without a mask
    removed: set[str] = field(default_factory=set)  # wire fields never to send (`extra` nulls, refusals)
    added: set[str] = field(default_factory=set)  # wire fields the server chose, not the caller


def _names(models: Sequence[ModelSpec], need: str) -> str:
    found = [m.id for m in models if need in (m.capabilities or ())]
    return ", ".join(found) if found else "none"


def _served(manifest: Manifest) -> list[ModelSpec]:
    from .resolution import resolve

    beliefs = [resolve(m.id, manifest) for m in manifest.models]
    return [b.spec for b in beliefs if not b.shut_down()]


def _operation_spec(manifest: Manifest, operation: Operation) -> OperationSpec | None:
    return manifest.operations.get(operation)


def parse_size(size: str) -> tuple[int, int] | None:
    """(width, height) for 'WxH', None for anything else."""
    m = _SIZE_RE.match(size)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2))


def _check_size(
    request: ImageRequest, model: ModelSpec, sends: Sequence[str], warnings: list[str], where: str
) -> str | None:
    asked = request.size.strip() if isinstance(request.size, str) else request.size
    if asked is not None and not isinstance(asked, str):
        raise InvalidRequestError(f"size must be a string like '1024x1024', not {type(asked).__name__}")
    if "size" not in sends:
        if asked:
            warnings.append(f"{model.id}{where} does not take a size; size {asked!r} dropped")
        return None
    if not asked:
        # The documented default keeps results predictable across gateways; without one the
        # gateway picks (a size the server made up could be refused).
        return model.default_size
    rule = model.size_rule
    if asked.lower() == "auto":
        listed = model.sizes is not None and "auto" in model.sizes
        # Nothing known about sizes: let the gateway judge.
        unknown = model.sizes is None and rule is None and model.max_dimension is None
        if listed or unknown or (rule is not None and rule.auto):
            return "auto"
        raise InvalidRequestError(f"{model.id}{where} does not take size 'auto'{_allowed_sizes(model)}")
    token = _size_token(asked, model)
    if token is not None:
        return token
    dims = parse_size(asked)
    if dims is None:
        if model.sizes is None and rule is None and model.max_dimension is None:
            return asked  # a token this server does not know, for a model it knows nothing of
        raise InvalidRequestError(f"size {asked!r} is not WIDTHxHEIGHT like '1024x1024'{_allowed_sizes(model)}")
    width, height = dims
    normal = f"{width}x{height}"
    if model.sizes is not None:
        if normal in model.sizes:
            return normal
        if rule is None:
            raise InvalidRequestError(
                f"size {asked!r} is not available for {model.id}{where}; allowed sizes: {', '.join(model.sizes)}"
            )
    if rule is not None:
        broken = size_rule_problem(width, height, rule)
        if broken:
            raise InvalidRequestError(
                f"size {normal} is not available for {model.id}{where}: {broken}{_allowed_sizes(model)}"
            )
        return normal
    low, high = model.min_dimension or 1, model.max_dimension
    too_small, too_large = min(width, height) < low, high is not None and max(width, height) > high
    if too_small or too_large:
        bounds = f"from {low} to {high} px" if high is not None else f"at least {low} px"
        raise InvalidRequestError(f"size {normal} is not available for {model.id}{where}: each side must be {bounds}")
    return normal


def _size_token(asked: str, model: ModelSpec) -> str | None:
    """An aspect-ratio ("16:9") or resolution ("2K") token the model takes, in its spelling."""
    rule = model.size_rule
    tokens = list(model.sizes or ())
    if rule is not None:
        tokens += [*(rule.aspect_ratios or ()), *(rule.resolutions or ())]
    by_lower = {t.lower(): t for t in tokens if parse_size(t) is None}
    return by_lower.get(asked.replace(" ", "").lower())


def size_rule_problem(width: int, height: int, rule: SizeRule) -> str | None:
    """The first rule a WxH breaks, stated so that the caller can pick a size that works."""
    long_side, short_side = max(width, height), min(width, height)
    pixels = width * height
    if rule.multiple_of and (width % rule.multiple_of or height % rule.multiple_of):
        return f"both sides must be multiples of {rule.multiple_of}"
    if rule.min_side and short_side < rule.min_side:
        return f"each side must be at least {rule.min_side} px"
    if rule.max_side and long_side > rule.max_side:
        return f"the longest side must be at most {rule.max_side} px"
    if rule.max_aspect and long_side > rule.max_aspect * short_side:
        return f"the aspect ratio must be within {_num(rule.max_aspect)}:1"
    if rule.min_pixels and pixels < rule.min_pixels:
        return f"it must have at least {rule.min_pixels:,} pixels (it has {pixels:,})"
    if rule.max_pixels and pixels > rule.max_pixels:
        return f"it must have at most {rule.max_pixels:,} pixels (it has {pixels:,})"
    if (rule.aspect_ratios or rule.resolutions) and not (
        rule.multiple_of or rule.min_side or rule.max_side or rule.min_pixels or rule.max_pixels
    ):
        return "the model takes aspect-ratio or resolution tokens, not pixel sizes"
    return None


def describe_sizes(model: ModelSpec) -> str:
    """The sizes a model takes, in words (for messages and list_models)."""
    parts: list[str] = []
    if model.sizes:
        parts.append(", ".join(model.sizes))
    rule = model.size_rule
    if rule is not None:
        bounds: list[str] = []
        if rule.auto and not (model.sizes and "auto" in model.sizes):
            bounds.append("auto")
        wxh: list[str] = []
        if rule.multiple_of:
            wxh.append(f"sides multiples of {rule.multiple_of}")
        if rule.min_side:
            wxh.append(f"sides at least {rule.min_side} px")
        if rule.max_side:
            wxh.append(f"longest side at most {rule.max_side} px")
        if rule.max_aspect:
            wxh.append(f"aspect ratio within {_num(rule.max_aspect)}:1")
        if rule.max_pixels:
            wxh.append(f"{rule.min_pixels or 1:,} to {rule.max_pixels:,} pixels")
        elif rule.min_pixels:
            wxh.append(f"at least {rule.min_pixels:,} pixels")
        if wxh:
            bounds.append("WxH with " + ", ".join(wxh))
        if rule.aspect_ratios:
            bounds.append("aspect ratios " + ", ".join(rule.aspect_ratios))
        if rule.resolutions:
            bounds.append("resolutions " + ", ".join(rule.resolutions))
        parts.extend(bounds)
    return "; ".join(parts)


def _allowed_sizes(model: ModelSpec) -> str:
    described = describe_sizes(model)
    return f" (allowed: {described})" if described else ""


def _coerce(name: str, spec: ParamSpec, value: Any) -> Any:
    """The value in the knob's type; strings from a command line are accepted when they parse."""
    kind = spec.type
    bad = InvalidRequestError(f"{name} must be {'an' if kind == 'integer' else 'a'} {kind}, not {value!r}")
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise bad
    if kind == "string":
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        try:
            value = float(value.strip()) if kind == "number" or "." in value or "e" in value.lower() else int(value)
        except ValueError:
            raise bad from None
    if not isinstance(value, int | float):
        raise bad
    if isinstance(value, float) and not math.isfinite(value):
        raise bad
    if kind == "integer":
        if isinstance(value, float):
            if not value.is_integer():
                raise bad
            value = int(value)
        return value
    return value


def _check_knob(name: str, spec: ParamSpec, value: Any) -> Any:
    value = _coerce(name, spec, value)
    if spec.enum is not None:
        if isinstance(value, str):
            # Accept any capitalisation, send the manifest's spelling.
            by_lower = {str(e).lower(): e for e in spec.enum}
            if value.lower() in by_lower:
                return by_lower[value.lower()]
        elif value in spec.enum:
            return value
        raise InvalidRequestError(f"{name}={value!r} is not allowed; use one of: {', '.join(map(str, spec.enum))}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = spec.min, spec.max
        if (low is not None and value < low) or (high is not None and value > high):
            lo = _num(low) if low is not None else "-∞"
            hi = _num(high) if high is not None else "∞"
            raise InvalidRequestError(f"{name}={value!r} is out of range; allowed range is {lo} to {hi}")
    return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _batches(n: int, per_request: int) -> list[int]:
    per_request = max(1, per_request)
    full, rest = divmod(n, per_request)
    return [per_request] * full + ([rest] if rest else [])


def prepare(
    request: ImageRequest,
    manifest: Manifest,
    model: ModelSpec,
    *,
    max_total_n: int = 10,
    endpoint: str | None = None,
    endpoint_models: Sequence[ModelSpec] | None = None,
    takes: Mapping[str, str] | None = None,
) -> PreparedRequest:
    """Validate `request` for `model` on this gateway; raise InvalidRequestError when it cannot work.

    `model` is a resolved spec (resolution.py): a None field is unknown, and only what is known
    to be false is refused here; the gateway judges the rest. `endpoint` names the endpoint in
    messages; `endpoint_models` are the models it serves (the manifest's by default), listed when
    the chosen model cannot do what was asked; `takes` says, per wire field, what the model is
    known to take (from what the gateway taught), for the message when a field is refused.
    """
    models = list(endpoint_models) if endpoint_models is not None else _served(manifest)
    where = f" on {endpoint!r}" if endpoint else ""
    warnings: list[str] = []
    operation = request.operation
    refused = set(model.refused_fields)
    capabilities = model.capabilities if model.capabilities is not None else list(CAPABILITIES)

    if operation not in capabilities:
        verb = "edit images" if operation == "edit" else "generate images"
        raise InvalidRequestError(f"{model.id}{where} cannot {verb}; models here that can: {_names(models, operation)}")
    op_spec = _operation_spec(manifest, operation)
    if op_spec is None and manifest.transport == "http":
        raise InvalidRequestError(f"{manifest.name} has no {operation} operation")
    sends: Sequence[str] = [f for f in (op_spec.sends if op_spec is not None else _BUILTIN_SENDS) if f not in refused]

    # --- extra: values of null remove a field from what is sent ---
    extra = {k: v for k, v in request.extra.items() if v is not None}
    removed = {k for k, v in request.extra.items() if v is None}
    if removed & {"model", "prompt"}:
        raise InvalidRequestError("extra cannot remove model or prompt; every gateway needs them")

    # --- prompt and n ---
    prompt = request.prompt if isinstance(request.prompt, str) else ""
    if not prompt.strip():
        raise InvalidRequestError("prompt is empty; describe the image you want")
    if model.max_prompt_chars is not None and len(prompt) > model.max_prompt_chars:
        raise InvalidRequestError(
            f"prompt is {len(prompt)} characters; {model.id} takes at most {model.max_prompt_chars}"
        )
    n = request.n
    if isinstance(n, bool) or not isinstance(n, int):
        raise InvalidRequestError(f"n must be a whole number from 1 to {max_total_n}, not {n!r}")
    if n < 1:
        raise InvalidRequestError(f"n={n} is too small; ask for at least 1 image")
    if n > max_total_n:
        raise InvalidRequestError(f"n={n} is more than the {max_total_n} allowed per call")

    if "size" in removed:
        sends = [f for f in sends if f != "size"]
    size = _check_size(request, model, sends, warnings, where)
    added: set[str] = set()
    if size is not None and not request.size:
        added.add("size")

    # --- knobs ---
    knobs: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in request.knobs.items():
        if value is None:
            continue
        if model.knobs is None:
            # What the model takes is not known: send it as asked; the gateway judges. A knob
            # the gateway's manifest declares (for every model it serves) is still checked.
            declared = manifest.params.get(name)
            wire = declared.wire_name(name) if declared else name
            knobs[wire] = _check_knob(name, declared, value) if declared else value
            continue
        spec = manifest.knob(model, name) if name in CANONICAL_KNOBS else None
        if spec is None:
            dropped.append(name)
            continue
        knobs[spec.wire_name(name)] = _check_knob(name, spec, value)
    if dropped:
        takes_knobs = ", ".join(model.knobs) if model.knobs else "none"
        warnings.append(f"{model.id}{where} does not take {', '.join(dropped)}; dropped (it takes: {takes_knobs})")

    # --- response_format: ours to choose, and only sent where it is known to be taken ---
    takes_format = model.response_format is True and "response_format" in sends and "response_format" not in removed
    if "response_format" in extra:
        asked = extra.pop("response_format")
        if model.response_format is False:
            warnings.append(f"{model.id} always returns base64; response_format dropped")
        elif "response_format" not in sends:
            warnings.append(f"{model.id}{where} does not take response_format; dropped")
        elif asked != "b64_json":
            warnings.append(f"response_format {asked!r} dropped: the server asks for b64_json (result URLs expire)")
    if takes_format:
        added.add("response_format")

    # --- fields the model is known to refuse: never sent unasked, refused when asked ---
    asked_refused = sorted((set(knobs) | set(extra) | ({"size"} if request.size else set())) & refused)
    if asked_refused:
        name = asked_refused[0]
        what = (takes or {}).get(name) or f"{model.id} does not take {name}"
        raise InvalidRequestError(
            f"{name} cannot be sent to {model.id}{where}: {what}; remove {name} "
            f"(it was refused by the gateway or is documented as not taken)"
        )

    for name, value in extra.items():
        allowed = model.accepted_values.get(name)
        if allowed is not None and value not in allowed:
            raise InvalidRequestError(
                f"{name}={value!r} is not taken by {model.id}{where}; use one of: {', '.join(map(str, allowed))}"
            )

    # --- edits: inputs and mask ---
    inputs: InputSpec | None = op_spec.inputs if op_spec is not None else None
    mask_semantics: MaskSemantics | None = None
    if operation == "edit":
        count = len(request.images)
        if count == 0:
            raise InvalidRequestError("edit needs at least one input image")
        if count > 1 and "multi_image" not in capabilities:
            raise InvalidRequestError(
                f"{model.id}{where} edits one image at a time, {count} were given; "
                f"models here that take several: {_names(models, 'multi_image')}"
            )
        if model.max_input_images is not None and count > model.max_input_images:
            raise InvalidRequestError(
                f"{count} input images given; {model.id}{where} takes at most {model.max_input_images}"
            )
        if request.mask is not None:
            if "mask" not in capabilities:
                raise InvalidRequestError(
                    f"{model.id}{where} does not take a mask; models here that do: {_names(models, 'mask')}"
                )
            if inputs is not None and inputs.encoding != "gemini_contents" and not inputs.mask_field:
                raise InvalidRequestError(f"{manifest.name} has no way to send a mask")
            mask_semantics = inputs.mask_semantics if inputs is not None else "transparent"
        if inputs is None and manifest.transport == "http":
            raise InvalidRequestError(f"{manifest.name} does not say how input images travel")
        if count > 1 and inputs is not None and inputs.encoding == "data_url_fields" and not inputs.multi_image_field:
            raise InvalidRequestError(f"{manifest.name} has no field for several input images")
    elif request.images or request.mask is not None:
        raise InvalidRequestError("input images and masks belong to edit_image, not generate_image")

    # --- extra: pass-through, but never over a field we set ---
    ours = set(RESERVED_FIELDS) | set(knobs)
    if inputs is not None and operation == "edit":
        ours |= {f for f in (inputs.image_field, inputs.multi_image_field, inputs.mask_field) if f}
        if inputs.encoding == "gemini_contents":
            ours.add("contents")
    clash = sorted(k for k in extra if k in ours)
    if clash:
        raise InvalidRequestError(
            f"extra sets {', '.join(clash)}, which the server sets itself; use the matching argument instead"
        )

    # --- fan-out ---
    per_request = max(1, model.max_n or 1) if "n" in sends and "n" not in removed else 1
    batches = _batches(n, per_request)
    if len(batches) > 1:
        split = "+".join(map(str, batches))
        if "n" in sends:
            why = f"{model.id}{where} returns at most {per_request} image{'s' if per_request > 1 else ''} per request"
        else:
            why = f"{manifest.name} takes no n" if "n" not in refused else f"{model.id}{where} takes no n"
        warnings.append(f"{why}; sent {len(batches)} parallel requests ({split})")
    if "n" not in sends:
        removed.add("n")
    removed |= refused - set(knobs) - set(extra)

    return PreparedRequest(
        model=model,
        size=size,
        batches=batches,
        knobs=knobs,
        send_response_format=takes_format,
        warnings=warnings,
        extra=extra,
        mask_semantics=mask_semantics,
        removed=removed,
        added=added,
    )


def data_url_raw_cap(max_encoded: int, mimes: Sequence[str]) -> int:
    """Largest raw size whose data URL (prefix + base64) still fits in `max_encoded` characters."""
    prefix = max((len(f"data:{m};base64,") for m in mimes), default=len("data:image/png;base64,"))
    return max(0, (max_encoded - prefix) // 4 * 3)


def fit_inputs(
    images: Sequence[InputImage], manifest: Manifest, model: ModelSpec
) -> tuple[list[InputImage], list[str]]:
    """Re-encode input images the gateway would refuse; returns the images to send and notes.

    Runs Pillow work: call it in a worker thread.
    """
    op_spec = manifest.operations.get("edit")
    inputs = op_spec.inputs if op_spec is not None else None
    if inputs is None:
        return list(images), []
    formats = list(model.edit_formats or inputs.formats)
    if model.edit_formats:
        # Both limits hold: the model's formats that the transport also takes, if any.
        narrowed = [f for f in model.edit_formats if f in inputs.formats]
        formats = narrowed or list(model.edit_formats)
    square = model.edit_square
    if inputs.max_input_bytes is None:
        raw_cap = None
    elif inputs.encoding in ("data_url_fields", "gemini_contents"):
        raw_cap = data_url_raw_cap(inputs.max_input_bytes, formats)
    else:
        raw_cap = inputs.max_input_bytes

    out: list[InputImage] = []
    notes: list[str] = []
    for img in images:
        too_big = raw_cap is not None and len(img.data) > raw_cap
        wrong_format = img.mime_type not in formats
        not_square = square and img.width != img.height
        if not (too_big or wrong_format or not_square):
            out.append(img)
            continue
        from . import images as pipeline  # Pillow is only needed when something must change

        data, mime, note = pipeline.fit_image(
            img.data,
            raw_cap if raw_cap is not None else _UNCAPPED_INPUT_BYTES,
            formats,
            square=square,
            source=img.source,
        )
        width, height = _dimensions(data, img)
        out.append(replace(img, data=data, mime_type=mime, width=width, height=height))
        if note:
            notes.append(note)
    return out, notes


def _dimensions(data: bytes, fallback: InputImage) -> tuple[int, int]:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # the pipeline already validated it; keep the old numbers if Pillow balks
        return fallback.width, fallback.height
