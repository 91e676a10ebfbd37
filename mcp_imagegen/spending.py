"""Spending limits: what a call will cost, checked against each person's and the server's day.

Before a job sends anything, its cost is estimated (images asked for x the model family's price
from `manifests/prices/images.toml`, an estimate with its source; the built-in renderer is free;
a model in no family is priced at `unpriced_image_usd`) and held against the day's limits
(`[spending]`: per person and per server, UTC days). A call that does not fit is refused with what
is left, before any gateway request. When the job ends its hold is let go and what it cost is
recorded: the gateway's own figure where it reports one (nano-gpt's `cost`), else the estimate
for the images it delivered. Recorded spend is kept per person and day in the spend book.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
import tomllib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import anyio

from .config import SpendingSettings
from .errors import InvalidRequestError
from .manifests import manifest_dir
from .work import on_disk

log = logging.getLogger("mcp_imagegen.spending")

SPEND_DIR_NAME = "spend"
SERVER_TOTAL = "*"  # the key under which a day's book holds the whole server's spend


class SpendingLimitError(InvalidRequestError):
    """A call would pass a daily spending limit: refused before anything was sent."""

    kind = "spending_limit"


@dataclass(frozen=True)
class Price:
    pattern: str
    usd_per_image: float
    source: str


@dataclass(frozen=True)
class Estimate:
    usd_per_image: float
    images: int
    source: str

    @property
    def usd(self) -> float:
        return self.usd_per_image * self.images

    def describe(self) -> str:
        return f"{self.images} image(s) x ${self.usd_per_image:.3f} (an estimate: {self.source})"


@cache
def price_table() -> tuple[Price, ...]:
    raw = tomllib.loads((manifest_dir() / "prices" / "images.toml").read_text(encoding="utf-8"))
    return tuple(Price(**entry) for entry in raw["prices"])


def estimate(
    model_id: str, provider: str, images: int, unpriced_usd: float, listed_usd: float | None = None
) -> Estimate:
    """What `images` images of a model will cost: the gateway's own listed price where it gives
    one, else the model family's from the price table, else `unpriced_usd` each."""
    if provider == "offline":
        return Estimate(0.0, images, "the built-in renderer costs nothing")
    if listed_usd is not None:
        return Estimate(listed_usd, images, f"the price {provider} lists for {model_id}")
    for price in price_table():
        if re.search(price.pattern, model_id, re.IGNORECASE):
            return Estimate(price.usd_per_image, images, price.source)
    return Estimate(unpriced_usd, images, f"no known price for {model_id!r}; [spending] unpriced_image_usd")


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Settle:
    """What one call cost, and the hold (its job id) it lets go."""

    owner: str
    hold_id: str
    cost: float


class SpendBook(Protocol):
    """Where spend lives, per UTC day: what each owner (and the server, `SERVER_TOTAL`) spent, and
    the holds of calls still running anywhere. Blocking calls; each one is atomic across every
    process sharing the book, so replicas checking at once cannot all squeeze under a limit."""

    def hold(
        self, day: str, owner: str, hold_id: str, usd: float, person_limit: float | None, server_limit: float | None
    ) -> tuple[bool, float, float]:
        """Hold `usd` for a call if it fits both limits. Returns (held, the owner's use, the
        server's use), use being what was spent plus what live holds keep, before this one."""
        ...

    def settle(self, day: str, settles: Sequence[Settle]) -> None:
        """Let each hold go (if there is one) and record what its call cost, in one change."""
        ...

    def totals(self, day: str, owner: str) -> tuple[float, float]:
        """(this owner's spend, the server's spend) on `day`, holds aside."""
        ...


HOLD_S = 3600  # a hold outlives no call: a replica that died mid-call lets its holds go after this


def _holding(
    book: dict[str, Any], owner: str, hold_id: str, usd: float, limits: tuple[float | None, float | None]
) -> tuple[bool, float, float]:
    """`SpendBook.hold` on a day's book as a dict (the folder's and the bucket's format)."""
    now = time.time()
    spent = book.setdefault("spent", {})
    holds = {k: v for k, v in book.setdefault("holds", {}).items() if v["until"] >= now}
    book["holds"] = holds
    person = spent.get(owner, 0.0) + sum(h["usd"] for h in holds.values() if h["owner"] == owner)
    server = spent.get(SERVER_TOTAL, 0.0) + sum(h["usd"] for h in holds.values())
    fits = all(limit is None or used + usd <= limit + 1e-9 for limit, used in zip(limits, (person, server)))
    if fits:
        holds[hold_id] = {"owner": owner, "usd": usd, "until": now + HOLD_S}
    return fits, person, server


def _settling(book: dict[str, Any], settles: Sequence[Settle]) -> None:
    holds = book.setdefault("holds", {})
    spent = book.setdefault("spent", {})
    for settle in settles:
        holds.pop(settle.hold_id, None)
        if settle.cost > 0:
            for who in (settle.owner, SERVER_TOTAL):
                spent[who] = round(spent.get(who, 0.0) + settle.cost, 6)


class JsonSpendBook:
    """A spend book kept as one JSON document per day (the folder's file, the bucket's object):
    hold, settle and totals over the document; a subclass reads it and changes it atomically."""

    def _read(self, day: str) -> dict[str, Any]:
        raise NotImplementedError

    def _change(self, day: str, change: Any) -> Any:
        """Apply `change` to the day's document as one atomic step; return what it returns."""
        raise NotImplementedError

    def hold(
        self, day: str, owner: str, hold_id: str, usd: float, person_limit: float | None, server_limit: float | None
    ) -> tuple[bool, float, float]:
        return self._change(day, lambda book: _holding(book, owner, hold_id, usd, (person_limit, server_limit)))

    def settle(self, day: str, settles: Sequence[Settle]) -> None:
        self._change(day, lambda book: _settling(book, settles))

    def totals(self, day: str, owner: str) -> tuple[float, float]:
        spent = self._read(day).get("spent", {})
        return float(spent.get(owner, 0.0)), float(spent.get(SERVER_TOTAL, 0.0))


