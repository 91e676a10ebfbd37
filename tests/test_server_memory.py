"""The MCP surface through the SDK's real `Client`, in memory, in both protocol eras.

Every test runs against the real service: the built-in offline endpoint, and an OpenAI emulator on
loopback where a gateway's behaviour (latency, fixed sizes, big photo-like images) matters.
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest
from mcp.client import Client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, ImageContent, ResourceLink, TextContent
from PIL import Image
from pydantic import SecretStr

from mcp_imagegen.config import EndpointConfig, Settings
from mcp_imagegen.jobs import JOBS_DIR_NAME, JobRecord
from mcp_imagegen.results import RESULT_CAP_BYTES
from mcp_imagegen.server import build_server
from mcp_imagegen.service import ImageService
from mcp_imagegen.store import META_DIR_NAME
from tests.emulators import images as emu_images
from tests.emulators.base import DEFAULT_API_KEY, Fault
from tests.emulators.openai import OpenAIEmulator

MIB = 1024 * 1024

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["auto", "legacy"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


# The environment is isolated by conftest's autouse fixture; settings here are built directly.


@pytest.fixture(scope="module")
def openai_emulator() -> Iterator[OpenAIEmulator]:
    """One emulator for the module (starting one costs a thread and a port); reset per test."""
    emu = OpenAIEmulator(serve_retired=True).start()  # gpt-image-1, the manifest's default, still served
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def emu(openai_emulator: OpenAIEmulator) -> OpenAIEmulator:
    openai_emulator.reset()
    openai_emulator.latency_s = 0.0
    openai_emulator.image_kind = "flat"
    return openai_emulator


def offline_settings(tmp_path: Path, **overrides: Any) -> Settings:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    values: dict[str, Any] = {
        "output_dir": tmp_path / "out",
        "endpoints": [EndpointConfig(name="offline", provider="offline")],
        "allowed_roots": [tmp_path / "inputs"],
    }
    values.update(overrides)
    return Settings(**values)


def emulator_settings(tmp_path: Path, emu: OpenAIEmulator, **overrides: Any) -> Settings:
    endpoint = EndpointConfig(name="oa", provider="openai", base_url=emu.base_url)
    endpoint.api_key = SecretStr(DEFAULT_API_KEY)
    return offline_settings(
        tmp_path, endpoints=[endpoint, EndpointConfig(name="offline", provider="offline")], **overrides
    )


@asynccontextmanager
async def connect(settings: Settings, mode: str) -> AsyncIterator[Client]:
    async with Client(build_server(settings), mode=mode) as client:
        yield client


def texts(result: CallToolResult) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, TextContent))


def blocks(result: CallToolResult, kind: type) -> list[Any]:
    return [b for b in result.content if isinstance(b, kind)]


def png_bytes(size: tuple[int, int] = (64, 64), color: tuple[int, ...] = (200, 30, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


async def tool_schemas(client: Client) -> dict[str, Any]:
    return {t.name: t for t in (await client.list_tools()).tools}


async def ok(client: Client, name: str, args: dict[str, Any], **kw: Any) -> CallToolResult:
    result = await client.call_tool(name, args, **kw)
    assert not result.is_error, texts(result)
    return result


async def error_text(client: Client, name: str, args: dict[str, Any]) -> str:
    result = await client.call_tool(name, args)
    assert result.is_error, f"expected an error, got: {texts(result)}"
    return texts(result)


# --- listing ---------------------------------------------------------------------------------


async def test_tools_are_listed_with_schemas_annotations_and_output_schemas(tmp_path: Path, mode: str) -> None:
    async with connect(offline_settings(tmp_path), mode) as client:
        tools = await tool_schemas(client)
    assert set(tools) == {"generate_image", "edit_image", "get_image", "list_models"}

    gen = tools["generate_image"]
    assert gen.input_schema["required"] == ["prompt"]
    props = gen.input_schema["properties"]
    assert {
        "model",
        "endpoint",
        "n",
        "size",
        "quality",
        "style",
        "seed",
        "negative_prompt",
        "background",
        "output_format",
        "guidance_scale",
        "num_inference_steps",
        "extra",
        "inline_full",
    } <= set(props)
    assert props["n"]["maximum"] == 10 and props["n"]["minimum"] == 1
    assert "list_models" in props["model"]["description"]
    assert "ctx" not in props
    a = gen.annotations
    assert (a.read_only_hint, a.destructive_hint, a.idempotent_hint, a.open_world_hint) == (False, False, False, True)
    assert gen.title

    edit = tools["edit_image"]
    assert set(edit.input_schema["required"]) == {"prompt", "images"}
    images_schema = json.dumps(edit.input_schema["properties"]["images"])
    assert '"array"' in images_schema and '"string"' in images_schema  # a list or one string
    assert "transparent" in edit.input_schema["properties"]["mask"]["description"]
    assert "white" in edit.input_schema["properties"]["mask"]["description"]
    assert edit.annotations.read_only_hint is False and edit.annotations.open_world_hint is True

    for name in ("get_image", "list_models"):
        assert tools[name].annotations.read_only_hint is True, name

    for name in ("generate_image", "edit_image", "get_image"):
        schema = tools[name].output_schema
        assert schema is not None, name
        assert {"images", "model", "endpoint", "warnings", "status", "job_id"} <= set(schema["properties"])
        jsonschema.Draft202012Validator.check_schema(schema)
    assert "models" in tools["list_models"].output_schema["properties"]
    caps = json.dumps(tools["list_models"].input_schema["properties"]["capability"])
    for word in ("generate", "edit", "mask", "multi_image"):
        assert word in caps


async def test_list_models_structured_and_table(tmp_path: Path, mode: str) -> None:
    async with connect(offline_settings(tmp_path), mode) as client:
        schema = (await tool_schemas(client))["list_models"].output_schema
        result = await ok(client, "list_models", {})
        jsonschema.validate(result.structured_content, schema)
        [model] = result.structured_content["models"]
        assert model["id"] == "offline" and model["endpoint"] == "offline"
        assert set(model["capabilities"]) == {"generate", "edit", "mask", "multi_image"}
        assert "offline" in texts(result) and "max n" in texts(result)

        filtered = await ok(client, "list_models", {"capability": "mask"})
        assert len(filtered.structured_content["models"]) == 1
        assert "capability" in await error_text(client, "list_models", {"capability": "paint"})
        assert "offline" in await error_text(client, "list_models", {"endpoint": "nowhere"})


# --- generate --------------------------------------------------------------------------------


async def test_generate_returns_preview_link_text_and_structured_content(tmp_path: Path, mode: str) -> None:
    settings = offline_settings(tmp_path)
    async with connect(settings, mode) as client:
        schema = (await tool_schemas(client))["generate_image"].output_schema
        result = await ok(client, "generate_image", {"prompt": "a red fox in snow", "size": "320x240", "seed": 7})

    jsonschema.validate(result.structured_content, schema)
    sc = result.structured_content
    assert sc["status"] == "done" and sc["model"] == "offline" and sc["endpoint"] == "offline"
    [image] = sc["images"]
    assert (image["width"], image["height"]) == (320, 240)
    path = Path(image["path"])
    assert path.is_file() and path.parent == settings.output_dir
    assert path.stat().st_size == image["bytes"]
    assert image["uri"].startswith("imagegen://images/")

    [preview] = blocks(result, ImageContent)
    raw = base64.b64decode(preview.data)
    assert len(raw) <= 200_000
    with Image.open(io.BytesIO(raw)) as im:
        assert max(im.size) <= settings.preview_max_px
    [link] = blocks(result, ResourceLink)
    assert str(link.uri) == image["uri"] and link.mime_type == image["mime_type"] and link.size == image["bytes"]
    assert str(path) in texts(result) and image["uri"] in texts(result)


async def test_a_small_flat_image_is_its_own_preview_a_photo_gets_a_small_jpeg(
    tmp_path: Path, mode: str, emu: OpenAIEmulator
) -> None:
    async with connect(emulator_settings(tmp_path, emu), mode) as client:
        flat = await ok(client, "generate_image", {"prompt": "a logo", "model": "gpt-image-1", "size": "1024x1024"})
        emu.image_kind = "photo"
        photo = await ok(client, "generate_image", {"prompt": "a lake", "model": "gpt-image-1", "size": "1024x1024"})

    [preview] = blocks(flat, ImageContent)
    saved = Path(flat.structured_content["images"][0]["path"]).read_bytes()
    assert len(saved) < 64_000  # a flat 1024x1024 PNG: a few KB
    assert (base64.b64decode(preview.data), preview.mime_type) == (saved, "image/png")

    [preview] = blocks(photo, ImageContent)
    assert Path(photo.structured_content["images"][0]["path"]).stat().st_size > 1_000_000
    assert preview.mime_type == "image/jpeg"
    with Image.open(io.BytesIO(base64.b64decode(preview.data))) as im:
        assert max(im.size) == 512


async def test_generate_n3_reports_progress_per_image(tmp_path: Path, mode: str) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with connect(offline_settings(tmp_path), mode) as client:
        result = await ok(
            client,
            "generate_image",
            {"prompt": "three foxes", "n": 3, "size": "128x128"},
            progress_callback=on_progress,
        )
    assert len(result.structured_content["images"]) == 3
    assert len(blocks(result, ImageContent)) == 3 and len(blocks(result, ResourceLink)) == 3
    assert len({i["path"] for i in result.structured_content["images"]}) == 3
    values = [p for p, _, _ in seen]
    assert len(values) >= 3, seen
    assert values == sorted(values) and len(set(values)) == len(values), "progress must increase"
    assert values[-1] == 3 and all(t == 3 for _, t, _ in seen)
    assert any("saved image" in (m or "") for _, _, m in seen)


async def test_generate_bad_arguments_come_back_as_actionable_errors(tmp_path: Path, mode: str) -> None:
    async with connect(offline_settings(tmp_path), mode) as client:
        text = await error_text(client, "generate_image", {"prompt": "x", "n": 11})
        assert "`n`" in text and "10" in text
        assert "`prompt`" in await error_text(client, "generate_image", {})
        assert "`prompt`" in await error_text(client, "generate_image", {"prompt": ""})
        text = await error_text(client, "generate_image", {"prompt": "x", "aspect_ratio": "16:9"})
        assert "`aspect_ratio`" in text and "extra" in text
        text = await error_text(client, "generate_image", {"prompt": "x", "model": "dall-e-9"})
        assert "dall-e-9" in text and "offline" in text  # names the models there are
        text = await error_text(client, "generate_image", {"prompt": "x", "endpoint": "nowhere"})
        assert "nowhere" in text and "offline" in text  # names the endpoints there are
        text = await error_text(client, "generate_image", {"prompt": "x", "size": "huge"})
        assert "WIDTHxHEIGHT" in text
        text = await error_text(client, "generate_image", {"prompt": "x", "size": "5000x5000"})
        assert "4096" in text
        text = await error_text(client, "generate_image", {"prompt": "x", "output_format": "bmp"})
        assert "`output_format`" in text and "png" in text


async def test_bad_size_lists_the_allowed_sizes(tmp_path: Path, mode: str, emu: OpenAIEmulator) -> None:
    async with connect(emulator_settings(tmp_path, emu), mode) as client:
        text = await error_text(client, "generate_image", {"prompt": "x", "model": "dall-e-3", "size": "512x512"})
    assert "1024x1024" in text and "1792x1024" in text
    assert not emu.requests_to("/images"), "nothing may be sent (or paid) for a bad argument"


# --- answers that are not plain rasters ----------------------------------------------------------

# gpt-image-2.6 gives svg/gif on `output_format` (the server knows its family and sends no
# `response_format`). "answered": the same gateway answers those bytes to gpt-image-1, so the
# results are proven either way.
NOT_RASTER_ROUTES = [
    "answered",
    "gpt-image-2.6",
]


async def not_raster_call(client: Client, emu: OpenAIEmulator, route: str, fmt: str) -> CallToolResult:
    if route == "answered":
        emu.set_image(emu_images.render("flat", 1536, 1024, fmt), times=1)
        args: dict[str, Any] = {"model": "gpt-image-1"}
    else:
        args = {"model": "gpt-image-2.6-flare", "extra": {"output_format": fmt}}
    return await ok(client, "generate_image", {"prompt": "a fox", "size": "1536x1024", "endpoint": "oa", **args})


@pytest.mark.parametrize("route", NOT_RASTER_ROUTES)
async def test_an_svg_answer_gets_a_text_line_a_link_and_an_svg_resource(
    tmp_path: Path, mode: str, emu: OpenAIEmulator, route: str
) -> None:
    async with connect(emulator_settings(tmp_path, emu), mode) as client:
        schema = (await tool_schemas(client))["generate_image"].output_schema
        result = await not_raster_call(client, emu, route, "svg")
        [image] = result.structured_content["images"]
        read = await client.read_resource(image["uri"])
        again = await ok(client, "get_image", {"image": image["uri"]})

    jsonschema.validate(result.structured_content, schema)
    assert (image["mime_type"], image["width"], image["height"], image["frames"]) == ("image/svg+xml", 1536, 1024, None)
    saved = Path(image["path"]).read_bytes()
    assert image["path"].endswith(".svg") and saved.lstrip().startswith(b"<?xml") and b"<svg" in saved
    assert not blocks(result, ImageContent)  # no broken image block
    [link] = blocks(result, ResourceLink)
    assert (str(link.uri), link.mime_type, link.size) == (image["uri"], "image/svg+xml", len(saved))
    text = texts(result)
    assert "SVG vector document" in text and image["path"] in text and image["uri"] in text
    headline = result.content[0].text  # type: ignore[union-attr]
    assert "a preview unless it is an SVG document" in headline and "edit_image" not in headline
    assert result.structured_content["warnings"] == [] and "left out" not in text
    [content] = read.contents
    assert content.mime_type == "image/svg+xml" and base64.b64decode(content.blob) == saved
    assert not blocks(again, ImageContent) and "SVG vector document" in texts(again)


@pytest.mark.parametrize("route", NOT_RASTER_ROUTES)
async def test_an_animated_gif_is_previewed_by_its_first_frame_with_its_frame_count(
    tmp_path: Path, mode: str, emu: OpenAIEmulator, route: str
) -> None:
    async with connect(emulator_settings(tmp_path, emu), mode) as client:
        result = await not_raster_call(client, emu, route, "gif")

    [image] = result.structured_content["images"]
    assert (image["mime_type"], image["frames"]) == ("image/gif", emu_images.GIF_FRAMES)
    saved = Path(image["path"]).read_bytes()
    with Image.open(io.BytesIO(saved)) as whole:
        assert whole.is_animated and whole.n_frames == emu_images.GIF_FRAMES  # saved whole
    [preview] = blocks(result, ImageContent)
    with Image.open(io.BytesIO(base64.b64decode(preview.data))) as first:
        assert not getattr(first, "is_animated", False) and max(first.size) <= 512
        r, g, b = first.convert("RGB").getpixel((first.width - 2, 2))
        assert abs(r - 52) < 12 and abs(g - 101) < 12 and abs(b - 164) < 12  # frame 1's colour
    assert f"animated GIF of {emu_images.GIF_FRAMES} frames" in texts(result)
    assert "first frame" in texts(result)


# --- edit --------------------------------------------------------------------------------------


async def test_edit_by_uri_path_data_url_base64_and_mask(tmp_path: Path, mode: str) -> None:
    settings = offline_settings(tmp_path)
    src = png_bytes((96, 64))
    src_path = tmp_path / "inputs" / "source.png"
    src_path.write_bytes(src)
    mask = png_bytes((96, 64), (0, 0, 0, 0), "RGBA")
    b64 = base64.b64encode(src).decode()

    async with connect(settings, mode) as client:
        schema = (await tool_schemas(client))["edit_image"].output_schema
        first = await ok(client, "generate_image", {"prompt": "a cat", "size": "128x128"})
        uri = first.structured_content["images"][0]["uri"]

        by_uri = await ok(client, "edit_image", {"prompt": "make it blue", "images": uri})
        jsonschema.validate(by_uri.structured_content, schema)
        assert by_uri.structured_content["images"][0]["uri"] != uri
        assert blocks(by_uri, ImageContent) and blocks(by_uri, ResourceLink)

        as_list = await ok(client, "edit_image", {"prompt": "blue", "images": [uri]})
        assert as_list.structured_content["images"]

        by_path = await ok(client, "edit_image", {"prompt": "blue", "images": [str(src_path)]})
        assert by_path.structured_content["images"]

        by_data_url = await ok(client, "edit_image", {"prompt": "blue", "images": f"data:image/png;base64,{b64}"})
        assert by_data_url.structured_content["images"]

        by_b64 = await ok(client, "edit_image", {"prompt": "blue", "images": b64})
        assert by_b64.structured_content["images"]

        masked = await ok(
            client,
            "edit_image",
            {
                "prompt": "blue sky",
                "images": str(src_path),
                "mask": "data:image/png;base64," + base64.b64encode(mask).decode(),
            },
        )
        assert masked.structured_content["images"]

        several = await ok(client, "edit_image", {"prompt": "combine", "images": [uri, str(src_path)], "n": 2})
        assert len(several.structured_content["images"]) == 2


async def test_edit_bad_inputs_name_the_problem(tmp_path: Path, mode: str) -> None:
    settings = offline_settings(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes())
    missing = tmp_path / "inputs" / "missing.png"
    async with connect(settings, mode) as client:
        text = await error_text(client, "edit_image", {"prompt": "x", "images": str(missing)})
        assert "missing.png" in text
        text = await error_text(client, "edit_image", {"prompt": "x", "images": str(outside / "secret.png")})
        assert "secret.png" in text and "allowed" in text.lower()
        text = await error_text(
            client, "edit_image", {"prompt": "x", "images": "imagegen://images/AAAAAAAAAAAAAAAAAAAAAA"}
        )
        assert "AAAAAAAAAAAAAAAAAAAAAA" in text
        assert "`images`" in await error_text(client, "edit_image", {"prompt": "x"})
        assert "`images`" in await error_text(client, "edit_image", {"prompt": "x", "images": []})
        text = await error_text(client, "edit_image", {"prompt": "x", "images": "not an image at all"})
        assert text


# --- resources and get_image ---------------------------------------------------------------------


async def test_resources_read_list_templates_recent_and_unknown(tmp_path: Path, mode: str) -> None:
    async with connect(offline_settings(tmp_path), mode) as client:
        result = await ok(client, "generate_image", {"prompt": "a lighthouse", "size": "200x100", "n": 2})
        images = result.structured_content["images"]

        read = await client.read_resource(images[0]["uri"])
        [content] = read.contents
        assert content.mime_type == images[0]["mime_type"]
        assert base64.b64decode(content.blob) == Path(images[0]["path"]).read_bytes()

        templates = (await client.list_resource_templates()).resource_templates
        assert any(t.uri_template == "imagegen://images/{image_id}" for t in templates)

        listed = {str(r.uri): r for r in (await client.list_resources()).resources}
        for image in images:
            assert listed[image["uri"]].mime_type == image["mime_type"]
        assert "imagegen://images" in listed

        recent = await client.read_resource("imagegen://images")
        data = json.loads(recent.contents[0].text)
        assert {i["uri"] for i in data["images"]} >= {i["uri"] for i in images}

        with pytest.raises(MCPError) as err:
            await client.read_resource("imagegen://images/AAAAAAAAAAAAAAAAAAAAAA")
        assert "AAAAAAAAAAAAAAAAAAAAAA" in str(err.value)

        got = await ok(client, "get_image", {"image": images[1]["uri"]})
        assert got.structured_content["images"][0]["uri"] == images[1]["uri"]
        assert blocks(got, ImageContent) and blocks(got, ResourceLink)
        got_by_id = await ok(client, "get_image", {"image": images[1]["id"]})
        assert got_by_id.structured_content["images"][0]["path"] == images[1]["path"]

        assert "AAAAAAAAAAAAAAAAAAAAAA" in await error_text(client, "get_image", {"image": "AAAAAAAAAAAAAAAAAAAAAA"})
        assert "job_id" in await error_text(client, "get_image", {})
        assert "job_nope" in await error_text(client, "get_image", {"job_id": "job_nope"})


# --- size budget -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_photo() -> bytes:
    # JPEG: as photo-like as a PNG for previews, and four of them fit in one gateway answer.
    return emu_images.render("photo", 4096, 4096, "jpeg", quality=90)


async def test_result_stays_under_one_mib_with_four_big_photos(
    tmp_path: Path, mode: str, emu: OpenAIEmulator, big_photo: bytes
) -> None:
    assert len(big_photo) > 5 * MIB  # photo-like: compresses badly
    emu.set_image(big_photo)
    async with connect(emulator_settings(tmp_path, emu), mode) as client:
        schema = (await tool_schemas(client))["generate_image"].output_schema
        result = await ok(
            client, "generate_image", {"prompt": "photos", "model": "dall-e-2", "n": 4, "size": "1024x1024"}
        )
        size = len(result.model_dump_json(by_alias=True, exclude_none=True).encode())
        assert size < RESULT_CAP_BYTES < MIB
        jsonschema.validate(result.structured_content, schema)
        assert len(result.structured_content["images"]) == 4
        assert all((i["width"], i["height"]) == (4096, 4096) for i in result.structured_content["images"])
        assert len(blocks(result, ResourceLink)) == 4
        assert len(blocks(result, ImageContent)) >= 1
        assert all(i["path"] in texts(result) for i in result.structured_content["images"])

        full = await ok(
            client,
            "get_image",
            {"image": result.structured_content["images"][0]["uri"], "inline_full": True},
        )
        assert len(full.model_dump_json(by_alias=True, exclude_none=True).encode()) < RESULT_CAP_BYTES
        [inlined] = blocks(full, ImageContent)
        with Image.open(io.BytesIO(base64.b64decode(inlined.data))) as im:
            assert 512 < max(im.size) < 4096
        assert "downscaled" in texts(full)


async def test_ten_incompressible_images_share_the_budget(tmp_path: Path, mode: str, emu: OpenAIEmulator) -> None:
    noise = Image.frombytes("RGB", (1024, 1024), random.Random(5).randbytes(1024 * 1024 * 3))
    buf = io.BytesIO()
    noise.save(buf, "PNG", compress_level=1)
    emu.set_image(buf.getvalue())
    async with connect(emulator_settings(tmp_path, emu), mode) as client:
        result = await ok(client, "generate_image", {"prompt": "static", "model": "dall-e-2", "n": 10})
    size = len(result.model_dump_json(by_alias=True, exclude_none=True).encode())
    assert size < RESULT_CAP_BYTES
    assert len(blocks(result, ResourceLink)) == 10 and len(result.structured_content["images"]) == 10
    previews = blocks(result, ImageContent)
    assert previews, "some previews fit"
    if len(previews) < 10:
        assert any("left out" in w for w in result.structured_content["warnings"])
    for image in result.structured_content["images"]:
        assert image["path"] in texts(result)


async def test_tight_budget_leaves_out_previews_but_keeps_links_and_paths(tmp_path: Path) -> None:
    from mcp_imagegen.models import SavedImage
    from mcp_imagegen.results import build_image_result

    noise = Image.frombytes("RGB", (700, 500), random.Random(1).randbytes(700 * 500 * 3))
    buf = io.BytesIO()
    noise.save(buf, "PNG", compress_level=1)
    data = buf.getvalue()
    images = [
        SavedImage(
            id=f"img{i:019d}",
            uri=f"imagegen://images/img{i:019d}",
            path=f"/x/{i}.png",
            mime_type="image/png",
            width=700,
            height=500,
            bytes=len(data),
        )
        for i in range(6)
    ]
    for cap in (60_000, 30_000, 8_000):
        result = await build_image_result(
            images, read_bytes=lambda _id: (data, "image/png"), status="done", headline="h", cap_bytes=cap
        )
        assert len(result.model_dump_json(by_alias=True, exclude_none=True).encode()) <= cap
        assert len(blocks(result, ResourceLink)) == 6
        assert all(f"/x/{i}.png" in texts(result) for i in range(6))
        assert len(blocks(result, ImageContent)) < 6
        assert any("left out" in w for w in result.structured_content["warnings"])


# --- long generations and cancellation --------------------------------------------------------------


async def test_slow_generation_returns_a_handle_then_get_image_collects_it(
    tmp_path: Path, mode: str, emu: OpenAIEmulator
) -> None:
    emu.latency_s = 1.5
    settings = emulator_settings(tmp_path, emu, tool_deadline_s=0.3)
    async with connect(settings, mode) as client:
        first = await ok(client, "generate_image", {"prompt": "slow", "model": "dall-e-2", "size": "256x256"})
        sc = first.structured_content
        assert sc["status"] == "running" and sc["job_id"] and sc["images"] == []
        assert f'get_image(job_id="{sc["job_id"]}")' in texts(first)
        # The handle's record was on disk before the handle left the server.
        record_path = settings.output_dir / META_DIR_NAME / JOBS_DIR_NAME / f"{sc['job_id']}.json"
        assert JobRecord.model_validate_json(record_path.read_bytes()).status == "running"

        done = await ok(client, "get_image", {"job_id": sc["job_id"], "wait_s": 0.0})
        assert done.structured_content["status"] in {"running", "done"}
        for _ in range(20):
            done = await ok(client, "get_image", {"job_id": sc["job_id"], "wait_s": 5})
            if done.structured_content["status"] == "done":
                break
        assert done.structured_content["status"] == "done"
        [image] = done.structured_content["images"]
        assert Path(image["path"]).is_file() and blocks(done, ImageContent)
        assert done.structured_content["job_id"] == sc["job_id"]
        # A job's final record is written before its result is handed out.
        final = JobRecord.model_validate_json(record_path.read_bytes())
        assert final.status == "done" and final.image_ids == [image["id"]]


async def test_a_handle_carries_the_images_saved_so_far(tmp_path: Path, mode: str, emu: OpenAIEmulator) -> None:
    # Of dall-e-3's two one-image requests, one is slow: the deadline passes before it can be
    # answered (6 s > 4 s, whatever the machine), and leaves the fast one ample time.
    emu.inject(Fault.delay(6.0), times=1)
    settings = emulator_settings(tmp_path, emu, tool_deadline_s=4.0)
    async with connect(settings, mode) as client:
        first = await ok(client, "generate_image", {"prompt": "pair", "model": "dall-e-3", "n": 2})
        sc = first.structured_content
        assert sc["status"] == "running" and len(sc["images"]) == 1, texts(first)
        assert len(blocks(first, ImageContent)) == 1 and len(blocks(first, ResourceLink)) == 1
        assert "1 of 2" in texts(first)
        for _ in range(20):  # each wait is capped by the deadline
            done = await ok(client, "get_image", {"job_id": sc["job_id"], "wait_s": 10})
            if done.structured_content["status"] == "done":
                break
            assert len(done.structured_content["images"]) >= 1
        assert done.structured_content["status"] == "done"
        assert len(done.structured_content["images"]) == 2
        assert sc["images"][0]["id"] in {i["id"] for i in done.structured_content["images"]}


async def test_heartbeats_while_a_gateway_works(
    tmp_path: Path, mode: str, emu: OpenAIEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mcp_imagegen import server as server_module

    monkeypatch.setattr(server_module, "HEARTBEAT_S", 0.05)
    seen: list[tuple[float, str | None]] = []

    def beats() -> list[str]:
        return [m for _, m in seen if m and m.startswith("generating")]

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))
        if len(beats()) >= 3:
            emu.release()  # the gateway answers once three heartbeats were seen

    emu.hold()
    try:
        async with connect(emulator_settings(tmp_path, emu), mode) as client:
            with anyio.fail_after(60):
                await ok(
                    client,
                    "generate_image",
                    {"prompt": "slow", "model": "dall-e-2", "size": "256x256"},
                    progress_callback=on_progress,
                )
    finally:
        emu.release()
    assert len(beats()) >= 3, seen
    values = [p for p, _ in seen]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert values[-1] == 1 and all(p < 1 for p, m in seen if m and m.startswith("generating"))


async def test_unexpected_errors_are_generic_and_logged(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = offline_settings(tmp_path)
    async with ImageService(settings) as service:

        async def broken(**_: Any) -> Any:
            raise RuntimeError("boom with sk-very-secret-value")

        service.list_models = broken  # type: ignore[method-assign]
        async with Client(build_server(settings, service), mode=mode) as client:
            text = await error_text(client, "list_models", {})
    assert "internal error" in text and "sk-very-secret" not in text and "RuntimeError" not in text
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


async def test_cancelling_a_call_saves_what_was_sent_and_sends_nothing_more(
    tmp_path: Path, mode: str, emu: OpenAIEmulator
) -> None:
    # dall-e-3 makes one image per request, so n=2 is two requests; with one request at a time the
    # second waits unsent while the gateway holds the first.
    emu.inject(Fault.delay(1.5), times=1)
    settings = emulator_settings(tmp_path, emu)
    settings.endpoints[0].max_concurrency = 1
    async with ImageService(settings) as service, Client(build_server(settings, service), mode=mode) as client:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    await client.call_tool(
                        "generate_image", {"prompt": "two", "model": "dall-e-3", "n": 2, "size": "1024x1024"}
                    )

                tg.start_soon(call)
                while not emu.requests_to("/images/generations"):
                    await anyio.sleep(0.02)
                tg.cancel_scope.cancel()  # the client sends notifications/cancelled

            [job] = list(service._jobs.values())
            while job.status == "running":
                await anyio.sleep(0.02)
        listing = json.loads((await client.read_resource("imagegen://images")).contents[0].text)
        assert sorted(i["id"] for i in listing["images"]) == sorted(s.id for s in job.saved)
        got = await ok(client, "get_image", {"job_id": job.id})
        assert [i["id"] for i in got.structured_content["images"]] == [s.id for s in job.saved]
        if mode == "legacy":  # notifications/cancelled: the person's cancel
            assert job.status == "cancelled" and "cancel" in texts(got)  # the unsent request was dropped...
            assert len(job.saved) == 1  # ...and the sent one was awaited and saved
        else:
            # At 2026-07-28 a cancel is the response stream closing, which a dropped connection
            # also does: never the person's decision for sure, so the whole job is done.
            assert job.status == "done" and len(job.saved) == 2
    assert len(emu.requests_to("/images/generations")) == len(job.saved)


# --- protocol details ----------------------------------------------------------------------------


async def test_tool_descriptions_carry_no_source_indentation(tmp_path: Path, mode: str) -> None:
    async with connect(offline_settings(tmp_path), mode) as client:
        tools = await tool_schemas(client)
    for name, tool in tools.items():
        assert tool.description, name
        lines = tool.description.splitlines()
        assert all(not line.startswith(" ") for line in lines), f"{name}: {tool.description!r}"
        assert tool.description == tool.description.strip()
    assert "\n\nReturns each image" in tools["generate_image"].description  # paragraphs are kept


async def test_no_prompts_capability_and_prompt_requests_are_unknown_methods(tmp_path: Path, mode: str) -> None:
    async with connect(offline_settings(tmp_path), mode) as client:
        assert client.server_capabilities.prompts is None
        for call in (client.list_prompts(), client.get_prompt("anything")):
            with pytest.raises(MCPError) as caught:
                await call
            assert caught.value.error.code == -32601  # method not found, not code 0


async def test_logging_capability_and_set_level_change_the_servers_log_level(tmp_path: Path, mode: str) -> None:
    import logging
    import warnings

    ours = logging.getLogger("mcp_imagegen")
    async with connect(offline_settings(tmp_path), mode) as client:
        assert client.server_capabilities.logging is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the SDK marks logging/setLevel deprecated after 2025-11-25
            if mode == "legacy":
                await client.set_logging_level("debug")
                assert ours.getEffectiveLevel() == logging.DEBUG
                await client.set_logging_level("error")
                assert ours.getEffectiveLevel() == logging.ERROR
            else:
                # 2026-07-28 has no logging/setLevel: logs are opted into per request instead.
                with pytest.raises(MCPError) as caught:
                    await client.set_logging_level("debug")
                assert caught.value.error.code == -32601
        # The server works on after it.
        await ok(client, "generate_image", {"prompt": "still here", "size": "32x32"})


async def test_tools_send_nothing_to_an_endpoint_whose_key_is_missing(
    tmp_path: Path, emu: OpenAIEmulator, mode: str
) -> None:
    keyless = EndpointConfig(name="oa", provider="openai", base_url=emu.base_url)  # OPENAI_API_KEY unset
    settings = offline_settings(tmp_path, endpoints=[keyless])
    async with connect(settings, mode) as client:
        text = await error_text(client, "generate_image", {"prompt": "a fox"})
        assert "OPENAI_API_KEY" in text and "nothing was sent" in text
        text = await error_text(client, "generate_image", {"prompt": "a fox", "model": "gpt-image-2"})
        assert "OPENAI_API_KEY" in text
        listed = await ok(client, "list_models", {"refresh": True})
        assert any("OPENAI_API_KEY" in w for w in listed.structured_content["warnings"])
    assert emu.requests == []


async def test_a_heartbeat_after_the_last_image_claims_nothing_beyond_the_total() -> None:
    from mcp_imagegen.server import _Progress

    sent: list[tuple[float, float | None]] = []

    class Context:
        async def report_progress(self, progress: float, total: float | None, message: str) -> None:
            sent.append((progress, total))

    progress = _Progress(Context(), 1)  # type: ignore[arg-type]
    await progress.heartbeat("generating")
    await progress.service_report(1, 1, "saved image 1 of 1")
    await progress.heartbeat("generating")  # the job still writes its final record
    assert sent == [(0.0, 1), (1.0, 1)]
