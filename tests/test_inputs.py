"""inputs.py: every accepted form of an input image, and the walls around files and URLs."""

from __future__ import annotations

import base64
import io
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from PIL import Image

from mcp_imagegen import b64, images, inputs
from mcp_imagegen.config import Settings
from mcp_imagegen.errors import InputForbiddenError, InputNotFoundError, InvalidRequestError
from mcp_imagegen.store import ImageStore, NewImage

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


PNG = encode(Image.new("RGB", (40, 30), "orange"))
JPEG = encode(Image.new("RGB", (24, 16), "navy"), "JPEG")


# --- a tiny HTTP server on 127.0.0.1 ------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    seen_hosts: list[str] = []
    seen_auth: list[str | None] = []
    redirect_target = ""

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _send(
        self,
        code: int,
        body: bytes = b"",
        ctype: str = "image/png",
        length: bool = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")  # body ends when the connection closes
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        Handler.seen_hosts.append(self.headers.get("Host", ""))
        Handler.seen_auth.append(self.headers.get("Authorization"))
        path = self.path
        if path == "/img.png":
            self._send(200, PNG)
        elif path == "/big":
            self._send(200, b"\x89PNG" + b"\0" * 60_000)
        elif path == "/big-unsized":
            self.close_connection = True
            self._send(200, b"\x89PNG" + b"\0" * 60_000, length=False)
        elif path == "/page.html":
            self._send(200, b"<!doctype html><html><body>Not an image</body></html>", "text/html")
        elif path == "/redirect-ok":
            self._send(302, headers={"Location": "/img.png"})
        elif path == "/redirect-private":
            self._send(302, headers={"Location": Handler.redirect_target})
        elif path.startswith("/loop"):
            self._send(302, headers={"Location": f"/loop{len(path)}"})
        else:
            self._send(404, b"not found", "text/plain")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# --- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "photo.png").write_bytes(PNG)
    return r


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "out")


async def resolve(spec: str, store: ImageStore, roots: list[Path], private: bool = False, **kw: Any) -> Any:
    return await inputs.resolve_input(spec, store=store, allowed_roots=roots, allow_private_urls=private, **kw)


# --- forms --------------------------------------------------------------------------------------


async def test_absolute_path(root: Path, store: ImageStore) -> None:
    img = await resolve(str(root / "photo.png"), store, [root])
    assert (img.mime_type, img.width, img.height, img.data) == ("image/png", 40, 30, PNG)
    assert img.source == f"file {(root / 'photo.png').resolve()}" and img.image_id is None


async def test_relative_path_and_home(root: Path, store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(root)
    assert (await resolve("photo.png", store, [root])).width == 40
    assert (await resolve("./photo.png", store, [root])).width == 40
    monkeypatch.setenv("HOME", str(root))
    assert (await resolve("~/photo.png", store, [root])).width == 40


async def test_data_url(root: Path, store: ImageStore) -> None:
    img = await resolve(b64.data_url(JPEG, "image/png"), store, [root])  # declared type is not trusted
    assert (img.mime_type, img.width, img.height, img.source) == ("image/jpeg", 24, 16, "data URL")


@pytest.mark.parametrize("data", [PNG, JPEG], ids=["png", "jpeg-starts-with-slash"])
async def test_bare_base64(root: Path, store: ImageStore, data: bytes) -> None:
    b64 = base64.b64encode(data).decode()
    img = await resolve(b64, store, [root])
    assert img.data == data and img.source == "base64 data"
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert (await resolve(wrapped, store, [root])).data == data


async def test_imagegen_uri(root: Path, store: ImageStore) -> None:
    rec = store.save(
        PNG,
        NewImage(
            mime_type="image/png",
            width=40,
            height=30,
            prompt="p",
            operation="generate",
            model="m",
            endpoint="e",
            provider="offline",
        ),
    )
    img = await resolve(rec.uri, store, [root])
    assert img.image_id == rec.id and img.data == PNG and img.source == rec.uri
    with pytest.raises(InputNotFoundError, match=r"^mask: no saved image"):
        await resolve("imagegen://images/" + "B" * 22, store, [root], role="mask")


async def test_http_url(server: str, root: Path, store: ImageStore) -> None:
    img = await resolve(f"{server}/img.png", store, [root], private=True)
    assert img.data == PNG and img.source == f"URL {server}/img.png"
    img = await resolve(f"{server}/redirect-ok", store, [root], private=True)
    assert img.data == PNG and img.source == f"URL {server}/img.png"


# --- refusals: files ----------------------------------------------------------------------------


async def test_dotdot_escape_refused(tmp_path: Path, root: Path, store: ImageStore) -> None:
    (tmp_path / "secret.png").write_bytes(PNG)
    with pytest.raises(InputForbiddenError, match=r"secret\.png is outside the allowed folders"):
        await resolve(str(root / ".." / "secret.png"), store, [root])
    # A missing file outside gets the same answer: existence cannot be probed.
    with pytest.raises(InputForbiddenError, match="outside the allowed folders"):
        await resolve(str(root / ".." / "nothing-here.png"), store, [root])


async def test_symlink_escape_refused(tmp_path: Path, root: Path, store: ImageStore) -> None:
    (tmp_path / "secret.png").write_bytes(PNG)
    (root / "innocent.png").symlink_to(tmp_path / "secret.png")
    (root / "dir").symlink_to(tmp_path)
    with pytest.raises(InputForbiddenError, match=r"innocent\.png \(it resolves to .*secret\.png\) is outside"):
        await resolve(str(root / "innocent.png"), store, [root])
    with pytest.raises(InputForbiddenError):
        await resolve(str(root / "dir" / "secret.png"), store, [root])


async def test_symlink_inside_root_is_fine(root: Path, store: ImageStore) -> None:
    (root / "alias.png").symlink_to(root / "photo.png")
    assert (await resolve(str(root / "alias.png"), store, [root])).data == PNG


async def test_missing_file_and_folder(root: Path, store: ImageStore) -> None:
    with pytest.raises(InputNotFoundError, match=r"image 2: the file .*root/nope\.png does not exist"):
        await resolve(str(root / "nope.png"), store, [root], role="image 2")
    with pytest.raises(InvalidRequestError, match="is a folder"):
        await resolve(str(root), store, [root])


async def test_text_file_is_not_an_image(root: Path, store: ImageStore) -> None:
    (root / "notes.png").write_text("just some notes")
    with pytest.raises(InvalidRequestError, match=r"mask \(file .*notes\.png\) is not an image .*looks like text"):
        await resolve(str(root / "notes.png"), store, [root], role="mask")


async def test_truncated_file(root: Path, store: ImageStore) -> None:
    (root / "cut.png").write_bytes(PNG[: len(PNG) - 20])
    with pytest.raises(InvalidRequestError, match="is truncated"):
        await resolve(str(root / "cut.png"), store, [root])


# --- refusals: other forms ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("ftp://example.com/x.png", "only http and https"),
        ("file:///etc/passwd", "give the file's path itself"),
        ("a cat wearing a hat", "is not a file path, URL, data URL"),
        ("   ", "is empty"),
        (base64.b64encode(b"hello world, not an image at all").decode(), "is not a file path"),
    ],
)
async def test_malformed_inputs(root: Path, store: ImageStore, spec: str, msg: str) -> None:
    with pytest.raises(InvalidRequestError, match=msg):
        await resolve(spec, store, [root])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.png",
        "http://10.1.2.3/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://[fe80::1]/x.png",
        "http://0.0.0.0/x.png",
        "https://192.168.1.1/x.png",
        "http://localhost:9/x.png",
    ],
)
async def test_private_urls_refused(root: Path, store: ImageStore, url: str) -> None:
    with pytest.raises(InputForbiddenError, match="allow_private_urls"):
        await resolve(url, store, [root])


