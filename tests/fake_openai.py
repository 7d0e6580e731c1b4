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
    error_after: int | None = None  # send an error event after N chunks
    finish_reason: str = "stop"
    usage: dict[str, int] | None = None

    @classmethod
    def text(cls, *tokens: str, **kwargs: Any) -> Reply:
        return cls(deltas=[{"content": t} for t in tokens], **kwargs)

    @classmethod
    def tool_calls(
        cls, *calls: tuple[str | None, str, list[str]], reasoning: tuple[str, ...] = ()
    ) -> Reply:
        """Calls as (id, name, argument pieces): the arguments stream in pieces, as real servers send them.

        An id of None sends none, as some compatible servers do.
        """
        deltas: list[dict[str, Any]] = [{"reasoning_content": r} for r in reasoning]
        for index, (call_id, name, pieces) in enumerate(calls):
            first: dict[str, Any] = {
                "index": index,
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
            if call_id is not None:
                first["id"] = call_id
            deltas.append({"tool_calls": [first]})
            deltas += [
                {"tool_calls": [{"index": index, "function": {"arguments": p}}]} for p in pieces
            ]
        return cls(deltas=deltas, finish_reason="tool_calls")

    @classmethod
    def tool_call(
        cls,
        call_id: str | None,
        name: str,
        arguments: dict[str, Any],
        pieces: int = 4,
        reasoning: tuple[str, ...] = (),
    ) -> Reply:
        """One call whose arguments' JSON streams in ``pieces`` pieces of near-equal length."""
        text = json.dumps(arguments)
        size = -(-len(text) // pieces)
        cut = [text[i : i + size] for i in range(0, len(text), size)]
        assert len(cut) == pieces, f"{text!r} cannot be cut in {pieces} pieces"
        return cls.tool_calls((call_id, name, cut), reasoning=reasoning)


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
        self.disconnects = 0
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
                try:
                    await asyncio.sleep(3600)
                finally:
                    self.disconnects += 1
            if reply.error_after is not None and i >= reply.error_after:
                yield b'data: {"error": {"message": "upstream exploded at 10.1.2.3", "type": "server_error", "code": 500}}\n\n'
                return
            if reply.delay:
                await asyncio.sleep(reply.delay)
            yield chunk(delta)
        yield chunk({}, finish_reason=reply.finish_reason)
        if reply.usage is not None:
            yield (
                b"data: "
                + json.dumps(
                    {**json.loads(chunk({})[6:]), "choices": [], "usage": reply.usage}
                ).encode()
                + b"\n\n"
            )
        yield b"data: [DONE]\n\n"
