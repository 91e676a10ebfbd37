"""Translate canonical requests into each gateway's dialect and its answers back, from manifests.

Nothing here does I/O. `encode` builds a `WireRequest` (JSON, multipart, data-URL fields or
Gemini-style contents), `decode` unwraps an answer into a `WireResult`, `classify_error` turns any
error body seen in the wild into a typed error that keeps the gateway's own words, and
`decode_models` reads model discovery answers. Every difference between gateways comes from a
manifest field; no gateway is named in this file.
"""

from __future__ import annotations

import email.utils
import html
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from . import b64
from .checks import PreparedRequest
from .errors import (
    AuthenticationError,
    BadGatewayResponseError,
    ContentBlockedError,
    GatewayError,
    GatewayTimeoutError,
    ImageGenError,
    InsufficientBalanceError,
    InvalidRequestError,
    ModelNotFoundError,
    QuotaExhaustedError,
    RateLimitedError,
)
from .manifests import Manifest, ParamSpec
from .models import Capability, ImageRequest, InputImage, WireImage, WireResult

GATEWAY_MESSAGE_LIMIT = 500
EXCERPT_LIMIT = 200

_KIND_CLASSES: dict[str, type[ImageGenError]] = {
    cls.kind: cls
    for cls in (
        InvalidRequestError,
        AuthenticationError,
        InsufficientBalanceError,
        RateLimitedError,
        QuotaExhaustedError,
        ContentBlockedError,
        ModelNotFoundError,
        GatewayError,
        GatewayTimeoutError,
        BadGatewayResponseError,
    )
}


# --- requests -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Turn:
    """One earlier message of a conversation replayed to a gateway that takes `contents`."""

    role: Literal["user", "model"]
    text: str
    images: list[tuple[bytes, str]] = field(default_factory=list)  # (data, mime type)


@dataclass(slots=True)
class WireRequest:
    """One HTTP request to a gateway, before auth and base URL are added."""

    method: str
    url_path: str
    relative_to: Literal["base_url", "origin"] = "base_url"
    json: dict[str, Any] | None = None
    data: dict[str, str] | None = None  # multipart form fields
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None  # (field, (filename, bytes, mime))
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def model(self) -> str | None:
        source = self.json if self.json is not None else self.data
        value = source.get("model") if source else None
        return value if isinstance(value, str) else None

    def __repr__(self) -> str:
        # Never dump image bytes or data URLs into a log or traceback.
        body = "json" if self.json is not None else "multipart" if self.files else "none"
        return (
            f"WireRequest({self.method} {self.url_path!r} relative_to={self.relative_to} "
            f"body={body} model={self.model!r} files={len(self.files or [])})"
        )


_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}


