"""nano-gpt: JSON-only POST /v1/images/generations with data-URL inputs, plus model discovery.

b64_json by default; `response_format: "url"` gives a signed URL, or b64_json when the presign
"fails" (`url_fallback=True` or `Fault.url_fallback()`). Every answer carries cost, paymentSource
and remainingBalance. Insufficient balance uses the legacy body {"error": "...", "status": 402}.
Discovery: GET /api/v1/image-models?detailed=true at the origin, auth optional. Each model carries
nano-gpt's capability flags (image_generation, image_to_image, inpainting, nsfw; `multi_image` only
where the listing states it), the legacy `resolutions` / `max_images` pair, and typed parameter
schemas ({"type": "enum", "values", "default"}, {"type": "range", "min", "max", "default"},
{"type": "boolean"}). seedream-5.0 is a model no manifest names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

from . import images
from .base import Call, Emulator, GatewayError, Handler, Reply, is_int, is_number, parse_size

MAX_DATA_URL_CHARS = 4_000_000
_TOKEN_SIZES = {"auto": (1024, 1024), "2K": (2048, 2048), "4K": (4096, 4096)}  # sizes that are not WxH
UNLIMITED_BALANCE = 999_999.0
FIELDS = frozenset(
    {
        "prompt",
        "model",
        "n",
        "size",
        "response_format",
        "user",
        "imageDataUrl",
        "imageDataUrls",
        "maskDataUrl",
        "strength",
        "guidance_scale",
        "num_inference_steps",
        "seed",
        "kontext_max_mode",
        "quality",
    }
)
KNOBS = ("strength", "guidance_scale", "num_inference_steps", "seed", "kontext_max_mode", "quality")
# Typed schema of each knob, as the detailed listing gives it.
KNOB_SCHEMAS: dict[str, dict[str, Any]] = {
    "strength": {"type": "range", "min": 0, "max": 1, "default": 0.8},
    "guidance_scale": {"type": "range", "min": 0, "max": 20, "default": 7.5},
    "num_inference_steps": {"type": "range", "min": 1, "max": 100, "default": 30},
    "seed": {"type": "range", "min": 0, "max": 4294967295},
    "kontext_max_mode": {"type": "boolean", "default": False},
    "quality": {"type": "enum", "values": ["low", "medium", "high", "auto"], "default": "auto"},
}


@dataclass(frozen=True)
class NanoModel:
    id: str
    name: str
    description: str
    resolutions: tuple[str, ...]
    max_n: int
    text_to_image: bool
    image_to_image: bool
    inpainting: bool
    max_input_images: int  # 0: no image input
    knobs: frozenset[str]  # which of KNOBS the model takes
    price: float  # USD per image
    requires_mask: bool = False
    states_multi_image: bool = False  # whether the listing says `multi_image` (most entries do not)
    created: int = 1735689600
    owned_by: str = "nano-gpt"

    def capabilities(self) -> dict[str, bool]:
        caps = {
            "image_generation": self.text_to_image,
            "text_to_image": self.text_to_image,
            "image_to_image": self.image_to_image,
            "inpainting": self.inpainting,
            "nsfw": False,
        }
        if self.states_multi_image:
            caps["multi_image"] = self.max_input_images > 1
        return caps


MODELS: dict[str, NanoModel] = {
    m.id: m
    for m in (
        NanoModel(
            "hidream",
            "HiDream",
            "HiDream-I1: fast, high-quality text-to-image.",
            ("1024x1024", "768x1360", "1360x768"),
            4,
            True,
            False,
            False,
            0,
            frozenset({"guidance_scale", "num_inference_steps", "seed"}),
            0.01,
        ),
        NanoModel(
            "flux-kontext",
            "Flux Kontext",
            "FLUX.1 Kontext: generation and in-context image editing.",
            ("1024x1024", "1376x768", "768x1376"),
            1,
            True,
            True,
            False,
            4,
            frozenset({"strength", "guidance_scale", "seed", "kontext_max_mode"}),
            0.04,
        ),
        NanoModel(
            "flux-lora/inpainting",
            "Flux Inpainting",
            "FLUX inpainting: edits the white area of a mask.",
            ("1024x1024",),
            1,
            False,
            True,
            True,
            1,
            frozenset({"strength", "guidance_scale", "num_inference_steps", "seed"}),
            0.035,
            requires_mask=True,
        ),
        NanoModel(  # OpenAI shut it down; nano-gpt still routes it to a provider that serves it
            "gpt-image-1",
            "GPT Image 1",
            "OpenAI gpt-image-1: generation and multi-image editing.",
            ("1024x1024", "1536x1024", "1024x1536", "auto"),
            4,
            True,
            True,
            False,
            8,
            frozenset(),
            0.04,
        ),
        NanoModel(
            "gpt-image-2",
            "GPT Image 2",
            "OpenAI gpt-image-2: generation and editing with up to 16 reference images.",
            ("auto", "1024x1024", "1536x1024", "1024x1536", "2048x2048", "3840x2160", "2160x3840"),
            4,
            True,
            True,
            False,
            16,
            frozenset({"quality"}),
            0.06551,
            states_multi_image=True,
            created=1776729600,
            owned_by="openai",
        ),
        NanoModel(  # no manifest names it: what nano-gpt says about it is all there is
            "seedream-5.0",
            "Seedream 5.0",
            "ByteDance Seedream 5.0: 2K/4K generation and editing with up to 14 reference images.",
            ("2K", "4K", "2048x2048", "2304x1728", "1728x2304", "2560x1440", "1440x2560"),
            4,
            True,
            True,
            False,
            14,
            frozenset({"seed", "guidance_scale"}),
            0.03,
            states_multi_image=True,
            created=1794960000,
            owned_by="bytedance",
        ),
    )
}


class NanoGptEmulator(Emulator):
    provider_id: ClassVar[str] = "nano-gpt"

    def __init__(
        self,
        *args: Any,
        balance: float | None = 100.0,
        payment_source: str = "USD",
        url_fallback: bool = False,
        **kwargs: Any,
    ) -> None:
        self.balance = balance  # USD; None: unlimited (remainingBalance then reports UNLIMITED_BALANCE)
        self.payment_source = payment_source  # "USD" or "XNO"
        self.url_fallback = url_fallback  # url requests get b64_json, as when presigning fails
        super().__init__(*args, **kwargs)

    def routes_spec(self) -> list[tuple[str, list[str], Handler, bool]]:
        return [
            ("/v1/images/generations", ["POST"], self._generations, True),
            ("/api/v1/image-models", ["GET"], self._discovery, False),
        ]

    def url_falls_back(self) -> bool:
        return self.url_fallback

    # -- errors ----------------------------------------------------------------------------------

    def render_error(self, err: GatewayError) -> Reply:
        if err.status == 402:  # the legacy shape, still sent for balance errors
            return Reply(402, {"error": err.message, "status": 402})
        return Reply(err.status, {"error": {"message": err.message, "type": err.type or "invalid_request_error"}})

    def bad(self, message: str, status: int = 400) -> GatewayError:
        return GatewayError(status, message, type="invalid_request_error")

    def auth_error(self, token: str | None) -> GatewayError:
        if token is None:
            return GatewayError(401, "Missing API key", type="authentication_error")
        return GatewayError(401, "Invalid API key", type="authentication_error")

    def route_not_found(self, call: Call) -> GatewayError:
        return GatewayError(404, f"Not found: {call.rec.method} {call.path}", type="not_found_error")

    def status_error(self, status: int, code: str | None, message: str | None) -> GatewayError:
        defaults = {
            401: ("Invalid API key", "authentication_error"),
            402: ("Insufficient balance", "insufficient_balance"),
            429: ("Rate limit exceeded", "rate_limit_error"),
            500: ("Internal server error", "server_error"),
            502: ("Image provider error", "upstream_error"),
            503: ("Service temporarily unavailable", "server_error"),
            504: ("Image generation timed out", "timeout_error"),
        }
        msg, type_ = defaults.get(status, (f"HTTP {status}", "api_error"))
        return GatewayError(status, message or msg, type=type_, code=code)

    # -- discovery --------------------------------------------------------------------------------

    async def _discovery(self, call: Call) -> Reply:
        detailed = call.rec.query.get("detailed", "").lower() == "true"
        data = []
        for m in MODELS.values():
            entry: dict[str, Any] = {"id": m.id, "name": m.name, "object": "model"}
            if detailed:
                entry.update(self._details(m))
            data.append(entry)
        meta = {"count": len(data), "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
        return Reply(200, {"object": "list", "data": data, "meta": meta})

    def _details(self, m: NanoModel) -> dict[str, Any]:
        params: dict[str, Any] = {
            "resolutions": list(m.resolutions),
            "max_images": m.max_n,
            "resolution": {"type": "enum", "values": list(m.resolutions), "default": m.resolutions[0]},
            "n": {"type": "range", "min": 1, "max": m.max_n, "default": 1},
        }
        if m.max_input_images:
            params["max_input_images"] = m.max_input_images
        if m.requires_mask:
            params["mask"] = {"required": True, "white_area": "edit"}
        for knob in KNOBS:
            if knob in m.knobs:
                params[knob] = KNOB_SCHEMAS[knob]
        inputs = ["text", "image"] if m.max_input_images else ["text"]
        details: dict[str, Any] = {
            "created": m.created,
            "owned_by": m.owned_by,
            "description": m.description,
            "architecture": {
                "modality": "+".join(inputs) + "->image",
                "input_modalities": inputs,
                "output_modalities": ["image"],
            },
            "capabilities": m.capabilities(),
            "supported_parameters": params,
            "pricing": {"per_image": m.price, "currency": "USD"},
        }
        if m.max_input_images:
            details["input_reference_constraints"] = {
                "max_items": m.max_input_images,
                "max_bytes": MAX_DATA_URL_CHARS,
                "formats": ["png", "jpeg", "webp"],
            }
        return details

    # -- generations ------------------------------------------------------------------------------

    def _data_url(self, value: Any, field: str) -> bytes:
        if not isinstance(value, str):
            raise self.bad(f"{field} must be a base64 data URL string")
        if len(value) > MAX_DATA_URL_CHARS:
            raise self.bad(f"Image too large: {field} is {len(value)} bytes after encoding, max 4MB", 413)
        try:
            return images.parse_data_url(value)[1]
        except ValueError as exc:
            raise self.bad(f"Invalid {field}: {exc}. Expected data:image/[type];base64,[data]") from None

    async def _generations(self, call: Call) -> Reply:
        self.check_auth(call)
        rec = call.rec
        ctype = rec.content_type.split(";")[0].strip().lower()
        if ctype != "application/json":
            raise self.bad(f"Unsupported Content-Type '{ctype or 'none'}': send application/json", 415)
        if rec.json_error is not None or not isinstance(rec.json, dict):
            raise self.bad("Invalid JSON body")
        body: dict[str, Any] = rec.json
        for name in body:
            if name not in FIELDS:
                raise self.bad(f"Unknown parameter: '{name}'")

        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise self.bad("prompt is required and must be a non-empty string")
        model_id = body.get("model", "hidream")
        model = MODELS.get(model_id) if isinstance(model_id, str) else None
        if model is None:
            raise self.bad(f"Invalid model: {model_id!r}. See GET /api/v1/image-models for available models")
        n = body.get("n", 1)
        if not is_int(n) or not 1 <= n <= model.max_n:
            raise self.bad(f"n must be an integer between 1 and {model.max_n} for model {model.id}")
        size = body.get("size", model.resolutions[0])
        if size not in model.resolutions:
            raise self.bad(
                f"Invalid size {size!r} for model {model.id}. Supported resolutions: {', '.join(model.resolutions)}"
            )
        response_format = body.get("response_format", "b64_json")
        if response_format not in ("b64_json", "url"):
            raise self.bad("response_format must be 'b64_json' or 'url'")
        if "user" in body and not isinstance(body["user"], str):
            raise self.bad("user must be a string")

        # Inputs: sizes first (413), then whether the model takes them.
        inputs: list[bytes] = []
        if "imageDataUrl" in body:
            inputs.append(self._data_url(body["imageDataUrl"], "imageDataUrl"))
        if "imageDataUrls" in body:
            urls = body["imageDataUrls"]
            if not isinstance(urls, list) or not urls:
                raise self.bad("imageDataUrls must be a non-empty array of data URLs")
            inputs += [self._data_url(u, f"imageDataUrls[{i}]") for i, u in enumerate(urls)]
        mask = self._data_url(body["maskDataUrl"], "maskDataUrl") if "maskDataUrl" in body else None
        if inputs and model.max_input_images == 0:
            raise self.bad(f"{model.id}: model does not support image input")
        if len(inputs) > model.max_input_images:
            raise self.bad(f"{model.id} accepts at most {model.max_input_images} input image(s), got {len(inputs)}")
        if mask is not None and not model.inpainting:
            raise self.bad(f"{model.id}: model does not support masks (maskDataUrl)")
        if model.requires_mask and (mask is None or not inputs):
            raise self.bad(f"{model.id} requires both imageDataUrl and maskDataUrl (white = area to edit)")
        if not inputs and not model.text_to_image:
            raise self.bad(f"{model.id} requires an input image")
        if mask is not None:
            im, mk = images.image_info(inputs[0]), images.image_info(mask)
            if im is None or mk is None or (im.width, im.height) != (mk.width, mk.height):
                raise self.bad("maskDataUrl must have the same dimensions as the input image")
        self._check_knobs(model, body)

        cost = round(model.price * n, 6)
        if self.balance is not None and self.balance < cost:
            raise GatewayError(402, "Insufficient balance")
        width, height = _TOKEN_SIZES.get(size) or parse_size(size)
        data = await self.make_images(call, n=n, width=width, height=height, response_format=response_format)
        if self.balance is not None:
            self.balance = round(self.balance - cost, 6)
        return Reply(
            200,
            {
                "created": int(time.time()),
                "data": data,
                "cost": cost,
                "paymentSource": self.payment_source,
                "remainingBalance": self.balance if self.balance is not None else UNLIMITED_BALANCE,
            },
        )

    def _check_knobs(self, model: NanoModel, body: dict[str, Any]) -> None:
        for knob in KNOBS:
            if knob not in body:
                continue
            value = body[knob]
            if knob not in model.knobs:
                raise self.bad(f"Parameter '{knob}' is not supported by model {model.id}")
            if knob == "strength" and not (is_number(value) and 0 <= value <= 1):
                raise self.bad("strength must be a number between 0 and 1")
            if knob == "guidance_scale" and not (is_number(value) and 0 <= value <= 20):
                raise self.bad("guidance_scale must be a number between 0 and 20")
            if knob == "num_inference_steps" and not (is_int(value) and 1 <= value <= 100):
                raise self.bad("num_inference_steps must be an integer between 1 and 100")
            if knob == "seed" and not is_int(value):
                raise self.bad("seed must be an integer")
            if knob == "kontext_max_mode" and not isinstance(value, bool):
                raise self.bad("kontext_max_mode must be a boolean")
            if knob == "quality" and value not in KNOB_SCHEMAS["quality"]["values"]:
                raise self.bad(f"quality must be one of: {', '.join(KNOB_SCHEMAS['quality']['values'])}")
