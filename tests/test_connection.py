"""The slow-client policy, with a socket that never finishes a send."""

import asyncio

from starlette.websockets import WebSocketState

from tests.procs import seconds
from thoughtwire.api.connection import Connection, as_is
from thoughtwire.shared.closecodes import Close


class StuckSocket:
    """Accepts one frame, then blocks every later send, like a client that stopped reading."""

    def __init__(self):
        self.scope = {"type": "websocket"}  # not under uvicorn: every frame goes via ASGI
        self.application_state = WebSocketState.CONNECTED
        self.sent = []
        self.closed = asyncio.get_running_loop().create_future()
        self.stuck = asyncio.Event()

    async def send_text(self, text):
        self.sent.append(text)
        self.stuck.set()
        await asyncio.Event().wait()

    async def close(self, code, reason=""):
        self.application_state = WebSocketState.DISCONNECTED
        self.closed.set_result((code, reason))


class NullHub:
    async def join(self, channel, viewer): ...

    async def leave(self, channel, viewer): ...


async def test_a_client_that_falls_behind_is_closed_with_4008_and_nobody_waits():
    socket = StuckSocket()
    conn = Connection(socket, None, NullHub(), queue_size=4, render=as_is, queue_bytes=4)
    serving = asyncio.create_task(conn.serve(lambda: asyncio.Event().wait()))
    conn.send("0")
    async with asyncio.timeout(seconds(5)):
        await socket.stuck.wait()
    for i in range(1, 5):
        conn.viewer.deliver(str(i), None)  # fills the queue's 4 bytes: the relay never blocks
    assert not socket.closed.done()
    conn.viewer.deliver("one too many", None)
    conn.viewer.deliver("and more, ignored", None)
    async with asyncio.timeout(seconds(5)):
        code, reason = await socket.closed
    assert code == Close.SLOW and "resume" in reason
    assert socket.sent == ["0"]
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)


async def receiving(conn):
    """Serve ``conn`` with a receive loop that waits forever; return once it is waiting."""
    waiting = asyncio.Event()

    async def loop():
        waiting.set()
        await asyncio.Event().wait()

    serving = asyncio.create_task(conn.serve(loop))
    async with asyncio.timeout(seconds(5)):
        await waiting.wait()
    return serving


async def test_a_close_ends_the_receive_loop_in_the_sockets_own_task():
    socket = StuckSocket()
    conn = Connection(socket, None, NullHub(), queue_size=4, render=as_is)
    serving = await receiving(conn)
    conn.close(Close.NORMAL, "bye")
    async with asyncio.timeout(seconds(5)):
        await serving  # returns: the stop's own cancellation is taken back
    assert await socket.closed == (Close.NORMAL, "bye")


async def test_a_shutdown_that_meets_a_close_still_cancels_the_socket():
    socket = StuckSocket()
    conn = Connection(socket, None, NullHub(), queue_size=4, render=as_is)
    serving = await receiving(conn)
    serving.cancel()  # the server shuts down, and in the same moment the socket is closed
    conn.close(Close.NORMAL, "bye")
    async with asyncio.timeout(seconds(5)):
        await asyncio.gather(serving, return_exceptions=True)
    assert serving.cancelled()


class RefusingSocket(StuckSocket):
    """A socket the server has closed on its own: ASGI refuses every send."""

    async def send_text(self, text):
        raise RuntimeError("Unexpected ASGI message 'websocket.send'")


async def test_a_failed_send_ends_the_socket_and_its_viewer_without_a_close():
    socket = RefusingSocket()
    conn = Connection(socket, None, NullHub(), queue_size=4, render=as_is)
    serving = await receiving(conn)
    conn.send("0")
    async with asyncio.timeout(seconds(5)):
        await serving  # the transport stopped its own receive loop
    assert conn.viewer.closed
    assert not socket.closed.done()  # the server closed it already: nothing more is sent
    conn.send("1")
    assert conn.sent == 0


class ReadyRaw:
    """Stands for uvicorn's connection under :class:`thoughtwire.api.wire.RawSocket`: takes every frame."""

    def __init__(self):
        self.frames = []

    def write(self, frame):
        self.frames.append(frame)
        return True


async def test_a_json_socket_that_keeps_up_writes_ready_frames_in_the_hubs_own_call():
    """No queue and no writer task: the bytes the hub framed go straight to the connection."""
    conn = Connection(StuckSocket(), None, NullHub(), queue_size=4, render=as_is)
    raw = conn.transport._raw = ReadyRaw()
    tasks = len(asyncio.all_tasks())
    for seq in range(1, 101):
        conn.viewer.deliver(f"e{seq}", None, b"ready %d" % seq)
    conn.send("own")  # a frame of the frontend's own: framed here, in order
    assert raw.frames == [b"ready %d" % seq for seq in range(1, 101)] + [b"\x81\x03own"]
    assert conn.sent == 101
    assert conn.viewer._queue is None and conn.viewer._writer is None
    assert len(asyncio.all_tasks()) == tasks
    await conn.viewer.detach()
