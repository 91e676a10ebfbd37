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
from mcp_imagegen.spending import SpendingLimitError, today
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
                    result = await service.generate(
                        ImageRequest(operation="generate", prompt=f"{owner} {i}", size="16x16")
                    )
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


def test_creates_never_overwrite(s3: S3Server) -> None:
    bucket = Bucket(StorageSettings(**storage_for(s3)))
    assert bucket.create(bucket.key("probe"), b"first", "text/plain")
    assert not bucket.create(bucket.key("probe"), b"second", "text/plain")
    assert bucket.read(bucket.key("probe"))[0] == b"first"


@pytest.mark.parametrize("backend", ["folder", "bucket", "redis"])
def test_holds_from_many_replicas_at_once_never_pass_a_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """Eight writers, each with its own client as eight replicas would have, try to hold $0.10
    against a $0.50 limit at the same moment: exactly five get it, and what they settle adds up."""
    from contextlib import ExitStack

    from mcp_imagegen.shared_state import RedisSpendBook, redis_client
    from mcp_imagegen.spending import FolderSpendBook, Settle

    with ExitStack() as stack:
        if backend == "bucket":
            storage = StorageSettings(**storage_for(stack.enter_context(s3_server(monkeypatch))))
            make_book: Any = lambda: BucketSpendBook(Bucket(storage))  # noqa: E731
        elif backend == "redis":
            url = stack.enter_context(redis_server()).url
            make_book = lambda: RedisSpendBook(redis_client(url))  # noqa: E731
        else:
            make_book = lambda: FolderSpendBook(tmp_path / "meta")  # noqa: E731
        day = today()
        books = [make_book() for _ in range(8)]
        start = threading.Barrier(8)
        held: list[bool] = []

        def writer(i: int) -> None:
            start.wait(timeout=60)
            ok, _, _ = books[i].hold(day, "person-a", f"job_{i:08d}", 0.10, 0.50, None)
            held.append(ok)
            if ok:
                books[i].settle(day, [Settle("person-a", f"job_{i:08d}", 0.10)])

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(held) == [False] * 3 + [True] * 5
        assert books[0].totals(day, "person-a") == (pytest.approx(0.5), pytest.approx(0.5))
        # All settled: nothing is held any more, so the limit is exactly used up.
        assert books[0].hold(day, "person-a", "job_late0000", 0.01, 0.50, None)[0] is False
        assert books[0].hold(day, "person-b", "job_other000", 0.01, 0.50, None)[0] is True


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
                job = one.submit(ImageRequest(operation="generate", prompt="slow", model="gpt-image-2"))
                await one.recorded(job)  # as before its id leaves in a "running" result or a task
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
                await one.generate(ImageRequest(operation="generate", prompt="one", model="gpt-image-2"))
                with pytest.raises(SpendingLimitError):
                    await other.generate(ImageRequest(operation="generate", prompt="two", model="gpt-image-2"))
            assert other.spending.book.totals(today(), "person-a") == (pytest.approx(0.042), pytest.approx(0.042))
            assert other.spending.book.totals(today(), "nobody") == (0.0, pytest.approx(0.042))

            # A call still running on one instance holds its estimate against the limit on the other.
            emu.hold()
            with acting_as("person-c"):
                running = one.submit(ImageRequest(operation="generate", prompt="held", model="gpt-image-2"))
                with anyio.fail_after(30):
                    while emu.in_flight < 1:
                        await anyio.sleep(0.02)
                with pytest.raises(SpendingLimitError) as refused:
                    await other.generate(ImageRequest(operation="generate", prompt="also", model="gpt-image-2"))
                assert "after the calls still running" in refused.value.agent_text()
                emu.release()
                with anyio.fail_after(60):
                    await running.wait(None)


def test_both_stores_take_the_same_save_arguments() -> None:
    # The engine calls `save` the same way whichever store is configured: a field one store
    # records and the other does not know would fail only where that store is used.
    import inspect

    from mcp_imagegen.bucket_store import BucketImageStore
    from mcp_imagegen.store import ImageStore

    def shape(method: object) -> list[tuple[str, object]]:
        return [(p.name, p.kind) for p in inspect.signature(method).parameters.values()]  # type: ignore[arg-type]

    assert shape(BucketImageStore.save) == shape(ImageStore.save)
    # ...and every other method the engine calls on its store exists on both.
    engine_calls = {"check_room", "free_bytes", "judge_room", "open_live", "close_live", "is_inside", "save"}
    for name in engine_calls:
        assert callable(getattr(BucketImageStore, name, None)), name
        assert shape(getattr(BucketImageStore, name)) == shape(getattr(ImageStore, name)), name
