"""NexLLM: a new-api style relay in front of OpenAI, an older DALL-E channel and Vertex AI.

gpt-image-* models are forwarded to OpenAI unchanged, so OpenAI's validation errors come back as
OpenAI wrote them (new-api passes upstream error bodies through). For its other models (dall-e-3 /
dall-e-2 on a channel that still serves them) the relay forwards only the fields it knows for the
model and silently drops the rest. Imagen 4 on Vertex is reachable only when the key belongs to a
group that includes it, and Vertex has discontinued it: the upstream's 404 comes back. A model
with no channel answers 503 "No available channel for model X under group default".
Relay-level errors (auth, model routing) use new-api's shape: type "new_api_error", param "",
and a "(request id: ...)" suffix on the message.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from typing import Any, ClassVar

from .base import Call, GatewayError, Reply
from .openai import (
    DALL_E_2,
    DALL_E_3,
    GPT_IMAGE_2,
    GPT_IMAGE_2_6_FLARE,
    GPT_IMAGE_2_7_NOVA,
    ImageModel,
    OpenAIEmulator,
)

IMAGEN_4 = ImageModel(
    "imagen-4.0-generate-001",
    "imagen",
    ("1024x1024", "1792x1024", "1024x1792"),
    4,
    4000,
    frozenset({"model", "prompt", "n", "size", "response_format", "user"}),
    default_response_format="b64_json",
    created=1626777600,
    owned_by="vertex-ai",
)
GATED_MODELS = {IMAGEN_4.id: "gemini-vertex"}  # model -> the key group that unlocks it
DISCONTINUED_UPSTREAM = {IMAGEN_4.id: "2026-08-17"}  # channels still configured, upstream gone
FORWARDED = (GPT_IMAGE_2, GPT_IMAGE_2_6_FLARE, GPT_IMAGE_2_7_NOVA)  # sent to OpenAI as they are


class NexLLMEmulator(OpenAIEmulator):
    provider_id: ClassVar[str] = "nexllm"
    image_models: ClassVar[dict[str, ImageModel]] = {m.id: m for m in (*FORWARDED, DALL_E_3, DALL_E_2, IMAGEN_4)}
    shut_down: ClassVar[dict[str, str]] = {}  # the relay has no channel for them: 503 like any unknown id
    other_models: ClassVar[dict[str, int]] = {"gpt-4o-mini": 1626777600, "gemini-2.5-flash": 1626777600}
    default_model: ClassVar[str | None] = None  # the docs mark `model` required

    def __init__(self, *args: Any, key_groups: Iterable[str] = ("default",), **kwargs: Any) -> None:
        self.key_groups = list(key_groups)
        super().__init__(*args, **kwargs)

    def _request_id(self) -> str:
        return time.strftime("%Y%m%d%H%M%S", time.gmtime()) + secrets.token_hex(8)

    def render_error(self, err: GatewayError) -> Reply:
        message = err.message
        if err.type == "new_api_error":
            message = f"{message} (request id: {self._request_id()})"
        return Reply(
            err.status,
            {
                "error": {
                    "message": message,
                    "type": err.type or "invalid_request_error",
                    "param": err.param or "",
                    "code": err.code,
                }
            },
        )

    def _relay_error(self, status: int, message: str, code: str | None) -> GatewayError:
        return GatewayError(status, message, type="new_api_error", code=code)

    def auth_error(self, token: str | None) -> GatewayError:
        if token is None:
            return self._relay_error(401, "No token provided in the Authorization header", "invalid_api_key")
        return self._relay_error(401, "Invalid token", "invalid_api_key")

    def status_error(self, status: int, code: str | None, message: str | None) -> GatewayError:
        if status == 401:
            return self._relay_error(401, message or "Invalid token", code or "invalid_api_key")
        if status == 429 and code != "insufficient_quota":
            return self._relay_error(
                429, message or "Your request rate is too high, please try again later", code or "rate_limit_exceeded"
            )
        if status == 403:
            return self._relay_error(
                403, message or "Your token quota has been used up", code or "insufficient_user_quota"
            )
        return super().status_error(status, code, message)

    def unknown_model(self, model_id: str) -> GatewayError:
        # new-api's distributor answers 503 when no channel serves the model.
        return self._relay_error(
            503,
            f"No available channel for model {model_id} under group {self.key_groups[0]} (distributor)",
            "model_not_found",
        )

    def _allowed(self, model: ImageModel) -> bool:
        group = GATED_MODELS.get(model.id)
        return group is None or group in self.key_groups

    def check_model_access(self, model: ImageModel) -> None:
        if not self._allowed(model):
            raise self._relay_error(
                403,
                f"The {model.id} model is not available for your key's group ({', '.join(self.key_groups)}); "
                f"it is served to the {GATED_MODELS[model.id]} group",
                "model_not_allowed",
            )
        if model.id in DISCONTINUED_UPSTREAM:
            # Vertex's NOT_FOUND, wrapped by new-api with the upstream's status.
            raise GatewayError(
                404,
                f"Publisher Model `projects/nexllm/locations/us-central1/publishers/google/models/{model.id}` "
                "was not found or your project does not have access to it. Please ensure you are using a valid "
                "model version. (request id: " + self._request_id() + ")",
                type="upstream_error",
                code="bad_response_status_code",
            )

    def drops_unknown_fields(self, model_id: Any) -> bool:
        model = self.image_models.get(model_id) if isinstance(model_id, str) else None
        return model is not None and not model.takes_gpt_image_fields

    def listed_models(self) -> list[dict[str, Any]]:
        out = [
            {
                "id": m.id,
                "object": "model",
                "created": m.created,
                "owned_by": m.owned_by,
                "supported_endpoint_types": ["image-generation"],
            }
            for m in self.image_models.values()
            if self._allowed(m)
        ]
        out += [
            {
                "id": mid,
                "object": "model",
                "created": created,
                "owned_by": "custom",
                "supported_endpoint_types": ["openai"],
            }
            for mid, created in self.other_models.items()
        ]
        return out

    async def _models(self, call: Call) -> Reply:
        self.check_auth(call)
        return Reply(200, {"data": self.listed_models(), "object": "list", "success": True})
