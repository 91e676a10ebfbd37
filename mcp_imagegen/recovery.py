"""What a crash leaves in the output folder, put right at start; and bytes a failed save keeps.

At start (`open_store`): whole `.mcpimg-partial` files become what they were being written as
(an image, an image record, a job record), torn ones are removed, and image files this server
named but never recorded (a kill between the image and its record) are adopted with a record.

Several server processes may share one output folder (each stdio host session starts one), and
a live writer's temp file must not be touched. Every process holds a shared lock on
`.mcp-imagegen/live.lock` while it runs; the one that finds no other holder (an exclusive lock
succeeds) knows every leftover is from a dead process and recovers all of it at once. Otherwise
only leftovers older than `BUSY_MIN_AGE_S` are touched. (Windows has no flock here: age only.)

When a save fails anyway (disk filled since the check, folder removed), the image's bytes go to
a recovery folder in the user's state area (or the temporary folder), named in the error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from .models import ImageRecord

log = logging.getLogger("mcp_imagegen.recovery")

LOCK_NAME = "live.lock"
BUSY_MIN_AGE_S = 600.0  # with other live processes: a writer never holds a leftover this long
RECOVERED_DIR_NAME = "recovered"
# What store.save names files: 20260121-143005_a-red-fox_Ab3xY9.png (or the whole id).
_IMAGE_NAME = re.compile(r"^(\d{8}-\d{6})_([a-z0-9-]+)_([A-Za-z0-9_-]{6,64})\.(png|jpg|webp|gif)$")
_MIME = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}


@dataclass
class Recovered:
    partials_restored: int = 0
    partials_removed: int = 0
    adopted: int = 0

    def __bool__(self) -> bool:
        return bool(self.partials_restored or self.partials_removed or self.adopted)


class LiveLock:
    """This process's shared hold on the store; `exclusive` tells whether it was alone at start."""

    def __init__(self, meta_dir: Path) -> None:
        self._file: IO[bytes] | None = None
        self.exclusive = False
        try:
            import fcntl
        except ImportError:  # Windows: no lock, recovery by age only
            return
        try:
            meta_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(meta_dir / LOCK_NAME, "ab")  # noqa: SIM115 - held for the process's life
        except OSError:
            return  # a read-only folder: nothing to recover into anyway
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.exclusive = True
        except OSError:
            fcntl.flock(self._file, fcntl.LOCK_SH)

    def share(self) -> None:
        """Let other processes in (after recovery)."""
        if self._file is not None and self.exclusive:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_SH)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def recover(output_dir: Path, meta_dir: Path, *, alone: bool) -> Recovered:
    """Put right what dead processes left; with `alone` False only touch old leftovers."""
    from .store import TMP_SUFFIX

    done = Recovered()
    min_age = 0.0 if alone else BUSY_MIN_AGE_S
    now = time.time()
    jobs_dir = meta_dir / "jobs"
    for folder in (output_dir, meta_dir, jobs_dir):
        for entry in _entries(folder):
            if not entry.name.endswith(TMP_SUFFIX) or not _old_enough(entry, now, min_age):
                continue
            final = _final_name(entry.name, TMP_SUFFIX)
            whole = final is not None and _is_whole(Path(entry.path), folder is output_dir)
            target = folder / final if final else None
            try:
                if whole and target is not None and not target.exists():
                    os.replace(entry.path, target)
                    done.partials_restored += 1
                else:
                    os.unlink(entry.path)
                    done.partials_removed += 1
            except OSError:
                continue
    done.adopted = _adopt_unrecorded(output_dir, meta_dir, now, min_age)
    if done:
        log.warning(
            "recovered after an unclean stop: %d partial file(s) completed, %d torn one(s) removed, "
            "%d unrecorded image(s) adopted",
            done.partials_restored,
            done.partials_removed,
            done.adopted,
        )
    return done


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        return [e for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    except OSError:
        return []


def _old_enough(entry: os.DirEntry[str], now: float, min_age: float) -> bool:
    if min_age <= 0:
        return True
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime >= min_age
    except OSError:
        return False


def _final_name(partial: str, suffix: str) -> str | None:
    """`.NAME.1a2b3c4d.mcpimg-partial` -> `NAME` (see store.ImageStore._write_atomic)."""
    stem = partial[: -len(suffix)]
    if not stem.startswith(".") or len(stem) < 11 or stem[-9] != ".":
        return None
    name = stem[1:-9]
    return name if name and "/" not in name and name not in (".", "..") else None


def _is_whole(path: Path, is_image: bool) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if not data:
        return False
    if not is_image:  # a record: whole when it parses
        try:
            json.loads(data)
        except ValueError:
            return False
        return True
    from . import images

    try:
        images.sniff(data, source=path.name, verify=True)
    except Exception:
        return False
    return True


def _adopt_unrecorded(output_dir: Path, meta_dir: Path, now: float, min_age: float) -> int:
    """Records for image files this server named but never recorded; no record file is read."""
    try:
        ids = [e.name[: -len(".json")] for e in os.scandir(meta_dir) if e.name.endswith(".json")]
    except OSError:
        ids = []
    full = set(ids)
    prefixes = {i[:6] for i in ids}
    adopted = 0
    for entry in _entries(output_dir):
        match = _IMAGE_NAME.match(entry.name)
        if match is None or not _old_enough(entry, now, min_age):
            continue
        stamp, slug, tag, ext = match.groups()
        if (len(tag) == 6 and tag in prefixes) or tag in full:
            continue
        if _adopt(Path(entry.path), meta_dir, slug, tag, ext):
            adopted += 1
    return adopted


def _adopt(path: Path, meta_dir: Path, slug: str, tag: str, ext: str) -> bool:
    from . import images
    from .store import URI_PREFIX, ImageStore

    try:
        data = path.read_bytes()
        mime, width, height = images.sniff(data, source=path.name, verify=True)
        mtime = path.stat().st_mtime
    except Exception:
        return False  # torn or not an image: left alone for the person to look at
    # The record's id must keep the file name's id part, or the next start would adopt it again.
    image_id = tag if len(tag) > 6 else tag + secrets.token_urlsafe(12)
    record = ImageRecord(
        id=image_id,
        uri=URI_PREFIX + image_id,
        path=str(path),
        mime_type=mime,
        width=width,
        height=height,
        bytes=len(data),
        prompt=slug.replace("-", " "),
        operation="generate",
        model="unknown",
        endpoint="unknown",
        provider="unknown",
        parameters={"recovered": "its record was lost in a crash; prompt rebuilt from the file name"},
        created_at=datetime.fromtimestamp(mtime, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        job_id=None,
    )
    try:
        ImageStore._write_atomic(meta_dir / f"{image_id}.json", record.model_dump_json(indent=1).encode("utf-8"))
    except (OSError, ValidationError):
        return False
    return True


# --- bytes of a failed save ------------------------------------------------------------------------


def recovery_folders() -> list[Path]:
    """Where unsaved images go: the user's state folder first, the temporary folder second."""
    from .config import user_state_dir

    return [
        user_state_dir() / RECOVERED_DIR_NAME,
        Path(tempfile.gettempdir()) / f"mcp-imagegen-{RECOVERED_DIR_NAME}",
    ]


def keep_unsaved(data: bytes, file_name: str, record: dict[str, Any]) -> Path | None:
    """Write the bytes (and what made them) somewhere else; the path, or None if nowhere worked."""
    for folder in recovery_folders():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / file_name
            with open(target, "xb") as f:
                f.write(data)
            (folder / f"{file_name}.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
            return target
        except OSError:
            continue
    return None