def _mime_of(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def _bounded_lineage(lineage: Sequence[Turn], max_turns: int) -> list[Turn]:
    # A "turn" is one user prompt and the model's answer; keep the newest, start on a user turn.
    kept = list(lineage)[-2 * max_turns :] if max_turns > 0 else []
    while kept and kept[0].role != "user":
        kept.pop(0)
    return kept


def _alternate(contents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Conversations must alternate user/model: merge neighbours with the same role.
    out: list[dict[str, Any]] = []
    for turn in contents:
        if not turn["parts"]:
            continue
        if out and out[-1]["role"] == turn["role"]:
            out[-1] = {"role": turn["role"], "parts": out[-1]["parts"] + turn["parts"]}
        else:
            out.append(turn)
    return out


def _parts(text: str, images: Sequence[tuple[bytes, str]]) -> list[dict[str, str]]:
    parts: list[dict[str, str]] = [{"text": text}] if text else []
    parts.extend({"image": b64.data_url(data, mime)} for data, mime in images)
    return parts


def encode(
    manifest: Manifest,
    prepared: PreparedRequest,
    request: ImageRequest,
    batch_n: int,
    *,
    images: Sequence[InputImage] = (),
    mask: bytes | None = None,
    lineage: Sequence[Turn] = (),
) -> WireRequest:
    """The wire request for one batch of `batch_n` images."""
    op = manifest.operations.get(request.operation)
    if op is None:
        raise InvalidRequestError(f"{manifest.name} has no {request.operation} operation")

    fields: dict[str, Any] = {"model": prepared.model.id, "prompt": request.prompt}
    if "n" in op.sends:
        fields["n"] = batch_n
    if prepared.size and "size" in op.sends:
        fields["size"] = prepared.size
    if prepared.send_response_format:
        fields["response_format"] = "b64_json"
    fields.update(prepared.knobs)
    fields.update(prepared.extra)
    for name in prepared.removed:  # `extra` values of null, and fields the model refuses
        fields.pop(name, None)

    inputs = op.inputs
    if request.operation != "edit" or inputs is None:
        return WireRequest("POST", op.path, json=fields)

    if inputs.encoding == "multipart":
        files: list[tuple[str, tuple[str, bytes, str]]] = []
        several = len(images) > 1
        name = (inputs.multi_image_field or inputs.image_field) if several else inputs.image_field
        for i, img in enumerate(images):
            stem = f"image-{i + 1}" if several else "image"
            files.append((name, (f"{stem}.{_EXT.get(img.mime_type, 'png')}", img.data, img.mime_type)))
        if mask is not None:
            if not inputs.mask_field:
                raise InvalidRequestError(f"{manifest.name} has no way to send a mask")
            files.append((inputs.mask_field, ("mask.png", mask, _mime_of(mask))))
        form = {k: _form_value(v) for k, v in fields.items() if v is not None}
        return WireRequest("POST", op.path, data=form, files=files)

    if inputs.encoding == "data_url_fields":
        urls = [b64.data_url(img.data, img.mime_type) for img in images]
        if len(urls) > 1:
            if not inputs.multi_image_field:
                raise InvalidRequestError(f"{manifest.name} has no field for several input images")
            fields[inputs.multi_image_field] = urls
        elif urls:
            fields[inputs.image_field] = urls[0]
        if mask is not None:
            if not inputs.mask_field:
                raise InvalidRequestError(f"{manifest.name} has no way to send a mask")
            fields[inputs.mask_field] = b64.data_url(mask, _mime_of(mask))
        return WireRequest("POST", op.path, json=fields)

    # gemini_contents: the prompt travels as the text part of the last user turn.
    contents = [
        {"role": t.role, "parts": _parts(t.text, t.images)} for t in _bounded_lineage(lineage, inputs.max_lineage_turns)
    ]
    contents.append({"role": "user", "parts": _parts(request.prompt, [(i.data, i.mime_type) for i in images])})
    fields.pop("prompt", None)
    fields["contents"] = _alternate(contents)
    return WireRequest("POST", op.path, json=fields)


# --- answers ------------------------------------------------------------------------------------


def _lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _text(body: bytes | str) -> str:
    return body.decode("utf-8", errors="replace") if isinstance(body, bytes | bytearray) else body


_B64_RUN = re.compile(r"[A-Za-z0-9+/=_-]{120,}")
_TAGS = re.compile(r"<(script|style)\b.*?</\1>|<[^>]+>", re.S | re.I)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.S | re.I)


def excerpt(body: bytes | str, limit: int = EXCERPT_LIMIT) -> str:
    """A short, single-line, printable view of a body: never the whole thing, never image data."""
    text = _text(body[: limit * 20] if isinstance(body, bytes | bytearray | str) else b"")
    if "<html" in text[:500].lower() or "<!doctype" in text[:500].lower():
        title = _TITLE.search(text)
        stripped = _TAGS.sub(" ", text)
        text = (title.group(1).strip() + ": " if title else "") + html.unescape(stripped)
    text = _B64_RUN.sub("<…>", text)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text or "(empty body)"


def _load_json(body: bytes | str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _MISSING


_MISSING: Any = object()


def _follow(doc: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return _MISSING
        doc = doc[key]
    return doc


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _present(value: Any) -> str | None:
    # Gateways send "" for the format they did not use; an empty string is no value.
    return value if isinstance(value, str) and value.strip() else None


def _wire_image(item: Any) -> WireImage | None:
    if isinstance(item, str):
        s = _present(item)
        return WireImage(url=s) if s and s.startswith(("http://", "https://", "data:")) else None
    if not isinstance(item, dict):
        return None
    b64 = _present(item.get("b64_json")) or _present(item.get("b64"))
    url = _present(item.get("url"))
    if not (b64 or url):
        return None
    return WireImage(b64=b64, url=url, revised_prompt=_present(item.get("revised_prompt")))


def _envelope_ok(doc: dict[str, Any]) -> bool:
    code = doc.get("code")
    if code is None:
        return "data" in doc and doc["data"] is not None
    return str(code).strip() in ("200", "0") and doc.get("data") is not None


def _is_error_body(doc: Any) -> bool:
    return isinstance(doc, dict) and bool(doc.get("error")) and not isinstance(doc.get("data"), list)


def decode(
    manifest: Manifest,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    endpoint: str,
    key_env: str | None = None,
) -> WireResult:
    """The images and accounting in a gateway's answer; raises the typed error for any failure."""
    if not 200 <= status < 300:
        raise classify_error(manifest, status, headers, body, endpoint=endpoint, key_env=key_env)
    doc = _load_json(body)
    if doc is _MISSING:
        raise BadGatewayResponseError(
            f"endpoint {endpoint!r} answered HTTP {status} with a body that is not valid JSON "
            f"(not JSON or cut off): {excerpt(body)}",
            status=status,
            endpoint=endpoint,
        )
    if _is_error_body(doc):
        raise classify_error(manifest, status, headers, body, endpoint=endpoint, key_env=key_env)

    spec = manifest.response
    inner: Any = doc
    if spec.envelope == "code_msg_data":
        if not isinstance(doc, dict) or not _envelope_ok(doc):
            raise classify_error(manifest, status, headers, body, endpoint=endpoint, key_env=key_env)
        inner = doc["data"]

    items = _follow(inner, spec.data_path)
    if items is _MISSING and inner is not doc:
        items = _follow(doc, spec.data_path)  # a path written from the top of the body
    if isinstance(items, dict):
        items = [items]
    found = [img for img in (_wire_image(i) for i in items) if img] if isinstance(items, list) else []
    if not found:
        raise BadGatewayResponseError(
            f"endpoint {endpoint!r} answered HTTP {status} without any image: {excerpt(body)}",
            status=status,
            endpoint=endpoint,
        )

    def pick(name: str | None) -> Any:
        if not name:
            return None
        for where in (inner, doc):
            if isinstance(where, dict) and name in where:
                return where[name]
        return None

    usage = pick(spec.usage_field)
    used = {spec.usage_field, spec.cost_field, spec.balance_field, *spec.data_path[:1]}
    raw_extra: dict[str, Any] = {}
    if isinstance(inner, dict):
        raw_extra = {
            k: v for k, v in inner.items() if k not in used and isinstance(v, str | int | float | bool) and v != ""
        }
    return WireResult(
        images=found,
        usage=usage if isinstance(usage, dict) else None,
        cost=_number(pick(spec.cost_field)),
        balance=_number(pick(spec.balance_field)),
        raw_extra=raw_extra,
    )


# --- errors -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _ErrorInfo:
    message: str | None = None
    code: str | None = None
    type: str | None = None
    param: str | None = None
    status_hint: int | None = None


def _as_code(value: Any) -> str | None:
    if value is None or value == "" or isinstance(value, dict | list):
        return None
    return str(value)


def _status_like(value: Any) -> int | None:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if 400 <= number <= 599 else None


def _error_info(body: bytes | str) -> _ErrorInfo:
    doc = _load_json(body) if body else _MISSING
    if not isinstance(doc, dict):
        text = excerpt(body, GATEWAY_MESSAGE_LIMIT) if body else None
        return _ErrorInfo(message=None if text == "(empty body)" else text)
    info = _ErrorInfo()
    err = doc.get("error")
    if isinstance(err, dict):  # OpenAI: {"error": {"message", "type", "param", "code"}}
        info.message = _as_code(err.get("message")) or _as_code(err.get("msg"))
        info.code = _as_code(err.get("code"))
        info.type = _as_code(err.get("type"))
        info.param = _as_code(err.get("param"))
        info.status_hint = _status_like(err.get("status")) or _status_like(err.get("code"))
    elif isinstance(err, str) and err:  # legacy: {"error": "Insufficient balance", "status": 402}
        info.message = err
        info.code = _as_code(doc.get("code"))
    if info.message is None:  # {code, msg, data: null}, {"message": ...}, {"detail": ...}
        for key in ("msg", "message", "detail", "error_message", "errorMessage"):
            value = doc.get(key)
            if isinstance(value, str) and value.strip():
                info.message = value
                break
            if isinstance(value, list) and value:  # FastAPI-style validation details
                info.message = excerpt(json.dumps(value), GATEWAY_MESSAGE_LIMIT)
                break
    if info.code is None:
        info.code = _as_code(doc.get("code")) or _as_code(doc.get("error_code"))
    if info.type is None:
        info.type = _as_code(doc.get("type"))
    if info.status_hint is None:
        info.status_hint = _status_like(doc.get("status")) or _status_like(doc.get("statusCode"))
        if info.status_hint is None and info.code is not None:
            info.status_hint = _status_like(info.code)
    if info.message is None:
        info.message = excerpt(body, GATEWAY_MESSAGE_LIMIT)
    return info


def retry_after_seconds(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` in seconds or as an HTTP date."""
    h = _lower_headers(headers)
    ms = h.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = h.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_CONTENT = re.compile(
    r"content[ _-]?polic|moderation|safety|content[ _-]?filter|nsfw|flagged|prohibited|inappropriate|not allowed by our"
)
_QUOTA = re.compile(r"quota|billing|exceeded your current|hard[ _-]?limit")
_BALANCE = re.compile(
    r"insufficient[ _-]?(balance|funds|credit)|balance|out of credit|no credit|top[ -]?up|payment required"
)
_RATE = re.compile(r"rate[ _-]?limit|too many requests|slow down|throttl")
_AUTH = re.compile(r"api[ _-]?key|unauthori[sz]ed|authenticat|invalid[ _-]?token|forbidden|credential")
_MODEL_MISSING = re.compile(
    r"model_not_found|no such model|unknown model|invalid model|model[^.;]{0,80}?"
    r"(not found|does not exist|doesn't exist|not exist|not available|unavailable|is not supported|"
    r"is not a valid|(?:doesn't|does not) support image)"
)
# OpenAI's codes, which relays reuse whatever their status: they decide before the status does.
_WELL_KNOWN_CODES: dict[str, str] = {
    "model_not_found": "model_not_found",
    "insufficient_quota": "quota_exhausted",
    "content_policy_violation": "content_blocked",
    "moderation_blocked": "content_blocked",
    "invalid_api_key": "authentication",
    "rate_limit_exceeded": "rate_limited",
}
_MODEL_DENIED = re.compile(
    r"model_not_allowed|model[^.;]{0,80}?(not allowed|no access|access|permission|not available|channel|group|"
    r"not enabled|not authori[sz]ed)|(no access|not allowed|permission)[^.;]{0,40}?model|no available channel"
)


_NO_CHANNEL = re.compile(r"no available channel")


def _kind(status: int | None, info: _ErrorInfo) -> str:
    words = " ".join(x for x in (info.code, info.type, info.message) if x).lower()
    if status is None:  # a 2xx with an error body and no status of its own: words decide
        if _NO_CHANNEL.search(words):
            return "model_not_found"
        if _CONTENT.search(words):
            return "content_blocked"
        if _MODEL_MISSING.search(words):
            return "model_not_found"
        if _BALANCE.search(words) and "quota" not in words:
            return "insufficient_balance"
        if _QUOTA.search(words):
            return "quota_exhausted"
        if _RATE.search(words):
            return "rate_limited"
        if _AUTH.search(words):
            return "authentication"
        if "invalid_request" in words or "invalid" in words:
            return "invalid_request"
        return "gateway_failure"
    if status in (400, 422):
        if _CONTENT.search(words):
            return "content_blocked"
        if _MODEL_MISSING.search(words):
            return "model_not_found"
        if re.search(r"insufficient[ _-]?(balance|funds|credit)", words):
            return "insufficient_balance"
        return "invalid_request"
    if status == 401:
        return "authentication"
    if status == 402:
        return "insufficient_balance"
    if status == 403:
        if _MODEL_DENIED.search(words) or _MODEL_MISSING.search(words):
            return "model_not_found"
        if _CONTENT.search(words):
            return "content_blocked"
        if _BALANCE.search(words) or _QUOTA.search(words):
            return "insufficient_balance"
        return "authentication"
    if status == 404:
        return "model_not_found" if "model" in words else "invalid_request"
    if status in (408, 504):
        return "gateway_timeout"
    if status == 413:
        return "invalid_request"
    if status == 429:
        return "quota_exhausted" if _QUOTA.search(words) else "rate_limited"
    if _NO_CHANNEL.search(words):  # a relay with no upstream for the model: retrying cannot help
        return "model_not_found"
    if status == 409 or status >= 500:
        return "gateway_failure"
    if 400 <= status < 500:
        return "invalid_request"
    return "gateway_failure"


def _advice(kind: str, status: int | None, endpoint: str, key_env: str | None, retry_after: float | None) -> str:
    var = f"${key_env}" if key_env else "the endpoint's API key variable"
    if kind == "authentication":
        if status == 403:
            return f"endpoint {endpoint!r} refused the API key for this request; check the key's permissions in {var}"
        return f"endpoint {endpoint!r} rejected the API key; check the key in {var}"
    if kind == "insufficient_balance":
        return f"the account on endpoint {endpoint!r} has insufficient balance; top it up or use another endpoint"
    if kind == "quota_exhausted":
        return (
            f"the quota on endpoint {endpoint!r} is used up (waiting will not help); "
            "check the plan or billing, or use another endpoint"
        )
    if kind == "rate_limited":
        wait = f"; retry in {retry_after:.0f} s" if retry_after is not None else "; wait a little and retry"
        return f"endpoint {endpoint!r} is rate limiting requests{wait}"
    if kind == "content_blocked":
        return (
            f"endpoint {endpoint!r} refused the prompt or image under its content policy; "
            "rephrase the prompt or change the image"
        )
    if kind == "model_not_found":
        return (
            f"the model is not available on endpoint {endpoint!r} (or this key may not use it); "
            "call list_models to see what is"
        )
    if kind == "invalid_request":
        if status == 413:
            return f"endpoint {endpoint!r} refused the request: input too large; send smaller or fewer images"
        if status == 404:
            return f"endpoint {endpoint!r} has no such path (HTTP 404); check its base_url"
        return f"endpoint {endpoint!r} rejected the request as invalid; fix the arguments it names"
    if kind == "gateway_timeout":
        return f"endpoint {endpoint!r} timed out"
    if kind == "bad_gateway_response":
        return f"endpoint {endpoint!r} answered with something unusable"
    return f"endpoint {endpoint!r} failed; a retry or another endpoint may work"


def classify_error(
    manifest: Manifest,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    endpoint: str,
    key_env: str | None = None,
) -> ImageGenError:
    """The typed error for a gateway's failure answer, with the gateway's own message kept."""
    info = _error_info(body)
    effective: int | None = status
    if status is None or 200 <= status < 300:
        effective = info.status_hint
    kind = None
    for token in (info.code, info.type):
        if token and token in manifest.error_codes:
            kind = manifest.error_codes[token]
            break
    if kind is None:
        for token in (info.code, info.type):
            if token and token.lower() in _WELL_KNOWN_CODES:
                kind = _WELL_KNOWN_CODES[token.lower()]
                break
    if kind is None:
        kind = _kind(effective, info)
    if kind == "rate_limited" and effective is None and not info.status_hint:
        effective = 429
    retry_after = (
        retry_after_seconds(headers) if kind in ("rate_limited", "gateway_failure", "gateway_timeout") else None
    )
    key_env = key_env or manifest.key_env
    gateway_message = (info.message or "").strip()
    if len(gateway_message) > GATEWAY_MESSAGE_LIMIT:
        gateway_message = gateway_message[: GATEWAY_MESSAGE_LIMIT - 1].rstrip() + "…"
    advice = _advice(kind, effective, endpoint, key_env, retry_after)
    shown = f"HTTP {status}" if status and not 200 <= status < 300 else f"HTTP {status} with an error body"
    message = f"{advice} ({shown})"
    if gateway_message:
        message += f": {gateway_message}"
    cls = _KIND_CLASSES.get(kind, GatewayError)
    error = cls(
        message,
        status=effective if effective is not None else status,
        gateway_message=gateway_message or None,
        endpoint=endpoint,
        retry_after_s=retry_after,
    )
    error.gateway_code, error.gateway_param = info.code, info.param
    return error


# --- model discovery ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiscoveredModel:
    """What a discovery answer says of one model; None (or empty) is "not said", never "no"."""

    id: str
    capabilities: tuple[Capability, ...] | None = None  # those the gateway says the model has
    lacks: tuple[Capability, ...] = ()  # those it explicitly says the model has not
    sizes: tuple[str, ...] | None = None
    max_n: int | None = None
    max_input_images: int | None = None
    knobs: dict[str, ParamSpec] | None = None  # canonical knobs with typed schemas
    shutdown_date: str | None = None  # YYYY-MM-DD (OpenAI's /v1/models)
    description: str | None = None
    usd_per_image: float | None = None  # the price the gateway itself lists (nano-gpt's `pricing`)


def _usd_per_image(item: dict[str, Any]) -> float | None:
    pricing = item.get("pricing")
    if not isinstance(pricing, dict) or str(pricing.get("currency", "USD")).upper() != "USD":
        return None
    value = pricing.get("per_image")
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, dict):
        return _int(value.get("max"))
    return None


def _model_items(doc: Any, keys: Sequence[str]) -> list[dict[str, Any]]:
    if isinstance(doc, dict):
        for key in keys:
            if key in doc:
                doc = doc[key]
                break
    if isinstance(doc, dict):  # {id: {...}} maps
        return [{"id": k, **v} if isinstance(v, dict) else {"id": k} for k, v in doc.items()]
    if isinstance(doc, list):
        return [x if isinstance(x, dict) else {"id": x} for x in doc if isinstance(x, dict | str)]
    return []


def _sizes(params: dict[str, Any]) -> tuple[str, ...] | None:
    raw = params.get("resolutions")
    if raw is None:
        raw = params.get("resolution") or params.get("sizes") or params.get("size")
    if isinstance(raw, dict):
        raw = raw.get("values") or raw.get("enum") or raw.get("options")
    if not isinstance(raw, list):
        return None
    out: list[str] = []
    for v in raw:
        if isinstance(v, dict):
            v = (
                v.get("value")
                or v.get("id")
                or (f"{v['width']}x{v['height']}" if "width" in v and "height" in v else None)
            )
        if isinstance(v, str) and v.strip():
            out.append(v.strip())
    return tuple(out) or None


_CAP_WORDS: dict[str, tuple[Capability, ...]] = {
    "generate": ("generate",),
    "generation": ("generate",),
    "image_generation": ("generate",),
    "text_to_image": ("generate",),
    "txt2img": ("generate",),
    "t2i": ("generate",),
    "edit": ("edit",),
    "edits": ("edit",),
    "image_edit": ("edit",),
    "image_editing": ("edit",),
    "image_to_image": ("edit",),
    "img2img": ("edit",),
    "i2i": ("edit",),
    "inpainting": ("edit", "mask"),
    "inpaint": ("edit", "mask"),
    "mask": ("edit", "mask"),
    "multi_image": ("edit", "multi_image"),
    "multiple_images": ("edit", "multi_image"),
    "multi_image_input": ("edit", "multi_image"),
}


def _capabilities(
    item: dict[str, Any], max_inputs: int | None
) -> tuple[tuple[Capability, ...] | None, tuple[Capability, ...]]:
    """(capabilities said to be there, capabilities said to be absent); unnamed ones are neither."""
    raw = item.get("capabilities")
    yes: list[str] = []
    no: list[str] = []
    if isinstance(raw, dict):
        yes = [k for k, v in raw.items() if v is True]
        no = [k for k, v in raw.items() if v is False]
    elif isinstance(raw, list):
        yes = [x for x in raw if isinstance(x, str)]
    elif isinstance(raw, str):
        yes = [raw]
    else:
        return None, ()

    def words(names: list[str]) -> set[Capability]:
        found: set[Capability] = set()
        for name in names:
            key = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
            found.update(_CAP_WORDS.get(key, ()))
        return found

    found = words(yes)
    if "edit" in found and max_inputs is not None and max_inputs > 1:
        found.add("multi_image")
    # "inpainting: false" says the model takes no mask; it does not say the model cannot edit.
    absent = {c for name in no for c in _CAP_WORDS.get(re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"), ())[-1:]}
    absent -= found
    order: tuple[Capability, ...] = ("generate", "edit", "mask", "multi_image")
    return tuple(c for c in order if c in found), tuple(c for c in order if c in absent)


_KNOB_TYPES = {
    "integer": "integer",
    "int": "integer",
    "number": "number",
    "float": "number",
    "string": "string",
    "boolean": "boolean",
    "bool": "boolean",
}


def _typed_knobs(params: dict[str, Any], manifest: Manifest) -> dict[str, ParamSpec] | None:
    """Canonical knobs from nano-gpt-style typed parameter schemas ({type, min, max, enum})."""
    from .models import CANONICAL_KNOBS

    knobs: dict[str, ParamSpec] = {}
    for name, schema in params.items():
        if name not in CANONICAL_KNOBS or not isinstance(schema, dict):
            continue
        known = manifest.params.get(name)
        declared = _KNOB_TYPES.get(str(schema.get("type", "")).lower())
        enum = schema.get("enum") or schema.get("values") or schema.get("options")
        kind = declared or (known.type if known else None) or ("string" if isinstance(enum, list) else "number")
        low, high = _number(schema.get("min")), _number(schema.get("max"))
        try:
            knobs[name] = ParamSpec(
                wire=known.wire if known else None,
                type=kind,  # type: ignore[arg-type]
                enum=list(enum) if isinstance(enum, list) else None,
                min=low,
                max=high,
                description=str(schema.get("description", "")),
            )
        except ValueError:
            continue
    return knobs or None


def decode_models(manifest: Manifest, body: Any) -> list[DiscoveredModel]:
    """Models from a discovery answer (parsed JSON, or raw bytes), in the manifest's style."""
    if isinstance(body, bytes | str):
        body = _load_json(body)
        if body is _MISSING:
            return []
    spec = manifest.discovery
    style = spec.style if spec else "openai_models"
    found: list[DiscoveredModel] = []
    seen: set[str] = set()
    if style == "openai_models":
        pattern = re.compile(spec.image_model_pattern, re.I) if spec and spec.image_model_pattern else None
        for item in _model_items(body, ("data", "models")):
            model_id = item.get("id")
            if not isinstance(model_id, str) or not model_id or model_id in seen:
                continue
            if pattern is not None and not pattern.search(model_id):
                continue
            seen.add(model_id)
            shutdown = item.get("shutdown_date")
            found.append(
                DiscoveredModel(
                    id=model_id,
                    shutdown_date=shutdown[:10] if isinstance(shutdown, str) and shutdown.strip() else None,
                )
            )
        return found
    for item in _model_items(body, ("data", "models")):
        model_id = item.get("id") or item.get("model")
        if not isinstance(model_id, str) or not model_id or model_id in seen:
            continue
        seen.add(model_id)
        params = item.get("supported_parameters")
        params = params if isinstance(params, dict) else {}
        max_inputs = None
        for where in (item, params, item.get("input_reference_constraints")):
            if isinstance(where, dict):
                max_inputs = _int(where.get("max_input_images")) or _int(where.get("max_images_input"))
                if max_inputs is not None:
                    break
        max_n = _int(params.get("n")) or _int(item.get("n")) or _int(params.get("max_images"))
        fixed = _int(params.get("fixed_image_count"))
        if fixed is not None:
            max_n = fixed
        has, lacks = _capabilities(item, max_inputs)
        description = item.get("description")
        found.append(
            DiscoveredModel(
                id=model_id,
                capabilities=has,
                lacks=lacks,
                knobs=_typed_knobs(params, manifest),
                description=description if isinstance(description, str) and description else None,
                sizes=_sizes(params),
                max_n=max_n if max_n and max_n > 0 else None,
                max_input_images=max_inputs if max_inputs and max_inputs > 0 else None,
                usd_per_image=_usd_per_image(item),
            )
        )
    return found