def test_address_classification() -> None:
    for bad in (
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::",
        "64:ff9b::a9fe:a9fe",
    ):
        assert inputs.address_problem(bad), bad
    for good in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        assert inputs.address_problem(good) is None, good


def _allow_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    real = inputs.address_problem
    monkeypatch.setattr(inputs, "address_problem", lambda a: None if a == "127.0.0.1" else real(a))


async def test_redirect_to_private_address_refused(
    server: str, root: Path, store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _allow_loopback(monkeypatch)  # the first hop counts as public; the redirect target does not
    for target in ("http://169.254.169.254/latest/meta-data/", "http://[::1]/x", "http://10.0.0.7/x"):
        Handler.redirect_target = target
        with pytest.raises(InputForbiddenError, match="is a .* address"):
            await resolve(f"{server}/redirect-private", store, [root])


async def test_request_goes_to_the_vetted_address(
    server: str, root: Path, store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host is resolved once and the connection made to that address (no DNS rebinding)."""
    _allow_loopback(monkeypatch)
    port = int(server.rsplit(":", 1)[1])
    lookups: list[str] = []

    async def fake_getaddrinfo(host: str, port_: int, **kw: Any) -> list[Any]:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port_))]

    monkeypatch.setattr(anyio, "getaddrinfo", fake_getaddrinfo)
    Handler.seen_hosts.clear()
    Handler.seen_auth.clear()
    async with __import__("httpx2").AsyncClient(headers={"Authorization": "Bearer gateway-key"}) as http:
        img = await resolve(f"http://images.example.test:{port}/img.png", store, [root], http=http)
    assert img.data == PNG
    assert lookups == ["images.example.test"]
    assert Handler.seen_hosts == [f"images.example.test:{port}"]
    assert Handler.seen_auth == [None]  # a shared client's gateway key never leaves with the fetch


async def test_too_many_redirects(server: str, root: Path, store: ImageStore) -> None:
    with pytest.raises(InputNotFoundError, match="redirected more than 3 times"):
        await resolve(f"{server}/loop", store, [root], private=True)


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
async def test_oversized_download_refused(
    server: str, root: Path, store: ImageStore, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    monkeypatch.setattr(images, "MAX_INPUT_BYTES", 10_000)
    with pytest.raises(InvalidRequestError, match="larger than the 9.8 KB allowed"):
        await resolve(server + path, store, [root], private=True)


async def test_http_errors_and_non_images(server: str, root: Path, store: ImageStore) -> None:
    with pytest.raises(InputNotFoundError, match="answered HTTP 404"):
        await resolve(f"{server}/missing.png", store, [root], private=True)
    with pytest.raises(InvalidRequestError, match=r"image \(URL .*page\.html\) is not an image .*HTML page"):
        await resolve(f"{server}/page.html", store, [root], private=True)
    with pytest.raises(InputNotFoundError, match="could not download"):
        await resolve("http://127.0.0.1:9/x.png", store, [root], private=True)  # nothing listens on port 9


def test_allowed_roots_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    s = Settings(output_dir=tmp_path / "out", allowed_roots=[tmp_path / "link", tmp_path])
    assert inputs.allowed_roots_for(s) == [
        (tmp_path / "out").resolve(),
        tmp_path.resolve(),
        (tmp_path / "real").resolve(),
    ]
