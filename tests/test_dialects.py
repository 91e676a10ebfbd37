"""dialects: encode per encoding, decode per envelope, every error shape, discovery answers."""

from __future__ import annotations

import base64
import email.utils
import json
import time
from typing import Any

import pytest

from mcp_imagegen import b64
from mcp_imagegen.checks import prepare
from mcp_imagegen.dialects import (
    DiscoveredModel,
    Turn,
    WireRequest,
    classify_error,
    decode,
    decode_models,
    encode,
    excerpt,
    retry_after_seconds,
)
from mcp_imagegen.errors import (
    AuthenticationError,
    BadGatewayResponseError,
    ContentBlockedError,
    GatewayError,
    GatewayTimeoutError,
    ImageGenError,
    InsufficientBalanceError,
    InvalidRequestError,
    ModelNotFoundError,
    QuotaExhaustedError,
    RateLimitedError,
)
from mcp_imagegen.manifests import Manifest, load_manifest
from mcp_imagegen.models import ImageRequest, InputImage
from mcp_imagegen.resolution import resolve

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
JPG = b"\xff\xd8\xff\xe0" + b"\x01" * 32


def m(provider: str) -> Manifest:
    return load_manifest(provider)


def image(data: bytes = PNG, mime: str = "image/png") -> InputImage:
    return InputImage(data=data, mime_type=mime, width=8, height=8, source="test")


def wire_for(provider: str, model: str, request: ImageRequest, batch_n: int | None = None, **kw: Any) -> WireRequest:
    manifest = m(provider)
    prepared = prepare(request, manifest, resolve(model, manifest).spec)
    return encode(
        manifest,
        prepared,
        request,
        batch_n if batch_n is not None else prepared.batches[0],
        images=kw.pop("images", request.images),
        mask=kw.pop("mask", None),
        lineage=kw.pop("lineage", []),
    )


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# --- encode --------------------------------------------------------------------------------------


def test_json_generate_relay_dalle3() -> None:
    req = ImageRequest("generate", "a fox", n=1, size="1792x1024", knobs={"quality": "hd"}, extra={"user": "u"})
    w = wire_for("openai-compatible", "dall-e-3", req)
    assert (w.method, w.url_path, w.relative_to) == ("POST", "/images/generations", "base_url")
    assert w.json == {
        "model": "dall-e-3",
        "prompt": "a fox",
        "n": 1,
        "size": "1792x1024",
        "response_format": "b64_json",
        "quality": "hd",
        "user": "u",
    }
    assert w.data is None and w.files is None
    assert w.model == "dall-e-3"


def test_gpt_image_never_sends_response_format() -> None:
    w = wire_for("openai", "gpt-image-2", ImageRequest("generate", "x", n=3))
    assert w.json is not None and "response_format" not in w.json and w.json["n"] == 3


def test_sends_only_what_the_operation_takes() -> None:
    w = wire_for("ai-nebula", "gemini-2.5-flash-image-preview", ImageRequest("generate", "a cat", n=2))
    assert w.json == {"model": "gemini-2.5-flash-image-preview", "prompt": "a cat", "response_format": "b64_json"}
    w = wire_for("llm-vin", "flux-1", ImageRequest("generate", "a cat", n=2, knobs={"guidance_scale": 7.5}))
    assert w.json == {"model": "flux-1", "prompt": "a cat", "n": 2, "size": "1024x1024", "guidance_scale": 7.5}


def test_batch_n_is_sent() -> None:
    w = wire_for("nano-gpt", "hidream", ImageRequest("generate", "x", n=10), batch_n=2)
    assert w.json is not None and w.json["n"] == 2


def test_multipart_one_image_and_mask() -> None:
    req = ImageRequest("edit", "add a hat", images=[image()], mask=image(), n=2, size="512x512")
    w = wire_for("openai-compatible", "dall-e-2", req, mask=PNG)
    assert w.json is None and w.url_path == "/images/edits"
    assert w.data == {
        "model": "dall-e-2",
        "prompt": "add a hat",
        "n": "2",
        "size": "512x512",
        "response_format": "b64_json",
    }
    assert w.files == [("image", ("image.png", PNG, "image/png")), ("mask", ("mask.png", PNG, "image/png"))]
    assert "PNG" not in repr(w) and "multipart" in repr(w)


