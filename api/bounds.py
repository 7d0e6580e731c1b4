"""Nothing is read before it is bounded: who is asking first, then how much they may send.

FastAPI reads and parses a request's whole body before it solves the dependencies that
authenticate it, and sets no limit on its size; so an anonymous client could make a
frontend hold as large a body as it cared to send. :class:`Bounds` sits in front of
FastAPI and, before a byte of body is read:

- refuses an API request (``/v1/``) that carries no valid token, with 401 (or 403);
- refuses a body whose ``Content-Length`` is over ``max_body_bytes`` with 413;

and then counts a body without a length (chunked) as it arrives, refusing it with 413
at the bound, and refuses a body that has not arrived whole ``body_timeout`` after the
head with 408, so a client cannot hold a request open by trickling its body. uvicorn holds at most 64 KiB of unread body before it stops reading
from the socket, so what a refused body costs is bounded too.

The request head and WebSocket frames are bounded where they are read, in uvicorn
(:mod:`thoughtwire.api.wsserver`); docs/security.md lists every bound.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from thoughtwire.api.auth import AuthError, token_from
from thoughtwire.shared.settings import Settings

API_PREFIX = "/v1/"
TOO_LARGE = "the request body is larger than this frontend accepts"
TOO_SLOW = "the request body did not arrive in time"
# How deep a refused body's value is echoed in its 422; deeper, it is "...".
ECHO_DEPTH = 20
# What the app reads once a body has been refused: it stops, and its reply is dropped.
DISCONNECT: Message = {"type": "http.disconnect"}


class Bounds:
    """ASGI middleware: authenticate API requests, then bound every request body."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.max_body_bytes = settings.max_body_bytes
        self.body_timeout = settings.body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate and bound one request, then hand it to the app."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = await self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        body = CountedBody(receive, send, self.max_body_bytes, self.body_timeout)
        await self.app(scope, body.receive, body.send)

    async def _refusal(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        if scope["path"].startswith(API_PREFIX):
            auth = scope["app"].state.frontend.auth
            if auth.enabled:
                token, _ = token_from(QueryParams(scope["query_string"]), headers)
                try:
                    await auth.principal(token)
                except AuthError as exc:
                    return refusal(exc.status, exc.message)
        if declared_length(headers) > self.max_body_bytes:
            return refusal(413, TOO_LARGE)
        return None


class CountedBody:
    """A request's ``receive`` that answers 413 past the size bound, 408 past the time bound.

    Past a bound the app is told the client left (``http.disconnect``), so it stops
    reading, and whatever it then tries to send is dropped: the refusal is the reply.
    Once the body is whole, ``receive`` only waits for the client to leave (a stream's
    way to notice it), and no time bound applies.
    """

    def __init__(self, receive: Receive, send: Send, limit: int, timeout: float) -> None:
        self._receive = receive
        self._send = send
        self.limit = limit
        self.deadline = asyncio.get_running_loop().time() + timeout
        self.received = 0
        self.whole = False
        self.started = False
        self.refused = False

    async def receive(self) -> Message:
        """The next body message, or a disconnect once a bound refused the request."""
        if self.refused:
            return DISCONNECT
        if self.whole:
            return await self._receive()
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self._receive()
        except TimeoutError:
            await self._refuse(408, TOO_SLOW)
            return DISCONNECT
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                await self._refuse(413, TOO_LARGE)
                return DISCONNECT
            self.whole = not message.get("more_body", False)
        return message

    async def send(self, message: Message) -> None:
        """Send the app's message, unless a refusal already answered."""
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def _refuse(self, status: int, reason: str) -> None:
        self.refused = True
        if not self.started:  # a reply already under way can only be cut short
            reply = refusal(status, reason)
            await reply({"type": "http"}, _nothing, self._send)


async def _nothing() -> Message:
    return DISCONNECT


def refusal(status: int, reason: str) -> JSONResponse:
    """A one-line refusal that also closes the connection, so no unread body is sunk."""
    headers = {"Connection": "close"}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"detail": reason}, status_code=status, headers=headers)


def declared_length(headers: Headers) -> int:
    """The body's ``Content-Length``, 0 without one (uvicorn refuses a malformed one)."""
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """422 for a body that does not fit its model, whatever it holds.

    The offending value is echoed in the error, and FastAPI's own handler fails with a
    500 on three kinds that JSON cannot carry: a number Python's parser takes but JSON
    has no word for (``NaN``, ``Infinity``, ``1e999``), bytes that are not UTF-8 (a body
    sent without a JSON content type), and text with a lone surrogate (``"\\ud83d"``,
    half an emoji, which a client that cuts a string in the middle of one sends).
    """
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": jsonable_encoder(encodable(exc.errors()))}, status_code=422)


def encodable(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON can carry it: a non-finite float as its name, bytes as text, a
    lone surrogate as U+FFFD (the replacement character), and what lies deeper than
    ``ECHO_DEPTH`` (a body nested a thousand deep) as ``"..."``."""
    if depth > ECHO_DEPTH:
        return "..."
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list | tuple):
        return [encodable(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {encodable(k, depth + 1): encodable(v, depth + 1) for k, v in value.items()}
    return value
