"""Turn an agent's `images`/`mask` argument into an InputImage, safely.

Accepted forms, tried in this order: `imagegen://images/{id}` (a saved image), a `data:` URL, an
http(s) URL, an existing file path, bare base64 of an image, a path-looking string (which then must
exist). Files must lie inside an allowed root after `..` and symlinks are resolved; URLs may not
reach private, loopback or link-local addresses unless the configuration allows it. Every result is
sniffed and fully verified, so bombs, truncated files and non-images are refused with their source
named.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx2

from . import b64, images
from .errors import ImageGenError, InputForbiddenError, InputNotFoundError, InvalidRequestError
from .models import InputImage
from .owners import signed_in
from .store import URI_PREFIX, ImageStore
from .work import in_worker, on_disk

if TYPE_CHECKING:
    from .config import Settings

FETCH_TIMEOUT_S = 20.0
MAX_REDIRECTS = 3
_REDIRECT_CODES = {301, 302, 303, 307, 308}
_USER_AGENT = "mcp-imagegen (input fetch)"
# Headers a shared client might carry for a gateway; they must never reach an arbitrary URL.
_SENSITIVE_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key", "api-key")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_PATH_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif", ".svg")
_B64_PREFIX_RE = re.compile(r"^[A-Za-z0-9+/_-]{16,}")


def allowed_roots_for(settings: Settings) -> list[Path]:
    """Folders input files may come from: the output directory, the working directory and the
    configured roots, each resolved (so symlinked roots compare correctly)."""
    roots: list[Path] = []
    for p in (settings.output_dir, Path.cwd(), *settings.allowed_roots):
        r = Path(p).expanduser().resolve()
        if r not in roots:
            roots.append(r)
    return roots


# --- addresses --------------------------------------------------------------------------------


def address_problem(addr: str) -> str | None:
    """Why an address may not be fetched from a tool argument ("loopback", ...), or None if public."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4 smuggled inside IPv6 (::ffff:127.0.0.1, 6to4, Teredo, NAT64) is judged as the IPv4.
        if ip.ipv4_mapped:  # ::ffff:a.b.c.d is exactly a.b.c.d on a dual-stack socket
            return address_problem(str(ip.ipv4_mapped))
        embedded: list[ipaddress.IPv4Address] = []
        if ip.sixtofour:
            embedded.append(ip.sixtofour)
        if ip.teredo:
            embedded.append(ip.teredo[1])
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        for v4 in embedded:
            problem = address_problem(str(v4))
            if problem:
                return problem
    checks = (
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip.is_unspecified, "unspecified"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (not ip.is_global, "not public"),
    )
    return next((name for bad, name in checks if bad), None)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def _vetted_address(url: httpx2.URL, label: str) -> str:
    """The address to connect to for url's host, after checking every address the host has."""
    host = url.host
    if _is_ip_literal(host):
        addresses = [host]
    else:
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise InputNotFoundError(f"{label}: the host {host!r} could not be resolved ({exc})") from None
        addresses = [str(info[4][0]) for info in infos]
        if not addresses:
            raise InputNotFoundError(f"{label}: the host {host!r} has no address")
    for addr in addresses:
        problem = address_problem(addr)
        if problem:
            raise InputForbiddenError(
                f"{label}: the URL's host {host!r} is a {problem} address ({addr}); URLs given as "
                "inputs may only reach public addresses (set allow_private_urls = true in the "
                "configuration to allow this)"
            )
    return addresses[0]


# --- URLs -------------------------------------------------------------------------------------


def _parse_http_url(raw: str, label: str) -> httpx2.URL:
    try:
        url = httpx2.URL(raw)
    except (httpx2.InvalidURL, ValueError, TypeError) as exc:
        raise InvalidRequestError(f"{label}: {raw[:200]!r} is not a valid URL ({exc})") from None
    if url.scheme not in ("http", "https"):
        raise InvalidRequestError(f"{label}: only http and https URLs can be fetched, not {url.scheme or 'this'!r}")
    if not url.host:
        raise InvalidRequestError(f"{label}: the URL {raw[:200]!r} has no host")
    return url


def _show(url: httpx2.URL) -> str:
    # Never echo credentials embedded in a URL.
    shown = str(url.copy_with(username=None, password=None)) if url.userinfo else str(url)
    return shown if len(shown) <= 200 else shown[:200] + "..."


