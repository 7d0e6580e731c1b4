"""One client socket: a viewer (:mod:`thoughtwire.api.viewer`) carried over a WebSocket transport.

:class:`SocketTransport` is the WebSocket's side of :class:`thoughtwire.api.transport.Transport`.
A JSON socket that keeps up takes each frame in the hub's own call, as ready bytes
written straight to the connection (:mod:`thoughtwire.api.wire`), with no task switch; everything
else (a client falling behind, a rendered endpoint, a server this cannot reach under)
is pushed back to the viewer, whose writer task offers it to ``send`` through ASGI.

The socket's own task runs the endpoint's receive loop (:meth:`Connection.serve`).
When the loop ends, a send fails or a close is asked for, the loop stops and the
viewer leaves its channels: a stop interrupts the loop by cancelling the socket's
task, so an idle socket holds one task, not a reader task and a wait beside it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from thoughtwire.api.hub import Hub
from thoughtwire.api.viewer import QUEUE_BYTES, Viewer
from thoughtwire.api.wire import RawSocket, text_frame
from thoughtwire.shared import tracing
from thoughtwire.shared.bus import Bus
from thoughtwire.shared.closecodes import Close
from thoughtwire.shared.protocol import reply
from thoughtwire.shared.vocab import ViewScope

logger = logging.getLogger("thoughtwire.connection")

CLOSE_TIMEOUT = 1.0
MAX_AWAITED = 64  # runs a socket waits to trace the first event of, at most

Render = Callable[[str], "str | None"]
ReceiveLoop = Callable[[], Coroutine[Any, Any, None]]


def as_is(frame: str) -> str:
    """The JSON endpoints' rendering: the frame as it came from Redis."""
    return frame


class SocketTransport:
    """A WebSocket as a viewer's transport: writes frames, closes, never reads back."""

    __slots__ = (
        "_awaiting",
        "_closing",
        "_error",
        "_interrupted",
        "_raw",
        "_render",
        "_serving",
        "sent",
        "websocket",
    )

    def __init__(self, websocket: WebSocket, render: Render = as_is) -> None:
        self.websocket = websocket
        # Rendered endpoints change every frame per socket: they take the ASGI way.
        self._raw = RawSocket.of(websocket) if render is as_is else None
        self._render = render
        self._error: BaseException | None = None  # a send failed
        self._closing: tuple[int, str] | None = None
        self._serving: asyncio.Task[Any] | None = None  # the task in the receive loop
        self._interrupted = False  # a stop has cancelled that task
        self.sent = 0  # frames written, for idle detection
        # With tracing on, the runs this socket prompted whose first event is still to
        # come: by the text that names the run in an event, the prompt's span and time.
        self._awaiting: dict[str, tuple[Any, int]] | None = None

    def write(self, frame: str, wire: bytes | None) -> bool:
        """Write ``frame`` as ready bytes now; False when it must go the ASGI way."""
        if self._raw is None or self._closing is not None or self._error is not None:
            return False
        if not self._raw.write(wire if wire is not None else text_frame(frame.encode())):
            return False
        self.sent += 1
        if self._awaiting:
            self._relayed((frame,))
        return True

    def write_run(self, frames: list[str], wire: bytes) -> bool:
        """Write ``frames``, ready and joined as ``wire``, with one write; False when they
        must go one by one."""
        if self._raw is None or self._closing is not None or self._error is not None:
            return False
        if not self._raw.write(wire):
            return False
        self.sent += len(frames)
        if self._awaiting:
            self._relayed(frames)
        return True

    async def send(self, frame: str) -> bool:
        """Send ``frame`` through ASGI, waiting on a slow client; False once ended."""
        if self._closing is not None or self._error is not None:
            return False
        text = self._render(frame)
        if text is None:
            return True  # nothing to show for this frame on this endpoint
        try:
            if self._raw is None or not self._raw.write(text_frame(text.encode())):
                await self.websocket.send_text(text)
        except RuntimeError:
            # The server closed the socket on its own (a frame over the size limit
            # gets 1009 from uvicorn); ASGI then refuses any send.
            return self._failed(WebSocketDisconnect(Close.TOO_BIG))
        except Exception as exc:
            return self._failed(exc)
        self.sent += 1
        if self._awaiting:
            self._relayed((frame,))
        return True

    def await_first(self, run: str, prompt: Any, since_ns: int) -> None:
        """Trace the first event of ``run`` written to this socket: a span under ``prompt``
        (the span of the prompt that queued it) from ``since_ns`` on (shared/tracing.py)."""
        if self._awaiting is None:
            self._awaiting = {}
        if len(self._awaiting) < MAX_AWAITED:
            self._awaiting[f'"run":"{run}"'] = (prompt, since_ns)

    def _relayed(self, frames: Sequence[str]) -> None:
        assert self._awaiting is not None
        for needle, (prompt, since_ns) in list(self._awaiting.items()):
            if any(needle in frame for frame in frames):
                del self._awaiting[needle]
                tracing.record("first event relayed", since_ns, parent=prompt)

    def _failed(self, error: BaseException) -> bool:
        self._error = error
        self._stop()
        return False

    def close(self, code: int, reason: str = "") -> None:
        """Close now: pending frames are the viewer's to drop. Idempotent."""
        if self._closing is not None:
            return
        self._closing = (code, reason)
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

    def serve_in(self, task: asyncio.Task[Any] | None) -> None:
        """The task running the receive loop, which a stop cancels; None once it left."""
        self._serving = task

    @property
    def open(self) -> bool:
        """Neither closed nor failed."""
        return self._closing is None and self._error is None

    def took_back(self, task: asyncio.Task[Any]) -> bool:
        """After ``task`` was cancelled in the loop: whether this was a stop, now taken back.

        A cancellation from outside (a shutdown) goes on, even if a stop met it.
        """
        return self._interrupted and task.uncancel() == 0

    def failed(self, error: BaseException) -> None:
        """The receive loop failed: reported, and a 1011 sent, by :meth:`finish`."""
        self._error = self._error or error

    async def finish(self) -> None:
        """Report a failure, then send the close asked for (or 1011 after a failure)."""
        error = self._error
        if error is not None and not isinstance(error, WebSocketDisconnect):
            logger.error("socket task failed", exc_info=error)
            self._closing = self._closing or (Close.INTERNAL, "internal error")
        if self._closing is not None:
            await self._send_close(*self._closing)

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


