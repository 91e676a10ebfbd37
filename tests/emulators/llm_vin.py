"""llm.vin: flux-1 and flux-2.5-pro (a model no manifest names) behind POST
/v1/images/generations, url answers only, auth optional.

Callers without a key share a lower rate limit than callers with one; over the limit they get
429 with Retry-After. A wrong key is always 401.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any, ClassVar

from .base import Call, Emulator, GatewayError, Handler, Reply, is_int, is_number, parse_size

FIELDS = frozenset({"model", "prompt", "n", "size", "guidance_scale", "num_inference_steps"})
MODELS = {
    "flux-1": {"sizes": ("1024x1024", "1024x1792", "1792x1024"), "max_n": 4},
    "flux-2.5-pro": {"sizes": ("1024x1024", "1536x1024", "1024x1536", "2048x2048"), "max_n": 1},
}


class LlmVinEmulator(Emulator):
    provider_id: ClassVar[str] = "llm-vin"
    default_auth_required: ClassVar[bool] = False

    def __init__(
        self,
        *args: Any,
        rate_limit_per_minute: int | None = None,
        rate_limit_per_minute_authenticated: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.rate_limit_per_minute = rate_limit_per_minute  # callers without a key; None: unlimited
        self.rate_limit_per_minute_authenticated = rate_limit_per_minute_authenticated
        self._windows: dict[bool, deque[float]] = {False: deque(), True: deque()}
        self._rl_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def routes_spec(self) -> list[tuple[str, list[str], Handler, bool]]:
        return [("/v1/images/generations", ["POST"], self._generations, True)]

    # -- errors ----------------------------------------------------------------------------------

    def render_error(self, err: GatewayError) -> Reply:
        return Reply(err.status, {"error": {"message": err.message, "type": err.type or "invalid_request_error"}})

    def bad(self, message: str, status: int = 400) -> GatewayError:
        return GatewayError(status, message, type="invalid_request_error")

    def auth_error(self, token: str | None) -> GatewayError:
        return GatewayError(
            401, "Invalid API key" if token is not None else "API key required", type="authentication_error"
        )

    def status_error(self, status: int, code: str | None, message: str | None) -> GatewayError:
        defaults = {
            401: ("Invalid API key", "authentication_error"),
            403: ("Forbidden", "permission_error"),
            429: ("Rate limit exceeded", "rate_limit_error"),
            500: ("Internal server error", "server_error"),
            502: ("Bad gateway", "server_error"),
            503: ("Service unavailable", "server_error"),
        }
        msg, type_ = defaults.get(status, (f"HTTP {status}", "api_error"))
        return GatewayError(status, message or msg, type=type_, code=code)

    # -- rate limiting ----------------------------------------------------------------------------

    def _rate_limit(self, authenticated: bool) -> None:
        limit = self.rate_limit_per_minute_authenticated if authenticated else self.rate_limit_per_minute
        if limit is None:
            return
        now = time.monotonic()
        with self._rl_lock:
            window = self._windows[authenticated]
            while window and now - window[0] >= 60:
                window.popleft()
            if len(window) >= limit:
                wait = max(1, math.ceil(60 - (now - window[0])))
                raise GatewayError(
                    429,
                    "Rate limit exceeded",
                    type="rate_limit_error",
                    headers={"Retry-After": str(wait), "X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": "0"},
                )
            window.append(now)

    def reset(self) -> None:
        super().reset()
        with self._rl_lock:
            for window in self._windows.values():
                window.clear()

    # -- the endpoint -----------------------------------------------------------------------------

    async def _generations(self, call: Call) -> Reply:
        authenticated = self.check_auth(call)
        self._rate_limit(authenticated)
        rec = call.rec
        if not rec.content_type.lower().startswith("application/json"):
            raise self.bad("Content-Type must be application/json")
        if rec.json_error is not None or not isinstance(rec.json, dict):
            raise self.bad("Invalid JSON in request body")
        body: dict[str, Any] = rec.json
        for name in body:
            if name not in FIELDS:
                raise self.bad(f"Unknown parameter: '{name}'")
        model_id = body.get("model")
        if model_id is None:
            raise self.bad("Missing required parameter: 'model'")
        if not isinstance(model_id, str) or model_id not in MODELS:
            raise self.bad(f"Model '{model_id}' not found", 404)
        spec = MODELS[model_id]
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise self.bad("Missing required parameter: 'prompt'")
        n = body.get("n", 1)
        if not is_int(n) or not 1 <= n <= spec["max_n"]:
            raise self.bad(f"Invalid value for 'n': must be an integer between 1 and {spec['max_n']}")
        size = body.get("size", "1024x1024")
        if size not in spec["sizes"]:
            raise self.bad(f"Invalid image size '{size}'. Allowed sizes: {', '.join(spec['sizes'])}")
        if "guidance_scale" in body and not (is_number(body["guidance_scale"]) and body["guidance_scale"] >= 0):
            raise self.bad("Invalid value for 'guidance_scale': must be a non-negative number")
        if "num_inference_steps" in body and not (
            is_int(body["num_inference_steps"]) and body["num_inference_steps"] >= 1
        ):
            raise self.bad("Invalid value for 'num_inference_steps': must be a positive integer")
        width, height = parse_size(size)
        data = await self.make_images(call, n=n, width=width, height=height, response_format="url")
        return Reply(200, {"created": int(time.time()), "data": data})
