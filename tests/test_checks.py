"""checks.prepare / fit_inputs: every rule, and a property test over the whole manifest set."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mcp_imagegen import checks
from mcp_imagegen.checks import PreparedRequest, data_url_raw_cap, fit_inputs, parse_size, prepare
from mcp_imagegen.errors import ImageGenError, InvalidRequestError
from mcp_imagegen.manifests import Manifest, ModelSpec, available_providers, load_manifest
from mcp_imagegen.models import CANONICAL_KNOBS, ImageRequest, InputImage
from mcp_imagegen.resolution import resolve


def m(provider: str) -> Manifest:
    return load_manifest(provider)


def spec(provider: str, model: str) -> ModelSpec:
    """The model's resolved spec (manifest entry over its family over the generic fallback)."""
    return resolve(model, m(provider)).spec


def gen(prompt: str = "a red fox", **kw: object) -> ImageRequest:
    return ImageRequest(operation="generate", prompt=prompt, **kw)  # type: ignore[arg-type]


def img(
    w: int = 64, h: int = 64, mime: str = "image/png", data: bytes = b"x", source: str = "file a.png"
) -> InputImage:
    return InputImage(data=data, mime_type=mime, width=w, height=h, source=source)


def edit(n_images: int = 1, mask: bool = False, **kw: object) -> ImageRequest:
    return ImageRequest(
        operation="edit",
        prompt="add a hat",
        images=[img() for _ in range(n_images)],
        mask=img() if mask else None,
        **kw,  # type: ignore[arg-type]
    )


def prep(provider: str, model: str, request: ImageRequest, **kw: object) -> PreparedRequest:
    return prepare(request, m(provider), spec(provider, model), **kw)  # type: ignore[arg-type]


# --- basics --------------------------------------------------------------------------------------


def test_defaults_for_gpt_image() -> None:
    p = prep("openai", "gpt-image-2", gen())
    assert p.size is None and "size" not in p.added  # no documented default: the gateway picks
    assert p.batches == [1]
    assert p.knobs == {}
    assert p.send_response_format is False  # gpt-image rejects response_format
    assert p.warnings == []
    assert p.mask_semantics is None


def test_dalle3_asks_for_b64() -> None:
    p = prep("openai", "dall-e-3", gen(size="1792x1024"))
    assert p.send_response_format is True
    assert p.size == "1792x1024"


def test_fan_out_warning_names_model_endpoint_and_split() -> None:
    p = prep("nano-gpt", "gpt-image-1", gen(n=10), endpoint="nano")
    assert p.batches == [4, 4, 2]
    assert p.warnings == [
        "gpt-image-1 on 'nano' returns at most 4 images per request; sent 3 parallel requests (4+4+2)"
    ]


def test_fan_out_when_operation_takes_no_n() -> None:
    p = prep("ai-nebula", "gemini-2.5-flash-image-preview", gen(n=3, size="512x512"))
    assert p.batches == [1, 1, 1]
    assert p.size is None
    assert any("size '512x512' dropped" in w for w in p.warnings)
    assert any("(1+1+1)" in w for w in p.warnings)


def test_no_fan_out_within_max_n() -> None:
    assert prep("openai", "dall-e-2", gen(n=10)).batches == [10]
    assert prep("openai", "dall-e-3", gen(n=2)).batches == [1, 1]


# --- prompt and n --------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_empty_prompt(prompt: str) -> None:
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        prep("openai", "gpt-image-2", gen(prompt))


def test_prompt_too_long_says_limit_and_length() -> None:
    with pytest.raises(InvalidRequestError) as e:
        prep("openai", "dall-e-3", gen("x" * 4001))
    assert "4001" in e.value.message and "4000" in e.value.message


def test_n_too_large() -> None:
    with pytest.raises(InvalidRequestError, match=r"n=50 is more than the 10 allowed per call"):
        prep("openai", "gpt-image-2", gen(n=50))


@pytest.mark.parametrize("n", [0, -1, True, "2", 2.0, None])
def test_n_invalid(n: object) -> None:
    with pytest.raises(InvalidRequestError):
        prep("openai", "gpt-image-2", gen(n=n))


def test_max_total_n_configurable() -> None:
    assert prep("offline", "offline", gen(n=20), max_total_n=20).batches == [10, 10]


# --- size ----------------------------------------------------------------------------------------


def test_size_not_allowed_lists_sizes() -> None:
    with pytest.raises(InvalidRequestError) as e:
        prep("llm-vin", "flux-1", gen(size="2048x2048"))
    assert "1024x1024, 1024x1792, 1792x1024" in e.value.message


def test_size_auto_only_where_listed() -> None:
    assert prep("openai", "gpt-image-2", gen(size="auto")).size == "auto"
    with pytest.raises(InvalidRequestError, match="auto"):
        prep("openai", "dall-e-3", gen(size="auto"))


