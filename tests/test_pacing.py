"""The adaptive in-flight limit: its decisions driven step by step with a clock of the test's own,
then the gateway client against a real emulator that takes only a few requests at a time."""

from __future__ import annotations

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from pydantic import SecretStr

from mcp_imagegen.config import EndpointConfig
from mcp_imagegen.dialects import WireRequest
from mcp_imagegen.errors import RateLimitedError
from mcp_imagegen.gateway import GatewayClient
from mcp_imagegen.manifests import Manifest, load_manifest
from mcp_imagegen.pacing import MOST, START, AdaptiveLimit, Permit
from tests.emulators import Emulator, Fault
from tests.emulators.modelmax import IMAGE_MODELS as MODELMAX_MODELS

KEY = "sk-test-pacing-0001"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def take(limit: AdaptiveLimit, count: int) -> list[Permit]:
    permits = [limit.try_acquire() for _ in range(count)]
    assert all(p is not None for p in permits)
    return [p for p in permits if p is not None]


def answer(limit: AdaptiveLimit, permit: Permit, outcome: str = "ok", retry_after_s: float | None = None) -> bool:
    limit.release(permit)
    return limit.observe(permit, outcome, retry_after_s)  # type: ignore[arg-type]


# --- decisions ---------------------------------------------------------------------------------


def test_starts_generous_and_stops_at_the_limit() -> None:
    limit = AdaptiveLimit()
    assert limit.limit == START
    take(limit, START)
    assert limit.try_acquire() is None


def test_a_ceiling_the_user_set_is_the_start_and_never_exceeded() -> None:
    limit = AdaptiveLimit(3)
    for _ in range(50):  # full windows of answers, each of which would otherwise grow the limit
        for permit in take(limit, 3):
            answer(limit, permit)
    assert limit.limit == 3
    take(limit, 3)
    assert limit.try_acquire() is None


def test_without_a_ceiling_growth_stops_at_most() -> None:
    limit = AdaptiveLimit(start=MOST - 1)
    for _ in range(10):
        for permit in take(limit, int(limit.limit)):
            answer(limit, permit)
    assert limit.limit == MOST


def test_answers_grow_the_limit_only_when_it_was_used() -> None:
    limit = AdaptiveLimit(start=8)
    for _ in range(20):  # one request at a time: the limit of 8 was never the constraint
        answer(limit, take(limit, 1)[0])
    assert limit.limit == 8

    permits = take(limit, 8)  # the eighth took the last place: the limit was used
    for permit in permits:
        answer(limit, permit)
    assert limit.limit == pytest.approx(9)  # additive: one place per full window


def test_a_429_halves_what_was_in_flight_once_per_round() -> None:
    limit = AdaptiveLimit()
    permits = take(limit, 16)  # far below the nominal 64
    for permit in permits[4:]:  # the gateway took four and refused the rest
        assert answer(limit, permit, "slow_down") is True  # all were sent above the new limit
    assert limit.limit == 8  # half of the 16 in flight, not of 64; the 11 echoes change nothing
    assert limit.round == 1
    for permit in permits[:4]:
        answer(limit, permit)

    permits = take(limit, 8)  # the next round is over the gateway's four again
    answer(limit, permits[-1], "slow_down")
    assert limit.limit == 4
    assert limit.round == 2


def test_the_limit_never_drops_below_one_and_a_429_at_one_is_not_the_servers_overreach() -> None:
    limit = AdaptiveLimit(start=2)
    for _ in range(5):
        answer(limit, take(limit, 1)[0], "slow_down")
    assert limit.limit == 1
    assert answer(limit, take(limit, 1)[0], "slow_down") is False


def test_other_failures_leave_the_limit_alone() -> None:
    limit = AdaptiveLimit(start=8)
    for permit in take(limit, 8):
        answer(limit, permit, "other")
    assert (limit.limit, limit.round) == (8, 0)


def test_retry_after_pauses_every_new_request() -> None:
    clock = Clock()
    limit = AdaptiveLimit(clock=clock)
    answer(limit, take(limit, 1)[0], "slow_down", retry_after_s=2.0)
    assert limit.try_acquire() is None
    clock.now += 1.9
    assert limit.pause_left() == pytest.approx(0.1)
    assert limit.try_acquire() is None
    clock.now += 0.1
    assert limit.try_acquire() is not None


def test_a_later_retry_after_extends_the_pause_and_an_earlier_one_does_not_shorten_it() -> None:
    clock = Clock()
    limit = AdaptiveLimit(clock=clock)
    first, second = take(limit, 2)
    answer(limit, first, "slow_down", retry_after_s=5.0)
    answer(limit, second, "slow_down", retry_after_s=1.0)
    clock.now += 4.0
    assert limit.try_acquire() is None
    clock.now += 1.0
    assert limit.try_acquire() is not None


def test_after_a_stray_503_the_limit_climbs_back_fast_then_slowly() -> None:
    limit = AdaptiveLimit()
    answer(limit, take(limit, 1)[0], "slow_down")  # one request in flight when it came
    assert limit.limit == 1 and limit.threshold == START / 2
    windows = 0
    while limit.limit < START / 2:  # each window fills the limit and every answer comes back
        for permit in take(limit, int(limit.limit)):
            answer(limit, permit)
        windows += 1
    assert windows <= 6  # doubling per window: 1, 2, 4, 8, 16, 32
    before = limit.limit
    for permit in take(limit, int(limit.limit)):
        answer(limit, permit)
    assert limit.limit - before < 1.01  # past the threshold: about one place per window


