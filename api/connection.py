"""One client socket: its bounded send queue, its writer, the channels it is on.

Slow-client policy: each socket has a send queue of ``send_queue_size`` frames. The
hub only ever puts into it without waiting. When it is full the client is not
keeping up; its queue is dropped and the socket is closed with 4008 (SLOW), which
tells the client to reconnect and resume from its last ``seq``. Nobody else waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from api.hub import Hub
from shared.closecodes import Close

logger = logging.getLogger("thoughtwire.connection")

Render = Callable[[str], "str | None"]


def as_is(frame: str) -> str:
    return frame


class _Closing:
    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class Connection:
    """A socket as the hub sees it: a viewer with a bounded queue and one writer task."""

    def __init__(self, websocket: WebSocket, hub: Hub, *, queue_size: int, render: Render) -> None:
        self.websocket = websocket
        self._hub = hub
        self._render = render
        self._queue: asyncio.Queue[str | _Closing] = asyncio.Queue(maxsize=queue_size)
        self._channels: set[str] = set()
        self._closing = False

    # --- viewer -------------------------------------------------------------

    def deliver(self, text: str) -> None:
        if self._closing:
            return
        try:
            self._queue.put_nowait(text)
        except asyncio.QueueFull:
            self.close(Close.SLOW, "slow consumer: reconnect and resume")

    def send(self, text: str) -> None:
        """Queue a frame of the frontend's own, in order with relayed events."""
        self.deliver(text)

    def close(self, code: int, reason: str = "") -> None:
        """Close after nothing more: pending frames are dropped."""
        if self._closing:
            return
        self._closing = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_Closing(code, reason))

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

    async def serve(self, receive_loop: Callable[[], Awaitable[None]]) -> None:
        """Run the receive loop and the writer until either ends, then clean up."""
        writer = asyncio.create_task(self._write(), name="socket-writer")
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
            exc = task.exception()
            if exc is not None and not isinstance(exc, WebSocketDisconnect):
                logger.error("socket task failed", exc_info=exc)
                await self._close_now(Close.INTERNAL, "internal error")

    async def _write(self) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, _Closing):
                await self._close_now(item.code, item.reason)
                return
            frame = self._render(item)
            if frame is not None:
                await self.websocket.send_text(frame)

    async def _close_now(self, code: int, reason: str) -> None:
        if self.websocket.application_state == WebSocketState.CONNECTED:
            try:
                await self.websocket.close(code, reason)
            except (RuntimeError, OSError):
                pass  # the client is already gone