@pytest.mark.parametrize("size", ["banana", "1024", "x1024", "1024x", "-5x5", "1e3x1e3"])
def test_size_unparseable(size: str) -> None:
    with pytest.raises(InvalidRequestError, match="WIDTHxHEIGHT"):
        prep("offline", "offline", gen(size=size))


def test_size_normalised() -> None:
    assert prep("offline", "offline", gen(size=" 512X256 ")).size == "512x256"
    assert parse_size("640×480") == (640, 480)


def test_size_free_within_dimensions() -> None:
    assert prep("offline", "offline", gen(size="4096x16")).size == "4096x16"
    with pytest.raises(InvalidRequestError, match="from 16 to 4096 px"):
        prep("offline", "offline", gen(size="4097x100"))
    with pytest.raises(InvalidRequestError, match="from 16 to 4096 px"):
        prep("offline", "offline", gen(size="8x8"))


def test_unknown_model_on_plain_gateway_takes_any_size() -> None:
    p = prep("openai-compatible", "some-model", gen(size="1234x567", n=10))
    # Nothing known: any size goes to the gateway, and one image per request (which every
    # gateway takes) reaches n without sending an n the model might refuse.
    assert p.size == "1234x567" and p.batches == [1] * 10
    assert not p.send_response_format and "response_format" not in p.added


def test_size_auto_passes_where_nothing_is_known() -> None:
    assert prep("openai-compatible", "some-model", gen(size="auto")).size == "auto"
    with pytest.raises(InvalidRequestError, match="auto"):
        prep("offline", "offline", gen(size="auto"))


def test_size_default_none_when_model_has_none() -> None:
    assert prep("openai-compatible", "some-model", gen()).size is None


# --- knobs ---------------------------------------------------------------------------------------


def test_enum_knob_case_insensitive_to_manifest_spelling() -> None:
    p = prep("openai", "dall-e-3", gen(knobs={"quality": "HD", "style": "natural"}))
    assert p.knobs == {"quality": "hd", "style": "natural"}


def test_enum_knob_error_lists_values() -> None:
    with pytest.raises(InvalidRequestError) as e:
        prep("openai", "gpt-image-2", gen(knobs={"quality": "ultra"}))
    assert "low, medium, high, auto" in e.value.message


def test_knob_model_override_beats_manifest_param() -> None:
    with pytest.raises(InvalidRequestError, match="standard, hd"):
        prep("openai", "dall-e-3", gen(knobs={"quality": "low"}))


def test_unknown_knob_dropped_with_warning() -> None:
    p = prep("openai", "gpt-image-2", gen(knobs={"seed": 4, "quality": "low"}))
    assert p.knobs == {"quality": "low"}
    assert p.warnings and "seed" in p.warnings[0] and "quality, background, output_format" in p.warnings[0]


def test_range_error_says_range() -> None:
    with pytest.raises(InvalidRequestError, match="0 to 1"):
        prep("nano-gpt", "flux-kontext", gen(knobs={"strength": 1.5}))


def test_types() -> None:
    p = prep("nano-gpt", "hidream", gen(knobs={"num_inference_steps": "30", "guidance_scale": 7, "seed": 3.0}))
    assert p.knobs == {"num_inference_steps": 30, "guidance_scale": 7, "seed": 3}
    assert isinstance(p.knobs["seed"], int)
    for bad in ({"seed": 1.5}, {"guidance_scale": True}, {"seed": "abc"}, {"guidance_scale": float("nan")}):
        with pytest.raises(InvalidRequestError):
            prep("nano-gpt", "hidream", gen(knobs=bad))
    with pytest.raises(InvalidRequestError, match="must be a string"):
        prep("openai", "dall-e-3", gen(knobs={"quality": 3}))


def test_none_knob_ignored() -> None:
    assert prep("openai", "dall-e-3", gen(knobs={"quality": None})).knobs == {}


# --- response_format and extra -------------------------------------------------------------------


def test_response_format_dropped_for_gpt_image() -> None:
    p = prep("openai", "gpt-image-2", gen(extra={"response_format": "url", "user": "u1"}))
    assert p.warnings == ["gpt-image-2 always returns base64; response_format dropped"]
    assert p.extra == {"user": "u1"}
    assert p.send_response_format is False


def test_response_format_ours_to_choose() -> None:
    p = prep("openai", "dall-e-3", gen(extra={"response_format": "url"}))
    assert p.send_response_format is True
    assert "response_format" not in p.extra
    assert any("b64_json" in w for w in p.warnings)


def test_response_format_on_gateway_without_it() -> None:
    p = prep("llm-vin", "flux-1", gen(extra={"response_format": "b64_json"}))
    assert p.send_response_format is False and "response_format" not in p.extra