# --- waiting -----------------------------------------------------------------------------------

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_waiters_are_served_in_arrival_order_and_a_cancelled_one_leaves_the_queue() -> None:
    limit = AdaptiveLimit(1)
    held = await limit.acquire()
    served: list[str] = []
    quitter = anyio.CancelScope()

    async def wait(name: str) -> None:
        permit = await limit.acquire()
        served.append(name)
        limit.release(permit)

    async def give_up() -> None:
        with quitter:
            await limit.acquire()
            served.append("the one that gave up")

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait, "first")
        await wait_all_tasks_blocked()
        tg.start_soon(give_up)
        await wait_all_tasks_blocked()
        tg.start_soon(wait, "second")
        await wait_all_tasks_blocked()
        quitter.cancel()
        await wait_all_tasks_blocked()
        assert served == []
        limit.release(held)
    assert served == ["first", "second"]
    assert limit.in_flight == 0


async def test_a_waiter_held_by_a_pause_goes_when_it_ends_with_nothing_else_happening() -> None:
    limit = AdaptiveLimit()
    answer(limit, take(limit, 1)[0], "slow_down", retry_after_s=0.2)
    with anyio.fail_after(30):  # nothing is released or answered: only the pause's end wakes it
        permit = await limit.acquire()
    assert limit.in_flight == 1 and permit.in_flight == 1


# --- against a gateway that takes four at a time -----------------------------------------------


def _wire(manifest: Manifest) -> WireRequest:
    """A plain generation request for a model the emulator serves (pacing is not about models)."""
    assert manifest.id == "modelmax"
    model, rules = next(iter(MODELMAX_MODELS.items()))
    body = {"model": model, "prompt": "a lighthouse", "n": 1, "size": rules["sizes"][0]}
    return WireRequest("POST", "/images/generations", json=body)


def _endpoint(emu: Emulator, max_concurrency: int | None = None) -> EndpointConfig:
    endpoint = EndpointConfig(
        name="limited", provider="modelmax", base_url=emu.base_url, timeout_s=120, max_concurrency=max_concurrency
    )
    endpoint.api_key = SecretStr(KEY)
    return endpoint


async def test_a_rate_limited_gateway_gets_fewer_requests_at_once_and_every_call_succeeds(
    emulator: object,
) -> None:
    emu: Emulator = emulator("modelmax", api_key=KEY, latency_s=1.0)  # type: ignore[operator]
    emu.capacity, emu.capacity_retry_after = 4, 1.0
    manifest = load_manifest("modelmax")
    wire = _wire(manifest)
    endpoint = _endpoint(emu)

    async def batch(gw: GatewayClient, calls: int) -> int:
        done: list[int] = []

        async def one() -> None:
            result = await gw.send(endpoint, manifest, wire)
            done.append(len(result.images))

        async with anyio.create_task_group() as tg:
            for _ in range(calls):
                tg.start_soon(one)
        return len(done)

    async with GatewayClient() as gw:  # the defaults: max_retries 2, no max_concurrency
        assert await batch(gw, 16) == 16
        first_429s = emu.rejected
        learnt = gw.pacing(endpoint).limit
        emu.reset()
        assert await batch(gw, 16) == 16
    assert first_429s >= 12  # all sixteen went at once; the gateway held four a second, refused the rest
    assert learnt < 16
    assert emu.max_in_flight < 16  # the second batch never had all sixteen at the gateway at once
    assert emu.rejected < first_429s


async def test_a_429_at_a_limit_that_cannot_drop_uses_up_max_retries(emulator: object) -> None:
    emu: Emulator = emulator("modelmax", api_key=KEY)  # type: ignore[operator]
    emu.inject(Fault.rate_limit(retry_after=0), times=None)
    manifest = load_manifest("modelmax")
    endpoint = _endpoint(emu, max_concurrency=1)
    async with GatewayClient(max_retries=2) as gw:
        with pytest.raises(RateLimitedError):
            await gw.send(endpoint, manifest, _wire(manifest))
    assert len(emu.requests_to("/images/")) == 3  # the first and max_retries more: no free retries at 1
    assert gw.pacing(endpoint).limit == 1


async def test_time_queued_before_the_first_send_is_not_part_of_timeout_s(emulator: object) -> None:
    emu: Emulator = emulator("modelmax", api_key=KEY)  # type: ignore[operator]
    emu.inject(Fault.delay(1.5))  # the first request holds the only place for longer than B's timeout_s
    manifest = load_manifest("modelmax")
    wire = _wire(manifest)
    patient, hurried = _endpoint(emu, max_concurrency=1), _endpoint(emu, max_concurrency=1)
    patient.timeout_s, hurried.timeout_s = 60, 1.0
    results: list[int] = []
    async with GatewayClient() as gw, anyio.create_task_group() as tg:

        async def send(endpoint: EndpointConfig) -> None:
            results.append(len((await gw.send(endpoint, manifest, wire)).images))

        tg.start_soon(send, patient)
        with anyio.fail_after(30):
            while emu.in_flight < 1:  # the first request is at the gateway
                await anyio.sleep(0.01)
        tg.start_soon(send, hurried)  # queued behind it, then answered at once
    assert results == [1, 1]
    assert emu.max_in_flight == 1
