"""Saved images and their metadata; resource URIs.

Each image is a file a person can find by eye (`20260121-143005_a-red-fox_Ab3xY9.png`) in the
output directory, and a JSON record in `<output_dir>/.mcp-imagegen/<id>.json`. The record is written
only after the image is safely on disk, so a record always points at a whole image: a crash in
between leaves an unrecorded file (still visible to the person) and never a record of a bad one.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets
import threading
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config import OUTPUT_DIR_ENV
from .errors import ConfigError, InputNotFoundError, InvalidRequestError
from .jobs import JobBook
from .models import ImageRecord, Origin
from .owners import current_owner
from .recovery import LiveLock, recover

log = logging.getLogger("mcp_imagegen.store")

URI_PREFIX = "imagegen://images/"
META_DIR_NAME = ".mcp-imagegen"
TMP_SUFFIX = ".mcpimg-partial"  # half-written files end with this; see recovery.py
MIN_FREE_ENV = "MCP_IMAGEGEN_MIN_FREE_MB"  # hidden: the free room a call needs before it is sent
DEFAULT_MIN_FREE_MB = 64
# token_urlsafe(16) gives 22 characters; accept a range so the format can grow without breaking.
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_SLUG_MAX = 40


def _slug(prompt: str) -> str:
    """'A red fox, in snow!' -> 'a-red-fox-in-snow' (ASCII, at most 40 characters)."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii").lower()
    words = re.findall(r"[a-z0-9]+", text)
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > _SLUG_MAX:
            if not slug:
                slug = word[:_SLUG_MAX]
            break
        slug = candidate
    return slug or "image"


@dataclass(frozen=True)
class NewImage:
    """What is known of an image before either store saves it: everything its record holds
    but its id, where it went and when."""

    mime_type: str
    width: int
    height: int
    prompt: str
    operation: Origin
    model: str
    endpoint: str
    provider: str
    parameters: dict[str, Any] = field(default_factory=dict)
    parent_ids: list[str] = field(default_factory=list)
    revised_prompt: str | None = None
    job_id: str | None = None
    frames: int | None = None  # GIFs: the frame count
    owner: str | None = None  # None: the caller (owners.py)

    def extension(self) -> str:
        from .images import EXTENSIONS  # Pillow loads on the first save, not at start-up

        ext = EXTENSIONS.get(self.mime_type)
        if ext is None:
            raise InvalidRequestError(f"cannot save an image of type {self.mime_type!r}")
        return ext

    def file_name(self, tag: str, now: datetime, ext: str) -> str:
        """`<local time>_<prompt's slug>_<tag>.<ext>`: local time, as a person browsing expects;
        the tag is the start of the image's id (recovery reads it back)."""
        return f"{now.astimezone().strftime('%Y%m%d-%H%M%S')}_{_slug(self.prompt)}_{tag}.{ext}"

    def record(self, image_id: str, path: str, size: int, now: datetime) -> ImageRecord:
        facts = asdict(self)  # copies the parameters and parent ids too
        facts["owner"] = self.owner or current_owner()
        return ImageRecord(
            id=image_id,
            uri=URI_PREFIX + image_id,
            path=path,
            bytes=size,
            created_at=now.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            **facts,
        )


