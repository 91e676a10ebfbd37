"""Saved images and their metadata; resource URIs.

Each image is a file a person can find by eye (`20260121-143005_a-red-fox_Ab3xY9.png`) in the
output directory, and a JSON record in `<output_dir>/.mcp-imagegen/<id>.json`. The record is written
only after the image is safely on disk, so a record always points at a whole image: a crash in
between leaves an unrecorded file (still visible to the person) and never a record of a bad one.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
import unicodedata
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config import OUTPUT_DIR_ENV
from .errors import ConfigError, InputNotFoundError, InvalidRequestError
from .models import ImageRecord, Origin

URI_PREFIX = "imagegen://images/"
META_DIR_NAME = ".mcp-imagegen"
TMP_SUFFIX = ".mcpimg-partial"  # half-written files end with this; swept when an hour old
_SWEEP_AGE_S = 3600.0
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


def is_valid_id(image_id: str) -> bool:
    return isinstance(image_id, str) and bool(_ID_RE.match(image_id))


class ImageStore:
    """Images in `output_dir`, records beside them; safe to use from several threads."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir).expanduser()
        self.meta_dir = self.output_dir / META_DIR_NAME
        self._lock = threading.Lock()
        self._last_ns = 0
        self._ready = False
        self._sweep()

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

    def _not_writable(self, exc: OSError) -> ConfigError:
        return ConfigError(
            f"output_dir {self.output_dir} is not writable: {exc.strerror or exc}; "
            f"set output_dir in the configuration or {OUTPUT_DIR_ENV}"
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

    def save(
        self,
        data: bytes,
        *,
        mime_type: str,
        width: int,
        height: int,
        prompt: str,
        operation: Origin,
        model: str,
        endpoint: str,
        provider: str,
        parameters: dict[str, Any] | None = None,
        parent_ids: list[str] | None = None,
        revised_prompt: str | None = None,
        job_id: str | None = None,
    ) -> ImageRecord:
        """Write the bytes as given (no re-encoding) and their record; returns the record."""
        from .images import EXTENSIONS  # Pillow loads on the first save, not at start-up

        ext = EXTENSIONS.get(mime_type)
        if ext is None:
            raise InvalidRequestError(f"cannot save an image of type {mime_type!r}")
        self._ensure_dirs()
        image_id = secrets.token_urlsafe(16)
        now = datetime.now(UTC)
        stamp = now.astimezone().strftime("%Y%m%d-%H%M%S")  # local time: what a person expects
        slug = _slug(prompt)
        path = self.output_dir / f"{stamp}_{slug}_{image_id[:6]}.{ext}"
        if path.exists():  # same second, prompt and id prefix: vanishingly rare, but never overwrite
            path = self.output_dir / f"{stamp}_{slug}_{image_id}.{ext}"
        record = ImageRecord(
            id=image_id,
            uri=URI_PREFIX + image_id,
            path=str(path),
            mime_type=mime_type,
            width=width,
            height=height,
            bytes=len(data),
            revised_prompt=revised_prompt,
            prompt=prompt,
            operation=operation,
            model=model,
            endpoint=endpoint,
            provider=provider,
            parameters=dict(parameters or {}),
            parent_ids=list(parent_ids or []),
            created_at=now.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            job_id=job_id,
        )
        try:
            self._write_atomic(path, data)
            self._fsync_dir(self.output_dir)
            self._write_atomic(
                self.meta_dir / f"{image_id}.json", record.model_dump_json(indent=1).encode("utf-8"), self._mtime_ns()
            )
        except OSError as exc:  # permissions, a full disk, a vanished folder: all stop saving
            raise self._not_writable(exc) from None
        return record

    def _sweep(self) -> None:
        """Remove temp files that a crash left behind; young ones may belong to a live writer."""
        cutoff = time.time() - _SWEEP_AGE_S
        for folder in (self.output_dir, self.meta_dir):
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if not entry.name.endswith(TMP_SUFFIX):
                    continue
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                except OSError:
                    pass

    # --- reading ---------------------------------------------------------------------------

    @staticmethod
    def _unknown(image_id: str) -> InputNotFoundError:
        shown = image_id if len(image_id) <= 80 else image_id[:80] + "..."
        return InputNotFoundError(
            f"no saved image with id {shown!r}; ids come from generate_image/edit_image results "
            f"(the uri imagegen://images/<id>)"
        )

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
        """The record of a saved image whose file is still there."""
        if not is_valid_id(image_id):  # checked before any path is built from it
            raise self._unknown(str(image_id))
        record = self._read_record(image_id)
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

    def resolve_uri(self, uri: str) -> ImageRecord:
        """The record behind `imagegen://images/{id}`."""
        if not isinstance(uri, str) or not uri.startswith(URI_PREFIX):
            raise InvalidRequestError(f"{str(uri)[:80]!r} is not an image URI; they look like {URI_PREFIX}<id>")
        return self.get(uri[len(URI_PREFIX) :].rstrip("/"))

    def recent(self, limit: int = 50) -> list[ImageRecord]:
        """The newest records first; reads only as many files as it returns (plus any skipped)."""
        if limit <= 0:
            return []
        try:
            entries = [e for e in os.scandir(self.meta_dir) if e.name.endswith(".json")]
        except OSError:
            return []
        stamped: list[tuple[int, str, str]] = []
        for e in entries:
            try:
                stamped.append((e.stat().st_mtime_ns, e.name, e.name[: -len(".json")]))
            except OSError:
                continue
        stamped.sort(reverse=True)
        out: list[ImageRecord] = []
        for _, _, image_id in stamped:
            if not is_valid_id(image_id):
                continue
            try:
                out.append(self.get(image_id))
            except InputNotFoundError:
                continue  # deleted or damaged: not something an agent can use
            if len(out) >= limit:
                break
        return out

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

    def is_inside(self, path: str | os.PathLike[str]) -> bool:
        """Whether a path (after resolving `..` and symlinks) lies in the output directory."""
        try:
            return Path(path).resolve().is_relative_to(self.output_dir.resolve())
        except (OSError, RuntimeError, ValueError):
            return False
