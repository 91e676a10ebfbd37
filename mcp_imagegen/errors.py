"""The typed errors every layer raises, and the one place that decides what an agent reads.

Each error says whether a retry can help (`retryable`) and keeps the gateway's own message, so the
agent gets something it can act on and the gateway's words are not lost in translation.
"""

from __future__ import annotations

from typing import ClassVar


class ImageGenError(Exception):
    """Base of every error this package raises on purpose."""

    kind: ClassVar[str] = "error"
    retryable: ClassVar[bool] = False
    # A gateway's own error code and the request field it blames (OpenAI's `code` and `param`),
    # kept so the server can learn from a refusal (learning.py).
    gateway_code: str | None = None
    gateway_param: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        gateway_message: str | None = None,
        endpoint: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.gateway_message = gateway_message
        self.endpoint = endpoint
        self.retry_after_s = retry_after_s

    def agent_text(self) -> str:
        """The message an agent sees: what went wrong, where, and the gateway's own words."""
        parts = [self.message]
        if self.gateway_message and self.gateway_message not in self.message:
            parts.append(f"Gateway said: {self.gateway_message}")
        # Where it happened, unless the message already says it.
        where = [f"endpoint {self.endpoint!r}"] if self.endpoint else []
        if self.endpoint and self.status:
            where.append(f"HTTP {self.status}")
        where = [w for w in where if w not in self.message]
        if where:
            parts.append(f"({', '.join(where)})")
        if self.retryable:
            parts.append("A retry may succeed.")
        return " ".join(parts)

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "message": self.message,
            "retryable": self.retryable,
            "status": self.status,
            "gateway_message": self.gateway_message,
            "endpoint": self.endpoint,
        }


# --- problems with what the caller asked for; found before any money is spent -------------------


class InvalidRequestError(ImageGenError):
    """The arguments cannot work (bad size, n, range, prompt, input image...)."""

    kind = "invalid_request"


class InputNotFoundError(InvalidRequestError):
    """An input image (path, URL, resource URI) could not be found or read."""

    kind = "input_not_found"


class InputForbiddenError(InvalidRequestError):
    """An input points somewhere it may not (outside allowed roots, private address)."""

    kind = "input_forbidden"


class ModelNotFoundError(ImageGenError):
    kind = "model_not_found"


class ConfigError(ImageGenError):
    """The configuration file or environment is wrong; the message names file, key and problem,
    and `hint` what to do about it."""

    kind = "configuration"

    def __init__(self, message: str, *, hint: str | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.hint = hint or "fix the named key in the file, or unset MCP_IMAGEGEN_CONFIG to use the defaults"


class ManifestError(ConfigError):
    """A provider manifest is invalid; the message names file and field."""

    kind = "manifest"


# --- what gateways answer -----------------------------------------------------------------------


class AuthenticationError(ImageGenError):
    kind = "authentication"


class InsufficientBalanceError(ImageGenError):
    kind = "insufficient_balance"


class RateLimitedError(ImageGenError):
    kind = "rate_limited"
    retryable = True


class QuotaExhaustedError(RateLimitedError):
    """A 429 that says the quota is used up: waiting will not help."""

    kind = "quota_exhausted"
    retryable = False


class ContentBlockedError(ImageGenError):
    kind = "content_blocked"


class GatewayError(ImageGenError):
    """The gateway failed (5xx, relay error, timeout, unreadable answer)."""

    kind = "gateway_failure"
    retryable = True


class GatewayTimeoutError(GatewayError):
    kind = "gateway_timeout"


class BadGatewayResponseError(GatewayError):
    """The gateway answered 2xx with something that is not a usable result."""

    kind = "bad_gateway_response"
    retryable = False


class JobPendingError(ImageGenError):
    """A background generation has not finished yet."""

    kind = "pending"
    retryable = True
