"""The WebSocket endpoints' own lane: matched and called before FastAPI sees them.

A socket may stay open for hours, and everything on its stack stays with it. Through
FastAPI, each one carries the framework's middleware and routing frames, three exit
stacks and a scope grown by every router: about 7 KB per open socket, for features
(dependency injection, exception handlers) these endpoints do not use. So the
endpoints of a :class:`SocketRoutes` are matched by :class:`Gateway`'s entry point,
by Starlette's own path syntax, and called with a plain Starlette ``WebSocket``;
every other request, and a WebSocket to any other path, goes on to FastAPI as usual.

The entry point is also where every request, HTTP or WebSocket, has its ``Host``
checked (:func:`thoughtwire.api.auth.host_allowed`): nothing behind it runs for a request
addressed to a name this frontend does not serve.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import compile_path
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from thoughtwire.api.auth import HOST_REFUSAL, host_allowed, token_from
from thoughtwire.api.wire import expose_protocol
from thoughtwire.shared.closecodes import Close
from thoughtwire.shared.settings import Settings

logger = logging.getLogger("thoughtwire.lane")

# Refused hosts already warned about: each is logged once, and at most this many are
# remembered, as the Host header is the requester's to choose.
WARNED_HOSTS = 64

Endpoint = Callable[[WebSocket], Awaitable[None]]


class SocketRoutes:
    """WebSocket endpoints by path: exact paths, then ``{param}`` patterns, in order."""

    def __init__(self) -> None:
        self._exact: dict[str, Endpoint] = {}
        self._patterns: list[tuple[re.Pattern[str], dict[str, Any], Endpoint]] = []
        self.paths: list[str] = []  # as registered, for whoever lists the endpoints

    def route(self, path: str) -> Callable[[Endpoint], Endpoint]:
        """Register the decorated endpoint for ``path`` (a Starlette path pattern)."""

        def register(endpoint: Endpoint) -> Endpoint:
            self.paths.append(path)
            if "{" in path:
                regex, _format, convertors = compile_path(path)
                self._patterns.append((regex, convertors, endpoint))
            else:
                self._exact[path] = endpoint
            return endpoint

        return register

    def match(self, path: str) -> tuple[Endpoint, dict[str, Any]] | None:
        """The endpoint for ``path`` and its path parameters, or None."""
        endpoint = self._exact.get(path)
        if endpoint is not None:
            return endpoint, {}
        for regex, convertors, endpoint in self._patterns:
            found = regex.match(path)
            if found is not None:
                params = {k: convertors[k].convert(v) for k, v in found.groupdict().items()}
                return endpoint, params
        return None


class Gateway(FastAPI):
    """FastAPI, with the WebSocket endpoints of ``socket_routes`` served ahead of it.

    Even the outermost middleware runs inside FastAPI's own layers (error, telemetry,
    body limit), each a frame that a socket would hold for its whole life; so the
    lane is the application's own entry point, and those layers see everything else.
    """

    def __init__(
        self, *, socket_routes: SocketRoutes, settings: Settings | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.socket_routes = socket_routes
        self.settings = settings or Settings()
        self._warned: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse unknown hosts, serve socket routes here, pass the rest on."""
        if scope["type"] in ("http", "websocket"):
            headers = Headers(scope=scope)
            if not host_allowed(headers, self.settings):
                self._warn(headers.get("host", ""))
                await _refuse_host(scope, receive, send, headers)
                return
        if scope["type"] == "websocket":
            expose_protocol(scope, send)
            found = self.socket_routes.match(scope["path"])
            if found is not None:
                scope["app"] = self
                endpoint, scope["path_params"] = found
                await endpoint(WebSocket(scope, receive, send))
                return
        await super().__call__(scope, receive, send)

    def _warn(self, host: str) -> None:
        if host in self._warned or len(self._warned) >= WARNED_HOSTS:
            return
        self._warned.add(host)
        logger.warning(
            "refused a request for host %r: if this frontend serves that name, "
            "add it to THOUGHTWIRE_ALLOWED_HOSTS",
            host[:100],
        )


async def _refuse_host(scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
    """400 over HTTP; a socket is accepted and closed with 1008, as browsers see no 400."""
    if scope["type"] == "http":
        await JSONResponse({"detail": HOST_REFUSAL}, status_code=400)(scope, receive, send)
        return
    websocket = WebSocket(scope, receive, send)
    _, subprotocol = token_from({}, headers)
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):  # it left already
        await websocket.accept(subprotocol)
        await websocket.close(Close.POLICY, HOST_REFUSAL)
