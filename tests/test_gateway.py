"""GatewayClient against the loopback emulators: real HTTP on 127.0.0.1, every dialect and fault."""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import anyio
import pytest
from PIL import Image
from pydantic import SecretStr

from mcp_imagegen import images as pipeline
from mcp_imagegen.checks import fit_inputs, prepare
from mcp_imagegen.config import EndpointConfig
from mcp_imagegen.dialects import Turn, WireRequest, decode_models, encode
from mcp_imagegen.errors import (
    AuthenticationError,
    BadGatewayResponseError,
    GatewayError,
    GatewayTimeoutError,
    ImageGenError,
    InsufficientBalanceError,
    InvalidRequestError,
    ModelNotFoundError,
    QuotaExhaustedError,
    RateLimitedError,
)
from mcp_imagegen.gateway import GatewayClient
from mcp_imagegen.manifests import load_manifest
from mcp_imagegen.models import ImageRequest, InputImage, WireResult
from mcp_imagegen.resolution import resolve
from tests.emulators import EMULATORS, Emulator, Fault

KEY = "sk-test-SECRET-1234"
RETIRED_SERVED = ("openai", "modelmax")
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def running() -> Iterator[dict[str, Emulator]]:
    with ExitStack() as stack:
        started: dict[str, Emulator] = {}
        for provider, cls in EMULATORS.items():
            # Tests here are about the wire, not the model world: openai and modelmax still serve
            # the models their providers shut down (the manifests' defaults).
            emu = cls(api_key=KEY, serve_retired=True) if provider in RETIRED_SERVED else cls(api_key=KEY)
            stack.enter_context(emu)
            started[provider] = emu
        yield started


@pytest.fixture
def emus(running: dict[str, Emulator]) -> dict[str, Emulator]:
    for emu in running.values():
        emu.reset()
    return running


@pytest.fixture
def fresh(emulator: Any) -> Any:
    """A private emulator, for tests whose delayed requests outlive them (they would take faults
    meant for later tests on a shared one)."""
    return lambda provider: emulator(
        provider, api_key=KEY, **({"serve_retired": True} if provider in RETIRED_SERVED else {})
    )


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG, logger="mcp_imagegen")
    yield
    for record in caplog.records:
        text = record.getMessage() + repr(getattr(record, "fields", ""))
        assert KEY not in text
        assert "X-Amz-Signature" not in text  # signed query strings stay out of logs


def endpoint(provider: str, emu: Emulator | None, *, key: str | None = KEY, **kw: Any) -> EndpointConfig:
    ep = EndpointConfig(
        name=kw.pop("name", provider),
        provider=provider,
        base_url=kw.pop("base_url", emu.base_url if emu else None),
        timeout_s=kw.pop("timeout_s", 10.0),
        **kw,
    )
    ep.api_key = SecretStr(key) if key else None
    return ep


def client(**kw: Any) -> GatewayClient:
    kw.setdefault("backoff_base_s", 0.01)
    return GatewayClient(max_retries=kw.pop("max_retries", 2), **kw)


def assert_clean(err: BaseException) -> None:
    for text in (str(err), repr(err), getattr(err, "message", ""), getattr(err, "gateway_message", "") or ""):
        assert KEY not in text
    if isinstance(err, ImageGenError):
        assert KEY not in err.agent_text()


async def call(
    gw: GatewayClient,
    provider: str,
    emu: Emulator,
    request: ImageRequest,
    *,
    model: str | None = None,
    mask: bytes | None = None,
    lineage: list[Turn] | None = None,
    on_retry: Any = None,
    **ep: Any,
) -> tuple[WireResult, list[bytes]]:
    """encode -> send -> decode -> fetch, the way the service does it, for the first batch."""
    manifest = load_manifest(provider)
    spec = resolve(model or manifest.default_model or "", manifest).spec
    prepared = prepare(request, manifest, spec)
    wire = encode(
        manifest, prepared, request, prepared.batches[0], images=request.images, mask=mask, lineage=lineage or []
    )
    result = await gw.send(endpoint(provider, emu, **ep), manifest, wire, on_retry=on_retry)
    blobs = []
    for item in result.images:
        if item.b64:
            blobs.append(base64.b64decode(item.b64, validate=True))
        else:
            assert item.url
            blobs.append(await gw.fetch_image(item.url, max_bytes=64 * 1024 * 1024))
    return result, blobs


