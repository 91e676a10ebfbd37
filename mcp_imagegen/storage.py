"""Where images, records, jobs and spend live: chosen once from `[storage]`.

| configured | images and records | job records | spend |
|---|---|---|---|
| nothing (one server) | output folder (store.py) | output folder (jobs.py) | output folder (spending.py) |
| `s3_bucket` | the bucket (bucket_store.py) | the bucket | the bucket |
| the Redis variable set | as above | Redis (shared_state.py) | Redis |

Every store answers the same interface (store.py's `ImageStore`: save, get, read_bytes, page,
resolve_uri, recent, lineage, check_room, open_live/close_live, and `jobs`), so the rest of the
server does not know which one it has. Several replicas need the bucket (or one folder they all
mount) for images, and Redis for jobs, so any replica can answer any request.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .config import Settings
from .spending import FolderSpendBook, SpendBook
from .store import ImageStore


def open_storage(settings: Settings) -> tuple[Any, SpendBook]:
    """The image store (with its job book) and the spend book the settings ask for."""
    storage = settings.storage
    redis_url = os.environ.get(storage.redis_url_env, "").strip()
    shared = None
    if redis_url:
        from .shared_state import RedisJobBook, RedisSpendBook, redis_client

        client = redis_client(redis_url)
        shared = (RedisJobBook(client), RedisSpendBook(client))
    if storage.s3_bucket:
        from .bucket_store import BucketImageStore, BucketSpendBook

        store: Any = BucketImageStore(storage, jobs=shared[0] if shared else None)
        return store, shared[1] if shared else BucketSpendBook(store.bucket)
    store = ImageStore(settings.output_dir)
    if shared:
        store.jobs = shared[0]
        return store, shared[1]
    return store, FolderSpendBook(store.meta_dir)


@asynccontextmanager
async def keeping_alive(jobs: Any, job_id: str) -> AsyncIterator[None]:
    """While a job runs, keep whatever tells other replicas it is alive (a Redis lease)."""
    keep = getattr(jobs, "keeping_alive", None)
    if keep is None:  # on one machine the process itself is the proof of life
        yield
        return
    async with keep(job_id):
        yield


def job_alive(jobs: Any, record: Any) -> bool:
    alive = getattr(jobs, "alive", None)
    return bool(alive(record)) if alive is not None else bool(record.owner_alive())
