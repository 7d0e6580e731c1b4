"""Ready-made frames (api.wire) under a real uvicorn: used when safe, and read back whole;
and the lighter WebSocket protocol (api.wsserver) they are written to."""

import asyncio
import contextlib
import socket

import pytest
import uvicorn
from fastapi import FastAPI, WebSocket
from websockets.asyncio.client import connect

from tests.procs import seconds
from thoughtwire.api.lane import Gateway, SocketRoutes
from thoughtwire.api.wire import SCOPE_KEY, RawSocket, text_frame
from thoughtwire.api.wsserver import PROTOCOL, Flag, Mailbox

SIZES = [0, 1, 125, 126, 65_535, 65_536, 200_000]  # each length encoding, and its edges


def app() -> FastAPI:
    routes = SocketRoutes()
    app = Gateway(socket_routes=routes)

    @routes.route("/frames")
    async def frames(websocket: WebSocket) -> None:
        await websocket.accept()
        protocol = websocket.scope[SCOPE_KEY]
        handshake = (protocol.request, protocol.response)
        await websocket.send_text("let go" if handshake == (None, None) else "held")
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
        uvicorn.Config(
            app(), host="127.0.0.1", port=port, ws=PROTOCOL, log_level="warning", **options
        )
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
        assert await ws.recv() == "let go"  # the handshake is not kept once answered
        assert await ws.recv() == path
        for size in SIZES:
            assert await ws.recv() == "x" * size
        assert await ws.recv() == "end"


def test_a_text_frame_is_header_and_payload():
    assert text_frame(b"hi") == b"\x81\x02hi"
    assert text_frame(b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert text_frame(b"x" * 65_536)[:10] == b"\x81\x7f" + (65_536).to_bytes(8, "big")


async def test_the_mailbox_hands_items_over_in_order_to_a_waiting_reader():
    mailbox = Mailbox()
    reader = asyncio.create_task(mailbox.get())
    await asyncio.sleep(0)
    mailbox.put_nowait("a")
    mailbox.put_nowait("b")
    assert await reader == "a"
    assert not mailbox.empty()
    assert await mailbox.get() == "b"
    assert mailbox.empty()


async def test_the_flag_holds_writers_while_cleared_and_releases_them_all():
    flag = Flag()
    await flag.wait()  # set: no wait
    flag.clear()
    waiting = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiting)
    flag.set()
    async with asyncio.timeout(seconds(1)):
        await asyncio.gather(*waiting)
    assert flag.is_set()
