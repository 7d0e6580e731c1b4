"""uvicorn's protocols: for WebSockets, holding less per socket; for HTTP, bounded.

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

:func:`http_protocol` is the class to hand to ``uvicorn.Config(http=...)``: uvicorn's
httptools protocol, with a deadline and a size bound on every request head, a deadline
on every WebSocket handshake, and a cap on connections (docs/security.md, "Bounds"); it
also caps each accepted connection's kernel send buffer (:func:`cap_send_buffer`), with
the fast paths on or off, WebSockets included (they keep the connection's socket).

This module is the uvicorn adapter: the only code that touches uvicorn's internals.
Besides the two protocols, :func:`expose_protocol` and :class:`RawSocket` write ready
frames straight to a socket's transport (:mod:`thoughtwire.api.wire` says why).

The lighter WebSocket protocol and the raw frame writes are fast paths: with
``THOUGHTWIRE_FAST_PATHS=0``, or with a uvicorn or websockets release not in
:data:`UVICORN`'s tested versions, :func:`ws_protocol` hands uvicorn its own
websockets-sansio protocol, which :func:`expose_protocol` never exposes, so every frame
goes through ASGI. Two things that lean on uvicorn's internals are not fast paths and
stay in both modes: the HTTP protocol's bounds (security), and the close sent at once to
a client that stopped reading (:class:`ClosingProtocol`, so it is told 4008 to resume) (``tests/test_fast_paths.py`` has the canaries that fail
if the uvicorn internals either leans on change).
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from starlette.types import Scope, Send
from starlette.websockets import WebSocket
from websockets.protocol import State

from thoughtwire.shared.fastpaths import Adapter
from thoughtwire.shared.settings import Settings

UVICORN = Adapter("uvicorn", {"uvicorn": "0.54.0", "websockets": "17.4", "httptools": "0.9.0"})

PROTOCOL: Any = "auto"
PUBLIC_PROTOCOL: Any = "auto"  # uvicorn's own choice, where it has no websockets-sansio

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
        """Queue one ASGI message and wake the reader."""
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        """Whether no message waits."""
        return not self._items

    async def get(self) -> Any:
        """The oldest message, waiting for one."""
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
        """Whether the transport may be written to."""
        return self._set

    def set(self) -> None:
        """Mark the transport writable and wake its waiters."""
        self._set = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        """Mark the transport as pushing back."""
        self._set = False

    async def wait(self) -> None:
        """Wait until the transport is writable."""
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

    class ClosingProtocol(WebSocketsSansIOProtocol):
        """uvicorn's WebSocket protocol, closing at once a socket whose client stopped reading.

        Not a fast path but a guarantee (a stalled client is told 4008, to resume): it
        stays with the fast paths off, as the HTTP bounds below do.
        """

        # The handshake's deadline (``HttpProtocol``), let go once the handshake is
        # answered: a timer held for its whole span costs 0.5 KB a new socket.
        handshake_timer: asyncio.TimerHandle | None = None

        async def send(self, message: Any) -> None:
            """Send an ASGI message; a close on a stalled transport closes at once."""
            if message["type"] == "websocket.close" and not self.writable.is_set():
                await self._close_now(message)
            else:
                await super().send(message)
            if self.handshake_timer is not None and (
                self.handshake_complete or self.transport.is_closing()
            ):
                self._stop_handshake_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            """Let the handshake's deadline go with the connection."""
            self._stop_handshake_timer()
            super().connection_lost(exc)

        def _stop_handshake_timer(self) -> None:
            if self.handshake_timer is not None:
                self.handshake_timer.cancel()
                self.handshake_timer = None

        async def _close_now(self, message: Any) -> None:
            """Send a close to a client that stopped reading, without waiting for it.

            uvicorn waits for the transport to be writable before any send, a close
            too, and a client that stopped reading never makes it writable: the close
            would never go, and the client would find its connection dropped (1006)
            instead of told to resume (4008). The close frame is a few bytes: it joins
            the transport's buffer behind the frames already there. A client that
            never reads them is cut off after ``CLOSE_FLUSH_SECONDS``.
            """
            # A set flag for this one send: it does not wait.
            paused, self.writable = self.writable, Flag()  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.writable = paused
            self.loop.call_later(CLOSE_FLUSH_SECONDS, self._abandon)

        def _abandon(self) -> None:
            if not self.disconnected:
                self.transport.abort()

    class SocketProtocol(ClosingProtocol):
        """The fast path: :class:`ClosingProtocol` with the lighter queue and flag above,
        and the handshake let go once answered."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.queue = Mailbox()  # type: ignore[assignment]
            self.writable = Flag()  # type: ignore[assignment]

        async def send(self, message: Any) -> None:
            """Send an ASGI message; once the handshake is answered, let it go."""
            await super().send(message)
            if self.handshake_complete and message["type"] == "websocket.accept":
                # Used only to answer the handshake, which is done.
                self.request = self.response = None  # type: ignore[assignment]

    PROTOCOL = SocketProtocol
    PUBLIC_PROTOCOL = ClosingProtocol


def ws_protocol(settings: Settings) -> Any:
    """What to hand to ``uvicorn.Config(ws=...)``: :class:`SocketProtocol` with the fast
    paths on and a tested uvicorn, else uvicorn's own websockets-sansio protocol (as
    :class:`ClosingProtocol`, which only adds the close to a stalled client)."""
    if PROTOCOL != "auto" and UVICORN.enabled(settings.fast_paths):
        return PROTOCOL
    return PUBLIC_PROTOCOL


# Raw frame writes (thoughtwire.api.wire): only under the lighter protocol above, so
# that with the fast paths off nothing but ASGI writes to a socket.
SCOPE_KEY = "thoughtwire.ws_protocol"


def expose_protocol(scope: Scope, send: Send) -> None:
    """Put this module's WebSocket connection in the scope, for :class:`RawSocket`.

    ``send`` must be the server's own (a middleware's wrapper hides the connection), so
    the application's own entry point calls this: :class:`thoughtwire.api.lane.Gateway`.
    A connection of uvicorn's own protocol (the fast paths off) is never exposed.
    """
    if scope["type"] == "websocket" and PROTOCOL != "auto":
        owner = getattr(send, "__self__", None)
        if isinstance(owner, PROTOCOL):
            scope[SCOPE_KEY] = owner


class RawSocket:
    """Writes whole frames to one accepted socket's transport, or says it cannot."""

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    @classmethod
    def of(cls, websocket: WebSocket) -> RawSocket | None:
        """The raw writer for an accepted socket, or None where frames must go via ASGI."""
        protocol = websocket.scope.get(SCOPE_KEY)
        if protocol is None or protocol.conn.extensions:
            return None
        return cls(protocol)

    def write(self, frame: bytes) -> bool:
        """Write ``frame`` now; False (nothing written) when it must go the ASGI way."""
        protocol = self._protocol
        if (
            protocol.close_sent
            or not protocol.writable.is_set()
            or protocol.conn.state is not State.OPEN
            or protocol.transport.is_closing()
        ):
            return False
        protocol.transport.write(frame)
        return True


