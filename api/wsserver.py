"""uvicorn's WebSocket protocol, holding less for each open socket.

Most sockets sit idle for most of their lives, so what each one holds is what a
frontend's memory is made of. uvicorn's websockets-sansio protocol keeps, for a
socket's whole life, an ``asyncio.Queue`` of ASGI events and an ``asyncio.Event`` for
back-pressure (five deques between them, about 3 KB), and the handshake's request
and response with their headers (about 3 KB more). :class:`SocketProtocol` keeps
a list and a future in their place, and lets the handshake go once it is answered.
It also sends a close to a client that stopped reading at once, where uvicorn would
wait for the client to read first (see :meth:`SocketProtocol._close_now`).
Everything else is uvicorn's own.

:data:`PROTOCOL` is the class to hand to ``uvicorn.Config(ws=...)``; with a uvicorn
or websockets that lacks the sans-I/O protocol it is ``"auto"``, uvicorn's choice.
"""

from __future__ import annotations

import asyncio
from typing import Any

PROTOCOL: Any = "auto"

# How long a socket closed while its client was not reading may take to hand the
# client what it was sent before its close; after that it is aborted.
CLOSE_FLUSH_SECONDS = 30.0


class Mailbox:
    """What uvicorn asks of its ASGI event queue: ``put_nowait``, ``get``, ``empty``.

    One reader (the application's ``receive``), so one waiter at most.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class Flag:
    """What uvicorn asks of its "writable" event: ``set``, ``clear``, ``is_set``, ``wait``."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter


try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol,
    )
except ImportError:  # pragma: no cover - an older uvicorn, or no websockets
    pass
else:

    class SocketProtocol(WebSocketsSansIOProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.queue = Mailbox()  # type: ignore[assignment]
            self.writable = Flag()  # type: ignore[assignment]

        async def send(self, message: Any) -> None:
            if message["type"] == "websocket.close" and not self.writable.is_set():
                await self._close_now(message)
                return
            await super().send(message)
            if self.handshake_complete and message["type"] == "websocket.accept":
                # Used only to answer the handshake, which is done.
                self.request = self.response = None  # type: ignore[assignment]

        async def _close_now(self, message: Any) -> None:
            """Send a close to a client that stopped reading, without waiting for it.

            uvicorn waits for the transport to be writable before any send, a close
            too, and a client that stopped reading never makes it writable: the close
            would never go, and the client would find its connection dropped (1006)
            instead of told to resume (4008). The close frame is a few bytes: it joins
            the transport's buffer behind the frames already there. A client that
            never reads them is cut off after ``CLOSE_FLUSH_SECONDS``.
            """
            paused, self.writable = self.writable, Flag()  # a set flag: no wait
            try:
                await super().send(message)
            finally:
                self.writable = paused
            self.loop.call_later(CLOSE_FLUSH_SECONDS, self._abandon)

        def _abandon(self) -> None:
            if not self.disconnected:
                self.transport.abort()

    PROTOCOL = SocketProtocol
