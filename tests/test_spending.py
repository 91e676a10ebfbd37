"""Spending limits: estimated before a call, checked before the gateway sees anything, recorded
per person (the gateway's own cost where it reports one) in a book that outlives the process."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from mcp_imagegen.config import SpendingSettings
from mcp_imagegen.models import ImageRequest
from mcp_imagegen.owners import LOCAL_OWNER, acting_as
from mcp_imagegen.service import ImageService
from mcp_imagegen.spending import (
    SERVER_TOTAL,
    FolderSpendBook,
    Settle,
    Spending,
    SpendingLimitError,
    estimate,
    price_table,
    today,
)
from tests.conftest import SECRET_KEY, endpoint_for, make_settings

pytestmark = pytest.mark.anyio

PAID_PATHS = ("/images/generations", "/images/edits")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def paid_requests(emu: Any) -> list[Any]:
    return [r for path in PAID_PATHS for r in emu.requests_to(path)]


def spend_book(tmp_path: Path) -> dict[str, float]:
    """What the day's book records as spent; no call is left holding money once all have ended."""
    book = json.loads((tmp_path / "out" / ".mcp-imagegen" / "spend" / f"{today()}.json").read_text())
    assert book["holds"] == {}
    return dict(book["spent"])


def test_every_price_is_a_sourced_estimate_and_families_match_their_models() -> None:
    for price in price_table():
        re.compile(price.pattern)
        assert price.usd_per_image > 0 and price.source
    assert estimate("gpt-image-1-mini", "openai", 1, 0.1).usd_per_image == 0.011
    assert estimate("gpt-image-2", "openai", 3, 0.1).usd == pytest.approx(3 * 0.042)
    assert estimate("gemini-2.5-flash-image", "ai-nebula", 1, 0.1).usd_per_image == 0.039
    assert estimate("flux-1-schnell", "nano-gpt", 1, 0.1).usd_per_image == 0.003
    listed = estimate("gpt-image-1", "nano-gpt", 2, 0.1, listed_usd=0.02)
    assert listed.usd == 0.04 and "nano-gpt lists" in listed.source
    unknown = estimate("acme-diffusion-9", "openai-compatible", 2, 0.25)
    assert unknown.usd == 0.5 and "unpriced_image_usd" in unknown.source
    assert estimate("anything", "offline", 4, 0.25).usd == 0


async def test_a_person_over_the_limit_is_refused_before_the_gateway_sees_anything(
    tmp_path: Path, emulator: Any
) -> None:
    emu = emulator("openai", api_key=SECRET_KEY)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)], spending={"person_usd_per_day": 0.05})
    async with ImageService(settings) as service:
        with pytest.raises(SpendingLimitError) as refused:
            await service.generate(ImageRequest(operation="generate", prompt="two foxes", model="gpt-image-2", n=2))
        said = refused.value.agent_text()
        assert "$0.05 is left" in said and "estimated at $0.08" in said and "Nothing was sent" in said
        assert "at most 1 image" in said and "OpenAI list price" in said
        assert paid_requests(emu) == []

        # One image fits; it is recorded, and then nothing is left for another.
        await service.generate(ImageRequest(operation="generate", prompt="one fox", model="gpt-image-2"))
        assert len(paid_requests(emu)) == 1
        with pytest.raises(SpendingLimitError) as again:
            await service.generate(ImageRequest(operation="generate", prompt="one more", model="gpt-image-2"))
        assert "$0.01 is left" in again.value.agent_text()
        assert len(paid_requests(emu)) == 1
    assert spend_book(tmp_path) == {LOCAL_OWNER: 0.042, SERVER_TOTAL: 0.042}


async def test_the_gateways_own_cost_is_recorded_and_outlives_the_process(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("nano-gpt", api_key=SECRET_KEY)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)], spending={"person_usd_per_day": 5.0})
    async with ImageService(settings) as service:
        with acting_as("person-alice"):
            result = await service.generate(ImageRequest(operation="generate", prompt="x", model="hidream", n=2))
    assert result.cost is not None and result.cost > 0
    book = spend_book(tmp_path)
    assert book["person-alice"] == pytest.approx(result.cost) and book[SERVER_TOTAL] == pytest.approx(result.cost)

    # A restarted server reads the book: Alice's limit now leaves less than one more image at the
    # price nano-gpt lists for the model ($0.01), which the estimate uses over the price table.
    tight = make_settings(
        tmp_path, [endpoint_for(emu, key=SECRET_KEY)], spending={"person_usd_per_day": result.cost + 0.006}
    )
    sent_before = len(paid_requests(emu))
    async with ImageService(tight) as service:
        with acting_as("person-alice"), pytest.raises(SpendingLimitError) as refused:
            await service.generate(ImageRequest(operation="generate", prompt="y", model="hidream"))
        said = refused.value.agent_text()
        assert (
            "$0.01 is left" in said and "estimated at $0.01" in said and "the price nano-gpt lists for hidream" in said
        )
        with acting_as("person-bob"):  # someone else's day is their own
            await service.generate(ImageRequest(operation="generate", prompt="z", model="hidream"))
    assert len(paid_requests(emu)) == sent_before + 1