async def _fetch(
    raw_url: str, *, allow_private: bool, http: httpx2.AsyncClient | None, label: str
) -> tuple[bytes, str]:
    """Download an image URL: manual redirects (each hop re-vetted), a deadline and a size cap.

    DNS rebinding: the host is resolved once per hop, every address is checked, and the request is
    sent to the vetted IP itself (Host header and TLS SNI/verification keep the original name), so
    a second, different DNS answer is never used. If the client routes through a proxy, the proxy
    connects to that IP too.
    """
    url = _parse_http_url(raw_url, label)
    client = http or httpx2.AsyncClient(timeout=httpx2.Timeout(FETCH_TIMEOUT_S), follow_redirects=False)
    try:
        with anyio.fail_after(FETCH_TIMEOUT_S):
            for _hop in range(MAX_REDIRECTS + 1):
                target, headers, extensions = url, {"User-Agent": _USER_AGENT, "Accept": "image/*"}, {}
                if not allow_private:
                    ip = await _vetted_address(url, label)
                    target = url.copy_with(host=ip)
                    headers["Host"] = url.netloc.decode("ascii")
                    if url.scheme == "https":
                        extensions["sni_hostname"] = url.raw_host.decode("ascii")
                request = client.build_request("GET", target, headers=headers, extensions=extensions)
                for name in _SENSITIVE_HEADERS:
                    request.headers.pop(name, None)
                response = await client.send(request, stream=True, auth=None, follow_redirects=False)
                try:
                    if response.status_code in _REDIRECT_CODES and response.headers.get("location"):
                        url = _parse_http_url(str(url.join(response.headers["location"])), label)
                        continue
                    if response.status_code >= 400:
                        raise InputNotFoundError(f"{label}: {_show(url)} answered HTTP {response.status_code}")
                    if response.status_code != 200:
                        raise InputNotFoundError(
                            f"{label}: {_show(url)} answered HTTP {response.status_code}, not an image"
                        )
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > images.MAX_INPUT_BYTES:
                        raise _too_big(label, _show(url))
                    chunks: list[bytes] = []
                    total = 0
                    async for chunk in response.aiter_bytes():  # decoded bytes: a gzip bomb is capped too
                        total += len(chunk)
                        if total > images.MAX_INPUT_BYTES:
                            raise _too_big(label, _show(url))
                        chunks.append(chunk)
                    return b"".join(chunks), f"URL {_show(url)}"
                finally:
                    await response.aclose()
            raise InputNotFoundError(f"{label}: {_show(url)} redirected more than {MAX_REDIRECTS} times")
    except TimeoutError:
        raise InputNotFoundError(
            f"{label}: downloading {_show(url)} took longer than {FETCH_TIMEOUT_S:.0f} s"
        ) from None
    except httpx2.HTTPError as exc:
        raise InputNotFoundError(f"{label}: could not download {_show(url)}: {exc or type(exc).__name__}") from None
    finally:
        if http is None:
            await client.aclose()


def _too_big(label: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{label}: {what} is larger than the {images.human_bytes(images.MAX_INPUT_BYTES)} allowed for an input image"
    )


