"""One client socket: its bounded send queue, its writer, the channels it is on.

Slow-client policy: each socket has a send queue of ``send_queue_size`` frames. The
hub only ever puts into it without waiting. When it is full the client is not
keeping up; its queue is dropped and the socket is closed with 4008 (SLOW), which
tells the client to reconnect and resume from its last ``seq``. Nobody else waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from api.hub import Hub
from shared.closecodes import Close

logger = logging.getLogger("thoughtwire.connection")

CLOSE_TIMEOUT = 1.0

Render = Callable[[str], "str | None"]
ReceiveLoop = Callable[[], Coroutine[Any, Any, None]]


def as_is(frame: str) -> str:
    return frame


class Connection:
    """A socket as the hub sees it: a viewer with a bounded queue and one writer task."""

    def __init__(self, websocket: WebSocket, hub: Hub, *, queue_size: int, render: Render) -> None:
        self.websocket = websocket
        self._hub = hub
        self._render = render
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)
        self._channels: set[str] = set()
        self._writer: asyncio.Task[None] | None = None
        self._closing: tuple[int, str] | None = None

    # --- viewer -------------------------------------------------------------

    def deliver(self, text: str) -> None:
        if self._closing is not None:
            return
        try:
            self._queue.put_nowait(text)
        except asyncio.QueueFull:
            self.close(Close.SLOW, "slow consumer: reconnect and resume")

    def send(self, text: str) -> None:
        """Queue a frame of the frontend's own, in order with relayed events."""
        self.deliver(text)

    def close(self, code: int, reason: str = "") -> None:
        """Close now: pending frames are dropped, and a send in progress is abandoned.

        The writer may be stuck sending to a client that stopped reading, so it is
        cancelled rather than asked to stop; :meth:`serve` then sends the close.
        """
        if self._closing is not None:
            return
        self._closing = (code, reason)
        if self._writer is not None:
            self._writer.cancel()

    # --- channels -----------------------------------------------------------

    async def join(self, channel: str) -> None:
        if channel not in self._channels:
            self._channels.add(channel)
            await self._hub.join(channel, self)

    async def leave(self, channel: str) -> None:
        if channel in self._channels:
            self._channels.discard(channel)
            await self._hub.leave(channel, self)

    # --- lifecycle ----------------------------------------------------------

    async def serve(self, receive_loop: ReceiveLoop) -> None:
        """Run the receive loop and the writer until either ends, then clean up."""
        writer = self._writer = asyncio.create_task(self._write(), name="socket-writer")
        reader = asyncio.create_task(receive_loop(), name="socket-reader")
        try:
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, reader):
                task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
            for channel in list(self._channels):
                await self.leave(channel)
        for task in done:
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not isinstance(exc, WebSocketDisconnect):
                logger.error("socket task failed", exc_info=exc)
                self._closing = self._closing or (Close.INTERNAL, "internal error")
        if self._closing is not None:
            await self._send_close(*self._closing)

    async def _write(self) -> None:
        while True:
            frame = self._render(await self._queue.get())
            if frame is not None:
                await self.websocket.send_text(frame)

    async def _send_close(self, code: int, reason: str) -> None:
        if self.websocket.application_state != WebSocketState.CONNECTED:
            return
        try:
            # Bounded: the client may not be reading at all. When the handler
            # returns, the server drops the connection anyway.
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.websocket.close(code, reason)
        except (TimeoutError, RuntimeError, OSError):
            pass