def is_image(data: bytes) -> bool:
    return data.startswith(b"\x89PNG") or data.startswith(b"\xff\xd8") or data[8:12] == b"WEBP"


def png(w: int, h: int, *, noise: bool = False, alpha: bool = False) -> bytes:
    mode = "RGBA" if alpha else "RGB"
    im = Image.frombytes(mode, (w, h), os.urandom(w * h * len(mode))) if noise else Image.new(mode, (w, h), "red")
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def input_image(data: bytes, source: str = "test input") -> InputImage:
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        fmt = (im.format or "png").lower()
    return InputImage(data=data, mime_type=f"image/{fmt}", width=w, height=h, source=source)


def gen(prompt: str = "a lighthouse", **kw: Any) -> ImageRequest:
    return ImageRequest("generate", prompt, **kw)


# --- generate on every gateway -------------------------------------------------------------------


@pytest.mark.parametrize("provider", list(EMULATORS))
async def test_generate_each_gateway(provider: str, emus: dict[str, Emulator]) -> None:
    emu = emus[provider]
    async with client() as gw:
        result, blobs = await call(gw, provider, emu, gen(n=1))
    assert len(blobs) == 1 and is_image(blobs[0])
    first = emu.requests_to("/images/")[0]
    assert first.authorization == f"Bearer {KEY}"
    for rec in emu.requests_to("/files/"):  # result downloads never carry the key
        assert rec.authorization is None
    if provider == "nano-gpt":
        assert result.cost is not None and result.balance is not None
    if provider == "modelmax":
        assert result.usage is not None and result.images[0].revised_prompt
    if provider == "openai":
        assert result.usage and result.usage["total_tokens"] > 0


@pytest.mark.parametrize("provider", RETIRED_SERVED)
async def test_generate_with_the_default_model_on_todays_gateway(provider: str, emulator: Any) -> None:
    emu = emulator(provider, api_key=KEY)  # as the gateway is today: the old ids answer 404
    async with client() as gw:
        _, blobs = await call(gw, provider, emu, gen(n=1))
    assert len(blobs) == 1 and is_image(blobs[0])


async def test_url_answers_are_downloaded(emus: dict[str, Emulator]) -> None:
    emu = emus["llm-vin"]
    async with client() as gw:
        result, blobs = await call(gw, "llm-vin", emu, gen(n=2))
    assert all(item.url and item.b64 is None for item in result.images)
    assert len(blobs) == 2 and all(is_image(b) for b in blobs)
    assert len(emu.requests_to("/files/")) == 2


async def test_data_url_answer_needs_no_network(emus: dict[str, Emulator]) -> None:
    emu = emus["llm-vin"]
    emu.inject(Fault.data_url())
    async with client() as gw:
        result, blobs = await call(gw, "llm-vin", emu, gen())
    assert result.images[0].url and result.images[0].url.startswith("data:image/")
    assert is_image(blobs[0]) and not emu.requests_to("/files/")


async def test_fan_out_batches_in_parallel(emus: dict[str, Emulator]) -> None:
    emu = emus["nano-gpt"]
    manifest = load_manifest("nano-gpt")
    spec = resolve("gpt-image-1", manifest).spec
    assert spec is not None
    request = gen(n=6)
    prepared = prepare(request, manifest, spec, endpoint="nano-gpt")
    assert prepared.batches == [4, 2]
    results: list[WireResult] = []
    async with client() as gw:
        async with anyio.create_task_group() as tg:
            for n in prepared.batches:
                wire = encode(manifest, prepared, request, n, images=[], mask=None, lineage=[])

                async def one(w: WireRequest = wire) -> None:
                    results.append(await gw.send(endpoint("nano-gpt", emu), manifest, w))

                tg.start_soon(one)
    assert sorted(len(r.images) for r in results) == [2, 4]
    assert sorted(r.json["n"] for r in emu.requests_to("/images/")) == [2, 4]


