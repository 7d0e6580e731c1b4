"""Ready-made WebSocket frames, written straight to the connection when that is safe.

An event's bytes from Redis are the same for every socket that watches its session,
and a server's frames are not masked, so the whole frame is the same too. The hub
frames each event once (:func:`text_frame`); a socket that is keeping up hands those
bytes to its transport with one call, instead of a trip through ASGI, Starlette and
the WebSocket library per socket (about 4 µs against 20 µs per delivered event).

ASGI has no message for "these bytes are a ready frame", so :func:`expose_protocol`
reaches under it, to the socket's uvicorn connection, and :class:`RawSocket` uses it
only while it is safe (both live in :mod:`thoughtwire.api.wsserver`, the uvicorn adapter,
and only with the fast paths on):

* no extension was negotiated (permessage-deflate compresses per socket);
* the connection is open, and we have not sent a close;
* the transport is not pushing back (its buffer is under the high-water mark).

Otherwise frames go the ASGI way, through the socket's bounded queue, where the
slow-client policy applies (:mod:`thoughtwire.api.viewer`). Under any other server, under
uvicorn's own protocol (``THOUGHTWIRE_FAST_PATHS=0``), or with a uvicorn release the
adapter was not tested on, every frame goes the ASGI way.
"""

from __future__ import annotations

# The reach under ASGI lives in the uvicorn adapter, with uvicorn's other internals.
from thoughtwire.api.wsserver import SCOPE_KEY, RawSocket, expose_protocol

__all__ = ["SCOPE_KEY", "RawSocket", "expose_protocol", "text_frame"]


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked text frame, as a server sends it."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 1 << 16:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload
