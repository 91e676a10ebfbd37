"""The image studio in a real headless browser (Debian's chromium, driven by Playwright).

The app runs inside a host stub (tests/studio_host.py): an iframe sandboxed on a second loopback
origin under the declared CSP, talking JSON-RPC over postMessage to a host page that forwards
tools/call and resources/read to the real server through the SDK's Client. Every wait is on a DOM
condition or a recorded request, never on time. A screenshot of each view is kept in
tests/artifacts/ (git-ignored).

Outside CI the tests skip when chromium is not installed; in CI (CI=true) they fail instead.
"""

from __future__ import annotations

import base64
import io
import os
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client
from mcp.client.extension import advertise
from PIL import Image
from pydantic import SecretStr

from mcp_imagegen.config import EndpointConfig, Settings
from mcp_imagegen.server import build_server
from tests.emulators.base import DEFAULT_API_KEY
from tests.emulators.openai import OpenAIEmulator
from tests.studio_host import HostStub, host_stub

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHROMIUM = os.environ.get("MCP_IMAGEGEN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).parent / "artifacts"
APPS = advertise("io.modelcontextprotocol/ui", {"mimeTypes": ["text/html;profile=mcp-app"]})
WAIT_MS = 30_000


def _require_browser() -> None:
    missing = [] if Path(CHROMIUM).is_file() else [f"chromium ({CHROMIUM})"]
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install '.[test]')")
    if not missing:
        return
    reason = f"browser tests need {' and '.join(missing)}; on Debian: apt-get install chromium"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must run them)")
    pytest.skip(reason)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def browser_available() -> None:
    _require_browser()


@pytest.fixture(scope="module")
def openai_emulator() -> Iterator[OpenAIEmulator]:
    emu = OpenAIEmulator().start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def emu(openai_emulator: OpenAIEmulator) -> OpenAIEmulator:
    openai_emulator.reset()
    return openai_emulator


def studio_settings(tmp_path: Path, emu: OpenAIEmulator | None = None, **overrides: Any) -> Settings:
    endpoints = [EndpointConfig(name="offline", provider="offline")]
    if emu is not None:
        oa = EndpointConfig(name="oa", provider="openai", base_url=emu.base_url)
        oa.api_key = SecretStr(DEFAULT_API_KEY)
        endpoints.insert(0, oa)
    return Settings(output_dir=tmp_path / "out", endpoints=endpoints, **overrides)


class Studio:
    """One browser page showing the studio in the host stub, and the client behind it."""

    def __init__(self, client: Client, host: HostStub, page: Any) -> None:
        self.client = client
        self.host = host
        self.page = page
        self.app = page.frame_locator("#app")

    @property
    def frame(self) -> Any:
        return next(f for f in self.page.frames if f.url == self.host.app_url)

    async def deliver(self, args: dict[str, Any], result: Any) -> None:
        dumped = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        await self.page.evaluate("([a, r]) => window.host.deliver(a, r)", [args, dumped])

    async def wait(self, selector: str, **kwargs: Any) -> Any:
        locator = self.app.locator(selector)
        await locator.first.wait_for(timeout=WAIT_MS, **kwargs)
        return locator

    async def wait_true(self, expression: str, arg: Any = None, *, in_app: bool = False) -> Any:
        target = self.frame if in_app else self.page
        handle = await target.wait_for_function(expression, arg=arg, timeout=WAIT_MS)
        return await handle.json_value()

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path))
        return path


@asynccontextmanager
async def open_studio(settings: Settings) -> AsyncIterator[Studio]:
    from playwright.async_api import async_playwright

    async with Client(build_server(settings), extensions=[APPS]) as client, host_stub(client) as host:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page(viewport={"width": 1000, "height": 820})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                # CSP violations and failed loads show up as console errors.
                page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
                await page.goto(host.host_url)
                studio = Studio(client, host, page)
                await studio.wait("body[data-ready='true']", state="attached")
                await studio.wait_true("() => window.host.initialized")
                yield studio
                assert errors == [], f"script errors in the page: {errors}"
            finally:
                await browser.close()


def png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


