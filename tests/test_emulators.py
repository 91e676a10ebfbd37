"""Sanity tests of the gateway emulators: documented shapes, auth, validation and every fault kind."""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from xml.etree import ElementTree

import httpx2
import pytest
from PIL import Image, UnidentifiedImageError

from tests.emulators import (
    DEFAULT_API_KEY,
    EMULATORS,
    AiNebulaEmulator,
    Emulator,
    Fault,
    LlmVinEmulator,
    ModelmaxEmulator,
    NanoGptEmulator,
    NexLLMEmulator,
    OpenAIEmulator,
)
from tests.emulators.images import encode, flat, photo_like, render, to_data_url

AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
MM_MODEL = "seedream-5.0-lite"  # modelmax's live model, named in no manifest


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    img = flat(w, h, transparent=mode == "RGBA")
    return encode(img.convert(mode), "png")


def _decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    img.load()
    return img


@pytest.fixture(scope="module")
def client() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=30) as c:
        yield c


def _emulator(cls: type[Emulator], **kwargs: object) -> Iterator[Emulator]:
    with cls(**kwargs) as emu:
        yield emu


@pytest.fixture(scope="module")
def openai_emu() -> Iterator[OpenAIEmulator]:
    yield from _emulator(OpenAIEmulator)  # type: ignore[misc]


@pytest.fixture(scope="module")
def legacy_emu() -> Iterator[OpenAIEmulator]:
    """OpenAI as before the shutdowns: gpt-image-1, dall-e-3 and dall-e-2 still served."""
    yield from _emulator(OpenAIEmulator, serve_retired=True)  # type: ignore[misc]


@pytest.fixture(scope="module")
def nexllm_emu() -> Iterator[NexLLMEmulator]:
    yield from _emulator(NexLLMEmulator)  # type: ignore[misc]


@pytest.fixture(scope="module")
def nebula_emu() -> Iterator[AiNebulaEmulator]:
    yield from _emulator(AiNebulaEmulator)  # type: ignore[misc]


@pytest.fixture(scope="module")
def nano_emu() -> Iterator[NanoGptEmulator]:
    yield from _emulator(NanoGptEmulator)  # type: ignore[misc]


@pytest.fixture(scope="module")
def vin_emu() -> Iterator[LlmVinEmulator]:
    yield from _emulator(LlmVinEmulator)  # type: ignore[misc]


@pytest.fixture(scope="module")
def mm_emu() -> Iterator[ModelmaxEmulator]:
    yield from _emulator(ModelmaxEmulator)  # type: ignore[misc]


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> None:
    for name in request.fixturenames:
        if name.endswith("_emu"):
            request.getfixturevalue(name).reset()


# ---------------------------------------------------------------------------------------------
# Lifecycle, registry, images


def test_registry_and_urls() -> None:
    assert set(EMULATORS) == {"openai", "nexllm", "ai-nebula", "nano-gpt", "llm-vin", "modelmax"}
    emu = NanoGptEmulator(api_key="k").start()
    try:
        assert emu.port > 0
        assert emu.origin == f"http://127.0.0.1:{emu.port}"
        assert emu.base_url == emu.origin + "/v1"
    finally:
        emu.stop()


def test_images_kinds() -> None:
    small = render("flat", 1024, 1024)
    assert len(small) < 50_000
    photo = render("photo", 1024, 1024)
    assert 2_500_000 <= len(photo) <= 3_200_000
    assert render("photo", 1024, 1024) is photo  # cached
    assert photo_like(64, 32).size == (64, 32)