# The HTTP side: each request head is bounded in time and size, and connections are
# capped. uvicorn (0.54) with httptools has neither a deadline for a request head nor
# a limit on its size, and its ``limit_concurrency`` does not fit a socket server: it
# never applies to WebSocket upgrades (they return before the check), and it answers
# 503 to /healthz and /readyz once that many sockets are open.

# Answered past the cap: a full frontend is the one whose metrics are wanted most.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
# Connections past the cap that are still read, in case they are probes; past these,
# a connection is answered 503 and closed before anything is read.
PROBE_ROOM = 64
# The uvicorn releases these bounds were tested on: UVICORN.tested.
TESTED_UVICORN = (".".join(UVICORN.tested["uvicorn"].split(".")[:2]),)


@dataclass(frozen=True)
class RequestBounds:
    """What one connection may hold: before it is known to be harmless, and in the kernel."""

    head_timeout: float  # seconds to send a request head, or to answer a handshake
    max_head_bytes: int
    max_connections: int
    send_buffer_bytes: int = 0  # SO_SNDBUF of each accepted connection; 0: the kernel's

    @classmethod
    def of(cls, settings: Settings) -> RequestBounds:
        """The limits ``settings`` set."""
        return cls(
            settings.handshake_timeout,
            settings.max_header_bytes,
            settings.max_connections,
            settings.send_buffer_bytes,
        )