@pytest.mark.parametrize("extra", [{"size": "1x1"}, {"model": "x"}, {"prompt": "y"}, {"n": 3}])
def test_extra_may_not_set_our_fields(extra: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError, match="server sets itself"):
        prep("openai", "dall-e-3", gen(extra=extra))


def test_extra_may_not_override_a_knob() -> None:
    with pytest.raises(InvalidRequestError, match="quality"):
        prep("openai", "dall-e-3", gen(knobs={"quality": "hd"}, extra={"quality": "standard"}))


def test_extra_passes_through() -> None:
    p = prep("nano-gpt", "flux-kontext", gen(extra={"kontext_max_mode": True}))
    assert p.extra == {"kontext_max_mode": True}


def test_extra_may_not_set_input_fields() -> None:
    with pytest.raises(InvalidRequestError, match="imageDataUrl"):
        prep("nano-gpt", "flux-kontext", edit(extra={"imageDataUrl": "data:,"}))
    with pytest.raises(InvalidRequestError, match="contents"):
        prep("ai-nebula", "gemini-2.5-flash-image-preview", edit(extra={"contents": []}))


# --- operations and edits ------------------------------------------------------------------------


def test_operation_unsupported_names_models_that_can() -> None:
    with pytest.raises(InvalidRequestError) as e:
        prep("openai", "dall-e-3", edit())
    assert "gpt-image-2, gpt-image-2.5-flare" in e.value.message  # the live ones, not the shut-down


def test_operation_unsupported_uses_endpoint_models() -> None:
    allowed = [spec("openai", "dall-e-3"), spec("openai", "dall-e-2")]
    with pytest.raises(InvalidRequestError) as e:
        prep("openai", "dall-e-3", edit(), endpoint_models=allowed, endpoint="main")
    assert "models here that can: dall-e-2" in e.value.message and "'main'" in e.value.message


def test_generate_only_model() -> None:
    with pytest.raises(InvalidRequestError, match="cannot generate"):
        prep("nano-gpt", "flux-lora/inpainting", gen())


def test_edit_needs_an_image() -> None:
    with pytest.raises(InvalidRequestError, match="at least one"):
        prep("openai", "gpt-image-2", edit(n_images=0))


def test_too_many_images_says_max() -> None:
    with pytest.raises(InvalidRequestError, match="at most 16"):
        prep("openai", "gpt-image-2", edit(n_images=17))
    with pytest.raises(InvalidRequestError, match="at most 4"):
        prep("nano-gpt", "flux-kontext", edit(n_images=5))


def test_several_images_need_multi_image() -> None:
    with pytest.raises(InvalidRequestError, match="one image at a time"):
        prep("openai", "dall-e-2", edit(n_images=2))


def test_mask_needs_mask_capability() -> None:
    with pytest.raises(InvalidRequestError) as e:
        prep("nano-gpt", "flux-kontext", edit(mask=True))
    assert "flux-lora/inpainting" in e.value.message


def test_mask_semantics_from_manifest() -> None:
    assert prep("nano-gpt", "flux-lora/inpainting", edit(mask=True)).mask_semantics == "white"
    assert prep("openai", "dall-e-2", edit(mask=True)).mask_semantics == "transparent"
    assert prep("offline", "offline", edit(mask=True)).mask_semantics == "transparent"
    assert prep("openai", "gpt-image-2", edit()).mask_semantics is None


def test_images_on_generate_refused() -> None:
    with pytest.raises(InvalidRequestError):
        prep("openai", "gpt-image-2", gen(images=[img()]))


# --- property: prepare never does anything but succeed within limits or say why ----------------

_PAIRS = [(provider, model.id) for provider in available_providers() for model in load_manifest(provider).models] + [
    ("openai-compatible", "anything")
]

