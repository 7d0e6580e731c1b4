"""One client socket: a viewer (:mod:`api.viewer`) carried over a WebSocket.

The socket's own task runs the endpoint's receive loop, and while frames wait in the
viewer's queue, a writer task drains it into the socket. When the loop ends, the
writer fails or a close is asked for, both stop and the viewer leaves its channels:
a stop interrupts the loop by cancelling the socket's task, so an idle socket holds
one task, not a reader task and a wait beside it. A close asked for while the writer
is stuck on a client that stopped reading cancels the writer instead of queuing
behind it.

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
            on_queue=self._wake_writer,
        )
        self._render = render
        self._writer: asyncio.Task[None] | None = None
        self._sending = False  # the writer holds a frame it has not finished sending
        self._writer_error: BaseException | None = None
        self._closing: tuple[int, str] | None = None
        self._serving: asyncio.Task[Any] | None = None  # the task in the receive loop
        self._interrupted = False  # a stop has cancelled that task
        self.sent = 0  # frames written, for idle detection

    def send(self, frame: str) -> None:
        """Queue a frame of the frontend's own, in order with relayed events."""
        self.viewer.put(frame)

    def _write_now(self, frame: str, wire: bytes | None) -> bool:
        """Write ``frame`` at once if nothing is ahead of it; False: it must be queued."""
        if self._sending or self._closing is not None or self.viewer.backlog:
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
        self._stop()

    def _stop(self) -> None:
        if self._serving is not None:
            # From a callback, not here: the stop may come from inside the loop itself,
            # which must not be cancelled at whatever it awaits after the loop is over.
            asyncio.get_running_loop().call_soon(self._interrupt)

    def _interrupt(self) -> None:
        if self._serving is not None and not self._interrupted:  # still in the loop
            self._interrupted = True
            self._serving.cancel()

    async def serve(self, receive_loop: ReceiveLoop) -> None:
        """Run the receive loop until it ends, the writer fails or a close is asked for."""
        task = self._serving = asyncio.current_task()
        assert task is not None
        loop_error: BaseException | None = None
        try:
            if self._closing is None and self._writer_error is None:
                await receive_loop()
        except asyncio.CancelledError:
            # Ours (a stop) is taken back; one from outside (shutdown) goes on.
            if not self._interrupted or task.uncancel() > 0:
                raise
        except Exception as exc:
            loop_error = exc
        finally:
            self._serving = None
            writer = self._writer
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            await self.viewer.detach()
        for error in (self._writer_error, loop_error):
            if error is not None and not isinstance(error, WebSocketDisconnect):
                logger.error("socket task failed", exc_info=error)
                self._closing = self._closing or (Close.INTERNAL, "internal error")
        if self._closing is not None:
            await self._send_close(*self._closing)

    def _wake_writer(self) -> None:
        """A frame was queued: make sure a writer is draining the queue."""
        if self._closing is None and (self._writer is None or self._writer.done()):
            self._writer = asyncio.get_running_loop().create_task(
                self._write(), name="socket-writer"
            )
            self._writer.add_done_callback(self._writer_ended)

    def _writer_ended(self, writer: asyncio.Task[None]) -> None:
        if not writer.cancelled() and writer.exception() is not None:
            self._writer_error = writer.exception()
            self._stop()

    async def _write(self) -> None:
        """Send what is queued, in order, then end: an idle socket has no writer task."""
        queue = self.viewer.queue
        while not queue.empty():
            frame = self._render(queue.get_nowait())
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
