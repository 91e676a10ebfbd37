"""The engine end to end against loopback gateways that speak each seed dialect.

Each test drives ImageService as the MCP tools and the command line do, and checks both what the
caller gets and what the gateway saw on the wire.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from PIL import Image

from mcp_imagegen import heap
from mcp_imagegen.errors import (
    AuthenticationError,
    BadGatewayResponseError,
    GatewayError,
    ImageGenError,
    InsufficientBalanceError,
    InvalidRequestError,
    ModelNotFoundError,
)
from mcp_imagegen.models import ImageRequest, InputImage
from mcp_imagegen.service import ImageService
from mcp_imagegen.work import DISK_THREADS
from tests.conftest import SECRET_KEY, GatedSleep, endpoint_for, make_settings, wait_until
from tests.emulators import Fault
from tests.emulators import images as emu_images

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def png(width: int, height: int, color: tuple[int, ...] = (200, 30, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def input_image(data: bytes, source: str = "test.png", image_id: str | None = None) -> InputImage:
    with Image.open(io.BytesIO(data)) as im:
        return InputImage(
            data=data, mime_type="image/png", width=im.width, height=im.height, source=source, image_id=image_id
        )


def alpha_mask(width: int, height: int) -> bytes:
    """Transparent (edit here) on the left half, opaque on the right."""
    im = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    im.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


async def run(settings: Any, request: ImageRequest) -> Any:
    async with ImageService(settings) as service:
        return await service.generate(request)


def data_url_bytes(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


# --- generate on every gateway ---------------------------------------------------------------

# These tests are about the server, not the model world: the emulators of gateways whose
# providers shut these models down (openai, modelmax) still serve them here.
RETIRED_SERVED: dict[str, dict[str, Any]] = {"openai": {"serve_retired": True}, "modelmax": {"serve_retired": True}}

GENERATE_CASES = [
    ("openai", "gpt-image-1", "1024x1024"),
    ("openai", "dall-e-3", "1792x1024"),
    ("nexllm", "dall-e-3", "1024x1024"),
    ("ai-nebula", "gemini-2.5-flash-image-preview", None),
    ("nano-gpt", "hidream", "768x1360"),
    ("llm-vin", "flux-1", "1024x1792"),
    ("modelmax", "imagen-3", "1024x1024"),
]


@pytest.mark.parametrize(("provider", "model", "size"), GENERATE_CASES)
async def test_generate_on_each_gateway(
    tmp_path: Path, emulator: Any, provider: str, model: str, size: str | None
) -> None:
    emu = emulator(provider, api_key=SECRET_KEY, **RETIRED_SERVED.get(provider, {}))
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    result = await run(settings, ImageRequest(operation="generate", prompt="a red fox", model=model, size=size))

    assert (result.model, result.endpoint, result.provider) == (model, provider, provider)
    [image] = result.images
    path = Path(image.path)
    assert path.is_file() and path.parent == tmp_path / "out"
    assert image.mime_type == "image/png" and image.bytes == path.stat().st_size
    with Image.open(path) as im:
        assert (im.width, im.height) == (image.width, image.height)
        if size:
            assert f"{im.width}x{im.height}" == size
    assert image.uri == f"imagegen://images/{image.id}"

    [sent] = emu.requests_to("/images/generations")
    assert sent.authorization == f"Bearer {SECRET_KEY}"
    assert sent.json["model"] == model
    assert sent.status == 200


async def test_gpt_image_never_gets_response_format(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("openai", serve_retired=True, api_key=SECRET_KEY)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    request = ImageRequest(
        operation="generate",
        prompt="x",
        model="gpt-image-1",
        extra={"response_format": "url"},
        knobs={"quality": "low"},
    )
    result = await run(settings, request)
    sent = emu.requests_to("/images/generations")[0].json
    assert "response_format" not in sent and sent["quality"] == "low"
    assert any("response_format" in w for w in result.warnings)
    assert result.usage and result.usage["total_tokens"] > 0


async def test_url_answers_are_downloaded_at_once_and_b64_asked_where_possible(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("llm-vin", api_key=None, auth_required=False)  # llm.vin answers with URLs only
    settings = make_settings(tmp_path, [endpoint_for(emu)])
    result = await run(settings, ImageRequest(operation="generate", prompt="x", n=2))
    assert len(result.images) == 2
    assert len(emu.requests_to("/files/")) == 2
    assert "response_format" not in emu.requests_to("/images/generations")[0].json

    dalle = emulator("nexllm", api_key=SECRET_KEY)
    settings = make_settings(tmp_path, [endpoint_for(dalle, key=SECRET_KEY)])
    await run(settings, ImageRequest(operation="generate", prompt="x", model="dall-e-3"))
    assert dalle.requests_to("/images/generations")[0].json["response_format"] == "b64_json"


async def test_n_above_the_models_maximum_fans_out_and_says_so(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("openai", serve_retired=True, api_key=SECRET_KEY)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    result = await run(settings, ImageRequest(operation="generate", prompt="x", model="dall-e-3", n=3))
    assert len(result.images) == 3
    sent = emu.requests_to("/images/generations")
    assert len(sent) == 3 and all(r.json.get("n", 1) == 1 for r in sent)
    assert any("3" in w and "dall-e-3" in w for w in result.warnings)


async def test_cost_and_balance_are_reported(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("nano-gpt", api_key=SECRET_KEY)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    result = await run(settings, ImageRequest(operation="generate", prompt="x", model="hidream", n=2))
    assert result.cost is not None and result.cost > 0
    assert result.balance is not None


async def test_modelmax_usage_and_revised_prompt(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("modelmax", serve_retired=True, api_key=SECRET_KEY)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    result = await run(
        settings, ImageRequest(operation="generate", prompt="a lake", knobs={"quality": "hd", "style": "natural"})
    )
    assert result.usage is not None and "total_tokens" in result.usage
    assert result.images[0].revised_prompt
    sent = emu.requests_to("/images/generations")[0].json
    assert (sent["quality"], sent["style"]) == ("hd", "natural")


# --- checks before any money is spent ----------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "request_fields", "expected"),
    [
        ("llm-vin", {"size": "2048x2048"}, ["1024x1024", "1024x1792", "1792x1024"]),
        ("modelmax", {"knobs": {"quality": "ultra"}}, ["standard", "hd"]),
        ("nano-gpt", {"model": "hidream", "n": 50}, ["n=50", "10"]),
        ("openai", {"model": "dall-e-2", "prompt": "x" * 1001}, ["1000"]),
        ("openai", {"model": "dall-e-3", "operation": "edit"}, ["gpt-image-2", "dall-e-2"]),
        ("openai", {"model": "gpt-image-2", "size": "1000x1000"}, ["multiples of 16"]),
    ],
)
async def test_bad_arguments_fail_before_any_request(
    tmp_path: Path, emulator: Any, provider: str, request_fields: dict[str, Any], expected: list[str]
) -> None:
    # A gateway that still serves the old ids (its model list says so), so their rules apply.
    emu = emulator(provider, api_key=SECRET_KEY, **RETIRED_SERVED.get(provider, {}))
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    fields: dict[str, Any] = {"operation": "generate", "prompt": "a fox", **request_fields}
    if fields["operation"] == "edit":
        fields["images"] = [input_image(png(64, 64))]
    with pytest.raises(InvalidRequestError) as info:
        await run(settings, ImageRequest(**fields))
    for part in expected:
        assert part in info.value.message
    assert emu.requests_to("/images/") == []  # at most the model list was asked


async def test_unknown_model_and_endpoint_name_what_exists(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("modelmax", serve_retired=True, api_key=SECRET_KEY)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    with pytest.raises(ModelNotFoundError, match="seedream-5.0-lite"):
        await run(settings, ImageRequest(operation="generate", prompt="x", model="dall-e-9"))
    with pytest.raises(InvalidRequestError, match="modelmax"):
        await run(settings, ImageRequest(operation="generate", prompt="x", endpoint="nope"))


# --- edits in each encoding ----------------------------------------------------------------------


async def test_openai_edit_multipart_one_several_and_mask(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("openai", serve_retired=True, api_key=SECRET_KEY)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    one = input_image(png(256, 256))
    await run(settings, ImageRequest(operation="edit", prompt="add a hat", model="gpt-image-1", images=[one]))
    first = emu.requests_to("/images/edits")[-1]
    assert list(first.files) == ["image"] and first.form["model"] == "gpt-image-1"

    two = [one, input_image(png(256, 256, (0, 0, 255)))]
    await run(settings, ImageRequest(operation="edit", prompt="merge", model="gpt-image-1", images=two))
    assert len(emu.requests_to("/images/edits")[-1].files["image[]"]) == 2

    # A white-on-black mask (no alpha) becomes OpenAI's transparent-means-edit mask.
    white_left = Image.new("L", (256, 256), 0)
    white_left.paste(255, (0, 0, 128, 256))
    buf = io.BytesIO()
    white_left.save(buf, "PNG")
    mask = input_image(buf.getvalue(), "mask.png")
    await run(settings, ImageRequest(operation="edit", prompt="sky", model="dall-e-2", images=[one], mask=mask))
    sent_mask = emu.requests_to("/images/edits")[-1].files["mask"][0].data
    with Image.open(io.BytesIO(sent_mask)) as im:
        assert im.mode == "RGBA" and im.size == (256, 256)
        assert im.getpixel((10, 10))[3] == 0 and im.getpixel((250, 10))[3] == 255


async def test_nano_gpt_edit_data_urls_white_mask_and_4mb_cap(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("nano-gpt", api_key=SECRET_KEY)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    base = input_image(png(1024, 1024))
    request = ImageRequest(
        operation="edit",
        prompt="fill",
        model="flux-lora/inpainting",
        images=[base],
        mask=input_image(alpha_mask(512, 512), "mask.png"),
    )
    await run(settings, request)
    sent = emu.requests_to("/images/generations")[-1].json
    assert sent["imageDataUrl"].startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(data_url_bytes(sent["maskDataUrl"]))) as im:
        gray = im.convert("L")
        assert gray.size == (1024, 1024)
        assert gray.getpixel((10, 10)) == 255 and gray.getpixel((1000, 10)) == 0  # white = edit here

    # A 6 MB photo-like input is re-encoded to fit the 4 MB data-URL cap, with a warning.
    import os

    noisy = Image.frombytes("RGB", (1600, 1400), os.urandom(1600 * 1400 * 3))
    buf = io.BytesIO()
    noisy.save(buf, "PNG")
    assert len(buf.getvalue()) > 4_000_000
    big = input_image(buf.getvalue(), "big.png")
    result = await run(settings, ImageRequest(operation="edit", prompt="x", model="flux-kontext", images=[big]))
    sent = emu.requests_to("/images/generations")[-1].json
    assert len(sent["imageDataUrl"]) <= 4_000_000
    assert any("big.png" in w for w in result.warnings)

    several = [input_image(png(512, 512)), input_image(png(512, 512, (0, 255, 0)))]
    await run(settings, ImageRequest(operation="edit", prompt="x", model="flux-kontext", images=several))
    assert len(emu.requests_to("/images/generations")[-1].json["imageDataUrls"]) == 2


async def test_ai_nebula_edit_replays_lineage_as_turns(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("ai-nebula", api_key=SECRET_KEY)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    async with ImageService(settings) as service:
        first = await service.generate(ImageRequest(operation="generate", prompt="Canton Tower at noon"))
        [made], _ = await service.resolve_inputs([first.images[0].uri], None)
        assert made.image_id == first.images[0].id
        await service.generate(ImageRequest(operation="edit", prompt="make it a snowy night", images=[made]))
    sent = emu.requests_to("/images/generations")[-1].json
    roles = [turn["role"] for turn in sent["contents"]]
    assert roles == ["user", "model", "user"]
    assert sent["contents"][0]["parts"][0]["text"] == "Canton Tower at noon"
    assert sent["contents"][-1]["parts"][0]["text"] == "make it a snowy night"
    assert any("image" in part for part in sent["contents"][1]["parts"])


# --- discovery ---------------------------------------------------------------------------------


async def test_list_models_merges_manifests_and_discovery(tmp_path: Path, emulator: Any) -> None:
    nano = emulator("nano-gpt", api_key=SECRET_KEY)
    openai = emulator("openai", serve_retired=True, api_key=SECRET_KEY)
    settings = make_settings(tmp_path, [endpoint_for(nano, key=SECRET_KEY), endpoint_for(openai, key=SECRET_KEY)])
    async with ImageService(settings) as service:
        models, warnings = await service.list_models()
        assert warnings == []
        by_key = {(m.endpoint, m.id): m for m in models}
        assert by_key[("nano-gpt", "hidream")].sizes == ["1024x1024", "768x1360", "1360x768"]
        assert "mask" in by_key[("nano-gpt", "flux-lora/inpainting")].capabilities
        assert ("openai", "gpt-image-1") in by_key and not any(m.id.startswith("text-embedding") for m in models)
        masks, _ = await service.list_models(capability="mask", endpoint="nano-gpt")
        assert {m.id for m in masks} == {"flux-lora/inpainting"}
        await service.list_models()
        assert len(nano.requests_to("image-models")) == 1  # cached
        await service.list_models(refresh=True)
        assert len(nano.requests_to("image-models")) == 2


# --- gateway errors ------------------------------------------------------------------------------


async def test_documented_errors_become_typed_errors_without_the_key(
    tmp_path: Path, emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    nano = emulator("nano-gpt", api_key=SECRET_KEY)
    mm = emulator("modelmax", serve_retired=True, api_key=SECRET_KEY)
    settings = make_settings(
        tmp_path,
        [endpoint_for(nano, key=SECRET_KEY), endpoint_for(mm, key=SECRET_KEY)],
        max_retries=1,
    )
    seen: list[ImageGenError] = []
    async with ImageService(settings) as service:
        nano.inject(Fault.http(402, body={"error": "Insufficient balance", "status": 402}))
        with pytest.raises(InsufficientBalanceError) as info:
            await service.generate(ImageRequest(operation="generate", prompt="x", endpoint="nano-gpt"))
        assert "Insufficient balance" in info.value.agent_text()
        seen.append(info.value)

        mm.inject(Fault.http(502), times=2)
        with pytest.raises(GatewayError) as info2:
            await service.generate(ImageRequest(operation="generate", prompt="x", endpoint="modelmax"))
        assert len(mm.requests_to("/images/generations")) == 2  # one retry, then give up
        seen.append(info2.value)

    wrong = make_settings(tmp_path, [endpoint_for(mm, key="sk-wrong-" + SECRET_KEY[-12:])])
    with pytest.raises(AuthenticationError) as info3:
        await run(wrong, ImageRequest(operation="generate", prompt="x"))
    seen.append(info3.value)

    for err in seen:
        assert SECRET_KEY not in err.agent_text() and SECRET_KEY not in repr(err)
        assert SECRET_KEY[-12:] not in err.agent_text()
    assert SECRET_KEY not in caplog.text


# --- failover, cancellation, nothing lost ---------------------------------------------------------


async def test_failover_to_another_endpoint_serving_the_model(tmp_path: Path, emulator: Any) -> None:
    down = emulator("openai", serve_retired=True, api_key=SECRET_KEY)
    up = emulator("openai", serve_retired=True, api_key=SECRET_KEY)
    settings = make_settings(
        tmp_path,
        [endpoint_for(down, "primary", key=SECRET_KEY, priority=2), endpoint_for(up, "backup", key=SECRET_KEY)],
        max_retries=0,
    )
    down.inject(Fault.http(503), times=None)
    result = await run(settings, ImageRequest(operation="generate", prompt="x", model="gpt-image-1"))
    assert result.endpoint == "backup" and len(result.images) == 1
    assert any("primary" in w and "backup" in w for w in result.warnings)

    no_failover = settings.model_copy(update={"failover": False})
    with pytest.raises(GatewayError):
        await run(no_failover, ImageRequest(operation="generate", prompt="x", model="gpt-image-1"))


async def test_cancel_drops_unsent_requests_and_saves_the_sent_one(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("openai", serve_retired=True, api_key=SECRET_KEY)
    # One request at a time: of dall-e-3's two one-image requests, the second waits unsent.
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY, max_concurrency=1)])
    async with ImageService(settings) as service:
        emu.inject(Fault.delay(1.5))  # the first one is at the gateway when the cancel comes
        job = service.submit(ImageRequest(operation="generate", prompt="x", model="dall-e-3", n=2))
        with anyio.fail_after(10):
            while not emu.requests_to("/images/generations"):
                await anyio.sleep(0.02)
        job.cancel()
        with anyio.fail_after(20), pytest.raises(InvalidRequestError, match="cancelled; 1 image"):
            await job.wait(None)
        assert job.status == "cancelled"
        assert [r.id for r in service.store.recent()] == [job.saved[0].id]  # the sent one was awaited
        assert job.result is not None and len(job.result.images) == 1
    assert len(emu.requests_to("/images/generations")) == 1  # the unsent one never left


async def test_cancel_before_anything_is_sent_sends_nothing(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("openai", serve_retired=True, api_key=SECRET_KEY)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY, max_concurrency=1)])
    async with ImageService(settings) as service:
        emu.inject(Fault.delay(1.5))
        busy = service.submit(ImageRequest(operation="generate", prompt="busy", model="gpt-image-1"))
        with anyio.fail_after(10):
            while not emu.requests_to("/images/generations"):
                await anyio.sleep(0.02)
        queued = service.submit(ImageRequest(operation="generate", prompt="queued", model="gpt-image-1"))
        with anyio.fail_after(10):
            while queued.route is None:  # waiting for the endpoint's one slot
                await anyio.sleep(0.02)
        queued.cancel()
        with anyio.fail_after(20), pytest.raises(InvalidRequestError, match="cancelled"):
            await queued.wait(None)
        assert queued.status == "cancelled" and not queued.saved and queued.sent == 0
        assert (await busy.wait(20)) is not None
    assert len(emu.requests_to("/images/generations")) == 1


async def test_caller_that_stops_waiting_does_not_lose_the_image(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("openai", serve_retired=True, api_key=SECRET_KEY, latency_s=0.5)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    async with ImageService(settings) as service:
        job = service.submit(ImageRequest(operation="generate", prompt="x", model="gpt-image-1"))
        assert await job.wait(0.05) is None  # the caller's deadline passed
        result = await job.wait(10)
        assert result is not None and job.status == "done"
        assert service.store.get(result.images[0].id).path == result.images[0].path


@contextmanager
def _released_at_exit(emu: Any) -> Iterator[None]:
    """Whatever happens, a held emulator answers again (else stopping it would wait on its held requests)."""
    try:
        yield
    finally:
        emu.release()


async def test_many_simultaneous_calls_finish_and_limits_hold(tmp_path: Path, emulator: Any) -> None:
    slow = emulator("openai", api_key=SECRET_KEY)
    fast = emulator("llm-vin", api_key=SECRET_KEY)
    settings = make_settings(
        tmp_path,
        [
            endpoint_for(slow, key=SECRET_KEY, max_concurrency=4),
            endpoint_for(fast, key=SECRET_KEY, max_concurrency=16),
        ],
    )
    done: dict[str, float] = {}
    saving = peak_saving = 0
    lock = threading.Lock()
    async with ImageService(settings) as service:
        save = service.store.save

        overlapping = threading.Event()

        def slow_save(*args: Any, **kwargs: Any) -> Any:
            nonlocal saving, peak_saving
            with lock:
                saving += 1
                peak_saving = max(peak_saving, saving)
                if saving > 1:
                    overlapping.set()
            overlapping.wait(timeout=30)  # a slow disk: the first save lasts until a second one runs
            try:
                return save(*args, **kwargs)
            finally:
                with lock:
                    saving -= 1

        service.store.save = slow_save  # type: ignore[method-assign]
        start = anyio.current_time()

        async def one(i: int, endpoint: str) -> None:
            # A named model on the held gateway: its default would wait for discovery, which it holds too.
            model = "gpt-image-2" if endpoint == "openai" else None
            request = ImageRequest(operation="generate", prompt=f"p{i}", endpoint=endpoint, model=model)
            result = await service.generate(request)
            assert len(result.images) == 1
            done[f"{endpoint}{i}"] = anyio.current_time() - start

        # Its model list is read first: without a model, routing asks for it, and a held gateway
        # would keep every call waiting on that one request instead of on the image requests.
        await service.list_models(endpoint="openai")
        slow.hold()  # the slow gateway answers nothing until every call to the fast one is done
        with anyio.fail_after(60), _released_at_exit(slow):
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, i, "openai")
                for i in range(80):
                    tg.start_soon(one, i, "llm-vin")
                # The slow gateway's queue (20 calls, 4 at a time, none answered) does not hold up
                # the fast one.
                while sum(key.startswith("llm-vin") for key in done) < 80 or slow.in_flight < 4:
                    await anyio.sleep(0.02)
                assert not any(key.startswith("openai") for key in done)
                assert slow.in_flight == 4  # its limit, and no more
                slow.release()
    assert len(done) == 100
    assert slow.max_in_flight <= 4
    # Saves share the file threads: enough to overlap, too few to keep the event loop off the GIL.
    assert 1 < peak_saving <= DISK_THREADS
    assert len(list((tmp_path / "out").glob("*.png"))) == 100


async def test_offline_endpoint_generates_and_edits_inside_the_mask(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, [{"name": "offline", "provider": "offline"}])
    async with ImageService(settings) as service:
        made = await service.generate(
            ImageRequest(operation="generate", prompt="a red fox", size="320x200", knobs={"seed": 7}, n=2)
        )
        assert [(i.width, i.height) for i in made.images] == [(320, 200), (320, 200)]
        [source], _ = await service.resolve_inputs([made.images[0].uri], None)
        mask_img = input_image(alpha_mask(320, 200), "mask.png")
        edited = await service.generate(ImageRequest(operation="edit", prompt="snow", images=[source], mask=mask_img))
    with Image.open(made.images[0].path) as a, Image.open(edited.images[0].path) as b:
        a, b = a.convert("RGB"), b.convert("RGB")
        assert a.getpixel((300, 100)) == b.getpixel((300, 100))  # outside the mask: unchanged
        assert a.crop((0, 0, 150, 200)).tobytes() != b.crop((0, 0, 150, 200)).tobytes()
    record = json.loads(next((tmp_path / "out" / ".mcp-imagegen").glob(f"{edited.images[0].id}.json")).read_text())
    assert record["parent_ids"] == [made.images[0].id]


async def test_finished_jobs_let_go_of_their_input_images(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, [{"name": "offline", "provider": "offline"}])
    async with ImageService(settings) as service:
        big = input_image(png(1500, 1500))
        job = service.submit(ImageRequest(operation="edit", prompt="x", images=[big], mask=input_image(png(8, 8))))
        result = await job.wait(30)
        assert result is not None and len(result.images) == 1
        assert service.job(job.id) is job  # still there for get_image
        assert job.request.images == [] and job.request.mask is None


async def test_freed_memory_is_handed_back_once_the_service_is_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[int] = []
    monkeypatch.setattr(heap, "release_free_memory", lambda: trims.append(1))  # a worker thread
    settings = make_settings(tmp_path, [{"name": "offline", "provider": "offline"}])
    sleep = GatedSleep()
    async with ImageService(settings) as service:
        service._idle_trim = heap.IdleTrim(idle_s=0.2, sleep=sleep)
        first = service.submit(ImageRequest(operation="generate", prompt="a red fox", size="64x64"))
        second = service.submit(ImageRequest(operation="generate", prompt="a blue fox", size="64x64"))
        assert await first.wait(30) is not None and await second.wait(30) is not None
        await wait_until(lambda: bool(sleep.waiting))
        assert trims == []  # the idle time is not up yet
        sleep.open_all()
        await wait_until(lambda: bool(trims))
    assert trims == [1]


# --- answers that are not plain rasters: SVG documents and animated GIFs ----------------------

# gpt-image-2.6 answers `output_format` svg/gif (the server knows its family and sends no
# `response_format`). "answered" has the same gateway answer those bytes to gpt-image-1, so the
# server's handling of them is proven either way.
NOT_RASTER_ROUTES = [
    "answered",
    "gpt-image-2.6",
]


async def _not_raster(tmp_path: Path, emulator: Any, route: str, fmt: str, size: str) -> tuple[Any, Any, bytes]:
    """Generate one `fmt` answer through the service; (service result, the service, the gateway's bytes)."""
    emu = emulator("openai", serve_retired=True, api_key=SECRET_KEY)
    w, h = (int(v) for v in size.split("x"))
    answer = emu_images.render("flat", w, h, fmt)
    if route == "answered":
        emu.set_image(answer, times=1)
        request = ImageRequest(operation="generate", prompt="a fox", model="gpt-image-1", size=size)
    else:
        request = ImageRequest(
            operation="generate", prompt="a fox", model="gpt-image-2.6-flare", size=size, extra={"output_format": fmt}
        )
    service = ImageService(make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)]))
    async with service:
        result = await service.generate(request)
        [image] = result.images
        preview = service.take_preview(image.id)
    return result, preview, answer


