"""How many requests one endpoint may have in flight, learnt from the gateway's answers.

A fixed small limit throttles a fast gateway; a large one hammers a rate-limited gateway. So each
endpoint starts generous and adapts the way TCP does (AIMD):

- additive increase: each answered request during whose flight the limit was full adds
  1/limit, so the limit grows by one per window of answers; a limit that is not used never grows.
  Below half the limit of the last decrease it adds 1 (doubling per window: TCP's slow start), so
  one stray 503 to a lone request does not leave a later burst crawling;
- multiplicative decrease: a 429 or 503 halves what was in flight (not the nominal limit, which
  may be far above what was used), once per round of requests: answers to requests sent before
  the last decrease were already accounted for by it;
- a `Retry-After` pauses the whole endpoint: nothing new is sent before it has passed.

A user's `max_concurrency` is a hard ceiling (and the start); without one the limit starts at
START and never exceeds MOST. Waiters are served first come, first served.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import anyio

START = 64  # generous: a gateway that cannot take this many says so with its first 429s
MOST = 256
BACKOFF = 0.5

Outcome = Literal["ok", "slow_down", "other"]


@dataclass(frozen=True)
class Permit:
    """One request's place in flight, and the state it was sent under."""

    round: int  # the limiter's round (decreases so far) when it was sent
    limit: float
    in_flight: int  # requests in flight once this one was sent, itself included
    fills: int  # how often the limit had been filled before it was sent


class AdaptiveLimit:
    """The in-flight limit of one endpoint (see the module's docstring)."""

    def __init__(
        self,
        ceiling: int | None = None,
        *,
        start: int = START,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ceiling = ceiling if ceiling is not None else MOST
        self.limit = float(self.ceiling if ceiling is not None else min(start, MOST))
        self.threshold = 0.0  # below it the limit grows fast (see above)
        self.in_flight = 0
        self.fills = 0  # times a request took the last free place
        self.round = 0
        self.paused_until = -math.inf
        self._clock = clock
        self._queue: deque[anyio.Event] = deque()
        self._changed: anyio.Event | None = None  # made on first wait: it needs a running loop

    def __repr__(self) -> str:
        return f"AdaptiveLimit(limit={self.limit:.2f}, ceiling={self.ceiling}, in_flight={self.in_flight})"

    # --- decisions (synchronous, so tests can drive them with their own clock) ----------------

    def pause_left(self) -> float:
        return max(0.0, self.paused_until - self._clock())

    def try_acquire(self) -> Permit | None:
        """A permit if one may be sent now (room under the limit, no pause), else None."""
        if self.in_flight >= int(self.limit) or self.pause_left() > 0:
            return None
        permit = Permit(self.round, self.limit, self.in_flight + 1, self.fills)
        self.in_flight += 1
        if self.in_flight >= int(self.limit):
            self.fills += 1
        return permit

    def release(self, permit: Permit) -> None:
        """The request is no longer in flight (its answer was read, or it failed or was dropped)."""
        self.in_flight -= 1
        self._notify()

    def observe(self, permit: Permit, outcome: Outcome, retry_after_s: float | None = None) -> bool:
        """Learn from a request's outcome. True when the request was sent under a higher limit
        than the present one: a 429 or 503 it got was the server's overreach, now corrected."""
        if outcome == "ok" and self.fills > permit.fills:  # the limit was full while it was out
            step = 1.0 if self.limit < self.threshold else 1 / int(self.limit)
            self.limit = min(float(self.ceiling), self.limit + step)
        elif outcome == "slow_down":
            if retry_after_s is not None and retry_after_s > 0:
                self.paused_until = max(self.paused_until, self._clock() + retry_after_s)
            if permit.round == self.round:  # the first word of this round: later ones are echoes
                flight = max(permit.in_flight, self.in_flight + 1)
                self.threshold = self.limit * BACKOFF
                self.limit = max(1.0, min(self.limit, flight) * BACKOFF)
                self.round += 1
        self._notify()
        return int(permit.limit) > int(self.limit)

    # --- waiting --------------------------------------------------------------------------------

    async def acquire(self) -> Permit:
        """Wait for a place in flight, in arrival order. Only the first in line watches the
        limit, so a long queue is not woken at every answer."""
        turn = anyio.Event()  # set once this request is first in line
        self._queue.append(turn)
        if self._queue[0] is turn:
            turn.set()
        try:
            await turn.wait()
            while (permit := self.try_acquire()) is None:
                changed = self._changed = self._changed or anyio.Event()
                pause = self.pause_left()
                with anyio.move_on_after(pause if pause > 0 else None):
                    await changed.wait()
            return permit
        finally:
            first = self._queue[0] is turn
            self._queue.remove(turn)
            if first and self._queue:
                self._queue[0].set()  # the next in line may fit too

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()
