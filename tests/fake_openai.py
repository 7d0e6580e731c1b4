"""A local server that speaks the OpenAI Chat Completions streaming format (SSE), scripted per test."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.procs import free_port, wait_until


@dataclass
class Reply:
    """One scripted answer: an error status, or a stream of chunks (``delta`` dicts)."""

    deltas: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # between chunks
    hang_after: int | None = None  # stop sending (but keep the connection) after N chunks

    @classmethod
    def text(cls, *tokens: str, **kwargs: Any) -> Reply:
        return cls(deltas=[{"content": t} for t in tokens], **kwargs)


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class FakeOpenAI:
    """Serves scripted replies in order; records every request body and header it got."""

    def __init__(self) -> None:
        self.port = free_port()
        self.replies: deque[Reply] = deque()
        self.requests: list[dict[str, Any]] = []
        app = Starlette(routes=[Route("/v1/chat/completions", self._complete, methods=["POST"])])
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        self._thread.start()
        wait_until(lambda: self._server.started, 10, "the fake OpenAI server")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    async def _complete(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append({"body": body, "authorization": request.headers.get("authorization")})
        if request.headers.get("authorization") != "Bearer sk-test":
            return JSONResponse(
                {
                    "error": {
                        "message": "Incorrect API key provided",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                },
                status_code=401,
            )
        reply = self.replies.popleft() if self.replies else Reply.text("ok")
        if reply.status != 200:
            return JSONResponse(
                {"error": {"message": "scripted failure", "type": "server_error"}},
                status_code=reply.status,
                headers=reply.headers,
            )
        return StreamingResponse(self._stream(reply), media_type="text/event-stream")

    async def _stream(self, reply: Reply):  # type: ignore[no-untyped-def]
        yield chunk({"role": "assistant", "content": ""})
        for i, delta in enumerate(reply.deltas):
            if reply.hang_after is not None and i >= reply.hang_after:
                await asyncio.sleep(3600)
            if reply.delay:
                await asyncio.sleep(reply.delay)
            yield chunk(delta)
        yield chunk({}, finish_reason="stop")
        yield b"data: [DONE]\n\n"