def test_recorded_requests(legacy_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    client.post(
        f"{legacy_emu.base_url}/images/generations?x=1",
        headers=AUTH,
        json={"model": "dall-e-2", "prompt": "a", "size": "256x256"},
    )
    rec = legacy_emu.requests[-1]
    assert (rec.method, rec.path, rec.query, rec.status) == ("POST", "/v1/images/generations", {"x": "1"}, 200)
    assert rec.json == {"model": "dall-e-2", "prompt": "a", "size": "256x256"}
    assert rec.authorization == AUTH["Authorization"]


# ---------------------------------------------------------------------------------------------
# OpenAI


def test_legacy_gpt_image_generate(legacy_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    r = client.post(
        f"{legacy_emu.base_url}/images/generations",
        headers=AUTH,
        json={
            "model": "gpt-image-1",
            "prompt": "a cat",
            "size": "1536x1024",
            "n": 2,
            "quality": "low",
            "output_format": "webp",
            "output_compression": 80,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"created", "data", "usage"}
    assert set(body["usage"]) == {"input_tokens", "output_tokens", "total_tokens", "input_tokens_details"}
    assert len(body["data"]) == 2 and set(body["data"][0]) == {"b64_json"}
    img = _decode(body["data"][0]["b64_json"])
    assert (img.format, img.size) == ("WEBP", (1536, 1024))


def test_legacy_gpt_image_rejects_response_format(legacy_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    r = client.post(
        f"{legacy_emu.base_url}/images/generations",
        headers=AUTH,
        json={"model": "gpt-image-1", "prompt": "a", "response_format": "b64_json"},
    )
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "message": "Unknown parameter: 'response_format'.",
            "type": "invalid_request_error",
            "param": "response_format",
            "code": "unknown_parameter",
        }
    }


def test_openai_validation(legacy_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    url = f"{legacy_emu.base_url}/images/generations"

    def err(payload: dict) -> tuple[int, dict]:
        r = client.post(url, headers=AUTH, json=payload)
        return r.status_code, r.json()["error"]

    status, e = err({"model": "dall-e-3", "prompt": "a", "imageSize": "1024x1024"})
    assert (status, e["code"], e["param"]) == (400, "unknown_parameter", "imageSize")
    status, e = err({"model": "dall-e-3", "prompt": "a", "size": "512x512"})
    assert status == 400 and "1024x1024" in e["message"] and "1792x1024" in e["message"] and "1024x1792" in e["message"]
    status, e = err({"model": "dall-e-3", "prompt": "a", "n": 2})
    assert (status, e["param"]) == (400, "n")
    status, e = err({"model": "dall-e-2", "prompt": "x" * 1001})
    assert (status, e["code"]) == (400, "string_above_max_length")
    status, e = err({"model": "gpt-image-1", "prompt": "a forbidden-content thing"})
    assert (status, e["code"]) == (400, "content_policy_violation")
    status, e = err({"model": "dall-e-9", "prompt": "a"})
    assert (status, e["code"]) == (404, "model_not_found")
    status, e = err({"model": "gpt-image-1", "prompt": "a", "background": "transparent", "output_format": "jpeg"})
    assert status == 400


def test_openai_auth(legacy_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    url = f"{legacy_emu.base_url}/images/generations"
    payload = {"model": "dall-e-2", "prompt": "a"}
    secret = "sk-this-is-a-wrong-key-123456"
    r = client.post(url, json=payload, headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.json()["error"]["message"].startswith("Incorrect API key provided: sk-***")
    assert secret not in r.text
    r = client.post(url, json=payload)
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"


def test_openai_dalle3_url_and_download(legacy_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    r = client.post(
        f"{legacy_emu.base_url}/images/generations",
        headers=AUTH,
        json={"model": "dall-e-3", "prompt": "a", "size": "1792x1024", "quality": "hd", "style": "natural"},
    )
    item = r.json()["data"][0]
    assert set(item) == {"url", "revised_prompt"}
    assert item["url"].startswith(legacy_emu.origin + "/files/") and "X-Amz-Expires=" in item["url"]
    img = client.get(item["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(img.content)).size == (1792, 1024)


def test_legacy_models_and_quota(legacy_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    r = client.get(f"{legacy_emu.base_url}/models", headers=AUTH)
    body = r.json()
    ids = {m["id"] for m in body["data"]}
    assert body["object"] == "list" and {"gpt-image-1", "dall-e-3", "gpt-4o", "text-embedding-3-small"} <= ids
    assert set(body["data"][0]) == {"id", "object", "created", "owned_by", "shutdown_date"}
    assert {m["shutdown_date"] for m in body["data"] if m["id"] in ("gpt-image-1", "dall-e-3")} == {None}
    legacy_emu.inject(Fault.quota())
    r = client.post(f"{legacy_emu.base_url}/images/generations", headers=AUTH, json={"prompt": "a"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"


def test_legacy_edit_gpt_image(legacy_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    files = [
        ("image[]", ("a.png", _png(64, 64), "image/png")),
        ("image[]", ("b.png", _png(64, 64), "image/png")),
        ("mask", ("m.png", _png(64, 64, "RGBA"), "image/png")),
    ]
    r = client.post(
        f"{legacy_emu.base_url}/images/edits",
        headers=AUTH,
        files=files,
        data={"model": "gpt-image-1", "prompt": "add a hat", "size": "1024x1024"},
    )
    assert r.status_code == 200, r.text
    assert _decode(r.json()["data"][0]["b64_json"]).size == (1024, 1024)
    rec = legacy_emu.requests[-1]
    assert [f.filename for f in rec.files["image[]"]] == ["a.png", "b.png"]
    assert rec.form["prompt"] == "add a hat"
    # mask of another size
    files[2] = ("mask", ("m.png", _png(32, 32, "RGBA"), "image/png"))
    r = client.post(
        f"{legacy_emu.base_url}/images/edits", headers=AUTH, files=files, data={"model": "gpt-image-1", "prompt": "x"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"


def test_openai_edit_dalle2(legacy_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    url = f"{legacy_emu.base_url}/images/edits"
    ok = {"image": ("i.png", _png(256, 256), "image/png"), "mask": ("m.png", _png(256, 256, "RGBA"), "image/png")}
    r = client.post(url, headers=AUTH, files=ok, data={"model": "dall-e-2", "prompt": "x", "size": "256x256"})
    assert r.status_code == 200 and "url" in r.json()["data"][0]
    bad = {"image": ("i.png", _png(256, 128), "image/png")}
    r = client.post(url, headers=AUTH, files=bad, data={"model": "dall-e-2", "prompt": "x"})
    assert r.status_code == 400 and "square" in r.json()["error"]["message"]
    no_alpha_mask = {"image": ok["image"], "mask": ("m.png", _png(256, 256), "image/png")}
    r = client.post(url, headers=AUTH, files=no_alpha_mask, data={"model": "dall-e-2", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"
    r = client.post(url, headers=AUTH, files=ok, data={"model": "dall-e-2", "prompt": "x", "strength": "0.5"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_parameter"
    r = client.post(url, headers=AUTH, files={"images": ok["image"]}, data={"model": "dall-e-2", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "images"
    r = client.post(url, headers=AUTH, json={"model": "dall-e-2", "prompt": "x"})
    assert r.status_code == 400
    r = client.post(url, headers=AUTH, files=ok, data={"model": "dall-e-3", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


# ---------------------------------------------------------------------------------------------
# NexLLM


def test_nexllm(nexllm_emu: NexLLMEmulator, client: httpx2.Client) -> None:
    url = f"{nexllm_emu.base_url}/images/generations"
    r = client.post(url, headers=AUTH, json={"model": "dall-e-3", "prompt": "a", "size": "1024x1024"})
    assert r.status_code == 200 and "url" in r.json()["data"][0]
    r = client.post(url, headers=AUTH, json={"model": "imagen-4.0-generate-001", "prompt": "a"})
    assert r.status_code == 403
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("new_api_error", "model_not_allowed")
    assert "model is not available for your key's group" in err["message"]
    assert "imagen-4.0-generate-001" not in {
        m["id"] for m in client.get(f"{nexllm_emu.base_url}/models", headers=AUTH).json()["data"]
    }
    r = client.post(url, headers=AUTH, json={"model": "dall-e-2", "prompt": "a", "n": 11})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = client.post(url, headers={"Authorization": "Bearer nope"}, json={"model": "dall-e-2", "prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "new_api_error"
    files = {"image": ("i.png", _png(256, 256, "RGBA"), "image/png")}
    r = client.post(
        f"{nexllm_emu.base_url}/images/edits",
        headers=AUTH,
        files=files,
        data={"model": "dall-e-2", "prompt": "add a rainbow", "n": "1", "size": "1024x1024"},
    )
    assert r.status_code == 200 and "url" in r.json()["data"][0]


def test_nexllm_gemini_vertex_group(client: httpx2.Client) -> None:
    with NexLLMEmulator(key_groups=["default", "gemini-vertex"]) as emu:
        r = client.post(
            f"{emu.base_url}/images/generations",
            headers=AUTH,
            json={"model": "imagen-4.0-generate-001", "prompt": "a", "n": 2},
        )
        # The key may use the channel, but Vertex has discontinued Imagen 4: its 404 comes back.
        err = r.json()["error"]
        assert r.status_code == 404 and err["type"] == "upstream_error"
        assert "imagen-4.0-generate-001" in err["message"] and "was not found" in err["message"]
        ids = {m["id"] for m in client.get(f"{emu.base_url}/models", headers=AUTH).json()["data"]}
        assert "imagen-4.0-generate-001" in ids  # new-api lists what it has channels for


# ---------------------------------------------------------------------------------------------
# ai-nebula


def test_nebula_generate(nebula_emu: AiNebulaEmulator, client: httpx2.Client) -> None:
    url = f"{nebula_emu.base_url}/images/generations"
    r = client.post(
        url,
        headers=AUTH,
        json={"model": "gemini-2.5-flash-image-preview", "prompt": "a kitten", "response_format": "b64_json"},
    )
    body = r.json()
    assert r.status_code == 200 and (body["code"], body["msg"]) == (200, "Success")
    item = body["data"]["data"][0]
    assert item["url"] == "" and item["revised_prompt"] == "" and _decode(item["b64_json"]).format == "PNG"
    assert isinstance(body["data"]["created"], int)
    r = client.post(url, headers=AUTH, json={"model": "gemini-3-pro-image-preview", "prompt": "a"})
    item = r.json()["data"]["data"][0]
    assert item["b64_json"] == "" and item["url"].startswith("http")


def test_nebula_contents_and_errors(nebula_emu: AiNebulaEmulator, client: httpx2.Client) -> None:
    url = f"{nebula_emu.base_url}/images/generations"
    img = to_data_url(_png(32, 32))
    turns = [
        {"role": "user", "parts": [{"text": "bird eye view"}, {"image": img}]},
        {"role": "model", "parts": [{"text": "Generated 1 image for you"}, {"image": img}]},
        {"role": "user", "parts": [{"text": "snowy night"}]},
    ]
    model = "gemini-2.5-flash-image-preview"
    r = client.post(url, headers=AUTH, json={"model": model, "response_format": "b64_json", "contents": turns})
    assert r.json()["code"] == 200

    def business(payload: dict) -> dict:
        resp = client.post(url, headers=AUTH, json=payload)
        assert resp.status_code == 200
        assert resp.json()["data"] is None
        return resp.json()

    assert business({"model": model, "prompt": "a", "n": 2})["code"] == 400
    assert business({"model": "dall-e-3", "prompt": "a"})["code"] == 404
    assert business({"model": model})["code"] == 400
    assert business({"model": model, "contents": turns[:2]})["code"] == 400  # ends with a model turn
    assert business({"model": model, "contents": [turns[0], turns[2]]})["code"] == 400  # no alternation
    bad = [{"role": "user", "parts": [{"image": "data:image/png;base64,@@@"}]}]
    assert business({"model": model, "contents": bad})["code"] == 400
    r = client.post(url, json={"model": model, "prompt": "a"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["code"] == 401 and r.json()["data"] is None
    nebula_emu.inject(Fault.http(503))
    r = client.post(url, headers=AUTH, json={"model": model, "prompt": "a"})
    assert r.status_code == 503 and r.json()["code"] == 503


# ---------------------------------------------------------------------------------------------
# nano-gpt


def test_nano_generate_and_discovery(nano_emu: NanoGptEmulator, client: httpx2.Client) -> None:
    r = client.post(f"{nano_emu.base_url}/images/generations", headers=AUTH, json={"prompt": "a", "n": 2})
    body = r.json()
    assert r.status_code == 200 and len(body["data"]) == 2
    assert all(set(d) == {"b64_json"} for d in body["data"])
    assert isinstance(body["cost"], float) and body["paymentSource"] in ("USD", "XNO")
    assert isinstance(body["remainingBalance"], float)
    r = client.post(
        f"{nano_emu.base_url}/images/generations", headers=AUTH, json={"prompt": "a", "response_format": "url"}
    )
    assert set(r.json()["data"][0]) == {"url"}
    d = client.get(f"{nano_emu.origin}/api/v1/image-models", params={"detailed": "true"})  # no auth
    assert d.status_code == 200
    models = {m["id"]: m for m in d.json()["data"]}
    assert set(models) == {
        "hidream",
        "flux-kontext",
        "flux-lora/inpainting",
        "gpt-image-1",
        "gpt-image-2",
        "seedream-5.0",
    }
    # nano-gpt's flags; `multi_image` only where the listing states it.
    assert models["flux-kontext"]["capabilities"] == {
        "image_generation": True,
        "text_to_image": True,
        "image_to_image": True,
        "inpainting": False,
        "nsfw": False,
    }
    assert models["seedream-5.0"]["capabilities"]["multi_image"] is True
    assert models["gpt-image-2"]["capabilities"]["multi_image"] is True
    sp = models["hidream"]["supported_parameters"]
    assert sp["resolutions"] == ["1024x1024", "768x1360", "1360x768"] and sp["max_images"] == 4
    assert sp["n"] == {"type": "range", "min": 1, "max": 4, "default": 1}
    assert sp["resolution"] == {"type": "enum", "values": sp["resolutions"], "default": "1024x1024"}
    assert sp["guidance_scale"] == {"type": "range", "min": 0, "max": 20, "default": 7.5}
    assert models["gpt-image-1"]["supported_parameters"]["max_input_images"] == 8
    assert models["flux-kontext"]["supported_parameters"]["kontext_max_mode"] == {"type": "boolean", "default": False}
    assert d.json()["meta"]["count"] == len(models)


def test_nano_inputs(nano_emu: NanoGptEmulator, client: httpx2.Client) -> None:
    url = f"{nano_emu.base_url}/images/generations"
    img = to_data_url(_png(64, 64))
    r = client.post(url, headers=AUTH, json={"prompt": "a", "imageDataUrl": img})
    assert r.status_code == 400 and "model does not support image input" in r.json()["error"]["message"]
    r = client.post(
        url,
        headers=AUTH,
        json={
            "prompt": "a",
            "model": "flux-kontext",
            "imageDataUrls": [img, img],
            "strength": 0.5,
            "seed": 7,
            "kontext_max_mode": True,
            "size": "1376x768",
        },
    )
    assert r.status_code == 200, r.text
    assert _decode(r.json()["data"][0]["b64_json"]).size == (1376, 768)
    r = client.post(url, headers=AUTH, json={"prompt": "a", "model": "flux-lora/inpainting", "imageDataUrl": img})
    assert r.status_code == 400
    r = client.post(
        url,
        headers=AUTH,
        json={
            "prompt": "a",
            "model": "flux-lora/inpainting",
            "imageDataUrl": img,
            "maskDataUrl": to_data_url(_png(64, 64, "L")),
        },
    )
    assert r.status_code == 200
    huge = "data:image/png;base64," + "A" * 4_000_001
    r = client.post(url, headers=AUTH, json={"prompt": "a", "model": "flux-kontext", "imageDataUrl": huge})
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error" and "max 4MB" in r.json()["error"]["message"]
    r = client.post(url, headers=AUTH, json={"prompt": "a", "size": "2048x2048"})
    assert r.status_code == 400 and "768x1360" in r.json()["error"]["message"]
    r = client.post(url, headers=AUTH, json={"prompt": "a", "guidance_scale": 25})
    assert r.status_code == 400
    r = client.post(url, headers=AUTH, json={"prompt": "a", "image_url": img})
    assert r.status_code == 400
    r = client.post(url, headers=AUTH, data={"prompt": "a"})
    assert r.status_code == 415


def test_nano_balance_auth_fallback(client: httpx2.Client) -> None:
    with NanoGptEmulator(balance=0.015, url_fallback=True, payment_source="XNO") as emu:
        url = f"{emu.base_url}/images/generations"
        r = client.post(url, headers=AUTH, json={"prompt": "a", "response_format": "url"})
        body = r.json()
        assert set(body["data"][0]) == {"b64_json"} and body["paymentSource"] == "XNO"
        assert body["remainingBalance"] == pytest.approx(0.005)
        r = client.post(url, headers=AUTH, json={"prompt": "a"})
        assert r.status_code == 402 and r.json() == {"error": "Insufficient balance", "status": 402}
        r = client.post(url, headers={"Authorization": "Bearer bad"}, json={"prompt": "a"})
        assert r.status_code == 401
        assert r.json() == {"error": {"message": "Invalid API key", "type": "authentication_error"}}


# ---------------------------------------------------------------------------------------------
# llm.vin


def test_llm_vin(vin_emu: LlmVinEmulator, client: httpx2.Client) -> None:
    url = f"{vin_emu.base_url}/images/generations"
    r = client.post(
        url,
        json={
            "model": "flux-1",
            "prompt": "a",
            "n": 2,
            "size": "1024x1792",
            "guidance_scale": 7.5,
            "num_inference_steps": 50,
        },
    )
    body = r.json()
    assert r.status_code == 200 and set(body) == {"created", "data"} and len(body["data"]) == 2
    assert set(body["data"][0]) == {"url"}
    assert Image.open(io.BytesIO(client.get(body["data"][0]["url"]).content)).size == (1024, 1792)
    r = client.post(url, json={"model": "flux-1", "prompt": "a", "size": "2048x2048"})
    assert r.status_code == 400 and r.json() == {
        "error": {
            "message": "Invalid image size '2048x2048'. Allowed sizes: 1024x1024, 1024x1792, 1792x1024",
            "type": "invalid_request_error",
        }
    }
    assert client.post(url, json={"model": "sdxl", "prompt": "a"}).status_code == 404
    assert client.post(url, json={"model": "flux-1", "prompt": "a", "response_format": "b64_json"}).status_code == 400
    assert (
        client.post(url, headers={"Authorization": "Bearer nope"}, json={"model": "flux-1", "prompt": "a"}).status_code
        == 401
    )
    assert client.post(url, headers=AUTH, json={"model": "flux-1", "prompt": "a"}).status_code == 200


def test_llm_vin_rate_limit(vin_emu: LlmVinEmulator, client: httpx2.Client) -> None:
    url = f"{vin_emu.base_url}/images/generations"
    vin_emu.rate_limit_per_minute = 2
    try:
        for _ in range(2):
            assert client.post(url, json={"model": "flux-1", "prompt": "a"}).status_code == 200
        r = client.post(url, json={"model": "flux-1", "prompt": "a"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json() == {"error": {"message": "Rate limit exceeded", "type": "rate_limit_error"}}
        assert client.post(url, headers=AUTH, json={"model": "flux-1", "prompt": "a"}).status_code == 200
    finally:
        vin_emu.rate_limit_per_minute = None


# ---------------------------------------------------------------------------------------------
# modelmax


def test_modelmax(mm_emu: ModelmaxEmulator, client: httpx2.Client) -> None:
    url = f"{mm_emu.base_url}/images/generations"
    r = client.post(
        url,
        headers=AUTH,
        json={"model": MM_MODEL, "prompt": "a lake", "quality": "hd", "style": "natural", "n": 2, "size": "2K"},
    )
    body = r.json()
    assert r.status_code == 200 and set(body["data"][0]) == {"url", "revised_prompt"}
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert Image.open(io.BytesIO(client.get(body["data"][0]["url"]).content)).size == (2048, 2048)
    r = client.post(url, headers=AUTH, json={"model": MM_MODEL, "prompt": "a", "response_format": "b64_json"})
    assert set(r.json()["data"][0]) == {"b64_json", "revised_prompt"}
    r = client.post(url, headers=AUTH, json={"model": "gpt-4o", "prompt": "a"})
    assert r.status_code == 400 and "model doesn't support image generation" in r.json()["error"]["message"]
    assert client.post(url, json={"model": MM_MODEL, "prompt": "a"}).status_code == 401
    mm_emu.inject(Fault.http(502))
    r = client.post(url, headers=AUTH, json={"model": MM_MODEL, "prompt": "a"})
    assert r.status_code == 502
    assert r.json() == {"error": {"message": "Upstream provider error", "type": "upstream_error"}}
    mm_emu.balance = 0.01
    try:
        r = client.post(url, headers=AUTH, json={"model": MM_MODEL, "prompt": "a"})
        assert r.status_code == 402
        assert r.json() == {"error": {"message": "Insufficient balance", "type": "insufficient_balance"}}
    finally:
        mm_emu.balance = None


# ---------------------------------------------------------------------------------------------
# Faults (exercised on modelmax and OpenAI; the machinery is shared)


def _mm(client: httpx2.Client, emu: ModelmaxEmulator, **extra: object) -> httpx2.Response:
    return client.post(
        f"{emu.base_url}/images/generations", headers=AUTH, json={"model": MM_MODEL, "prompt": "a", **extra}
    )


def test_fault_status_retry_after_and_times(mm_emu: ModelmaxEmulator, client: httpx2.Client) -> None:
    mm_emu.inject(Fault.http(503, retry_after=2, retry_after_ms=1500), times=2)
    for _ in range(2):
        r = _mm(client, mm_emu)
        assert r.status_code == 503
        assert (r.headers["Retry-After"], r.headers["retry-after-ms"]) == ("2", "1500")
    assert _mm(client, mm_emu).status_code == 200
    mm_emu.inject(Fault.http(500, body={"custom": True}))
    assert _mm(client, mm_emu).json() == {"custom": True}


def test_fault_delay_and_drip(mm_emu: ModelmaxEmulator, client: httpx2.Client) -> None:
    mm_emu.inject(Fault.delay(0.4))
    t = time.monotonic()
    assert _mm(client, mm_emu).status_code == 200
    assert time.monotonic() - t >= 0.4
    mm_emu.inject(Fault.drip(0.8, chunks=4))
    t = time.monotonic()
    with client.stream(
        "POST", f"{mm_emu.base_url}/images/generations", headers=AUTH, json={"model": MM_MODEL, "prompt": "a"}
    ) as r:
        body = r.read()
    # Lower bounds only: the emulator's sleeps guarantee them, however loaded the machine is.
    assert time.monotonic() - t >= 0.8
    assert json.loads(body)["data"][0]["url"]


def test_fault_bad_bodies(mm_emu: ModelmaxEmulator, client: httpx2.Client) -> None:
    mm_emu.inject(Fault.truncated_json())
    r = _mm(client, mm_emu)
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        r.json()
    mm_emu.inject(Fault.invalid_json())
    r = _mm(client, mm_emu)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        r.json()
    mm_emu.inject(Fault.http200_error("upstream exploded"))
    r = _mm(client, mm_emu)
    assert r.status_code == 200 and r.json()["error"]["message"] == "upstream exploded"


def test_fault_payloads(mm_emu: ModelmaxEmulator, client: httpx2.Client) -> None:
    mm_emu.inject(Fault.invalid_b64())
    b64 = _mm(client, mm_emu, response_format="b64_json").json()["data"][0]["b64_json"]
    with pytest.raises(binascii.Error):
        base64.b64decode(b64, validate=True)
    mm_emu.inject(Fault.not_image())
    raw = base64.b64decode(_mm(client, mm_emu, response_format="b64_json").json()["data"][0]["b64_json"])
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(raw))
    mm_emu.inject(Fault.url_404())
    r = client.get(_mm(client, mm_emu).json()["data"][0]["url"])
    assert r.status_code == 404 and b"NoSuchKey" in r.content
    mm_emu.inject(Fault.url_expired())
    r = client.get(_mm(client, mm_emu).json()["data"][0]["url"])
    assert r.status_code == 403 and b"expired" in r.content and r.headers["content-type"] == "application/xml"
    mm_emu.inject(Fault.data_url())
    assert _mm(client, mm_emu).json()["data"][0]["url"].startswith("data:image/png;base64,")
    custom = encode(flat(8, 8), "jpeg")
    mm_emu.set_image(custom, times=1)
    r = _mm(client, mm_emu, response_format="b64_json")
    assert base64.b64decode(r.json()["data"][0]["b64_json"]) == custom
    assert base64.b64decode(_mm(client, mm_emu, response_format="b64_json").json()["data"][0]["b64_json"]) != custom


def test_fault_huge_and_drop(openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    url = f"{openai_emu.base_url}/images/generations"
    openai_emu.inject(Fault.huge())
    total = 0
    with client.stream("POST", url, headers=AUTH, json={"prompt": "a"}) as r:
        assert "content-length" not in r.headers
        for chunk in r.iter_raw():
            total += len(chunk)
    assert total >= 60 * 1024 * 1024
    openai_emu.inject(Fault.drop())
    with pytest.raises(httpx2.TransportError):
        client.post(url, headers=AUTH, json={"prompt": "a"})
    assert openai_emu.requests[-1].status is None and openai_emu.requests[-1].faults == ["drop"]
    assert client.post(url, headers=AUTH, json={"prompt": "a"}).status_code == 200


def test_fault_path_filter(legacy_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    legacy_emu.inject(Fault.http(500), path="/images/edits")
    legacy_emu.inject(Fault.http(503), path="/files/")
    r = client.post(f"{legacy_emu.base_url}/images/generations", headers=AUTH, json={"prompt": "a"})
    assert r.status_code == 200  # neither fault matches generations
    assert client.get(r.json()["data"][0]["url"]).status_code == 503
    assert client.get(f"{legacy_emu.base_url}/models", headers=AUTH).status_code == 200
    assert len(legacy_emu.pending_faults) == 1


# ---------------------------------------------------------------------------------------------
# The gateways as they are on 2026-12-01: shut-down models, the gpt-image-2 family, new models

SHUT_DOWN_IDS = ["dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "chatgpt-image-latest"]
LIVE_IDS = {
    "gpt-image-2",
    "gpt-image-2.5-flare",
    "gpt-image-2.5-sunburst",
    "gpt-image-2.6-flare",
    "gpt-image-2.6-sunburst",
    "gpt-image-2.7-nova",
}
SIZE_RULE_WORDS = ("multiples of 16", "at most 3840", "3:1", "655,360", "8,294,400")


def _gen(client: httpx2.Client, emu: Emulator, **body: object) -> httpx2.Response:
    return client.post(f"{emu.base_url}/images/generations", headers=AUTH, json={"prompt": "a fox", **body})


def _error(r: httpx2.Response) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    return err


@pytest.mark.parametrize("model", SHUT_DOWN_IDS)
def test_openai_shut_down_model_answers_404_deprecated(
    model: str, openai_emu: OpenAIEmulator, client: httpx2.Client
) -> None:
    r = _gen(client, openai_emu, model=model)
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "message": f"The model '{model}' has been deprecated, learn more here: "
            "https://platform.openai.com/docs/deprecations",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_openai_models_carry_shutdown_dates(openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    listed = {m["id"]: m for m in client.get(f"{openai_emu.base_url}/models", headers=AUTH).json()["data"]}
    assert LIVE_IDS <= set(listed) and not set(SHUT_DOWN_IDS) & set(listed)
    assert all("shutdown_date" in m for m in listed.values())
    dated = {mid: m["shutdown_date"] for mid, m in listed.items() if m["shutdown_date"] is not None}
    assert list(dated) == ["gpt-image-2"]  # deprecated, still served until its date
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", dated["gpt-image-2"]) and dated["gpt-image-2"] > "2026-12-01"


def test_openai_no_model_gets_a_live_one(openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    r = _gen(client, openai_emu)
    assert r.status_code == 200 and _decode(r.json()["data"][0]["b64_json"]).size == (1024, 1024)


@pytest.mark.parametrize("model", sorted(LIVE_IDS))
def test_gpt_image_2_family_refuses_response_format(
    model: str, openai_emu: OpenAIEmulator, client: httpx2.Client
) -> None:
    err = _error(_gen(client, openai_emu, model=model, response_format="b64_json"))
    assert err == {
        "message": "Unknown parameter: 'response_format'.",
        "type": "invalid_request_error",
        "param": "response_format",
        "code": "unknown_parameter",
    }


def test_gpt_image_2_answers_base64_with_usage(openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    r = _gen(client, openai_emu, model="gpt-image-2.7-nova", n=3, quality="max", size="1536x1024")
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) == 3 and all(set(d) == {"b64_json"} for d in body["data"])
    assert _decode(body["data"][0]["b64_json"]).size == (1536, 1024)
    usage = body["usage"]
    assert usage["output_tokens"] > 0 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert (body["quality"], body["size"], body["output_format"]) == ("max", "1536x1024", "png")


@pytest.mark.parametrize("size", ["auto", "1024x1024", "1024x640", "2880x2880", "3840x1280", "1280x3840", "2048x1152"])
def test_gpt_image_2_size_rule_accepts(size: str, openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    r = _gen(client, openai_emu, model="gpt-image-2", size=size)
    assert r.status_code == 200, r.text
    expected = (1024, 1024) if size == "auto" else tuple(int(v) for v in size.split("x"))
    assert _decode(r.json()["data"][0]["b64_json"]).size == expected


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        ("1000x1000", "multiples of 16"),  # sides not multiples of 16
        ("3856x1296", "longest side"),  # longest side above 3840
        ("3840x1264", "aspect ratio"),  # wider than 3:1
        ("1008x640", "between"),  # 645,120 pixels: too few
        ("2896x2880", "between"),  # 8,340,480 pixels: too many
        ("1024 by 1024", "WIDTHxHEIGHT"),
        ("256x256", "between"),
    ],
)
def test_gpt_image_2_size_rule_refuses(
    size: str, reason: str, openai_emu: OpenAIEmulator, client: httpx2.Client
) -> None:
    err = _error(_gen(client, openai_emu, model="gpt-image-2", size=size))
    assert (err["param"], err["code"]) == ("size", "invalid_value")
    assert f"'{size}'" in err["message"] and reason in err["message"]
    assert all(word in err["message"] for word in SIZE_RULE_WORDS)  # the whole rule, to fix the call


def test_gpt_image_2_quality_tiers(openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    err = _error(_gen(client, openai_emu, model="gpt-image-2", quality="xhigh"))
    assert (err["param"], err["code"]) == ("quality", "invalid_value")
    assert all(f"'{q}'" in err["message"] for q in ("low", "medium", "high", "auto"))
    for model in ("gpt-image-2.5-flare", "gpt-image-2.6-sunburst", "gpt-image-2.7-nova"):
        for quality in ("xhigh", "max"):
            assert _gen(client, openai_emu, model=model, quality=quality).status_code == 200
    assert _gen(client, openai_emu, model="gpt-image-2.5-sunburst", quality="hd").status_code == 400


def test_complexity_exists_on_2_6_only(openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    for model in ("gpt-image-2.6-flare", "gpt-image-2.6-sunburst"):
        assert _gen(client, openai_emu, model=model, complexity="high").status_code == 200
    err = _error(_gen(client, openai_emu, model="gpt-image-2.6-flare", complexity="extreme"))
    assert (err["param"], err["code"]) == ("complexity", "invalid_value")
    for model in ("gpt-image-2", "gpt-image-2.5-flare", "gpt-image-2.7-nova"):
        err = _error(_gen(client, openai_emu, model=model, complexity="low"))
        assert err == {
            "message": "Unknown parameter: 'complexity'.",
            "type": "invalid_request_error",
            "param": "complexity",
            "code": "unknown_parameter",
        }


def test_gpt_image_2_6_svg_answer_is_a_vector_document(openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    r = _gen(client, openai_emu, model="gpt-image-2.6-flare", output_format="svg", size="1536x1024")
    assert r.status_code == 200, r.text
    assert r.json()["output_format"] == "svg"
    doc = base64.b64decode(r.json()["data"][0]["b64_json"], validate=True)
    root = ElementTree.fromstring(doc)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert (root.get("width"), root.get("height"), root.get("viewBox")) == ("1536", "1024", "0 0 1536 1024")
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(doc))  # not a raster


def test_gpt_image_2_6_gif_answer_is_animated(openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    r = _gen(client, openai_emu, model="gpt-image-2.6-sunburst", output_format="gif", size="1024x768")
    assert r.status_code == 200, r.text
    img = _decode(r.json()["data"][0]["b64_json"])
    assert (img.format, img.size) == ("GIF", (1024, 768))
    assert img.is_animated and img.n_frames > 1


def test_gif_and_svg_only_on_2_6_generations(openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    for model in ("gpt-image-2", "gpt-image-2.5-flare", "gpt-image-2.7-nova"):
        for fmt in ("gif", "svg"):
            err = _error(_gen(client, openai_emu, model=model, output_format=fmt))
            assert (err["param"], err["code"]) == ("output_format", "invalid_value")
    r = _edit(client, openai_emu, [_png(1024, 1024)], model="gpt-image-2.6-flare", output_format="svg")
    err = _error(r)
    assert err["param"] == "output_format" and "'webp'" in err["message"]


def test_gpt_image_2_refuses_transparency_and_input_fidelity(openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    err = _error(_gen(client, openai_emu, model="gpt-image-2", background="transparent"))
    assert (err["param"], err["code"]) == ("background", "invalid_value") and "'opaque'" in err["message"]
    assert _gen(client, openai_emu, model="gpt-image-2", background="opaque").status_code == 200
    err = _error(_edit(client, openai_emu, [_png(1024, 1024)], model="gpt-image-2", input_fidelity="high"))
    assert (err["param"], err["code"]) == ("input_fidelity", "unsupported_parameter")


def test_gpt_image_2_n_above_maximum(openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    err = _error(_gen(client, openai_emu, model="gpt-image-2", n=12))
    assert err == {
        "message": "Invalid 'n': integer above maximum value. Expected a value <= 10, but got 12 instead.",
        "type": "invalid_request_error",
        "param": "n",
        "code": "integer_above_max_value",
    }
    assert len(_gen(client, openai_emu, model="gpt-image-2", n=10).json()["data"]) == 10


def _edit(
    client: httpx2.Client, emu: Emulator, pictures: list[bytes], mask: bytes | None = None, **form: object
) -> httpx2.Response:
    files = [("image[]", (f"{i}.png", data, "image/png")) for i, data in enumerate(pictures)]
    if mask is not None:
        files.append(("mask", ("mask.png", mask, "image/png")))
    data = {"prompt": "add a hat", **{k: str(v) for k, v in form.items()}}
    return client.post(f"{emu.base_url}/images/edits", headers=AUTH, files=files, data=data)


def test_gpt_image_2_edits_sixteen_inputs_and_an_alpha_mask(openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    pictures = [_png(256, 256)] * 16
    r = _edit(client, openai_emu, pictures, _png(256, 256, "RGBA"), model="gpt-image-2.7-nova", size="1024x1536")
    assert r.status_code == 200, r.text
    body = r.json()
    assert _decode(body["data"][0]["b64_json"]).size == (1024, 1536)
    assert body["usage"]["input_tokens_details"]["image_tokens"] == 16 * 323
    assert len(openai_emu.requests[-1].files["image[]"]) == 16
    err = _error(_edit(client, openai_emu, [_png(256, 256)] * 17, model="gpt-image-2"))
    assert err["param"] == "image" and "16" in err["message"]
    err = _error(_edit(client, openai_emu, [_png(256, 256)], _png(128, 128, "RGBA"), model="gpt-image-2"))
    assert err["param"] == "mask" and "does not match" in err["message"]
    err = _error(_edit(client, openai_emu, [_png(256, 256)], _png(256, 256), model="gpt-image-2"))
    assert err["param"] == "mask" and "alpha" in err["message"]
    err = _error(_edit(client, openai_emu, [_png(256, 256)], model="gpt-image-2", response_format="b64_json"))
    assert (err["param"], err["code"]) == ("response_format", "unknown_parameter")


def test_openai_faults_still_apply_to_todays_models(openai_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    openai_emu.inject(Fault.rate_limit(retry_after=3))
    r = _gen(client, openai_emu, model="gpt-image-2")
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    openai_emu.inject(Fault.invalid_b64())
    b64 = _gen(client, openai_emu, model="gpt-image-2").json()["data"][0]["b64_json"]
    with pytest.raises(binascii.Error):
        base64.b64decode(b64, validate=True)


def test_nexllm_forwards_gpt_image_to_openai(nexllm_emu: NexLLMEmulator, client: httpx2.Client) -> None:
    listed = {m["id"] for m in client.get(f"{nexllm_emu.base_url}/models", headers=AUTH).json()["data"]}
    assert {"gpt-image-2", "gpt-image-2.6-flare", "gpt-image-2.7-nova", "dall-e-3"} <= listed
    assert "gpt-image-1" not in listed
    # OpenAI's refusals come back as OpenAI wrote them.
    r = _gen(client, nexllm_emu, model="gpt-image-2", response_format="url")
    assert r.status_code == 400 and r.json() == {
        "error": {
            "message": "Unknown parameter: 'response_format'.",
            "type": "invalid_request_error",
            "param": "response_format",
            "code": "unknown_parameter",
        }
    }
    err = _error(_gen(client, nexllm_emu, model="gpt-image-2.7-nova", size="1000x1000"))
    assert err["param"] == "size" and "multiples of 16" in err["message"]
    r = _gen(client, nexllm_emu, model="gpt-image-2.7-nova", quality="xhigh", size="2048x1152")
    assert r.status_code == 200 and _decode(r.json()["data"][0]["b64_json"]).size == (2048, 1152)
    r = _edit(client, nexllm_emu, [_png(256, 256)] * 3, _png(256, 256, "RGBA"), model="gpt-image-2")
    assert r.status_code == 200, r.text


def test_nexllm_no_channel_is_503(nexllm_emu: NexLLMEmulator, client: httpx2.Client) -> None:
    for model in ("gpt-image-1", "gpt-image-9"):
        r = _gen(client, nexllm_emu, model=model)
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["message"].startswith(f"No available channel for model {model} under group default")
        assert (err["type"], err["code"], err["param"]) == ("new_api_error", "model_not_found", "")


def test_nexllm_drops_unknown_fields_for_its_other_models(nexllm_emu: NexLLMEmulator, client: httpx2.Client) -> None:
    r = _gen(client, nexllm_emu, model="dall-e-3", output_format="webp", seed=7, size="1024x1024")
    assert r.status_code == 200 and "url" in r.json()["data"][0]
    assert nexllm_emu.requests[-1].json["seed"] == 7  # it was sent; the relay dropped it silently
    r = _edit(client, nexllm_emu, [_png(256, 256, "RGBA")], model="dall-e-2", input_fidelity="high", size="256x256")
    assert r.status_code == 200, r.text


def test_nano_gpt_todays_models(nano_emu: NanoGptEmulator, client: httpx2.Client) -> None:
    r = _gen(client, nano_emu, model="gpt-image-2", quality="high", size="1536x1024")
    assert r.status_code == 200 and _decode(r.json()["data"][0]["b64_json"]).size == (1536, 1024)
    assert _gen(client, nano_emu, model="hidream", quality="high").status_code == 400  # not its knob
    refs = [to_data_url(_png(64, 64)) for _ in range(3)]
    r = _gen(client, nano_emu, model="seedream-5.0", size="2K", imageDataUrls=refs, seed=3)
    assert r.status_code == 200 and _decode(r.json()["data"][0]["b64_json"]).size == (2048, 2048)
    r = _gen(client, nano_emu, model="seedream-5.0", imageDataUrls=refs * 5)
    assert r.status_code == 400 and "14" in r.json()["error"]["message"]
    listed = client.get(f"{nano_emu.origin}/api/v1/image-models", params={"detailed": "true"}).json()["data"]
    seedream = next(m for m in listed if m["id"] == "seedream-5.0")
    assert seedream["input_reference_constraints"]["max_items"] == 14
    assert seedream["supported_parameters"]["resolution"]["values"][:2] == ["2K", "4K"]
    assert seedream["architecture"]["input_modalities"] == ["text", "image"]


def test_nebula_new_model_and_discontinued_imagen(nebula_emu: AiNebulaEmulator, client: httpx2.Client) -> None:
    r = _gen(client, nebula_emu, model="gemini-3.5-flash-image-preview")
    assert r.status_code == 200 and r.json()["code"] == 200 and r.json()["data"]["data"][0]["url"]
    for model in ("imagen-4.0-generate-001", "imagen-3.0-generate-002"):
        r = _gen(client, nebula_emu, model=model)
        body = r.json()
        assert r.status_code == 200 and body["code"] == 404 and body["data"] is None
        assert model in body["msg"] and "discontinued" in body["msg"]


def test_llm_vin_new_model(vin_emu: LlmVinEmulator, client: httpx2.Client) -> None:
    r = _gen(client, vin_emu, model="flux-2.5-pro", size="1536x1024")
    assert r.status_code == 200
    assert Image.open(io.BytesIO(client.get(r.json()["data"][0]["url"]).content)).size == (1536, 1024)
    r = _gen(client, vin_emu, model="flux-2.5-pro", n=2)
    assert r.status_code == 400 and "between 1 and 1" in r.json()["error"]["message"]


def test_modelmax_discontinued_imagen(mm_emu: ModelmaxEmulator, client: httpx2.Client) -> None:
    r = _gen(client, mm_emu, model="imagen-3")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "model_not_found" and "discontinued" in err["message"] and MM_MODEL in err["message"]
    with ModelmaxEmulator(serve_retired=True) as before:
        assert _gen(client, before, model="imagen-3").status_code == 200
        assert _gen(client, before, model=MM_MODEL).status_code == 200


def test_serve_retired_keeps_todays_models(legacy_emu: OpenAIEmulator, client: httpx2.Client) -> None:
    listed = {m["id"] for m in client.get(f"{legacy_emu.base_url}/models", headers=AUTH).json()["data"]}
    assert LIVE_IDS | {"gpt-image-1", "dall-e-2"} <= listed
    assert _gen(client, legacy_emu, model="gpt-image-2.6-flare", output_format="gif").status_code == 200
    assert _gen(client, legacy_emu, model="gpt-image-1.5").status_code == 404  # never served here


# ---------------------------------------------------------------------------------------------
# Foreground runner


def test_main_subprocess(client: httpx2.Client) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.emulators", "llm-vin", "--port", "0", "--latency", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("READY http://127.0.0.1:") and line.endswith("/v1")
        base_url = line.split()[1]
        r = client.post(f"{base_url}/images/generations", json={"model": "flux-1", "prompt": "a"})
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
