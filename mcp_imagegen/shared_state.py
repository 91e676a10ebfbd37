"""Job records and spend in Redis, so every replica sees every job and every dollar.

- Job records: `<prefix>job:<id>` (the record's JSON). A running job also holds a lease,
  `<prefix>lease:<id>`, that the replica running it renews every `LEASE_S / 3` seconds. A
  "running" record whose lease has lapsed belongs to a replica that died: the job reads as
  interrupted, with the images it saved, on every replica.
- Spend: one hash per UTC day, `<prefix>spend:<day>`, added to with HINCRBYFLOAT (atomic, so
  replicas adding at once all count).

Blocking calls (redis-py's client); run them on_disk. The URL, which may hold a password, comes
from the environment variable `[storage] redis_url_env` names, never from the file.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import ValidationError

from .errors import ConfigError
from .jobs import JobRecord, RemoteJobBookWrites, _valid_job_id
from .work import on_disk

if TYPE_CHECKING:
    from .spending import Settle

LEASE_ENV = "MCP_IMAGEGEN_JOB_LEASE_S"  # hidden: tests shorten the lease to see a replica die
DEFAULT_LEASE_S = 30
PREFIX = "mcp-imagegen:"


def redis_client(url: str) -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigError("shared job state needs the redis client: pip install 'mcp-imagegen[team]'") from None
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)


def lease_s() -> int:
    try:
        return max(1, int(os.environ.get(LEASE_ENV, DEFAULT_LEASE_S)))
    except ValueError:
        return DEFAULT_LEASE_S


class RedisJobBook(RemoteJobBookWrites):
    def __init__(self, client: Any) -> None:
        self.redis = client
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lease_s = lease_s()

    def write(self, record: JobRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(f"{PREFIX}job:{record.id}", record.model_dump_json())
            if record.status == "running":
                pipe.set(f"{PREFIX}lease:{record.id}", self.replica, ex=self.lease_s)
            else:
                pipe.delete(f"{PREFIX}lease:{record.id}")
            pipe.execute()

    def read(self, job_id: str) -> JobRecord | None:
        if not _valid_job_id(job_id):
            return None
        raw = self.redis.get(f"{PREFIX}job:{job_id}")
        if raw is None:
            return None
        try:
            return JobRecord.model_validate_json(raw)
        except ValidationError:
            return None

    def running(self) -> list[JobRecord]:
        return []  # a lapsed lease already says "interrupted"; nothing to rewrite at start

    def alive(self, record: JobRecord) -> bool:
        return bool(self.redis.exists(f"{PREFIX}lease:{record.id}"))

    @asynccontextmanager
    async def keeping_alive(self, job_id: str) -> AsyncIterator[None]:
        """Renew the job's lease while the block runs (the job's first write takes it)."""

        async def renew() -> None:
            while True:
                await anyio.sleep(self.lease_s / 3)
                try:
                    await on_disk(
                        lambda: self.redis.set(f"{PREFIX}lease:{job_id}", self.replica, ex=self.lease_s, xx=True)
                    )
                except Exception:  # Redis away for a moment: the next renewal tries again
                    continue

        async with anyio.create_task_group() as tg:
            tg.start_soon(renew)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()


# Checks a call against the day's spend plus the live holds and holds it, in one atomic step.
# KEYS: spent hash, holds hash. ARGV: owner, hold id, usd, person limit, server limit (-1: none), now, until.
_HOLD_SCRIPT = """
local person = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local server = tonumber(redis.call('HGET', KEYS[1], '*') or '0')
local now = tonumber(ARGV[6])
local holds = redis.call('HGETALL', KEYS[2])
for i = 1, #holds, 2 do
  local owner, usd, untill = string.match(holds[i + 1], '^(.*)|([^|]*)|([^|]*)$')
  if tonumber(untill) < now then
    redis.call('HDEL', KEYS[2], holds[i])
  else
    server = server + tonumber(usd)
    if owner == ARGV[1] then person = person + tonumber(usd) end
  end
end
local usd = tonumber(ARGV[3])
local person_limit, server_limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local fits = (person_limit < 0 or person + usd <= person_limit + 1e-9)
  and (server_limit < 0 or server + usd <= server_limit + 1e-9)
if fits then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[1] .. '|' .. ARGV[3] .. '|' .. ARGV[7])
  redis.call('EXPIRE', KEYS[2], 172800)
end
return {fits and 1 or 0, tostring(person), tostring(server)}
"""


class RedisSpendBook:
    def __init__(self, client: Any) -> None:
        self.redis = client
        self._hold = client.register_script(_HOLD_SCRIPT)

    def hold(
        self, day: str, owner: str, hold_id: str, usd: float, person_limit: float | None, server_limit: float | None
    ) -> tuple[bool, float, float]:
        from .spending import HOLD_S

        now = time.time()
        limits = [-1 if limit is None else limit for limit in (person_limit, server_limit)]
        fits, person, server = self._hold(
            keys=[f"{PREFIX}spend:{day}", f"{PREFIX}holds:{day}"],
            args=[owner, hold_id, repr(usd), *map(repr, limits), repr(now), repr(now + HOLD_S)],
        )
        return bool(int(fits)), float(person), float(server)

    def settle(self, day: str, settles: Sequence[Settle]) -> None:
        from .spending import SERVER_TOTAL

        with self.redis.pipeline() as pipe:  # MULTI/EXEC: the batch lands whole or not at all
            for settle in settles:
                pipe.hdel(f"{PREFIX}holds:{day}", settle.hold_id)
                if settle.cost > 0:
                    pipe.hincrbyfloat(f"{PREFIX}spend:{day}", settle.owner, settle.cost)
                    pipe.hincrbyfloat(f"{PREFIX}spend:{day}", SERVER_TOTAL, settle.cost)
            pipe.execute()

    def totals(self, day: str, owner: str) -> tuple[float, float]:
        from .spending import SERVER_TOTAL

        person, server = self.redis.hmget(f"{PREFIX}spend:{day}", [owner, SERVER_TOTAL])
        return float(person or 0.0), float(server or 0.0)