async def test_the_server_limit_covers_everyone_together(tmp_path: Path, emulator: Any) -> None:
    emu = emulator("openai", api_key=SECRET_KEY)
    settings = make_settings(
        tmp_path,
        [endpoint_for(emu, key=SECRET_KEY)],
        spending={"person_usd_per_day": 1.0, "server_usd_per_day": 0.10},
    )
    async with ImageService(settings) as service:
        with acting_as("person-alice"):
            await service.generate(ImageRequest(operation="generate", prompt="a", model="gpt-image-2", n=2))
        with acting_as("person-bob"), pytest.raises(SpendingLimitError) as refused:
            await service.generate(ImageRequest(operation="generate", prompt="b", model="gpt-image-2"))
    said = refused.value.agent_text()
    assert "this server's daily spending limit of $0.10" in said and "$0.02 is left" in said
    assert len(paid_requests(emu)) == 1  # Alice's one call (two images in one request)


class GatedBook(FolderSpendBook):
    """A folder book whose first settle waits until the test lets it go, and that counts its trips."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.holds: list[str] = []
        self.trips: list[int] = []

    def hold(self, day: str, owner: str, hold_id: str, usd: float, *limits: float | None) -> tuple[bool, float, float]:
        self.holds.append(hold_id)
        return super().hold(day, owner, hold_id, usd, *limits)

    def settle(self, day: str, settles: Sequence[Settle]) -> None:
        self.trips.append(len(settles))
        self.entered.set()
        assert self.release.wait(timeout=30)
        super().settle(day, settles)


def ended_job(number: int, owner: str) -> Any:
    """What `Spending.hold` reads of a job: its owner, id, request and what it delivered."""
    return SimpleNamespace(
        id=f"job_{number:08d}", owner=owner, request=SimpleNamespace(n=1), cost=None, saved=["an image"]
    )


async def spend(spending: Spending, job: Any) -> None:
    async with spending.hold(job, "gpt-image-2", "openai"):
        pass


async def test_without_limits_nothing_is_held_and_calls_ending_together_share_one_trip(tmp_path: Path) -> None:
    book = GatedBook(tmp_path / "meta")
    spending = Spending(SpendingSettings(), book)
    price = estimate("gpt-image-2", "openai", 1, 0.1).usd
    async with anyio.create_task_group() as tg:
        tg.start_soon(spend, spending, ended_job(0, "person-a"))
        await anyio.to_thread.run_sync(lambda: book.entered.wait(timeout=30))
        # The first call's settle is at the book; seven more end meanwhile and wait for the next trip.
        for number in range(1, 8):
            tg.start_soon(spend, spending, ended_job(number, "person-a" if number % 2 else "person-b"))
        await wait_all_tasks_blocked()
        book.release.set()
    assert book.holds == []  # no limit to check against: nothing was held
    assert book.trips == [1, 7]
    assert book.totals(today(), "person-a") == (pytest.approx(5 * price), pytest.approx(8 * price))
    assert book.totals(today(), "person-b") == (pytest.approx(3 * price), pytest.approx(8 * price))


async def test_with_a_limit_each_call_is_held_and_its_hold_let_go(tmp_path: Path) -> None:
    book = GatedBook(tmp_path / "meta")
    book.release.set()
    spending = Spending(SpendingSettings(server_usd_per_day=1.0), book)
    async with anyio.create_task_group() as tg:
        for number in range(3):
            tg.start_soon(spend, spending, ended_job(number, "person-a"))
    assert sorted(book.holds) == ["job_00000000", "job_00000001", "job_00000002"]
    assert sum(book.trips) == 3
    assert json.loads((tmp_path / "meta" / "spend" / f"{today()}.json").read_text())["holds"] == {}