# --- files ------------------------------------------------------------------------------------


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def _read_file(spec: str, roots: list[Path], label: str) -> tuple[bytes, str]:
    try:
        p = Path(spec).expanduser()
    except RuntimeError:  # "~nosuchuser/..."
        p = Path(spec)
    if not p.is_absolute():
        p = Path.cwd() / p
    resolved_roots = [r.resolve() for r in roots]
    shown_roots = ", ".join(str(r) for r in resolved_roots) or "(none)"
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError):
        # Outside the roots a missing file gets the same answer as a present one: no probing.
        try:
            loose = p.resolve()
        except (OSError, RuntimeError):
            loose = Path(os.path.normpath(p))
        if not _inside(loose, resolved_roots):
            raise InputForbiddenError(
                f"{label}: the file {p} is outside the allowed folders ({shown_roots}); copy it into one of "
                "them or add its folder to allowed_roots in the configuration"
            ) from None
        raise InputNotFoundError(f"{label}: the file {p} does not exist") from None
    if not _inside(real, resolved_roots):
        via = f" (it resolves to {real})" if real != Path(os.path.normpath(p)) else ""
        raise InputForbiddenError(
            f"{label}: the file {p}{via} is outside the allowed folders ({shown_roots}); copy it into one of "
            "them or add its folder to allowed_roots in the configuration"
        )
    # O_NOFOLLOW: the last component was just checked not to be a symlink; refuse one swapped in since.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(real, flags)
    except IsADirectoryError:
        raise InvalidRequestError(f"{label}: {p} is a folder, not an image file") from None
    except OSError as exc:
        raise InputNotFoundError(f"{label}: the file {p} cannot be read ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InvalidRequestError(f"{label}: {p} is a folder, not an image file")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device could block or never end
            raise InvalidRequestError(f"{label}: {p} is not a regular file")
        if st.st_size > images.MAX_INPUT_BYTES:
            raise _too_big(label, f"the file {p} ({images.human_bytes(st.st_size)})")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(images.MAX_INPUT_BYTES + 1)
    if len(data) > images.MAX_INPUT_BYTES:
        raise _too_big(label, f"the file {p}")
    return data, f"file {real}"


def _exists(spec: str) -> bool:
    if len(spec) > 4096 or "\0" in spec or "\n" in spec:
        return False
    try:
        return os.path.lexists(os.path.expanduser(spec))
    except (OSError, ValueError):
        return False


def _looks_like_path(spec: str) -> bool:
    if len(spec) > 4096 or "\n" in spec or "\0" in spec:
        return False
    return (
        spec.startswith(("/", "~", "./", "../", ".\\", "..\\"))
        or bool(re.match(r"^[A-Za-z]:[\\/]", spec))
        or spec.lower().endswith(_PATH_SUFFIXES)
        or (("/" in spec or "\\" in spec) and len(spec) < 512)
    )


def _base64_image_prefix(spec: str) -> bool:
    """Whether the string starts like base64 of a PNG/JPEG/WebP/GIF (cheap; decodes 24 chars)."""
    m = _B64_PREFIX_RE.match(spec)
    if m is None:
        return False
    head = m.group(0)[:24].replace("-", "+").replace("_", "/")
    head = head[: len(head) // 4 * 4]
    try:
        return images.magic_mime(b64.decode(head)) is not None
    except ValueError:
        return False


def _forms_hint(roots: list[Path]) -> str:
    return (
        "give a file path inside "
        + (", ".join(str(r) for r in roots) or "an allowed folder")
        + ", an http(s) URL, a data URL (data:image/png;base64,...), base64 of a PNG, JPEG, WebP or GIF, "
        f"or {URI_PREFIX}<id> from an earlier result"
    )


# --- the entry point --------------------------------------------------------------------------


async def resolve_input(
    spec: str,
    *,
    store: ImageStore,
    allowed_roots: list[Path],
    allow_private_urls: bool,
    http: httpx2.AsyncClient | None = None,
    role: str = "image",
) -> InputImage:
    """Read, check and sniff one input image given in any accepted form."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidRequestError(f"{role} is empty; {_forms_hint(allowed_roots)}")
    s = spec.strip()
    low = s[:16].lower()
    image_id: str | None = None

    if low.startswith("imagegen://"):
        try:
            record = await on_disk(lambda: store.resolve_uri(s))
            data, _ = await on_disk(lambda: store.read_bytes(record.id))
        except ImageGenError as exc:
            raise type(exc)(f"{role}: {exc.message}") from None
        source, image_id = record.uri, record.id
    elif low.startswith("data:"):
        # Decoding tens of megabytes of base64 would stall the event loop: a worker thread does it.
        data, _declared = await in_worker(lambda: images.parse_data_url(s, f"{role} (data URL)"))
        source = "data URL"
    elif low.startswith(("http://", "https://")):
        data, source = await _fetch(s, allow_private=allow_private_urls, http=http, label=role)
    elif _SCHEME_RE.match(s):
        hint = "; give the file's path itself" if low.startswith("file:") else ""
        raise InvalidRequestError(f"{role}: only http and https URLs can be fetched, not {s.split(':', 1)[0]!r}{hint}")
    elif signed_in() and not _base64_image_prefix(s):
        # Files on the server are the operator's, not any signed-in person's (nor is whether one exists).
        raise InvalidRequestError(
            f"{role}: people signed in over the network cannot name files on the server; pass an "
            f"{URI_PREFIX}<id> URI from an earlier result, an https URL, a data URL or base64"
        )
    elif _exists(s) or (not _base64_image_prefix(s) and _looks_like_path(s)):
        data, source = await on_disk(lambda: _read_file(s, allowed_roots, role))
    elif _base64_image_prefix(s):
        data = await in_worker(lambda: images.decode_base64(s, f"{role} (base64)"))
        source = "base64 data"
    else:
        shown = s if len(s) <= 60 else s[:60] + "..."
        raise InvalidRequestError(
            f"{role} {shown!r} is not a file path, URL, data URL, image base64 or {URI_PREFIX} URI; "
            + _forms_hint(allowed_roots)
        )

    label = f"{role} ({source})"
    mime, width, height = await in_worker(lambda: images.sniff(data, label, verify=True))
    return InputImage(data=data, mime_type=mime, width=width, height=height, source=source, image_id=image_id)