def test_multipart_several_images_use_multi_field() -> None:
    req = ImageRequest("edit", "merge", images=[image(), image(JPG, "image/jpeg")], knobs={"background": "opaque"})
    w = wire_for("openai", "gpt-image-2", req)
    assert w.files is not None
    assert [f[0] for f in w.files] == ["image[]", "image[]"]
    assert w.files[1][1] == ("image-2.jpg", JPG, "image/jpeg")
    assert w.data is not None and w.data["background"] == "opaque" and "response_format" not in w.data


def test_multipart_form_values_are_strings() -> None:
    req = ImageRequest("edit", "x", images=[image()], extra={"flag": True, "opts": {"a": 1}, "ratio": 0.5})
    w = wire_for("openai-compatible", "any", req)
    assert w.data is not None
    assert w.data["flag"] == "true" and w.data["opts"] == '{"a":1}' and w.data["ratio"] == "0.5"


def test_data_url_fields() -> None:
    req = ImageRequest("edit", "in the snow", images=[image()], knobs={"strength": 0.4})
    w = wire_for("nano-gpt", "flux-kontext", req)
    assert w.json is not None
    assert w.json["imageDataUrl"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert w.json["strength"] == 0.4 and w.json["response_format"] == "b64_json"
    assert "imageDataUrls" not in w.json

    req = ImageRequest("edit", "x", images=[image(), image(JPG, "image/jpeg")])
    w = wire_for("nano-gpt", "flux-kontext", req)
    assert w.json is not None and "imageDataUrl" not in w.json
    assert w.json["imageDataUrls"][1].startswith("data:image/jpeg;base64,")

    req = ImageRequest("edit", "fix", images=[image()], mask=image())
    w = wire_for("nano-gpt", "flux-lora/inpainting", req, mask=PNG)
    assert w.json is not None and w.json["maskDataUrl"].startswith("data:image/png;base64,")


def test_gemini_contents_single_turn_has_no_prompt_field() -> None:
    req = ImageRequest("edit", "bird's eye view", images=[image()])
    w = wire_for("ai-nebula", "gemini-2.5-flash-image-preview", req)
    assert w.json is not None and "prompt" not in w.json
    assert w.json["contents"] == [
        {"role": "user", "parts": [{"text": "bird's eye view"}, {"image": b64.data_url(PNG, "image/png")}]}
    ]
    assert w.json["response_format"] == "b64_json"


def test_gemini_contents_replays_lineage_bounded() -> None:
    lineage: list[Turn] = []
    for i in range(6):  # six earlier rounds; the manifest keeps four
        lineage.append(Turn("user", f"prompt {i}", []))
        lineage.append(Turn("model", "Generated 1 image", [(PNG, "image/png")]))
    req = ImageRequest("edit", "now at night", images=[image()])
    w = wire_for("ai-nebula", "gemini-2.5-flash-image-preview", req, lineage=lineage)
    assert w.json is not None
    contents = w.json["contents"]
    assert len(contents) == 9
    assert [c["role"] for c in contents] == ["user", "model"] * 4 + ["user"]
    assert contents[0]["parts"] == [{"text": "prompt 2"}]
    assert contents[1]["parts"][1]["image"].startswith("data:image/png;base64,")
    assert contents[-1]["parts"][0] == {"text": "now at night"}


def test_gemini_contents_alternate_even_with_odd_lineage() -> None:
    lineage = [Turn("model", "orphan", [(PNG, "image/png")]), Turn("user", "a", []), Turn("user", "b", [])]
    req = ImageRequest("edit", "c", images=[image()])
    w = wire_for("ai-nebula", "gemini-2.5-flash-image-preview", req, lineage=lineage)
    assert w.json is not None
    assert [c["role"] for c in w.json["contents"]] == ["user"]
    assert [p.get("text") for p in w.json["contents"][0]["parts"]][:3] == ["a", "b", "c"]


# --- decode --------------------------------------------------------------------------------------


def test_decode_openai_b64_with_usage() -> None:
    doc = {"created": 1, "data": [{"b64_json": "QUJD"}], "usage": {"total_tokens": 5}, "quality": "low"}
    r = decode(m("openai"), 200, {}, body(doc), endpoint="main")
    assert r.images[0].b64 == "QUJD" and r.images[0].url is None
    assert r.usage == {"total_tokens": 5}
    assert r.raw_extra == {"created": 1, "quality": "low"}


def test_decode_ai_nebula_envelope_and_empty_strings() -> None:
    doc = {
        "code": 200,
        "msg": "Success",
        "data": {"data": [{"url": "", "b64_json": "QUJD", "revised_prompt": ""}], "created": 1757320007},
    }
    r = decode(m("ai-nebula"), 200, {}, body(doc), endpoint="neb")
    assert r.images == [r.images[0]]
    assert r.images[0].b64 == "QUJD" and r.images[0].url is None and r.images[0].revised_prompt is None


def test_decode_nano_cost_and_balance() -> None:
    doc = {
        "created": 1,
        "data": [{"b64_json": "QUJD"}, {"b64_json": "REVG"}],
        "cost": 0.02,
        "paymentSource": "USD",
        "remainingBalance": 99.98,
    }
    r = decode(m("nano-gpt"), 200, {}, body(doc), endpoint="nano")
    assert len(r.images) == 2 and r.cost == 0.02 and r.balance == 99.98
    assert r.raw_extra["paymentSource"] == "USD"


def test_decode_url_and_data_url_and_revised_prompt() -> None:
    doc = {
        "data": [{"url": "https://x/y.png?sig=1", "revised_prompt": "better"}, {"url": "data:image/png;base64,QUJD"}],
        "usage": {"prompt_tokens": 0},
    }
    r = decode(m("modelmax"), 200, {}, body(doc), endpoint="mm")
    assert r.images[0].url == "https://x/y.png?sig=1" and r.images[0].revised_prompt == "better"
    assert r.images[1].url == "data:image/png;base64,QUJD"
    assert r.usage == {"prompt_tokens": 0}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"<html><body>502 Bad Gateway</body></html>",
        b'{"created": 1, "data": [{"b64_json": "QUJ',
        b'{"created": 1700000000, "data": [{"b64_json": undefined}]}',
    ],
)
def test_decode_not_json(raw: bytes) -> None:
    with pytest.raises(BadGatewayResponseError) as e:
        decode(m("openai"), 200, {}, raw, endpoint="main")
    assert "not valid JSON" in e.value.message and len(e.value.message) < 400