class FolderSpendBook(JsonSpendBook):
    """One JSON file per UTC day in `<meta_dir>/spend/`, changed under an exclusive file lock so
    several processes on one folder see each other's holds and add up."""

    def __init__(self, meta_dir: Path) -> None:
        self.folder = meta_dir / SPEND_DIR_NAME

    def _path(self, day: str) -> Path:
        return self.folder / f"{day}.json"

    def _read(self, day: str) -> dict[str, Any]:
        try:
            return dict(json.loads(self._path(day).read_bytes()))
        except FileNotFoundError:
            return {}

    def _change(self, day: str, change: Any) -> Any:
        from .store import TMP_SUFFIX

        self.folder.mkdir(parents=True, exist_ok=True)
        with _locked(self.folder / ".lock"):
            book = self._read(day)
            answer = change(book)
            final = self._path(day)
            tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
            tmp.write_text(json.dumps(book, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, final)
            return answer


class _locked:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except ImportError:  # Windows: one process per folder there
            pass

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing lets the lock go


class Spending:
    """The day's limits, checked and held in the spend book that every replica shares."""

    def __init__(self, settings: SpendingSettings, book: SpendBook) -> None:
        self.settings = settings
        self.book = book
        # Settles wait here for the next trip to the book: calls ending together share one change
        # of it (one file lock, one read and one write) instead of one each.
        self._unsettled: list[tuple[int, str, Settle]] = []
        self._queued = 0  # settles queued so far
        self._settled = 0  # every settle numbered up to this has had its trip
        self._trip: anyio.Lock | None = None
        self._tasks: Any = None  # the service's task group, once started

    def start(self, tasks: Any) -> None:
        """Run unlimited days' records in `tasks` (the service's), not in the calls themselves."""
        self._tasks = tasks

    @property
    def limited(self) -> bool:
        return self.settings.person_usd_per_day is not None or self.settings.server_usd_per_day is not None

    @asynccontextmanager
    async def hold(
        self, job: Any, model_id: str, provider: str, listed_usd: float | None = None
    ) -> AsyncIterator[Estimate]:
        """Check and hold a job's estimate before it sends anything; record its cost when it ends.
        `listed_usd`: the per-image price the gateway lists for the model, where it lists one.
        Without limits there is nothing to check: the cost is only recorded."""
        owner = job.owner
        guess = estimate(model_id, provider, job.request.n, self.settings.unpriced_image_usd, listed_usd)
        day, hold_id = today(), job.id
        if self.limited:
            limits = (self.settings.person_usd_per_day, self.settings.server_usd_per_day)
            held, person_used, server_used = await on_disk(
                lambda: self.book.hold(day, owner, hold_id, guess.usd, *limits)
            )
            if not held:
                self._refuse(guess, person_used, server_used)
        try:
            yield guess
        finally:
            cost = job.cost if job.cost is not None else guess.usd_per_image * len(job.saved)
            if self.limited or cost > 0:
                settle = Settle(owner, hold_id, cost)
                if self.limited or self._tasks is None:
                    await self._settle_shielded(day, settle)
                else:  # nothing waits on a record without limits: the call answers meanwhile
                    self._tasks.start_soon(self._settle_shielded, day, settle, name="spend record")

    async def _settle_shielded(self, day: str, settle: Settle) -> None:
        with anyio.CancelScope(shield=True):  # money was spent: it is recorded whatever happens
            await self._settle(day, settle)

    async def _settle(self, day: str, settle: Settle) -> None:
        """Queue a settle and return once a trip to the book has taken it: whoever holds the trip
        lock writes everything queued by then, so a settle queued meanwhile may find it done."""
        self._queued += 1
        number = self._queued
        self._unsettled.append((number, day, settle))
        if self._trip is None:
            self._trip = anyio.Lock()
        async with self._trip:
            if self._settled >= number:
                return
            batch, self._unsettled = self._unsettled, []
            self._settled = batch[-1][0]
            days: dict[str, list[Settle]] = {}
            for _, on_day, queued in batch:
                days.setdefault(on_day, []).append(queued)
            for on_day, settles in days.items():
                try:
                    await on_disk(lambda: self.book.settle(on_day, settles))  # noqa: B023 (awaited here)
                except Exception as exc:  # the images are saved: a lost record must not fail the calls
                    log.warning("could not record the spend of %d call(s) on %s: %s", len(settles), on_day, exc)

    def _refuse(self, guess: Estimate, person_used: float, server_used: float) -> None:
        for limit, used, whose in (
            (self.settings.person_usd_per_day, person_used, "your"),
            (self.settings.server_usd_per_day, server_used, "this server's"),
        ):
            if limit is None or used + guess.usd <= limit + 1e-9:
                continue
            left = max(0.0, limit - used)
            fits = int(left // guess.usd_per_image) if guess.usd_per_image > 0 else 0
            raise SpendingLimitError(
                f"this call would pass {whose} daily spending limit of ${limit:.2f}: ${left:.2f} is left today "
                f"(UTC, after the calls still running) and the call is estimated at ${guess.usd:.2f} ({guess.describe()}). Nothing was sent. "
                + (f"Ask for at most {fits} image(s), use " if fits else "Use ")
                + "a cheaper model, or wait for the next UTC day."
            )
        raise SpendingLimitError("this call does not fit today's spending limits; nothing was sent")