def cap_send_buffer(transport: Any, size: int) -> None:
    """Set an accepted connection's kernel send buffer to ``size`` bytes (0: leave it).

    Linux autotunes a TCP send buffer up to tcp_wmem's maximum (4 MiB): a client that
    stops reading would have megabytes of frames held there, where the frontend cannot
    merge them and no setting bounds them. Capped, the kernel pushes back early and
    the backlog waits in the viewer's bounded, merging queue (:mod:`thoughtwire.api.backlog`).
    Set once, as the connection is made: the WebSocket protocol that takes the
    connection over after the upgrade keeps the same socket.
    """
    sock = transport.get_extra_info("socket") if size else None
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except OSError:  # pragma: no cover - a socket without a send buffer to set
        pass


def response(status: int, reason: str) -> bytes:
    """A whole HTTP/1.1 reply that ends the connection, written before any app runs."""
    body = reason.encode()
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"content-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


def _expire_handshake(socket: Any) -> None:
    # Called on every upgraded connection; only those the app has not answered go.
    if not getattr(socket, "handshake_complete", True) and not socket.transport.is_closing():
        socket.transport.close()


HTTP_PROTOCOL: Any = None
try:
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - no httptools: uvicorn's h11 protocol, unbounded
    pass
else:

    class HttpProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, with a deadline and a size bound on each request
        head, a deadline on each WebSocket handshake, and a cap on connections."""

        limits: RequestBounds  # set on the class that :func:`http_protocol` makes

        def connection_made(self, transport: Any) -> None:
            """Cap the connection's send buffer, count it and start the head's timer."""
            over = len(self.connections) - self.limits.max_connections
            cap_send_buffer(transport, self.limits.send_buffer_bytes)
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            self._in_head = True  # the first bytes are a head
            self._begun = False  # and none has come yet
            self._head_bytes = 0
            self._over_cap = over >= 0
            if over >= PROBE_ROOM:
                self._refuse(503, "too many connections")
                return
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            """Stop the head's timer as the connection goes."""
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            """Parse bytes, counting a head's against the head bound."""
            super().data_received(data)
            if self._in_head:
                # A chunk that began a head may also end the previous body: it is
                # counted whole, an overcount of one read at most.
                self._head_bytes += len(data)
                if self._head_bytes > self.limits.max_head_bytes:
                    self._refuse(431, "the request head is too large")

        def on_message_begin(self) -> None:
            """A new request's head begins: count and time it from here."""
            super().on_message_begin()
            self._in_head = self._begun = True
            self._head_bytes = 0
            self._arm()  # a head pipelined behind a running response: from its first byte

        def on_headers_complete(self) -> None:
            """A head is whole: stop its timer; past the connection cap, answer 503."""
            self._in_head = self._begun = False
            self._disarm()
            if self._over_cap and httptools.parse_url(self.url).path.decode() not in PROBES:
                self.limit_concurrency = 0  # uvicorn's own 503, which closes the connection
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            """A response is out: the next head is due within the handshake timeout."""
            super().on_response_complete()
            if not self.transport.is_closing() and not self.pipeline:
                self._arm()  # the next head is due; the idle wait is uvicorn's keep-alive

        def handle_websocket_upgrade(self) -> None:
            """Upgrade to a WebSocket, unless past the connection cap; time the handshake."""
            if self._over_cap:
                self._refuse(503, "too many connections")
                return
            super().handle_websocket_upgrade()
            protocol = self.transport.get_protocol()
            timer = self.loop.call_later(self.limits.head_timeout, _expire_handshake, protocol)
            if hasattr(protocol, "handshake_timer"):  # ours: it lets go once answered
                protocol.handshake_timer = timer

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.limits.head_timeout, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            # A connection idle between requests is closed without a word, as uvicorn's
            # keep-alive does: a client could take a 408 for its next request's reply.
            self._refuse(408, "the request head took too long", reply=self._begun)

        def _refuse(self, status: int, reason: str, reply: bool = True) -> None:
            """End the connection; with a reply, unless a response is under way on it."""
            self._disarm()
            if self.transport.is_closing():
                return
            if reply and (self.cycle is None or self.cycle.response_complete):
                self.transport.write(response(status, reason))
            self.transport.close()

    HTTP_PROTOCOL = HttpProtocol


def http_protocol(settings: Settings) -> Any:
    """What to hand to ``uvicorn.Config(http=...)``: :class:`HttpProtocol` with ``settings``'
    limits, or, without httptools, ``"auto"`` (no head deadline, size bound, cap or send
    buffer cap)."""
    if HTTP_PROTOCOL is None:  # pragma: no cover
        return "auto"
    return type("BoundedHttpProtocol", (HTTP_PROTOCOL,), {"limits": RequestBounds.of(settings)})
