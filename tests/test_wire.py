"""Ready-made frames (api.wire) under a real uvicorn: used when safe, and read back whole."""

import asyncio
import contextlib
import socket

import pytest
import uvicorn
from fastapi import FastAPI, WebSocket
from websockets.asyncio.client import connect

from api.lane import SocketLane, SocketRoutes
from api.wire import RawSocket, text_frame
from tests.procs import seconds

SIZES = [0, 1, 125, 126, 65_535, 65_536, 200_000]  # each length encoding, and its edges


def app() -> FastAPI:
    routes = SocketRoutes()
    app = FastAPI()
    app.add_middleware(SocketLane, routes=routes)

    @routes.route("/frames")
    async def frames(websocket: WebSocket) -> None:
        await websocket.accept()
        raw = RawSocket.of(websocket)
        await websocket.send_text("raw" if raw is not None else "asgi")
        for size in SIZES:
            frame = "x" * size
            if raw is None or not raw.write(text_frame(frame.encode())):
                await websocket.send_text(frame)
        await websocket.send_text("end")
        await websocket.receive()

    return app


@contextlib.asynccontextmanager
async def serving(**options):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app(), host="127.0.0.1", port=port, log_level="warning", **options)
    )
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(seconds(10)):
            while not server.started:
                await asyncio.sleep(0.01)
        yield f"ws://127.0.0.1:{port}/frames"
    finally:
        server.should_exit = True
        await task


@pytest.mark.parametrize(
    ("deflate", "path"), [(False, "raw"), (True, "asgi")], ids=["plain", "permessage-deflate"]
)
async def test_frames_are_written_raw_only_when_safe_and_arrive_whole(deflate, path):
    async with (
        serving(ws_per_message_deflate=deflate) as url,
        connect(url, compression="deflate" if deflate else None) as ws,
    ):
        assert await ws.recv() == path
        for size in SIZES:
            assert await ws.recv() == "x" * size
        assert await ws.recv() == "end"


def test_a_text_frame_is_header_and_payload():
    assert text_frame(b"hi") == b"\x81\x02hi"
    assert text_frame(b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert text_frame(b"x" * 65_536)[:10] == b"\x81\x7f" + (65_536).to_bytes(8, "big")
