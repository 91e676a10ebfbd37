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
import os
import re
import secrets
import tomllib
from collections import Counter
from collections.abc import AsyncIterator
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


class SpendBook(Protocol):
    """Where recorded spend lives: per day, per owner, plus the server's total (blocking calls)."""

    def totals(self, day: str, owner: str) -> tuple[float, float]:
        """(this owner's spend, the server's spend) on `day`."""
        ...

    def add(self, day: str, owner: str, usd: float) -> None: ...


class FolderSpendBook:
    """One JSON file per UTC day in `<meta_dir>/spend/`, changed under an exclusive file lock so
    several processes on one folder add up rather than overwrite each other."""

    def __init__(self, meta_dir: Path) -> None:
        self.folder = meta_dir / SPEND_DIR_NAME

    def _path(self, day: str) -> Path:
        return self.folder / f"{day}.json"

    def _read(self, day: str) -> dict[str, float]:
        try:
            raw = json.loads(self._path(day).read_bytes())
        except FileNotFoundError:
            return {}
        return {str(k): float(v) for k, v in raw.items()}

    def totals(self, day: str, owner: str) -> tuple[float, float]:
        book = self._read(day)
        return book.get(owner, 0.0), book.get(SERVER_TOTAL, 0.0)

    def add(self, day: str, owner: str, usd: float) -> None:
        from .store import TMP_SUFFIX

        self.folder.mkdir(parents=True, exist_ok=True)
        with _locked(self.folder / ".lock"):
            book = self._read(day)
            book[owner] = round(book.get(owner, 0.0) + usd, 6)
            book[SERVER_TOTAL] = round(book.get(SERVER_TOTAL, 0.0) + usd, 6)
            final = self._path(day)
            tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
            tmp.write_text(json.dumps(book, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, final)


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
    """The limits of one server process, with the holds of its running jobs."""

    def __init__(self, settings: SpendingSettings, book: SpendBook) -> None:
        self.settings = settings
        self.book = book
        self._held: Counter[str] = Counter()  # owner -> USD held by running jobs (SERVER_TOTAL: all)
        self._lock = anyio.Lock()

    @property
    def limited(self) -> bool:
        return self.settings.person_usd_per_day is not None or self.settings.server_usd_per_day is not None

    @asynccontextmanager
    async def hold(
        self, job: Any, model_id: str, provider: str, listed_usd: float | None = None
    ) -> AsyncIterator[Estimate]:
        """Check and hold a job's estimate before it sends anything; record its cost when it ends.
        `listed_usd`: the per-image price the gateway lists for the model, where it lists one."""
        owner = job.owner
        guess = estimate(model_id, provider, job.request.n, self.settings.unpriced_image_usd, listed_usd)
        day = today()
        async with self._lock:  # a check and its hold together, so parallel calls cannot both fit
            person_spent, server_spent = await on_disk(lambda: self.book.totals(day, owner))
            self._check(guess, person_spent + self._held[owner], server_spent + self._held[SERVER_TOTAL])
            self._held[owner] += guess.usd
            self._held[SERVER_TOTAL] += guess.usd
        try:
            yield guess
        finally:
            self._held[owner] -= guess.usd
            self._held[SERVER_TOTAL] -= guess.usd
            cost = job.cost if job.cost is not None else guess.usd_per_image * len(job.saved)
            if cost > 0:
                with anyio.CancelScope(shield=True):  # money was spent: it is recorded whatever happens
                    await on_disk(lambda: self.book.add(day, owner, cost))

    def _check(self, guess: Estimate, person_used: float, server_used: float) -> None:
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
                f"(UTC) and the call is estimated at ${guess.usd:.2f} ({guess.describe()}). Nothing was sent. "
                + (f"Ask for at most {fits} image(s), use " if fits else "Use ")
                + "a cheaper model, or wait for the next UTC day."
            )