def _encode_cursor(key: tuple[int, str]) -> str:
    return base64.urlsafe_b64encode(f"{key[0]}:{key[1]}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        stamp, _, image_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().partition(":")
        key = (int(stamp), image_id)
    except (ValueError, UnicodeDecodeError):
        key = (0, "")
    if not is_valid_id(key[1]):
        raise InvalidRequestError(
            "invalid cursor: pass the nextCursor of the previous resources/list answer unchanged, "
            "or no cursor for the first page"
        )
    return key


def is_valid_id(image_id: str) -> bool:
    return isinstance(image_id, str) and bool(_ID_RE.match(image_id))


class StoreLookups:
    """What every image store answers the same way, given `get` and `page` (see storage.py for the
    stores: this folder one, and a bucket for replicas)."""

    def get(self, image_id: str) -> ImageRecord:
        raise NotImplementedError

    def page(self, cursor: str | None, limit: int) -> tuple[list[ImageRecord], str | None]:
        raise NotImplementedError

    @staticmethod
    def _unknown(image_id: str) -> InputNotFoundError:
        shown = image_id if len(image_id) <= 80 else image_id[:80] + "..."
        return InputNotFoundError(
            f"no saved image with id {shown!r}; ids come from generate_image/edit_image results "
            f"(the uri imagegen://images/<id>)"
        )

    def resolve_uri(self, uri: str) -> ImageRecord:
        """The record behind `imagegen://images/{id}`."""
        if not isinstance(uri, str) or not uri.startswith(URI_PREFIX):
            raise InvalidRequestError(f"{str(uri)[:80]!r} is not an image URI; they look like {URI_PREFIX}<id>")
        return self.get(uri[len(URI_PREFIX) :].rstrip("/"))

    def recent(self, limit: int = 50) -> list[ImageRecord]:
        """The newest records first; reads only as many files as it returns (plus any skipped)."""
        return self.page(None, limit)[0]

    def lineage(self, image_id: str, max_depth: int = 4) -> list[ImageRecord]:
        """The image and up to max_depth ancestors (following parent_ids[0]), oldest first.

        Stops quietly at a parent that is gone or at a cycle: lineage is context, not a requirement.
        """
        chain = [self.get(image_id)]
        seen = {image_id}
        while len(chain) <= max_depth and chain[-1].parent_ids:
            parent = chain[-1].parent_ids[0]
            if parent in seen:
                break
            seen.add(parent)
            try:
                chain.append(self.get(parent))
            except InputNotFoundError:
                break
        chain.reverse()
        return chain


class ImageStore(StoreLookups):
    """Images in `output_dir`, records beside them; safe to use from several threads."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir).expanduser()
        self.meta_dir = self.output_dir / META_DIR_NAME
        self._lock = threading.Lock()
        self._last_ns = 0
        self._ready = False
        self.jobs = JobBook(self.meta_dir)
        self._live: LiveLock | None = None

    # --- the process's hold on the store -------------------------------------------------------

    def open_live(self) -> None:
        """Hold the store for this process's life and put right what a crash left (blocking)."""
        if self._live is not None:
            return
        self._live = LiveLock(self.meta_dir)
        try:
            recover(self.output_dir, self.meta_dir, alone=self._live.exclusive)
        except OSError:
            log.warning("could not look for leftovers of an unclean stop", exc_info=True)
        finally:
            self._live.share()

    def close_live(self) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None

    def check_room(self, need_bytes: int) -> None:
        """Refuse, before anything is sent (and paid for), a folder that cannot take the images."""
        self.judge_room(self.free_bytes(), need_bytes)

    def free_bytes(self) -> int | None:
        """Probe that both folders take a real write (root ignores permissions) and say how many
        bytes are free (None where the system cannot say). Blocking: run it through on_disk."""
        try:
            self.meta_dir.mkdir(parents=True, exist_ok=True)
            for folder in (self.output_dir, self.meta_dir):
                probe = folder / f".probe.{secrets.token_hex(4)}{TMP_SUFFIX}"
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                os.unlink(probe)
        except OSError as exc:
            raise self._not_writable(exc, before_sending=True) from None
        try:
            stat = os.statvfs(self.output_dir) if hasattr(os, "statvfs") else None
        except OSError:
            stat = None
        return stat.f_bavail * stat.f_frsize if stat is not None else None

    def judge_room(self, free: int | None, need_bytes: int) -> None:
        """Refuse a call that needs more room than `free_bytes` found."""
        if free is None:
            return
        # The hidden setting, when given, is the whole rule (for tests and tight machines).
        given = os.environ.get(MIN_FREE_ENV)
        try:
            need = int(float(given) * 1024 * 1024) if given else max(DEFAULT_MIN_FREE_MB * 1024 * 1024, need_bytes)
        except ValueError:
            need = max(DEFAULT_MIN_FREE_MB * 1024 * 1024, need_bytes)
        if free < need:
            raise ConfigError(
                f"output_dir {self.output_dir} has only {free // (1024 * 1024)} MiB free and this call needs "
                f"at least {need // (1024 * 1024)} MiB; nothing was sent to the gateway. Free some room, or "
                f"set output_dir in the configuration or {OUTPUT_DIR_ENV} to a folder with room"
            )

    # --- writing ---------------------------------------------------------------------------

    def _ensure_dirs(self) -> None:
        if self._ready:
            return
        try:
            self.meta_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.output_dir, os.W_OK | os.X_OK) or not os.access(self.meta_dir, os.W_OK | os.X_OK):
                raise PermissionError(13, "permission denied")
        except OSError as exc:
            raise self._not_writable(exc) from None
        self._ready = True

    def _not_writable(self, exc: OSError, before_sending: bool = False) -> ConfigError:
        nothing_sent = "nothing was sent to the gateway; " if before_sending else ""
        return ConfigError(
            f"output_dir {self.output_dir} is not writable: {exc.strerror or exc}; {nothing_sent}"
            f"set output_dir in the configuration or {OUTPUT_DIR_ENV} to a writable folder"
        )

    def _mtime_ns(self) -> int:
        # Strictly increasing, so recent() orders saves made within one clock tick correctly.
        with self._lock:
            self._last_ns = max(time.time_ns(), self._last_ns + 1)
            return self._last_ns

    @staticmethod
    def _write_atomic(final: Path, data: bytes, mtime_ns: int | None = None) -> None:
        """Temp file in the same folder, fsync, rename: the final name only ever holds whole data."""
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if mtime_ns is not None:
                os.utime(tmp, ns=(mtime_ns, mtime_ns))
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        # Makes the rename itself durable before the record that points at it is written.
        if os.name != "posix":
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def save(self, data: bytes, about: NewImage) -> ImageRecord:
        """Write the bytes as given (no re-encoding) and their record; returns the record."""
        ext = about.extension()
        self._ensure_dirs()
        image_id = secrets.token_urlsafe(16)
        now = datetime.now(UTC)
        path = self.output_dir / about.file_name(image_id[:6], now, ext)
        if path.exists():  # same second, prompt and id prefix: vanishingly rare, but never overwrite
            path = self.output_dir / about.file_name(image_id, now, ext)
        record = about.record(image_id, str(path), len(data), now)
        try:
            self._write_atomic(path, data)
            self._fsync_dir(self.output_dir)
            self._write_atomic(
                self.meta_dir / f"{image_id}.json", record.model_dump_json(indent=1, exclude={"url"}).encode("utf-8"), self._mtime_ns()
            )
        except OSError as exc:  # permissions, a full disk, a vanished folder: all stop saving
            raise self._not_writable(exc) from None
        return record

    # --- reading ---------------------------------------------------------------------------

    def _read_record(self, image_id: str) -> ImageRecord:
        try:
            raw = (self.meta_dir / f"{image_id}.json").read_bytes()
        except FileNotFoundError:
            raise self._unknown(image_id) from None
        except OSError as exc:
            raise InputNotFoundError(f"the record of image {image_id!r} cannot be read: {exc.strerror}") from None
        try:
            return ImageRecord.model_validate_json(raw)
        except ValidationError:
            raise InputNotFoundError(f"the record of image {image_id!r} is damaged and cannot be used") from None

    def get(self, image_id: str) -> ImageRecord:
        """The record of a saved image whose file is still there, if it is the caller's: another
        person's image is answered exactly as one that does not exist (owners.py)."""
        if not is_valid_id(image_id):  # checked before any path is built from it
            raise self._unknown(str(image_id))
        record = self._read_record(image_id)
        if record.owner != current_owner():
            raise self._unknown(image_id)
        if not Path(record.path).is_file():
            # The whole folder may have been moved: the file then sits beside its records.
            moved = self.output_dir / Path(record.path).name
            if moved.is_file():
                return record.model_copy(update={"path": str(moved)})
            raise InputNotFoundError(
                f"image {image_id!r} was saved at {record.path}, but that file was deleted or moved"
            )
        return record

    def read_bytes(self, image_id: str) -> tuple[bytes, str]:
        record = self.get(image_id)
        try:
            return Path(record.path).read_bytes(), record.mime_type
        except OSError as exc:
            raise InputNotFoundError(f"image {image_id!r} at {record.path} cannot be read: {exc.strerror}") from None

    def _stamped(self) -> list[tuple[int, str]]:
        """(record time in ns, id) of every record, newest first."""
        try:
            entries = [e for e in os.scandir(self.meta_dir) if e.name.endswith(".json")]
        except OSError:
            return []
        stamped: list[tuple[int, str]] = []
        for e in entries:
            image_id = e.name[: -len(".json")]
            if not is_valid_id(image_id):
                continue
            try:
                stamped.append((e.stat().st_mtime_ns, image_id))
            except OSError:
                continue
        stamped.sort(reverse=True)
        return stamped

    def page(self, cursor: str | None, limit: int) -> tuple[list[ImageRecord], str | None]:
        """One page of records, newest first, and the cursor of the next page (None after the last).

        A cursor names the last record handed out by its (record time, id), and a page starts
        strictly after it: images saved meanwhile sort before it, so paging never repeats or
        skips an image. Raises InvalidRequestError for a cursor this store did not make.
        """
        after = _decode_cursor(cursor) if cursor is not None else None
        if limit <= 0:
            return [], None
        out: list[ImageRecord] = []
        stamped = self._stamped()
        for i, key in enumerate(stamped):
            if after is not None and key >= after:
                continue
            try:
                out.append(self.get(key[1]))
            except InputNotFoundError:
                continue  # deleted or damaged: not something an agent can use
            if len(out) >= limit:
                return out, (_encode_cursor(key) if i + 1 < len(stamped) else None)
        return out, None

    def is_inside(self, path: str | os.PathLike[str]) -> bool:
        """Whether a path (after resolving `..` and symlinks) lies in the output directory."""
        try:
            return Path(path).resolve().is_relative_to(self.output_dir.resolve())
        except (OSError, RuntimeError, ValueError):
            return False