_SIZES = st.one_of(
    st.none(),
    st.sampled_from(["auto", "1024x1024", "256x256", "1792x1024", "1024x1536", "768x1360", "16x16", "0x0"]),
    st.builds(lambda w, h: f"{w}x{h}", st.integers(-5, 9000), st.integers(-5, 9000)),
    st.text(max_size=12),
)
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 1000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["hd", "standard", "low", "HIGH", "vivid", "png", "transparent", "42", "0.5", ""]),
    st.text(max_size=6),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pair=st.sampled_from(_PAIRS),
    operation=st.sampled_from(["generate", "edit"]),
    n=st.one_of(st.integers(-3, 60), st.booleans(), st.none()),
    size=_SIZES,
    knobs=st.dictionaries(st.sampled_from(list(CANONICAL_KNOBS) + ["bogus"]), _VALUES, max_size=4),
    n_images=st.integers(0, 18),
    mask=st.booleans(),
    prompt=st.text(max_size=40),
)
def test_prepare_property(
    pair: tuple[str, str],
    operation: str,
    n: object,
    size: str | None,
    knobs: dict[str, object],
    n_images: int,
    mask: bool,
    prompt: str,
) -> None:
    provider, model_id = pair
    manifest = load_manifest(provider)
    model = resolve(model_id, manifest).spec
    request = ImageRequest(
        operation=operation,  # type: ignore[arg-type]
        prompt=prompt,
        n=n,  # type: ignore[arg-type]
        size=size,
        images=[img() for _ in range(n_images)] if operation == "edit" else [],
        mask=img() if (mask and operation == "edit") else None,
        knobs=knobs,
    )
    try:
        p = prepare(request, manifest, model)
    except InvalidRequestError as exc:
        assert exc.message
        return
    except ImageGenError as exc:  # pragma: no cover - the property under test
        pytest.fail(f"prepare raised {type(exc).__name__}, not InvalidRequestError")
    assert operation in (model.capabilities or ())
    assert prompt.strip()
    assert isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 10
    assert sum(p.batches) == n and all(1 <= b <= max(1, model.max_n or 1) for b in p.batches)
    if p.size is not None:
        if model.size_rule is not None:
            assert p.size == "auto" or checks._size_token(p.size, model) or parse_size(p.size)
        elif model.sizes is not None:
            assert p.size in model.sizes
        elif p.size != "auto" and model.max_dimension is not None:  # else nothing is known: the gateway judges
            dims = parse_size(p.size)
            assert dims is not None
            if model.max_dimension:
                assert max(dims) <= model.max_dimension
            assert min(dims) >= (model.min_dimension or 1)
    for canonical, value in knobs.items():
        param = manifest.knob(model, canonical)
        if param is None or value is None:
            continue
        wire_value = p.knobs[param.wire_name(canonical)]
        if param.enum is not None:
            assert wire_value in param.enum
        if param.min is not None:
            assert wire_value >= param.min
        if param.max is not None:
            assert wire_value <= param.max
    if operation == "edit":
        assert 1 <= n_images <= model.max_input_images
        assert n_images == 1 or "multi_image" in model.capabilities
        assert not mask or "mask" in model.capabilities


# --- fit_inputs ----------------------------------------------------------------------------------


def _png(w: int, h: int, noise: bool = False) -> bytes:
    if noise:
        im = Image.frombytes("RGB", (w, h), os.urandom(w * h * 3))
    else:
        im = Image.new("RGB", (w, h), (200, 30, 30))
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 120, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_data_url_raw_cap_fits() -> None:
    cap = data_url_raw_cap(4_000_000, ["image/png", "image/jpeg"])
    assert len("data:image/jpeg;base64,") + -(-cap // 3) * 4 <= 4_000_000
    assert cap > 2_999_000


def test_fit_inputs_leaves_good_images_alone() -> None:
    good = img(64, 64, data=_png(64, 64))
    out, notes = fit_inputs([good], m("nano-gpt"), spec("nano-gpt", "flux-kontext"))
    assert out == [good] and notes == []


def test_fit_inputs_shrinks_to_data_url_cap() -> None:
    big = _png(1100, 1100, noise=True)
    assert len(big) > 3_000_000
    source = InputImage(data=big, mime_type="image/png", width=1100, height=1100, source="file big.png")
    out, notes = fit_inputs([source], m("nano-gpt"), spec("nano-gpt", "flux-kontext"))
    from mcp_imagegen.b64 import data_url

    assert len(data_url(out[0].data, out[0].mime_type)) <= 4_000_000
    assert notes and "big.png" in notes[0]
    with Image.open(io.BytesIO(out[0].data)) as im:
        assert (out[0].width, out[0].height) == im.size


def test_fit_inputs_square_png_for_dalle2() -> None:
    source = InputImage(data=_jpeg(300, 200), mime_type="image/jpeg", width=300, height=200, source="file p.jpg")
    out, notes = fit_inputs([source], m("nexllm"), spec("nexllm", "dall-e-2"))
    assert out[0].mime_type == "image/png"
    assert out[0].width == out[0].height == 200
    assert notes


def test_fit_inputs_no_edit_operation() -> None:
    good = img()
    assert fit_inputs([good], m("offline"), spec("offline", "offline")) == ([good], [])


def test_module_exports() -> None:
    assert checks.RESERVED_FIELDS >= {"model", "prompt", "n", "size", "response_format"}


def test_given_knobs_keeps_what_was_set_and_refuses_non_canonical_names() -> None:
    from mcp_imagegen.models import given_knobs

    assert given_knobs(seed=0, quality=None, style="vivid") == {"seed": 0, "style": "vivid"}
    with pytest.raises(ValueError, match="response_format"):
        given_knobs(response_format="url")
