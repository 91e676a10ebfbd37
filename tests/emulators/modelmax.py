"""modelmax: POST /v1/images/generations (OpenAI DALL-E compatible format).

It serves seedream-5.0-lite (a model no manifest names; sizes "2K", "4K" or a listed WxH). imagen-3,
which Google discontinued, answers 404 type "model_not_found" saying so (`serve_retired=True`
still serves it, as before).

url by default; every image has a revised_prompt; `usage` {prompt_tokens, completion_tokens,
total_tokens} is present (all zero, as in the docs). 402 when the balance runs out, 502 for
upstream failures (via `Fault.http(502)`).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from .base import Call, Emulator, GatewayError, Handler, Reply, is_int, parse_size

FIELDS = frozenset({"model", "prompt", "n", "size", "quality", "response_format", "style"})
IMAGE_MODELS = {
    "seedream-5.0-lite": {"sizes": ("2048x2048", "2K", "4K", "2304x1728", "1728x2304", "2560x1440"), "max_n": 4}
}
DISCONTINUED = {"imagen-3": "2025-11-10", "imagen-4": "2026-08-17"}  # model -> the day Google discontinued it
RETIRED_MODELS = {"imagen-3": {"sizes": ("1024x1024", "1792x1024", "1024x1792"), "max_n": 4}}
_TOKEN_SIZES = {"2K": (2048, 2048), "4K": (4096, 4096)}
TEXT_MODELS = frozenset({"gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "gemini-2.5-pro", "deepseek-chat"})
PRICE = {"standard": 0.04, "hd": 0.08}  # USD per image


class ModelmaxEmulator(Emulator):
    provider_id: ClassVar[str] = "modelmax"

    def __init__(self, *args: Any, balance: float | None = None, serve_retired: bool = False, **kwargs: Any) -> None:
        self.balance = balance  # USD; None: unlimited
        self.image_models = dict(IMAGE_MODELS)
        self.discontinued = dict(DISCONTINUED)
        if serve_retired:  # imagen-3 as modelmax served it before Google discontinued it
            self.image_models = {**RETIRED_MODELS, **self.image_models}
            self.discontinued.pop("imagen-3")
        super().__init__(*args, **kwargs)

    def routes_spec(self) -> list[tuple[str, list[str], Handler, bool]]:
        return [("/v1/images/generations", ["POST"], self._generations, True)]

    # -- errors ----------------------------------------------------------------------------------

    def render_error(self, err: GatewayError) -> Reply:
        return Reply(err.status, {"error": {"message": err.message, "type": err.type or "invalid_request_error"}})

    def bad(self, message: str) -> GatewayError:
        return GatewayError(400, message, type="invalid_request_error")

    def auth_error(self, token: str | None) -> GatewayError:
        return GatewayError(
            401, "Invalid API key" if token is not None else "Missing API key", type="authentication_error"
        )

    def status_error(self, status: int, code: str | None, message: str | None) -> GatewayError:
        defaults = {
            401: ("Invalid API key", "authentication_error"),
            402: ("Insufficient balance", "insufficient_balance"),
            429: ("Rate limit exceeded", "rate_limit_error"),
            500: ("Internal server error", "server_error"),
            502: ("Upstream provider error", "upstream_error"),
            503: ("Service unavailable", "server_error"),
        }
        msg, type_ = defaults.get(status, (f"HTTP {status}", "api_error"))
        return GatewayError(status, message or msg, type=type_, code=code)

    # -- the endpoint -----------------------------------------------------------------------------

    async def _generations(self, call: Call) -> Reply:
        self.check_auth(call)
        rec = call.rec
        if not rec.content_type.lower().startswith("application/json"):
            raise self.bad("Content-Type must be application/json")
        if rec.json_error is not None or not isinstance(rec.json, dict):
            raise self.bad("Invalid request body")
        body: dict[str, Any] = rec.json
        for name in body:
            if name not in FIELDS:
                raise self.bad(f"Unknown parameter: '{name}'")
        model_id = body.get("model")
        if not isinstance(model_id, str) or not model_id:
            raise self.bad("model is required")
        if model_id in TEXT_MODELS:
            raise self.bad(f"model doesn't support image generation: {model_id}")
        if model_id in self.discontinued:
            raise GatewayError(
                404,
                f"model {model_id} has been discontinued by its provider (since {self.discontinued[model_id]}) "
                f"and is no longer available; available image models: {', '.join(self.image_models)}",
                type="model_not_found",
            )
        if model_id not in self.image_models:
            raise self.bad(f"model not found: {model_id}")
        spec = self.image_models[model_id]
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise self.bad("prompt is required")
        n = body.get("n", 1)
        if not is_int(n) or not 1 <= n <= spec["max_n"]:
            raise self.bad(f"n must be an integer between 1 and {spec['max_n']}")
        size = body.get("size", spec["sizes"][0])
        if size not in spec["sizes"]:
            raise self.bad(f"invalid size '{size}': supported sizes are {', '.join(spec['sizes'])}")
        quality = body.get("quality", "standard")
        if quality not in PRICE:
            raise self.bad("quality must be 'standard' or 'hd'")
        style = body.get("style", "vivid")
        if style not in ("natural", "vivid"):
            raise self.bad("style must be 'natural' or 'vivid'")
        response_format = body.get("response_format", "url")
        if response_format not in ("url", "b64_json"):
            raise self.bad("response_format must be 'url' or 'b64_json'")

        cost = PRICE[quality] * n
        if self.balance is not None and self.balance < cost:
            raise GatewayError(402, "Insufficient balance", type="insufficient_balance")
        width, height = _TOKEN_SIZES.get(size) or parse_size(size)
        data = await self.make_images(call, n=n, width=width, height=height, response_format=response_format)
        if self.balance is not None:
            self.balance = round(self.balance - cost, 6)
        for item in data:
            item["revised_prompt"] = f"{prompt.rstrip('.')}, rendered in a {style} style"
        return Reply(
            200,
            {
                "created": int(time.time()),
                "data": data,
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            },
        )
