"""python-socketio with AsyncRedisManager, for comparison: clients join a room per session.

python -m bench.sio --port P --redis URL
"""

from __future__ import annotations

import argparse
from urllib.parse import parse_qs

import socketio
import uvicorn


def create_app(redis_url: str) -> socketio.ASGIApp:
    server = socketio.AsyncServer(
        async_mode="asgi",
        client_manager=socketio.AsyncRedisManager(redis_url),
        cors_allowed_origins="*",
    )

    @server.event
    async def connect(sid, environ):  # type: ignore[no-untyped-def]
        session = parse_qs(environ.get("QUERY_STRING", ""))["session"][0]
        await server.enter_room(sid, session)
        await server.emit("ready", "ready", to=sid)

    return socketio.ASGIApp(server)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.redis), host="127.0.0.1", port=args.port, log_level="warning")