async def test_a_result_shows_each_image_full_size_and_can_be_chosen_and_downloaded(tmp_path: Path) -> None:
    async with open_studio(studio_settings(tmp_path)) as studio:
        args = {"prompt": "two sailing boats", "n": 2, "size": "640x384"}
        result = await studio.client.call_tool("generate_image", args)
        await studio.deliver(args, result)
        await studio.wait("figure.image:nth-of-type(2) img[data-loaded='true']")
        figures = studio.app.locator("#result-images figure.image")
        assert await figures.count() == 2
        sizes = await studio.frame.evaluate(
            "() => [...document.querySelectorAll('#result-images img')].map(i => [i.naturalWidth, i.naturalHeight])"
        )
        assert sizes == [[640, 384], [640, 384]]  # the saved file itself, not the 512 px preview
        first = result.structured_content["images"][0]
        caption = await figures.first.locator("figcaption").inner_text()
        assert "640×384" in caption and "offline" in caption and first["path"] in caption
        await studio.screenshot("result")

        await figures.first.locator("button.use").click()
        chosen = await studio.wait_true("() => window.host.modelContext.length && window.host.modelContext")
        assert chosen[0]["structuredContent"]["chosen_image"]["uri"] == first["uri"]
        assert first["uri"] in chosen[0]["content"][0]["text"]

        await figures.first.locator("button.download").click()
        downloads = await studio.wait_true("() => window.host.downloads.length && window.host.downloads")
        resource = downloads[0]["contents"][0]["resource"]
        assert resource["uri"] == first["uri"]
        assert base64.b64decode(resource["blob"]) == Path(first["path"]).read_bytes()

        await figures.nth(1).locator("button.compare").click()
        await studio.wait("#compare-variants figure.image:nth-of-type(2) img[data-loaded='true']")
        shown = await studio.app.locator("#compare-variants figure.image").evaluate_all(
            "(fs) => fs.map(f => f.dataset.uri)"
        )
        assert sorted(shown) == sorted(i["uri"] for i in result.structured_content["images"])
        await studio.screenshot("compare")


async def test_the_gallery_pages_and_filters(tmp_path: Path) -> None:
    async with open_studio(studio_settings(tmp_path)) as studio:
        made = []
        for i in range(14):
            prompt = f"{'lighthouse' if i % 3 == 0 else 'meadow'} study {i}"
            r = await studio.client.call_tool("generate_image", {"prompt": prompt, "size": "96x96", "seed": i})
            made.append(r.structured_content["images"][0]["uri"])
        await studio.app.locator("#tab-gallery").click()
        await studio.wait("#gallery-grid[data-state='ready'][data-page='1']")
        tiles = studio.app.locator("#gallery-grid .tile")
        assert await tiles.evaluate_all("(ts) => ts.map(t => t.dataset.uri)") == made[::-1][:12]
        assert await studio.app.locator("#gallery-page").inner_text() == "Page 1 of 2 (14 images)"
        await studio.wait("#gallery-grid .tile:nth-child(12) img[data-loaded='true']")
        await studio.screenshot("gallery")

        await studio.app.locator("#gallery-next").click()
        await studio.wait("#gallery-grid[data-state='ready'][data-page='2']")
        assert await tiles.evaluate_all("(ts) => ts.map(t => t.dataset.uri)") == made[1::-1]
        assert await studio.app.locator("#gallery-next").is_disabled()

        await studio.app.locator("#gallery-text").fill("lighthouse")
        await studio.app.locator("#gallery-search").click()
        await studio.wait("#gallery-grid[data-state='ready'][data-page='1'] .tile")
        await studio.wait_true("() => document.querySelectorAll('#gallery-grid .tile').length === 5", in_app=True)
        assert await tiles.evaluate_all("(ts) => ts.map(t => t.dataset.uri)") == [made[i] for i in (12, 9, 6, 3, 0)]

        await tiles.first.click()
        await studio.wait("#view-result:not([hidden]) figure.image img[data-loaded='true']")
        assert await studio.app.locator("#result-images figure.image").get_attribute("data-uri") == made[12]


