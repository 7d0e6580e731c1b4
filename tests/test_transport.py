"""The transport seam: a viewer hands frames to a sink, closes it, respects its backpressure.

The fake sink below has only the three methods of :class:`thoughtwire.api.transport.Transport` and
no way to reach its viewer: whatever the viewer does, it does by calling down.
"""

import asyncio

from tests.procs import seconds
from thoughtwire.api.connection import SocketTransport
from thoughtwire.api.sse import SSE_TOKEN_EXPIRED, EventStream
from thoughtwire.api.transport import Transport
from thoughtwire.api.viewer import Viewer
from thoughtwire.shared.closecodes import Close


class Sink:
    """A transport that takes frames at once until told to push back."""

    def __init__(self, *, pushing_back=False):
        self.pushing_back = pushing_back
        self.written: list[tuple[str, bytes | None]] = []
        self.sent: list[str] = []
        self.closes: list[tuple[int, str]] = []
        self.open = asyncio.Event()  # while clear, send waits: a client not reading
        self.open.set()
        self.ended = False
        self.sending = asyncio.Event()

    def write(self, frame, wire):
        assert not self.closes, "written to after a close"
        if self.pushing_back:
            return False
        self.written.append((frame, wire))
        return True

    async def send(self, frame):
        assert not self.closes, "sent to after a close"
        self.sending.set()
        await self.open.wait()
        if self.ended:
            return False
        self.sent.append(frame)
        return True

    def close(self, code, reason):
        self.closes.append((code, reason))


class NoHub:
    async def join(self, channel, viewer): ...

    async def leave(self, channel, viewer): ...


def viewer_over(sink, queue_size=4):
    return Viewer(None, NoHub(), sink, queue_size=queue_size)


def test_the_contract_has_no_read_method():
    """Write, send, close: nothing a transport could give back but whether it took a frame."""
    members = {name for name in vars(Transport) if not name.startswith("_")}
    assert members == {"write", "write_run", "send", "close"}
    for name in ("__init__", "write", "write_run", "send", "close"):
        for transport in (SocketTransport, EventStream):
            code = getattr(transport, name).__code__
            names = code.co_names + code.co_varnames
            assert not any("viewer" in n for n in names), f"{transport.__name__}.{name}"


async def test_a_sink_that_keeps_up_takes_each_frame_in_the_callers_call():
    """No queue is made and no task started: the fast path of a socket that keeps up."""
    sink = Sink()
    viewer = viewer_over(sink)
    tasks = len(asyncio.all_tasks())
    for i in range(100):
        viewer.put(f"f{i}", b"wire")
    assert sink.written == [(f"f{i}", b"wire") for i in range(100)]
    assert viewer._queue is None and viewer._writer is None
    assert len(asyncio.all_tasks()) == tasks
    await viewer.detach()


async def test_backpressure_queues_and_the_writer_sends_in_order_then_ends():
    sink = Sink(pushing_back=True)
    viewer = viewer_over(sink)
    viewer.put("a")
    viewer.put("b")
    sink.pushing_back = False
    viewer.put("c")  # still behind "a" and "b": queued, not written past them
    writer = viewer._writer
    assert writer is not None
    async with asyncio.timeout(seconds(5)):
        await writer
    assert sink.sent == ["a", "b", "c"] and sink.written == []
    assert viewer._writer is None  # an idle viewer holds no task
    viewer.put("d")  # keeping up again: straight through
    assert sink.written == [("d", None)]
    await viewer.detach()


async def test_a_queue_over_its_byte_cap_closes_the_sink_with_4008_once_and_nobody_waits():
    sink = Sink(pushing_back=True)
    sink.open.clear()  # the client stopped reading
    viewer = Viewer(None, NoHub(), sink, queue_size=2, queue_bytes=8)  # nothing here merges
    viewer.put("0")
    async with asyncio.timeout(seconds(5)):
        await sink.sending.wait()  # "0" is in the stalled send
    writer = viewer._writer
    viewer.put("1")
    viewer.put("2")
    assert sink.closes == []
    viewer.put("one too many")
    viewer.put("ignored")
    assert sink.closes == [(Close.SLOW, "slow consumer: reconnect and resume")]
    async with asyncio.timeout(seconds(5)):
        await asyncio.gather(writer, return_exceptions=True)
    assert writer.cancelled()  # the stalled send is abandoned, not waited for
    assert sink.sent == []
    await viewer.detach()


async def test_a_sink_that_has_ended_is_handed_nothing_more():
    sink = Sink(pushing_back=True)
    sink.ended = True  # send answers False: the client left
    viewer = viewer_over(sink)
    viewer.put("a")
    viewer.put("b")
    async with asyncio.timeout(seconds(5)):
        await asyncio.gather(viewer._writer, return_exceptions=True)
    assert viewer.closed and sink.closes == []  # the transport reports its own end
    viewer.put("c")
    assert sink.sent == [] and sink.written == []
    await viewer.detach()


async def test_a_close_reaches_the_sink_once_and_drops_what_waits():
    sink = Sink(pushing_back=True)
    sink.open.clear()
    viewer = viewer_over(sink)
    viewer.put("a")
    viewer.put("b")
    viewer.close(Close.RESTART, "frontend restarting")
    viewer.close(Close.NORMAL, "again")
    assert sink.closes == [(Close.RESTART, "frontend restarting")]
    await viewer.detach()
    assert sink.sent == [] and viewer._queue is None


async def test_an_event_stream_takes_a_frame_only_while_its_body_waits():
    stream = EventStream()
    body = stream.events()
    assert not stream.write("early", None)  # nobody is reading the body yet: push back
    sending = asyncio.create_task(stream.send('{"type":"x","seq":1,"epoch":"e"}'))
    async with asyncio.timeout(seconds(5)):
        chunk = await anext(body)
        assert await sending
    assert chunk == 'id: e-1\ndata: {"type":"x","seq":1,"epoch":"e"}\n\n'
    stream.close(Close.SLOW, "slow")
    assert not stream.write("late", None)
    async with asyncio.timeout(seconds(5)):
        assert [c async for c in body] == []
        assert not await stream.send("late")


async def test_an_event_stream_whose_token_expired_ends_with_an_error_event():
    stream = EventStream(expires=0.0)
    async with asyncio.timeout(seconds(5)):
        assert [c async for c in stream.events()] == [SSE_TOKEN_EXPIRED]
        assert not await stream.send("after the end")