async def test_concurrency_limited_per_endpoint(fresh: Any) -> None:
    emu = fresh("modelmax")
    emu.inject(Fault.delay(0.2), times=None)
    try:
        async with client() as gw, anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(lambda: call(gw, "modelmax", emu, gen(), max_concurrency=4))
    finally:
        emu.clear_faults()
    assert emu.max_in_flight == 4  # a ceiling the user set holds

    emu.reset()
    emu.inject(Fault.delay(0.2), times=None)
    try:
        async with client() as gw, anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(call, gw, "modelmax", emu, gen())
    finally:
        emu.clear_faults()
    assert emu.max_in_flight == 6  # unset: the limit starts generous, nothing queues

    emu.reset()
    emu.inject(Fault.delay(0.2), times=None)
    try:
        async with client() as gw, anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(lambda: call(gw, "modelmax", emu, gen(), max_concurrency=1))
    finally:
        emu.clear_faults()
    assert emu.max_in_flight == 1


# --- edits ---------------------------------------------------------------------------------------


async def test_openai_edit_one_image(emus: dict[str, Emulator]) -> None:
    emu = emus["openai"]
    src = input_image(png(64, 64))
    async with client() as gw:
        _, blobs = await call(gw, "openai", emu, ImageRequest("edit", "add a hat", images=[src]))
    rec = emu.requests_to("/images/edits")[0]
    assert list(rec.files) == ["image"] and rec.files["image"][0].data == src.data
    assert rec.form["model"] == "gpt-image-2" and "response_format" not in rec.form
    assert is_image(blobs[0])


async def test_openai_edit_several_images(emus: dict[str, Emulator]) -> None:
    emu = emus["openai"]
    imgs = [input_image(png(64, 64)), input_image(png(32, 32))]
    async with client() as gw:
        await call(gw, "openai", emu, ImageRequest("edit", "merge them", images=imgs, n=2))
    rec = emu.requests_to("/images/edits")[0]
    assert list(rec.files) == ["image[]"] and len(rec.files["image[]"]) == 2
    assert rec.form["n"] == "2"


async def test_openai_edit_with_mask_dalle2(emus: dict[str, Emulator]) -> None:
    emu = emus["openai"]
    src = input_image(png(64, 64, alpha=True))
    white_mask = png(32, 32)  # no alpha: white marks the area; converted to OpenAI's transparency
    request = ImageRequest("edit", "a window", images=[src], mask=input_image(white_mask), size="256x256")
    manifest = load_manifest("openai")
    spec = resolve("dall-e-2", manifest).spec
    assert spec is not None
    prepared = prepare(request, manifest, spec)
    fitted, _ = fit_inputs(request.images, manifest, spec)
    mask = pipeline.convert_mask(
        white_mask, width=fitted[0].width, height=fitted[0].height, semantics=prepared.mask_semantics or "transparent"
    )
    async with client() as gw:
        _, blobs = await call(gw, "openai", emu, request, model="dall-e-2", mask=mask)
    rec = emu.requests_to("/images/edits")[0]
    assert set(rec.files) == {"image", "mask"} and rec.form["response_format"] == "b64_json"
    assert is_image(blobs[0])


async def test_nano_edit_data_urls(emus: dict[str, Emulator]) -> None:
    emu = emus["nano-gpt"]
    one = input_image(png(64, 64))
    async with client() as gw:
        await call(
            gw,
            "nano-gpt",
            emu,
            ImageRequest("edit", "snow", images=[one], knobs={"strength": 0.3}),
            model="flux-kontext",
        )
        await call(gw, "nano-gpt", emu, ImageRequest("edit", "both", images=[one, one]), model="flux-kontext")
        mask = pipeline.convert_mask(png(64, 64), width=64, height=64, semantics="white")
        await call(
            gw,
            "nano-gpt",
            emu,
            ImageRequest("edit", "fix", images=[one], mask=input_image(mask)),
            model="flux-lora/inpainting",
            mask=mask,
        )
    first, second, third = (r.json for r in emu.requests_to("/images/"))
    assert first["imageDataUrl"].startswith("data:image/png;base64,") and first["strength"] == 0.3
    assert len(second["imageDataUrls"]) == 2 and "imageDataUrl" not in second
    assert third["maskDataUrl"].startswith("data:image/png;base64,")


async def test_nano_four_mb_cap(emus: dict[str, Emulator]) -> None:
    emu = emus["nano-gpt"]
    big = input_image(png(1100, 1100, noise=True), source="file big.png")
    assert len(big.data) * 4 // 3 > 4_000_000
    manifest = load_manifest("nano-gpt")
    spec = resolve("flux-kontext", manifest).spec
    assert spec is not None
    async with client() as gw:
        # Unfitted, the gateway refuses it: 413, not retried.
        with pytest.raises(InvalidRequestError) as e:
            await call(gw, "nano-gpt", emu, ImageRequest("edit", "x", images=[big]), model="flux-kontext")
        assert "too large" in e.value.message.lower() and e.value.status == 413
        assert len(emu.requests_to("/images/")) == 1
        fitted, notes = fit_inputs([big], manifest, spec)
        assert notes
        _, blobs = await call(gw, "nano-gpt", emu, ImageRequest("edit", "x", images=fitted), model="flux-kontext")
    assert is_image(blobs[0])
    assert len(emu.requests_to("/images/")[-1].json["imageDataUrl"]) <= 4_000_000


