"""Answers for JSON-RPC messages the SDK could not read, so their callers do not wait forever.

Over stdio and legacy SSE the SDK turns a line or POST body that is not a valid JSON-RPC message
into an exception on the server's read stream and drops it: a request that carried an id never
gets a response. `AnsweringReadStream` sits between the transport and the server and answers such
a request with the error JSON-RPC defines: -32700 for text that is not JSON, -32600 for an object
that is not a valid request, -32602 for a request whose `params` is not an object. Messages
without a usable id (notifications, batches, garbage) are answered with id null only when they
were not JSON at all, as the specification asks.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import anyio
from mcp.shared.message import SessionMessage
from mcp_types import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, ErrorData, JSONRPCError
from pydantic import ValidationError

log = logging.getLogger("mcp_imagegen.rpc_errors")


def _offending_object(exc: ValidationError) -> dict[str, Any] | None:
    """The message object itself: pydantic reports a missing field with its parent as input."""
    for error in exc.errors(include_url=False):
        value = error.get("input")
        if isinstance(value, dict) and len(error.get("loc", ())) <= 2:
            return value
    return None


def error_reply(exc: Exception) -> JSONRPCError | None:
    """The JSON-RPC error that answers the message behind `exc`, or None when none is owed."""
    if not isinstance(exc, ValidationError):
        return None
    errors = exc.errors(include_url=False)
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONRPCError(jsonrpc="2.0", id=None, error=ErrorData(code=PARSE_ERROR, message="Parse error: not JSON"))
    message = _offending_object(exc)
    if message is None or "result" in message or "error" in message:
        return None  # a batch or a malformed response: nobody waits for an answer
    request_id = message.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
        return None  # a notification, or an id nobody could match an answer to
    if message.get("jsonrpc") == "2.0" and isinstance(message.get("method"), str) and "params" in message:
        code, text = INVALID_PARAMS, "Invalid params: 'params' must be an object"
    else:
        code, text = INVALID_REQUEST, "Invalid request: needs \"jsonrpc\": \"2.0\" and a string \"method\""
    return JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=text))


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
