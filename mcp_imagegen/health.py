"""`/healthz` and `/readyz` for load balancers and orchestrators (HTTP transports).

- `/healthz`: the process answers (200). Restart it when this fails.
- `/readyz`: this replica should get traffic (200), or not (503 with the reason): it is draining
  after SIGTERM, or the storage it shares with the others (the folder, the bucket, Redis) does
  not answer. Take it out of rotation when this fails; it may come back.

Both answer before authentication (probes carry no token) and say nothing about the images.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .work import on_disk

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"


def _storage_problem(service: Any) -> str | None:
    """Blocking: why the shared storage cannot be used, or None."""
    store = service.store
    try:
        bucket = getattr(store, "bucket", None)
        if bucket is not None:
            bucket.client.head_bucket(Bucket=bucket.name)
        elif not os.access(store.output_dir, os.W_OK | os.X_OK):
            return "the output folder is not writable"
        redis = getattr(store.jobs, "redis", None)
        if redis is not None:
            redis.ping()
    except Exception as exc:  # any failure to reach storage means: not ready
        return f"storage does not answer ({type(exc).__name__})"
    return None


class HealthRoutes:
    def __init__(self, app: ASGIApp, service: Any) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path") if scope["type"] == "http" else None
        if path == HEALTH_PATH:
            await JSONResponse({"status": "ok"})(scope, receive, send)
            return
        if path == READY_PATH:
            if self.service.draining:
                problem: str | None = "draining: finishing its calls before it stops"
            else:
                problem = await on_disk(lambda: _storage_problem(self.service))
            body = {"status": "ready"} if problem is None else {"status": "not ready", "reason": problem}
            await JSONResponse(body, status_code=200 if problem is None else 503)(scope, receive, send)
            return
        await self.app(scope, receive, send)