class Connection:
    """A socket's viewer and its WebSocket transport, for the endpoint that owns both."""

    __slots__ = ("transport", "viewer")

    def __init__(
        self,
        websocket: WebSocket,
        bus: Bus,
        hub: Hub,
        *,
        queue_size: int,
        render: Render = as_is,
        queue_bytes: int = QUEUE_BYTES,
        scope: ViewScope = ViewScope.FULL,
    ) -> None:
        self.transport = SocketTransport(websocket, render)
        self.viewer = Viewer(
            bus, hub, self.transport, queue_size=queue_size, queue_bytes=queue_bytes, scope=scope
        )

    @property
    def sent(self) -> int:
        """Frames written to the client, for idle detection."""
        return self.transport.sent

    def send(self, frame: str) -> None:
        """Send a frame of the frontend's own, in order with relayed events."""
        self.viewer.put(frame)

    def close(self, code: int, reason: str = "") -> None:
        """Close now: what waits is dropped, and a send in progress is abandoned."""
        self.viewer.close(code, reason)

    async def serve(self, receive_loop: ReceiveLoop) -> None:
        """Run the receive loop until it ends, a send fails or a close is asked for.

        Then the viewer leaves every channel, and the transport sends its close.

        The viewer's writer is stopped before the close is sent, so the close never
        queues behind a send to a client that stopped reading.
        """
        # Inline, not in a method of the transport's: an idle socket waits here, and a
        # coroutine between its task and the loop would cost each socket a frame.
        transport = self.transport
        task = asyncio.current_task()
        assert task is not None
        transport.serve_in(task)
        try:
            if transport.open:
                await receive_loop()
        except asyncio.CancelledError:
            if not transport.took_back(task):
                raise
        except Exception as exc:
            transport.failed(exc)
        finally:
            transport.serve_in(None)
            await self.viewer.detach()
        await transport.finish()
