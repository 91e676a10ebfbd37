"""Answers for JSON-RPC messages the SDK could not read, so their callers do not wait forever.

Over stdio and legacy SSE the SDK turns a line or POST body that is not a valid JSON-RPC message
into an exception on the server's read stream and drops it: a request that carried an id never
gets a response. `AnsweringReadStream` sits between the transport and the server and answers such
a request with the error JSON-RPC defines: -32700 for text that is not JSON, -32600 for an object
that is not a valid request, -32602 for a request whose `params` is not an object. Messages
without a usable id (notifications, batches, garbage) are answered with id null only when they
were not JSON at all, as the specification asks. Over streamable HTTP the SDK does answer (HTTP
400), but with id null; `RequestIdInErrors` puts the request's id and the fitting code in.
"""

from __future__ import annotations

import json
import logging
from types import TracebackType
from typing import Any

import anyio
from mcp.shared.message import SessionMessage
from mcp_types import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, ErrorData, JSONRPCError
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("mcp_imagegen.rpc_errors")


def _offending_object(exc: ValidationError) -> dict[str, Any] | None:
    """The message object itself: pydantic reports a missing field with its parent as input."""
    for error in exc.errors(include_url=False):
        value = error.get("input")
        if isinstance(value, dict) and len(error.get("loc", ())) <= 2:
            return value
    return None


def reply_for_object(message: Any) -> JSONRPCError | None:
    """The error owed to a decoded JSON value that is not a valid message, if it is a request with an id."""
    if not isinstance(message, dict) or "result" in message or "error" in message:
        return None  # a batch or a malformed response: nobody waits for an answer
    request_id = message.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
        return None  # a notification, or an id nobody could match an answer to
    if message.get("jsonrpc") == "2.0" and isinstance(message.get("method"), str) and "params" in message:
        code, text = INVALID_PARAMS, "Invalid params: 'params' must be an object"
    else:
        code, text = INVALID_REQUEST, 'Invalid request: needs "jsonrpc": "2.0" and a string "method"'
    return JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=text))


def error_reply(exc: Exception) -> JSONRPCError | None:
    """The JSON-RPC error that answers the message behind `exc`, or None when none is owed."""
    if not isinstance(exc, ValidationError):
        return None
    if any(e.get("type") == "json_invalid" for e in exc.errors(include_url=False)):
        return JSONRPCError(jsonrpc="2.0", id=None, error=ErrorData(code=PARSE_ERROR, message="Parse error: not JSON"))
    return reply_for_object(_offending_object(exc))


class RequestIdInErrors:
    """Streamable HTTP: the SDK answers an invalid request with HTTP 400 and a JSON-RPC error, but
    with id null and -32602 even for a malformed envelope. This puts the request's id and the
    right code in (only for small bodies: a malformed request is small; large bodies pass as sent).
    """

    _KEEP = 64 * 1024

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = bytearray()
        start: Message | None = None
        answer = bytearray()

        async def tee() -> Message:
            received = await receive()
            if received["type"] == "http.request" and len(body) <= self._KEEP:
                body.extend(received.get("body", b""))
            return received

        async def watch(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] == 400 and len(body) <= self._KEEP:
                start = message  # held until the body shows whether it needs the id
                return
            if start is None:
                await send(message)
                return
            answer.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            fixed = self._with_id(bytes(body), bytes(answer))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(fixed)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": fixed})

        await self.app(scope, tee, watch)

    @staticmethod
    def _with_id(request: bytes, answer: bytes) -> bytes:
        try:
            sent = json.loads(answer)
            asked = json.loads(request)
        except ValueError:
            return answer
        if not (isinstance(sent, dict) and "error" in sent and sent.get("id") is None):
            return answer
        reply = reply_for_object(asked)
        return answer if reply is None else reply.model_dump_json(by_alias=True, exclude_none=True).encode()


class AnsweringReadStream:
    """A server read stream that answers unreadable requests on `write` instead of dropping them."""

    def __init__(self, inner: Any, write: Any) -> None:
        self._inner = inner
        self._write = write

    @property
    def last_context(self) -> Any:
        # The SDK runs handlers in the sender's context when the stream carries one.
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        while True:
            item = await self._inner.receive()
            if not isinstance(item, Exception):
                return item
            reply = error_reply(item)
            if reply is None:
                return item  # the SDK logs it
            log.info("answered an unreadable JSON-RPC message with error %d", reply.error.code)
            await self._write.send(SessionMessage(reply))

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> AnsweringReadStream:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> AnsweringReadStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        await self.aclose()
        return None