async def test_a_painted_mask_reaches_the_gateway_and_the_edit_shows_in_place(
    tmp_path: Path, emu: OpenAIEmulator
) -> None:
    async with open_studio(studio_settings(tmp_path, emu)) as studio:
        args = {"prompt": "a harbour", "size": "1024x1024", "model": "gpt-image-2"}
        result = await studio.client.call_tool("generate_image", args)
        assert not result.is_error
        await studio.deliver(args, result)
        await studio.wait("#result-images figure.image img[data-loaded='true']")
        await studio.app.locator("#result-images button.paint").click()
        await studio.wait("#mask-image[data-loaded='true']")

        # Paint the left half's middle band with a wide brush, then erase a spot inside it.
        canvas = studio.app.locator("#mask-canvas")
        box = await canvas.bounding_box()
        assert box is not None
        await studio.app.locator("#brush-size").fill("60")
        mouse = studio.page.mouse
        y = box["y"] + box["height"] * 0.5
        await mouse.move(box["x"] + box["width"] * 0.1, y)
        await mouse.down()
        for step in range(1, 9):
            await mouse.move(box["x"] + box["width"] * (0.1 + 0.3 * step / 8), y)
        await mouse.up()
        await studio.app.locator("#tool-eraser").check()
        await mouse.click(box["x"] + box["width"] * 0.25, y)
        await studio.app.locator("#mask-prompt").fill("a red boat")
        await studio.screenshot("mask")

        edits_before = len(emu.requests_to("/images/edits"))
        await studio.app.locator("#mask-apply").click()
        await studio.wait("#view-mask[data-state='done']", state="attached")
        edited = await studio.app.locator("#view-mask").get_attribute("data-result")
        assert edited and edited.startswith("imagegen://images/")
        await studio.wait(f"#mask-image[data-uri='{edited}'][data-loaded='true']")

        [edit] = emu.requests_to("/images/edits")[edits_before:]
        assert edit.form["prompt"] == "a red boat"
        mask = Image.open(io.BytesIO(edit.files["mask"][0].data))
        assert mask.size == (1024, 1024) and "A" in mask.getbands()
        alpha = mask.getchannel("A")
        assert alpha.getpixel((int(1024 * 0.38), 512)) == 0  # painted: the area to change
        assert alpha.getpixel((int(1024 * 0.25), 512)) == 255  # erased again: kept
        assert alpha.getpixel((int(1024 * 0.8), 512)) == 255  # never painted: kept
        assert alpha.getpixel((int(1024 * 0.3), 100)) == 255
        [sent] = edit.files.get("image") or edit.files.get("image[]") or []
        assert Image.open(io.BytesIO(sent.data)).size == (1024, 1024)
        await studio.screenshot("mask-edited")

        # The edit is also the current result; its before/after comes from its lineage.
        await studio.app.locator("#tab-result").click()
        await studio.app.locator(f"#result-images figure[data-uri='{edited}'] button.compare").click()
        await studio.wait("#before-after-box:not([hidden]) #ba-after[data-loaded='true']")
        original = result.structured_content["images"][0]["uri"]
        assert await studio.app.locator("#ba-before").get_attribute("data-uri") == original
        assert await studio.app.locator("#ba-after").get_attribute("data-uri") == edited
        await studio.screenshot("before-after")

        # Another round on the edit, inverted: paint a spot, invert, so all but the spot changes.
        await studio.app.locator("#tab-mask").click()
        await studio.app.locator("#tool-brush").check()
        await studio.app.locator("#mask-clear").click()
        box = await canvas.bounding_box()
        assert box is not None
        await mouse.click(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.3)
        await studio.app.locator("#mask-invert").click()
        await studio.app.locator("#mask-prompt").fill("night time")
        await studio.app.locator("#mask-apply").click()
        await studio.wait_true(
            "(old) => { const v = document.getElementById('view-mask');"
            " return v.dataset.state === 'done' && v.dataset.result !== old; }",
            edited,
            in_app=True,
        )
        [inverted] = emu.requests_to("/images/edits")[edits_before + 1 :]
        alpha = Image.open(io.BytesIO(inverted.files["mask"][0].data)).getchannel("A")
        assert alpha.getpixel((int(1024 * 0.7), int(1024 * 0.3))) == 255  # the painted spot is kept
        assert alpha.getpixel((int(1024 * 0.2), int(1024 * 0.8))) == 0  # everything else changes


