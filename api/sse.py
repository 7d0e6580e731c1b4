"""Server-sent events as a viewer's transport (:class:`thoughtwire.api.transport.Transport`).

The response body is pulled: :meth:`EventStream.events` is the async iterator a
streaming response reads. While it waits for the next frame, ``write`` hands a frame
to it at once; while it is busy (its last chunk not yet taken by the server), ``write``
pushes back, and the viewer's writer waits in ``send`` for it to ask again. The stream
holds no queue of its own: one frame at most is in hand.

Each event's ``id`` is ``<epoch>-<seq>``, and a gap's is the position it leaves, so
``Last-Event-ID`` resumes. A keep-alive comment goes out after a quiet interval; when
the client's token expires the stream sends an ``error`` event and ends, as a socket
closes with 4001; a close ends the stream, and EventSource reconnects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson

from thoughtwire.shared.closecodes import ErrorCode
from thoughtwire.shared.protocol import error_reply, event_id, event_position

SSE_KEEPALIVE_SECONDS = 15.0
# A stream's last event when its token expires, as a socket closes with 4001: EventSource
# clients see why (an ``error`` event), then the stream ends.
SSE_TOKEN_EXPIRED = (
    f"event: error\ndata: {error_reply(ErrorCode.TOKEN_EXPIRED, 'token expired')}\n\n"
)


GAP_HEAD = '{"type":"gap",'  # how a gap reply is encoded (api.recovery)
SNAPSHOT_HEAD = '{"type":"snapshot",'  # how a snapshot is encoded (shared.snapshots)


def event_line(frame: str) -> str:
    """``event: snapshot`` for a snapshot: EventSource hands it to its own listener.

    Its ``id`` (its position) still moves ``Last-Event-ID``; a client that only
    listens for messages is not handed a state it does not know how to read.
    """
    return "event: snapshot\n" if frame.startswith(SNAPSHOT_HEAD) else ""


def id_line(frame: str) -> str:
    """A frame's ``id:`` line: an event's position, or the position a gap leaves the client.

    A gap moves the client to ``next - 1`` of its epoch (to seq 0 of none, ``0``, when
    the log is gone); without an id, a stream that drops before the next event would
    resume from the old position and be told of the same loss again.
    """
    position = event_position(frame)
    if position is not None:
        return f"id: {event_id(*position)}\n"
    if not frame.startswith(GAP_HEAD):
        return ""
    gap = orjson.loads(frame)
    seq = gap["next"] - 1
    return f"id: {seq if gap['epoch'] is None else event_id(seq, gap['epoch'])}\n"


class EventStream:
    """One SSE response's body, fed by a viewer: writes frames, closes, never reads back."""

    __slots__ = ("_asking", "_expires", "_taker", "closed")

    def __init__(self, expires: float | None = None) -> None:
        self._expires = expires  # when the client's token expires, if it does
        self._taker: asyncio.Future[str | None] | None = None  # the body waiting for a frame
        self._asking: asyncio.Future[None] | None = None  # a send waiting for the body
        self.closed = False

    def write(self, frame: str, wire: bytes | None) -> bool:
        """Hand ``frame`` to the body if it is waiting for one; False (pushing back) if not."""
        taker = self._taker
        if self.closed or taker is None or taker.done():
            return False
        self._taker = None
        taker.set_result(frame)
        return True

    def write_run(self, frames: list[str], wire: bytes) -> bool:
        """Always False: the body takes one frame at a time, so a run goes frame by frame."""
        return False

    async def send(self, frame: str) -> bool:
        """Hand ``frame`` to the body as soon as it asks; False once the stream ended."""
        # Bounded: each round either hands the frame over or waits for the next ask,
        # and a close ends the wait.
        while not self.write(frame, None):
            if self.closed:
                return False
            self._asking = asyncio.get_running_loop().create_future()
            await self._asking
        return True

    def close(self, code: int, reason: str) -> None:
        """End the stream; EventSource reconnects and resumes. Idempotent."""
        self.closed = True
        if self._taker is not None and not self._taker.done():
            self._taker.set_result(None)
        self._wake_sender()

    def _wake_sender(self) -> None:
        asking, self._asking = self._asking, None
        if asking is not None and not asking.done():
            asking.set_result(None)

    def _wait(self) -> float:
        """Seconds until a keep-alive is due or the token expires, whichever is first."""
        if self._expires is None:
            return SSE_KEEPALIVE_SECONDS
        return max(0.0, min(SSE_KEEPALIVE_SECONDS, self._expires - time.time()))

    async def _next(self) -> str | None:
        """The next frame, None when closed; TimeoutError when quiet for a while."""
        taker = self._taker = asyncio.get_running_loop().create_future()
        self._wake_sender()
        try:
            async with asyncio.timeout(self._wait()):
                return await taker
        except TimeoutError:
            if taker.done() and not taker.cancelled():
                return taker.result()  # handed over as the wait ran out: not lost
            raise
        finally:
            self._taker = None

    async def events(self) -> AsyncIterator[str]:
        """The response body: events, keep-alives, and the token's expiry."""
        try:
            async for chunk in self._chunks():
                yield chunk
        finally:
            self.closed = True  # the body is over: a waiting send learns it now
            self._wake_sender()

    async def _chunks(self) -> AsyncIterator[str]:
        expires = self._expires
        # Bounded by the client: it ends when the stream is closed, the token expires
        # or the server stops reading it.
        while not self.closed:
            if expires is not None and time.time() >= expires:
                yield SSE_TOKEN_EXPIRED
                return
            try:
                frame = await self._next()
            except TimeoutError:
                if expires is None or time.time() < expires:
                    yield ": keep-alive\n\n"
                continue
            if frame is None:
                return
            yield f"{id_line(frame)}{event_line(frame)}data: {frame}\n\n"