@pytest.mark.parametrize(
    "doc", [{"data": []}, {"data": [{"url": "", "b64_json": ""}]}, {"created": 1}, {"data": None}, [1, 2]]
)
def test_decode_no_images(doc: Any) -> None:
    with pytest.raises(BadGatewayResponseError, match="without any image"):
        decode(m("openai"), 200, {}, body(doc), endpoint="main")


def test_decode_excerpt_is_short_and_hides_base64() -> None:
    raw = b'{"data": [{"b64_json": ' + b"A" * 50_000
    with pytest.raises(BadGatewayResponseError) as e:
        decode(m("openai"), 200, {}, raw, endpoint="main")
    assert "AAAAAAAAAA" not in e.value.message and len(e.value.message) < 400


def test_decode_http200_error_body_is_typed() -> None:
    doc = {
        "error": {
            "message": "upstream error: bad response",
            "type": "upstream_error",
            "code": "bad_response_status_code",
        }
    }
    with pytest.raises(GatewayError) as e:
        decode(m("nexllm"), 200, {}, body(doc), endpoint="nex")
    assert e.value.retryable and "upstream error: bad response" in e.value.message

    doc = {
        "error": {
            "message": "Incorrect API key provided: sk-***",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
    }
    with pytest.raises(AuthenticationError):
        decode(m("openai"), 200, {}, body(doc), endpoint="main")

    with pytest.raises(InsufficientBalanceError):
        decode(m("nano-gpt"), 200, {}, body({"error": "Insufficient balance", "status": 402}), endpoint="nano")


def test_decode_envelope_error_with_http_200() -> None:
    with pytest.raises(ModelNotFoundError) as e:
        decode(m("ai-nebula"), 200, {}, body({"code": 404, "msg": "Model not found: foo", "data": None}), endpoint="n")
    assert e.value.gateway_message == "Model not found: foo"
    with pytest.raises(InvalidRequestError, match="Unknown field: size"):
        decode(m("ai-nebula"), 200, {}, body({"code": 400, "msg": "Unknown field: size", "data": None}), endpoint="n")
    with pytest.raises(GatewayError) as e2:
        decode(
            m("ai-nebula"), 200, {}, body({"code": 500, "msg": "Upstream service error", "data": None}), endpoint="n"
        )
    assert e2.value.retryable


def test_decode_error_status_goes_to_classify() -> None:
    with pytest.raises(AuthenticationError):
        decode(
            m("llm-vin"),
            401,
            {},
            body({"error": {"message": "Invalid API key", "type": "authentication_error"}}),
            endpoint="vin",
        )


# --- classify_error ------------------------------------------------------------------------------

Case = tuple[str, int, dict[str, str], Any, type[ImageGenError], str]

OPENAI_ERR = lambda msg, type_, code=None: {"error": {"message": msg, "type": type_, "param": None, "code": code}}  # noqa: E731

CASES: list[Case] = [
    (
        "openai",
        401,
        {},
        OPENAI_ERR("Incorrect API key provided: sk-***. You can find...", "invalid_request_error", "invalid_api_key"),
        AuthenticationError,
        "Incorrect API key provided",
    ),
    (
        "openai",
        429,
        {},
        OPENAI_ERR(
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        ),
        QuotaExhaustedError,
        "exceeded your current quota",
    ),
    (
        "openai",
        429,
        {"retry-after-ms": "1500"},
        OPENAI_ERR("Rate limit reached for images per minute", "requests", "rate_limit_exceeded"),
        RateLimitedError,
        "Rate limit reached",
    ),
    (
        "openai",
        400,
        {},
        OPENAI_ERR(
            "Your request was rejected as a result of our safety system.",
            "invalid_request_error",
            "content_policy_violation",
        ),
        ContentBlockedError,
        "safety system",
    ),
    (
        "openai",
        400,
        {},
        OPENAI_ERR("Your request was rejected by moderation.", "invalid_request_error", None),
        ContentBlockedError,
        "moderation",
    ),
    (
        "openai",
        404,
        {},
        OPENAI_ERR(
            "The model 'x' does not exist or you do not have access to it.", "invalid_request_error", "model_not_found"
        ),
        ModelNotFoundError,
        "does not exist",
    ),
    (
        "openai",
        400,
        {},
        OPENAI_ERR("Invalid value: 'ultra'. Supported values are: 'low'.", "invalid_request_error", "invalid_value"),
        InvalidRequestError,
        "Invalid value: 'ultra'",
    ),
    (
        "openai",
        403,
        {},
        OPENAI_ERR(
            "Country, region, or territory not supported", "request_forbidden", "unsupported_country_region_territory"
        ),
        AuthenticationError,
        "Country",
    ),
    (
        "openai",
        500,
        {},
        OPENAI_ERR("The server had an error while processing your request.", "server_error"),
        GatewayError,
        "server had an error",
    ),
    ("openai", 408, {}, OPENAI_ERR("Request timed out.", "timeout"), GatewayTimeoutError, "timed out"),
    (
        "openai",
        409,
        {},
        OPENAI_ERR("The request conflicted with another request.", "invalid_request_error"),
        GatewayError,
        "conflicted",
    ),
    (
        "nexllm",
        503,
        {},
        OPENAI_ERR(
            "No available channel for model foo under group default (distributor) (request id: 1)",
            "new_api_error",
            "model_not_found",
        ),
        ModelNotFoundError,
        "No available channel",
    ),
    (
        "nexllm",
        403,
        {},
        OPENAI_ERR(
            "The imagen-4.0-generate-001 model is not available for your key's group (default)",
            "new_api_error",
            "model_not_allowed",
        ),
        ModelNotFoundError,
        "not available",
    ),
    (
        "nexllm",
        403,
        {},
        OPENAI_ERR("Your token quota has been used up", "new_api_error", "insufficient_user_quota"),
        InsufficientBalanceError,
        "quota has been used up",
    ),
    (
        "nexllm",
        401,
        {},
        OPENAI_ERR("Invalid token (request id: 2)", "new_api_error", "invalid_api_key"),
        AuthenticationError,
        "Invalid token",
    ),
    (
        "ai-nebula",
        401,
        {},
        {"code": 401, "msg": "Unauthorized: invalid API key", "data": None},
        AuthenticationError,
        "Unauthorized",
    ),
    (
        "ai-nebula",
        200,
        {},
        {"code": 429, "msg": "Too many requests, please try again later", "data": None},
        RateLimitedError,
        "Too many requests",
    ),
    (
        "ai-nebula",
        503,
        {},
        {"code": 503, "msg": "Service temporarily unavailable", "data": None},
        GatewayError,
        "temporarily unavailable",
    ),
    (
        "nano-gpt",
        402,
        {},
        {"error": "Insufficient balance", "status": 402},
        InsufficientBalanceError,
        "Insufficient balance",
    ),
    (
        "nano-gpt",
        413,
        {},
        {
            "error": {
                "message": "Image too large: imageDataUrl is 5000000 bytes after encoding, max 4MB",
                "type": "invalid_request_error",
            }
        },
        InvalidRequestError,
        "Image too large",
    ),
    (
        "nano-gpt",
        401,
        {},
        {"error": {"message": "Invalid API key", "type": "authentication_error"}},
        AuthenticationError,
        "Invalid API key",
    ),
    (
        "nano-gpt",
        400,
        {},
        {"error": {"message": "Invalid model: 'nope'. See GET /api/v1/image-models", "type": "invalid_request_error"}},
        ModelNotFoundError,
        "Invalid model",
    ),
    (
        "nano-gpt",
        400,
        {},
        {
            "error": {
                "message": "n must be an integer between 1 and 4 for model hidream",
                "type": "invalid_request_error",
            }
        },
        InvalidRequestError,
        "n must be",
    ),
    (
        "llm-vin",
        400,
        {},
        {
            "error": {
                "message": "Invalid image size '2048x2048'. Allowed sizes: 1024x1024, 1024x1792, 1792x1024",
                "type": "invalid_request_error",
            }
        },
        InvalidRequestError,
        "Allowed sizes: 1024x1024",
    ),
    (
        "llm-vin",
        404,
        {},
        {"error": {"message": "Model 'flux-2' not found", "type": "invalid_request_error"}},
        ModelNotFoundError,
        "flux-2",
    ),
    (
        "llm-vin",
        429,
        {"Retry-After": "7"},
        {"error": {"message": "Rate limit exceeded", "type": "rate_limit_error"}},
        RateLimitedError,
        "Rate limit exceeded",
    ),
    (
        "llm-vin",
        403,
        {},
        {"error": {"message": "Forbidden", "type": "permission_error"}},
        AuthenticationError,
        "Forbidden",
    ),
    (
        "modelmax",
        402,
        {},
        {"error": {"message": "Insufficient balance", "type": "insufficient_balance"}},
        InsufficientBalanceError,
        "Insufficient balance",
    ),
    (
        "modelmax",
        502,
        {},
        {"error": {"message": "Upstream provider error", "type": "upstream_error"}},
        GatewayError,
        "Upstream provider error",
    ),
    (
        "modelmax",
        400,
        {},
        {"error": {"message": "model doesn't support image generation: gpt-4o", "type": "invalid_request_error"}},
        ModelNotFoundError,
        "gpt-4o",
    ),
    (
        "modelmax",
        400,
        {},
        {"error": {"message": "model not found: imagen-9", "type": "invalid_request_error"}},
        ModelNotFoundError,
        "imagen-9",
    ),
    (
        "openai-compatible",
        502,
        {},
        "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>",
        GatewayError,
        "502 Bad Gateway",
    ),
    (
        "openai-compatible",
        503,
        {},
        "upstream connect error or disconnect/reset before headers",
        GatewayError,
        "upstream connect error",
    ),
    ("openai-compatible", 413, {}, "Request Entity Too Large", InvalidRequestError, "Too Large"),
    (
        "openai-compatible",
        422,
        {},
        {"detail": [{"loc": ["body", "n"], "msg": "ensure this value is less than 5"}]},
        InvalidRequestError,
        "less than 5",
    ),
    ("openai-compatible", 404, {}, {"detail": "Not Found"}, InvalidRequestError, "Not Found"),
    ("openai-compatible", 504, {}, "", GatewayTimeoutError, ""),
    ("openai-compatible", 200, {}, {"error": {"message": "Rate limit hit, slow down"}}, RateLimitedError, "slow down"),
    ("openai-compatible", 200, {}, {"error": {"message": "content filter triggered"}}, ContentBlockedError, "filter"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[4].__name__}-{i}" for i, c in enumerate(CASES)])
def test_classify_error(case: Case) -> None:
    provider, status, headers, doc, cls, kept = case
    raw = doc.encode() if isinstance(doc, str) else body(doc)
    err = classify_error(m(provider), status, headers, raw, endpoint="ep")
    assert type(err) is cls, (type(err).__name__, err.message)
    assert err.endpoint == "ep"
    if kept:
        assert err.gateway_message is not None and kept in err.gateway_message
        assert kept in err.message and kept in err.agent_text()
    assert len(err.gateway_message or "") <= 500


def test_classify_names_key_variable() -> None:
    raw = body({"error": {"message": "Invalid API key", "type": "authentication_error"}})
    err = classify_error(m("nano-gpt"), 401, {}, raw, endpoint="nano")
    assert "$NANOGPT_API_KEY" in err.message
    err = classify_error(m("nano-gpt"), 401, {}, raw, endpoint="nano", key_env="MY_NANO_KEY")
    assert "$MY_NANO_KEY" in err.message


def test_classify_keeps_message_truncated() -> None:
    raw = body({"error": {"message": "boom " * 1000, "type": "server_error"}})
    err = classify_error(m("openai"), 500, {}, raw, endpoint="ep")
    assert err.gateway_message is not None and len(err.gateway_message) <= 500 and err.retryable


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"Retry-After": "12"}) == 12
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    got = retry_after_seconds({"Retry-After": date}, now=now)
    assert got is not None and 28 <= got <= 31
    err = classify_error(m("llm-vin"), 429, {"Retry-After": "7"}, b"{}", endpoint="vin")
    assert err.retry_after_s == 7 and "7 s" in err.message