@pytest.mark.parametrize("route", NOT_RASTER_ROUTES)
async def test_an_svg_answer_is_saved_as_svg_with_its_own_size(tmp_path: Path, emulator: Any, route: str) -> None:
    result, preview, answer = await _not_raster(tmp_path, emulator, route, "svg", "1536x1024")
    [image] = result.images
    assert (image.mime_type, image.width, image.height, image.frames) == ("image/svg+xml", 1536, 1024, None)
    path = Path(image.path)
    assert path.suffix == ".svg" and path.read_bytes() == answer and image.bytes == len(answer)
    assert preview is None and result.warnings == []  # not rendered, and nothing failed trying


@pytest.mark.parametrize("route", NOT_RASTER_ROUTES)
async def test_an_animated_gif_is_saved_whole_with_its_frame_count(tmp_path: Path, emulator: Any, route: str) -> None:
    result, preview, answer = await _not_raster(tmp_path, emulator, route, "gif", "1024x1536")
    [image] = result.images
    assert (image.mime_type, image.width, image.height) == ("image/gif", 1024, 1536)
    assert image.frames == emu_images.GIF_FRAMES > 1
    assert Path(image.path).read_bytes() == answer  # never re-encoded
    data, mime = preview
    with Image.open(io.BytesIO(data)) as first:  # the first frame's background, not a later one's
        first = first.convert("RGB")
        assert mime in ("image/jpeg", "image/png") and not getattr(first, "is_animated", False)
        r, g, b = first.getpixel((first.width - 4, 4))
        assert abs(r - 52) < 12 and abs(g - 101) < 12 and abs(b - 164) < 12


