"""Images, their records, job records and spend in an S3-compatible bucket, shared by replicas.

Keys, under `[storage] s3_prefix`:
- `images/<stamp>_<slug>_<id6>.<ext>`: the image bytes, as the folder store names its files;
- `records/<id>.json`: the image's record (what `get` reads);
- `owners/<owner>/<newest-first stamp>_<id>`: an empty marker per image, so each person's
  listing is one ordered LIST of their own keys (no scan of everyone's records);
- `jobs/<job id>.json`, `spend/<day>.json`: job records and the spend book (without Redis).

Creates are atomic: every new object is put with `If-None-Match: *`, so two replicas can never
overwrite each other's image or record (a clash draws a new id). The spend book changes by
compare-and-swap (`If-Match` on its ETag). Records read back carry a fresh presigned link to the
image (`url`), for clients that cannot read MCP resources. Blocking calls: run them on_disk.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from .config import StorageSettings
from .errors import ConfigError, InputNotFoundError, InvalidRequestError
from .jobs import JobRecord, RemoteJobBookWrites, _valid_job_id
from .models import ImageRecord
from .owners import current_owner
from .spending import JsonSpendBook
from .store import NewImage, StoreLookups, is_valid_id

_NEWEST_FIRST = 10**20  # stamps are stored as this minus the time in ns, so keys sort newest first
_MARKER_RE = re.compile(r"^\d{20}_[A-Za-z0-9_-]{16,64}$")


def s3_client(storage: StorageSettings) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("[storage] s3_bucket needs boto3: pip install 'mcp-imagegen[team]'") from None
    return boto3.client(
        "s3",
        endpoint_url=storage.s3_endpoint_url,
        region_name=storage.s3_region,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, signature_version="s3v4"),
    )


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _missing(exc: Exception) -> bool:
    return _code(exc) in ("NoSuchKey", "404", "NotFound")


def _clashed(exc: Exception) -> bool:
    return _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class Bucket:
    """The few S3 calls the stores need, under one key prefix."""

    def __init__(self, storage: StorageSettings, client: Any | None = None) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self.errors: tuple[type[Exception], ...] = (ClientError, BotoCoreError)
        self.client = client or s3_client(storage)
        self.name = storage.s3_bucket or ""
        self.prefix = storage.s3_prefix
        self.presign_ttl_s = storage.presign_ttl_s

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def create(self, key: str, data: bytes, content_type: str) -> bool:
        """Put only if nothing is at `key`; False when something already is."""
        try:
            self.client.put_object(Bucket=self.name, Key=key, Body=data, ContentType=content_type, IfNoneMatch="*")
        except self.errors as exc:
            if _clashed(exc):
                return False
            raise
        return True

    def put(self, key: str, data: bytes, content_type: str, if_match: str | None = None) -> bool:
        """Put (replacing); with `if_match`, only over that version (False when it changed)."""
        extra = {"IfMatch": if_match} if if_match else {}
        try:
            self.client.put_object(Bucket=self.name, Key=key, Body=data, ContentType=content_type, **extra)
        except self.errors as exc:
            if if_match and _clashed(exc):
                return False
            raise
        return True

    def read(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, ETag), or None when nothing is at `key`."""
        try:
            answer = self.client.get_object(Bucket=self.name, Key=key)
        except self.errors as exc:
            if _missing(exc):
                return None
            raise
        return answer["Body"].read(), answer["ETag"]

    def names(self, prefix: str, start_after: str | None = None, limit: int = 1000) -> list[str]:
        params: dict[str, Any] = {"Bucket": self.name, "Prefix": prefix, "MaxKeys": limit}
        if start_after:
            params["StartAfter"] = start_after
        answer = self.client.list_objects_v2(**params)
        return [item["Key"] for item in answer.get("Contents", [])]

    def link(self, key: str) -> str:
        return str(
            self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.name, "Key": key}, ExpiresIn=self.presign_ttl_s
            )
        )


