"""Model resolution in layers, size rules, `extra` nulls, learning from 400s, and model_overrides.

Unit tests of the pure parts; test_open_world.py drives the same through the gateway emulators.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest

from mcp_imagegen.checks import prepare
from mcp_imagegen.config import load_settings
from mcp_imagegen.dialects import DiscoveredModel, classify_error, decode_models, encode
from mcp_imagegen.errors import ConfigError, InvalidRequestError, ModelNotFoundError
from mcp_imagegen.learning import LearnedFacts, Lesson, lesson_from
from mcp_imagegen.manifests import ModelSpec, load_families, load_manifest
from mcp_imagegen.models import ImageRequest, InputImage
from mcp_imagegen.resolution import family_for, resolve

# Ids no manifest names: what a gateway may serve tomorrow.
NEW_POINT_RELEASE = "gpt-image-2.7-zephyr"
NEW_GENERATION = "gpt-image-3-preview"
NOBODY_KNOWS = "acme-diffusion-9"


def gen(**kw: object) -> ImageRequest:
    return ImageRequest(operation="generate", prompt="a red fox", **kw)  # type: ignore[arg-type]


def img() -> InputImage:
    return InputImage(data=b"\x89PNG", mime_type="image/png", width=64, height=64, source="test")


# --- families -----------------------------------------------------------------------------------


def test_families_load_and_every_family_states_its_capabilities() -> None:
    families = load_families()
    assert families[0].id == "gpt-image-2.6"  # most specific first: the first match wins
    for fam in families:
        as_member = ModelSpec.model_validate({"id": "x", "family": fam.id})
        belief = resolve("x", load_manifest("openai-compatible"), override=as_member)
        assert belief.family == fam.id and belief.source("capabilities") == "family", fam.id


@pytest.mark.parametrize(
    ("model_id", "family"),
    [
        ("gpt-image-2", "gpt-image-2"),
        ("gpt-image-2.5-flare", "gpt-image-2.5"),
        ("gpt-image-2.6-sunburst", "gpt-image-2.6"),
        (NEW_POINT_RELEASE, "gpt-image-2.5"),  # 2.5's rules hold for later point releases
        ("gpt-image-2-mini", "gpt-image-2"),
        (NEW_GENERATION, "gpt-image"),  # a new generation gets only what all gpt-image share
        ("gpt-image-1.5", "gpt-image-1"),
        ("chatgpt-image-latest", "gpt-image-1"),
        ("gpt-image-20", "gpt-image"),  # not gpt-image-2
        ("gemini-3.1-flash-image-preview", "gemini-3.1-image"),
        ("gemini-2.5-flash-image", "gemini-image"),
        ("flux-kontext-pro", "flux-kontext"),
        ("flux-2-pro", "flux-2"),
        ("seedream-4.5", "seedream-4"),
        ("qwen-image-edit-plus", "qwen-image-edit"),
        ("recraft-v3", "recraft"),
        ("dall-e-9", None),
        (NOBODY_KNOWS, None),
    ],
)
def test_ids_match_families_by_pattern(model_id: str, family: str | None) -> None:
    found = family_for(model_id)
    assert (found.id if found else None) == family


def test_a_new_point_release_gets_its_familys_rules_with_provenance() -> None:
    belief = resolve(NEW_POINT_RELEASE, load_manifest("openai-compatible"))
    spec = belief.spec
    assert belief.family == "gpt-image-2.5"
    assert set(spec.capabilities or ()) == {"generate", "edit", "mask", "multi_image"}
    assert (spec.max_n, spec.max_input_images, spec.response_format) == (10, 16, False)
    assert spec.knob_overrides["quality"].enum == ["low", "medium", "high", "auto", "xhigh", "max"]
    assert "complexity" in spec.refused_fields and "input_fidelity" in spec.refused_fields
    assert belief.source("capabilities") == "family" and belief.source("size_rule") == "family"
    assert belief.known("response_format")


def test_complexity_and_svg_only_on_2_6() -> None:
    oc = load_manifest("openai-compatible")
    six = resolve("gpt-image-2.6-flare", oc).spec
    assert "complexity" not in six.refused_fields
    assert prepare(gen(extra={"complexity": "high"}), oc, six).extra == {"complexity": "high"}
    with pytest.raises(InvalidRequestError, match="low, medium, high"):
        prepare(gen(extra={"complexity": "extreme"}), oc, six)
    with pytest.raises(InvalidRequestError, match="complexity"):
        prepare(gen(extra={"complexity": "high"}), oc, resolve("gpt-image-2.5-flare", oc).spec)
    assert "svg" in (six.knob_overrides["output_format"].enum or [])
    two = resolve("gpt-image-2", oc).spec
    assert "svg" not in (two.knob_overrides["output_format"].enum or [])
    assert two.knob_overrides["background"].enum == ["opaque", "auto"]  # no transparent background


def test_nothing_known_means_assumed_and_nothing_sent_unasked() -> None:
    oc = load_manifest("openai-compatible")
    belief = resolve(NOBODY_KNOWS, oc)
    assert belief.family is None and not belief.known("capabilities") and not belief.known("max_n")
    assert belief.spec.response_format is None and belief.spec.knobs is None
    p = prepare(gen(n=3, knobs={"quality": "ultra"}), oc, belief.spec)
    wire = encode(oc, p, gen(n=3, knobs={"quality": "ultra"}), p.batches[0])
    assert wire.json == {"model": NOBODY_KNOWS, "prompt": "a red fox", "n": 1, "quality": "ultra"}
    assert p.batches == [1, 1, 1]


def test_layers_override_only_the_fields_they_set() -> None:
    nano = load_manifest("nano-gpt")
    # The manifest entry (max_n 4, no mask) over the family (max_n 10, masks), field by field:
    # what the entry leaves out (the knobs) still comes from the family.
    belief = resolve("gpt-image-1", nano)
    assert belief.spec.max_n == 4 and belief.source("max_n") == "manifest"
    assert belief.spec.capabilities == ["generate", "edit", "multi_image"]
    assert belief.spec.knobs == ["quality", "background", "output_format"] and belief.source("knobs") == "family"
    # The gateway's own default (it converts formats itself) over the family's refusal.
    assert belief.spec.response_format is True and belief.source("response_format") == "manifest"
    # Configuration over everything but what the gateway taught.
    override = ModelSpec.model_validate({"id": "gpt-image-1", "max_n": 2})
    lesson = Lesson(field="quality", refused=True, said="Unknown parameter: 'quality'", learned_at=time.time())
    belief = resolve("gpt-image-1", nano, override=override, lessons=[lesson])
    assert belief.spec.max_n == 2 and belief.source("max_n") == "configured"
    assert "quality" not in (belief.spec.knobs or []) and "quality" in belief.spec.refused_fields
    assert belief.source("refused_fields") == "learned"
    assert "learned from the gateway" in belief.notes[0] and "quality" in belief.notes[0]


def test_an_override_can_name_the_family() -> None:
    oc = load_manifest("openai-compatible")
    override = ModelSpec.model_validate({"id": NOBODY_KNOWS, "family": "gpt-image-2", "max_input_images": 4})
    belief = resolve(NOBODY_KNOWS, oc, override=override)
    assert belief.family == "gpt-image-2" and belief.spec.size_rule is not None
    assert belief.spec.max_input_images == 4 and belief.source("max_input_images") == "configured"


# --- discovery, merged field by field -------------------------------------------------------------


def nano_discovery(capabilities: dict[str, bool], **params: object) -> list[DiscoveredModel]:
    doc = {"data": [{"id": "m", "capabilities": capabilities, "supported_parameters": params}]}
    return decode_models(load_manifest("nano-gpt"), doc)


def test_discovery_leaving_a_capability_out_keeps_the_manifests() -> None:
    nano = load_manifest("nano-gpt")
    # nano-gpt's list says text-to-image and image-to-image, and is silent about several inputs.
    [found] = nano_discovery({"text_to_image": True, "image_to_image": True})
    for model_id in ("gpt-image-1", "flux-kontext"):
        belief = resolve(model_id, nano, discovered=DiscoveredModel(model_id, found.capabilities, found.lacks))
        assert "multi_image" in (belief.spec.capabilities or ()), model_id


def test_discovery_saying_no_removes_a_family_capability() -> None:
    nano = load_manifest("nano-gpt")
    [found] = nano_discovery({"text_to_image": True, "image_to_image": True, "inpainting": False})
    belief = resolve("gpt-image-2", nano, discovered=DiscoveredModel("gpt-image-2", found.capabilities, found.lacks))
    assert belief.spec.capabilities == ["generate", "edit", "multi_image"]  # the family has mask; nano says no
    assert belief.source("capabilities") == "discovered"


def test_typed_parameter_schemas_become_checked_knobs() -> None:
    nano = load_manifest("nano-gpt")
    [found] = nano_discovery(
        {"text_to_image": True},
        strength={"min": 0, "max": 1},
        seed={"type": "integer"},
        quality={"type": "string", "enum": ["draft", "final"]},
        kontext_max_mode={"type": "boolean"},  # not canonical: it travels in extra
    )
    assert found.knobs is not None and set(found.knobs) == {"strength", "seed", "quality"}
    spec = resolve("m", nano, discovered=found).spec
    assert prepare(gen(knobs={"quality": "FINAL", "seed": "7"}), nano, spec).knobs == {"quality": "final", "seed": 7}
    with pytest.raises(InvalidRequestError, match="draft, final"):
        prepare(gen(knobs={"quality": "hd"}), nano, spec)
    with pytest.raises(InvalidRequestError, match="0 to 1"):
        prepare(gen(knobs={"strength": 3}), nano, spec)


def test_openai_shutdown_dates() -> None:
    doc = {
        "data": [
            {"id": "gpt-image-2", "shutdown_date": None},
            {"id": "gpt-image-1", "shutdown_date": "2026-10-23"},
            {"id": "gpt-image-2.5-flare", "shutdown_date": "2999-01-31"},
        ]
    }
    found = {d.id: d for d in decode_models(load_manifest("openai"), doc)}
    oc = load_manifest("openai-compatible")
    assert not resolve("gpt-image-2", oc, discovered=found["gpt-image-2"]).shut_down()
    assert resolve("gpt-image-1", oc, discovered=found["gpt-image-1"]).shut_down()
    later = resolve("gpt-image-2.5-flare", oc, discovered=found["gpt-image-2.5-flare"])
    assert not later.shut_down()
    assert later.deprecation() == "gpt-image-2.5-flare is deprecated and shuts down on 2999-01-31"
    manifest_says = resolve("dall-e-3", load_manifest("openai"))
    assert manifest_says.shut_down(dt.date(2026, 12, 2)) and manifest_says.spec.replacement == "gpt-image-2"
    assert not manifest_says.shut_down(dt.date(2026, 5, 11))


# --- size rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "rule"),
    [
        ("1000x1000", "multiples of 16"),
        ("3856x1296", "longest side must be at most 3840"),
        ("3072x1008", "within 3:1"),
        ("512x512", "at least 655,360 pixels"),
        ("3840x2176", "at most 8,294,400 pixels"),
        ("16:9", "not WIDTHxHEIGHT"),
    ],
)
def test_gpt_image_2_size_rules_refuse_with_the_rule(size: str, rule: str) -> None:
    oa = load_manifest("openai")
    with pytest.raises(InvalidRequestError, match=rule) as err:
        prepare(gen(size=size), oa, resolve("gpt-image-2", oa).spec)
    assert size in err.value.message


@pytest.mark.parametrize("size", ["auto", "1024x1024", "1536x1024", "3840x2160", "2880x960", "1024x640"])
def test_gpt_image_2_sizes_by_rule(size: str) -> None:
    oa = load_manifest("openai")
    assert prepare(gen(size=size), oa, resolve("gpt-image-2.6-flare", oa).spec).size == size


def test_tokens_for_families_that_take_them() -> None:
    oc = load_manifest("openai-compatible")
    gemini = resolve("gemini-3.1-flash-image-preview", oc).spec
    assert prepare(gen(size="2k"), oc, gemini).size == "2K"
    assert prepare(gen(size="8:1"), oc, gemini).size == "8:1"
    with pytest.raises(InvalidRequestError, match="aspect-ratio or resolution tokens"):
        prepare(gen(size="1024x1024"), oc, gemini)
    with pytest.raises(InvalidRequestError, match="8:1"):
        prepare(gen(size="8:1"), oc, resolve("gemini-2.5-flash-image", oc).spec)  # newer models only
    qwen = resolve("qwen-image-edit", oc).spec
    edit = ImageRequest(operation="edit", prompt="x", images=[img()], size="1000x1000")
    assert prepare(edit, oc, qwen).size == "1000x1000"
    edit.size = "2056x1024"
    with pytest.raises(InvalidRequestError, match="at most 2048"):
        prepare(edit, oc, qwen)


# --- extra values of null -------------------------------------------------------------------------


def test_extra_null_removes_what_the_server_would_send() -> None:
    nexllm = load_manifest("nexllm")
    spec = resolve("dall-e-3", nexllm).spec
    request = gen(extra={"size": None, "response_format": None, "n": None, "user": "u"})
    p = prepare(request, nexllm, spec)
    wire = encode(nexllm, p, request, p.batches[0])
    assert wire.json == {"model": "dall-e-3", "prompt": "a red fox", "user": "u"}
    with pytest.raises(InvalidRequestError, match="cannot remove model"):
        prepare(gen(extra={"model": None}), nexllm, spec)


def test_a_known_refused_field_asked_for_is_an_error_naming_it() -> None:
    oa = load_manifest("openai")
    with pytest.raises(InvalidRequestError, match="input_fidelity") as err:
        prepare(gen(extra={"input_fidelity": "high"}), oa, resolve("gpt-image-2", oa).spec)
    assert "remove input_fidelity" in err.value.message


# --- learning from refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "param", "code", "expected"),
    [
        ("Unknown parameter: 'response_format'.", "response_format", "unknown_parameter", ("response_format", True)),
        ("Unknown parameter: 'quality'", None, None, ("quality", True)),
        (
            "Invalid value: 'ultra'. Supported values are: 'low', 'medium', 'high', and 'auto'.",
            "quality",
            "invalid_value",
            ("quality", ("low", "medium", "high", "auto")),
        ),
        (
            "Invalid 'n': integer above maximum value. Expected a value <= 4, but got 10 instead.",
            "n",
            "integer_above_max_value",
            ("n", 4),
        ),
        ("n must be an integer between 1 and 4 for model hidream", None, None, ("n", 4)),
        ("Parameter 'seed' is not supported by model flux-kontext", None, None, ("seed", True)),
        ("'background' is not supported for this model.", "background", None, ("background", True)),
        ("Your prompt may contain text that is not allowed by our safety system.", None, None, None),
        (
            "Invalid value: 'transparent'. Transparent backgrounds are not supported with the model "
            "'gpt-image-2'. Supported values are: 'opaque' and 'auto'.",
            "background",
            "invalid_value",
            ("background", ("opaque", "auto")),
        ),
        # A combination refused, not the field: nothing to learn about `background` itself.
        ("Transparent background is not supported for the 'jpeg' output format.", "background", "invalid_value", None),
        ("Invalid type for 'n': expected an integer, but got a string instead.", "n", "invalid_type", None),
        ("Invalid 'prompt': string too long.", "prompt", "string_above_max_length", None),
    ],
)
def test_lessons_read_from_gateway_refusals(
    message: str, param: str | None, code: str | None, expected: tuple[str, object] | None
) -> None:
    lesson = lesson_from(400, message, param, code)
    if expected is None:
        assert lesson is None
        return
    assert lesson is not None and lesson.field == expected[0]
    fact = expected[1]
    if fact is True:
        assert lesson.refused
    elif isinstance(fact, tuple):
        assert lesson.values == fact
    else:
        assert lesson.maximum == fact
    assert lesson_from(500, message, param, code) is None  # only refusals teach


def test_openai_error_param_and_code_are_kept_on_the_error() -> None:
    error = {"message": "Unknown parameter: 'x'.", "type": "invalid_request_error", "param": "x"}
    body = json.dumps({"error": {**error, "code": "unknown_parameter"}}).encode()
    err = classify_error(load_manifest("openai"), 400, {}, body, endpoint="e")
    assert isinstance(err, InvalidRequestError)
    assert (err.gateway_param, err.gateway_code) == ("x", "unknown_parameter")


def test_no_available_channel_is_model_not_found_not_a_retry() -> None:
    message = "No available channel for model gpt-image-9 under group default (distributor)"
    body = json.dumps({"error": {"message": message, "type": "new_api_error", "param": "", "code": None}}).encode()
    for manifest in (load_manifest("openai-compatible"), load_manifest("nexllm")):
        err = classify_error(manifest, 503, {}, body, endpoint="relay")
        assert isinstance(err, ModelNotFoundError) and not err.retryable


def test_learned_facts_survive_a_restart_and_expire(tmp_path: Path) -> None:
    path = tmp_path / "state" / "learned.json"
    facts = LearnedFacts(path)
    now = time.time()
    facts.add("oa", "m1", Lesson(field="response_format", refused=True, said="Unknown parameter", learned_at=now))
    facts.add("oa", "m1", Lesson(field="n", maximum=4, learned_at=time.time()))
    facts.add("oa", "m2", Lesson(field="quality", values=("a", "b"), learned_at=time.time() - 40 * 24 * 3600))
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["learned.json"]  # no temp file left

    again = LearnedFacts(path)  # a restart
    kept = again.lessons("oa", "m1")
    assert {(lesson.field, lesson.refused, lesson.maximum) for lesson in kept} == {
        ("response_format", True, None),
        ("n", False, 4),
    }
    assert again.lessons("oa", "m2") == []  # older than the expiry
    assert again.lessons("other", "m1") == []  # per endpoint

    path.write_text("{not json", encoding="utf-8")
    assert LearnedFacts(path).lessons("oa", "m1") == []  # a damaged file only costs re-learning


# --- model_overrides in the configuration ---------------------------------------------------------


def write_config(tmp_path: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text(body, encoding="utf-8")
    monkeypatch.setenv("MCP_IMAGEGEN_CONFIG", str(path))


def test_model_overrides_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(
        tmp_path,
        '[[endpoints]]\nname = "relay"\nprovider = "openai-compatible"\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[endpoints.model_overrides."acme-diffusion-9"]\nfamily = "gpt-image-2"\n'
        'capabilities = ["generate", "edit", "mask"]\nsizes = ["1024x1024", "auto"]\n',
        monkeypatch,
    )
    [ep] = load_settings().endpoints
    override = ep.model_overrides["acme-diffusion-9"]
    assert (override.id, override.family, override.sizes) == ("acme-diffusion-9", "gpt-image-2", ["1024x1024", "auto"])
    belief = resolve("acme-diffusion-9", load_manifest("openai-compatible"), override=override)
    assert belief.spec.capabilities == ["generate", "edit", "mask"] and belief.source("sizes") == "configured"
    assert belief.spec.max_input_images == 16 and belief.source("max_input_images") == "family"


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('family = "gpt-image-7"\n', ["family", "gpt-image-7", "known families", "gpt-image-2"]),
        ('max_nn = 3\n', ["model_overrides", "max_nn"]),
        ('capabilities = ["paint"]\n', ["model_overrides", "capabilities"]),
    ],
)
def test_model_overrides_errors_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, words: list[str]
) -> None:
    write_config(
        tmp_path,
        '[[endpoints]]\nname = "relay"\nprovider = "openai-compatible"\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[endpoints.model_overrides."m"]\n' + table,
        monkeypatch,
    )
    with pytest.raises(ConfigError) as err:
        load_settings()
    for word in words:
        assert word in err.value.message