async def test_ai_nebula_contents_with_lineage(emus: dict[str, Emulator]) -> None:
    emu = emus["ai-nebula"]
    earlier = png(32, 32)
    lineage = [Turn("user", "a tower", []), Turn("model", "Generated 1 image", [(earlier, "image/png")])]
    src = input_image(earlier)
    async with client() as gw:
        result, blobs = await call(
            gw, "ai-nebula", emu, ImageRequest("edit", "at night", images=[src]), lineage=lineage
        )
    body = emu.requests_to("/images/")[0].json
    assert "prompt" not in body and [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert body["contents"][-1]["parts"][0] == {"text": "at night"}
    assert is_image(blobs[0]) and result.images[0].url is None


# --- discovery -----------------------------------------------------------------------------------


async def test_discovery_openai(emus: dict[str, Emulator]) -> None:
    emu, manifest = emus["openai"], load_manifest("openai")
    spec = manifest.discovery
    assert spec is not None
    async with client() as gw:
        doc = await gw.get_json(endpoint("openai", emu), manifest, spec.path, spec.relative_to, spec.auth)
    ids = [d.id for d in decode_models(manifest, doc)]
    assert "gpt-image-1" in ids and "dall-e-2" in ids and "gpt-4o" not in ids
    assert emu.requests[-1].authorization == f"Bearer {KEY}"


async def test_discovery_nano_at_origin_without_auth(emus: dict[str, Emulator]) -> None:
    emu, manifest = emus["nano-gpt"], load_manifest("nano-gpt")
    spec = manifest.discovery
    assert spec is not None and spec.relative_to == "origin"
    async with client() as gw:
        doc = await gw.get_json(endpoint("nano-gpt", emu), manifest, spec.path, spec.relative_to, spec.auth)
    found = {d.id: d for d in decode_models(manifest, doc)}
    rec = emu.requests[-1]
    assert rec.path == "/api/v1/image-models" and rec.query == {"detailed": "true"}
    assert rec.authorization is None
    assert found["flux-lora/inpainting"].capabilities == ("edit", "mask")
    assert found["flux-kontext"].capabilities == ("generate", "edit", "multi_image")
    assert found["hidream"].sizes == ("1024x1024", "768x1360", "1360x768") and found["hidream"].max_n == 4


async def test_discovery_error_is_typed(emus: dict[str, Emulator]) -> None:
    emu, manifest = emus["openai"], load_manifest("openai")
    async with client() as gw:
        with pytest.raises(AuthenticationError) as e:
            await gw.get_json(endpoint("openai", emu, key="sk-wrong-key-000"), manifest, "/models", "base_url", True)
    assert "$OPENAI_API_KEY" in e.value.message


# --- faults and retries --------------------------------------------------------------------------


async def test_429_with_retry_after_then_success(emus: dict[str, Emulator]) -> None:
    emu = emus["openai"]
    emu.inject(Fault.rate_limit(retry_after=None, retry_after_ms=200))
    notes: list[str] = []
    async with client() as gw:
        _, blobs = await call(gw, "openai", emu, gen(), on_retry=notes.append)
    assert len(emu.requests_to("/images/")) == 2 and blobs
    [note] = notes
    assert note.startswith("HTTP 429;") and note.endswith(" in 0.2 s")  # waited what retry-after-ms asked


async def test_429_retry_after_seconds_then_success(emus: dict[str, Emulator]) -> None:
    emu = emus["llm-vin"]
    emu.inject(Fault.rate_limit(retry_after=1))
    notes: list[str] = []
    async with client() as gw:
        await call(gw, "llm-vin", emu, gen(), on_retry=notes.append)
    [note] = notes
    assert note.startswith("HTTP 429;") and note.endswith(" in 1.0 s")  # waited what Retry-After asked
    assert len(emu.requests_to("/images/")) == 2


async def test_429_without_retry_after_backs_off(emus: dict[str, Emulator]) -> None:
    emu = emus["modelmax"]
    emu.inject(Fault.rate_limit(retry_after=None), times=2)
    async with client() as gw:
        await call(gw, "modelmax", emu, gen())
    assert len(emu.requests_to("/images/")) == 3


async def test_429_asking_too_long_fails_at_once(emus: dict[str, Emulator]) -> None:
    emu = emus["llm-vin"]
    emu.inject(Fault.rate_limit(retry_after=120))
    async with client() as gw:
        with pytest.raises(RateLimitedError) as e:
            await call(gw, "llm-vin", emu, gen())
    assert e.value.retry_after_s == 120 and "retry after" in e.value.message
    assert len(emu.requests_to("/images/")) == 1


async def test_quota_429_not_retried(emus: dict[str, Emulator]) -> None:
    emu = emus["openai"]
    emu.inject(Fault.quota())
    async with client() as gw:
        with pytest.raises(QuotaExhaustedError) as e:
            await call(gw, "openai", emu, gen())
    assert not e.value.retryable and "quota" in e.value.message
    assert len(emu.requests_to("/images/")) == 1


async def test_5xx_retried_then_success(emus: dict[str, Emulator]) -> None:
    emu = emus["modelmax"]
    emu.inject(Fault.http(502), times=1)
    emu.inject(Fault.http(503), times=1)
    notes: list[str] = []
    async with client() as gw:
        await call(gw, "modelmax", emu, gen(), on_retry=notes.append)
    assert len(emu.requests_to("/images/")) == 3 and len(notes) == 2


async def test_5xx_gives_up_after_max_retries(emus: dict[str, Emulator]) -> None:
    emu = emus["ai-nebula"]
    emu.inject(Fault.http(500), times=None)
    try:
        async with client() as gw:
            with pytest.raises(GatewayError) as e:
                await call(gw, "ai-nebula", emu, gen())
    finally:
        emu.clear_faults()
    assert e.value.retryable and e.value.status == 500
    assert len(emu.requests_to("/images/")) == 3


@pytest.mark.parametrize(
    ("provider", "fault", "key", "expected"),
    [
        ("openai", Fault.http(400, message="Invalid value: 'x'."), KEY, InvalidRequestError),
        ("openai", None, "sk-wrong-key-000", AuthenticationError),
        ("nano-gpt", Fault.http(402), KEY, InsufficientBalanceError),
        ("modelmax", Fault.http(402), KEY, InsufficientBalanceError),
        ("openai", Fault.http(404), KEY, ModelNotFoundError),
        ("nano-gpt", Fault.http(413, message="Image too large"), KEY, InvalidRequestError),
        ("openai", Fault.http(422, message="Unprocessable"), KEY, InvalidRequestError),
        ("llm-vin", Fault.http(403), KEY, AuthenticationError),
    ],
)
async def test_client_errors_not_retried(
    provider: str, fault: Fault | None, key: str, expected: type[ImageGenError], emus: dict[str, Emulator]
) -> None:
    emu = emus[provider]
    if fault is not None:
        emu.inject(fault)
    async with client() as gw:
        with pytest.raises(expected) as e:
            await call(gw, provider, emu, gen(), key=key)
    assert type(e.value) is expected and e.value.gateway_message
    assert len(emu.requests_to("/images/")) == 1
    assert_clean(e.value)


async def test_missing_key_fails_before_sending(emus: dict[str, Emulator]) -> None:
    emu = emus["nano-gpt"]
    async with client() as gw:
        with pytest.raises(AuthenticationError, match="set NANOGPT_API_KEY"):
            await call(gw, "nano-gpt", emu, gen(), key=None)
    assert emu.requests == []


async def test_optional_auth_sends_no_header(emus: dict[str, Emulator]) -> None:
    emu = emus["llm-vin"]
    async with client() as gw:
        await call(gw, "llm-vin", emu, gen(), key=None)
    assert emu.requests_to("/images/")[0].authorization is None


async def test_connect_refused(emus: dict[str, Emulator]) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    base = f"http://127.0.0.1:{port}/v1"
    notes: list[str] = []
    async with client() as gw:
        with pytest.raises(GatewayError) as e:
            await call(gw, "openai", emus["openai"], gen(), base_url=base, on_retry=notes.append)
    assert f"cannot connect to {base}" in e.value.message and e.value.retryable
    assert len(notes) == 2
    assert_clean(e.value)


async def test_a_call_out_of_timeout_s_is_not_sent_again(fresh: Any) -> None:
    emu = fresh("nano-gpt")
    emu.inject(Fault.delay(2.0))
    async with client(max_retries=3) as gw:
        with pytest.raises(GatewayTimeoutError, match="within 1 s") as e:  # whole seconds
            await call(gw, "nano-gpt", emu, gen(), timeout_s=0.5)
    assert len(emu.requests_to("/images/")) == 1  # timeout_s is the whole call: no time left to retry
    assert_clean(e.value)


async def test_timeout_s_counts_the_waits_between_attempts(fresh: Any) -> None:
    emu = fresh("modelmax")
    emu.inject(Fault.http(503, retry_after=4))  # within max_wait_s, beyond what timeout_s leaves
    async with client() as gw:
        with pytest.raises(GatewayError) as e:
            await call(gw, "modelmax", emu, gen(), timeout_s=3)
    assert e.value.status == 503
    assert len(emu.requests_to("/images/")) == 1


async def test_drip_slower_than_deadline(emus: dict[str, Emulator]) -> None:
    emu = emus["openai"]
    emu.inject(Fault.drip(3.0, chunks=12))
    async with client() as gw:
        with pytest.raises(GatewayTimeoutError, match="within 1 s"):
            await call(gw, "openai", emu, gen(), timeout_s=0.8)
    assert len(emu.requests_to("/images/")) == 1  # the answer had started: no second paid attempt


async def test_dropped_connection_retried_once(emus: dict[str, Emulator]) -> None:
    emu = emus["modelmax"]
    emu.inject(Fault.drop())
    async with client() as gw:
        _, blobs = await call(gw, "modelmax", emu, gen())
    assert blobs and len(emu.requests_to("/images/")) == 2


async def test_http200_error_body_typed_and_retried(emus: dict[str, Emulator]) -> None:
    emu = emus["nexllm"]
    emu.inject(Fault.http200_error())
    async with client() as gw:
        _, blobs = await call(gw, "nexllm", emu, gen())
    assert blobs and len(emu.requests_to("/images/")) == 2

    emu = emus["ai-nebula"]
    emu.inject(Fault.http200_error(message="Model not found: x", status=404))
    async with client() as gw:
        with pytest.raises(ModelNotFoundError, match="Model not found: x"):
            await call(gw, "ai-nebula", emu, gen())
    assert len(emu.requests_to("/images/")) == 1


async def test_ai_nebula_business_error_http_200(emus: dict[str, Emulator]) -> None:
    emu = emus["ai-nebula"]
    manifest = load_manifest("ai-nebula")
    wire = WireRequest("POST", "/images/generations", json={"model": "nope", "prompt": "x"})
    async with client() as gw:
        with pytest.raises(ModelNotFoundError) as e:
            await gw.send(endpoint("ai-nebula", emu), manifest, wire)
    assert e.value.gateway_message == "Model not found: nope"


@pytest.mark.parametrize("fault", [Fault.truncated_json(), Fault.invalid_json()])
async def test_broken_json_not_retried(fault: Fault, emus: dict[str, Emulator]) -> None:
    emu = emus["openai"]
    emu.inject(fault)
    async with client() as gw:
        with pytest.raises(BadGatewayResponseError, match="not valid JSON") as e:
            await call(gw, "openai", emu, gen())
    assert len(e.value.message) < 400 and len(emu.requests_to("/images/")) == 1


async def test_invalid_base64_left_to_the_caller(emus: dict[str, Emulator]) -> None:
    emu = emus["modelmax"]
    emu.inject(Fault.invalid_b64())
    manifest = load_manifest("modelmax")
    request = gen()
    spec = resolve("imagen-3", manifest).spec
    assert spec is not None
    prepared = prepare(request, manifest, spec)
    wire = encode(manifest, prepared, request, 1, images=[], mask=None, lineage=[])
    async with client() as gw:
        result = await gw.send(endpoint("modelmax", emu), manifest, wire)
    assert result.images[0].b64
    with pytest.raises((binascii.Error, ValueError)):
        base64.b64decode(result.images[0].b64, validate=True)


@pytest.mark.parametrize("announce", [False, True])
async def test_huge_response_bounded(announce: bool, emus: dict[str, Emulator]) -> None:
    emu = emus["openai"]
    emu.inject(Fault.huge(size_mb=12, content_length=announce))
    async with client(max_body_bytes=4 * 1024 * 1024) as gw:
        with pytest.raises(BadGatewayResponseError, match="larger than 4 MB"):
            await call(gw, "openai", emu, gen())
    assert len(emu.requests_to("/images/")) == 1


@pytest.mark.parametrize("fault", [Fault.url_expired(), Fault.url_404()])
async def test_expired_or_missing_url(fault: Fault, emus: dict[str, Emulator]) -> None:
    emu = emus["llm-vin"]
    emu.inject(fault)
    async with client() as gw:
        with pytest.raises(BadGatewayResponseError, match="result URL expired or missing") as e:
            await call(gw, "llm-vin", emu, gen())
    assert "X-Amz" not in e.value.message and len(emu.requests_to("/files/")) == 1


async def test_fetch_image_bounded_and_data_urls() -> None:
    async with client() as gw:
        assert await gw.fetch_image("data:image/png;base64,QUJD", max_bytes=10) == b"ABC"
        with pytest.raises(BadGatewayResponseError, match="larger"):
            await gw.fetch_image("data:image/png;base64," + "QUJD" * 100, max_bytes=10)
        with pytest.raises(BadGatewayResponseError, match="invalid base64"):
            await gw.fetch_image("data:image/png;base64,!!!*", max_bytes=10)
        with pytest.raises(BadGatewayResponseError, match="scheme"):
            await gw.fetch_image("file:///etc/passwd", max_bytes=10)


async def test_cancellation_stops_the_request(fresh: Any) -> None:
    emu = fresh("openai")
    emu.inject(Fault.delay(30))
    async with client() as gw:
        with anyio.move_on_after(0.3) as scope:
            await call(gw, "openai", emu, gen())
    # The caller got control back while the gateway was still holding its answer.
    assert scope.cancelled_caught
    [request] = emu.requests_to("/images/")
    assert request.status is None


# --- secrets and logs ----------------------------------------------------------------------------


async def test_echoed_key_is_scrubbed(emus: dict[str, Emulator]) -> None:
    emu = emus["modelmax"]
    emu.inject(Fault.http(401, message=f"Invalid API key {KEY} for this account"))
    async with client() as gw:
        with pytest.raises(AuthenticationError) as e:
            await call(gw, "modelmax", emu, gen())
    assert_clean(e.value)
    assert "***" in e.value.message and "$MODELMAX_API_KEY" in e.value.message
    assert KEY not in repr(gw)


async def test_one_log_line_per_call(emus: dict[str, Emulator], caplog: pytest.LogCaptureFixture) -> None:
    emu = emus["modelmax"]
    emu.inject(Fault.http(503))
    async with client() as gw:
        await call(gw, "modelmax", emu, gen())
    lines = [r for r in caplog.records if r.name == "mcp_imagegen.gateway" and r.getMessage() == "gateway call"]
    assert len(lines) == 1
    fields = lines[0].fields  # type: ignore[attr-defined]
    assert fields["endpoint"] == "modelmax" and fields["model"] == "seedream-5.0-lite" and fields["status"] == 200
    assert fields["retries"] == 1 and fields["path"] == "/v1/images/generations" and fields["bytes"] > 0
    downloads = [r for r in caplog.records if r.getMessage() == "result download"]
    assert all("?" not in r.fields["url"] for r in downloads)  # type: ignore[attr-defined]


# --- big answers ---------------------------------------------------------------------------------


async def test_a_big_answer_is_joined_and_parsed_off_the_event_loop(
    fresh: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    from functools import cached_property

    from mcp_imagegen import gateway

    joined_on: list[int] = []
    join = gateway._Answer.body.func

    def body(answer: Any) -> bytes:
        joined_on.append(threading.get_ident())
        return join(answer)

    recording = cached_property(body)
    recording.__set_name__(gateway._Answer, "body")
    monkeypatch.setattr(gateway._Answer, "body", recording)
    emu = fresh("openai")
    emu.image_kind = "photo"  # ~2.8 MB of PNG, ~3.7 MB of JSON
    async with client() as gw:
        _, blobs = await call(gw, "openai", emu, gen(n=1))
    assert is_image(blobs[0]) and len(blobs[0]) > 1_000_000
    assert joined_on and threading.get_ident() not in joined_on