def test_excerpt() -> None:
    assert excerpt(b"") == "(empty body)"
    assert len(excerpt(b"x" * 10_000)) <= 200
    assert (
        excerpt(
            b"<!DOCTYPE html><html><head><title>Oops</title><style>p{}</style></head><body><p>Bad</p></body></html>"
        )
        == "Oops: Oops Bad"
    )


# --- decode_models -------------------------------------------------------------------------------


def test_openai_models_filtered_by_pattern() -> None:
    doc = {
        "object": "list",
        "data": [
            {"id": "gpt-image-1"},
            {"id": "gpt-4o"},
            {"id": "dall-e-3"},
            {"id": "whisper-1"},
            {"id": "chatgpt-image-latest"},
            {"nope": 1},
        ],
    }
    found = decode_models(m("openai"), doc)
    assert [d.id for d in found] == ["gpt-image-1", "dall-e-3", "chatgpt-image-latest"]
    assert found[0].capabilities is None
    assert decode_models(m("openai"), body(doc)) == found
    assert decode_models(m("openai"), b"not json") == []
    assert decode_models(m("openai"), {"weird": True}) == []


def test_nano_image_models() -> None:
    doc = {
        "object": "list",
        "data": [
            {
                "id": "hidream",
                "capabilities": {
                    "text_to_image": True,
                    "image_to_image": False,
                    "inpainting": False,
                    "multi_image": False,
                },
                "supported_parameters": {
                    "resolutions": ["1024x1024", "768x1360"],
                    "n": {"min": 1, "max": 4},
                    "max_input_images": 0,
                },
            },
            {
                "id": "flux-kontext",
                "capabilities": {
                    "text_to_image": True,
                    "image_to_image": True,
                    "inpainting": False,
                    "multi_image": True,
                },
                "supported_parameters": {"resolutions": ["1024x1024"], "n": {"max": 1}, "max_input_images": 4},
            },
            {
                "id": "flux-lora/inpainting",
                "capabilities": {"text_to_image": False, "image_to_image": True, "inpainting": True},
            },
            {"id": "bare"},
        ],
    }
    found = {d.id: d for d in decode_models(m("nano-gpt"), doc)}
    assert found["hidream"] == DiscoveredModel(
        "hidream", ("generate",), lacks=("edit", "mask", "multi_image"), sizes=("1024x1024", "768x1360"), max_n=4
    )
    assert found["flux-kontext"].lacks == ("mask",)  # "inpainting": false; the rest said true
    assert found["flux-kontext"].capabilities == ("generate", "edit", "multi_image")
    assert found["flux-kontext"].max_input_images == 4 and found["flux-kontext"].max_n == 1
    assert found["flux-lora/inpainting"].capabilities == ("edit", "mask")
    assert found["bare"] == DiscoveredModel("bare")


def test_nano_image_models_other_shapes() -> None:
    doc = {
        "models": {
            "a": {
                "capabilities": ["image-generation", "Image to Image"],
                "supported_parameters": {"resolution": {"values": ["1x1"]}, "max_images": 2},
            }
        }
    }
    [a] = decode_models(m("nano-gpt"), doc)
    assert a.id == "a" and a.capabilities == ("generate", "edit") and a.sizes == ("1x1",) and a.max_n == 2
