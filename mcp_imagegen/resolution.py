"""What the server believes about model M on endpoint E, and why.

A model's spec is built in layers, each stating only the fields it knows; a later layer overrides
only the fields it sets:

1. generic fallback (assumed): any operation may work, one image per request;
2. the manifest's `unknown_models` template, on gateways that serve ids nobody lists (manifest);
3. the model's family from `manifests/families.toml`, matched by id pattern (family);
4. the manifest's `model_defaults`: what the gateway itself does for every model (manifest);
5. the gateway's own discovery answer, field by field: a field it leaves out is unknown, and a
   capability it does not mention keeps its value from below (discovered);
6. the gateway manifest's entry for that exact id (manifest);
7. the endpoint's `model_overrides` in the configuration (configured);
8. what the gateway's 400 answers taught (learned, see learning.py).

Discovery sits above the family because it is the gateway's word about the model *there* (DESIGN
§6: "discovery as the truth where it exists"), and below the manifest entry, which a person wrote
for that gateway. Every field keeps the layer it came from, so the server can tell an assumption
(never sent unasked, never a reason to refuse) from a fact.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .manifests import Family, Manifest, ModelSpec, ParamSpec, family, load_families
from .models import CAPABILITIES, Capability

if TYPE_CHECKING:
    from .dialects import DiscoveredModel
    from .learning import Lesson

Provenance = Literal["manifest", "family", "discovered", "learned", "configured", "assumed"]

# What is assumed of a model nothing is known about: every operation may work (the gateway
# judges), and one image per request, which every gateway takes (n is reached by parallel calls).
GENERIC: dict[str, Any] = {"capabilities": list(CAPABILITIES), "max_n": 1}
_DICT_FIELDS = frozenset({"knob_overrides", "accepted_values"})


@dataclass(frozen=True, slots=True)
class Belief:
    """A resolved spec, where each field came from, and the notes worth telling a person."""

    spec: ModelSpec
    sources: Mapping[str, Provenance]
    family: str | None = None
    lessons: tuple[Lesson, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        return self.spec.id

    def source(self, name: str) -> Provenance:
        return self.sources.get(name, "assumed")

    def known(self, name: str) -> bool:
        """Whether a field's value is a fact (from any layer but the generic fallback)."""
        return self.source(name) != "assumed"

    def shut_down(self, today: dt.date | None = None) -> bool:
        day = _date(self.spec.shutdown_date)
        return day is not None and day <= (today or _today())

    def deprecation(self, today: dt.date | None = None, *, instead: str | None = None) -> str | None:
        """A warning for a model with a shutdown date still ahead, naming the date and what to use
        instead (the provider's named replacement, else `instead`)."""
        day = _date(self.spec.shutdown_date)
        if day is None or day <= (today or _today()):
            return None
        replacement = self.spec.replacement or instead
        instead = f"; use {replacement} instead" if replacement else ""
        return f"{self.id} is deprecated and shuts down on {day.isoformat()}{instead}"


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def _date(value: str | None) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        return None


def family_for(model_id: str, named: str | None = None) -> Family | None:
    """The family a model belongs to: the one named (by a manifest entry or override), else the
    first whose pattern matches the id."""
    if named:
        return family(named)
    return next((f for f in load_families() if f.matches(model_id)), None)


def _family_fields(fam: Family) -> dict[str, Any]:
    chain: list[Family] = []
    current: Family | None = fam
    while current is not None:
        chain.append(current)
        current = family(current.extends) if current.extends else None
    fields: dict[str, Any] = {}
    for member in reversed(chain):  # the root first, so the most specific family wins
        _merge_into(fields, member.set_fields())
    return fields


def _merge_into(fields: dict[str, Any], layer: Mapping[str, Any]) -> None:
    # A list of sizes and a size rule are one fact: a layer that states one replaces both.
    if "sizes" in layer and "size_rule" not in layer:
        fields["size_rule"] = None
    elif "size_rule" in layer and "sizes" not in layer:
        fields["sizes"] = None
    for name, value in layer.items():
        if name in _DICT_FIELDS and isinstance(value, dict):
            fields[name] = {**fields.get(name, {}), **value}
        else:
            fields[name] = value