async def test_a_hostile_svg_is_saved_with_a_warning_and_never_followed(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("openai", serve_retired=True, api_key=SECRET_KEY)
    hostile = (
        b'<?xml version="1.0"?>\n<!DOCTYPE svg [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
        b'<!ENTITY ext SYSTEM "' + emu.origin.encode() + b'/files/leak">]>\n'
        b'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="64" '
        b'height="48" onload="alert(1)"><text>&b;&ext;</text>'
        b'<image xlink:href="' + emu.origin.encode() + b'/files/tracker.png"/><script>fetch("/x")</script></svg>'
    )
    emu.set_image(hostile, times=1)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    result = await run(settings, ImageRequest(operation="generate", prompt="x", model="gpt-image-1"))
    [image] = result.images
    assert (image.mime_type, image.width, image.height) == ("image/svg+xml", 64, 48)
    assert Path(image.path).read_bytes() == hostile
    assert any("scripts or links" in w and image.path in w for w in result.warnings)
    assert not emu.requests_to("/files/")  # nothing it points at was fetched


async def test_a_truncated_svg_answer_is_a_bad_gateway_answer(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("openai", serve_retired=True, api_key=SECRET_KEY)
    emu.set_image(emu_images.render("flat", 256, 256, "svg")[:-40], times=1)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    with pytest.raises(BadGatewayResponseError, match="truncated SVG"):
        await run(settings, ImageRequest(operation="generate", prompt="x", model="gpt-image-1"))


async def test_a_job_nobody_outside_knows_of_is_recorded_once_when_it_ends(
    tmp_path: Path, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its id leaves with its result, so its first record is its last; a job of several
    requests is recorded as its images arrive, so a crash still finds what it saved."""
    from mcp_imagegen.jobs import JobBook

    written: list[tuple[str, str, int]] = []
    write = JobBook.write_all

    def watched(self: JobBook, records: list[Any]) -> None:
        written.extend((r.id, r.status, len(r.image_ids)) for r in records)
        write(self, records)

    monkeypatch.setattr(JobBook, "write_all", watched)
    emu = emulator("openai", serve_retired=True, api_key=SECRET_KEY)
    async with ImageService(make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])) as service:
        one = await service.generate(ImageRequest(operation="generate", prompt="one", model="gpt-image-2"))
        assert [w for w in written if w[0] == one.job_id] == [(one.job_id, "done", 1)]
        # dall-e-3 takes one image a request: three requests, each image noted as it arrives.
        three = await service.generate(ImageRequest(operation="generate", prompt="three", model="dall-e-3", n=3))
    states = [w for w in written if w[0] == three.job_id]
    assert states[-1] == (three.job_id, "done", 3)
    assert any(status == "running" and saved >= 1 for _, status, saved in states)