async def test_a_dropped_or_pasted_file_is_stored_for_the_agent(tmp_path: Path) -> None:
    async with open_studio(studio_settings(tmp_path)) as studio:
        await studio.app.locator("#tab-import").click()
        dropped = png((120, 80), (20, 120, 220))
        await studio.frame.evaluate(
            """(b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
                const zone = document.getElementById("drop-zone");
                zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true, cancelable: true }));
                zone.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
            }""",
            base64.b64encode(dropped).decode(),
        )
        await studio.wait("#import-result[data-state='done'] img[data-loaded='true']")
        uri = await studio.app.locator("#import-uri").inner_text()
        read = await studio.client.read_resource(uri)
        assert base64.b64decode(read.contents[0].blob) == dropped
        await studio.screenshot("import")

        pasted = png((64, 64), (240, 200, 10))
        await studio.frame.evaluate(
            """(b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "pasted.png", { type: "image/png" }));
                document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true }));
            }""",
            base64.b64encode(pasted).decode(),
        )
        await studio.wait_true(
            "(old) => { const b = document.getElementById('import-result');"
            " return b.dataset.state === 'done' && b.dataset.uri !== old; }",
            uri,
            in_app=True,
        )
        second = await studio.app.locator("#import-uri").inner_text()
        assert second != uri
        read = await studio.client.read_resource(second)
        assert base64.b64decode(read.contents[0].blob) == pasted
        # The agent can now name it: an edit by URI works.
        edited = await studio.client.call_tool("edit_image", {"prompt": "add a sun", "images": second})
        assert not edited.is_error

        bad = base64.b64encode(b"GIF89a but not really").decode()
        await studio.frame.evaluate(
            """(b64) => {
                const dt = new DataTransfer();
                dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], "broken.png", { type: "image/png" }));
                document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
            }""",
            bad,
        )
        await studio.wait("#import-result[data-state='failed'] p.error")


def _gate(emu: OpenAIEmulator) -> Callable[[], None]:
    """Hold image requests at the emulator until the returned function is called."""
    released = threading.Event()
    inner = emu.app

    async def gated(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and "/images/" in scope["path"]:
            await anyio.to_thread.run_sync(released.wait)
        await inner(scope, receive, send)

    emu.app = gated  # type: ignore[assignment]
    return released.set


async def test_a_running_job_shows_progress_then_its_images(tmp_path: Path) -> None:
    with OpenAIEmulator() as emu:
        release = _gate(emu)
        try:
            settings = studio_settings(tmp_path, emu, tool_deadline_s=0.2)
            async with open_studio(settings) as studio:
                args = {"prompt": "a slow mountain", "model": "gpt-image-2", "n": 2}
                result = await studio.client.call_tool("generate_image", args)
                assert result.structured_content["status"] == "running"
                job_id = result.structured_content["job_id"]
                await studio.deliver(args, result)
                await studio.wait(f"#job[data-state='running'][data-job='{job_id}']")
                assert job_id in await studio.app.locator("#job-text").inner_text()
                await studio.screenshot("job-running")

                release()
                await studio.wait("#job[data-state='done']")
                await studio.wait("#result-images figure.image:nth-of-type(2) img[data-loaded='true']")
                shown = await studio.app.locator("#result-images figure.image").evaluate_all(
                    "(fs) => fs.map(f => f.dataset.uri)"
                )
                assert len(shown) == 2 and all(u.startswith("imagegen://images/") for u in shown)
                assert any(c["name"] == "get_image" and c["arguments"]["job_id"] == job_id for c in studio.host.calls)
                log = await studio.app.locator("#job-log").inner_text()
                assert re.search(r"running: \d image\(s\) saved", log) and "done: 2 image(s)" in log
                await studio.screenshot("job-done")
        finally:
            release()
