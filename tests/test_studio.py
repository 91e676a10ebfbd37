"""The image studio's server side (MCP Apps) through the SDK's real Client, in both protocol eras.

What a host that renders Apps is offered (the ui:// resource, tools bound to it, app-only tools),
and that a client without Apps sees exactly the tools and results it saw before. The app itself is
driven in a real browser in test_studio_browser.py.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from mcp.client import Client
from mcp.client.extension import advertise
from mcp_types import CallToolResult, TextContent
from PIL import Image

from mcp_imagegen.config import EndpointConfig, Settings
from mcp_imagegen.server import build_server
from mcp_imagegen.studio import APP_URI

pytestmark = pytest.mark.anyio

APPS = advertise("io.modelcontextprotocol/ui", {"mimeTypes": ["text/html;profile=mcp-app"]})
MODEL_TOOLS = {"generate_image", "edit_image", "get_image", "list_models"}
APP_TOOLS = {"studio_gallery", "studio_image", "studio_import"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["auto", "legacy"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def settings_for(tmp_path: Path) -> Settings:
    return Settings(output_dir=tmp_path / "out", endpoints=[EndpointConfig(name="offline", provider="offline")])


@asynccontextmanager
async def connect(settings: Settings, mode: str, *, apps: bool) -> AsyncIterator[Client]:
    async with Client(build_server(settings), mode=mode, extensions=[APPS] if apps else None) as client:
        yield client


def png_data_url(size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (10, 200, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def text_of(result: CallToolResult) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, TextContent))


async def test_a_client_without_apps_sees_the_tools_it_saw_before(tmp_path: Path, mode: str) -> None:
    async with connect(settings_for(tmp_path), mode, apps=False) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        listed = [str(r.uri) for r in (await client.list_resources()).resources]
    assert set(tools) == MODEL_TOOLS
    assert listed == ["imagegen://images"]  # the studio's ui:// page is not listed to it


async def test_an_apps_client_gets_the_studio_bound_to_generate_and_edit(tmp_path: Path, mode: str) -> None:
    async with connect(settings_for(tmp_path), mode, apps=True) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        page = await client.read_resource(APP_URI)
        listed = [str(r.uri) for r in (await client.list_resources()).resources]
    assert set(tools) == MODEL_TOOLS | APP_TOOLS
    assert APP_URI in listed
    for name in ("generate_image", "edit_image"):
        assert tools[name].meta == {"ui": {"resourceUri": APP_URI}}
    for name in APP_TOOLS:
        assert tools[name].meta["ui"] == {"resourceUri": APP_URI, "visibility": ["app"]}
    for name in ("get_image", "list_models"):
        assert not (tools[name].meta or {}).get("ui")
    [content] = page.contents
    assert content.mime_type == "text/html;profile=mcp-app"
    assert content.meta["ui"]["csp"] == {"connectDomains": [], "resourceDomains": []}
    html = content.text
    # Self-contained: no external script, style, image or font, and nothing fetched over the network.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "fetch(" not in html and "XMLHttpRequest" not in html and "<script src" not in html
    assert "ui/initialize" in html and "ui/update-model-context" in html


async def test_generate_results_are_the_same_with_and_without_apps(tmp_path: Path, mode: str) -> None:
    shapes = []
    for apps in (False, True):
        async with connect(settings_for(tmp_path), mode, apps=apps) as client:
            result = await client.call_tool("generate_image", {"prompt": "a lighthouse", "seed": 3})
        assert not result.is_error
        shapes.append(
            (
                [type(b).__name__ for b in result.content],
                sorted(result.structured_content),
                result.structured_content["status"],
            )
        )
    assert shapes[0] == shapes[1]


async def test_gallery_pages_newest_first_and_filters_by_prompt_and_model(tmp_path: Path, mode: str) -> None:
    settings = settings_for(tmp_path)
    async with connect(settings, mode, apps=True) as client:
        made = []
        for i in range(5):
            result = await client.call_tool("generate_image", {"prompt": f"{'fox' if i % 2 else 'owl'} number {i}"})
            made.append(result.structured_content["images"][0]["uri"])
        pages = [
            (await client.call_tool("studio_gallery", {"page": p, "page_size": 2})).structured_content
            for p in (1, 2, 3)
        ]
        foxes = (await client.call_tool("studio_gallery", {"text": "FOX"})).structured_content
        by_model = (await client.call_tool("studio_gallery", {"model": "offline"})).structured_content
        nobody = (await client.call_tool("studio_gallery", {"model": "no-such-model"})).structured_content
        bad = await client.call_tool("studio_gallery", {"page_size": 500})
    assert [p["pages"] for p in pages] == [3, 3, 3]
    assert [[i["uri"] for i in p["images"]] for p in pages] == [made[4:2:-1], made[2:0:-1], made[0:1]]
    assert pages[0]["total"] == 5 and pages[0]["models"] == ["offline"]
    assert [i["uri"] for i in foxes["images"]] == [made[3], made[1]]
    assert all("fox" in i["prompt"] for i in foxes["images"])
    assert by_model["total"] == 5 and nobody["total"] == 0 and nobody["images"] == []
    assert bad.is_error and "page_size" in text_of(bad)


async def test_an_imported_image_is_stored_and_usable_by_its_uri(tmp_path: Path, mode: str) -> None:
    async with connect(settings_for(tmp_path), mode, apps=True) as client:
        stored = await client.call_tool("studio_import", {"data": png_data_url((40, 30)), "name": "holiday.png"})
        assert not stored.is_error, text_of(stored)
        image = stored.structured_content["image"]
        read = await client.read_resource(image["uri"])
        edited = await client.call_tool("edit_image", {"prompt": "add snow", "images": image["uri"]})
        relatives = await client.call_tool("studio_image", {"image": edited.structured_content["images"][0]["uri"]})
        listed = (await client.call_tool("studio_gallery", {})).structured_content
    assert (image["width"], image["height"], image["operation"]) == (40, 30, "import")
    assert Path(image["path"]).is_file() and Path(image["path"]).parent == tmp_path / "out"
    assert image["uri"] in text_of(stored)
    assert base64.b64decode(read.contents[0].blob) == Path(image["path"]).read_bytes()
    assert not edited.is_error, text_of(edited)
    lineage = relatives.structured_content["lineage"]
    assert [r["uri"] for r in lineage] == [image["uri"], edited.structured_content["images"][0]["uri"]]
    assert image["uri"] in [i["uri"] for i in listed["images"]]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("data:image/png;base64," + base64.b64encode(b"<html>not an image</html>").decode(), "not an image"),
        ("/etc/passwd", "data URL"),
        ("https://example.com/cat.png", "data URL"),
    ],
)
async def test_import_refuses_what_is_not_an_image_given_as_bytes(
    tmp_path: Path, data: str, expected: str, mode: str
) -> None:
    async with connect(settings_for(tmp_path), mode, apps=True) as client:
        result = await client.call_tool("studio_import", {"data": data})
        listed = (await client.call_tool("studio_gallery", {})).structured_content
    assert result.is_error
    assert expected in text_of(result).lower() or expected in text_of(result)
    assert listed["total"] == 0


async def test_studio_image_gives_the_variants_of_one_job(tmp_path: Path, mode: str) -> None:
    async with connect(settings_for(tmp_path), mode, apps=True) as client:
        made = await client.call_tool("generate_image", {"prompt": "three boats", "n": 3})
        uris = [i["uri"] for i in made.structured_content["images"]]
        rel = (await client.call_tool("studio_image", {"image": uris[1]})).structured_content
        missing = await client.call_tool("studio_image", {"image": "imagegen://images/AAAAAAAAAAAAAAAAAAAAAA"})
    assert sorted(s["uri"] for s in rel["siblings"]) == sorted(uris)
    assert rel["image"]["uri"] == uris[1] and [r["uri"] for r in rel["lineage"]] == [uris[1]]
    assert missing.is_error and "no saved image" in text_of(missing)
