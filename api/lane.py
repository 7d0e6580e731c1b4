"""The WebSocket endpoints' own lane: matched and called before FastAPI sees them.

A socket may stay open for hours, and everything on its stack stays with it. Through
FastAPI, each one carries the framework's middleware and routing frames, three exit
stacks and a scope grown by every router: about 7 KB per open socket, for features
(dependency injection, exception handlers) these endpoints do not use. So the
endpoints of a :class:`SocketRoutes` are matched by :class:`Gateway`'s entry point,
by Starlette's own path syntax, and called with a plain Starlette ``WebSocket``;
every other request, and a WebSocket to any other path, goes on to FastAPI as usual.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.routing import compile_path
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from api.wire import expose_protocol

Endpoint = Callable[[WebSocket], Awaitable[None]]


class SocketRoutes:
    """WebSocket endpoints by path: exact paths, then ``{param}`` patterns, in order."""

    def __init__(self) -> None:
        self._exact: dict[str, Endpoint] = {}
        self._patterns: list[tuple[re.Pattern[str], dict[str, Any], Endpoint]] = []

    def route(self, path: str) -> Callable[[Endpoint], Endpoint]:
        def register(endpoint: Endpoint) -> Endpoint:
            if "{" in path:
                regex, _format, convertors = compile_path(path)
                self._patterns.append((regex, convertors, endpoint))
            else:
                self._exact[path] = endpoint
            return endpoint

        return register

    def match(self, path: str) -> tuple[Endpoint, dict[str, Any]] | None:
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

    def __init__(self, *, socket_routes: SocketRoutes, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.socket_routes = socket_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            expose_protocol(scope, send)
            found = self.socket_routes.match(scope["path"])
            if found is not None:
                scope["app"] = self
                endpoint, scope["path_params"] = found
                await endpoint(WebSocket(scope, receive, send))
                return
        await super().__call__(scope, receive, send)