class BucketImageStore(StoreLookups):
    """The image store (the folder store's interface) over a bucket."""

    def __init__(self, storage: StorageSettings, jobs: Any | None = None, client: Any | None = None) -> None:
        self.bucket = Bucket(storage, client)
        self.jobs = jobs or BucketJobBook(self.bucket)
        self.where = f"s3://{self.bucket.name}/{self.bucket.prefix}"

    # Nothing to recover (puts are atomic) and no folder to fill.
    def open_live(self) -> None:
        try:
            self.bucket.client.head_bucket(Bucket=self.bucket.name)
        except self.bucket.errors as exc:
            raise ConfigError(f"[storage] s3_bucket {self.bucket.name!r} cannot be reached: {exc}") from None

    def close_live(self) -> None:
        return None

    def check_room(self, need_bytes: int) -> None:
        return None

    def free_bytes(self) -> int | None:
        return None  # a bucket has no room to run out of that the server could see

    def judge_room(self, free: int | None, need_bytes: int) -> None:
        return None

    def is_inside(self, path: Any) -> bool:
        return False  # no local file is ever one of this store's images

    def save(self, data: bytes, about: NewImage) -> ImageRecord:
        ext = about.extension()
        owner = about.owner or current_owner()
        try:
            while True:  # a clash on a fresh random id is all but impossible, but never overwrite
                now = datetime.now(UTC)
                image_id = secrets.token_urlsafe(16)
                image_key = self.bucket.key("images", about.file_name(image_id[:6], now, ext))
                if not self.bucket.create(image_key, data, about.mime_type):
                    continue
                record = about.record(image_id, f"s3://{self.bucket.name}/{image_key}", len(data), now)
                body = record.model_dump_json(indent=1, exclude={"url"}).encode()
                if not self.bucket.create(self.bucket.key("records", f"{image_id}.json"), body, "application/json"):
                    continue
                # The record is the truth; the marker only makes the owner's listing fast.
                stamp = _NEWEST_FIRST - int(now.timestamp() * 1e9)
                self.bucket.create(self._marker_prefix(owner) + f"{stamp:020d}_{image_id}", b"", "text/plain")
                return record.model_copy(update={"url": self.bucket.link(image_key)})
        except self.bucket.errors as exc:
            raise ConfigError(f"the image could not be saved to {self.where}: {exc}") from None

    def _marker_prefix(self, owner: str) -> str:
        return self.bucket.key("owners", owner) + "/"

    def _record(self, image_id: str) -> ImageRecord:
        try:
            found = self.bucket.read(self.bucket.key("records", f"{image_id}.json"))
        except self.bucket.errors as exc:
            raise InputNotFoundError(f"the record of image {image_id!r} cannot be read: {exc}") from None
        if found is None:
            raise self._unknown(image_id)
        try:
            return ImageRecord.model_validate_json(found[0])
        except ValidationError:
            raise InputNotFoundError(f"the record of image {image_id!r} is damaged and cannot be used") from None

    def _image_key(self, record: ImageRecord) -> str:
        return record.path.removeprefix(f"s3://{self.bucket.name}/")

    def get(self, image_id: str) -> ImageRecord:
        """The caller's image record with a fresh link; anyone else's is answered as unknown."""
        if not is_valid_id(image_id):
            raise self._unknown(str(image_id))
        record = self._record(image_id)
        if record.owner != current_owner():
            raise self._unknown(image_id)
        return record.model_copy(update={"url": self.bucket.link(self._image_key(record))})

    def read_bytes(self, image_id: str) -> tuple[bytes, str]:
        record = self.get(image_id)
        try:
            found = self.bucket.read(self._image_key(record))
        except self.bucket.errors as exc:
            raise InputNotFoundError(f"image {image_id!r} cannot be read from {self.where}: {exc}") from None
        if found is None:
            raise InputNotFoundError(f"image {image_id!r} was saved at {record.path}, but that object was deleted")
        return found[0], record.mime_type

    def page(self, cursor: str | None, limit: int) -> tuple[list[ImageRecord], str | None]:
        """The caller's records, newest first, from their markers; the cursor is the last marker."""
        prefix = self._marker_prefix(current_owner())
        after = prefix + _decode_cursor(cursor) if cursor is not None else None
        if limit <= 0:
            return [], None
        out: list[ImageRecord] = []
        while True:
            names = self.bucket.names(prefix, after, limit - len(out))
            if not names:
                return out, None
            for name in names:
                after = name
                try:
                    out.append(self.get(name[len(prefix) + 21 :]))  # the marker is <20-digit stamp>_<id>
                except InputNotFoundError:
                    continue
            if len(out) >= limit:
                more = self.bucket.names(prefix, after, 1)
                return out, (_encode_cursor(after[len(prefix) :]) if more else None)


def _encode_cursor(marker: str) -> str:
    return base64.urlsafe_b64encode(marker.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        marker = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        marker = ""
    if not _MARKER_RE.match(marker):
        raise InvalidRequestError(
            "invalid cursor: pass the nextCursor of the previous resources/list answer unchanged, "
            "or no cursor for the first page"
        )
    return marker


class BucketJobBook(RemoteJobBookWrites):
    """Job records in the bucket (without Redis). Liveness is by process on one host only."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    def write(self, record: JobRecord) -> None:
        self.bucket.put(
            self.bucket.key("jobs", f"{record.id}.json"), record.model_dump_json().encode(), "application/json"
        )

    def read(self, job_id: str) -> JobRecord | None:
        if not _valid_job_id(job_id):
            return None
        found = self.bucket.read(self.bucket.key("jobs", f"{job_id}.json"))
        if found is None:
            return None
        try:
            return JobRecord.model_validate_json(found[0])
        except ValidationError:
            return None

    def running(self) -> list[JobRecord]:
        return []  # nothing to put right at start: a bucket holds no half-written files

    def alive(self, record: JobRecord) -> bool:
        return record.owner_alive()


class BucketSpendBook(JsonSpendBook):
    """The spend book as one object per day, changed by compare-and-swap on its ETag."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    def _key(self, day: str) -> str:
        return self.bucket.key("spend", f"{day}.json")

    def _read(self, day: str) -> dict[str, Any]:
        found = self.bucket.read(self._key(day))
        return dict(json.loads(found[0])) if found else {}

    def _change(self, day: str, change: Any) -> Any:
        for _ in range(100):  # another replica changed it in between: read again and retry
            found = self.bucket.read(self._key(day))
            book = json.loads(found[0]) if found else {}
            answer = change(book)
            body = json.dumps(book, sort_keys=True).encode()
            if found is None:
                if self.bucket.create(self._key(day), body, "application/json"):
                    return answer
            elif self.bucket.put(self._key(day), body, "application/json", if_match=found[1]):
                return answer
        raise ConfigError(f"the spend book {self._key(day)} kept changing under this server; try again")
