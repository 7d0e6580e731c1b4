"""One client socket: a viewer (:mod:`api.viewer`) carried over a WebSocket.

The socket has two tasks: the endpoint's receive loop, and a writer that drains the
viewer's queue into the socket. When either ends, both stop and the viewer leaves
its channels. A close asked for while the writer is stuck on a client that stopped
reading cancels the writer instead of queuing behind it.

A socket that keeps up never uses its queue: while the queue is empty and nothing is
being sent, a frame goes straight to the connection as ready bytes
(:mod:`api.wire`), in the relay's own call, with no task switch. Everything else
(a client falling behind, a server this cannot reach under) goes through the queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from api.hub import Hub
from api.viewer import Viewer
from api.wire import RawSocket, text_frame
from shared.bus import Bus
from shared.closecodes import Close
from shared.protocol import reply

logger = logging.getLogger("thoughtwire.connection")

CLOSE_TIMEOUT = 1.0

Render = Callable[[str], "str | None"]
ReceiveLoop = Callable[[], Coroutine[Any, Any, None]]


def as_is(frame: str) -> str:
    return frame


class Connection:
    def __init__(
        self, websocket: WebSocket, bus: Bus, hub: Hub, *, queue_size: int, render: Render = as_is
    ) -> None:
        self.websocket = websocket
        # Rendered endpoints change every frame per socket: they take the ASGI way.
        self._raw = RawSocket.of(websocket) if render is as_is else None
        self.viewer = Viewer(
            bus,
            hub,
            queue_size=queue_size,
            on_close=self.close,
            direct=self._write_now if self._raw is not None else None,
        )
        self._render = render
        self._writer: asyncio.Task[None] | None = None
        self._sending = False  # the writer holds a frame it has not finished sending
        self._closing: tuple[int, str] | None = None
        self.sent = 0  # frames written, for idle detection

    def send(self, frame: str) -> None:
        """Queue a frame of the frontend's own, in order with relayed events."""
        self.viewer.put(frame)

    def _write_now(self, frame: str, wire: bytes | None) -> bool:
        """Write ``frame`` at once if nothing is ahead of it; False: it must be queued."""
        if self._sending or self._closing is not None or not self.viewer.queue.empty():
            return False
        assert self._raw is not None
        if not self._raw.write(wire if wire is not None else text_frame(frame.encode())):
            return False
        self.sent += 1
        return True

    def close(self, code: int, reason: str = "") -> None:
        """Close now: pending frames are dropped, and a send in progress is abandoned."""
        if self._closing is not None:
            return
        self._closing = (code, reason)
        if self._writer is not None:
            self._writer.cancel()

    async def serve(self, receive_loop: ReceiveLoop) -> None:
        """Run the receive loop and the writer until either ends, then clean up."""
        writer = self._writer = asyncio.create_task(self._write(), name="socket-writer")
        reader = asyncio.create_task(receive_loop(), name="socket-reader")
        if self._closing is not None:
            writer.cancel()
        try:
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, reader):
                task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
            await self.viewer.detach()
        for task in done:
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not isinstance(exc, WebSocketDisconnect):
                logger.error("socket task failed", exc_info=exc)
                self._closing = self._closing or (Close.INTERNAL, "internal error")
        if self._closing is not None:
            await self._send_close(*self._closing)

    async def _write(self) -> None:
        queue = self.viewer.queue
        while True:
            frame = self._render(await queue.get())
            if frame is None:
                continue
            self._sending = True
            try:
                if self._raw is None or not self._raw.write(text_frame(frame.encode())):
                    await self.websocket.send_text(frame)
            except RuntimeError:
                # The server closed the socket on its own (a frame over the size
                # limit gets 1009 from uvicorn); ASGI then refuses any send.
                raise WebSocketDisconnect(Close.TOO_BIG) from None
            finally:
                self._sending = False
            self.sent += 1

    async def _send_close(self, code: int, reason: str) -> None:
        if self.websocket.application_state != WebSocketState.CONNECTED:
            return
        try:
            # Bounded: the client may not be reading at all. When the handler
            # returns, the server drops the connection anyway.
            async with asyncio.timeout(CLOSE_TIMEOUT):
                farewell = (
                    self._render(reply("reconnect", reason=reason))
                    if code == Close.RESTART
                    else None
                )
                if farewell is not None:
                    await self.websocket.send_text(farewell)
                await self.websocket.close(code, reason)
        except (TimeoutError, RuntimeError, OSError, WebSocketDisconnect):
            pass  # the client is gone already
