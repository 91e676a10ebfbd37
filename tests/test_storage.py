"""Storage for a team: images and records in an S3 bucket (moto's S3 server, a real S3-protocol
server on loopback), job state and spend in Redis (Debian's redis-server), seen alike by every
service instance that shares them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client import Client

from mcp_imagegen.bucket_store import Bucket, BucketImageStore, BucketSpendBook
from mcp_imagegen.config import StorageSettings
from mcp_imagegen.errors import InputNotFoundError, InvalidRequestError
from mcp_imagegen.models import ImageRequest
from mcp_imagegen.owners import acting_as
from mcp_imagegen.server import build_server
from mcp_imagegen.service import ImageService
from mcp_imagegen.spending import today
from tests.conftest import SECRET_KEY, endpoint_for, make_settings
from tests.services import S3Server, redis_server, s3_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

REDIS_ENV = "MCP_IMAGEGEN_REDIS_URL"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Any:
    with s3_server(monkeypatch) as server:
        yield server


def storage_for(s3: S3Server) -> dict[str, Any]:
    return {"s3_bucket": s3.bucket, "s3_endpoint_url": s3.endpoint_url, "s3_region": "us-east-1"}


def offline_settings(tmp_path: Path, s3: S3Server | None, **fields: Any) -> Any:
    storage = storage_for(s3) if s3 is not None else {}
    return make_settings(tmp_path, [{"name": "offline", "provider": "offline"}], storage=storage, **fields)


def texts(result: Any) -> str:
    return "\n".join(getattr(b, "text", "") for b in result.content)


async def test_images_live_in_the_bucket_and_results_carry_links(tmp_path: Path, s3: S3Server) -> None:
    settings = offline_settings(tmp_path, s3)
    async with Client(build_server(settings)) as client:
        made = await client.call_tool("generate_image", {"prompt": "a bucket fox", "size": "48x48"})
        assert not made.is_error, texts(made)
        [image] = made.structured_content["images"]
        assert image["path"].startswith(f"s3://{s3.bucket}/mcp-imagegen/images/")
        read = await client.read_resource(image["uri"])
        # The presigned link serves the very bytes the resource holds, to a client without MCP resources.
        async with httpx2.AsyncClient(timeout=30) as http:
            linked = await http.get(image["url"])
        assert linked.status_code == 200
        import base64

        assert base64.b64decode(read.contents[0].blob) == linked.content

        edited = await client.call_tool("edit_image", {"prompt": "bluer", "images": image["uri"]})
        assert not edited.is_error, texts(edited)
        listed = {str(r.uri) for r in (await client.list_resources()).resources}
        assert {image["uri"], edited.structured_content["images"][0]["uri"]} <= listed
    # Nothing was written to the output folder: the bucket holds it all.
    assert not list((tmp_path / "out").glob("*.png"))
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket)["Contents"]}
    assert any(k.startswith("mcp-imagegen/records/") for k in keys)
    assert any(k.startswith("mcp-imagegen/jobs/") for k in keys)


async def test_bucket_listing_pages_per_owner_newest_first(tmp_path: Path, s3: S3Server) -> None:
    settings = offline_settings(tmp_path, s3)
    async with ImageService(settings) as service:
        made: dict[str, list[str]] = {"person-a": [], "person-b": []}
        for i in range(5):
            for owner in made:
                with acting_as(owner):
                    result = await service.generate(ImageRequest(operation="generate", prompt=f"{owner} {i}", size="16x16"))
                made[owner].append(result.images[0].id)
        store = service.store
        assert isinstance(store, BucketImageStore)
        with acting_as("person-a"):
            seen: list[str] = []
            cursor = None
            while True:
                page, cursor = await anyio.to_thread.run_sync(lambda c=cursor: store.page(c, 2))
                seen += [r.id for r in page]
                if cursor is None:
                    break
            assert seen == list(reversed(made["person-a"]))
            with pytest.raises(InputNotFoundError):
                store.get(made["person-b"][0])
            with pytest.raises(InvalidRequestError):
                store.page("not-a-cursor", 2)


def test_creates_never_overwrite_and_spend_adds_up_across_writers(s3: S3Server) -> None:
    storage = StorageSettings(**storage_for(s3))
    bucket = Bucket(storage)
    assert bucket.create(bucket.key("probe"), b"first", "text/plain")
    assert not bucket.create(bucket.key("probe"), b"second", "text/plain")
    assert bucket.read(bucket.key("probe"))[0] == b"first"

    # Eight writers at once, each through its own client, as eight replicas would.
    day = today()

    def add_ten() -> None:
        book = BucketSpendBook(Bucket(storage))
        for _ in range(10):
            book.add(day, "person-a", 0.01)

    writers = [threading.Thread(target=add_ten) for _ in range(8)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert BucketSpendBook(bucket).totals(day, "person-a") == (pytest.approx(0.8), pytest.approx(0.8))


async def test_a_job_in_redis_is_seen_by_another_instance(
    tmp_path: Path, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = emulator("openai", api_key=SECRET_KEY)
    with redis_server() as redis:
        monkeypatch.setenv(REDIS_ENV, redis.url)
        # Two instances sharing one image folder; their jobs are only in Redis.
        first = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
        second = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
        emu.hold()
        async with ImageService(second) as other:
            async with ImageService(first) as one:
                job = one.submit(ImageRequest(operation="generate", prompt="slow", model="gpt-image-1"))
                with anyio.fail_after(30):
                    while emu.in_flight < 1:
                        await anyio.sleep(0.02)
                seen = await other.find_job(job.id)
                assert seen.status == "running" and not seen.finished
                with acting_as("person-else"):
                    with pytest.raises(InputNotFoundError):
                        await other.find_job(job.id)
                emu.release()
                with anyio.fail_after(60):
                    await job.wait(None)
                done = await other.find_job(job.id)
                assert done.status == "done" and [i.id for i in done.saved] == [i.id for i in job.saved]
        assert not (tmp_path / "out" / ".mcp-imagegen" / "jobs").exists()


async def test_spend_in_redis_is_shared(tmp_path: Path, emulator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    emu = emulator("openai", api_key=SECRET_KEY)
    with redis_server() as redis:
        monkeypatch.setenv(REDIS_ENV, redis.url)
        settings = [
            make_settings(tmp_path / name, [endpoint_for(emu, key=SECRET_KEY)], spending={"person_usd_per_day": 0.05})
            for name in ("a", "b")
        ]
        async with ImageService(settings[0]) as one, ImageService(settings[1]) as other:
            with acting_as("person-a"):
                await one.generate(ImageRequest(operation="generate", prompt="one", model="gpt-image-1"))
                from mcp_imagegen.spending import SpendingLimitError

                with pytest.raises(SpendingLimitError):
                    await other.generate(ImageRequest(operation="generate", prompt="two", model="gpt-image-1"))
            assert other.spending.book.totals(today(), "person-a") == (pytest.approx(0.042), pytest.approx(0.042))
            assert other.spending.book.totals(today(), "nobody") == (0.0, pytest.approx(0.042))
