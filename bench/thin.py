"""The cheapest correct relay, for comparison: one FastAPI WebSocket endpoint, one pub/sub
connection per process with exact channels, bounded per-socket queues. No log, no auth,
no seq of its own: what the feeder publishes is what clients get.

    python -m bench.thin --port P --redis URL
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from redis.asyncio import Redis

QUEUE = 1024


# The baseline is one self-contained function on purpose: the thinnest gateway a reader
# can compare thoughtwire with, read top to bottom.
def create_app(redis_url: str) -> FastAPI:  # noqa: C901
    sockets: dict[bytes, set[asyncio.Queue[str]]] = {}
    state: dict[str, object] = {}

    async def read(pubsub) -> None:  # type: ignore[no-untyped-def]
        while True:
            message = await pubsub.get_message(timeout=None)
            if message and message["type"] == "message":
                text = message["data"].decode()
                for queue in sockets.get(message["channel"], ()):
                    if not queue.full():
                        queue.put_nowait(text)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = Redis.from_url(redis_url)
        pubsub = redis.pubsub()
        await pubsub.subscribe("thin:home")  # never idle: see redis-py's listen()
        reader = asyncio.create_task(read(pubsub))
        state["pubsub"] = pubsub
        yield
        reader.cancel()
        await pubsub.aclose()
        await redis.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.websocket("/ws")
    async def relay(websocket: WebSocket) -> None:
        channel = f"thin:{websocket.query_params['session']}".encode()
        await websocket.accept()
        queue: asyncio.Queue[str] = asyncio.Queue(QUEUE)
        members = sockets.setdefault(channel, set())
        if not members:
            await state["pubsub"].subscribe(channel)  # type: ignore[attr-defined]
        members.add(queue)

        async def pump() -> None:
            while True:
                await websocket.send_text(await queue.get())

        await websocket.send_text("ready")
        sender = asyncio.create_task(pump())
        try:
            # Reading is how a server notices the client left; a relay that only
            # writes would keep a task per departed client.
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass
        except WebSocketDisconnect:
            pass
        finally:
            sender.cancel()
            members.discard(queue)
            if not members:
                sockets.pop(channel, None)
                await state["pubsub"].unsubscribe(channel)  # type: ignore[attr-defined]

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.redis), host="127.0.0.1", port=args.port, log_level="warning")
