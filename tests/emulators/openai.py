"""OpenAI Images API as on 2026-12-01: /v1/images/generations (JSON), /v1/images/edits
(multipart), /v1/models.

Live: the gpt-image-2 family (gpt-image-2, -2.5-flare/-sunburst, -2.6-flare/-sunburst and
gpt-image-2.7-nova, a release no manifest names). They answer base64 only and refuse
`response_format`; `size` is `auto` or any WxH by rule (SIZE_RULE); quality tiers grow with the
version; `complexity` and gif/svg output exist on 2.6 only; a transparent background and
`input_fidelity` are refused; edits take up to 16 `image[]` and a PNG mask whose transparent
pixels mark the area. Shut-down models (SHUT_DOWN) answer 404 model_not_found "has been
deprecated". `/v1/models` gives each model a `shutdown_date` (YYYY-MM-DD or null).

The gpt-image-1 / dall-e-3 / dall-e-2 specs stay for gateways that still serve those ids:
`OpenAIEmulator(serve_retired=True)` answers them as before the shutdowns (for tests whose
subject is not the model world), and NexLLM reuses this dialect with its own model set.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from . import images
from .base import Call, Emulator, GatewayError, Handler, Reply, UploadedFile, is_int, mask_key, parse_size

CONTENT_POLICY_TRIGGER = "forbidden-content"

# Every parameter the endpoints know; which of them a model takes is in ImageModel.
GEN_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "n",
        "size",
        "quality",
        "response_format",
        "style",
        "user",
        "background",
        "moderation",
        "output_format",
        "output_compression",
    }
)
EDIT_FIELDS = frozenset(
    {
        "image",
        "image[]",
        "mask",
        "model",
        "prompt",
        "n",
        "size",
        "quality",
        "response_format",
        "user",
        "background",
        "output_format",
        "output_compression",
        "input_fidelity",
    }
)
EDIT_FILE_FIELDS = frozenset({"image", "image[]", "mask"})
_GPT_IMAGE_GEN = frozenset(
    {
        "model",
        "prompt",
        "n",
        "size",
        "quality",
        "user",
        "background",
        "moderation",
        "output_format",
        "output_compression",
    }
)
_GPT_IMAGE_EDIT = frozenset(
    {
        "image",
        "image[]",
        "mask",
        "model",
        "prompt",
        "n",
        "size",
        "quality",
        "user",
        "background",
        "output_format",
        "output_compression",
        "input_fidelity",
    }
)
_GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
_DALLE3_SIZES = ("1024x1024", "1792x1024", "1024x1792")
_DALLE2_SIZES = ("256x256", "512x512", "1024x1024")

# gpt-image output tokens by quality and size (OpenAI's published table).
_OUTPUT_TOKENS = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
_TOKENS_PER_INPUT_IMAGE = 323

_MB = 1024 * 1024


@dataclass(frozen=True)
class ImageModel:
    id: str
    family: str  # "gpt-image" | "dall-e-3" | "dall-e-2" | "imagen"
    sizes: tuple[str, ...]
    max_n: int
    max_prompt: int
    gen_fields: frozenset[str]
    edit_fields: frozenset[str] = frozenset()  # empty: the model does not edit
    default_size: str = "1024x1024"
    default_response_format: str | None = "url"  # None: always b64_json, `response_format` rejected
    qualities: tuple[str, ...] = ()
    default_quality: str | None = None
    styles: tuple[str, ...] = ()
    max_images: int = 1  # input images per edit
    created: int = 1698785189
    owned_by: str = "system"
    shutdown_date: str | None = None  # listed by /v1/models; a future date: deprecated but served
    complexity: bool = False  # takes `complexity` (gpt-image-2.6)
    vector_outputs: bool = False  # generations may ask for output_format gif (animated) or svg

    @property
    def takes_gpt_image_fields(self) -> bool:
        return self.family in ("gpt-image", "gpt-image-2")


GPT_IMAGE_1 = ImageModel(
    "gpt-image-1",
    "gpt-image",
    _GPT_IMAGE_SIZES,
    10,
    32000,
    _GPT_IMAGE_GEN,
    _GPT_IMAGE_EDIT,
    default_size="auto",
    default_response_format=None,
    qualities=("low", "medium", "high", "auto"),
    default_quality="auto",
    max_images=16,
    created=1745517030,
)
GPT_IMAGE_1_MINI = replace(GPT_IMAGE_1, id="gpt-image-1-mini", created=1759276800)
DALL_E_3 = ImageModel(
    "dall-e-3",
    "dall-e-3",
    _DALLE3_SIZES,
    1,
    4000,
    frozenset({"model", "prompt", "n", "size", "quality", "response_format", "style", "user"}),
    qualities=("standard", "hd"),
    default_quality="standard",
    styles=("vivid", "natural"),
    created=1698785189,
)
DALL_E_2 = ImageModel(
    "dall-e-2",
    "dall-e-2",
    _DALLE2_SIZES,
    10,
    1000,
    frozenset({"model", "prompt", "n", "size", "response_format", "user"}),
    frozenset({"image", "image[]", "mask", "model", "prompt", "n", "size", "response_format", "user"}),
    created=1698798177,
)

# gpt-image-2 family: custom sizes by rule instead of a list.
SIZE_MULTIPLE = 16
SIZE_MAX_SIDE = 3840
SIZE_MAX_RATIO = 3
SIZE_MIN_PIXELS = 655_360
SIZE_MAX_PIXELS = 8_294_400
SIZE_RULE = (
    f"'auto' or WIDTHxHEIGHT where both sides are multiples of {SIZE_MULTIPLE}, the longest side is at most "
    f"{SIZE_MAX_SIDE}, the aspect ratio is at most {SIZE_MAX_RATIO}:1 and the image has between "
    f"{SIZE_MIN_PIXELS:,} and {SIZE_MAX_PIXELS:,} pixels"
)
_GPT2_QUALITIES = ("low", "medium", "high", "auto")
_GPT25_QUALITIES = ("low", "medium", "high", "xhigh", "max", "auto")
_RASTER_FORMATS = ("png", "jpeg", "webp")
_COMPLEXITIES = ("low", "medium", "high")
# Output tokens of a 1024x1024 image by quality; other sizes scale with their pixel count.
_GPT2_TOKENS_PER_MEGAPIXEL = {"low": 272, "medium": 1056, "high": 4160, "xhigh": 8320, "max": 16640}

GPT_IMAGE_2 = ImageModel(
    "gpt-image-2",
    "gpt-image-2",
    (),
    10,
    32000,
    _GPT_IMAGE_GEN,
    _GPT_IMAGE_EDIT,
    default_size="auto",
    default_response_format=None,
    qualities=_GPT2_QUALITIES,
    default_quality="auto",
    max_images=16,
    created=1776729600,  # 2026-04-21
    shutdown_date="2027-03-02",  # deprecated for 2.5/2.6, still served until then
)
GPT_IMAGE_2_5_FLARE = replace(
    GPT_IMAGE_2, id="gpt-image-2.5-flare", qualities=_GPT25_QUALITIES, created=1788825600, shutdown_date=None
)
GPT_IMAGE_2_5_SUNBURST = replace(GPT_IMAGE_2_5_FLARE, id="gpt-image-2.5-sunburst")
GPT_IMAGE_2_6_FLARE = replace(
    GPT_IMAGE_2_5_FLARE,
    id="gpt-image-2.6-flare",
    gen_fields=_GPT_IMAGE_GEN | {"complexity"},
    edit_fields=_GPT_IMAGE_EDIT | {"complexity"},
    complexity=True,
    vector_outputs=True,
    created=1793750400,  # 2026-11-04
)
GPT_IMAGE_2_6_SUNBURST = replace(GPT_IMAGE_2_6_FLARE, id="gpt-image-2.6-sunburst")
# A release after every manifest was written: the family's rules, 2.5's tiers, no 2.6 extras.
GPT_IMAGE_2_7_NOVA = replace(GPT_IMAGE_2_5_FLARE, id="gpt-image-2.7-nova", created=1795996800)
GPT_IMAGE_2_FAMILY = (
    GPT_IMAGE_2,
    GPT_IMAGE_2_5_FLARE,
    GPT_IMAGE_2_5_SUNBURST,
    GPT_IMAGE_2_6_FLARE,
    GPT_IMAGE_2_6_SUNBURST,
    GPT_IMAGE_2_7_NOVA,
)

# Models OpenAI has shut down, with the day; requests for them answer 404 model_not_found.
SHUT_DOWN: dict[str, str] = {
    "dall-e-2": "2026-05-12",
    "dall-e-3": "2026-05-12",
    "gpt-image-1": "2026-10-23",
    "gpt-image-1-mini": "2026-12-01",
    "gpt-image-1.5": "2026-12-01",
    "chatgpt-image-latest": "2026-12-01",
}

RETIRED = (GPT_IMAGE_1, GPT_IMAGE_1_MINI, DALL_E_3, DALL_E_2)  # served with serve_retired=True

NON_IMAGE_MODELS = {  # listed by /v1/models, refused by the image endpoints
    "gpt-4o": 1715367049,
    "gpt-4o-mini": 1721172741,
    "text-embedding-3-small": 1705948997,
    "whisper-1": 1677532384,
}


def _choices(values: tuple[str, ...] | list[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f", and {quoted[-1]}"


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


class OpenAIEmulator(Emulator):
    provider_id: ClassVar[str] = "openai"
    image_models: ClassVar[dict[str, ImageModel]] = {m.id: m for m in GPT_IMAGE_2_FAMILY}
    other_models: ClassVar[dict[str, int]] = NON_IMAGE_MODELS
    shut_down: ClassVar[dict[str, str]] = SHUT_DOWN
    default_model: ClassVar[str | None] = "gpt-image-2"  # None: `model` is required

    def __init__(self, *args: Any, serve_retired: bool = False, **kwargs: Any) -> None:
        if serve_retired:  # a gateway that still serves the old ids, as OpenAI did before 2026-05-12
            retired = {m.id: m for m in RETIRED}
            self.image_models = {**retired, **self.image_models}
            self.shut_down = {k: v for k, v in self.shut_down.items() if k not in retired}
            self.default_model = "dall-e-2"
        super().__init__(*args, **kwargs)

    def routes_spec(self) -> list[tuple[str, list[str], Handler, bool]]:
        return [
            ("/v1/images/generations", ["POST"], self._generations, True),
            ("/v1/images/edits", ["POST"], self._edits, True),
            ("/v1/models", ["GET"], self._models, False),
        ]

    # -- errors ----------------------------------------------------------------------------------

    def render_error(self, err: GatewayError) -> Reply:
        return Reply(
            err.status,
            {
                "error": {
                    "message": err.message,
                    "type": err.type or "invalid_request_error",
                    "param": err.param,
                    "code": err.code,
                }
            },
        )

    def auth_error(self, token: str | None) -> GatewayError:
        if token is None:
            return GatewayError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with "
                "blank username) if you're accessing the API from your browser and are prompted for a "
                "username and password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
                type="invalid_request_error",
                code=None,
            )
        return GatewayError(
            401,
            f"Incorrect API key provided: {mask_key(token)}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            type="invalid_request_error",
            code="invalid_api_key",
        )

    def status_error(self, status: int, code: str | None, message: str | None) -> GatewayError:
        if status == 429 and code == "insufficient_quota":
            return GatewayError(
                429,
                message
                or (
                    "You exceeded your current quota, please check your plan and billing details. For more "
                    "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
                ),
                type="insufficient_quota",
                code="insufficient_quota",
            )
        table: dict[int, tuple[str, str, str | None]] = {
            400: ("Bad request.", "invalid_request_error", None),
            401: (
                f"Incorrect API key provided: {mask_key('sk-emulator')}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                "invalid_api_key",
            ),
            403: (
                "Country, region, or territory not supported",
                "request_forbidden",
                "unsupported_country_region_territory",
            ),
            404: (
                "The model does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            ),
            408: ("Request timed out.", "timeout", None),
            409: ("The request conflicted with another request.", "invalid_request_error", None),
            429: (
                "Rate limit reached for images per minute (IPM) in organization org-emulator: Limit 5, "
                "Used 5, Requested 1. Please try again in 12s.",
                "requests",
                "rate_limit_exceeded",
            ),
            500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
            502: ("Bad gateway.", "server_error", None),
            503: ("The engine is currently overloaded, please try again later.", "server_error", None),
            504: ("Gateway timeout.", "server_error", None),
        }
        default_msg, type_, default_code = table.get(status, (f"HTTP {status}", "api_error", None))
        return GatewayError(status, message or default_msg, type=type_, code=code or default_code)

    def bad_request(self, message: str, param: str | None = None, code: str | None = None) -> GatewayError:
        return GatewayError(400, message, type="invalid_request_error", param=param, code=code)

    def unknown_parameter(self, name: str) -> GatewayError:
        return self.bad_request(f"Unknown parameter: '{name}'.", name, "unknown_parameter")

    def unknown_model(self, model_id: str) -> GatewayError:
        return GatewayError(
            404,
            f"The model '{model_id}' does not exist or you do not have access to it.",
            type="invalid_request_error",
            code="model_not_found",
        )

    def shut_down_model(self, model_id: str) -> GatewayError:
        return GatewayError(
            404,
            f"The model '{model_id}' has been deprecated, learn more here: "
            "https://platform.openai.com/docs/deprecations",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )

    def check_model_access(self, model: ImageModel) -> None:
        """Hook for relays that gate models by key group."""

    def drops_unknown_fields(self, model_id: Any) -> bool:
        """Whether fields the model does not take are dropped silently (relays) instead of refused."""
        return False

    # -- /v1/models -----------------------------------------------------------------------------

    def listed_models(self) -> list[dict[str, Any]]:
        out = [
            {
                "id": m.id,
                "object": "model",
                "created": m.created,
                "owned_by": m.owned_by,
                "shutdown_date": m.shutdown_date,
            }
            for m in self.image_models.values()
        ]
        out += [
            {"id": mid, "object": "model", "created": created, "owned_by": "system", "shutdown_date": None}
            for mid, created in self.other_models.items()
        ]
        return out

    async def _models(self, call: Call) -> Reply:
        self.check_auth(call)
        return Reply(200, {"object": "list", "data": self.listed_models()})

    # -- shared validation ----------------------------------------------------------------------

    def _resolve_model(self, raw: Any, action: str) -> ImageModel:
        if raw is None:
            if self.default_model is None:
                raise self.bad_request("Missing required parameter: 'model'.", "model", "missing_required_parameter")
            raw = self.default_model
        if not isinstance(raw, str):
            raise self.bad_request(
                f"Invalid type for 'model': expected a string, but got {_type_name(raw)} instead.",
                "model",
                "invalid_type",
            )
        model = self.image_models.get(raw)
        if model is None:
            if raw in self.shut_down:
                raise self.shut_down_model(raw)
            if raw in self.other_models:
                supported = [m.id for m in self.image_models.values() if action == "generate" or m.edit_fields]
                raise self.bad_request(
                    f"Invalid value: '{raw}'. Supported values are: {_choices(supported)}.", "model", "invalid_value"
                )
            raise self.unknown_model(raw)
        self.check_model_access(model)
        return model

    def _enum(self, params: dict[str, Any], name: str, allowed: tuple[str, ...], default: str | None) -> str | None:
        value = params.get(name, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.bad_request(
                f"Invalid type for '{name}': expected one of {_choices(allowed)}, but got {_type_name(value)} instead.",
                name,
                "invalid_type",
            )
        if value not in allowed:
            raise self.bad_request(
                f"Invalid value: '{value}'. Supported values are: {_choices(allowed)}.", name, "invalid_value"
            )
        return value

    def _int(
        self, params: dict[str, Any], name: str, default: int | None, lo: int, hi: int, from_form: bool
    ) -> int | None:
        value = params.get(name, default)
        if value is None:
            return None
        if from_form and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise self.bad_request(
                    f"Invalid type for '{name}': expected an integer, but got a string instead.", name, "invalid_type"
                ) from None
        if not is_int(value):
            raise self.bad_request(
                f"Invalid type for '{name}': expected an integer, but got {_type_name(value)} instead.",
                name,
                "invalid_type",
            )
        if value < lo:
            raise self.bad_request(
                f"Invalid '{name}': integer below minimum value. Expected a value >= {lo}, but got {value} instead.",
                name,
                "integer_below_min_value",
            )
        if value > hi:
            raise self.bad_request(
                f"Invalid '{name}': integer above maximum value. Expected a value <= {hi}, but got {value} instead.",
                name,
                "integer_above_max_value",
            )
        return value

    def _common(self, model: ImageModel, params: dict[str, Any], from_form: bool) -> dict[str, Any]:
        """Validate the parameters shared by generations and edits; return the effective values."""
        prompt = params.get("prompt")
        if prompt is None:
            raise self.bad_request("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
        if not isinstance(prompt, str):
            raise self.bad_request(
                f"Invalid type for 'prompt': expected a string, but got {_type_name(prompt)} instead.",
                "prompt",
                "invalid_type",
            )
        if not prompt.strip():
            raise self.bad_request(
                "Invalid 'prompt': empty string. Expected a string with minimum length 1, but "
                "got an empty string instead.",
                "prompt",
                "empty_string",
            )
        if len(prompt) > model.max_prompt:
            raise self.bad_request(
                f"Invalid 'prompt': string too long. Expected a string with maximum length "
                f"{model.max_prompt}, but got a string with length {len(prompt)} instead.",
                "prompt",
                "string_above_max_length",
            )
        if "user" in params and not isinstance(params["user"], str):
            raise self.bad_request(
                f"Invalid type for 'user': expected a string, but got {_type_name(params['user'])} instead.",
                "user",
                "invalid_type",
            )
        out: dict[str, Any] = {"prompt": prompt}
        out["n"] = self._int(params, "n", 1, 1, model.max_n, from_form)
        if model.family == "gpt-image-2":
            out["size"] = self._size_by_rule(params.get("size", model.default_size))
        else:
            out["size"] = self._enum(params, "size", model.sizes, model.default_size)
        if model.qualities:
            out["quality"] = self._enum(params, "quality", model.qualities, model.default_quality)
        if model.styles:
            out["style"] = self._enum(params, "style", model.styles, "vivid")
        if model.default_response_format is not None:
            out["response_format"] = self._enum(
                params, "response_format", ("url", "b64_json"), model.default_response_format
            )
        else:
            out["response_format"] = "b64_json"
        if model.family == "gpt-image-2":
            if params.get("background") == "transparent":
                raise self.bad_request(
                    f"Invalid value: 'transparent'. Transparent backgrounds are not supported with the model "
                    f"'{model.id}'. Supported values are: 'opaque' and 'auto'.",
                    "background",
                    "invalid_value",
                )
            out["background"] = self._enum(params, "background", ("opaque", "auto"), "auto")
            formats = _RASTER_FORMATS + (("gif", "svg") if model.vector_outputs and not from_form else ())
            out["output_format"] = self._enum(params, "output_format", formats, "png")
            if model.complexity:
                out["complexity"] = self._enum(params, "complexity", _COMPLEXITIES, "medium")
        if model.takes_gpt_image_fields:
            if model.family == "gpt-image":
                out["background"] = self._enum(params, "background", ("transparent", "opaque", "auto"), "auto")
                out["output_format"] = self._enum(params, "output_format", _RASTER_FORMATS, "png")
            out["output_compression"] = self._int(params, "output_compression", None, 0, 100, from_form)
            if "moderation" in model.gen_fields:
                out["moderation"] = self._enum(params, "moderation", ("low", "auto"), "auto")
            if out["background"] == "transparent" and out["output_format"] == "jpeg":
                raise self.bad_request(
                    "Transparent background is not supported for the 'jpeg' output format. Use 'png' or 'webp'.",
                    "background",
                    "invalid_value",
                )
        if CONTENT_POLICY_TRIGGER in prompt:
            raise self.bad_request(
                "Your request was rejected as a result of our safety system. Your prompt may contain text that "
                "is not allowed by our safety system.",
                None,
                "content_policy_violation",
            )
        return out

    def _size_by_rule(self, value: Any) -> str:
        """gpt-image-2's size: 'auto' or any WxH the rule allows; the error states the rule."""
        if not isinstance(value, str):
            raise self.bad_request(
                f"Invalid type for 'size': expected a string, but got {_type_name(value)} instead.",
                "size",
                "invalid_type",
            )
        if value == "auto":
            return value
        w_text, sep, h_text = value.partition("x")
        if not (sep and w_text.isdigit() and h_text.isdigit()):
            raise self._bad_size(value, "it is not in WIDTHxHEIGHT form")
        w, h = int(w_text), int(h_text)
        if w % SIZE_MULTIPLE or h % SIZE_MULTIPLE:
            raise self._bad_size(value, f"both sides must be multiples of {SIZE_MULTIPLE}")
        if max(w, h) > SIZE_MAX_SIDE:
            raise self._bad_size(value, f"the longest side must be at most {SIZE_MAX_SIDE}")
        if max(w, h) > SIZE_MAX_RATIO * min(w, h):
            raise self._bad_size(value, f"the aspect ratio must be at most {SIZE_MAX_RATIO}:1")
        if not SIZE_MIN_PIXELS <= w * h <= SIZE_MAX_PIXELS:
            raise self._bad_size(
                value, f"the image must have between {SIZE_MIN_PIXELS:,} and {SIZE_MAX_PIXELS:,} pixels, not {w * h:,}"
            )
        return value

    def _bad_size(self, value: str, reason: str) -> GatewayError:
        return self.bad_request(
            f"Invalid value for 'size': '{value}' ({reason}). Supported values are {SIZE_RULE}.",
            "size",
            "invalid_value",
        )

    def _output_size(self, size: str) -> tuple[int, int]:
        return (1024, 1024) if size == "auto" else parse_size(size)

    async def _answer(
        self,
        call: Call,
        model: ImageModel,
        p: dict[str, Any],
        input_images: int,
        extra_fields: frozenset[str] = frozenset(),
    ) -> Reply:
        width, height = self._output_size(p["size"])
        fmt = p.get("output_format") or "png"
        transparent = p.get("background") == "transparent"
        quality = p.get("output_compression") if fmt in ("jpeg", "webp") else None
        data = await self.make_images(
            call,
            n=p["n"],
            width=width,
            height=height,
            response_format=p["response_format"],
            fmt=fmt,
            transparent=transparent,
            quality=quality,
        )
        body: dict[str, Any] = {"created": int(time.time())}
        if model.family == "dall-e-3":
            for item in data:
                item["revised_prompt"] = f"A detailed, vivid rendition of: {p['prompt']}"
        if model.takes_gpt_image_fields:
            quality_used = "medium" if p["quality"] == "auto" else p["quality"]
            size_used = f"{width}x{height}"
            text_tokens = max(1, math.ceil(len(p["prompt"]) / 4))
            image_tokens = input_images * _TOKENS_PER_INPUT_IMAGE
            if model.family == "gpt-image-2":
                per_image = _GPT2_TOKENS_PER_MEGAPIXEL[quality_used] * width * height // (1024 * 1024)
            else:
                per_image = _OUTPUT_TOKENS[quality_used].get(size_used, 1056)
            output_tokens = max(1, per_image) * p["n"]
            body.update(
                {
                    "background": "transparent" if transparent else "opaque",
                    "data": data,
                    "output_format": fmt,
                    "quality": quality_used,
                    "size": size_used,
                    "usage": {
                        "input_tokens": text_tokens + image_tokens,
                        "input_tokens_details": {"image_tokens": image_tokens, "text_tokens": text_tokens},
                        "output_tokens": output_tokens,
                        "total_tokens": text_tokens + image_tokens + output_tokens,
                    },
                }
            )
        else:
            body["data"] = data
        return Reply(200, body)

    # -- /v1/images/generations -----------------------------------------------------------------

    def json_body(self, call: Call) -> dict[str, Any]:
        ctype = call.rec.content_type.split(";")[0].strip().lower()
        if ctype != "application/json":
            raise self.bad_request(f"Invalid Content-Type header ({ctype or 'none'}), expected application/json.")
        if call.rec.json_error is not None or not call.rec.body:
            raise self.bad_request(
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
                "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid "
                "JSON. If you have trouble figuring out how to fix this, please contact us through our help center "
                "at help.openai.com.)"
            )
        if not isinstance(call.rec.json, dict):
            raise self.bad_request(
                f"Invalid type for body: expected an object, but got {_type_name(call.rec.json)} instead."
            )
        return call.rec.json

    async def _generations(self, call: Call) -> Reply:
        self.check_auth(call)
        body = self.json_body(call)
        drops = self.drops_unknown_fields(body.get("model"))
        if drops:
            body = {k: v for k, v in body.items() if k in GEN_FIELDS}
        for name in body:
            if name not in GEN_FIELDS | {"complexity"}:
                raise self.unknown_parameter(name)
        model = self._resolve_model(body.get("model"), "generate")
        if drops:
            body = {k: v for k, v in body.items() if k in model.gen_fields}
        for name in body:
            if name not in model.gen_fields:
                raise self.unknown_parameter(name)
        params = self._common(model, body, from_form=False)
        return await self._answer(call, model, params, input_images=0)

    # -- /v1/images/edits -----------------------------------------------------------------------

    async def _edits(self, call: Call) -> Reply:
        self.check_auth(call)
        rec = call.rec
        ctype = rec.content_type.split(";")[0].strip().lower()
        if ctype != "multipart/form-data":
            raise self.bad_request(
                f"Invalid Content-Type header ({ctype or 'none'}), expected multipart/form-data. "
                "(HINT: If you're using curl, you can pass -F 'key=value' to send multipart "
                "form data.)"
            )
        if rec.form_error is not None:
            raise self.bad_request(f"Could not parse multipart form: {rec.form_error}")
        form, form_fields = rec.form, rec.form_fields
        drops = self.drops_unknown_fields(form.get("model"))
        if drops:
            form = {k: v for k, v in form.items() if k in EDIT_FIELDS}
            form_fields = [k for k in form_fields if k in EDIT_FIELDS]
        for name in form_fields:
            if name not in EDIT_FIELDS | {"complexity"}:
                raise self.unknown_parameter(name)
            if name in EDIT_FILE_FIELDS and name not in rec.files:
                raise self.bad_request(
                    f"Invalid type for '{name}': expected a file, but got a string instead.", name, "invalid_type"
                )
            if name not in EDIT_FILE_FIELDS and name in rec.files:
                raise self.bad_request(
                    f"Invalid type for '{name}': expected a string, but got a file instead.", name, "invalid_type"
                )
        model = self._resolve_model(form.get("model"), "edit")
        if drops:
            form = {k: v for k, v in form.items() if k in model.edit_fields}
            form_fields = [k for k in form_fields if k in model.edit_fields]
        if not model.edit_fields:
            editors = [m.id for m in self.image_models.values() if m.edit_fields]
            raise self.bad_request(
                f"Invalid value: '{model.id}'. Supported values are: {_choices(editors)}.", "model", "invalid_value"
            )
        for name in form_fields:
            if name not in model.edit_fields:
                raise self.unknown_parameter(name)
        if "image" in rec.files and "image[]" in rec.files:
            raise self.bad_request(
                "Send the input images either as 'image' or as 'image[]', not both.", "image", "invalid_value"
            )
        if len(rec.files.get("image", [])) > 1:
            raise self.bad_request(
                "Duplicate parameter: 'image'. Send several images as 'image[]'.", "image", "duplicate_parameter"
            )
        if len(rec.files.get("mask", [])) > 1:
            raise self.bad_request("Duplicate parameter: 'mask'.", "mask", "duplicate_parameter")
        inputs = rec.files.get("image") or rec.files.get("image[]") or []
        if not inputs:
            raise self.bad_request("Missing required parameter: 'image'.", "image", "missing_required_parameter")
        if len(inputs) > model.max_images:
            raise self.bad_request(
                f"Invalid 'image': too many images. Expected at most {model.max_images} "
                f"image(s) for {model.id}, but got {len(inputs)}.",
                "image",
                "invalid_value",
            )
        mask = (rec.files.get("mask") or [None])[0]
        if model.family == "gpt-image-2" and "input_fidelity" in form:
            raise self.bad_request(
                f"Unsupported parameter: 'input_fidelity' is not supported with the model '{model.id}'.",
                "input_fidelity",
                "unsupported_parameter",
            )
        params = self._common(model, dict(form), from_form=True)
        if model.family == "gpt-image":
            params.update(self._enum_fidelity(form))
        if model.takes_gpt_image_fields:
            self._check_gpt_image_inputs(inputs, mask)
        else:
            self._check_dalle2_inputs(inputs[0], mask)
        return await self._answer(call, model, params, input_images=len(inputs))

    def _enum_fidelity(self, form: dict[str, str]) -> dict[str, Any]:
        return {"input_fidelity": self._enum(form, "input_fidelity", ("high", "low"), "low")}

    def _check_gpt_image_inputs(self, inputs: list[UploadedFile], mask: UploadedFile | None) -> None:
        first = None
        for i, f in enumerate(inputs, 1):
            info = images.image_info(f.data)
            if info is None or info.format not in ("png", "jpeg", "webp"):
                raise self.bad_request(
                    f"Invalid image file or mode for image {i}, please check your image file.",
                    "image",
                    "invalid_image_file",
                )
            if len(f.data) > 50 * _MB:
                raise self.bad_request(f"Invalid image {i}: the file is larger than 50 MB.", "image", "image_too_large")
            first = first or info
        if mask is not None:
            info = images.image_info(mask.data)
            if info is None or info.format != "png" or not info.alpha:
                raise self.bad_request(
                    "Invalid mask image format - mask must be a PNG with an alpha channel.",
                    "mask",
                    "invalid_image_format",
                )
            if len(mask.data) >= 4 * _MB:
                raise self.bad_request("Invalid mask: the file must be less than 4 MB.", "mask", "image_too_large")
            if first is not None and (info.width, info.height) != (first.width, first.height):
                raise self.bad_request(
                    "Invalid mask image format - mask size does not match image size", "mask", "invalid_value"
                )

    def _check_dalle2_inputs(self, image: UploadedFile, mask: UploadedFile | None) -> None:
        info = images.image_info(image.data)
        if info is None or info.format != "png" or len(image.data) >= 4 * _MB:
            raise self.bad_request("Uploaded image must be a PNG and less than 4 MB.", "image", "invalid_value")
        if info.width != info.height:
            raise self.bad_request(
                f"Invalid input image - image must be square, got {info.width}x{info.height}.", "image", "invalid_value"
            )
        if mask is None:
            # Without a mask, the image's own transparency marks the area to edit.
            if not info.alpha and info.mode != "L":
                raise self.bad_request(
                    f"Invalid input image - format must be in ['RGBA', 'LA', 'L'], got {info.mode}.",
                    "image",
                    "invalid_value",
                )
            return
        m = images.image_info(mask.data)
        if m is None or m.format != "png" or len(mask.data) >= 4 * _MB:
            raise self.bad_request("Uploaded mask must be a PNG and less than 4 MB.", "mask", "invalid_value")
        if not m.alpha:
            raise self.bad_request(
                f"Invalid mask image - format must be in ['RGBA', 'LA'], got {m.mode}.", "mask", "invalid_value"
            )
        if (m.width, m.height) != (info.width, info.height):
            raise self.bad_request(
                f"Invalid mask image - mask size ({m.width}x{m.height}) does not match image "
                f"size ({info.width}x{info.height}).",
                "mask",
                "invalid_value",
            )