def discovered_fields(found: DiscoveredModel, current_caps: Iterable[Capability]) -> dict[str, Any]:
    """The fields a discovery answer states; capabilities merge one by one (missing = unknown)."""
    fields: dict[str, Any] = {}
    if found.capabilities is not None or found.lacks:
        caps = [c for c in current_caps if c not in found.lacks]
        caps += [c for c in (found.capabilities or ()) if c not in caps]
        fields["capabilities"] = [c for c in CAPABILITIES if c in caps]
    if found.sizes:
        fields["sizes"] = list(found.sizes)
    if found.max_n:
        fields["max_n"] = found.max_n
    if found.max_input_images:
        fields["max_input_images"] = found.max_input_images
    if found.knobs:
        fields["knobs"] = list(found.knobs)
        fields["knob_overrides"] = dict(found.knobs)
    if found.shutdown_date:
        fields["shutdown_date"] = found.shutdown_date
    if found.description:
        fields["description"] = found.description
    if found.usd_per_image is not None:
        fields["usd_per_image"] = found.usd_per_image
    return fields


def resolve(
    model_id: str,
    manifest: Manifest,
    *,
    discovered: DiscoveredModel | None = None,
    override: ModelSpec | None = None,
    lessons: Iterable[Lesson] = (),
) -> Belief:
    """Everything believed about `model_id` on a gateway with this manifest, layer by layer."""
    entry = manifest.model(model_id)
    fields: dict[str, Any] = {}
    sources: dict[str, Provenance] = {}

    def layer(provenance: Provenance, values: Mapping[str, Any]) -> None:
        _merge_into(fields, values)
        for name in values:
            sources[name] = provenance

    builtin = manifest.transport == "builtin"
    if not builtin:
        layer("assumed", GENERIC)
    if entry is None and manifest.unknown_models is not None:
        layer("manifest", manifest.unknown_models.set_fields())
    named = (override.family if override else None) or (entry.family if entry else None)
    fam = None if builtin else family_for(model_id, named)
    if fam is not None:
        layer("family", _family_fields(fam))
    if manifest.model_defaults is not None:
        layer("manifest", manifest.model_defaults.set_fields())
    if discovered is not None:
        layer("discovered", discovered_fields(discovered, fields.get("capabilities", ())))
    if entry is not None:
        layer("manifest", entry.set_fields())
    if override is not None:
        layer("configured", override.set_fields())
    taught = tuple(lessons)
    if taught:
        from .learning import apply_lessons

        layer("learned", apply_lessons(fields, taught))
    fields.pop("family", None)
    _limit_to_operations(fields, sources, manifest)
    if discovered is not None and not discovered.shutdown_date and sources.get("shutdown_date") != "configured":
        # The gateway lists the model with no date: whatever its maker did, this gateway serves it.
        fields.pop("shutdown_date", None)
    spec = ModelSpec.model_validate({"id": model_id, **_plain(fields)})
    notes = [lesson.note() for lesson in taught]
    return Belief(spec=spec, sources=sources, family=fam.id if fam else None, lessons=taught, notes=tuple(notes))


def _limit_to_operations(fields: dict[str, Any], sources: dict[str, Provenance], manifest: Manifest) -> None:
    """A gateway without an edit operation (or a multipart edit without a mask field) cannot do
    what the model could elsewhere: that is known false here, whatever the family says."""
    if manifest.transport != "http":
        return
    caps = list(fields.get("capabilities") or ())
    edit = manifest.operations.get("edit")
    inputs = edit.inputs if edit else None
    if inputs is None:
        caps = [c for c in caps if c == "generate"]
    elif inputs.encoding == "multipart" and not inputs.mask_field:
        caps = [c for c in caps if c != "mask"]
    if caps != list(fields.get("capabilities") or ()):
        fields["capabilities"] = caps
        sources["capabilities"] = "manifest"


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    # Nested models go back to plain values so the spec validates (and copies) as a whole.
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "knob_overrides":
            value = {k: v.model_dump(exclude_unset=True) if isinstance(v, ParamSpec) else v for k, v in value.items()}
        elif hasattr(value, "model_dump"):
            value = value.model_dump(exclude_unset=True)
        out[name] = value
    return out


def describe_sources(belief: Belief) -> dict[str, str]:
    """Provenance of the fields a person cares about, for list_models."""
    wanted = ("capabilities", "sizes", "size_rule", "max_n", "max_input_images", "knobs", "response_format")
    return {name: belief.source(name) for name in wanted if name in belief.sources}
