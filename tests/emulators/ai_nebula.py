"""ai-nebula: Gemini image models behind POST /v1/images/generations, every answer wrapped.

Success: HTTP 200 {"code":200,"msg":"Success","data":{"data":[{"url","b64_json","revised_prompt"}],
"created"}} where the unused field is an empty string, not absent.
Errors: {"code":<int>,"msg":"...","data":null}; business errors (bad field, unknown model, bad
contents) come with HTTP 200, auth failures with HTTP 401, injected statuses with that status.
gemini-3.5-flash-image-preview is a model no manifest names; Imagen 3 and 4, discontinued by
Google, answer a business error 404 saying so.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from . import images
from .base import Call, Emulator, Fault, GatewayError, Handler, Reply

FIELDS = frozenset({"model", "prompt", "response_format", "contents"})
MODELS = ("gemini-2.5-flash-image-preview", "gemini-3-pro-image-preview", "gemini-3.5-flash-image-preview")
DISCONTINUED = {  # model -> the day Google discontinued it
    "imagen-3.0-generate-002": "2025-11-10",
    "imagen-4.0-generate-001": "2026-08-17",
    "imagen-4.0-ultra-generate-001": "2026-08-17",
}


class AiNebulaEmulator(Emulator):
    provider_id: ClassVar[str] = "ai-nebula"
    output_size: tuple[int, int] = (1024, 1024)

    def routes_spec(self) -> list[tuple[str, list[str], Handler, bool]]:
        return [("/v1/images/generations", ["POST"], self._generations, True)]

    # -- errors ----------------------------------------------------------------------------------

    def render_error(self, err: GatewayError) -> Reply:
        # Only auth failures and injected statuses travel as HTTP errors; the rest is HTTP 200.
        http_status = err.status if err.status == 401 or err.type == "http" else 200
        return Reply(http_status, {"code": err.status, "msg": err.message, "data": None})

    def business(self, code: int, msg: str) -> GatewayError:
        return GatewayError(code, msg, type="business")

    def auth_error(self, token: str | None) -> GatewayError:
        if token is None:
            return GatewayError(401, "Unauthorized: missing Authorization header", type="http")
        return GatewayError(401, "Unauthorized: invalid API key", type="http")

    def route_not_found(self, call: Call) -> GatewayError:
        return GatewayError(404, f"Route not found: {call.rec.method} {call.path}", type="http")

    def status_error(self, status: int, code: str | None, message: str | None) -> GatewayError:
        default = {
            429: "Too many requests, please try again later",
            500: "Internal server error",
            502: "Upstream service error",
            503: "Service temporarily unavailable",
            504: "Upstream request timed out",
        }.get(status, f"HTTP {status}")
        return GatewayError(status, message or default, type="http")

    def relay_error(self, fault: Fault) -> GatewayError:
        return self.business(fault.status, fault.message or "Upstream service error")

    # -- the endpoint -----------------------------------------------------------------------------

    async def _generations(self, call: Call) -> Reply:
        self.check_auth(call)
        rec = call.rec
        if not rec.content_type.lower().startswith("application/json"):
            raise self.business(400, "Content-Type must be application/json")
        if rec.json_error is not None or not isinstance(rec.json, dict):
            raise self.business(400, "Invalid request body: expected a JSON object")
        body: dict[str, Any] = rec.json
        for name in body:
            if name not in FIELDS:
                raise self.business(400, f"Unknown field: {name}")
        model = body.get("model")
        if model is None or model == "":
            raise self.business(400, "model is required")
        if not isinstance(model, str):
            raise self.business(400, "model must be a string")
        if model in DISCONTINUED:
            raise self.business(
                404, f"Model {model} was discontinued by the upstream provider on {DISCONTINUED[model]}"
            )
        if model not in MODELS:
            raise self.business(404, f"Model not found: {model}")
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise self.business(400, "prompt must be a string")
        contents = body.get("contents")
        if not prompt and contents is None:
            raise self.business(400, "Either prompt or contents is required")
        if contents is not None:
            self._check_contents(contents)
        response_format = body.get("response_format", "url")
        if response_format not in ("url", "b64_json"):
            raise self.business(400, f"Invalid response_format: {response_format!r}; expected url or b64_json")

        width, height = self.output_size
        items = await self.make_images(call, n=1, width=width, height=height, response_format=response_format)
        data = [{"url": it.get("url", ""), "b64_json": it.get("b64_json", ""), "revised_prompt": ""} for it in items]
        return Reply(200, {"code": 200, "msg": "Success", "data": {"data": data, "created": int(time.time())}})

    def _check_contents(self, contents: Any) -> None:
        if not isinstance(contents, list) or not contents:
            raise self.business(400, "contents must be a non-empty array")
        for i, turn in enumerate(contents):
            where = f"contents[{i}]"
            if not isinstance(turn, dict):
                raise self.business(400, f"{where} must be an object")
            for key in turn:
                if key not in ("role", "parts"):
                    raise self.business(400, f"Unknown field: {where}.{key}")
            role = turn.get("role")
            if role not in ("user", "model"):
                raise self.business(400, f"{where}.role must be 'user' or 'model'")
            expected = "user" if i % 2 == 0 else "model"
            if role != expected:
                raise self.business(400, f"{where}.role must be '{expected}': turns must alternate, starting with user")
            parts = turn.get("parts")
            if not isinstance(parts, list) or not parts:
                raise self.business(400, f"{where}.parts must be a non-empty array")
            for j, part in enumerate(parts):
                pwhere = f"{where}.parts[{j}]"
                if not isinstance(part, dict) or len(part) != 1 or next(iter(part)) not in ("text", "image"):
                    raise self.business(400, f'{pwhere} must be {{"text": ...}} or {{"image": "data:..."}}')
                if "text" in part:
                    if not isinstance(part["text"], str):
                        raise self.business(400, f"{pwhere}.text must be a string")
                else:
                    try:
                        images.parse_data_url(part["image"])
                    except ValueError as exc:
                        raise self.business(400, f"Invalid image in {pwhere}: {exc}") from None
        if contents[-1].get("role") != "user":
            raise self.business(400, "The last turn of contents must have role 'user'")
