"""Ready-made WebSocket frames, written straight to the connection when that is safe.

An event's bytes from Redis are the same for every socket that watches its session,
and a server's frames are not masked, so the whole frame is the same too. The hub
frames each event once (:func:`text_frame`); a socket that is keeping up hands those
bytes to its transport with one call, instead of a trip through ASGI, Starlette and
the WebSocket library per socket (about 4 µs against 20 µs per delivered event).

ASGI has no message for "these bytes are a ready frame", so :func:`expose_protocol`
reaches under it, to uvicorn's websockets-sansio connection, and :class:`RawSocket`
uses it only while it is safe:

* no extension was negotiated (permessage-deflate compresses per socket);
* the connection is open, and we have not sent a close;
* the transport is not pushing back (its buffer is under the high-water mark).

Otherwise frames go the ASGI way, through the socket's bounded queue, where the
slow-client policy applies (:mod:`thoughtwire.api.viewer`). Under any other server, or with a
protocol this module does not know, every frame goes the ASGI way.
"""

from __future__ import annotations

from typing import Any

from starlette.types import Scope, Send
from starlette.websockets import WebSocket
from websockets.protocol import State

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol as _Known,
    )
except ImportError:  # pragma: no cover - another server, or another uvicorn
    _Known = None  # type: ignore[assignment,misc]

SCOPE_KEY = "thoughtwire.ws_protocol"


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked text frame, as a server sends it."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 1 << 16:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def expose_protocol(scope: Scope, send: Send) -> None:
    """Put uvicorn's WebSocket connection in the scope, for :class:`RawSocket`.

    ``send`` must be the server's own (a middleware's wrapper hides the connection), so
    the application's own entry point calls this: :class:`thoughtwire.api.lane.Gateway`.
    """
    if scope["type"] == "websocket" and _Known is not None:
        owner = getattr(send, "__self__", None)
        if isinstance(owner, _Known):
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
